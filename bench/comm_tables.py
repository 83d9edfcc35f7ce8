#!/usr/bin/env python3
"""comm_tables.py TORCH.json PEER.json [OURS.json ...]: markdown tables of EP dispatch/combine against its peers.

  TORCH.json  bench/comm/torch_alltoall_peer.py output (rows of tokens_per_rank x direction)
  PEER.json   specmoe_comm_peer_copy_bench --benchmark_out=PEER.json (Google Benchmark JSON); '-' for none
  OURS.json   optional Google Benchmark JSON of specmoe's own dispatch/combine benchmarks. Names are read
              tolerantly: the direction is whichever of 'dispatch'/'combine' the name holds (both: round
              trip), tokens from 'tokens:<n>' (or the first bare number), the backend from the remaining
              path parts. Time is the 'time_us' counter, else real_time in its time_unit; bytes are the
              'bytes_crossing' counter, else torch's for the same tokens and direction (marked *).

One table per direction; per tokens/rank: torch latency and algbw, the peer-copy bandwidth at that size, and
for each of our backends its latency, algbw, speedup over torch (torch time / ours) and share of the NVLink
limit (the all-peers 256 MiB peer copy, per GPU outbound).
"""
import json
import re
import sys

TO_US = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
# name parts that describe how Google Benchmark ran, not what was run
RUN_KEYS = {"tokens", "iterations", "repeats", "threads", "min_time", "min_warmup_time", "process_time",
            "real_time", "manual_time"}


def load(path):
    with open(path) as f:
        return json.load(f)


def gb_runs(doc):
    """{name: benchmark entry}: the median aggregate where repetitions ran, else the first plain run."""
    best = {}
    for b in doc.get("benchmarks", []):
        if b.get("error_occurred") or b.get("skipped"):
            continue
        name = b.get("run_name") or b["name"]
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") != "median":
                continue
            rank = 0
        else:
            rank = 1
        if name not in best or rank < best[name][0]:
            best[name] = (rank, b)
    return {n: b for n, (_, b) in best.items()}


def time_us(b):
    if "time_us" in b:
        return float(b["time_us"])
    return float(b["real_time"]) * TO_US[b.get("time_unit", "ns")]


def tokens_of(name):
    m = re.search(r"tokens?[:=_]?(\d+)", name)
    if m:
        return int(m.group(1))
    m = re.search(r"(?:^|/)(\d+)(?:/|$)", name)
    return int(m.group(1)) if m else None


def ours_rows(path, ranks):
    """[(backend, direction, tokens, us, bytes or None)] from one Google Benchmark JSON."""
    out = []
    for name, b in gb_runs(load(path)).items():
        low = name.lower()
        has_d, has_c = "dispatch" in low, "combine" in low
        if not (has_d or has_c):
            continue
        direction = "round_trip" if has_d and has_c else ("dispatch" if has_d else "combine")
        tokens = tokens_of(low)
        if tokens is None:
            continue
        parts = name.split("/")
        label = []
        # the first part's words other than ep/dispatch/combine (e.g. 'fp8') name a variant
        extra = [w for w in re.split(r"[_\-]", parts[0]) if w.lower() not in ("ep", "dispatch", "combine", "")]
        rank_arg = None
        for p in parts[1:]:
            key = p.split(":", 1)[0].lower()
            if key in ("ranks", "gpus", "ep") and ":" in p:
                rank_arg = int(p.split(":", 1)[1])
            elif p.isdigit() or key in RUN_KEYS:
                continue
            else:
                label.append(p)
        rank_arg = rank_arg or (int(b["ranks"]) if "ranks" in b else None)
        if rank_arg is not None and ranks is not None and rank_arg != ranks:
            continue  # measured on another number of GPUs than the torch peer
        backend = " ".join(["/".join(label) or parts[0]] + extra)
        nbytes = float(b["bytes_crossing"]) if "bytes_crossing" in b else None
        out.append((backend, direction, tokens, time_us(b), nbytes))
    return out


