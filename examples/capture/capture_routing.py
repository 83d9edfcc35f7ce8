#!/usr/bin/env python3
"""capture_routing.py: record a transformers MoE model's routing as a specmoe trace (../shared/TRACES.md).

Forward hooks on every MoE block's router record, per layer and token, the top-k experts and their
combine weights; the input token ids come along (the token-affinity table needs them). With a draft
model (SP-MoE), the draft's layer-l attention output is fed through the *target's* layer-l router
and the result is written as draft_topk_ids.npy: the prediction SP-MoE's prefetcher would make.

  capture_routing.py --model PATH --out DIR [--prompts FILE] [--max-tokens N] [--draft PATH] [--device cpu|cuda]
  capture_routing.py --random mixtral|qwen3_moe --layers L --out DIR [--random-draft] [--tokens N] [--seed S]
  capture_routing.py --writer-selftest DIR      (writes a small hand-made trace without torch)

--model takes any local checkpoint directory (no download). --random builds a small randomly
initialised model from the named config family, for tests. Prompts: one per line; without --prompts,
random token ids (--tokens per request, 4 requests). Each prompt is one request (a `sequences` entry).

Routers are found by module: a block with a `gate` child (Mixtral's block_sparse_moe, Qwen-MoE's mlp).
The gate's output may be logits [tokens, experts] (top-k recomputed with the config's recipe: softmax,
top-k, renormalised when norm_topk_prob / Mixtral) or a tuple holding indices [tokens, k] (taken as is).
"""
import argparse
import array
import json
import os
import random
import struct
import sys


# ---------------------------------------------------------------------------------------------- .npy
def write_npy(path, values, dtype, shape):
    """NumPy format 1.0, little-endian, C order, from a flat Python sequence (no numpy needed)."""
    code, descr = {"int32": ("i", "<i4"), "float32": ("f", "<f4")}[dtype]
    data = array.array(code, values)
    if sys.byteorder != "little":
        data.byteswap()
    count = 1
    for s in shape:
        count *= s
    if len(data) != count:
        raise ValueError(f"{path}: {len(data)} values for shape {shape}")
    dims = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, dims)
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(data.tobytes())


def write_trace(out, model, source, topk_ids, topk_weights, token_ids, sequences, experts, top_k, draft=None):
    """topk_ids / topk_weights: [layers][tokens][top_k] nested lists; draft: (model, experts, top_k, ids[layers][tokens][k])."""
    os.makedirs(out, exist_ok=True)
    layers, tokens = len(topk_ids), len(token_ids)
    flat = [e for layer in topk_ids for tok in layer for e in tok]
    write_npy(os.path.join(out, "topk_ids.npy"), flat, "int32", (layers, tokens, top_k))
    write_npy(os.path.join(out, "topk_weights.npy"), [w for layer in topk_weights for tok in layer for w in tok], "float32",
              (layers, tokens, top_k))
    write_npy(os.path.join(out, "token_ids.npy"), token_ids, "int32", (tokens,))
    meta = {"format": "specmoe-trace/1", "model": model, "layers": layers, "experts": experts, "top_k": top_k,
            "tokens": tokens, "sequences": sequences, "source": source}
    if draft is not None:
        dmodel, dexperts, dk, dids = draft
        write_npy(os.path.join(out, "draft_topk_ids.npy"), [e for layer in dids for tok in layer for e in tok], "int32",
                  (len(dids), tokens, dk))
        meta["draft"] = {"model": dmodel, "layers": len(dids), "experts": dexperts, "top_k": dk}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def writer_selftest(out):
    rng = random.Random(7)
    layers, tokens, experts, k = 3, 40, 8, 2
    ids, ws = [], []
    for _ in range(layers):
        ids.append([rng.sample(range(experts), k) for _ in range(tokens)])
        ws.append([[0.5, 0.5] for _ in range(tokens)])
    draft = ("selftest-draft", experts, k, [[rng.sample(range(experts), k) for _ in range(tokens)] for _ in range(layers)])
    write_trace(out, "selftest", "capture_routing.py --writer-selftest", ids, ws, [rng.randrange(100) for _ in range(tokens)],
                [[0, 25], [25, 40]], experts, k, draft)
    print(json.dumps({"trace": out, "layers": layers, "tokens": tokens}))


