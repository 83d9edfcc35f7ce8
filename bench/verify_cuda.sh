#!/usr/bin/env bash
# bench/verify_cuda.sh OUT_DIR: the GPU tests alone, in one short device call (no benchmarks).
# Builds and runs specmoe_kernels_cuda_tests and specmoe_layer_cuda_tests. grouped_gemm_test.cu is
# compiled on its own under a time limit, because nvcc's front end once stalled on it with Catch2
# v3 (device image); if that compile does not finish, the same test source runs against the small
# stand-in harness in SPECMOE_CATCH_SHIM_DIR (when given), so the kernels are still checked.
set -uo pipefail
out=${1:?usage: bench/verify_cuda.sh OUT_DIR}
mkdir -p "${out}"
export NCCL_NVLS_ENABLE=0
root=$(pwd)
gg=tests/kernels/grouped_gemm_test.cu
cp "${gg}" /tmp/gg_test.cu && rm "${gg}"  # keep it out of the CMake target; compiled below
arch="--generate-code=arch=compute_90a,code=sm_90a"
flags=(-std=c++20 -O3 --expt-relaxed-constexpr -Xcompiler=-ffp-contract=off "${arch}" -DSPECMOE_HAS_CUDA=1)
catch_v3=$( [[ -f /usr/include/catch2/catch_all.hpp || -f /usr/local/include/catch2/catch_all.hpp ]] && echo 1 || echo 0)
( timeout "${SPECMOE_GG_COMPILE_TIMEOUT:-150}" nvcc "${flags[@]}" $([[ ${catch_v3} == 1 ]] && echo -DSPECMOE_CATCH2_V3=1) \
    -I"${root}/tests" -I"${root}/include" -x cu -c /tmp/gg_test.cu -o /tmp/gg_test.o >"${out}/gg_compile.log" 2>&1
  echo "rc=$?" >>"${out}/gg_compile.log" ) &
{
  cmake --preset cuda -DSPECMOE_BUILD_EXAMPLES=OFF -DSPECMOE_BUILD_BENCH=OFF &&
    cmake --build build/cuda -j"$(nproc)" --target specmoe_kernels_cuda_tests specmoe_layer_cuda_tests
} >"${out}/build.log" 2>&1 || { tail -30 "${out}/build.log"; exit 1; }
status=0
for t in build/cuda/bin/specmoe_kernels_cuda_tests build/cuda/bin/specmoe_layer_cuda_tests; do
  echo "== ${t}"
  "${t}" 2>&1 | tee -a "${out}/tests.log" | tail -4
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
wait
echo "== grouped_gemm_test.cu (real Catch2): $(tail -1 "${out}/gg_compile.log")"
main_obj=build/cuda/tests/CMakeFiles/specmoe_test_main.dir/test_main.cpp.o
if grep -q "rc=0" "${out}/gg_compile.log" &&
  nvcc /tmp/gg_test.o "${main_obj}" -o /tmp/gg_tests -lcublas -lCatch2 >>"${out}/gg_compile.log" 2>&1; then
  /tmp/gg_tests 2>&1 | tee -a "${out}/tests.log" | tail -4
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
elif [[ -n "${SPECMOE_CATCH_SHIM_DIR:-}" ]]; then
  echo "== grouped_gemm_test.cu against the stand-in harness"
  nvcc "${flags[@]}" -I"${root}/${SPECMOE_CATCH_SHIM_DIR}" -I"${root}/include" -x cu /tmp/gg_test.cu -o /tmp/gg_shim -lcublas \
    >>"${out}/gg_compile.log" 2>&1 && /tmp/gg_shim 2>&1 | tee -a "${out}/tests.log" | tail -4
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
else
  status=1
fi
cp "/tmp/gg_test.cu" "${gg}"
exit ${status}
