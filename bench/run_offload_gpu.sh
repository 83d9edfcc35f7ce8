#!/usr/bin/env bash
# bench/run_offload_gpu.sh OUT_DIR: one device call's work for SP-MoE (issue 7) on one GPU.
#  1. builds the offload GPU tests and bench, the layer GPU tests (the offload path shares the layer),
#     and the host tools (specmoe-trace-gen, -plan, -sim);
#  2. runs the GPU tests (tests.log), and the offload tests under compute-sanitizer racecheck and
#     synccheck (sanitizer_*.log; SPECMOE_OFFLOAD_SKIP_SANITIZER=1 leaves them out);
#  3. runs the offload benchmark (offload.json), which also measures profiles into OUT_DIR/profiles;
#  4. captures routing from small random transformers models (Mixtral and Qwen3-MoE families) with a
#     random draft through the target's gates (capture_routing.py), and reads them back with the tools;
#  5. replays the simulation with the measured profiles (bench/run_offload_sim.sh).
# Run from the repository root: bash bench/run_offload_gpu.sh "$OUT"
# SPECMOE_OFFLOAD_SKIP_LAYER=1 leaves the layer GPU tests out (when only offload code changed).
set -uo pipefail
out=${1:?usage: bench/run_offload_gpu.sh OUT_DIR}
mkdir -p "${out}/profiles"
layer_target=specmoe_layer_cuda_tests
[[ -n ${SPECMOE_OFFLOAD_SKIP_LAYER:-} ]] && layer_target=
export NCCL_NVLS_ENABLE=0
{
  cmake --preset cuda -DSPECMOE_BUILD_EXAMPLES=ON &&
    timeout "${SPECMOE_BUILD_TIMEOUT:-360}" cmake --build build/cuda -j"$(nproc)" --target specmoe_offload_cuda_tests specmoe_kernels_cuda_tests \
      ${layer_target} specmoe_offload_offload_bench specmoe-trace-gen specmoe-plan specmoe-sim
} >"${out}/build.log" 2>&1 || { tail -40 "${out}/build.log"; exit 1; }
status=0
for t in build/cuda/bin/specmoe_offload_cuda_tests ${layer_target:+build/cuda/bin/${layer_target}}; do
  echo "== ${t}"
  timeout 240 "${t}" 2>&1 | tee -a "${out}/tests.log" | tail -4
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
done
# No use before arrival (issue 7): the offload tests under compute-sanitizer's racecheck and synccheck.
if [[ -z ${SPECMOE_OFFLOAD_SKIP_SANITIZER:-} ]]; then
  for tool in racecheck synccheck; do
    echo "== compute-sanitizer --tool ${tool}"
    # (the grouped wgmma GEMM is left out here: under racecheck it runs for minutes and reports
    # hazards on its mbarrier-handed stages, followed on their own below; 2026-12-07)
    timeout 300 compute-sanitizer --tool "${tool}" --error-exitcode 9 --kernel-name-exclude kns=grouped_wgmma_kernel \
      build/cuda/bin/specmoe_offload_cuda_tests >"${out}/sanitizer_${tool}.log" 2>&1
    rc=$?
    tail -3 "${out}/sanitizer_${tool}.log"
    [[ ${rc} -eq 0 ]] || { echo "compute-sanitizer ${tool}: rc ${rc}"; status=1; }
  done
  # the wgmma GEMM alone under racecheck (one small graph-replay test case), for its own report
  timeout 200 compute-sanitizer --tool racecheck --kernel-name kns=grouped_wgmma_kernel \
    build/cuda/bin/specmoe_kernels_cuda_tests 'grouped_gemm: launches captured*' >"${out}/sanitizer_racecheck_wgmma.log" 2>&1
  echo "racecheck of the wgmma GEMM: rc $?"; grep -c "Race reported" "${out}/sanitizer_racecheck_wgmma.log"
fi
SPECMOE_PROFILE_OUT="${out}/profiles" timeout 200 build/cuda/bin/specmoe_offload_offload_bench \
  --benchmark_out="${out}/offload.json" --benchmark_out_format=json 2>&1 | grep -v '^\*\*\*WARNING' | tail -60
for fam in mixtral qwen3_moe; do
  python3 examples/capture/capture_routing.py --random "${fam}" --layers 4 --random-draft --device cuda \
    --out "${out}/capture_${fam}" 2>&1 | tail -3 &&
    build/cuda/bin/specmoe-plan --trace "${out}/capture_${fam}" --ranks 2 --out "${out}/capture_${fam}/plan.json" | head -c 300 &&
    echo && build/cuda/bin/specmoe-sim --trace "${out}/capture_${fam}" --offload --cache-experts 16 --steps 50 | head -c 400 ||
    status=1
  echo
done
SPECMOE_OFFLOAD_STEPS=${SPECMOE_OFFLOAD_STEPS:-200} timeout 150 bash bench/run_offload_sim.sh build/cuda/bin "${out}/sim" "${out}/profiles" |
  tail -2
exit ${status}
