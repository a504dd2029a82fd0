"""Kernel micro-benchmark: GEMV (M=1) and GEMM (M>1) per weight type and ISA at the default
model's shapes, single-threaded. Prints progress to stderr and ONE JSON object last on stdout.

    PYTHONPATH=server:build/dev-NAME/py python bench/bench_kernels.py [--isas avx512,avx2]
        [--types Q4_1,Q8_0] [--ms 1,8,32,128] [--min-time 0.2] [--layouts file,x16]
        [--shapes smollm2,gemma3,qwen2]

Each case runs on the file's block layout ("file") and, where the ISA has kernels for it, on the
x16 packed layout the engine repacks such matrices into at load time ("x16"). --shapes picks the
matrix shapes: the default model's (smollm2), Gemma 3 270M's or Qwen2.5 0.5B's (the K-quant test
files); a type runs on the shapes whose row length is a multiple of its block size (256 for the
K-quants and IQ4_XS: e.g. --shapes gemma3,qwen2 --types Q4_0,Q8_0,Q5_0,Q4_K,Q6_K).

Weights of types the reference cannot quantize (Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) are random
blocks with realistic fp16 scales: the kernels' speed does not depend on the values.

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

# (name, n = input features, rows = output features, types (None: all)) per model
SHAPES = {
    "smollm2": [
        ("attn_q/o 576x576", 576, 576, None),
        ("attn_k/v 576x192", 576, 192, None),
        ("ffn_gate/up 576x1536", 576, 1536, None),
        ("ffn_down 1536x576", 1536, 576, None),
        ("output 576x49152", 576, 49152, ["Q8_0"]),
    ],
    "gemma3": [  # gemma-3-270m (the 262k-row output head is left out: ~180 MB per copy)
        ("attn_q 640x1024", 640, 1024, None),
        ("attn_k/v 640x256", 640, 256, None),
        ("attn_output 1024x640", 1024, 640, None),
        ("ffn_gate/up 640x2048", 640, 2048, None),
        ("ffn_down 2048x640", 2048, 640, None),
    ],
    "qwen2": [  # qwen2.5-0.5b (output head left out)
        ("attn_q/o 896x896", 896, 896, None),
        ("attn_k/v 896x128", 896, 128, None),
        ("ffn_gate/up 896x4864", 896, 4864, None),
        ("ffn_down 4864x896", 4864, 896, None),
    ],
}
# Byte offsets of each type's fp16 fields (d; m or dmin) in a block, for the random-block weights.
F16_FIELDS = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


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
    return {
        "copy_gbs": round(2 * src.nbytes / best_copy / 1e9, 2),
        "read_gbs": round(src.nbytes / best_read / 1e9, 2),
        "array_mb": mb,
    }


def make_weights(t: str, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, row_bytes] of type t: the reference quantization of Gaussian rows, or (types it
    cannot quantize) random blocks whose fp16 scales are small positive normals."""
    if t not in F16_FIELDS:
        return K.quantize(t, rng.standard_normal((rows, n)).astype(np.float32))
    bs, ts = K.block_size(t), K.type_size(t)
    nb = rows * (n // bs)
    b = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    for o in F16_FIELDS[t]:
        d = (np.abs(rng.standard_normal(nb)) * 0.02 + 1e-3).astype(np.float16)
        b[:, o : o + 2] = d.view(np.uint8).reshape(nb, 2)
    return b.reshape(rows, -1)


def time_case(
    t: str,
    w: np.ndarray,
    x: np.ndarray,
    n: int,
    rows: int,
    isa: str,
    min_time: float,
    reps: int,
    chunk: int,
    packed: bool,
) -> tuple[float, float]:
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
    ap.add_argument(
        "--chunk", type=int, default=0, help="weight rows per gemm call, as the engine's driver splits them (0 = all)"
    )
    ap.add_argument("--reps", type=int, default=3, help="runs per case (best is kept)")
    ap.add_argument("--max-case-s", type=float, default=2.0, help="skip cases slower than this per call")
    ap.add_argument("--layouts", default="file,x16", help="weight layouts to time (file, x16)")
    ap.add_argument("--shapes", default="smollm2", help="shape sets: " + ",".join(SHAPES))
    args = ap.parse_args()
    isas = [i for i in args.isas.split(",") if i]
    types = [t for t in args.types.split(",") if t]
    ms = [int(m) for m in args.ms.split(",") if m]
    layouts = [x for x in args.layouts.split(",") if x]
    if any(x not in ("file", "x16") for x in layouts):
        ap.error("--layouts takes file and/or x16")
    shape_sets = [x for x in args.shapes.split(",") if x]
    if any(x not in SHAPES for x in shape_sets):
        ap.error("--shapes takes " + ", ".join(SHAPES))
    shapes = [sh for x in shape_sets for sh in SHAPES[x]]

    rng = np.random.default_rng(0)
    mhz = cpu_mhz()
    mem = memory_bandwidth()
    log(f"memory bandwidth: copy {mem['copy_gbs']:.1f} GB/s, read {mem['read_gbs']:.1f} GB/s; cpu {mhz:.0f} MHz")
    cases = []
    for isa in isas:
        for name, n, rows, only in shapes:
            for t in types:
                if (only is not None and t not in only) or n % K.block_size(t) != 0:
                    continue
                base = make_weights(t, rows, n, rng)
                copies = max(1, int(np.ceil(args.stream_mb * (1 << 20) / base.nbytes)))
                w = np.ascontiguousarray(np.tile(base, (copies, 1)))
                for m in ms:
                    x = rng.standard_normal((m, n)).astype(np.float32)
                    for layout in layouts:
                        packed = layout == "x16"
                        if packed and not (K.has_packed(t, isa) and rows % 16 == 0):
                            continue
                        # estimated scalar time may be huge: one probe decides
                        probe = K.time_matmul(t, w, x, n, rows, isa, True, 1, 0, packed)[1]
                        if probe > args.max_case_s:
                            log(f"{isa:7s} {t:5s} {layout:4s} {name:22s} M={m:<4d} skipped ({probe:.2f} s per call)")
                            continue
                        wall, s = time_case(t, w, x, n, rows, isa, args.min_time, args.reps, args.chunk, packed)
                        gbs = base.nbytes / s / 1e9
                        gops = 2.0 * n * rows * m / s / 1e9
                        log(
                            f"{isa:7s} {t:5s} {layout:4s} {name:22s} M={m:<4d} {s * 1e6:10.1f} us {gbs:7.2f} GB/s "
                            f"{gops:8.2f} GOP/s  (wall {wall * 1e6:.1f} us)"
                        )
                        cases.append(
                            {
                                "isa": isa,
                                "type": t,
                                "layout": layout,
                                "shape": name,
                                "n": n,
                                "rows": rows,
                                "m": m,
                                "us": round(s * 1e6, 2),
                                "wall_us": round(wall * 1e6, 2),
                                "gbs": round(gbs, 3),
                                "gops": round(gops, 3),
                            }
                        )
                del w
    ghz = mhz / 1000.0
    result = {
        "bench": "kernels",
        "threads": 1,
        "chunk": args.chunk,
        "shapes": shape_sets,
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
