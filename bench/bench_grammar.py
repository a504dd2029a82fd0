#!/usr/bin/env python3
"""Cost of structured output per engine step, without the model: compile time (cold and cached),
and per step the mask of B constrained rows (fill_masks) plus forbidding tokens in their logits
(apply_mask) plus feeding the chosen token back, replayed along a real output of the schema.
Prints ONE JSON line.

    python bench/bench_grammar.py [--schema bench/schemas/people.json] [--batch 1 32] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schema", default="bench/schemas/people.json")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    args = ap.parse_args()

    from tinyserve.engine import SamplingParams, StoppingParams
    from tinyserve.engine.grammar import GrammarCompiler, ResponseFormat, apply_mask, fill_masks
    from tinyserve.llm import LLM

    llm = LLM(args.model)
    tok = llm.tokenizer
    fmt = ResponseFormat("json_schema", open(args.schema, encoding="utf-8").read())
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tok)
    vocab_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = compiler.compile(fmt)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiler.compile(fmt)
    cached_s = time.perf_counter() - t0

    # a real output to replay: greedy, constrained
    text = llm.generate_text("Four people as JSON:", SamplingParams(temperature=0), StoppingParams(max_tokens=400), fmt)
    out = llm.last_stats.token_ids
    result = {
        "bench": "grammar",
        "schema": args.schema,
        "vocab_size": tok.vocab_size,
        "vocabulary_build_ms": round(vocab_s * 1e3, 2),
        "compile_ms": round(compile_s * 1e3, 3),
        "compile_cached_ms": round(cached_s * 1e3, 4),
        "output_tokens": len(out),
        "output_valid_json": _is_json(text),
        "per_step": {},
    }
    rng = np.random.default_rng(0)
    for b in args.batch:
        matchers = [grammar.matcher() for _ in range(b)]
        logits = rng.standard_normal((b, tok.vocab_size)).astype(np.float32)
        mask_ms, apply_ms, consume_ms = [], [], []
        for t in out[:-1]:  # the last is the forced end token
            t0 = time.perf_counter()
            masks = fill_masks(matchers, tok.vocab_size)
            t1 = time.perf_counter()
            for r in range(b):
                apply_mask(logits[r], masks[r])
            t2 = time.perf_counter()
            for m in matchers:
                m.consume(t)
            t3 = time.perf_counter()
            mask_ms.append((t1 - t0) * 1e3)
            apply_ms.append((t2 - t1) * 1e3)
            consume_ms.append((t3 - t2) * 1e3)
        result["per_step"][f"batch_{b}"] = {
            "mask_p50_ms": round(statistics.median(mask_ms), 3),
            "mask_max_ms": round(max(mask_ms), 3),
            "apply_p50_ms": round(statistics.median(apply_ms), 3),
            "consume_p50_ms": round(statistics.median(consume_ms), 3),
            "total_p50_ms": round(statistics.median(np.add(np.add(mask_ms, apply_ms), consume_ms)), 3),
        }
    print(json.dumps(result))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
