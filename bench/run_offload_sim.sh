#!/usr/bin/env bash
# bench/run_offload_sim.sh BUILD_BIN_DIR OUT_DIR [PROFILE_DIR]: SP-MoE offloading in simulation (CPU
# only). Synthetic traces with draft routing of set agreement (0.6, 0.8, 0.9) for DeepSeek-V2-Lite
# (26 layers, 64 experts, top-6, 16.5 MiB experts, a 4-bit self-draft) and Mixtral-8x7B (32 layers,
# 8 experts, top-2, 336 MiB experts, a Mistral-7B-sized draft of 13.8 GiB); caches of 25% and 50% of
# the experts; gamma 1, 2, 4; predictors none (on-demand), lookahead (0.7), draft (cutoff from the
# latency model) and oracle; a cutoff sweep per shape. With PROFILE_DIR, profiles measured on the GPU
# (dsv2_lite_gamma{1,2,4}.json, mixtral_gamma{1,2,4}.json) replace the defaults where present.
# One JSON object per line in OUT_DIR/offload.jsonl; a table with bench/offload_table.py.
set -euo pipefail
bin=${1:?usage: bench/run_offload_sim.sh BUILD_BIN_DIR OUT_DIR [PROFILE_DIR]}
out=${2:?usage: bench/run_offload_sim.sh BUILD_BIN_DIR OUT_DIR [PROFILE_DIR]}
profiles=${3:-}
mkdir -p "${out}"
: >"${out}/offload.jsonl"
steps=${SPECMOE_OFFLOAD_STEPS:-400}
for shape in dsv2_lite mixtral; do
  if [[ ${shape} == dsv2_lite ]]; then
    model=deepseek_v2_lite; total=$((26 * 64)); size="--expert-mib 16.5"
  else
    model=mixtral; total=$((32 * 8)); size="--expert-mib 336 --draft-mib 13800"
  fi
  for agree in 0.6 0.8 0.9; do
    trace="${out}/trace_${shape}_${agree}"
    layers=$([[ ${shape} == dsv2_lite ]] && echo 26 || echo 32)
    "${bin}/specmoe-trace-gen" --out "${trace}" --model "${model}" --tokens 16384 --draft-layers "${layers}" \
      --draft-agreement "${agree}" >/dev/null
    for share in 25 50; do
      cache=$((total * share / 100))
      for gamma in 1 2 4; do
        prof=""
        [[ -n ${profiles} && -f ${profiles}/${shape}_gamma${gamma}.json ]] && prof="--profile ${profiles}/${shape}_gamma${gamma}.json --stretch-profile"
        for p in lookahead draft oracle; do
          # the draft keeps its guesses until their layer runs (protect_frequency); look-ahead's
          # 30% wrong guesses would hold slots all step, and the oracle is the floor: plain order
          repl=$([[ ${p} == draft ]] && echo protect_frequency || echo frequency)
          # shellcheck disable=SC2086
          "${bin}/specmoe-sim" --trace "${trace}" --offload --cache-experts "${cache}" --gamma "${gamma}" --predictor "${p}" \
            --replacement "${repl}" --steps "${steps}" ${size} ${prof} |
            sed "s/^{/{\"shape\": \"${shape}\", \"agreement\": ${agree}, \"cache_share\": ${share}, /" >>"${out}/offload.jsonl"
        done
      done
    done
  done
  # the cutoff sweep: simulated beside modelled, at 0.8 agreement, 25% cache, gamma 1
  # shellcheck disable=SC2086
  "${bin}/specmoe-sim" --trace "${out}/trace_${shape}_0.8" --offload --cache-experts $((total / 4)) --gamma 1 --predictor draft \
    --replacement protect_frequency --steps "${steps}" --sweep ${size} | sed "s/^{/{\"shape\": \"${shape}\", \"agreement\": 0.8, \"cache_share\": 25, \"kind\": \"sweep\", /" \
    >>"${out}/offload.jsonl"
done
echo "wrote ${out}/offload.jsonl ($(wc -l <"${out}/offload.jsonl") runs)"
