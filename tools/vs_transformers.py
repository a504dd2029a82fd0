"""The two sides of a tinyserve-vs-transformers comparison on a real GGUF file, shared by
tools/gemma3_vs_transformers.py and tests/model/test_real_models.py:

- `hf_from_gguf(path, arch)`: Hugging Face transformers' own model of the file (its GGUF reader,
  which dequantizes with the `gguf` package and undoes llama.cpp's 1 + w on Gemma's norms) in
  float64 with eager attention; gemma3 and qwen2. Needs torch.
- `tinyserve_logits(model, ids, kv_dtype)`: tinyserve's logits for every position of one prompt.
"""

from __future__ import annotations

import numpy as np

# the config fields transformers' GGUF reader names as its config classes do
_COMMON = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
)


def hf_from_gguf(path: str, arch: str):
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    c = load_gguf_checkpoint(path, return_tensors=False)["config"]
    common = {k: c[k] for k in _COMMON}
    if arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **common,
            head_dim=c["head_dim"],
            sliding_window=c["sliding_window"],
            query_pre_attn_scalar=c["head_dim"],  # 270M/1B/4B/12B: query_pre_attn_scalar = head_dim
            tie_word_embeddings=True,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": c["rope_theta"]},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
        cls = transformers.Gemma3ForCausalLM
    elif arch == "qwen2":  # transformers' own config from the file (from_pretrained on a GGUF would want accelerate)
        cfg = transformers.Qwen2Config(
            **common,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": c["rope_theta"]},
        )
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"no transformers reference for architecture {arch!r} (gemma3, qwen2)")
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    if cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"transformers state dict: missing {missing}, unexpected {unexpected}")
    return model.to(torch.float64).eval()


def tinyserve_logits(model, ids: list[int], kv_dtype: str = "f16") -> np.ndarray:
    """(len(ids), n_vocab) logits of one prompt from a `tinyserve._core.Model`, in a fresh KV cache."""
    from tinyserve import _core

    n_blocks = (len(ids) + 15) // 16
    kv = _core.KVCache(model, block_size=16, num_blocks=n_blocks, dtype=kv_dtype)
    return model.forward(
        kv,
        np.asarray(ids, np.int32),
        np.asarray([len(ids)], np.int32),
        np.zeros(1, np.int32),
        np.arange(n_blocks, dtype=np.int32)[None],
        np.arange(len(ids), dtype=np.int32),
    )
