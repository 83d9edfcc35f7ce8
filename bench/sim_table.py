#!/usr/bin/env python3
"""sim_table.py SIM.jsonl: the markdown table of bench/run_sim.sh's specmoe-sim rows."""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| model | EP | plan | predictor | LAR | contiguous LAR | LAR ratio | cross-rank bytes vs contiguous | shuffle bytes / contiguous bytes "
      "| prediction accuracy | max rank load / mean | lossless |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["tool"] != "sim":
        continue
    ratio = r["lar"] / r["baseline_lar"] if r["baseline_lar"] else float("nan")
    plan = r["solver"] + (f" + {r['replicas_per_rank']} replicas/rank" if r["replicas_per_rank"] else "")
    print(f"| {r['model']} | {r['ranks']} | {plan} | {r['predictor']} | {r['lar']:.3f} | {r['baseline_lar']:.3f} | {ratio:.2f}x | "
          f"{1 - r['bytes_saved']:.3f} ({-100 * r['bytes_saved']:+.1f}%) | {r['shuffle_bytes'] / r['baseline_cross_rank_bytes']:.3f} | "
          f"{r['prediction_accuracy']:.3f} | {r['max_rank_load_over_mean']:.3f} | {str(r['lossless']).lower()} |")
print()
print("| model | EP | plan solve (s) | mean remote share under the plan | max expert load imbalance | mean look-back confidence |")
print("|---|---|---|---|---|---|")
for r in rows:
    if r["tool"] == "plan":
        print(f"| {r['model']} | {r['ranks']} | {r['solve_seconds']:.2f} | {r['mean_remote_share']:.3f} | "
              f"{r['max_expert_load_imbalance']:.3f} | {r['mean_lookback_confidence']:.3f} |")
