# run_tests.cmake -- builds and runs the host test suite:  cmake -P cmake/run_tests.cmake
#
# Installs missing prerequisites (root + apt-get only), then
#   cmake --preset host && cmake --build --preset host -j<nproc> && ctest --preset host -j<nproc>
# from the source tree, whatever the current directory. Extra ctest arguments:
#   cmake -DARGS="-R core -V" -P cmake/run_tests.cmake
# Stops with an error on the first failing step.

cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/specmoe_prereqs.cmake")

specmoe_ensure_prereqs()
specmoe_nproc(jobs)
set(ctest_args "")
if(DEFINED ARGS)
  separate_arguments(ctest_args UNIX_COMMAND "${ARGS}")
endif()

specmoe_run("configure" "${CMAKE_COMMAND}" --preset host)
specmoe_run("build" "${CMAKE_COMMAND}" --build --preset host -j ${jobs})
specmoe_run("test" "${CMAKE_CTEST_COMMAND}" --preset host -j ${jobs} ${ctest_args})
message(STATUS "[specmoe] all host tests passed")
