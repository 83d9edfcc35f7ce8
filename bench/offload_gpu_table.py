#!/usr/bin/env python3
"""offload_gpu_table.py OUT_DIR: the GPU offload benchmark (specmoe_offload_offload_bench, OUT_DIR/offload.json)
as a markdown table: per shape, gamma and cache share, time per output token of on-demand LRU, the
look-ahead stand-in and draft prefetch at each draft agreement, with prefetch hit rates."""
import json
import os
import sys

MODE = {"0": "on_demand", "1": "draft", "2": "lookahead"}


def main():
    d = json.load(open(os.path.join(sys.argv[1], "offload.json")))
    rows = {}
    for b in d["benchmarks"]:
        if not b["name"].startswith("offload_step"):
            continue
        parts = dict(p.split(":") for p in b["name"].split("/")[1:] if ":" in p)
        shape = "dsv2_lite" if parts["model"] == "0" else "mixtral"
        rows[(shape, int(parts["gamma"]), int(parts["cache_pct"]), MODE[parts["mode"]], int(parts["agree_pct"]))] = b
    agrees = sorted({k[4] for k in rows if k[3] == "draft"})
    print("| shape | γ | cache | on demand, LRU (ms) | look-ahead 0.7 (ms) | "
          + " | ".join(f"draft {a}% (ms, hit)" for a in agrees) + " | best draft vs on demand | best draft vs look-ahead |")
    print("|---|---|---|---|---|" + "---|" * len(agrees) + "---|---|")
    for shape, gamma, cache in sorted({k[:3] for k in rows}):
        od = next(v for k, v in rows.items() if k[:4] == (shape, gamma, cache, "on_demand"))
        la = next(v for k, v in rows.items() if k[:4] == (shape, gamma, cache, "lookahead"))
        dr = [rows.get((shape, gamma, cache, "draft", a)) for a in agrees]
        best = min(x["tpot_us"] for x in dr if x)
        cells = " | ".join(f"{x['tpot_us'] / 1e3:.1f} ({x['prefetch_hit_rate']:.2f})" if x else "—" for x in dr)
        print(f"| {shape} | {gamma} | {cache}% | {od['tpot_us'] / 1e3:.1f} | {la['tpot_us'] / 1e3:.1f} ({la['prefetch_hit_rate']:.2f}) | {cells} "
              f"| {od['tpot_us'] / best:.2f} | {la['tpot_us'] / best:.2f} |")


if __name__ == "__main__":
    main()
