# specmoe_prereqs.cmake -- included by run_tests.cmake and run_demo.cmake (script mode).
#
# specmoe_ensure_prereqs(): when Catch2's headers, Google Benchmark's CMake package or a C++
# compiler is missing, and this is root on a machine with apt-get, installs them
# (catch2 libbenchmark-dev g++; cmake too if the running one is not a system one -- never needed,
# since cmake is what runs this script). Otherwise only warns: configuring then says what is missing.
#
# specmoe_run(<description> <command>...): runs a command in the source tree, echoing it, and
# stops with FATAL_ERROR on a non-zero exit.

include_guard(GLOBAL)

get_filename_component(SPECMOE_SOURCE_DIR "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

function(specmoe_run what)
  string(REPLACE ";" " " pretty "${ARGN}")
  message(STATUS "[specmoe] ${what}: ${pretty}")
  string(TIMESTAMP t0 "%s")
  execute_process(COMMAND ${ARGN} WORKING_DIRECTORY "${SPECMOE_SOURCE_DIR}" RESULT_VARIABLE rc)
  string(TIMESTAMP t1 "%s")
  math(EXPR dt "${t1} - ${t0}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[specmoe] ${what} FAILED (exit ${rc}) after ${dt} s: ${pretty}")
  endif()
  message(STATUS "[specmoe] ${what}: done in ${dt} s")
endfunction()

function(specmoe_ensure_prereqs)
  set(missing "")

  set(catch2_found FALSE)
  foreach(prefix IN ITEMS /usr/include /usr/local/include)
    if(EXISTS "${prefix}/catch2/catch.hpp" OR EXISTS "${prefix}/catch2/catch_all.hpp")
      set(catch2_found TRUE)
    endif()
  endforeach()
  if(NOT catch2_found)
    list(APPEND missing catch2)
  endif()

  file(GLOB benchmark_configs
    /usr/lib/cmake/benchmark/benchmarkConfig.cmake
    /usr/lib/*/cmake/benchmark/benchmarkConfig.cmake
    /usr/local/lib/cmake/benchmark/benchmarkConfig.cmake
    /usr/local/lib/*/cmake/benchmark/benchmarkConfig.cmake
    /usr/local/lib64/cmake/benchmark/benchmarkConfig.cmake
    /usr/lib64/cmake/benchmark/benchmarkConfig.cmake)
  if(NOT benchmark_configs)
    list(APPEND missing libbenchmark-dev)
  endif()

  if("$ENV{CXX}" STREQUAL "")
    find_program(specmoe_cxx NAMES c++ g++ clang++ NO_CACHE)
    if(NOT specmoe_cxx)
      list(APPEND missing g++)
    endif()
  endif()

  if(NOT missing)
    return()
  endif()

  execute_process(COMMAND id -u OUTPUT_VARIABLE uid OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  find_program(apt_get apt-get NO_CACHE)
  if(NOT uid STREQUAL "0" OR NOT apt_get)
    message(WARNING "[specmoe] missing: ${missing}; not root or no apt-get, so not installing them. "
                    "Install them (Debian/Ubuntu: apt-get install catch2 libbenchmark-dev cmake g++).")
    return()
  endif()

  # The running cmake satisfies the cmake requirement; install the Debian one only if there is none
  # on the system path at all (e.g. cmake run from a pip wheel), as the README's command asks.
  if(NOT EXISTS /usr/bin/cmake AND NOT EXISTS /usr/local/bin/cmake)
    list(APPEND missing cmake)
  endif()
  message(STATUS "[specmoe] installing missing prerequisites with apt-get: ${missing}")
  set(ENV{DEBIAN_FRONTEND} noninteractive)
  specmoe_run("apt-get update" "${apt_get}" update -q)
  specmoe_run("apt-get install" "${apt_get}" install -y -q --no-install-recommends ${missing})
endfunction()

# specmoe_nproc(<out-var>): the number of logical cores (at least 1).
function(specmoe_nproc out)
  cmake_host_system_information(RESULT cores QUERY NUMBER_OF_LOGICAL_CORES)
  if(NOT cores MATCHES "^[0-9]+$" OR cores LESS 1)
    set(cores 1)
  endif()
  set(${out} ${cores} PARENT_SCOPE)
endfunction()
