#!/usr/bin/env bash
# bench/run_cuda.sh OUT_DIR: one device call's work for the cuda_space issue. Builds the cuda preset
# (tests and benches), runs the GPU tests, the kernel and layer benchmarks (JSON), and the torch
# peers in the same run. Run on a GPU machine from the repository root:
#   bash bench/run_cuda.sh "$OUT"
# SPECMOE_SKIP_BUILD_TARGETS / SPECMOE_BENCH_FILTER narrow a run (both optional).
set -uo pipefail
out=${1:?usage: bench/run_cuda.sh OUT_DIR}
mkdir -p "${out}"
export NCCL_NVLS_ENABLE=0
{
  cmake --preset cuda -DSPECMOE_BUILD_EXAMPLES=OFF &&
    timeout "${SPECMOE_BUILD_TIMEOUT:-420}" cmake --build build/cuda -j"$(nproc)" --target specmoe_kernels_cuda_tests \
      specmoe_layer_cuda_tests specmoe_kernels_grouped_gemm_bench specmoe_kernels_routing_kernels_bench \
      specmoe_layer_cuda_moe_layer_bench
} >"${out}/build.log" 2>&1 || { tail -40 "${out}/build.log"; exit 1; }
status=0
for t in build/cuda/bin/specmoe_kernels_cuda_tests build/cuda/bin/specmoe_layer_cuda_tests; do
  "${t}" 2>&1 | tee -a "${out}/tests.log" | tail -4
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
filter=${SPECMOE_BENCH_FILTER:-.}
build/cuda/bin/specmoe_layer_cuda_moe_layer_bench --benchmark_filter="${filter}" --benchmark_out="${out}/layer.json" \
  --benchmark_out_format=json --benchmark_min_time=0.05s 2>&1 | grep -v '^\*\*\*WARNING'
build/cuda/bin/specmoe_kernels_routing_kernels_bench --benchmark_filter="${filter}" --benchmark_out="${out}/routing.json" \
  --benchmark_out_format=json --benchmark_min_time=0.02s >/dev/null 2>&1 || echo "routing kernels bench failed"
[[ -n "${SPECMOE_SKIP_GEMM_BENCH:-}" ]] || build/cuda/bin/specmoe_kernels_grouped_gemm_bench --benchmark_filter="${filter}" --benchmark_out="${out}/gemm.json" \
  --benchmark_out_format=json --benchmark_min_time=0.02s >/dev/null 2>&1 || echo "grouped gemm bench failed"
PYTHONUNBUFFERED=1 python3 bench/layer/torch_peers.py "${out}/torch_peers.json" 2>&1 | grep -v ExpertsInterface
exit ${status}
