"""Where the q8_0 KV cache loses quality: an independent numpy forward with the attention swapped.

    python bench/kv8_quality.py --model qwen2.5-coder-0.5b-instruct --windows 0,1,2,3

The forward is tests/model/reference.py's (weights dequantized by the `gguf` package), run in
float32. Each window is tokenized and cut as `tinyserve perplexity` does (ctx tokens, the second
half scored). Per variant the whole window runs with that variant's attention in every layer,
which gives its perplexity. Variants (K/V after RoPE, Q the query after RoPE):
  f32        exact attention in float32 (no cache rounding)
  f16        K, V rounded to float16 (the f16 cache)
  gguf       K, V quantized and dequantized by gguf's Q8_0; Q by gguf's Q8_0 too (fp16 scale per
             32, as llama.cpp quantizes Q for its vec_dot); softmax and the V sum in float32
  gguf_qf32  as gguf, with Q's scale kept as a float32 (what tinyserve's query record holds)
  gguf_q     as gguf, Q left in float32 (only K and V quantized)
  gguf_k     only K quantized (Q8_0), Q and V in float32
  gguf_v     only V quantized (Q8_0), Q and K in float32
  gguf_pos0  as gguf, with position 0's K and V kept in float32 (the first token: an attention sink)
  gguf_k16   as gguf, K with one fp16 scale per 16 elements instead of 32 (a finer K scale)
  gguf_rot   as gguf, with Q, K and V first rotated by the orthonormal 64 x 64 Walsh-Hadamard matrix
             per 64 elements of a head (and the output rotated back), as llama.cpp does before a
             quantized cache (llama-kv-cache.cpp: attn_rot_k / attn_rot_v)
  gguf_rot_k16  gguf_rot with K's scale per 16 elements (V and Q stay per 32): both of the above
  engine     tinyserve's own kernels on the same data (kv8_store, kv8_quantize_query,
             attn_scores_q8, softmax, attn_accum_q8 of the active ISA, through _core.kernels)
When f16 is among the variants, each other variant also gets its mean KL divergence from the f16
logits over the scored tokens (as llama-perplexity --kl-divergence reports; less noisy than a
window's perplexity). With --layer-errors, the f16 pass also reports per layer the relative error of every variant's
attention output against f32 on the same inputs (so the variants see identical Q, K, V).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "model"))

from reference import ReferenceModel  # noqa: E402

QT = gguf.GGMLQuantizationType
VARIANTS = (
    "f32",
    "f16",
    "gguf",
    "gguf_qf32",
    "gguf_q",
    "gguf_k",
    "gguf_v",
    "gguf_pos0",
    "gguf_k16",
    "gguf_rot",
    "gguf_rot_k16",
    "engine",
)


def q8_gguf(x: np.ndarray) -> np.ndarray:
    """gguf's Q8_0 round trip of the last axis (a multiple of 32): fp16(d) * round(x / d)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    return gguf.quants.dequantize(gguf.quants.quantize(flat, QT.Q8_0), QT.Q8_0).reshape(x.shape)


def q8_gguf16(x: np.ndarray) -> np.ndarray:
    """Q8_0's rounding with one fp16 scale per 16 elements (gguf's Q8_0 on zero-padded halves)."""
    h = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 16)
    padded = np.concatenate([h, np.zeros_like(h)], axis=1)
    return q8_gguf(padded)[:, :16].reshape(x.shape)


def hadamard(n: int) -> np.ndarray:
    """The orthonormal n x n Walsh-Hadamard matrix (symmetric: H @ H = I)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


def rotate(x: np.ndarray) -> np.ndarray:
    """x @ H per 64 elements of the last axis (a multiple of 64)."""
    H = hadamard(64)
    return (x.reshape(*x.shape[:-1], -1, 64) @ H).reshape(x.shape).astype(np.float32)


def q8_f32_scale(x: np.ndarray) -> np.ndarray:
    """Q8_0's rounding per 32 with the scale kept as float32: d * roundf(x * (1 / d))."""
    b = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = (np.abs(b).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d)).astype(np.float32)
    y = b * inv
    q = np.sign(y) * np.floor(np.abs(y) + np.float32(0.5))  # roundf: half away from zero
    return (q * d).astype(np.float32).reshape(x.shape)


