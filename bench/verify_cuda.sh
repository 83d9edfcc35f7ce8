#!/usr/bin/env bash
# bench/verify_cuda.sh OUT_DIR: the GPU tests alone, in one short device call (no benchmarks):
# builds and runs specmoe_kernels_cuda_tests and specmoe_layer_cuda_tests.
set -uo pipefail
out=${1:?usage: bench/verify_cuda.sh OUT_DIR}
mkdir -p "${out}"
export NCCL_NVLS_ENABLE=0
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
exit ${status}
