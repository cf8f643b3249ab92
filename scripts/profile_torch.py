#!/usr/bin/env python3
"""Measure per-operator times of Llama-family layers on a CUDA GPU with PyTorch, and write them
as profiles the Vajra simulator reads.

Output (under OUT_DIR/<device>/<model>/):
  mlp.csv        Vidur's schema: per-layer times (ms) of emb, input_layernorm, attn_pre_proj,
                 attn_rope, attn_post_proj, post_attention_layernorm, mlp_up_proj, mlp_act,
                 mlp_down_proj, add; time_stats.<op>.{min,max,mean,median,std}; one row per
                 (num_tokens, num_tensor_parallel_workers). TP shards are measured on one GPU
                 with the sharded shapes, as Vidur's profiler does.
  attention.csv  Vidur's schema: attn_prefill rows (batch 1, prefill_chunk_size, kv_cache_size)
                 and attn_decode rows (batch_size, kv_cache_size), plus attn_kv_cache_save.
                 Attention is torch SDPA (flash backend where it applies) over contiguous K/V,
                 causal mask aligned bottom-right for chunks; not paged.
  provenance.json GPU, driver, torch version, date, command, and the method above.
and OUT_DIR/<device>/device.json with a bf16 GEMM rate and device-to-device copy bandwidth.

Usage: python3 scripts/profile_torch.py OUT_DIR [--quick]
"""
import csv, datetime, json, math, os, subprocess, sys, time

import torch
import torch.nn.functional as F

