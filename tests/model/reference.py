"""An independent numpy forward for llama-architecture GGUF models (the truth for tests/model).

Written from the math, not from csrc/: the file is read with `gguf.GGUFReader`, every weight is
dequantized with `gguf.quants.dequantize`, and the forward runs in float64 over one sequence with
no KV cache (full causal attention over all positions each call).

Two optional emulations of the engine's deliberate precision choices (ARCHITECTURE.md, "Engine")
let tests use tight tolerances without depending on how csrc/ is written:
  act_quant=True  -- before a matmul with a block-quantized weight, round the activations to int8
                     per block of 32 (scale = fp16(max|x| / 127)), as Q8_0/Q8_1 activations are.
  kv_f16=True     -- round K (after RoPE) and V to float16, as an f16 KV cache stores them.
  kv_q8=True      -- round K (after RoPE) and V to int8 per group of 32 elements of a head (the last
                     group may be shorter) with the scale stored as float16, as a q8_0 KV cache
                     stores them, and the query to int8 per group of 32 with a float scale, as the
                     q8_0 attention quantizes it before its integer dot products. When head_dim is
                     a multiple of 64, q, k and v are first rotated by the orthonormal Walsh-Hadamard
                     matrix per 64 elements, and the attention output rotated back, as the cache
                     stores H k and H v (the rotation leaves q.k and the output unchanged in exact
                     arithmetic; only the rounding sees it).

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


QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # block-32 weight types whose matmuls take int8 activations
# Weight types with a per-block offset m (w = d * q + m). Their activations are Q8_1 blocks, which
# carry s = fp16(d * sum(q)) next to the scale, and the dot product's offset term is m * s.
OFFSET_TYPES = {"Q4_1": 20}  # type -> bytes per block: fp16 d, fp16 m, 16 bytes of nibbles


def _int8_blocks(x: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x cut into blocks of `block` and rounded to int8: (q [N, nb, block], d [N, nb]) with
    q = round(x / d) (half away from zero), d = max|x| / 127 (float64, before any fp16 rounding)."""
    xb = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1] // block, block)
    d = np.abs(xb).max(axis=-1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.clip(np.sign(xb) * np.floor(np.abs(xb * inv[..., None]) + 0.5), -127, 127)
    return q, d


def _f16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float16).astype(np.float64)


def quantize_activations(x: np.ndarray, block: int = 32) -> np.ndarray:
    """Round rows of x to int8 per block of `block` values with the scale stored as float16 (the
    Q8_0/Q8_1 activation formats); returns the dequantized values fp16(d) * q, shape of x."""
    q, d = _int8_blocks(x, block)
    return (_f16(d)[..., None] * q).reshape(x.shape)


def quantize_heads(x: np.ndarray, f16_scale: bool, group: int = 32) -> np.ndarray:
    """The q8_0 KV cache's rounding of head vectors (the last axis), per group of `group` elements
    (the last group takes what is left): q = round(x / d) with d = max|x| / 127, stored as fp16(d)
    (K and V) or as a float (the query); returns the dequantized values, shape of x."""
    out = np.empty_like(np.asarray(x, dtype=np.float64))
    for i0 in range(0, x.shape[-1], group):
        part = np.ascontiguousarray(x[..., i0 : i0 + group])
        q, d = _int8_blocks(part.reshape(-1, part.shape[-1]), part.shape[-1])
        d = _f16(d) if f16_scale else d.astype(np.float32).astype(np.float64)
        out[..., i0 : i0 + group] = (d[..., None] * q).reshape(part.shape)
    return out


