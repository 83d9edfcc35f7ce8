#!/usr/bin/env bash
# bench/run_cuda_decode.sh BIN_DIR OUT_DIR: the decode-latency slice of bench/run_cuda.sh, for
# prebuilt binaries (cmake --preset cuda -DSPECMOE_BUILD_EXAMPLES=OFF, then the targets
# specmoe_kernels_cuda_tests specmoe_layer_cuda_tests specmoe_offload_cuda_tests
# specmoe_kernels_routing_kernels_bench specmoe_layer_cuda_moe_layer_bench
# specmoe_kernels_grouped_gemm_bench): the three GPU test binaries that run the decode kernels (the
# offload suite runs the stream GEMM through caller tables), the gate kernels (automatic and each
# path forced), the launch_cost rows and the fused decode routing beside its three-launch chain,
# the router logits kernel beside cuBLAS (router_logits / router_gemm, 1-16 tokens),
# the one-launch decode FFN beside the two GEMMs
# (/ffn/ rows), the stream GEMMs at 1 and 16 tokens (stream: the bulk-copy kernel on sm_90,
# stream_registers: the register-fed one, ours: the automatic choice), and the whole layer at 1
# and 16 tokens (3 repetitions; with the <model>_one_launch_ffn/1 rows). Run on a GPU machine from the repository root:
#   bash bench/run_cuda_decode.sh build/cuda/bin "$OUT"
# BIN_DIR/../lib, where present, comes first on LD_LIBRARY_PATH (libraries carried with the binaries).
set -uo pipefail
bin=${1:?usage: bench/run_cuda_decode.sh BIN_DIR OUT_DIR}
out=${2:?usage: bench/run_cuda_decode.sh BIN_DIR OUT_DIR}
mkdir -p "${out}"
export LD_LIBRARY_PATH="${bin}/../lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
status=0
for t in specmoe_kernels_cuda_tests specmoe_layer_cuda_tests specmoe_offload_cuda_tests; do
  echo "== ${t}"
  timeout 200 "${bin}/${t}" 2>&1 | tee -a "${out}/tests.log" | tail -3
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
timeout 120 "${bin}/specmoe_kernels_routing_kernels_bench" --benchmark_filter='^(gate|launch_cost|decode_routing|routing_chain|router_logits|router_gemm)' \
  --benchmark_out="${out}/routing.json" --benchmark_out_format=json --benchmark_min_time=0.02 2>&1 |
  grep -E '^(gate|launch_cost|decode_routing|routing_chain|router_logits|router_gemm)' | awk '{print $1, $2, $3}' || status=1
timeout 150 "${bin}/specmoe_kernels_grouped_gemm_bench" \
  --benchmark_filter='(/ffn/|/(stream|stream_registers|ours)/tokens:(1|16)/)' --benchmark_repetitions=3 \
  --benchmark_out="${out}/ffn.json" --benchmark_out_format=json --benchmark_min_time=0.03 2>&1 |
  grep -E '_median' | awk '{print $1, $2}' || status=1
timeout 150 "${bin}/specmoe_layer_cuda_moe_layer_bench" --benchmark_filter='/(1|16)/manual_time' \
  --benchmark_repetitions=3 --benchmark_out="${out}/layer.json" --benchmark_out_format=json \
  --benchmark_min_time=0.05 2>&1 | grep -v '^\*\*\*WARNING' | grep -E 'ceilings|_median|_stddev' || status=1
exit ${status}
