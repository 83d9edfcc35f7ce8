#!/usr/bin/env python3
"""offload_table.py OUT_DIR: markdown tables for docs/benchmarks.md from bench/run_offload_sim.sh's offload.jsonl."""
import json
import os
import sys


def main():
    rows = [json.loads(line) for line in open(os.path.join(sys.argv[1], "offload.jsonl"))]
    runs = {}
    for r in rows:
        if r.get("kind") == "sweep":
            continue
        runs[(r["shape"], r["cache_share"], r["gamma"], r["agreement"], r["predictor"])] = r
    print("| shape | cache | γ | draft agreement | on demand, LRU (ms) | on demand, frequency (ms) | look-ahead (ms) "
          "| draft, SP-MoE (ms) | oracle (ms) | draft vs on demand | draft vs on demand, frequency | draft vs look-ahead "
          "| prefetch hit | recall | cutoff | lossless |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted({k[:4] for k in runs}, key=lambda k: (k[0], k[1], k[2], k[3]))
    for shape, share, gamma, agree in keys:
        d = runs.get((shape, share, gamma, agree, "draft"))
        la = runs.get((shape, share, gamma, agree, "lookahead"))
        o = runs.get((shape, share, gamma, agree, "oracle"))
        if not (d and la and o):
            continue
        lossless = all(x["lossless"] for x in (d, la, o))
        freq = la["on_demand_same_replacement_tpot_us"]  # look-ahead's run: frequency order, no prefetch
        print(f"| {shape} | {share}% | {gamma} | {agree} | {d['on_demand_tpot_us'] / 1e3:.1f} | {freq / 1e3:.1f} "
              f"| {la['tpot_us'] / 1e3:.1f} | {d['tpot_us'] / 1e3:.1f} | {o['tpot_us'] / 1e3:.1f} "
              f"| {d['on_demand_tpot_us'] / d['tpot_us']:.2f} | {freq / d['tpot_us']:.2f} | {la['tpot_us'] / d['tpot_us']:.2f} | {d['prefetch_hit_rate']:.2f} | {d['prediction_recall']:.2f} "
              f"| {d['cutoff_layer']} | {'yes' if lossless else 'NO'} |")
    for r in rows:
        if r.get("kind") != "sweep":
            continue
        print()
        print(f"Cutoff sweep, {r['shape']}, cache {r['cache_share']}%, γ {r['gamma']}, agreement {r['agreement']}: "
              f"best simulated cutoff {r['best_cutoff']} ({r['best_tpot_us'] / 1e3:.2f} ms), the model's choice "
              f"{r['model_cutoff']} (simulated {r['model_cutoff_over_best']:.3f}x the best).")
        print()
        print("| cutoff | " + " | ".join(str(s["cutoff"]) for s in r["sweep"]) + " |")
        print("|---|" + "---|" * len(r["sweep"]))
        print("| simulated (ms) | " + " | ".join(f"{s['sim_tpot_us'] / 1e3:.1f}" for s in r["sweep"]) + " |")
        print("| model (ms) | " + " | ".join(f"{s['model_tpot_us'] / 1e3:.1f}" for s in r["sweep"]) + " |")


if __name__ == "__main__":
    main()
