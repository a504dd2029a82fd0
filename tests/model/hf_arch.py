"""Tiny random models of each architecture, written twice: as a Hugging Face model (transformers'
own config class and weight names, the reference) and as a GGUF file laid out the way llama.cpp's
converter lays it out (what tinyserve reads).

    spec = ArchSpec(arch="gemma3", sliding_window=8)
    weights = make_weights(spec)                 # HF names -> float32 arrays
    write_gguf(path, spec, weights)              # the GGUF tinyserve loads
    logits = hf_logits(spec, weights, tokens)    # transformers' forward, float64, [T, n_vocab]

The GGUF side follows llama.cpp's convert_hf_to_gguf.py (facts of the format, not its code):
  llama   q/k rows permuted from HF's rotate-half order to adjacent pairs; Llama 3 rope scaling
          written as a rope_freqs.weight tensor of per-frequency divisors
  qwen3   attn_q_norm / attn_k_norm; head_dim as attention.key_length
  gemma3  every RMSNorm weight stored as 1 + w (HF keeps w and computes x * (1 + w)); HF's
          post_attention_layernorm -> post_attention_norm, pre_feedforward_layernorm -> ffn_norm,
          post_feedforward_layernorm -> post_ffw_norm; sliding_window as attention.sliding_window
  phi3    qkv_proj -> attn_qkv, gate_up_proj -> ffn_up (gate rows first); LongRoPE factors as
          rope_factors_long/short.weight with rope.scaling.attn_factor and original_context_length
`test_arch_reference.py` checks this layout against transformers' own GGUF reader where that
reader covers the architecture, so the two readings are not ours alone.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import gguf
import numpy as np
from tiny_models import CHATML_TEMPLATE, add_hparams, tiny_vocab

QT = gguf.GGMLQuantizationType
ARCHS = ("llama", "qwen3", "gemma3", "phi3")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    arch: str = "llama"
    dim: int = 64
    hidden_dim: int = 96
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: dim // n_heads (gemma3/qwen3 may differ)
    rope_dim: int | None = None  # None: head_dim (phi3 partial rotary: fewer)
    n_vocab: int = 128
    context_length: int = 256
    rope_base: float = 10000.0
    sliding_window: int = 0  # gemma3 / phi3: > 0 turns sliding-window layers on
    # ("linear", factor) | ("llama3", factor, low_freq_factor, high_freq_factor, original_ctx)
    # | ("yarn", factor, original_ctx) | ("longrope", original_ctx)  (phi3: random factors)
    rope_scaling: tuple | None = None
    wtype: str = "F32"  # type of every 2-D matrix in the GGUF (the HF model gets the
    # dequantized values)
    tied: bool = False
    seed: int = 0

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rd(self) -> int:
        return self.rope_dim or self.hd

    @property
    def norm_eps(self) -> float:
        return 1e-5 if self.arch in ("llama", "phi3") else 1e-6


# --- weights --------------------------------------------------------------------------------------
def _roundtrip(arr: np.ndarray, wtype: str) -> np.ndarray:
    """The values a GGUF of `wtype` holds for `arr` (what both sides then compute with)."""
    qt = QT[wtype]
    if qt == QT.F32:
        return arr.astype(np.float32)
    if qt == QT.F16:
        return arr.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(arr.astype(np.float32), qt), qt).astype(np.float32)


def make_weights(spec: ArchSpec) -> dict[str, np.ndarray]:
    """Random HF-named weights (float32), scaled so activations stay O(1) and logits spread out.
    Matrices already carry the rounding of spec.wtype."""
    rng = np.random.default_rng(spec.seed)
    D, H, HD = spec.dim, spec.hidden_dim, spec.hd
    QD, KVD = spec.n_heads * HD, spec.n_kv_heads * HD
    gemma = spec.arch == "gemma3"

    def mat(n_out, n_in, gain=1.0):
        return _roundtrip(rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in)), spec.wtype)

    def norm(n):  # HF's parameter: gemma computes x * (1 + w), the others x * w
        return ((0.0 if gemma else 1.0) + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # gemma multiplies the embedding by sqrt(dim): keep the scaled rows O(1)
    embd_std = 1.0 / np.sqrt(D) if gemma else 0.5
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": _roundtrip(rng.standard_normal((spec.n_vocab, D)) * embd_std, spec.wtype),
        "model.norm.weight": norm(D),
    }
    if not spec.tied:
        w["lm_head.weight"] = mat(spec.n_vocab, D, gain=3.0)
    for i in range(spec.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(D)
        q, k, v = mat(QD, D, 2.0), mat(KVD, D, 2.0), mat(KVD, D)
        if spec.arch == "phi3":
            w[p + "self_attn.qkv_proj.weight"] = np.concatenate([q, k, v])
        else:
            w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"], w[p + "self_attn.v_proj.weight"] = (
                q,
                k,
                v,
            )
        if spec.arch in ("qwen3", "gemma3"):
            w[p + "self_attn.q_norm.weight"] = norm(HD)
            w[p + "self_attn.k_norm.weight"] = norm(HD)
        w[p + "self_attn.o_proj.weight"] = mat(D, QD)
        w[p + "post_attention_layernorm.weight"] = norm(D)
        if gemma:
            w[p + "pre_feedforward_layernorm.weight"] = norm(D)
            w[p + "post_feedforward_layernorm.weight"] = norm(D)
        gate, up = mat(H, D), mat(H, D)
        if spec.arch == "phi3":
            w[p + "mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
        else:
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = gate, up
        w[p + "mlp.down_proj.weight"] = mat(D, H)
    if spec.rope_scaling and spec.rope_scaling[0] == "longrope":
        half = spec.rd // 2
        w["_rope_short"] = (1.0 + rng.random(half)).astype(np.float32)  # factors in [1, 2)
        w["_rope_long"] = (1.0 + 8.0 * rng.random(half)).astype(np.float32)  # in [1, 9)
    return w


# --- the transformers model -------------------------------------------------------------------------
def _rope_parameters(spec: ArchSpec, w: dict[str, np.ndarray]) -> dict:
    rp: dict = {"rope_type": "default", "rope_theta": spec.rope_base}
    rs = spec.rope_scaling
    if rs is None:
        return rp
    if rs[0] == "linear":
        rp.update(rope_type="linear", factor=rs[1])
    elif rs[0] == "llama3":
        rp.update(
            rope_type="llama3",
            factor=rs[1],
            low_freq_factor=rs[2],
            high_freq_factor=rs[3],
            original_max_position_embeddings=rs[4],
        )
    elif rs[0] == "yarn":
        rp.update(rope_type="yarn", factor=rs[1], original_max_position_embeddings=rs[2])
    elif rs[0] == "longrope":
        rp.update(
            rope_type="longrope",
            short_factor=w["_rope_short"].tolist(),
            long_factor=w["_rope_long"].tolist(),
            original_max_position_embeddings=rs[1],
        )
    return rp


def hf_config(spec: ArchSpec, w: dict[str, np.ndarray]):
    import transformers

    common = dict(
        vocab_size=spec.n_vocab,
        hidden_size=spec.dim,
        intermediate_size=spec.hidden_dim,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        max_position_embeddings=spec.context_length,
        rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tied,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=None,
    )
    rp = _rope_parameters(spec, w)
    if spec.arch == "llama":
        return transformers.LlamaConfig(
            **common, head_dim=spec.hd, rope_parameters=rp, attention_bias=False, mlp_bias=False, hidden_act="silu"
        )
    if spec.arch == "qwen3":
        return transformers.Qwen3Config(
            **common,
            head_dim=spec.hd,
            rope_parameters=rp,
            attention_bias=False,
            use_sliding_window=False,
            hidden_act="silu",
        )
    if spec.arch == "gemma3":
        sw = spec.sliding_window
        layer_types = [("sliding_attention" if sw and (i + 1) % 6 else "full_attention") for i in range(spec.n_layers)]
        return transformers.Gemma3TextConfig(
            **common,
            head_dim=spec.hd,
            query_pre_attn_scalar=spec.hd,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=sw or spec.context_length,
            layer_types=layer_types,
            rope_parameters={
                "full_attention": rp,
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
        )
    if spec.arch == "phi3":
        if spec.rope_scaling and spec.rope_scaling[0] == "longrope":
            common["original_max_position_embeddings"] = spec.rope_scaling[1]
        return transformers.Phi3Config(
            **common,
            rope_parameters=rp,
            partial_rotary_factor=spec.rd / spec.hd,
            sliding_window=spec.sliding_window or None,
            hidden_act="silu",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        )
    raise ValueError(spec.arch)


def hf_model(spec: ArchSpec, w: dict[str, np.ndarray]):
    """The transformers model with exactly these weights, in float64, eager attention."""
    import torch
    import transformers

    cfg = hf_config(spec, w)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "gemma3": transformers.Gemma3ForCausalLM,
        "phi3": transformers.Phi3ForCausalLM,
    }[spec.arch]
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    state = {k: torch.from_numpy(v) for k, v in w.items() if not k.startswith("_")}
    if spec.tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise AssertionError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(torch.float64).eval()


def hf_logits(spec: ArchSpec, w: dict[str, np.ndarray], tokens) -> np.ndarray:
    """transformers' logits [T, n_vocab] (float64) for one sequence from position 0."""
    import torch

    model = hf_model(spec, w)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(tokens)], dtype=torch.long), use_cache=False)
    return out.logits[0].double().numpy()