# ---------------------------------------------------------------------------------------------- capture
def decoder_layers(model):
    """The model's list of decoder layers (model.layers in every transformers decoder family)."""
    for name in ("model.layers", "layers", "transformer.h"):
        obj = model
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise SystemExit("capture_routing: cannot find the decoder layers (model.layers)")


def moe_blocks(model):
    """[(layer index, block)] for every decoder layer whose MoE block has a router `gate`."""
    import torch

    layers = decoder_layers(model)
    found = []
    for i, layer in enumerate(layers):
        for attr in ("block_sparse_moe", "mlp", "moe", "feed_forward"):
            block = getattr(layer, attr, None)
            if block is not None and isinstance(getattr(block, "gate", None), torch.nn.Module) and hasattr(block, "experts"):
                found.append((i, block))
                break
    return found


def routing_from_gate_output(out, top_k, renormalize):
    """(ids [n, k], weights [n, k]) from a router's output: logits, or a tuple carrying indices."""
    import torch

    tensors = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
    idx = [t for t in tensors if not t.is_floating_point() and t.dim() >= 2]
    floats = [t for t in tensors if t.is_floating_point()]
    if idx:
        ids = idx[0].reshape(-1, idx[0].shape[-1])
        w = [t for t in floats if t.shape[-1] == ids.shape[-1]]
        weights = w[0].reshape(-1, ids.shape[-1]).float() if w else torch.full(ids.shape, 1.0 / ids.shape[-1])
        return ids, weights
    logits = floats[0].reshape(-1, floats[0].shape[-1]).float()
    probs = torch.softmax(logits, dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def config_top_k(cfg):
    for name in ("num_experts_per_tok", "moe_top_k", "top_k"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise SystemExit("capture_routing: the config names no top-k (num_experts_per_tok)")


def config_experts(cfg):
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise SystemExit("capture_routing: the config names no expert count (num_local_experts / num_experts)")


def random_models(family, layers, seed, with_draft):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = tf.MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                               max_position_embeddings=1024)
        model = tf.MixtralForCausalLM(cfg)
        dcfg = tf.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        draft = tf.MistralForCausalLM(dcfg) if with_draft else None
    else:
        cfg = tf.Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, num_experts=16,
                                num_experts_per_tok=4, decoder_sparse_step=1, norm_topk_prob=True, head_dim=16,
                                max_position_embeddings=1024)
        model = tf.Qwen3MoeForCausalLM(cfg)
        dcfg = tf.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
        draft = tf.Qwen3ForCausalLM(dcfg) if with_draft else None
    return model.eval(), (draft.eval() if draft is not None else None)


