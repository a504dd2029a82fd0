"""Plain numpy encoders for the weight types the `gguf` package can dequantize but not quantize
(Q4_K, Q5_K, Q6_K, IQ4_XS, IQ4_NL), so tiny test models can carry them.

They only need to produce valid blocks whose values track the input (simple per-sub-block
min/max or absmax scaling, no search): the tests compare the engine against a reference that
dequantizes the very same bytes with the `gguf` package, so these encoders' rounding choices never
enter a comparison. `encode(a, "Q4_K")` maps float32 rows [rows, n] to bytes [rows, row_bytes].
"""

from __future__ import annotations

import numpy as np

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _f16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


def _pack_scales_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 6-bit scales and 8 6-bit mins -> the 12 bytes of a Q4_K/Q5_K block (per super-block)."""
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _q45_k(x: np.ndarray, bits: int) -> np.ndarray:
    nsb = x.shape[0]
    levels = (1 << bits) - 1
    sub = x.reshape(nsb, 8, 32)
    lo = np.minimum(sub.min(axis=2), 0.0)
    hi = sub.max(axis=2)
    scale = (hi - lo) / levels
    mins = -lo
    d = _f16(scale.max(axis=1) / 63.0).astype(np.float32)
    dmin = _f16(mins.max(axis=1) / 63.0).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 63)
    m = np.clip(np.round(np.divide(mins, dmin[:, None], out=np.zeros_like(mins), where=dmin[:, None] > 0)), 0, 63)
    step = d[:, None] * sc
    q = np.clip(
        np.round(
            np.divide(
                sub + (dmin[:, None] * m)[..., None], step[..., None], out=np.zeros_like(sub), where=step[..., None] > 0
            )
        ),
        0,
        levels,
    ).astype(np.uint8)
    q = q.reshape(nsb, 4, 2, 32)  # (64-element chunk k, low/high nibble, l)
    qs = ((q[:, :, 0, :] & 15) | ((q[:, :, 1, :] & 15) << 4)).reshape(nsb, 128)
    head = np.concatenate(
        [
            d.astype(np.float16).view(np.uint8).reshape(nsb, 2),
            dmin.astype(np.float16).view(np.uint8).reshape(nsb, 2),
            _pack_scales_k4(sc.astype(np.uint8), m.astype(np.uint8)),
        ],
        axis=1,
    )
    if bits == 4:
        return np.concatenate([head, qs], axis=1)
    qh = np.zeros((nsb, 32), np.uint8)  # bit 2k (+1 for the high nibble) of qh[l]
    for k in range(4):
        for h in range(2):
            qh |= ((q[:, k, h, :] >> 4) & 1).astype(np.uint8) << (2 * k + h)
    return np.concatenate([head, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nsb = x.shape[0]
    sub = x.reshape(nsb, 16, 16)
    scale = np.abs(sub).max(axis=2) / 31.0
    d = _f16(scale.max(axis=1) / 127.0).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), -128, 127)
    step = d[:, None] * sc
    q = (
        np.clip(
            np.round(np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] != 0)) + 32, 0, 63
        )
        .astype(np.uint8)
        .reshape(nsb, 256)
    )
    ql = np.zeros((nsb, 128), np.uint8)
    qh = np.zeros((nsb, 64), np.uint8)
    for half in range(2):
        e = q[:, 128 * half : 128 * half + 128]
        for j in range(64):
            ql[:, 64 * half + j] = (e[:, j] & 15) | ((e[:, 64 + j] & 15) << 4)
        for j in range(32):
            qh[:, 32 * half + j] = (
                (e[:, j] >> 4) | ((e[:, 32 + j] >> 4) << 2) | ((e[:, 64 + j] >> 4) << 4) | ((e[:, 96 + j] >> 4) << 6)
            )
    return np.concatenate(
        [ql, qh, sc.astype(np.int8).view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(nsb, 2)], axis=1
    )


def _nearest(v: np.ndarray) -> np.ndarray:
    """Index of the nearest table value for each element of v (already divided by the scale)."""
    return np.abs(v[..., None] - KVALUES).argmin(axis=-1).astype(np.uint8)


def _iq4_nl(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    d = _f16(np.abs(x).max(axis=1) / 127.0).astype(np.float32)
    q = _nearest(np.divide(x, d[:, None], out=np.zeros_like(x), where=d[:, None] > 0))
    qs = (q[:, :16] & 15) | (q[:, 16:] << 4)
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(nb, 2), qs], axis=1)


def _iq4_xs(x: np.ndarray) -> np.ndarray:
    nsb = x.shape[0]
    sub = x.reshape(nsb, 8, 32)
    scale = np.abs(sub).max(axis=2) / 127.0
    d = _f16(scale.max(axis=1) / 31.0).astype(np.float32)
    ls = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 31) + 32
    step = d[:, None] * (ls - 32)
    q = _nearest(np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] > 0))
    qs = ((q[:, :, :16] & 15) | (q[:, :, 16:] << 4)).reshape(nsb, 128)
    ls = ls.astype(np.uint16)
    scales_h = np.zeros(nsb, np.uint16)
    scales_l = np.zeros((nsb, 4), np.uint8)
    for j in range(8):
        scales_h |= ((ls[:, j] >> 4) & 3) << (2 * j)
        scales_l[:, j // 2] |= ((ls[:, j] & 15) << (4 * (j % 2))).astype(np.uint8)
    return np.concatenate(
        [d.astype(np.float16).view(np.uint8).reshape(nsb, 2), scales_h.view(np.uint8).reshape(nsb, 2), scales_l, qs],
        axis=1,
    )


ENCODERS = {
    "Q4_K": (256, lambda b: _q45_k(b, 4)),
    "Q5_K": (256, lambda b: _q45_k(b, 5)),
    "Q6_K": (256, _q6_k),
    "IQ4_XS": (256, _iq4_xs),
    "IQ4_NL": (32, _iq4_nl),
}


def encode(a: np.ndarray, type_name: str) -> np.ndarray:
    """float32 rows [rows, n] -> bytes [rows, row_bytes] of `type_name` (n a multiple of its block)."""
    block, fn = ENCODERS[type_name]
    rows, n = a.shape
    if n % block:
        raise ValueError(f"{type_name} rows need a multiple of {block} elements, got {n}")
    return fn(np.ascontiguousarray(a, np.float32).reshape(-1, block)).reshape(rows, -1)
