#!/usr/bin/env python3
"""torch_peers.py OUT.json: the peers of the cuda_space layer benchmark, timed in the same run.

- torch_grouped_mm: router, top-k, stable sort by expert, two torch._grouped_mm GEMMs (gate/up
  fused, then down), SwiGLU, weighted index_add back to token order; no host synchronisation.
  Timed eager and replayed from a CUDA graph (torch_grouped_mm_graph).
Every timed run starts with a cold L2 (a 256 MiB overwrite before it, not timed), as in the C++ bench.
- transformers: the library's own sparse MoE block for the model, where it imports and fits.

Shapes and token counts match bench/layer/cuda_moe_layer_bench.cu. Weights are random bf16.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

MODELS = {
    "mixtral": dict(hidden=4096, ffn=14336, experts=8, top_k=2, grouped=False, renorm=True, shared=0),
    "qwen3_30b_a3b": dict(hidden=2048, ffn=768, experts=128, top_k=8, grouped=False, renorm=True, shared=0),
    "deepseek_v3": dict(hidden=7168, ffn=2048, experts=256, top_k=8, grouped=True, renorm=True, shared=1,
                        groups=8, topk_groups=4, scale=2.5),
}
TOKENS = [1, 16, 128, 1024, 8192]


def route(x, wr, bias, m):
    logits = (x @ wr.t()).float()
    k = m["top_k"]
    if not m["grouped"]:
        p = logits.softmax(dim=-1)
        w, ids = p.topk(k, dim=-1)
        if m["renorm"]:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids, w
    s = logits.sigmoid()
    choice = s + bias
    n, e = choice.shape
    g = m["groups"]
    gs = choice.view(n, g, e // g).topk(2, dim=-1).values.sum(-1)
    keep = gs.topk(m["topk_groups"], dim=-1).indices
    mask = torch.zeros(n, g, device=x.device, dtype=torch.bool).scatter_(1, keep, True)
    choice = choice.masked_fill(~mask.repeat_interleave(e // g, dim=1), float("-inf"))
    ids = choice.topk(k, dim=-1).indices
    w = s.gather(1, ids)
    if m["renorm"]:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * m["scale"]


def grouped_layer(x, p, m):
    n, h = x.shape
    k, e = m["top_k"], m["experts"]
    ids, w = route(x, p["wr"], p["bias"], m)
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    tokens = order // k
    counts = torch.zeros(e, device=x.device, dtype=torch.int32).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    xs = x[tokens]
    gu = torch._grouped_mm(xs, p["w13"].transpose(1, 2), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    a = F.silu(gate) * up
    y = torch._grouped_mm(a, p["w2"].transpose(1, 2), offs=offs)
    y = (y.float() * w.reshape(-1)[order].unsqueeze(1)).to(x.dtype)
    out = torch.zeros_like(x).index_add_(0, tokens, y)
    if m["shared"]:
        out = out + F.linear(F.silu(F.linear(x, p["sg"])) * F.linear(x, p["su"]), p["sd"])
    return out


def params(m, dev):
    h, f, e = m["hidden"], m["ffn"], m["experts"]
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale):
        return ((torch.rand(*shape, device=dev, generator=g) * 2 - 1) * scale).to(torch.bfloat16)

    p = {"wr": rnd(e, h, scale=4 / h ** 0.5), "w13": rnd(e, 2 * f, h, scale=2 / h ** 0.5),
         "w2": rnd(e, h, f, scale=2 / f ** 0.5), "bias": torch.zeros(e, device=dev)}
    if m["shared"]:
        p.update(sg=rnd(f, h, scale=2 / h ** 0.5), su=rnd(f, h, scale=2 / h ** 0.5), sd=rnd(h, f, scale=2 / f ** 0.5))
    return p


_FLUSH = None


def _flush_l2():
    """Overwrites 256 MiB so the next launch starts with a cold L2, as the C++ layer bench does."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    _FLUSH.fill_(1)


def time_us(fn, iters=20):
    """Mean microseconds of fn() over iters runs, each after an L2 flush (not timed)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(iters):
        _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end)
    return total * 1000 / iters


def graphed(fn):
    """fn captured in a CUDA graph (replay callable), or None where it cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception as e:  # noqa: BLE001 - report and fall back to eager
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def _randomize(block, m):
    """Random weights for every matrix of a block built straight from its config.

    Such a block skips the library's weight initialisation: some of its parameters come from
    torch.empty (DeepSeek-V3's router weight, the fused expert tensors of recent versions), so
    they may be all zeros, and a router of zeros ties every expert and sends every token to the
    same k experts, which measures a different (much smaller) computation. Same scales as params():
    the router's rows 4/sqrt(hidden), the experts' 2/sqrt(fan-in); vectors (biases) left as built.
    """
    g = torch.Generator(device=next(block.parameters()).device).manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() < 2:
                continue
            fan_in = p.shape[-1]
            is_router = p.dim() == 2 and p.shape[0] == m["experts"] and fan_in == m["hidden"]
            scale = (4 if is_router else 2) / fan_in ** 0.5
            for row in p.view(-1, *p.shape[-2:]):  # one matrix at a time: no fp32 copy of all experts at once
                row.copy_(((torch.rand(row.shape, generator=g, device=p.device) * 2 - 1) * scale).to(p.dtype))


