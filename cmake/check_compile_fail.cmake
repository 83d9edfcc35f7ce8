# check_compile_fail.cmake -- passes when SOURCE fails to compile with a diagnostic matching
# every `// EXPECT-ERROR: <regex>` line of SOURCE (CMake regex syntax, matched against the
# compiler's combined stdout+stderr, produced in the C locale and without source-line carets).
#
#   cmake -DCOMPILER=<c++> [-DCOMPILER_ID=GNU] -DSOURCE=<file.cpp> -DINCLUDE_DIR=<repo>/include
#         [-DWORK_DIR=<dir>] [-DEXTRA_FLAGS=<;-list>] -P cmake/check_compile_fail.cmake

cmake_minimum_required(VERSION 3.25)

foreach(var IN ITEMS COMPILER SOURCE INCLUDE_DIR)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "check_compile_fail: -D${var}=... is required")
  endif()
endforeach()
if(NOT EXISTS "${SOURCE}")
  message(FATAL_ERROR "check_compile_fail: no such file: ${SOURCE}")
endif()
if(NOT DEFINED WORK_DIR OR WORK_DIR STREQUAL "")
  set(WORK_DIR "${CMAKE_CURRENT_BINARY_DIR}")
endif()
file(MAKE_DIRECTORY "${WORK_DIR}")

file(STRINGS "${SOURCE}" expect_lines REGEX "^[ \t]*//[ \t]*EXPECT-ERROR:")
if(NOT expect_lines)
  message(FATAL_ERROR "check_compile_fail: ${SOURCE} has no '// EXPECT-ERROR: <regex>' line")
endif()
set(patterns "")
foreach(line IN LISTS expect_lines)
  string(REGEX REPLACE "^[ \t]*//[ \t]*EXPECT-ERROR:[ \t]*" "" pattern "${line}")
  string(STRIP "${pattern}" pattern)
  if(pattern STREQUAL "")
    message(FATAL_ERROR "check_compile_fail: empty EXPECT-ERROR regex in ${SOURCE}")
  endif()
  list(APPEND patterns "${pattern}")
endforeach()

set(flags -std=c++20 "-I${INCLUDE_DIR}")
if(NOT DEFINED COMPILER_ID OR COMPILER_ID STREQUAL "GNU")
  list(APPEND flags -fno-diagnostics-show-caret -fdiagnostics-color=never)
elseif(COMPILER_ID MATCHES "Clang")
  list(APPEND flags -fno-caret-diagnostics -fdiagnostics-color=never)
endif()
list(APPEND flags ${EXTRA_FLAGS})

get_filename_component(stem "${SOURCE}" NAME_WE)
set(object "${WORK_DIR}/${stem}.o")
file(REMOVE "${object}")

set(ENV{LC_ALL} C)
set(ENV{LANG} C)
execute_process(
  COMMAND "${COMPILER}" ${flags} -c "${SOURCE}" -o "${object}"
  RESULT_VARIABLE rc
  OUTPUT_VARIABLE out
  ERROR_VARIABLE out)
file(REMOVE "${object}")

if(rc EQUAL 0)
  message(FATAL_ERROR "check_compile_fail: ${SOURCE} COMPILED, but it must not.\n${out}")
endif()
set(missing "")
foreach(pattern IN LISTS patterns)
  if(NOT out MATCHES "${pattern}")
    list(APPEND missing "${pattern}")
  endif()
endforeach()
if(missing)
  message(FATAL_ERROR "check_compile_fail: ${SOURCE} failed to compile (${rc}) as expected, but the output "
                      "does not match EXPECT-ERROR regex(es): ${missing}\n--- compiler output ---\n${out}")
endif()
message(STATUS "check_compile_fail: ${SOURCE} was rejected as expected (matched: ${patterns})")
