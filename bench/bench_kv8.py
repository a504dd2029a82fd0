"""The int8 KV cache's quantizers per ISA: kv8_store (K and V of each new position) and
kv8_quantize_query (each query head once per row), in millions of elements per second.

    python bench/bench_kv8.py --hd 64 --positions 4096 --reps 15

One call quantizes `positions` rows of hd floats (one run of that many slots), so the Python call
costs little against the work. Best of --reps per figure; prints one JSON object.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hd", type=int, default=64)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
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
