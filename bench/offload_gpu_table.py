#!/usr/bin/env python3
"""offload_gpu_table.py OUT_DIR: the GPU offload benchmark (specmoe_offload_offload_bench, OUT_DIR/offload.json)
as markdown: per shape, gamma and cache share, time per output token of on-demand LRU, the look-ahead
stand-in, draft prefetch at every layer for each draft agreement, draft prefetch at the latency
model's cutoff and oracle prefetch with the issue's floor, with prefetch hit rates; then each cutoff
sweep (measured TPOT beside the model's)."""
import json
import os
import sys

MODE = {"0": "on_demand", "1": "draft", "2": "lookahead", "3": "draft_cutoff", "4": "oracle", "5": "on_demand_frequency"}


def args_of(name):
    return dict(p.split(":") for p in name.split("/")[1:] if ":" in p)


def shape_of(parts):
    return "dsv2_lite" if parts["model"] == "0" else "mixtral"


def step_table(benchmarks):
    rows = {}
    for b in benchmarks:
        if not b["name"].startswith("offload_step"):
            continue
        parts = args_of(b["name"])
        rows[(shape_of(parts), int(parts["gamma"]), int(parts["cache_pct"]), MODE[parts["mode"]], int(parts["agree_pct"]))] = b
    agrees = sorted({k[4] for k in rows if k[3] == "draft"})
    has_cutoff = any(k[3] == "draft_cutoff" for k in rows)
    has_oracle = any(k[3] == "oracle" for k in rows)
    has_freq = any(k[3] == "on_demand_frequency" for k in rows)
    print("| shape | γ | cache | on demand, LRU (ms) | " + ("on demand, frequency (ms) | " if has_freq else "") + "look-ahead 0.7 (ms) | "
          + " | ".join(f"draft {a}% (ms, hit)" for a in agrees)
          + (" | draft 80%, model's cutoff (ms, cutoff) | model's cutoff vs on demand" if has_cutoff else "")
          + (" | oracle prefetch (ms) | floor (ms) | best draft vs floor" if has_oracle else "")
          + " | best draft vs on demand | best draft vs look-ahead |")
    print("|---|---|---|---|---|" + ("---|" if has_freq else "") + "---|" * len(agrees) + ("---|---|" if has_cutoff else "") + ("---|---|---|" if has_oracle else "")
          + "---|---|")
    for shape, gamma, cache in sorted({k[:3] for k in rows}):
        od = next(v for k, v in rows.items() if k[:4] == (shape, gamma, cache, "on_demand"))
        la = next(v for k, v in rows.items() if k[:4] == (shape, gamma, cache, "lookahead"))
        dr = [rows.get((shape, gamma, cache, "draft", a)) for a in agrees]
        mc = next((v for k, v in rows.items() if k[:4] == (shape, gamma, cache, "draft_cutoff")), None)
        best = min([x["tpot_us"] for x in dr if x] + ([mc["tpot_us"]] if mc else []))
        cells = " | ".join(f"{x['tpot_us'] / 1e3:.1f} ({x['prefetch_hit_rate']:.2f})" if x else "—" for x in dr)
        if has_cutoff:
            cells += (f" | {mc['tpot_us'] / 1e3:.1f} ({int(mc['cutoff'])}) | {od['tpot_us'] / mc['tpot_us']:.2f}" if mc else " | — | —")
        if has_oracle:
            orc = next((v for k, v in rows.items() if k[:4] == (shape, gamma, cache, "oracle")), None)
            cells += (f" | {orc['tpot_us'] / 1e3:.1f} | {orc['floor_tpot_us'] / 1e3:.1f} | {best / orc['floor_tpot_us']:.2f}"
                      if orc else " | — | — | —")
        fq = next((v for k, v in rows.items() if k[:4] == (shape, gamma, cache, "on_demand_frequency")), None)
        freq_cell = (f"{fq['tpot_us'] / 1e3:.1f} ({fq['prefetch_hit_rate']:.2f}) | " if fq else "— | ") if has_freq else ""
        print(f"| {shape} | {gamma} | {cache}% | {od['tpot_us'] / 1e3:.1f} | {freq_cell}{la['tpot_us'] / 1e3:.1f} ({la['prefetch_hit_rate']:.2f}) | {cells} "
              f"| {od['tpot_us'] / best:.2f} | {la['tpot_us'] / best:.2f} |")


def cutoff_tables(benchmarks):
    sweeps = {}
    for b in benchmarks:
        if not b["name"].startswith("offload_cutoff"):
            continue
        parts = args_of(b["name"])
        sweeps.setdefault((shape_of(parts), int(parts["gamma"]), int(parts["cache_pct"])), []).append(b)
    for (shape, gamma, cache), runs in sorted(sweeps.items()):
        runs.sort(key=lambda b: int(b["cutoff"]))
        best = min(runs, key=lambda b: b["tpot_us"])
        choice = int(runs[0]["model_cutoff"])
        at_choice = next((b for b in runs if int(b["cutoff"]) == choice), None)
        verdict = (f"measured there {at_choice['tpot_us'] / best['tpot_us']:.3f}x the best" if at_choice
                   else "not among the swept cutoffs")
        print(f"\nCutoff sweep on the GPU, {shape}, cache {cache}%, γ {gamma}, agreement 0.8: best measured cutoff "
              f"{int(best['cutoff'])} ({best['tpot_us'] / 1e3:.1f} ms), the model's choice {choice} ({verdict}).\n")
        print("| cutoff | " + " | ".join(str(int(b["cutoff"])) for b in runs) + " |")
        print("|---|" + "---|" * len(runs))
        print("| measured TPOT (ms) | " + " | ".join(f"{b['tpot_us'] / 1e3:.1f}" for b in runs) + " |")
        print("| model TPOT (ms) | " + " | ".join(f"{b['model_tpot_us'] / 1e3:.1f}" for b in runs) + " |")
        print("| prefetch hit | " + " | ".join(f"{b['prefetch_hit_rate']:.2f}" for b in runs) + " |")


def main():
    d = json.load(open(os.path.join(sys.argv[1], "offload.json")))
    step_table(d["benchmarks"])
    cutoff_tables(d["benchmarks"])


if __name__ == "__main__":
    main()
