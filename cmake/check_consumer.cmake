# check_consumer.cmake -- builds and runs a tiny downstream project against specmoe.
#
#   MODE=install:          cmake --install <BUILD_DIR> into <BUILD_DIR>/consumer_prefix, then
#                          configure/build/run tests/consumer with find_package(specmoe CONFIG REQUIRED).
#   MODE=add_subdirectory: configure/build/run tests/consumer_subdir, which add_subdirectory()s the
#                          source tree (SPECMOE_ROOT) with SPECMOE_ENABLE_CUDA=OFF.
#
# Inputs: MODE, SOURCE_DIR, BUILD_DIR, CXX, GENERATOR, [MAKE_PROGRAM], [CONFIG], [VERSION],
#         [EXPECT_CUDA] (install mode: whether specmoe::cuda must be exported), [CUDA_ROOT].

cmake_minimum_required(VERSION 3.25)

foreach(var IN ITEMS MODE SOURCE_DIR BUILD_DIR CXX GENERATOR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_consumer: -D${var}=... is required")
  endif()
endforeach()
if(NOT DEFINED CONFIG OR CONFIG STREQUAL "")
  set(CONFIG Release)
endif()

function(run_step what)
  string(REPLACE ";" " " pretty "${ARGN}")
  message(STATUS "check_consumer: ${what}: ${pretty}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message("${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "check_consumer: ${what} failed (${rc})")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

set(configure_args -G "${GENERATOR}" "-DCMAKE_CXX_COMPILER=${CXX}" "-DCMAKE_BUILD_TYPE=${CONFIG}")
if(DEFINED MAKE_PROGRAM AND NOT MAKE_PROGRAM STREQUAL "")
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()

if(MODE STREQUAL "install")
  set(prefix "${BUILD_DIR}/consumer_prefix")
  set(consumer_source "${SOURCE_DIR}/tests/consumer")
  set(consumer_build "${BUILD_DIR}/consumer_build")
  file(REMOVE_RECURSE "${prefix}" "${consumer_build}")
  run_step("install" "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${prefix}" --config "${CONFIG}")
  file(GLOB_RECURSE config_files "${prefix}/*/specmoeConfig.cmake")
  file(GLOB_RECURSE version_files "${prefix}/*/specmoeConfigVersion.cmake")
  if(NOT config_files OR NOT version_files OR NOT EXISTS "${prefix}/include/specmoe/config.hpp")
    message(FATAL_ERROR "check_consumer: the install tree ${prefix} lacks specmoeConfig.cmake, "
                        "specmoeConfigVersion.cmake or include/specmoe/config.hpp")
  endif()
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_FIND_PACKAGE_PREFER_CONFIG=ON")
  if(DEFINED VERSION)
    list(APPEND configure_args "-DSPECMOE_EXPECTED_VERSION=${VERSION}")
  endif()
  if(DEFINED EXPECT_CUDA)
    list(APPEND configure_args "-DSPECMOE_EXPECT_CUDA=${EXPECT_CUDA}")
  endif()
  if(DEFINED CUDA_ROOT AND NOT CUDA_ROOT STREQUAL "")
    list(APPEND configure_args "-DCUDAToolkit_ROOT=${CUDA_ROOT}")
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  set(consumer_source "${SOURCE_DIR}/tests/consumer_subdir")
  set(consumer_build "${BUILD_DIR}/consumer_subdir_build")
  file(REMOVE_RECURSE "${consumer_build}")
  list(APPEND configure_args "-DSPECMOE_ROOT=${SOURCE_DIR}" "-DSPECMOE_ENABLE_CUDA=OFF")
else()
  message(FATAL_ERROR "check_consumer: MODE must be install or add_subdirectory, not '${MODE}'")
endif()

run_step("configure" "${CMAKE_COMMAND}" -S "${consumer_source}" -B "${consumer_build}" ${configure_args})
run_step("build" "${CMAKE_COMMAND}" --build "${consumer_build}" --config "${CONFIG}")

# The consumer projects put their executable directly in their build dir (any generator).
set(exe "${consumer_build}/specmoe_consumer${CMAKE_EXECUTABLE_SUFFIX}")
if(NOT EXISTS "${exe}")
  message(FATAL_ERROR "check_consumer: ${exe} was not built")
endif()
run_step("run" "${exe}")
message(STATUS "check_consumer: ${MODE} consumer OK")
