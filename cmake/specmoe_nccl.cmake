# specmoe_nccl.cmake -- finds NCCL and defines the imported target `specmoe::nccl`.
#
# Used by the specmoe build (include(specmoe_nccl)) and, installed next to specmoeConfig.cmake,
# by the package config to re-create the target for consumers. Not a Find module on purpose:
# it never clashes with a consumer's own FindNCCL.cmake.
#
# Inputs (all optional): NCCL_ROOT (CMake or environment variable), NCCL_HOME / NCCL_DIR (env),
#   SPECMOE_NCCL_INCLUDE_DIR / SPECMOE_NCCL_LIBRARY (cache: set them to skip the search),
#   SPECMOE_NCCL_HINTS (list of directories), CUDAToolkit_LIBRARY_ROOT / CUDAToolkit_INCLUDE_DIRS /
#   CUDAToolkit_LIBRARY_DIR (from find_package(CUDAToolkit)).
# Outputs: SPECMOE_NCCL_FOUND, SPECMOE_NCCL_INCLUDE_DIR, SPECMOE_NCCL_LIBRARY, SPECMOE_NCCL_VERSION,
#   target specmoe::nccl.

if(TARGET specmoe::nccl)
  set(SPECMOE_NCCL_FOUND TRUE)
  return()
endif()

# Search order: NCCL_ROOT (variable, then environment), NCCL_HOME / NCCL_DIR (environment),
# SPECMOE_NCCL_HINTS, the CUDA toolkit, /usr/local/cuda, then the system paths (/usr/include, ...).
set(_specmoe_nccl_hints "")
if(DEFINED NCCL_ROOT)
  list(APPEND _specmoe_nccl_hints "${NCCL_ROOT}")
endif()
foreach(_v IN ITEMS NCCL_ROOT NCCL_HOME NCCL_DIR)
  if(DEFINED ENV{${_v}})
    list(APPEND _specmoe_nccl_hints "$ENV{${_v}}")
  endif()
endforeach()
list(APPEND _specmoe_nccl_hints ${SPECMOE_NCCL_HINTS} ${CUDAToolkit_LIBRARY_ROOT} ${CUDAToolkit_INCLUDE_DIRS}
     ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda)

find_path(SPECMOE_NCCL_INCLUDE_DIR nccl.h
  HINTS ${_specmoe_nccl_hints}
  PATH_SUFFIXES include targets/x86_64-linux/include targets/sbsa-linux/include)
find_library(SPECMOE_NCCL_LIBRARY NAMES nccl
  HINTS ${_specmoe_nccl_hints}
  PATH_SUFFIXES lib64 lib lib/x86_64-linux-gnu lib/aarch64-linux-gnu targets/x86_64-linux/lib targets/sbsa-linux/lib)
mark_as_advanced(SPECMOE_NCCL_INCLUDE_DIR SPECMOE_NCCL_LIBRARY)
unset(_specmoe_nccl_hints)

set(SPECMOE_NCCL_FOUND FALSE)
set(SPECMOE_NCCL_VERSION "")
if(SPECMOE_NCCL_INCLUDE_DIR AND SPECMOE_NCCL_LIBRARY)
  set(SPECMOE_NCCL_FOUND TRUE)
  file(STRINGS "${SPECMOE_NCCL_INCLUDE_DIR}/nccl.h" _specmoe_nccl_defs REGEX "^#define NCCL_(MAJOR|MINOR|PATCH) +[0-9]+")
  foreach(_part IN ITEMS MAJOR MINOR PATCH)
    string(REGEX MATCH "NCCL_${_part} +([0-9]+)" _m "${_specmoe_nccl_defs}")
    set(_specmoe_nccl_${_part} "${CMAKE_MATCH_1}")
  endforeach()
  if(NOT _specmoe_nccl_MAJOR STREQUAL "")
    set(SPECMOE_NCCL_VERSION "${_specmoe_nccl_MAJOR}.${_specmoe_nccl_MINOR}.${_specmoe_nccl_PATCH}")
  endif()
  unset(_specmoe_nccl_defs)
  unset(_specmoe_nccl_MAJOR)
  unset(_specmoe_nccl_MINOR)
  unset(_specmoe_nccl_PATCH)

  add_library(specmoe::nccl UNKNOWN IMPORTED)
  set_target_properties(specmoe::nccl PROPERTIES
    IMPORTED_LOCATION "${SPECMOE_NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${SPECMOE_NCCL_INCLUDE_DIR}")
  if(NOT SPECMOE_NCCL_FIND_QUIETLY)
    message(STATUS "specmoe: found NCCL ${SPECMOE_NCCL_VERSION}: ${SPECMOE_NCCL_LIBRARY}")
  endif()
endif()
