"""The weight types real small-model files mix (Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K, IQ4_XS) and
the K-quants' activation type Q8_K.

The truth for the block layouts is the `gguf` package's numpy dequantize, an implementation
independent of ours: our reference dequantize must match it bit for bit on random blocks. The
scalar dot products are then checked against fp32 products of those dequantized weights, and every
ISA's kernels (file layout and x16 packed) against the scalar ones, at odd sizes and at the ends of
the quant ranges; packed results must not depend on the batch (bitwise).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from batch_invariance import assert_packed_batch_invariant
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from tinyserve import _core

K = _core.kernels
ISAS = _core.available_isas()

NEW_TYPES = ["Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]
SUPER = {"Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}  # 256-element super-blocks, Q8_K activations
# Byte offsets of each type's fp16 scale fields inside a block (d; m or dmin).
F16_FIELDS = {"Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}
# Byte offset and length of the quants (every byte of which may take any value).
QUANTS = {
    "Q5_0": (2, 20),
    "Q5_1": (4, 20),
    "IQ4_NL": (2, 16),
    "Q4_K": (4, 140),
    "Q5_K": (4, 172),
    "Q6_K": (0, 208),
    "IQ4_XS": (2, 134),
}

# Named tolerances (as in test_kernels.py). Two fp32 sums of the same products in different orders
# differ by at most ~n*eps*sum|terms|; 2e-6 * sum|terms| leaves room for n up to ~1600 terms.
REL_ACC = 2e-6
# Activation quantization: |x - q*d| <= d/2 (+ fp16 rounding of d for the 32-element types) < 0.57 d.
ACT_QUANT_ERR = 0.57


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def block_size(name: str) -> int:
    return 256 if name in SUPER else 32


def random_weights(name: str, rows: int, n: int, seed: int, extreme: str = "") -> np.ndarray:
    """Rows of random blocks: random bytes everywhere (all quants, scales, mins, high bits) with
    finite fp16 scales of realistic size. extreme='max'/'min' sets every quant byte to 0xFF/0x00."""
    r = rng(seed)
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    nb = rows * (n // bs)
    b = r.integers(0, 256, (nb, ts), dtype=np.uint8)
    if extreme:
        off, ln = QUANTS[name]
        b[:, off : off + ln] = 0xFF if extreme == "max" else 0x00
    for o in F16_FIELDS[name]:
        d = (r.standard_normal(nb) * 0.02).astype(np.float16)
        if name in SUPER:
            d = np.abs(d)  # real K-quant files have positive d and dmin
        b[:, o : o + 2] = d.view(np.uint8).reshape(nb, 2)
    return b.reshape(rows, -1)


def gguf_dequantize(name: str, w: np.ndarray, n: int) -> np.ndarray:
    return gguf.quants.dequantize(w, GGMLQuantizationType[name]).reshape(w.shape[0], n).astype(np.float32)


def acts(m: int, n: int, seed: int) -> np.ndarray:
    r = rng(seed)
    x = r.standard_normal((m, n)).astype(np.float32)
    x[:, ::13] *= 10  # outlier channels: block scales differ a lot
    return x


# ---- layouts: our reference dequantize vs the gguf package ------------------------------------


@pytest.mark.parametrize("name", NEW_TYPES)
def test_type_facts(name: str) -> None:
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    assert K.block_size(name) == bs and K.type_size(name) == ts
    assert K.vec_dot_type(name) == ("Q8_K" if name in SUPER else "Q8_1" if name == "Q5_1" else "Q8_0")
    assert name in K.type_names()


@pytest.mark.parametrize("name", NEW_TYPES)
def test_dequantize_bit_exact_with_gguf(name: str) -> None:
    for seed, extreme in [(1, ""), (2, ""), (3, "max"), (4, "min")]:
        n = 3 * block_size(name)
        w = random_weights(name, 17, n, seed, extreme)
        ours = K.dequantize(name, w, n)
        ref = gguf_dequantize(name, w, n)
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{name} seed={seed} {extreme}"


@pytest.mark.parametrize("name", ["Q5_0", "Q5_1"])
def test_quantize_bit_exact_with_gguf(name: str) -> None:
    r = rng(5)
    for n in [32, 96, 544]:
        x = np.stack(
            [
                r.standard_normal(n),
                r.standard_normal(n) * 1e-3,
                np.zeros(n),
                np.full(n, -2.5),
                np.round(r.standard_normal(n) * 8) / 8,
            ]
        ).astype(np.float32)
        ref = gguf.quants.quantize(x, GGMLQuantizationType[name]).view(np.uint8).reshape(x.shape[0], -1)
        assert np.array_equal(K.quantize(name, x), ref), f"{name} n={n}"


def q8_k_numpy(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_K, written independently in numpy: per 256 elements, iscale = -127 / (the signed
    value of largest magnitude), q = round-half-even(iscale * x) capped at 127, d = 1 / iscale,
    bsums = sums of each 16 quants. Returns the raw blocks."""
    blocks = x.reshape(-1, 256).astype(np.float32)
    out = np.zeros((blocks.shape[0], 292), np.uint8)
    for i, b in enumerate(blocks):
        amax_i = int(np.argmax(np.abs(b)))  # first of the largest magnitudes
        mx = b[amax_i]
        if mx == 0:
            continue
        iscale = np.float32(-127.0) / mx
        q = np.minimum(np.rint(iscale * b), 127).astype(np.int8)
        out[i, :4] = np.array([np.float32(1.0) / iscale], np.float32).view(np.uint8)
        out[i, 4:260] = q.view(np.uint8)
        out[i, 260:] = q.astype(np.int16).reshape(16, 16).sum(axis=1).astype(np.int16).view(np.uint8)
    return out.reshape(x.shape[0], -1)


