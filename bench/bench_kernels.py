"""Kernel micro-benchmark: GEMV (M=1) and GEMM (M>1) per weight type and ISA at the default
model's shapes, single-threaded. Prints progress to stderr and ONE JSON object last on stdout.

    PYTHONPATH=server:build/dev-NAME/py python bench/bench_kernels.py [--isas avx512,avx2]
        [--types Q4_1,Q8_0] [--ms 1,8,32,128] [--min-time 0.2] [--layouts file,x16]

Each case runs on the file's block layout ("file") and, where the ISA has kernels for it, on the
x16 packed layout the engine repacks such matrices into at load time ("x16").

Weights are replicated to more than the last-level cache (--stream-mb) and successive calls walk
through the copies, so M=1 numbers are DRAM streaming rates, like real decoding.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from tinyserve import _core

K = _core.kernels

# (name, n = input features, rows = output features, types)
SHAPES = [
    ("attn_q/o 576x576", 576, 576, None),
    ("attn_k/v 576x192", 576, 192, None),
    ("ffn_gate/up 576x1536", 576, 1536, None),
    ("ffn_down 1536x576", 1536, 576, None),
    ("output 576x49152", 576, 49152, ["Q8_0"]),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_mhz() -> float:
    best = 0.0
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    best = max(best, float(line.split(":")[1]))
    except OSError:
        pass
    return best


def memory_bandwidth(mb: int = 256, reps: int = 5) -> dict[str, float]:
    """One thread, numpy: a large copy (bytes read + written per second) and a large int64 sum
    (bytes read per second, the ceiling for GEMV weight streaming)."""
    src = np.ones(mb * (1 << 20) // 8, np.int64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best_copy = best_read = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        t1 = time.perf_counter()
        src.sum()
        t2 = time.perf_counter()
        best_copy = min(best_copy, t1 - t0)
        best_read = min(best_read, t2 - t1)
    return {"copy_gbs": round(2 * src.nbytes / best_copy / 1e9, 2),
            "read_gbs": round(src.nbytes / best_read / 1e9, 2), "array_mb": mb}


def time_case(t: str, w: np.ndarray, x: np.ndarray, n: int, rows: int, isa: str,
              min_time: float, reps: int, chunk: int, packed: bool) -> tuple[float, float]:
    """(wall, thread-CPU) seconds per call, best of `reps` runs. On a shared box the thread CPU
    time is the better measure (it leaves out time the thread was not running)."""
    once = K.time_matmul(t, w, x, n, rows, isa, True, 1, chunk, packed)[1]  # warm-up and estimate
    if once >= min_time:
        return K.time_matmul(t, w, x, n, rows, isa, True, 1, chunk, packed)
    iters = max(3, int(min_time / max(once, 1e-7)))
    runs = [K.time_matmul(t, w, x, n, rows, isa, True, iters, chunk, packed) for _ in range(reps)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", default=",".join(_core.available_isas()))
    ap.add_argument("--types", default="Q4_1,Q8_0,Q4_0,F16")
    ap.add_argument("--ms", default="1,8,32,128")
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per case (at least)")
    ap.add_argument("--stream-mb", type=int, default=96, help="replicate weights to this size")
    ap.add_argument("--chunk", type=int, default=0,
                    help="weight rows per gemm call, as the engine's driver splits them (0 = all)")
    ap.add_argument("--reps", type=int, default=3, help="runs per case (best is kept)")
    ap.add_argument("--max-case-s", type=float, default=2.0, help="skip cases slower than this per call")
    ap.add_argument("--layouts", default="file,x16", help="weight layouts to time (file, x16)")
    args = ap.parse_args()
    isas = [i for i in args.isas.split(",") if i]
    types = [t for t in args.types.split(",") if t]
    ms = [int(m) for m in args.ms.split(",") if m]
    layouts = [x for x in args.layouts.split(",") if x]
    if any(x not in ("file", "x16") for x in layouts):
        ap.error("--layouts takes file and/or x16")

    rng = np.random.default_rng(0)
    mhz = cpu_mhz()
    mem = memory_bandwidth()
    log(f"memory bandwidth: copy {mem['copy_gbs']:.1f} GB/s, read {mem['read_gbs']:.1f} GB/s; "
        f"cpu {mhz:.0f} MHz")
    cases = []
    for isa in isas:
        for name, n, rows, only in SHAPES:
            for t in types:
                if only is not None and t not in only:
                    continue
                base = K.quantize(t, rng.standard_normal((rows, n)).astype(np.float32))
                copies = max(1, int(np.ceil(args.stream_mb * (1 << 20) / base.nbytes)))
                w = np.ascontiguousarray(np.tile(base, (copies, 1)))
                for m in ms:
                    x = rng.standard_normal((m, n)).astype(np.float32)
                    for layout in layouts:
                        packed = layout == "x16"
                        if packed and not (t in ("Q4_0", "Q4_1", "Q8_0") and K.has_packed(t, isa) and rows % 16 == 0):
                            continue
                        # estimated scalar time may be huge: one probe decides
                        probe = K.time_matmul(t, w, x, n, rows, isa, True, 1, 0, packed)[1]
                        if probe > args.max_case_s:
                            log(f"{isa:7s} {t:5s} {layout:4s} {name:22s} M={m:<4d} skipped ({probe:.2f} s per call)")
                            continue
                        wall, s = time_case(t, w, x, n, rows, isa, args.min_time, args.reps, args.chunk, packed)
                        gbs = base.nbytes / s / 1e9
                        gops = 2.0 * n * rows * m / s / 1e9
                        log(f"{isa:7s} {t:5s} {layout:4s} {name:22s} M={m:<4d} {s * 1e6:10.1f} us {gbs:7.2f} GB/s "
                            f"{gops:8.2f} GOP/s  (wall {wall * 1e6:.1f} us)")
                        cases.append({"isa": isa, "type": t, "layout": layout, "shape": name, "n": n, "rows": rows,
                                      "m": m, "us": round(s * 1e6, 2), "wall_us": round(wall * 1e6, 2),
                                      "gbs": round(gbs, 3), "gops": round(gops, 3)})
                del w
    ghz = mhz / 1000.0
    result = {
        "bench": "kernels",
        "threads": 1,
        "chunk": args.chunk,
        "timing": "us/gbs/gops from thread CPU time (best of reps); wall_us beside it",
        "load_avg": os.getloadavg()[0],
        "machine": platform.machine(),
        "cpu_mhz": mhz,
        "cpu_count": os.cpu_count(),
        "features": _core.cpu_features(),
        "memory": mem,
        # Peak int8 multiply-add rate of one core, in ops (2 per MAC): AVX-512 VNNI one 512-bit
        # vpdpbusd per cycle = 64 MACs; AVX2 pmaddubsw+pmaddwd ~ 32 MACs per cycle.
        "peak_int8_gops_per_core": {"avx512": round(128 * ghz, 1), "avx2": round(64 * ghz, 1)},
        "cases": cases,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