def fmt(v, spec=".1f"):
    return "—" if v is None else format(v, spec)


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    torch_doc = load(argv[1])
    ranks = torch_doc.get("ranks")
    torch = {(r["tokens_per_rank"], r["direction"]): r for r in torch_doc["rows"]}
    for t in sorted({t for t, _ in torch}):  # round trip = dispatch then combine
        d, c = torch.get((t, "dispatch")), torch.get((t, "combine"))
        if d and c:
            us = d["time_us"] + c["time_us"]
            by = d["bytes_crossing"] + c["bytes_crossing"]
            torch[(t, "round_trip")] = {"time_us": us, "single_us": d.get("single_us", 0) + c.get("single_us", 0),
                                        "bytes_crossing": by, "algbw_GBps": by / (us * 1e3) if us else 0.0}

    link = one_link = None
    peer_at = {}
    peer_gpus = None
    if argv[2] != "-":
        peer_doc = load(argv[2])
        peer_gpus = peer_doc.get("context", {}).get("gpus")
        largest = -1
        for name, b in gb_runs(peer_doc).items():
            gbps = b.get("outbound_GBps")
            if gbps is None:
                continue
            m = re.search(r"bytes:(\d+)", name)
            if "all_peers" in name and m and int(m.group(1)) > largest:
                largest, link = int(m.group(1)), gbps
            elif "one_peer" in name:
                one_link = gbps
            elif "all_peers" in name and tokens_of(name) is not None:
                peer_at[tokens_of(name)] = gbps

    ours = []
    for p in argv[3:]:
        ours += ours_rows(p, ranks)

    print(f"torch all_to_all_single: {torch_doc.get('device')} x {ranks}, {torch_doc.get('date')}, "
          f"torch {torch_doc.get('torch')}, NCCL {torch_doc.get('nccl')}, "
          f"{'de-duplicated rows' if torch_doc.get('dedup', True) else 'one row per (token, expert)'}")
    if link is not None:
        print(f"NVLink peer-copy limit: {link:.1f} GB/s outbound per GPU (every GPU to every peer at once, "
              f"{peer_gpus} GPUs); one link, one direction: {fmt(one_link)} GB/s")
        if peer_gpus is not None and ranks is not None and int(peer_gpus) != int(ranks):
            print(f"WARNING: peer copy ran on {peer_gpus} GPUs, torch on {ranks} ranks")
    print()
    directions = ["dispatch", "combine"] + (["round_trip"] if any(o[1] == "round_trip" for o in ours) else [])
    for direction in directions:
        backends = sorted({o[0] for o in ours if o[1] == direction})
        head = ["tokens/rank", "MB crossing (max rank)", "torch (µs)", "torch single call (µs)", "torch GB/s",
                "torch % link", "peer copy, tokens·8/D rows per peer (GB/s)"]
        for be in backends:
            head += [f"{be} (µs)", f"{be} GB/s", f"{be} × torch", f"{be} % link"]
        print(f"### {direction.replace('_', ' ')}\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for t in sorted({t for t, d in torch if d == direction}):
            r = torch[(t, direction)]
            tor_bw = r["algbw_GBps"]
            cells = [str(t), f"{r['bytes_crossing'] / 1e6:.2f}", f"{r['time_us']:.1f}", fmt(r.get("single_us")),
                     f"{tor_bw:.1f}", fmt(100 * tor_bw / link if link else None, ".0f"), fmt(peer_at.get(t))]
            for be in backends:
                hit = [o for o in ours if o[0] == be and o[1] == direction and o[2] == t]
                if not hit:
                    cells += ["—"] * 4
                    continue
                _, _, _, us, nbytes = hit[0]
                mark = "" if nbytes is not None else "*"
                nbytes = nbytes if nbytes is not None else r["bytes_crossing"]
                bw = nbytes / (us * 1e3) if us > 0 else 0.0
                cells += [f"{us:.1f}", f"{bw:.1f}{mark}", f"{r['time_us'] / us:.2f}" if us > 0 else "—",
                          fmt(100 * bw / link if link else None, ".0f")]
            print("| " + " | ".join(cells) + " |")
        print()
    if any(o[4] is None for o in ours):
        print("\\* no bytes_crossing counter: torch's bytes for the same rows\n")


if __name__ == "__main__":
    main(sys.argv)