# --- the GGUF file ----------------------------------------------------------------------------------
def _permute_llama(m: np.ndarray, n_head: int) -> np.ndarray:
    """HF's q/k rows (each head: first half, second half of the rotated pairs) -> llama.cpp's
    (each head: pairs interleaved), as llama.cpp's converter does for the llama architecture."""
    return m.reshape(n_head, 2, m.shape[0] // n_head // 2, *m.shape[1:]).swapaxes(1, 2).reshape(m.shape)


def llama3_rope_factors(base: float, rope_dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling (the rope_freqs.weight llama.cpp's converter
    writes): 1 for short wavelengths, `factor` for long ones, a smooth blend between."""
    freqs = 1.0 / base ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    wavelen = 2 * math.pi / freqs
    low_wl, high_wl = orig / low, orig / high
    out = np.empty_like(freqs)
    for i, wl in enumerate(wavelen):
        if wl < high_wl:
            out[i] = 1.0
        elif wl > low_wl:
            out[i] = factor
        else:
            smooth = (orig / wl - low) / (high - low)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return out.astype(np.float32)


def write_gguf(path: str | Path, spec: ArchSpec, w: dict[str, np.ndarray]) -> Path:
    path = Path(path)
    arch = spec.arch
    gemma = arch == "gemma3"
    g = gguf.GGUFWriter(str(path), arch)
    add_hparams(g, spec)
    if spec.head_dim is not None:
        g.add_key_length(spec.hd)
        g.add_value_length(spec.hd)
    g.add_rope_dimension_count(spec.rd)
    if spec.sliding_window:
        g.add_sliding_window(spec.sliding_window)
    rs = spec.rope_scaling
    if rs and rs[0] == "linear":
        g.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        g.add_rope_scaling_factor(rs[1])
    elif rs and rs[0] == "yarn":
        g.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        g.add_rope_scaling_factor(rs[1])
        g.add_rope_scaling_orig_ctx_len(rs[2])
    elif rs and rs[0] == "longrope":
        scale = spec.context_length / rs[1]
        g.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(rs[1])) if scale > 1 else 1.0)
        g.add_rope_scaling_orig_ctx_len(rs[1])

    tokens, types, merges = tiny_vocab(spec.n_vocab)
    g.add_tokenizer_model("gpt2")
    g.add_tokenizer_pre("default")
    g.add_token_list(tokens)
    g.add_token_types(types)
    g.add_token_merges(merges)
    g.add_bos_token_id(0)
    g.add_eos_token_id(2)
    g.add_add_bos_token(False)
    g.add_chat_template(CHATML_TEMPLATE)

    def mat(name: str, arr: np.ndarray) -> None:
        qt = QT[spec.wtype]
        if qt == QT.F32:
            g.add_tensor(name, arr.astype(np.float32))
        elif qt == QT.F16:
            g.add_tensor(name, arr.astype(np.float16))
        else:
            g.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)

    def vec(name: str, arr: np.ndarray) -> None:
        g.add_tensor(name, (arr + (1.0 if gemma else 0.0)).astype(np.float32))  # gemma: 1 + w

    mat("token_embd.weight", w["model.embed_tokens.weight"])
    vec("output_norm.weight", w["model.norm.weight"])
    if not spec.tied:
        mat("output.weight", w["lm_head.weight"])
    if rs and rs[0] == "llama3":
        g.add_tensor("rope_freqs.weight", llama3_rope_factors(spec.rope_base, spec.rd, *rs[1:]))
    if rs and rs[0] == "longrope":
        g.add_tensor("rope_factors_long.weight", w["_rope_long"])
        g.add_tensor("rope_factors_short.weight", w["_rope_short"])
    for i in range(spec.n_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        vec(b + "attn_norm.weight", w[p + "input_layernorm.weight"])
        if arch == "phi3":
            mat(b + "attn_qkv.weight", w[p + "self_attn.qkv_proj.weight"])
        else:
            q, k = w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"]
            if arch == "llama":
                q, k = _permute_llama(q, spec.n_heads), _permute_llama(k, spec.n_kv_heads)
            mat(b + "attn_q.weight", q)
            mat(b + "attn_k.weight", k)
            mat(b + "attn_v.weight", w[p + "self_attn.v_proj.weight"])
        if arch in ("qwen3", "gemma3"):
            vec(b + "attn_q_norm.weight", w[p + "self_attn.q_norm.weight"])
            vec(b + "attn_k_norm.weight", w[p + "self_attn.k_norm.weight"])
        mat(b + "attn_output.weight", w[p + "self_attn.o_proj.weight"])
        if gemma:
            vec(b + "post_attention_norm.weight", w[p + "post_attention_layernorm.weight"])
            vec(b + "ffn_norm.weight", w[p + "pre_feedforward_layernorm.weight"])
            vec(b + "post_ffw_norm.weight", w[p + "post_feedforward_layernorm.weight"])
        else:
            vec(b + "ffn_norm.weight", w[p + "post_attention_layernorm.weight"])
        if arch == "phi3":
            mat(b + "ffn_up.weight", w[p + "mlp.gate_up_proj.weight"])
        else:
            mat(b + "ffn_gate.weight", w[p + "mlp.gate_proj.weight"])
            mat(b + "ffn_up.weight", w[p + "mlp.up_proj.weight"])
        mat(b + "ffn_down.weight", w[p + "mlp.down_proj.weight"])
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return path