def test_q8_k_matches_numpy() -> None:
    r = rng(6)
    n = 768
    x = np.stack(
        [
            r.standard_normal(n),
            -np.abs(r.standard_normal(n)),
            np.zeros(n),
            np.full(n, 0.5),
            np.round(r.standard_normal(n) * 4) / 4,
            r.standard_normal(n) * 1e-20,
        ]
    ).astype(np.float32)
    ours = K.quantize("Q8_K", x)
    assert np.array_equal(ours, q8_k_numpy(x))
    err = np.abs(K.dequantize("Q8_K", ours, n) - x)
    step = np.repeat(np.abs(x).reshape(x.shape[0], -1, 256).max(axis=2) / 127.0, 256, axis=1)
    assert (err <= 0.5 * step * (1 + 1e-5) + 1e-30).all()


@pytest.mark.parametrize("isa", ISAS)
def test_q8_k_from_float_matches_reference(isa: str) -> None:
    for n in [256, 768, 2560]:
        x = acts(5, n, seed=n)
        assert np.array_equal(K.from_float("Q8_K", x, isa), K.quantize("Q8_K", x)), f"{isa} n={n}"


def test_activation_type_is_not_a_weight_type() -> None:
    with pytest.raises(ValueError, match="activation type"):
        K.matmul("Q8_K", np.zeros((1, 292), np.uint8), np.ones((1, 256), np.float32), 256, isa="scalar")


# ---- the x16 packed layout -------------------------------------------------------------------


@pytest.mark.parametrize("name", NEW_TYPES)
def test_pack_roundtrip_takes_the_file_bytes(name: str) -> None:
    n = 2 * block_size(name)
    w = random_weights(name, 32, n, seed=7)
    p = K.pack(name, w, n)
    assert p.shape == (2, 16 * w.shape[1])  # exactly the original bytes
    for g in range(2):
        for r in range(16):
            assert np.array_equal(K.unpack_row(name, p[g], n, r), w[16 * g + r]), (name, g, r)
    # the first fp16 section holds each row's first fp16 field, in row order
    o = F16_FIELDS[name][0]
    assert np.array_equal(p[0, :32].reshape(16, 2), w[:16, o : o + 2])


# ---- dot products: scalar vs fp32, every ISA vs scalar ----------------------------------------


