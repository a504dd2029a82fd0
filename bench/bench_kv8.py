"""The int8 KV cache's quantizers per ISA: kv8_store (K and V of each new position) and
kv8_quantize_query (each query head once per row), in millions of elements per second.

    python bench/bench_kv8.py --hd 64 --positions 4096 --reps 15

One call quantizes `positions` rows of hd floats (one run of that many slots), so the Python call
costs little against the work. Best of --reps per figure; prints one JSON object.

    python bench/bench_kv8.py --decode-step        # ms per decode step, f16 vs q8_0 cache

--decode-step instead times the default model's forward on 32 sequences of 256 positions (24
decode steps after a prefill, f16 and q8_0 taking turns, 3 rounds): wall and process CPU ms per step.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tinyserve import _core

K = _core.kernels


def best_seconds(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def decode_step(threads: int) -> dict:
    from tinyserve.models.catalog import DEFAULT_MODEL, resolve_model

    _core.set_num_threads(threads)
    m = _core.Model(str(resolve_model(DEFAULT_MODEL)[1]))
    S, P, steps, bs = 32, 256, 24, 16
    nb = -(-(P + steps + 1) // bs)
    toks = np.random.default_rng(0).integers(100, 10000, size=(S, P)).astype(np.int32)
    out: dict = {"sequences": S, "positions": P, "steps": steps, "threads": threads}
    for _ in range(3):
        for dt in ("f16", "q8_0"):
            kv = _core.KVCache(m, block_size=bs, num_blocks=S * nb, dtype=dt)
            tables = np.arange(S * nb, dtype=np.int32).reshape(S, nb)
            for s in range(S):
                one = np.array([P], np.int32)
                m.forward(kv, toks[s], one, np.zeros(1, np.int32), tables[s : s + 1], one - 1)
            nxt = np.full(S, 7, np.int32)
            c0, w0 = time.process_time(), time.perf_counter()
            for st in range(steps):
                m.forward(
                    kv, nxt, np.ones(S, np.int32), np.full(S, P + st, np.int32), tables, np.arange(S, dtype=np.int32)
                )
            c1, w1 = time.process_time(), time.perf_counter()
            out.setdefault(dt + "_wall_ms", []).append(round((w1 - w0) / steps * 1e3, 2))
            out.setdefault(dt + "_cpu_ms", []).append(round((c1 - c0) / steps * 1e3, 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--decode-step", action="store_true", help="time decode steps of the default model instead")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.decode_step:
        print(json.dumps(decode_step(a.threads)))
        return
    x = np.random.default_rng(0).standard_normal((a.positions, a.hd)).astype(np.float32)
    n = x.size
    out: dict = {"hd": a.hd, "positions": a.positions, "reps": a.reps, "isa": {}}
    for isa in _core.available_isas():
        store = best_seconds(
            lambda isa=isa: (K.kv8_run(0, x, a.positions, isa), K.kv8_run(1, x, a.positions, isa)), a.reps
        )
        query = best_seconds(lambda isa=isa: K.kv8_query(x, a.hd, isa), a.reps)
        out["isa"][isa] = {
            "store_kv_melem_s": round(2 * n / store / 1e6, 1),
            "query_melem_s": round(n / query / 1e6, 1),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
