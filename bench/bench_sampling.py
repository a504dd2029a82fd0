"""Per-step cost of what runs after the forward, by vocabulary size: sampling (each sampling
configuration on one row of logits with the numpy reference, and per row of a 32-row batch the
way the engine samples: one call into the core), logprobs, and detokenizing one token. Prints progress to
stderr and ONE JSON object last on stdout.

    PYTHONPATH=server:/path/to/_core python bench/bench_sampling.py [--vocabs 49152,151936,262144]
        [--calls 200] [--reference tests/model/sampling_reference.py]

Logits are synthetic and shaped like a language model's (Zipf-distributed probabilities with noise,
at random ids); the detokenizer runs the real tokenizers of the catalog models that are in the
cache (SmolLM2 49152, Qwen2.5-Coder 151936, Gemma 3 262144) over the tokens of an English and
code text. --reference times the sampler of another module as well (e.g. the one it replaced).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time

import numpy as np

from tinyserve.engine import SamplingParams
from tinyserve.engine import sampling as sampler

CONFIGS = {
    "greedy": SamplingParams(temperature=0.0),
    "greedy_logprobs5": SamplingParams(temperature=0.0, logprobs=5),
    "temperature1": SamplingParams(temperature=1.0),  # the API's default
    "cli_default": SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama.cpp's
    "top_p0.9_t0.7": SamplingParams(temperature=0.7, top_p=0.9),
    "min_p0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "repetition1.1_greedy": SamplingParams(temperature=0.0, repetition_penalty=1.1),
    "temperature1_logprobs20": SamplingParams(temperature=1.0, logprobs=20),
}
MODELS = {49152: "smollm2-135m-instruct", 151936: "qwen2.5-coder-0.5b-instruct", 262144: "gemma-3-270m"}
TEXT = (
    "The committee met on Tuesday to discuss the budget for the coming year. After a long debate, "
    "they agreed to fund the new library, repair the bridge on Main Street and hire two teachers. "
    "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n\nprint(mean([1, 2, 3]))\n"
) * 12


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def zipf_logits(vocab: int, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    lp = -1.1 * np.log(np.arange(1, vocab + 1)) + r.normal(0, 0.5, vocab)
    return (r.permutation(lp) + 3.0).astype(np.float32)


def time_sampler(fn, rows, params, calls: int) -> float:
    """Median microseconds per call over `calls` calls (after a few warm-up calls)."""
    rng = np.random.default_rng(0)
    prompt, output = list(range(100, 400)), list(range(500, 564))
    for i in range(3):
        fn(rows[i % len(rows)], params, rng, prompt, output)
    times = []
    for i in range(calls):
        t = time.perf_counter()
        fn(rows[i % len(rows)], params, rng, prompt, output)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def time_batch(rows, params, calls: int, batch: int = 32) -> float:
    """Median microseconds per row of the engine's batch path (LLMEngine._sample: penalties in
    place, one sample_batch call into the core for `batch` rows, logprobs): `batch` rows a call."""
    block = np.stack([rows[i % len(rows)] for i in range(batch)])
    prompt, output = list(range(100, 400)), list(range(500, 564))
    rngs = [np.random.default_rng(i) for i in range(batch)]
    times = []
    for i in range(max(10, calls // 4) + 3):
        x = block.copy()
        t = time.perf_counter()
        if sampler.has_penalties(params, len(prompt), len(output)):
            for r in range(batch):
                sampler.penalise(x[r], params, prompt, output)
        toks = sampler.sample_batch(x, [params] * batch, rngs).tolist()
        if params.logprobs:
            for r in range(batch):
                sampler.logprob_record(x[r], toks[r], params.logprobs)
        if i >= 3:
            times.append((time.perf_counter() - t) / batch)
    return statistics.median(times) * 1e6


def time_detok(path, reps: int) -> dict:
    from tinyserve.engine.stream import TextStream
    from tinyserve.models.tokenizer import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer.from_gguf(path)
    ids = tok.encode(TEXT)
    per_token = []
    for _ in range(reps):
        stream = TextStream(tok, stop=["\n\n\n"], detokenizer=IncrementalDetokenizer(tok, skip_special=True))
        t = time.perf_counter()
        for i in ids:
            stream.push([i])
        stream.finish()
        per_token.append((time.perf_counter() - t) / len(ids))
    return {"tokens": len(ids), "us_per_token": round(statistics.median(per_token) * 1e6, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="49152,151936,262144")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per configuration")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--reference", help="a module file with sample() to time as well (the old sampler)")
    ap.add_argument("--no-detok", action="store_true", help="skip the detokenizer (needs cached models)")
    args = ap.parse_args()
    vocabs = [int(v) for v in args.vocabs.split(",") if v]
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config {bad[0]!r}")
    ref = None
    if args.reference:
        spec = importlib.util.spec_from_file_location("sampling_reference", args.reference)
        ref = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = ref  # (dataclasses look their module up)
        spec.loader.exec_module(ref)

    out: dict = {
        "machine": platform.machine(),
        "numpy": np.__version__,
        "calls": args.calls,
        "unit": "microseconds per call (one sequence, one step), median",
        "sampling": {},
    }
    for v in vocabs:
        rows = [zipf_logits(v, s) for s in range(4)]
        res = {}
        for name in configs:
            p = CONFIGS[name]
            us = time_sampler(sampler.sample, rows, p, args.calls)
            batch_us = time_batch(rows, p, args.calls)
            res[name] = {"us": round(us, 1), "batch32_us_per_row": round(batch_us, 1)}
            msg = f"vocab {v:>6} {name:<24} {us:8.1f} us   batch of 32 {batch_us:8.1f} us/row"
            if ref is not None:
                us_ref = time_sampler(ref.sample, rows, p, max(20, args.calls // 4))
                res[name]["reference_us"] = round(us_ref, 1)
                msg += f"   reference {us_ref:8.1f} us ({us_ref / us:.1f}x)"
            log(msg)
        out["sampling"][str(v)] = res
    if not args.no_detok:
        from tinyserve.models import catalog

        out["detokenizer"] = {}
        for v in vocabs:
            name = MODELS.get(v)
            path = catalog.cached_path(name) if name else None
            if path is None or not path.exists():
                log(f"vocab {v}: no cached catalog model with this vocabulary; detokenizer not timed")
                continue
            d = time_detok(path, reps=5)
            d["model"] = name
            out["detokenizer"][str(v)] = d
            log(f"vocab {v:>6} detokenize + stop-string stream  {d['us_per_token']:6.2f} us/token ({name})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
