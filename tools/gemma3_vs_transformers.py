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

from tinyserve import _core
from tinyserve.llm import LLM
from vs_transformers import hf_from_gguf, tinyserve_logits

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):",
    "The quick brown fox jumps over the lazy dog. " * 12,
]
# 834 tokens: past the 512-position window of the sliding layers
LONG = " ".join(f"Line {i}: the number {i * 7 % 13} follows {i}." for i in range(60))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--long", action="store_true", help="one 834-token prompt instead of the short ones")
    args = ap.parse_args()
    hf = hf_from_gguf(args.path, "gemma3")
    llm = LLM(args.path)
    model = _core.Model(args.path)
    for prompt in [LONG] if args.long else PROMPTS:
        ids = llm.tokenize(prompt)
        ours = tinyserve_logits(model, ids, kv_dtype="f32")
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
