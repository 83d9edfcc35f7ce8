#!/usr/bin/env bash
# bench/run_host.sh [BUILD_DIR] [OUT_DIR]: runs every host benchmark (Google Benchmark, JSON out)
# and prints a markdown table of the results (bench/json_to_md.py) for docs/benchmarks.md.
set -euo pipefail
build=${1:-build/host}
out=${2:-${build}/bench-results}
mkdir -p "${out}"
for exe in "${build}"/bin/specmoe_*_bench "${build}/bin/specmoe-custom_predictor"; do
  [[ -x ${exe} ]] || continue
  name=$(basename "${exe}")
  "${exe}" --benchmark_min_time=0.2 --benchmark_format=console --benchmark_out_format=json \
    --benchmark_out="${out}/${name}.json" >/dev/null
done
python3 "$(dirname "$0")/json_to_md.py" "${out}"/*.json
