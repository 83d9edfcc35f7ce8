# run_demo.cmake -- builds and runs the demo:  cmake -P cmake/run_demo.cmake [-DARGS="..."]
#
# Installs missing prerequisites (root + apt-get only); uses the `cuda` preset when
# `nvidia-smi -L` succeeds (a GPU is present), the `host` preset otherwise; builds and runs
# specmoe-demo (examples/demo/main.cpp) -- or, on a GPU machine, specmoe-demo-cuda when
# examples/demo/main.cu exists. ARGS is passed to the demo (split like a shell command line).
# Override the choice with -DPRESET=host|cuda|cuda-debug.

cmake_minimum_required(VERSION 3.25)
include("${CMAKE_CURRENT_LIST_DIR}/specmoe_prereqs.cmake")

specmoe_ensure_prereqs()
specmoe_nproc(jobs)

if(NOT DEFINED PRESET OR PRESET STREQUAL "")
  set(PRESET host)
  find_program(nvidia_smi nvidia-smi NO_CACHE)
  if(nvidia_smi)
    execute_process(COMMAND "${nvidia_smi}" -L RESULT_VARIABLE smi_rc OUTPUT_VARIABLE smi_out ERROR_QUIET)
    if(smi_rc EQUAL 0 AND smi_out MATCHES "GPU")
      set(PRESET cuda)
    endif()
  endif()
endif()

set(target specmoe-demo)
if(NOT PRESET STREQUAL "host" AND EXISTS "${SPECMOE_SOURCE_DIR}/examples/demo/main.cu")
  set(target specmoe-demo-cuda)
endif()
if(NOT EXISTS "${SPECMOE_SOURCE_DIR}/examples/demo/main.cpp" AND target STREQUAL "specmoe-demo")
  message(FATAL_ERROR "[specmoe] examples/demo/main.cpp does not exist")
endif()
message(STATUS "[specmoe] demo: preset ${PRESET}, target ${target}")

set(demo_args "")
if(DEFINED ARGS)
  separate_arguments(demo_args UNIX_COMMAND "${ARGS}")
endif()

specmoe_run("configure" "${CMAKE_COMMAND}" --preset ${PRESET})
specmoe_run("build" "${CMAKE_COMMAND}" --build --preset ${PRESET} -j ${jobs} --target ${target})

set(binary_dir "${SPECMOE_SOURCE_DIR}/build/${PRESET}")
set(exe "")
foreach(candidate IN ITEMS "${binary_dir}/bin/${target}" "${binary_dir}/bin/Release/${target}"
                           "${binary_dir}/bin/Debug/${target}" "${binary_dir}/examples/${target}")
  if(exe STREQUAL "" AND EXISTS "${candidate}")
    set(exe "${candidate}")
  endif()
endforeach()
if(exe STREQUAL "")
  message(FATAL_ERROR "[specmoe] built ${target}, but found no executable under ${binary_dir}/bin")
endif()
specmoe_run("demo" "${exe}" ${demo_args})
