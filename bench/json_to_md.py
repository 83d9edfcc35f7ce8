#!/usr/bin/env python3
"""json_to_md.py FILE.json...: Google Benchmark JSON files to one markdown table per file."""
import json
import sys

SKIP = {"name", "run_name", "run_type", "repetitions", "repetition_index", "threads", "iterations",
        "real_time", "cpu_time", "time_unit", "family_index", "per_family_instance_index", "aggregate_name"}


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


for path in sys.argv[1:]:
    with open(path) as f:
        data = json.load(f)
    rows = [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    if not rows:
        continue
    counters = sorted({k for b in rows for k in b if k not in SKIP})
    print(f"\n`{data['context']['executable'].split('/')[-1]}` ({data['context']['date']})\n")
    print("| benchmark | time | " + " | ".join(counters) + " |")
    print("|---" * (len(counters) + 2) + "|")
    for b in rows:
        t = f"{b['real_time']:.4g} {b['time_unit']}"
        print(f"| {b['name']} | {t} | " + " | ".join(fmt(b.get(c, "")) for c in counters) + " |")
