#!/usr/bin/env bash
# bench/run_sim.sh BUILD_BIN_DIR OUT_DIR: Speculative MoE in simulation (CPU only). For the Qwen3-30B-A3B
# and DeepSeek-V3 shapes: two default synthetic traces of the same model (specmoe-trace-gen, same
# --seed, --sample-seed 1 and 2), a plan per EP size from the first (specmoe-plan), then specmoe-sim
# on the second, held-out one, at EP 8, 16, 64 with the combined predictor and at EP 8 with each
# predictor; then, with 2 replica slots a rank, the co-clustered plan and the EPLB-style load-only
# baseline at EP 8 and 64. One JSON object per line in OUT_DIR/sim.jsonl; a table with bench/sim_table.py.
set -euo pipefail
bin=${1:?usage: bench/run_sim.sh BUILD_BIN_DIR OUT_DIR}
out=${2:?usage: bench/run_sim.sh BUILD_BIN_DIR OUT_DIR}
mkdir -p "${out}"
: >"${out}/sim.jsonl"
for model in qwen3_30b_a3b deepseek_v3; do
  train="${out}/train_${model}"
  trace="${out}/test_${model}"
  "${bin}/specmoe-trace-gen" --out "${train}" --model "${model}" --layers 8 --tokens 8192 --sample-seed 1 >/dev/null
  "${bin}/specmoe-trace-gen" --out "${trace}" --model "${model}" --layers 8 --tokens 8192 --sample-seed 2 >/dev/null
  for ranks in 8 16 64; do
    plan="${out}/plan_${model}_${ranks}.json"
    "${bin}/specmoe-plan" --trace "${train}" --ranks "${ranks}" --out "${plan}" | sed "s/^{/{\"model\": \"${model}\", \"tool\": \"plan\", /" >>"${out}/sim.jsonl"
    predictors="combined"
    [[ ${ranks} == 8 ]] && predictors="none token layer combined oracle"
    for p in ${predictors}; do
      "${bin}/specmoe-sim" --trace "${trace}" --ranks "${ranks}" --plan "${plan}" --predictor "${p}" |
        sed "s/^{/{\"model\": \"${model}\", \"tool\": \"sim\", /" >>"${out}/sim.jsonl"
    done
  done
  # hot-expert replicas (2 extra slots a rank): the co-clustered plan, and the EPLB-style load-only baseline
  for ranks in 8 64; do
    for solver in alternating load_balanced; do
      plan="${out}/plan_${model}_${ranks}_${solver}_r2.json"
      "${bin}/specmoe-plan" --trace "${train}" --ranks "${ranks}" --solver "${solver}" --replicas-per-rank 2 --out "${plan}" >/dev/null
      p=combined
      [[ ${solver} == load_balanced ]] && p=none
      "${bin}/specmoe-sim" --trace "${trace}" --ranks "${ranks}" --plan "${plan}" --predictor "${p}" |
        sed "s/^{/{\"model\": \"${model}\", \"tool\": \"sim\", /" >>"${out}/sim.jsonl"
    done
  done
done
echo "wrote ${out}/sim.jsonl"
