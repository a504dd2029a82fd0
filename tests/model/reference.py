"""An independent numpy forward for llama-architecture GGUF models (the truth for tests/model).

Written from the math, not from csrc/: the file is read with `gguf.GGUFReader`, every weight is
dequantized with `gguf.quants.dequantize`, and the forward runs in float64 over one sequence with
no KV cache (full causal attention over all positions each call).

    logits = reference_logits(path, token_ids)          # [T, n_vocab] float64

Per layer (pre-norm transformer):
    h = RMSNorm(x) * attn_norm
    q, k, v = h Wq (+bq), h Wk (+bk), h Wv (+bv)
    q, k = RoPE(q, pos), RoPE(k, pos)
    a = softmax(q k^T / sqrt(head_dim) + causal mask) v      (query head h uses kv head h // group)
    x = x + a Wo
    h = RMSNorm(x) * ffn_norm
    x = x + (silu(h Wgate) * (h Wup)) Wdown
logits = (RMSNorm(x) * output_norm) Wout   (Wout = token_embd when the file has no output.weight)
"""
from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np

QT = gguf.GGMLQuantizationType


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class ReferenceModel:
    """Dequantized weights (float32, shape (out, in)) plus the config read from the metadata."""

    def __init__(self, path: str | Path):
        r = gguf.GGUFReader(str(path))
        arch = _field(r, "general.architecture")
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"reference supports llama/qwen2, not {arch!r}")
        self.arch = arch

        def kv(name, default=None):
            return _field(r, f"{arch}.{name}", default)

        self.dim = int(kv("embedding_length"))
        self.hidden_dim = int(kv("feed_forward_length"))
        self.n_layers = int(kv("block_count"))
        self.n_heads = int(kv("attention.head_count"))
        self.n_kv_heads = int(kv("attention.head_count_kv", self.n_heads))
        self.head_dim = self.dim // self.n_heads
        self.rope_dim = int(kv("rope.dimension_count", self.head_dim))
        self.rope_base = float(kv("rope.freq_base", 10000.0))
        self.context_length = int(kv("context_length"))
        self.norm_eps = float(kv("attention.layer_norm_rms_epsilon", 1e-5))
        self.rope_scale = 1.0
        if kv("rope.scaling.type") == "linear":
            self.rope_scale = float(kv("rope.scaling.factor", 1.0))
        # llama.cpp: llama rotates adjacent pairs ("norm"); qwen2 rotates halves ("neox")
        self.rope_neox = arch == "qwen2"

        self.w: dict[str, np.ndarray] = {}
        for t in r.tensors:
            ne = [int(n) for n in t.shape]  # ggml order: ne[0] = row length
            arr = gguf.quants.dequantize(np.asarray(t.data), QT(t.tensor_type))
            shape = tuple(reversed(ne)) if len(ne) > 1 else (ne[0],)
            self.w[t.name] = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
        self.n_vocab = self.w["token_embd.weight"].shape[0]
        self.tied = "output.weight" not in self.w
        self.has_bias = "blk.0.attn_q.bias" in self.w

    # --- building blocks -------------------------------------------------------------------
    def rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.norm_eps) * weight

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[name + ".weight"].astype(np.float64).T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x: [T, heads, head_dim]; rotates the first rope_dim dims of every head."""
        d = self.rope_dim
        i = np.arange(d // 2, dtype=np.float64)
        theta = (pos[:, None].astype(np.float64) / self.rope_scale) * self.rope_base ** (-2.0 * i / d)  # [T, d/2]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        if self.rope_neox:
            a, b = x[..., : d // 2], x[..., d // 2 : d]
            out[..., : d // 2] = a * cos - b * sin
            out[..., d // 2 : d] = a * sin + b * cos
        else:
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = a * cos - b * sin
            out[..., 1:d:2] = a * sin + b * cos
        return out

    # --- the forward -------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """Full causal forward over one sequence starting at position 0: [T, n_vocab] float64."""
        tok = np.asarray(token_ids, dtype=np.int64)
        if tok.ndim != 1 or tok.size == 0 or tok.min() < 0 or tok.max() >= self.n_vocab:
            raise ValueError("token ids must be a non-empty 1-D list within the vocabulary")
        T, H, KVH, hd = tok.size, self.n_heads, self.n_kv_heads, self.head_dim
        pos = np.arange(T)
        group = H // KVH
        mask = np.triu(np.full((T, T), -np.inf), k=1)  # causal: query t sees keys 0..t
        x = self.w["token_embd.weight"][tok].astype(np.float64)  # embedding lookup
        for layer in range(self.n_layers):
            p = f"blk.{layer}."
            h = self.rmsnorm(x, self.w[p + "attn_norm.weight"])
            q = self.rope(self.linear(h, p + "attn_q").reshape(T, H, hd), pos)
            k = self.rope(self.linear(h, p + "attn_k").reshape(T, KVH, hd), pos)
            v = self.linear(h, p + "attn_v").reshape(T, KVH, hd)
            att = np.empty((T, H, hd))
            for head in range(H):
                kvh = head // group  # GQA: consecutive query heads share one kv head
                s = q[:, head, :] @ k[:, kvh, :].T / np.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                att[:, head, :] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kvh, :]
            x = x + self.linear(att.reshape(T, H * hd), p + "attn_output")  # residual
            h = self.rmsnorm(x, self.w[p + "ffn_norm.weight"])
            gate = self.linear(h, p + "ffn_gate")
            up = self.linear(h, p + "ffn_up")
            silu = gate / (1.0 + np.exp(-gate))
            x = x + self.linear(silu * up, p + "ffn_down")  # SwiGLU, residual
        x = self.rmsnorm(x, self.w["output_norm.weight"])
        head = self.w["token_embd.weight" if self.tied else "output.weight"]
        return x @ head.astype(np.float64).T


@functools.lru_cache(maxsize=4)
def load_reference(path: str) -> ReferenceModel:
    """Cached ReferenceModel (dequantizing the default model takes a few seconds)."""
    return ReferenceModel(path)


def reference_logits(path: str | Path, token_ids) -> np.ndarray:
    """Logits [T, n_vocab] (float64) of a full causal forward over `token_ids` from position 0."""
    return load_reference(str(path)).logits(token_ids)