def attention_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int, scale: float) -> np.ndarray:
    """Causal softmax(q k^T * scale) v in float32; q [T, H, hd], k/v [T, KVH, hd]."""
    T, H, hd = q.shape
    mask = np.triu(np.full((T, T), -np.inf, np.float32), k=1)
    out = np.empty((T, H, hd), np.float32)
    for h in range(H):
        s = (q[:, h, :] @ k[:, h // group, :].T) * np.float32(scale) + mask
        s = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h, :] = (s / s.sum(axis=1, keepdims=True)) @ v[:, h // group, :]
    return out


def attention_engine(q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int, scale: float) -> np.ndarray:
    """The engine's q8_0 attention kernels on one sequence: every position in one run of T slots
    (scores and sums do not depend on how positions are split into blocks: tests/kernels)."""
    from tinyserve import _core

    K = _core.kernels
    isa = _core.isa()
    T, H, hd = q.shape
    KVH = k.shape[1]
    out = np.zeros((T, H, hd), np.float32)
    for kvh in range(KVH):
        krun = K.kv8_run(0, np.ascontiguousarray(k[:, kvh, :], np.float32), T)
        vrun = K.kv8_run(1, np.ascontiguousarray(v[:, kvh, :], np.float32), T)
        heads = slice(kvh * group, (kvh + 1) * group)
        for t in range(T):
            qrec = K.kv8_query(np.ascontiguousarray(q[t, heads, :], np.float32).reshape(-1), hd)
            n = t + 1
            sc = K.ops("attn_scores_q8", isa, hd, T, group, qrec, krun, 0, n, scale, n).reshape(group, n)
            p = np.concatenate([K.ops("softmax", isa, sc[h]) for h in range(group)])
            o = K.ops("attn_accum_q8", isa, hd, T, group, p, n, vrun, 0, n, np.zeros(group * hd, np.float32))
            out[t, heads, :] = o.reshape(group, hd)
    return out


def variant_attention(name: str, q, k, v, group: int, scale: float) -> np.ndarray:
    if name == "f32":
        return attention_np(q, k, v, group, scale)
    if name == "f16":
        return attention_np(
            q, k.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32), group, scale
        )
    if name == "engine":
        return attention_engine(q, k, v, group, scale)
    if name == "gguf_rot":
        return rotate(attention_np(q8_gguf(rotate(q)), q8_gguf(rotate(k)), q8_gguf(rotate(v)), group, scale))
    if name == "gguf_rot_k16":
        return rotate(attention_np(q8_gguf(rotate(q)), q8_gguf16(rotate(k)), q8_gguf(rotate(v)), group, scale))
    qq = {"gguf_qf32": q8_f32_scale, "gguf_q": None, "gguf_k": None, "gguf_v": None}.get(name, q8_gguf)
    qq = q if qq is None else qq(q)
    kq = k if name == "gguf_v" else (q8_gguf16(k) if name == "gguf_k16" else q8_gguf(k))
    vq = v if name == "gguf_k" else q8_gguf(v)
    if name == "gguf_pos0":
        kq[0], vq[0] = k[0], v[0]
    return attention_np(qq, kq, vq, group, scale)


class Forward:
    """reference.py's model in float32 with a pluggable attention."""

    def __init__(self, m: ReferenceModel):
        self.m = m
        self.w32 = {n: np.ascontiguousarray(w, np.float32) for n, w in m.w.items()}

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w32[name + ".weight"].T
        b = self.w32.get(name + ".bias")
        return y if b is None else y + b

    def run(self, tok: np.ndarray, attn, scored: np.ndarray):
        m = self.m
        T, H, KVH, hd = len(tok), m.n_heads, m.n_kv_heads, m.head_dim
        pos = np.arange(T)
        x = self.w32["token_embd.weight"][tok].copy()
        for layer in range(m.n_layers):
            p = f"blk.{layer}."
            h = m.rmsnorm(x, self.w32[p + "attn_norm.weight"]).astype(np.float32)
            q = m.rope(self.linear(h, p + "attn_q").reshape(T, H, hd), pos).astype(np.float32)
            k = m.rope(self.linear(h, p + "attn_k").reshape(T, KVH, hd), pos).astype(np.float32)
            v = self.linear(h, p + "attn_v").reshape(T, KVH, hd).astype(np.float32)
            att = attn(layer, q, k, v)
            x = x + self.linear(att.reshape(T, H * hd), p + "attn_output")
            h = m.rmsnorm(x, self.w32[p + "ffn_norm.weight"]).astype(np.float32)
            gate, up = self.linear(h, p + "ffn_gate"), self.linear(h, p + "ffn_up")
            x = x + self.linear(gate / (1.0 + np.exp(-gate)) * up, p + "ffn_down")
        x = m.rmsnorm(x[scored], self.w32["output_norm.weight"]).astype(np.float32)
        return self.linear(x, "token_embd" if m.tied else "output").astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="catalog name or .gguf path")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", default="0,1,2,3", help="window numbers (comma-separated), or all")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--layer-errors", action="store_true", help="per-layer attention error on the f16 pass")
    a = ap.parse_args()
    from tinyserve.models.catalog import resolve_model
    from tinyserve.models.loader import load_model

    path = str(resolve_model(a.model)[1])
    tok = load_model(path).tokenizer
    ids = tok.encode(Path(a.text).read_text(encoding="utf-8"), add_bos=tok.add_bos)
    t0 = time.perf_counter()
    m = ReferenceModel(path)
    fw = Forward(m)
    group, scale = m.n_heads // m.n_kv_heads, 1.0 / math.sqrt(m.head_dim)
    variants = a.variants.split(",")
    first = a.ctx // 2
    scored = np.arange(first, a.ctx - 1)
    res: dict = {"model": str(path), "ctx": a.ctx, "windows": [], "nll": {v: [] for v in variants}, "kl": {}}
    layer_err: dict[str, list[list[float]]] = {v: [] for v in VARIANTS if v not in ("f32", "f16")}
    n_windows = len(ids) // a.ctx
    windows = range(n_windows) if a.windows == "all" else [int(s) for s in a.windows.split(",")]
    for w in windows:
        win = np.asarray(ids[w * a.ctx : (w + 1) * a.ctx], dtype=np.int64)
        if tok.add_bos:
            win[0] = tok.bos_id
        res["windows"].append(w)
        targets = win[scored + 1]
        base = None  # the f16 pass's log-probabilities, for the KL divergence of the others
        for name in sorted(variants, key=lambda v: v != "f16"):

            def attn(layer, q, k, v, name=name):
                out = variant_attention(name, q, k, v, group, scale)
                if a.layer_errors and name == "f16":
                    ref = variant_attention("f32", q, k, v, group, scale)
                    for other in layer_err:
                        o = variant_attention(other, q, k, v, group, scale)
                        if layer == 0:
                            layer_err[other].append([])
                        layer_err[other][-1].append(float(np.linalg.norm(o - ref) / np.linalg.norm(ref)))
                return out

            x = fw.run(win, attn, scored)
            mx = x.max(axis=1, keepdims=True)
            lse = mx[:, 0] + np.log(np.exp(x - mx).sum(axis=1))
            logp = x - lse[:, None]
            nll = float(-logp[np.arange(len(scored)), targets].sum())
            res["nll"][name].append(nll)
            kl = ""
            if name == "f16":
                base = logp
            elif base is not None:  # KL(f16 || variant) summed over the scored positions
                res["kl"].setdefault(name, []).append(float((np.exp(base) * (base - logp)).sum()))
                kl = f", mean KL vs f16 {res['kl'][name][-1] / len(scored):.5f}"
            print(
                f"window {w} {name}: ppl {math.exp(nll / len(scored)):.4f}{kl} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
    n = len(scored) * len(res["windows"])
    res["ppl"] = {v: math.exp(sum(res["nll"][v]) / n) for v in variants}
    if "f16" in variants:
        res["vs_f16_percent"] = {v: 100 * (res["ppl"][v] / res["ppl"]["f16"] - 1) for v in variants}
        res["mean_kl_vs_f16"] = {v: sum(e) / n for v, e in res["kl"].items()}
    if a.layer_errors:
        res["attn_rel_error_vs_f32"] = {
            v: {"mean_over_layers": float(np.mean(e)), "per_layer_window0": [round(x, 6) for x in e[0]]}
            for v, e in layer_err.items()
            if e
        }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