def experts_touched(block, x, m):
    """Distinct experts the block's own router picks for x (hooks on the block's gate module)."""
    seen = []
    gate = getattr(block, "gate", None) or getattr(block, "router", None)
    if gate is None:
        return None
    h = gate.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        with torch.no_grad():
            block(x)
    finally:
        h.remove()
    if not seen:
        return None
    out = seen[0]
    logits = out[0] if isinstance(out, tuple) else out
    if not torch.is_floating_point(logits) or logits.shape[-1] != m["experts"]:  # the gate returned ids: use them
        ids = logits
    else:
        ids = logits.float().view(-1, m["experts"]).topk(m["top_k"], dim=-1).indices
    return int(torch.unique(ids).numel())


def transformers_block(name, m, dev):
    """The transformers library's MoE block for `name`, or a reason it is unavailable."""
    try:
        if name == "mixtral":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
            cfg = MixtralConfig(hidden_size=m["hidden"], intermediate_size=m["ffn"], num_local_experts=m["experts"],
                                num_experts_per_tok=m["top_k"])
        elif name == "qwen3_30b_a3b":
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
            cfg = Qwen3MoeConfig(hidden_size=m["hidden"], moe_intermediate_size=m["ffn"], num_experts=m["experts"],
                                 num_experts_per_tok=m["top_k"], norm_topk_prob=True)
        else:
            from transformers import DeepseekV3Config
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Block
            cfg = DeepseekV3Config(hidden_size=m["hidden"], moe_intermediate_size=m["ffn"], n_routed_experts=m["experts"],
                                   num_experts_per_tok=m["top_k"], n_group=m["groups"], topk_group=m["topk_groups"],
                                   n_shared_experts=m["shared"], routed_scaling_factor=m["scale"])
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built on the GPU in bf16: no host copy of every expert
        try:
            with torch.device(dev):
                block = Block(cfg).eval()
        finally:
            torch.set_default_dtype(prev)
        _randomize(block, m)
        return block, None
    except Exception as e:  # noqa: BLE001 - record why, keep going
        return None, f"{type(e).__name__}: {e}"[:200]


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "torch_peers.json"
    dev = torch.device("cuda")
    rows = []
    for name, m in MODELS.items():
        p = params(m, dev)
        for n in TOKENS:
            x = ((torch.rand(n, m["hidden"], device=dev) * 2 - 1)).to(torch.bfloat16)
            with torch.no_grad():
                us = time_us(lambda: grouped_layer(x, p, m))
                replay = graphed(lambda: grouped_layer(x, p, m))
                us_graph = time_us(replay) if replay else None
            rows.append(dict(model=name, tokens=n, impl="torch_grouped_mm", us=us))
            rows.append(dict(model=name, tokens=n, impl="torch_grouped_mm_graph", us=us_graph))
            print(f"{name:14s} {n:5d} torch_grouped_mm {us:10.1f} us   graph {us_graph or float('nan'):10.1f} us", flush=True)
            del replay
            torch.cuda.empty_cache()
        del p
        torch.cuda.empty_cache()
        save(out_path, rows)
        if os.environ.get("SPECMOE_PEERS_SKIP_TRANSFORMERS"):
            continue
        block, why = transformers_block(name, m, dev)
        for n in TOKENS:
            if block is None:
                rows.append(dict(model=name, tokens=n, impl="transformers", us=None, note=why))
                continue
            x = ((torch.rand(1, n, m["hidden"], device=dev) * 2 - 1)).to(torch.bfloat16)
            try:
                with torch.no_grad():
                    us = time_us(lambda: block(x), iters=5)
                touched = experts_touched(block, x, m)
                rows.append(dict(model=name, tokens=n, impl="transformers", us=us, experts_touched=touched))
                print(f"{name:14s} {n:5d} transformers     {us:10.1f} us   experts touched {touched}", flush=True)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(model=name, tokens=n, impl="transformers", us=None, note=f"{type(e).__name__}: {e}"[:200]))
        del block
        torch.cuda.empty_cache()
        save(out_path, rows)  # after each model: a run cut short keeps what it measured
    save(out_path, rows)


def save(out_path, rows):
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
