# specmoe_targets.cmake -- helpers shared by tests/, bench/ and examples/ (not installed).

include_guard(GLOBAL)

# GCC 12 at -O2 and above reports bogus -Wrestrict warnings inside std::string concatenation
# (GCC PR 105651, fixed in GCC 13): silence that one warning there only.
set(SPECMOE_GCC12_QUIRKS
  $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU>,$<VERSION_LESS:$<CXX_COMPILER_VERSION>,13>>:-Wno-restrict>)

# specmoe_subdirectories(<out-var> <dir>): the immediate subdirectories of <dir> (names only,
# sorted); empty when <dir> does not exist.
function(specmoe_subdirectories out dir)
  set(result "")
  if(IS_DIRECTORY "${dir}")
    file(GLOB children LIST_DIRECTORIES true CONFIGURE_DEPENDS RELATIVE "${dir}" "${dir}/*")
    list(SORT children)
    foreach(child IN LISTS children)
      if(IS_DIRECTORY "${dir}/${child}" AND NOT child MATCHES "^\\.")
        list(APPEND result "${child}")
      endif()
    endforeach()
  endif()
  set(${out} "${result}" PARENT_SCOPE)
endfunction()

# specmoe_host_flags(<target>): the flags every host test, bench and example is built with.
function(specmoe_host_flags target)
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF)
  target_compile_features(${target} PRIVATE cxx_std_20)
  target_compile_options(${target} PRIVATE
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU,Clang,AppleClang>>:-Wall -Wextra>
    ${SPECMOE_GCC12_QUIRKS})
endfunction()

# specmoe_cuda_flags(<target>): the flags every CUDA test, bench and example is built with.
function(specmoe_cuda_flags target)
  # C++20 for the CUDA sources comes from specmoe::cuda (-std=c++20), which the target must link.
  set_target_properties(${target} PROPERTIES CXX_EXTENSIONS OFF CUDA_EXTENSIONS OFF)
  target_compile_features(${target} PRIVATE cxx_std_20)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -Xcompiler=-ffp-contract=off>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<CXX_COMPILER_ID:GNU,Clang,AppleClang>>:-Wall -Wextra -ffp-contract=off>
    ${SPECMOE_GCC12_QUIRKS})
endfunction()

# specmoe_file_contains(<out-var> <file> <text>): TRUE when <file> contains <text> verbatim.
function(specmoe_file_contains out file text)
  file(READ "${file}" content)
  string(FIND "${content}" "${text}" pos)
  if(pos EQUAL -1)
    set(${out} FALSE PARENT_SCOPE)
  else()
    set(${out} TRUE PARENT_SCOPE)
  endif()
endfunction()