def hadamard(n: int) -> np.ndarray:
    """The orthonormal n x n Walsh-Hadamard matrix (Sylvester's construction; H = H^T, H H = I)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotate_heads(x: np.ndarray) -> np.ndarray:
    """x @ H per 64 elements of the last axis (a multiple of 64)."""
    return (x.reshape(*x.shape[:-1], -1, 64) @ hadamard(64)).reshape(x.shape)


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
        self.wtype: dict[str, str] = {}  # tensor name -> GGML type name
        self.wmin: dict[str, np.ndarray] = {}  # offsets m of OFFSET_TYPES weights
        for t in r.tensors:
            ne = [int(n) for n in t.shape]  # ggml order: ne[0] = row length
            arr = gguf.quants.dequantize(np.asarray(t.data), QT(t.tensor_type))
            shape = tuple(reversed(ne)) if len(ne) > 1 else (ne[0],)
            self.w[t.name] = np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
            self.wtype[t.name] = QT(t.tensor_type).name
            if self.wtype[t.name] in OFFSET_TYPES:  # keep the per-block offsets m [rows, blocks]
                raw = np.asarray(t.data, dtype=np.uint8).reshape(shape[0], -1, OFFSET_TYPES[self.wtype[t.name]])
                self.wmin[t.name] = raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        self.n_vocab = self.w["token_embd.weight"].shape[0]
        self.tied = "output.weight" not in self.w
        self.has_bias = "blk.0.attn_q.bias" in self.w

    # --- building blocks -------------------------------------------------------------------
    def rmsnorm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.norm_eps) * weight

    def linear(self, x: np.ndarray, name: str, act_quant: bool = False) -> np.ndarray:
        wname = name + ".weight"
        correction = 0.0
        if act_quant and self.wtype[wname] in QUANTIZED_TYPES:
            q, d = _int8_blocks(x)
            if wname in self.wmin:
                # x_hat . (d_w q_w + m) = x_hat . (d_w q_w) + m * sum(x_hat); the engine's Q8_1
                # block supplies fp16(d * sum(q)) in place of sum(x_hat) = fp16(d) * sum(q)
                qsum = q.sum(axis=-1)
                correction = (_f16(d * qsum) - _f16(d) * qsum) @ self.wmin[wname].T
            x = (_f16(d)[..., None] * q).reshape(x.shape)
        y = x @ self.w[wname].astype(np.float64).T + correction
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
    def logits(self, token_ids, act_quant: bool = False, kv_f16: bool = False, kv_q8: bool = False) -> np.ndarray:
        """Full causal forward over one sequence starting at position 0: [T, n_vocab] float64.
        act_quant / kv_f16 / kv_q8: the emulations described in the module docstring."""
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
            q = self.rope(self.linear(h, p + "attn_q", act_quant).reshape(T, H, hd), pos)
            k = self.rope(self.linear(h, p + "attn_k", act_quant).reshape(T, KVH, hd), pos)
            v = self.linear(h, p + "attn_v", act_quant).reshape(T, KVH, hd)
            if kv_f16:
                k, v = k.astype(np.float16).astype(np.float64), v.astype(np.float16).astype(np.float64)
            rotated = kv_q8 and hd % 64 == 0
            if rotated:
                q, k, v = rotate_heads(q), rotate_heads(k), rotate_heads(v)
            if kv_q8:
                k, v, q = quantize_heads(k, True), quantize_heads(v, True), quantize_heads(q, False)
            att = np.empty((T, H, hd))
            for head in range(H):
                kvh = head // group  # GQA: consecutive query heads share one kv head
                s = q[:, head, :] @ k[:, kvh, :].T / np.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=-1, keepdims=True))
                att[:, head, :] = (s / s.sum(axis=-1, keepdims=True)) @ v[:, kvh, :]
            if rotated:
                att = rotate_heads(att)
            x = x + self.linear(att.reshape(T, H * hd), p + "attn_output", act_quant)  # residual
            h = self.rmsnorm(x, self.w[p + "ffn_norm.weight"])
            gate = self.linear(h, p + "ffn_gate", act_quant)
            up = self.linear(h, p + "ffn_up", act_quant)
            silu = gate / (1.0 + np.exp(-gate))
            x = x + self.linear(silu * up, p + "ffn_down", act_quant)  # SwiGLU, residual
        x = self.rmsnorm(x, self.w["output_norm.weight"])
        return self.linear(x, "token_embd" if self.tied else "output", act_quant)


@functools.lru_cache(maxsize=4)
def load_reference(path: str) -> ReferenceModel:
    """Cached ReferenceModel (dequantizing the default model takes a few seconds)."""
    return ReferenceModel(path)


def reference_logits(
    path: str | Path, token_ids, act_quant: bool = False, kv_f16: bool = False, kv_q8: bool = False
) -> np.ndarray:
    """Logits [T, n_vocab] (float64) of a full causal forward over `token_ids` from position 0."""
    return load_reference(str(path)).logits(token_ids, act_quant=act_quant, kv_f16=kv_f16, kv_q8=kv_q8)
