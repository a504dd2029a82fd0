"""`tinyserve bench engine`: raw engine throughput on one model, llama-bench style.

pp{P}: prefill of a P-token prompt in one forward (tokens/s).
tg128_b{N}: N sequences each decode 128 tokens after a 128-token prompt, all in one batch
(aggregate tokens/s; the prompts' prefill is not timed).
Each figure is the median of --reps runs. The last stdout line is one JSON object.
--kv-dtype f16,q8_0 measures several KV cache types side by side: every figure runs each type in
turn, rep by rep (the order rotating), so a drift in the machine's load hits all alike; the
top-level figures are the first type's, "by_kv_dtype" holds each type's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

DEFAULT_BATCHES = (1, 4, 8, 16, 32, 64)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file or catalog model name (default: the default model)")
    p.add_argument("--threads", type=int, default=0, help="compute threads (0 = all cores)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (median is reported)")
    p.add_argument("--prompt-sizes", default="128,512", help="comma-separated prefill sizes")
    p.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)), help="comma-separated decode batch sizes")
    p.add_argument("--gen", type=int, default=128, help="decode tokens per sequence")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the forward runs (default: $TINYSERVE_DEVICE, else cpu)",
    )
    p.add_argument(
        "--peak-gbps",
        type=float,
        default=0.0,
        help="the memory bandwidth to report single-sequence decode against (GB/s; default: measured, "
        "the compute threads reading a buffer of one decode step's weight bytes)",
    )
    p.add_argument(
        "--kv-dtype",
        default=None,
        metavar="DTYPE[,DTYPE...]",
        help="KV cache element type(s): q8_0, f16 or f32; several, comma-separated, are "
        "measured side by side (default: $TINYSERVE_KV_DTYPE or the engine's default)",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")


def _matmul_params(core) -> tuple[int, int]:
    """(parameters touched per token in the layers, parameters of the output head)."""
    cfg = core.config
    per_token = 0
    head = cfg["dim"] * cfg["n_vocab"]
    for name, _type, shape in core.tensors():
        if name.startswith("blk.") and len(shape) == 2:
            per_token += shape[0] * shape[1]
    return per_token, head


def _bytes_per_token(core) -> int:
    """Weight bytes one decode step reads: every layer tensor, the final norm and the output head
    (token_embd when the head is tied). The embedding of an untied model is read one row per token,
    so it is left out."""
    from tinyserve import _core

    k = _core.kernels
    names = {name for name, _t, _s in core.tensors()}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    total = 0
    for name, typ, shape in core.tensors():
        if name.startswith("blk.") or name in (head, "output_norm.weight"):
            elems = int(np.prod(shape))
            total += elems // k.block_size(typ) * k.type_size(typ)
    return total


def read_roofline(nbytes: int, reps: int = 5) -> float:
    """GB/s of the compute threads reading a buffer of nbytes again and again (best of reps), as
    decode reads its weights step after step: the ceiling of a step that reads that many bytes.
    numpy advises a buffer this large into huge pages, as the engine does its weights."""
    from tinyserve import _core

    buf = np.ones(max(8, nbytes), np.uint8)
    return round(float(_core.kernels.read_bandwidth(buf, reps)[0]), 2)


class _Runner:
    def __init__(self, core, block_size: int, max_tokens_per_seq: int, max_seqs: int, kv_dtype: str):
        from tinyserve import _core

        self.core = core
        self.bs = block_size
        self.blocks_per_seq = (max_tokens_per_seq + block_size - 1) // block_size
        self.kv = _core.KVCache(core, block_size=block_size, num_blocks=self.blocks_per_seq * max_seqs, dtype=kv_dtype)
        self.tables = np.arange(self.blocks_per_seq * max_seqs, dtype=np.int32).reshape(max_seqs, -1)
        # the logits land in one buffer, as in the engine's step loop (LLMEngine._logits_out)
        self.logits = np.empty((max_seqs, int(core.config["n_vocab"])), np.float32)

    def forward(self, tokens_per_seq: list[np.ndarray], start: list[int]) -> np.ndarray:
        n = len(tokens_per_seq)
        toks = np.concatenate(tokens_per_seq).astype(np.int32)
        lens = np.array([len(t) for t in tokens_per_seq], dtype=np.int32)
        rows = np.cumsum(lens).astype(np.int32) - 1
        return self.core.forward(
            self.kv, toks, lens, np.array(start, dtype=np.int32), self.tables[:n], rows, out=self.logits[:n]
        )


def run(args: argparse.Namespace) -> dict:
    from tinyserve import _core
    from tinyserve.engine.params import KV_DTYPES, default_kv_dtype
    from tinyserve.models.catalog import resolve_model
    from tinyserve.models.default import default_model_path

    dtypes = [d.strip() for d in (args.kv_dtype or default_kv_dtype()).split(",") if d.strip()]
    bad = [d for d in dtypes if d not in KV_DTYPES]
    if bad or not dtypes or len(set(dtypes)) != len(dtypes):
        raise ValueError(f"--kv-dtype: distinct types of {', '.join(KV_DTYPES)}, got {args.kv_dtype!r}")
    path = str(resolve_model(args.model)[1]) if args.model else str(default_model_path())
    if args.threads:
        _core.set_num_threads(args.threads)
    from tinyserve.device import check_device

    core = _core.Model(path, device=check_device(args.device))
    cfg = core.config
    rng = np.random.default_rng(0)
    prompt_sizes = [int(x) for x in args.prompt_sizes.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    gen = args.gen
    layer_params, head_params = _matmul_params(core)
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))

    out: dict = {
        "model": path.rsplit("/", 1)[-1],
        "device": core.device_description,
        "isa": _core.isa(),
        "threads": _core.get_num_threads(),
        "weight_bytes": cfg["weight_bytes"],
        "repacked_bytes": cfg["repacked_bytes"],
        "bytes_per_token": _bytes_per_token(core),
        "reps": args.reps,
        "kv_dtype": dtypes[0],
    }
    if args.peak_gbps > 0:
        out["peak_gbps"] = args.peak_gbps
    elif 1 in batches:
        out["peak_gbps"] = read_roofline(out["bytes_per_token"])
    max_len = max(prompt_sizes + [128 + gen])
    runners = {d: _Runner(core, args.block_size, max_len, max(batches + [1]), d) for d in dtypes}
    figs: dict[str, dict] = {d: {"kv_bytes_per_token": runners[d].kv.bytes_per_block / args.block_size} for d in dtypes}

    def timed(work) -> dict[str, float]:
        """Median seconds of work(runner) per dtype, the dtypes taking turns rep by rep."""
        times: dict[str, list[float]] = {d: [] for d in dtypes}
        for rep in range(args.reps):
            for d in dtypes[rep % len(dtypes) :] + dtypes[: rep % len(dtypes)]:
                times[d].append(work(runners[d]))
        return {d: statistics.median(t) for d, t in times.items()}

    def prefill(P: int):
        def work(runner: _Runner) -> float:
            toks = rng.integers(0, cfg["n_vocab"], P)
            t0 = time.perf_counter()
            runner.forward([toks], [0])
            return time.perf_counter() - t0

        return work

    def decode(N: int):
        def work(runner: _Runner) -> float:
            prompts = [rng.integers(0, cfg["n_vocab"], 128) for _ in range(N)]
            runner.forward(prompts, [0] * N)  # prefill, not timed
            last = [rng.integers(0, cfg["n_vocab"], 1) for _ in range(N)]
            t0 = time.perf_counter()
            for i in range(gen):
                logits = runner.forward(last, [128 + i] * N)
                last = list(np.argmax(logits, axis=1).astype(np.int32).reshape(N, 1))  # greedy
            return time.perf_counter() - t0

        return work

    for P in prompt_sizes:
        for d, med in timed(prefill(P)).items():
            figs[d][f"pp{P}"] = round(P / med, 2)
            figs[d][f"pp{P}_gflops"] = round((2 * layer_params * P + 2 * head_params) / med / 1e9, 2)
        log(f"pp{P}: " + ", ".join(f"{d} {figs[d][f'pp{P}']}" for d in dtypes) + " tok/s")

    for N in batches:
        key = f"tg{gen}_b{N}"
        for d, med in timed(decode(N)).items():
            figs[d][key] = round(N * gen / med, 2)
            figs[d][key + "_gflops"] = round(2 * (layer_params + head_params) * N * gen / med / 1e9, 2)
            if N == 1:
                # weights, plus the K and V cache read at each of the gen steps (positions 129..128+gen)
                kv_read = figs[d]["kv_bytes_per_token"] * sum(129 + i for i in range(gen))
                figs[d][key + "_gbps"] = round((out["bytes_per_token"] * gen + kv_read) / med / 1e9, 2)
                figs[d][key + "_roofline"] = round(figs[d][key + "_gbps"] / out["peak_gbps"], 3)
        log(f"{key}: " + ", ".join(f"{d} {figs[d][key]}" for d in dtypes) + " tok/s")
    out.update(figs[dtypes[0]])
    if len(dtypes) > 1:
        out["by_kv_dtype"] = figs
    return out