def capture(model, draft, requests, device):
    """Runs each request through the model (and the draft), returns the trace's arrays."""
    import torch

    cfg = model.config
    k, experts = config_top_k(cfg), config_experts(cfg)
    renorm = bool(getattr(cfg, "norm_topk_prob", cfg.model_type == "mixtral"))
    blocks = moe_blocks(model)
    if not blocks:
        raise SystemExit("capture_routing: no MoE block with a `gate` router found in the model")
    layer_ids = [i for i, _ in blocks]
    per_layer = {i: ([], []) for i in layer_ids}
    hooks = []
    in_draft = [False]  # the draft's states go through the target's gates too: not the target's routing
    for i, block in blocks:
        def record(_mod, _inp, out, i=i):
            if in_draft[0]:
                return
            ids, w = routing_from_gate_output(out, k, renorm)
            per_layer[i][0].append(ids.cpu())
            per_layer[i][1].append(w.cpu())
        hooks.append(block.gate.register_forward_hook(record))

    draft_ids = {i: [] for i in layer_ids}
    if draft is not None:
        dlayers = decoder_layers(draft)
        if len(dlayers) < max(layer_ids) + 1:
            raise SystemExit(f"capture_routing: the draft has {len(dlayers)} layers, the target's MoE layers reach {max(layer_ids) + 1}")
        gates = dict(blocks)
        for i in layer_ids:
            def through_target_gate(_mod, _inp, out, i=i):
                a = out[0] if isinstance(out, (tuple, list)) else out
                in_draft[0] = True
                try:
                    with torch.no_grad():
                        g = gates[i].gate(a.reshape(-1, a.shape[-1]).to(next(gates[i].gate.parameters()).dtype))
                finally:
                    in_draft[0] = False
                ids, _ = routing_from_gate_output(g, k, renorm)
                draft_ids[i].append(ids.cpu())
            hooks.append(dlayers[i].self_attn.register_forward_hook(through_target_gate))

    token_ids, sequences = [], []
    with torch.no_grad():
        for req in requests:
            x = torch.tensor([req], device=device)
            model(input_ids=x)
            if draft is not None:
                draft(input_ids=x)
            sequences.append([len(token_ids), len(token_ids) + len(req)])
            token_ids.extend(req)
    for h in hooks:
        h.remove()
    topk_ids, topk_w, dids = [], [], []
    for i in layer_ids:
        ids = torch.cat(per_layer[i][0]).tolist()
        w = torch.cat(per_layer[i][1]).tolist()
        if len(ids) != len(token_ids):
            raise SystemExit(f"capture_routing: layer {i} routed {len(ids)} tokens, expected {len(token_ids)}")
        topk_ids.append(ids)
        topk_w.append(w)
        if draft is not None:
            dids.append(torch.cat(draft_ids[i]).tolist())
    return topk_ids, topk_w, token_ids, sequences, experts, k, dids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--random", choices=["mixtral", "qwen3_moe"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--draft")
    ap.add_argument("--random-draft", action="store_true")
    ap.add_argument("--prompts")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--writer-selftest")
    a = ap.parse_args()
    if a.writer_selftest:
        writer_selftest(a.writer_selftest)
        return
    if not a.out or not (a.model or a.random):
        ap.error("give --out and one of --model PATH / --random FAMILY (or --writer-selftest DIR)")
    import torch

    rng = random.Random(a.seed)
    if a.random:
        model, draft = random_models(a.random, a.layers, a.seed, a.random_draft)
        name, tok = f"random:{a.random}", None
    else:
        import transformers as tf

        if not os.path.isdir(a.model):
            ap.error(f"--model {a.model}: not a local directory (no downloads)")
        model = tf.AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16, local_files_only=True).eval()
        draft = tf.AutoModelForCausalLM.from_pretrained(a.draft, torch_dtype=torch.bfloat16, local_files_only=True).eval() if a.draft else None
        tok = tf.AutoTokenizer.from_pretrained(a.model, local_files_only=True)
        name = os.path.basename(os.path.normpath(a.model))
    model.to(a.device)
    if draft is not None:
        draft.to(a.device)
    vocab = model.config.vocab_size
    if a.prompts:
        if tok is None:
            ap.error("--prompts needs a real --model (its tokenizer)")
        requests = [tok(line.rstrip("\n"))["input_ids"][: a.max_tokens] for line in open(a.prompts) if line.strip()]
    else:
        requests = [[rng.randrange(vocab) for _ in range(a.tokens)] for _ in range(4)]
    ids, w, token_ids, sequences, experts, k, dids = capture(model, draft, requests, a.device)
    src = "capture_routing.py " + " ".join(sys.argv[1:])
    dinfo = (f"{name}-draft", experts, k, dids) if draft is not None else None
    write_trace(a.out, name, src, ids, w, token_ids, sequences, experts, k, dinfo)
    print(json.dumps({"trace": a.out, "model": name, "layers": len(ids), "experts": experts, "top_k": k, "tokens": len(token_ids),
                      "draft": draft is not None}))


if __name__ == "__main__":
    main()
