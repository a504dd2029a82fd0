#!/usr/bin/env python3
"""tinyserve against Hugging Face transformers on a real Gemma 3 GGUF that tinyserve can compute
with (e.g. tools/dequantize_gguf.py's output). transformers reads the same file with its own GGUF
reader (which undoes llama.cpp's 1 + w on the norms) into its own Gemma3ForCausalLM (float64,
eager attention); tinyserve runs with an f32 KV cache. Prints one JSON line per prompt. Needs torch.

    python tools/gemma3_vs_transformers.py /tmp/gemma-3-270m-f16.gguf [--long]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from tinyserve import _core
from tinyserve.llm import LLM

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. " * 12,
]
# 834 tokens: past the 512-position window of the sliding layers
LONG = " ".join(f"Line {i}: the number {i * 7 % 13} follows {i}." for i in range(60))


def hf_gemma3(path: str):
    c = load_gguf_checkpoint(path, return_tensors=False)["config"]
    cfg = transformers.Gemma3TextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        rms_norm_eps=c["rms_norm_eps"],
        sliding_window=c["sliding_window"],
        max_position_embeddings=c["max_position_embeddings"],
        query_pre_attn_scalar=c["head_dim"],
        tie_word_embeddings=True,  # 270M/1B/4B/12B: query_pre_attn_scalar = head_dim
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": c["rope_theta"]},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )
    cfg._attn_implementation = "eager"
    model = transformers.Gemma3ForCausalLM(cfg)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise SystemExit(f"transformers state dict: missing {missing}, unexpected {unexpected}")
    return model.to(torch.float64).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--long", action="store_true", help="one 834-token prompt instead of the short ones")
    args = ap.parse_args()
    hf = hf_gemma3(args.path)
    llm = LLM(args.path)
    model = _core.Model(args.path)
    for prompt in [LONG] if args.long else PROMPTS:
        ids = llm.tokenize(prompt)
        n_blocks = (len(ids) + 15) // 16
        kv = _core.KVCache(model, block_size=16, num_blocks=n_blocks, dtype="f32")
        ours = model.forward(
            kv,
            np.asarray(ids, np.int32),
            np.asarray([len(ids)], np.int32),
            np.zeros(1, np.int32),
            np.arange(n_blocks, dtype=np.int32)[None],
            np.arange(len(ids), dtype=np.int32),
        )
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
        top = np.sort(ref, axis=1)
        clear = top[:, -1] - top[:, -2] > 0.05 * np.abs(ref).max()  # margins no rounding can flip
        same = ours.argmax(1) == ref.argmax(1)
        print(
            json.dumps(
                {
                    "tokens": len(ids),
                    "rel_err": float(np.abs(ours - ref).max() / np.abs(ref).max()),
                    "top1_equal": float(same.mean()),
                    "top1_equal_clear_margin": float(same[clear].mean()),
                    "clear_rows": int(clear.sum()),
                    "next": llm.detokenize([int(ref[-1].argmax())]),
                }
            )
        )


if __name__ == "__main__":
    main()