def _bounds(name: str, w: np.ndarray, x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(tolerance vs the scalar kernel, bound vs the fp32 product) per (activation row, weight row).

    vs scalar: the same integer sums scaled in a different float order, so REL_ACC times the sum of
    the magnitudes of the terms. For Q4_K/Q5_K the scale and min parts are separate terms (they may
    cancel), so their magnitudes are taken apart: dequantize with dmin = 0 and with d = 0.
    vs fp32: that, plus the activation quantization error times |w|."""
    wd = np.abs(gguf_dequantize(name, w, n)).astype(np.float64)
    if name in ("Q4_K", "Q5_K"):
        bs = GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
        blk = w.reshape(w.shape[0], -1, bs)
        only_d, only_m = blk.copy(), blk.copy()
        only_d[:, :, 2:4] = 0
        only_m[:, :, 0:2] = 0
        terms = np.abs(gguf_dequantize(name, only_d.reshape(w.shape), n)).astype(np.float64) + np.abs(
            gguf_dequantize(name, only_m.reshape(w.shape), n)
        ).astype(np.float64)
    else:
        terms = wd
    at = K.vec_dot_type(name)
    xq = K.dequantize(at, K.quantize(at, x), n).astype(np.float64)
    tol_ref = REL_ACC * (np.abs(xq) @ terms.T) + 1e-30
    m = x.shape[0]
    ab = 256 if at == "Q8_K" else 32
    step = np.repeat(np.abs(x).reshape(m, n // ab, ab).max(axis=2).astype(np.float64) / 127.0, ab, axis=1)
    bound = tol_ref + REL_ACC * (np.abs(x).astype(np.float64) @ terms.T) + ACT_QUANT_ERR * (step @ wd.T)
    return tol_ref, bound


def _sizes(name: str) -> list[int]:
    return [256, 768, 1280] if name in SUPER else [32, 96, 224, 544, 1568]  # odd block counts


@pytest.mark.parametrize("name", NEW_TYPES)
def test_scalar_dot_vs_fp32(name: str) -> None:
    for i, n in enumerate(_sizes(name)):
        w = random_weights(name, 7, n, seed=10 + i)
        wd = gguf_dequantize(name, w, n).astype(np.float64)
        for m in [1, 3]:
            x = acts(m, n, seed=20 + i + m)
            y = K.matmul(name, w, x, n, isa="scalar")
            _, bound = _bounds(name, w, x, n)
            err = np.abs(y - x.astype(np.float64) @ wd.T)
            assert (err <= bound).all(), f"{name} n={n} m={m}: max err {err.max()}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", NEW_TYPES)
def test_file_layout_matmul_vs_scalar(isa: str, name: str) -> None:
    """The file-layout kernels of every ISA (vec_dot and gemm) against the scalar reference."""
    for i, n in enumerate(_sizes(name)):
        rows = [1, 7, 33][i % 3]
        w = random_weights(name, rows, n, seed=30 + i)
        for m in [1, 2, 5, 9]:
            x = acts(m, n, seed=40 + 10 * i + m)
            ref = K.matmul(name, w, x, n, isa="scalar")
            tol, _ = _bounds(name, w, x, n)
            for use_gemm in (True, False):
                y = K.matmul(name, w, x, n, isa=isa, use_gemm=use_gemm)
                err = np.abs(y.astype(np.float64) - ref)
                assert (err <= tol).all(), f"{isa} {name} n={n} m={m} gemm={use_gemm}: max err {err.max()}"


PACKED = [(isa, name) for isa in ISAS for name in NEW_TYPES if K.has_packed(name, isa)]


@pytest.mark.parametrize("isa,name", PACKED)
def test_packed_matmul_vs_scalar_and_fp32(isa: str, name: str) -> None:
    for i, n in enumerate(_sizes(name)):
        rows = [16, 48][i % 2]
        w = random_weights(name, rows, n, seed=50 + i)
        wd = gguf_dequantize(name, w, n).astype(np.float64)
        for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 17]:
            x = acts(m, n, seed=60 + 10 * i + m)
            y = K.matmul(name, w, x, n, isa=isa, packed=True)
            assert y.shape == (m, rows) and y.dtype == np.float32
            ref = K.matmul(name, w, x, n, isa="scalar")
            tol, bound = _bounds(name, w, x, n)
            err_ref = np.abs(y.astype(np.float64) - ref)
            assert (err_ref <= tol).all(), f"{isa} {name} n={n} m={m}: packed vs scalar max err {err_ref.max()}"
            err = np.abs(y - x.astype(np.float64) @ wd.T)
            assert (err <= bound).all(), f"{isa} {name} n={n} m={m}: packed vs fp32 max err {err.max()}"


@pytest.mark.parametrize("isa,name", PACKED)
def test_packed_extreme_quants(isa: str, name: str) -> None:
    """Every quant at the top (or bottom) of its range, scales and high bits random, against
    activations at +-127 after quantization: the largest integer sums the kernels can see."""
    n = 2 * block_size(name) if name in SUPER else 224
    r = rng(70)
    for extreme in ("max", "min"):
        w = random_weights(name, 32, n, seed=71, extreme=extreme)
        x = np.stack([np.ones(n), -np.ones(n), np.where(r.random(n) < 0.5, 1.0, -1.0)]).astype(np.float32)
        y = K.matmul(name, w, x, n, isa=isa, packed=True)
        ref = K.matmul(name, w, x, n, isa="scalar")
        tol, _ = _bounds(name, w, x, n)
        err = np.abs(y.astype(np.float64) - ref)
        assert (err <= tol).all(), f"{isa} {name} {extreme}: packed vs scalar max err {err.max()}"


@pytest.mark.parametrize("isa,name", PACKED)
def test_packed_results_never_depend_on_the_batch(isa: str, name: str) -> None:
    for i, n in enumerate(_sizes(name)[:3]):
        w = random_weights(name, 64, n, seed=80 + i)
        x = acts(19, n, seed=90 + i)
        assert_packed_batch_invariant(isa, name, w, x, n, chunks=(16,))