MODELS = {
    # name: (hidden, heads, kv_heads, ffn, vocab, head_dim)
    "meta-llama/Llama-2-7b-hf": (4096, 32, 32, 11008, 32000, 128),
    "meta-llama/Meta-Llama-3-8B": (4096, 32, 8, 14336, 128256, 128),
}
MLP_OPS = ["emb", "input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj",
           "post_attention_layernorm", "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]
DT = torch.bfloat16
DEV = "cuda"


def timeit(fn, reps=10, warmup=3):
    """Times fn with CUDA events; returns ms samples."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return out


def stats(prefix, xs):
    xs = sorted(xs)
    n = len(xs)
    mean = sum(xs) / n
    med = xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
    return {f"time_stats.{prefix}.min": xs[0], f"time_stats.{prefix}.max": xs[-1],
            f"time_stats.{prefix}.mean": mean, f"time_stats.{prefix}.median": med,
            f"time_stats.{prefix}.std": std}


def rms_norm(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, 1e-5)


def rope(q, k, cos, sin):
    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def profile_mlp(shape, tp, tokens_grid):
    h, nh, nkv, ffn, vocab, hd = shape
    q_out, kv_out = nh * hd // tp, max(1, nkv // tp) * hd
    ffn_tp = ffn // tp
    emb = torch.randn(vocab // tp, h, device=DEV, dtype=DT)
    w_qkv = torch.randn(h, q_out + 2 * kv_out, device=DEV, dtype=DT) * 0.02
    w_o = torch.randn(q_out, h, device=DEV, dtype=DT) * 0.02
    w_up = torch.randn(h, 2 * ffn_tp, device=DEV, dtype=DT) * 0.02
    w_down = torch.randn(ffn_tp, h, device=DEV, dtype=DT) * 0.02
    norm_w = torch.ones(h, device=DEV, dtype=DT)
    rows = []
    for n in tokens_grid:
        ids = torch.randint(0, vocab // tp, (n,), device=DEV)
        x = torch.randn(n, h, device=DEV, dtype=DT)
        attn_out = torch.randn(n, q_out, device=DEV, dtype=DT)
        up = torch.randn(n, 2 * ffn_tp, device=DEV, dtype=DT)
        act = torch.randn(n, ffn_tp, device=DEV, dtype=DT)
        q = torch.randn(n, nh // tp, hd, device=DEV, dtype=DT)
        k = torch.randn(n, max(1, nkv // tp), hd, device=DEV, dtype=DT)
        cos = torch.randn(n, 1, hd, device=DEV, dtype=DT)
        sin = torch.randn(n, 1, hd, device=DEV, dtype=DT)
        ops = {
            "emb": lambda: F.embedding(ids, emb),
            "input_layernorm": lambda: rms_norm(x, norm_w),
            "attn_pre_proj": lambda: x @ w_qkv,
            "attn_rope": lambda: rope(q, k, cos, sin),
            "attn_post_proj": lambda: attn_out @ w_o,
            "post_attention_layernorm": lambda: rms_norm(x, norm_w),
            "mlp_up_proj": lambda: x @ w_up,
            "mlp_act": lambda: F.silu(up[:, :ffn_tp]) * up[:, ffn_tp:],
            "mlp_down_proj": lambda: act @ w_down,
            "add": lambda: x + x,
        }
        row = {"n_head": nh, "n_kv_head": nkv, "n_embd": h, "n_expanded_embd": ffn,
               "vocab_size": vocab, "use_gated_mlp": True, "num_tokens": n,
               "num_tensor_parallel_workers": tp}
        for op in MLP_OPS:
            row.update(stats(op, timeit(ops[op])))
        rows.append(row)
    return rows


def profile_attention(shape, tp, prefill_grid, decode_grid, block_size=16):
    from torch.nn.attention.bias import causal_lower_right
    h, nh, nkv, ffn, vocab, hd = shape
    qh, kvh = nh // tp, max(1, nkv // tp)
    base = {"n_embd": h, "n_q_head": nh, "n_kv_head": nkv, "block_size": block_size,
            "num_tensor_parallel_workers": tp, "max_model_len": 8192,
            "attention_backend": "torch_sdpa"}
    rows = []
    cache = torch.zeros(300_000, kvh, hd, device=DEV, dtype=DT)
    for chunk, kv in prefill_grid:
        q = torch.randn(1, qh, chunk, hd, device=DEV, dtype=DT)
        kk = torch.randn(1, kvh, kv + chunk, hd, device=DEV, dtype=DT)
        vv = torch.randn(1, kvh, kv + chunk, hd, device=DEV, dtype=DT)
        mask = causal_lower_right(chunk, kv + chunk)
        f = lambda: F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, enable_gqa=qh != kvh)
        src = torch.randn(chunk, kvh, hd, device=DEV, dtype=DT)
        slots = torch.randperm(cache.shape[0], device=DEV)[:chunk]
        save = lambda: cache.index_copy_(0, slots, src)
        row = dict(base, batch_size=1, prefill_chunk_size=chunk, kv_cache_size=kv, is_prefill=True)
        row.update(stats("attn_prefill", timeit(f)))
        row.update(stats("attn_kv_cache_save", timeit(save)))
        rows.append(row)
    for b, kv in decode_grid:
        q = torch.randn(b, qh, 1, hd, device=DEV, dtype=DT)
        kk = torch.randn(b, kvh, kv, hd, device=DEV, dtype=DT)
        vv = torch.randn(b, kvh, kv, hd, device=DEV, dtype=DT)
        f = lambda: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=qh != kvh)
        src = torch.randn(b, kvh, hd, device=DEV, dtype=DT)
        slots = torch.randperm(cache.shape[0], device=DEV)[:b]
        save = lambda: cache.index_copy_(0, slots, src)
        row = dict(base, batch_size=b, prefill_chunk_size=0, kv_cache_size=kv, is_prefill=False)
        row.update(stats("attn_decode", timeit(f)))
        row.update(stats("attn_kv_cache_save", timeit(save)))
        rows.append(row)
        del kk, vv
    return rows


def write_csv(path, rows):
    cols = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        w.writerows(rows)


def device_facts():
    props = torch.cuda.get_device_properties(0)
    a = torch.randn(8192, 8192, device=DEV, dtype=DT)
    b = torch.randn(8192, 8192, device=DEV, dtype=DT)
    ms = sorted(timeit(lambda: a @ b, reps=10))[5]
    tflops = 2 * 8192 ** 3 / (ms * 1e-3) / 1e12
    src = torch.empty(2 * 1024 ** 3, device=DEV, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms_copy = sorted(timeit(lambda: dst.copy_(src), reps=10))[5]
    bw = 2 * src.numel() / (ms_copy * 1e-3) / 1e9  # read + write
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        driver = "unknown"
    return {"gpu": props.name, "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory, "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "bf16_gemm_8192_tflops": round(tflops, 1),
            "d2d_copy_gb_per_s_read_plus_write": round(bw, 1)}


def main():
    out = sys.argv[1]
    quick = "--quick" in sys.argv
    t0 = time.time()
    facts = device_facts()
    dev_name = "h100" if "H100" in facts["gpu"] else facts["gpu"].lower().replace(" ", "_")
    os.makedirs(os.path.join(out, dev_name), exist_ok=True)
    with open(os.path.join(out, dev_name, "device.json"), "w") as f:
        json.dump(facts, f, indent=2)
    print(json.dumps(facts), flush=True)
    tokens = [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
    tps = [1, 2, 4, 8]
    chunks = [16, 64, 128, 256, 512, 1024, 2048, 4096]
    kvs = [0, 256, 1024, 2048, 4096]
    prefill = [(c, k) for c in chunks for k in kvs if c + k <= 8192]
    decode = [(b, k) for b in [1, 2, 4, 8, 16, 32, 64, 128, 256] for k in [64, 256, 512, 1024, 2048, 4096]]
    if quick:
        tokens, tps, prefill, decode = tokens[::4], [1], prefill[::6], decode[::8]
    for model, shape in MODELS.items():
        d = os.path.join(out, dev_name, model.split("/")[1])
        os.makedirs(d, exist_ok=True)
        mlp, attn = [], []
        for tp in tps:
            mlp += profile_mlp(shape, tp, tokens)
            attn += profile_attention(shape, tp, prefill, decode)
            torch.cuda.empty_cache()
            print(f"{model} tp{tp}: {len(mlp)} mlp rows, {len(attn)} attention rows, {time.time()-t0:.0f}s", flush=True)
        write_csv(os.path.join(d, "mlp.csv"), mlp)
        write_csv(os.path.join(d, "attention.csv"), attn)
        prov = {"kind": "measured", "model": model, "device": facts,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "command": "python3 scripts/profile_torch.py $OUT",
                "method": __doc__.strip().splitlines()[0],
                "attention_method": "torch SDPA over contiguous K/V (not paged), bottom-right causal mask",
                "timing": "CUDA events, 3 warm-up + 10 timed runs per point, times in ms per layer"}
        with open(os.path.join(d, "provenance.json"), "w") as f:
            json.dump(prov, f, indent=2)
    print(f"done in {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
