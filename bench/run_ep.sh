#!/usr/bin/env bash
# bench/run_ep.sh OUT_DIR: one device call's work for expert parallelism (issue 5) on however many
# GPUs the machine has: builds, runs the multi-rank GPU tests, the dispatch/combine benchmark of both
# backends, the NVLink peer-copy limit and torch's all_to_all_single in the same run (JSON to OUT_DIR),
# the whole layer, and Speculative MoE's block (plain vs shuffled, issue 6), then prints the tables.
# On one GPU the benchmarks run 2 ranks sharing it (functional only).
#   bash bench/run_ep.sh "$OUT"
# Env: SPECMOE_SKIP_TESTS=1, SPECMOE_TEST_REPEAT=N, SPECMOE_BENCH_FILTER (regex), SPECMOE_SKIP_LAYER=1, SPECMOE_LAYER_FILTER,
# SPECMOE_SKIP_TORCH=1, SPECMOE_SKIP_DISPATCH=1, SPECMOE_SKIP_BLOCK=1, SPECMOE_BLOCK_FILTER.
set -uo pipefail
out=${1:?usage: bench/run_ep.sh OUT_DIR}
mkdir -p "${out}"
export NCCL_NVLS_ENABLE=0
export CUDA_MODULE_LOADING=EAGER  # ranks that share a GPU spin on each other (tests/comm/ep_layer_test.cu)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
echo "GPUs: ${gpus}"
targets=(specmoe_comm_peer_copy_bench)
[[ -n "${SPECMOE_SKIP_TESTS:-}" ]] || targets+=(specmoe_comm_cuda_tests)
[[ -n "${SPECMOE_SKIP_DISPATCH:-}" ]] || targets+=(specmoe_comm_ep_dispatch_bench)
[[ -n "${SPECMOE_SKIP_LAYER:-}" ]] || targets+=(specmoe_comm_ep_layer_bench)
[[ -n "${SPECMOE_SKIP_BLOCK:-}" ]] || targets+=(specmoe_comm_tp_block_bench)
{
  cmake --preset cuda -DSPECMOE_BUILD_EXAMPLES=OFF &&
    timeout "${SPECMOE_BUILD_TIMEOUT:-400}" cmake --build build/cuda -j"$(nproc)" --target "${targets[@]}"
} >"${out}/build.log" 2>&1 || { tail -40 "${out}/build.log"; exit 1; }
echo "built: ${targets[*]}" 
status=0
if [[ -z "${SPECMOE_SKIP_TESTS:-}" ]]; then
  for rep in $(seq "${SPECMOE_TEST_REPEAT:-1}"); do  # the protocol's races show intermittently: repeat
    timeout 300 build/cuda/bin/specmoe_comm_cuda_tests 2>&1 | tee -a "${out}/tests.log" | tail -25
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  done
fi
filter=${SPECMOE_BENCH_FILTER:-.}
if [[ ${gpus} -lt 2 ]]; then export SPECMOE_EP_RANKS=${SPECMOE_EP_RANKS:-2}; fi
[[ -n "${SPECMOE_SKIP_DISPATCH:-}" ]] || timeout 300 build/cuda/bin/specmoe_comm_ep_dispatch_bench --benchmark_filter="${filter}" \
  --benchmark_out="${out}/ep.json" --benchmark_out_format=json 2>&1 | grep -v '^\*\*\*WARNING' | tail -45
[[ -n "${SPECMOE_SKIP_LAYER:-}" ]] || timeout 300 build/cuda/bin/specmoe_comm_ep_layer_bench \
  --benchmark_filter="${SPECMOE_LAYER_FILTER:-${filter}}" --benchmark_out="${out}/ep_layer.json" \
  --benchmark_out_format=json 2>&1 | grep -v '^\*\*\*WARNING' | tail -25
[[ -n "${SPECMOE_SKIP_BLOCK:-}" ]] || timeout 400 build/cuda/bin/specmoe_comm_tp_block_bench \
  --benchmark_filter="${SPECMOE_BLOCK_FILTER:-.}" --benchmark_out="${out}/tp_block.json" \
  --benchmark_out_format=json 2>&1 | grep -v '^\*\*\*WARNING' | tail -45
if [[ ${gpus} -ge 2 ]]; then
  build/cuda/bin/specmoe_comm_peer_copy_bench --benchmark_out="${out}/peer.json" --benchmark_out_format=json 2>&1 | tail -12
  if [[ -z "${SPECMOE_SKIP_TORCH:-}" ]]; then
    timeout 180 torchrun --standalone --nproc-per-node "${gpus}" bench/comm/torch_alltoall_peer.py "${out}/torch.json" 2>&1 | tail -5
    timeout 180 torchrun --standalone --nproc-per-node "${gpus}" bench/comm/torch_alltoall_peer.py "${out}/torch_nodedup.json" --no-dedup 2>&1 | tail -3
    python3 bench/comm_tables.py "${out}/torch.json" "${out}/peer.json" "${out}/ep.json" 2>&1 | tee "${out}/tables.md"
  fi
fi
exit ${status}
