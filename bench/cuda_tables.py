#!/usr/bin/env python3
"""cuda_tables.py DIR: markdown tables for docs/benchmarks.md from one bench/run_cuda.sh output folder.

Reads DIR/layer.json (specmoe_layer_cuda_moe_layer_bench), DIR/torch_peers.json (torch_peers.py) and
DIR/routing.json (specmoe_kernels_routing_kernels_bench); an optional second folder supplies the
transformers rows when the first run skipped them (SPECMOE_PEERS_SKIP_TRANSFORMERS).
"""
import json
import os
import sys

MODEL_OF = {"mixtral": "mixtral", "qwen3_30b_a3b": "qwen3_30b_a3b", "deepseek_v3": "deepseek_v3",
            "deepseek_v3_slice32": "deepseek_v3_slice32"}


def load(path):
    with open(path) as f:
        return json.load(f)


def layer_table(d, extra):
    layer = load(os.path.join(d, "layer.json"))
    peers = {}
    for src in [d] + extra:
        p = os.path.join(src, "torch_peers.json")
        if os.path.exists(p):
            for r in load(p)["rows"]:
                if r.get("us") is not None:
                    peers.setdefault((r["model"], r["tokens"], r["impl"]), r)
    print("| model | tokens | rows | ours (µs) | stddev | floor (µs) | × floor | torch grouped_mm, graph (µs) | torch / ours | "
          "torch grouped_mm, eager (µs) | transformers block, eager (µs) | experts its router touched |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = layer["benchmarks"]
    stddev = {}
    if any(b.get("run_type") == "aggregate" for b in rows):  # --benchmark_repetitions: the medians
        stddev = {b["run_name"]: b["real_time"] for b in rows if b.get("aggregate_name") == "stddev"}
        rows = [b for b in rows if b.get("aggregate_name") == "median"]
    for b in rows:
        name, tokens = b["name"].split("/")[:2]
        tokens = int(tokens)
        us = b["real_time"]
        g = peers.get((name, tokens, "torch_grouped_mm_graph"), {}).get("us")
        e = peers.get((name, tokens, "torch_grouped_mm"), {}).get("us")
        t = peers.get((name, tokens, "transformers"), {})
        fmt = lambda v: f"{v:.1f}" if v is not None else "—"
        sd = stddev.get(b.get("run_name"))
        print(f"| {name} | {tokens} | {int(b['rows'])} | {us:.1f} | {fmt(sd)} | {b['floor_us']:.1f} | {us / b['floor_us']:.2f} | "
              f"{fmt(g)} | {(g / us if g else float('nan')):.2f} | {fmt(e)} | {fmt(t.get('us'))} | {t.get('experts_touched', '—')} |")


def routing_table(d):
    r = load(os.path.join(d, "routing.json"))
    rows = {}
    for b in r["benchmarks"]:
        if b.get("error_occurred"):
            continue
        kernel, shape, tokens = b["name"].split("/")[:3]
        if not tokens.isdigit():  # launch_cost/<node> rows
            continue
        rows.setdefault((shape, int(tokens)), {})[kernel] = b["real_time"]
    kernels = ["gate", "layout_single_block", "layout_device_sort", "gather", "combine"]
    print("| shape | tokens | " + " | ".join(k + " (µs)" for k in kernels) + " | gate+layout+gather+combine (µs) |")
    print("|---|---|" + "---|" * (len(kernels) + 1))
    for (shape, tokens), v in rows.items():
        layouts = [x for x in (v.get("layout_single_block"), v.get("layout_device_sort")) if x is not None]
        parts = [v.get("gate"), min(layouts) if layouts else None, v.get("gather"), v.get("combine")]
        total = f"{sum(parts):.1f}" if None not in parts else "—"  # (a filtered run lacks some)
        cells = " | ".join(f"{v[k]:.1f}" if k in v else "—" for k in kernels)
        print(f"| {shape} | {tokens} | {cells} | {total} |")


if __name__ == "__main__":
    d = sys.argv[1]
    extra = sys.argv[2:]
    layer_table(d, extra)
    print()
    routing_table(d)
