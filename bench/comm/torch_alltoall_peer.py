#!/usr/bin/env python3
"""torch_alltoall_peer.py OUT.json [--no-dedup]: the torch.distributed peer of the EP dispatch/combine benchmarks.

    torchrun --standalone --nproc-per-node D bench/comm/torch_alltoall_peer.py OUT.json   (D divides 256; D=1 works)

Shape of issue 5: hidden 7168, bf16, top-8 of 256 experts in contiguous blocks (expert e on rank e // (256/D)),
random routing (8 distinct experts per token, fixed seed per rank and token count). De-duplicated: a token
goes to each distinct destination rank once, as specmoe's layer sends it. --no-dedup sends one row per
(token, expert) pair instead: that is how issue 5's reference figures (97/685/2244 us) count rows.

Per tokens-per-rank and direction, `dist.all_to_all_single` (NCCL) is timed with CUDA events:
- time_us:   a loop of ITERS back-to-back calls divided by ITERS (median of 3 loops); no barrier or sync
             between calls, since a barrier per call adds its own latency to every sample;
- single_us: median of ITERS single calls, each between its own events and followed by an event sync.
Both are the max over ranks (the collective is done when the slowest rank is). Split sizes are exchanged
once beforehand, outside timing. combine sends the dispatch's received rows back (the reverse split).

bytes_crossing counts only rows to OTHER ranks (self rows are in the split but stay on the GPU), max over
ranks; algbw_GBps = bytes_crossing / time_us. Rank 0 writes the JSON.
"""
import datetime
import json
import os
import statistics
import sys

os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink SHARP multicast stays off on the lent machines (before NCCL init)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

HIDDEN, TOP_K, EXPERTS = 7168, 8, 256
TOKENS = [1, 16, 128, 512, 2048, 8192]
WARMUP, ITERS, LOOPS = 5, 50, 3
DEV = "cuda"  # a CPU dry run of the logic (gloo, fake events) swaps this for "cpu"


def routing(tokens, rank, seed_base=1234):
    """[tokens, TOP_K] distinct expert ids per token (a random permutation's first TOP_K), fixed per rank."""
    g = torch.Generator(device=DEV).manual_seed(seed_base + 7919 * rank + tokens)
    return torch.rand(tokens, EXPERTS, device=DEV, generator=g).argsort(dim=1)[:, :TOP_K]


def send_rows(topk_idx, ranks, dedup):
    """Token index of every row to send, grouped by destination rank, and the per-rank counts."""
    dest = topk_idx // (EXPERTS // ranks)  # [tokens, TOP_K] destination rank of each choice
    if dedup:
        # NOTES: a token bound for several experts on one rank is sent to that rank once.
        is_token_in_rank = torch.zeros(dest.shape[0], ranks, dtype=torch.bool, device=DEV)
        is_token_in_rank.scatter_(1, dest, True)
        rank_of_row, token_of_row = is_token_in_rank.t().contiguous().nonzero(as_tuple=True)  # row-major: grouped by rank
    else:
        flat = dest.reshape(-1)
        order = flat.argsort(stable=True)
        rank_of_row, token_of_row = flat[order], order // TOP_K
    num_tokens_per_rank = torch.bincount(rank_of_row, minlength=ranks)
    return token_of_row, num_tokens_per_rank


def time_collective(out, inp, out_splits, in_splits):
    """(loop-averaged us, median single-call us) of all_to_all_single on this rank."""
    call = lambda: dist.all_to_all_single(out, inp, out_splits, in_splits)  # noqa: E731
    for _ in range(WARMUP):
        call()
    torch.cuda.synchronize()
    loops = []
    for _ in range(LOOPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(ITERS):
            call()
        end.record()
        end.synchronize()
        loops.append(start.elapsed_time(end) * 1e3 / ITERS)
    singles = []
    for _ in range(ITERS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        singles.append(start.elapsed_time(end) * 1e3)
    return statistics.median(loops), statistics.median(singles)


def nccl_version():
    v = torch.cuda.nccl.version()  # a tuple in recent torch, an int (e.g. 22805) in older ones
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def max_over_ranks(*values):
    t = torch.tensor(values, dtype=torch.float64, device=DEV)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out_path, dedup = sys.argv[1], "--no-dedup" not in sys.argv[2:]
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, ranks = dist.get_rank(), dist.get_world_size()
    if EXPERTS % ranks:
        sys.exit(f"{ranks} ranks do not divide {EXPERTS} experts")
    row_bytes = HIDDEN * 2  # bf16
    rows = []
    for tokens in TOKENS:
        topk_idx = routing(tokens, rank)
        token_of_row, send_counts = send_rows(topk_idx, ranks, dedup)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)  # the split-size exchange, once, untimed
        in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
        g = torch.Generator(device=DEV).manual_seed(rank)
        x = torch.randn(tokens, HIDDEN, device=DEV, generator=g).to(torch.bfloat16)
        send = x[token_of_row]  # [rows_sent, HIDDEN] grouped by destination rank
        recv = torch.empty(sum(out_splits), HIDDEN, dtype=torch.bfloat16, device=DEV)
        back = torch.empty_like(send)
        for direction, out, inp, o_splits, i_splits in (
            ("dispatch", recv, send, out_splits, in_splits),
            ("combine", back, recv, in_splits, out_splits),  # the reverse split
        ):
            loop_us, single_us = time_collective(out, inp, o_splits, i_splits)
            crossing = (sum(i_splits) - i_splits[rank]) * row_bytes
            loop_us, single_us, crossing, rows_sent = max_over_ranks(loop_us, single_us, crossing, sum(i_splits))
            rows.append({"tokens_per_rank": tokens, "direction": direction, "rows_sent": int(rows_sent),
                         "bytes_crossing": int(crossing), "time_us": round(loop_us, 2),
                         "single_us": round(single_us, 2),
                         "algbw_GBps": round(crossing / (loop_us * 1e3), 2) if loop_us > 0 else 0.0})
            if rank == 0:
                print(f"{direction:8s} tokens/rank {tokens:5d}: {loop_us:9.1f} us (single {single_us:9.1f}), "
                      f"{crossing / 1e6:8.2f} MB crossing, {rows[-1]['algbw_GBps']:7.1f} GB/s", flush=True)
        del send, recv, back, x
    if rank == 0:
        result = {"device": torch.cuda.get_device_name(), "ranks": ranks,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv), "torch": torch.__version__,
                  "nccl": nccl_version(), "hidden": HIDDEN, "top_k": TOP_K,
                  "experts": EXPERTS, "dedup": dedup, "iters": ITERS,
                  "notes": "rows_sent: rows in the all_to_all input incl. self, max over ranks; bytes_crossing: "
                           "bytes to other ranks, max over ranks; time_us: back-to-back loop / iters; "
                           "single_us: median single call; times are max over ranks",
                  "rows": rows}
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out_path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
