"""Kernel tests: reference quantization vs gguf-py (ggml's reference), every ISA's matmul vs the
scalar reference vs plain fp32, gemm bit-identical to vec_dot (batch invariance), ops vs numpy.

Sizes are odd on purpose (odd block counts, odd row counts, odd activation-row counts) so every
tail loop and every remainder tile runs.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from batch_invariance import assert_packed_batch_invariant
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from tinyserve import _core

K = _core.kernels
ISAS = _core.available_isas()
QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1"]
FLOAT_TYPES = ["F32", "F16", "BF16"]

# Named tolerances.
# Two fp32 sums of the same products in different orders differ by at most ~n*eps*sum|terms|;
# we allow 2e-6 * sum|w*x| (n up to ~1600 terms, pairwise/blocked sums are far better than n*eps).
REL_ACC = 2e-6
# Activation quantization to int8: |x - q*d16| <= d/2 + 127*d*2^-11 (d rounded to fp16) < 0.57 d,
# with d = amax(block)/127; so |y_quant - y_fp32| <= sum_j |w_j| * 0.57 * d_block(j).
ACT_QUANT_ERR = 0.57
# BF16 activations are not used (F16/BF16 weights take fp32 activations), so the float types only
# see accumulation-order differences.

QUANT_NS = [32, 96, 224, 544, 1568]  # 1, 3, 7, 17, 49 blocks
FLOAT_NS = [1, 7, 33, 100, 577]
ROWS = [1, 3, 7, 33]
ACT_ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17]


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def np_f16_bits(x: np.ndarray) -> np.ndarray:
    """numpy's fp32 -> fp16 (round to nearest even; overflow to inf is intended here)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(np.float16).view(np.uint16)


def gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def gguf_quantize(name: str, x: np.ndarray) -> np.ndarray:
    q = gguf.quants.quantize(x, gguf_type(name))
    return q.view(np.uint8).reshape(x.shape[0], -1)


# ---- type facts -------------------------------------------------------------------------------


def test_type_facts_match_gguf() -> None:
    names = K.type_names()
    for t in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q8_1"]:
        assert t in names
    for t in GGMLQuantizationType:
        if t.name not in {"Q8_1", "NVFP4", "Q1_0"} and t.value < 64:
            bs, ts = GGML_QUANT_SIZES[t]
            assert K.block_size(t.name) == bs, t.name
            assert K.type_size(t.name) == ts, t.name
    # gguf-py still lists the old float-scaled Q8_1 (40 bytes); ggml's block_q8_1 is 2 halves + 32.
    assert K.type_size("Q8_1") == 36
    assert K.vec_dot_type("Q4_0") == "Q8_0"
    assert K.vec_dot_type("Q4_1") == "Q8_1"
    assert K.vec_dot_type("Q8_0") == "Q8_0"
    for t in FLOAT_TYPES:
        assert K.vec_dot_type(t) == "F32"


def test_bad_arguments_raise() -> None:
    x = np.ones((2, 32), np.float32)
    with pytest.raises(ValueError, match="NOPE"):
        K.quantize("NOPE", x)
    with pytest.raises(ValueError, match="multiple"):
        K.quantize("Q4_0", np.ones((2, 33), np.float32))
    with pytest.raises(ValueError):
        K.dequantize("Q8_0", np.zeros((2, 33), np.uint8), 32)
    w = K.quantize("Q8_0", x)
    with pytest.raises(ValueError):
        K.matmul("Q8_0", w, np.ones((2, 64), np.float32), 32)
    with pytest.raises(ValueError, match="unknown ISA"):
        K.matmul("Q8_0", w, x, 32, isa="sse9")
    with pytest.raises(ValueError, match="unknown op"):
        K.ops("no_such_op", "")
    with pytest.raises(ValueError):
        K.ops("dot_f32", "", np.ones(3, np.float32), np.ones(4, np.float32))


@pytest.mark.parametrize("name", ["neon", "avx512", "avx2"])
def test_unavailable_isa_raises(name: str) -> None:
    if name in ISAS:
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match="not available"):
        K.matmul("F32", np.zeros((1, 4), np.uint8), np.ones((1, 1), np.float32), 1, isa=name)


def _isa_in_subprocess(value: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TINYSERVE_ISA=value)
    code = "from tinyserve import _core\nprint(_core.isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_isa_env_override() -> None:
    for isa in ISAS:
        p = _isa_in_subprocess(isa)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == isa
    p = _isa_in_subprocess("bogus")
    assert p.returncode != 0
    assert "TINYSERVE_ISA='bogus'" in p.stderr and "scalar" in p.stderr


def test_best_isa_is_active() -> None:
    if "TINYSERVE_ISA" in os.environ:
        pytest.skip("TINYSERVE_ISA is set")
    order = ["avx512", "avx2", "neon", "scalar"]
    assert _core.isa() == next(i for i in order if i in ISAS)


# ---- fp16 / bf16 --------------------------------------------------------------------------------


def test_fp16_to_fp32_all_values() -> None:
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = K.dequantize("F16", bits.view(np.uint8).reshape(1, -1), 1 << 16)[0]
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))


def _awkward_floats(seed: int) -> np.ndarray:
    r = rng(seed)
    parts = [
        r.standard_normal(4096).astype(np.float32),
        (r.standard_normal(4096) * 1e-5).astype(np.float32),  # fp16 subnormals
        (r.standard_normal(4096) * 1e-8).astype(np.float32),  # underflow
        (r.standard_normal(4096) * 3e4).astype(np.float32),  # near fp16 overflow
        r.integers(0, 1 << 32, 8192, dtype=np.uint64).astype(np.uint32).view(np.float32),
        np.array(
            [
                0.0,
                -0.0,
                65504,
                65519.99,
                65520,
                -65520,
                np.inf,
                -np.inf,
                2.0**-24,
                2.0**-25,
                3 * 2.0**-26,
                1e38,
                -1e-38,
            ],
            np.float32,
        ),
        # exact ties between two fp16 values
        (np.arange(1, 2049, dtype=np.float32) + 0.5) * np.float32(2.0**-10),
    ]
    x = np.concatenate(parts)
    return x[~np.isnan(x)]


def test_fp32_to_fp16_rounding_matches_numpy() -> None:
    x = _awkward_floats(1)
    ours = K.quantize("F16", x.reshape(1, -1)).view(np.uint16)[0]
    assert np.array_equal(ours, np_f16_bits(x))
    nan = K.quantize("F16", np.array([[np.nan, -np.nan]], np.float32)).view(np.float16)
    assert np.isnan(nan).all()


def test_bf16_matches_gguf() -> None:
    x = np.concatenate([_awkward_floats(2), np.array([np.nan], np.float32)]).reshape(1, -1)
    assert np.array_equal(K.quantize("BF16", x), gguf_quantize("BF16", x))
    q = K.quantize("BF16", x)
    assert np.array_equal(
        K.dequantize("BF16", q, x.shape[1]), gguf.quants.dequantize(q, gguf_type("BF16")).reshape(1, -1), equal_nan=True
    )


@pytest.mark.parametrize("isa", ISAS)
def test_f32_to_f16_op_matches_numpy(isa: str) -> None:
    x = _awkward_floats(3)[:20001]
    ours = K.ops("f32_to_f16", isa, x)
    assert np.array_equal(ours, np_f16_bits(x))


# ---- reference quantization vs gguf-py -----------------------------------------------------------


def _quant_inputs(seed: int, n: int) -> np.ndarray:
    r = rng(seed)
    rows = [
        r.standard_normal(n),
        r.standard_normal(n) * 1e-3,
        r.uniform(-1, 1, n) * 100,
        np.zeros(n),
        np.full(n, 0.75),
        np.full(n, -2.5),
        np.round(r.standard_normal(n) * 8) / 8,  # many exact ties
        np.where(r.random(n) < 0.1, 50.0, r.standard_normal(n)),  # outliers
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", QUANT_TYPES + ["F16"])
def test_quantize_bit_exact_with_gguf(name: str) -> None:
    for n in [32, 96, 544]:
        x = _quant_inputs(n, n)
        ours = K.quantize(name, x)
        ref = gguf_quantize(name, x)
        assert ours.shape == ref.shape
        assert np.array_equal(ours, ref), f"{name} n={n}"


@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_dequantize_matches_gguf(name: str) -> None:
    n = 544
    x = _quant_inputs(7, n)
    q = gguf_quantize(name, x)
    ours = K.dequantize(name, q, n)
    ref = gguf.quants.dequantize(q, gguf_type(name)).reshape(x.shape).astype(np.float32)
    assert np.array_equal(ours, ref)


def test_q8_1_layout() -> None:
    n = 96
    x = _quant_inputs(11, n)
    q1 = K.quantize("Q8_1", x)
    q0 = K.quantize("Q8_0", x)
    assert q1.shape == (x.shape[0], 3 * 36)
    b1 = q1.reshape(-1, 36)
    b0 = q0.reshape(-1, 34)
    assert np.array_equal(b1[:, :2], b0[:, :2])  # same d
    assert np.array_equal(b1[:, 4:], b0[:, 2:])  # same quants
    d = (np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)).astype(np.float32)  # unrounded
    s = b1[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    sums = b1[:, 4:].view(np.int8).astype(np.int32).sum(axis=1)
    assert np.array_equal(s, (sums.astype(np.float32) * d).astype(np.float16).astype(np.float32))
    assert np.allclose(K.dequantize("Q8_1", q1, n), K.dequantize("Q8_0", q0, n))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", ["Q8_0", "Q8_1", "F16", "BF16", "F32"])
def test_from_float_matches_reference(isa: str, name: str) -> None:
    """Activation quantization on every ISA is bit-identical to the reference."""
    for n in [32, 96, 544, 1568]:
        x = _quant_inputs(n + 1, n)
        assert np.array_equal(K.from_float(name, x, isa), K.quantize(name, x)), f"{name} n={n}"


# ---- matmul: every ISA vs scalar vs fp32 ---------------------------------------------------------


def _weights(name: str, rows: int, n: int, seed: int) -> np.ndarray:
    r = rng(seed)
    w = r.standard_normal((rows, n)).astype(np.float32)
    w[:, : min(n, 5)] *= 4  # a few larger columns, as in real weight rows
    return K.quantize(name, w)


def _acts(m: int, n: int, seed: int) -> np.ndarray:
    r = rng(seed)
    x = r.standard_normal((m, n)).astype(np.float32)
    x[:, ::13] *= 10  # outlier channels make the int8 block scales differ a lot
    return x


def _act_error_bound(name: str, wd: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Upper bound of |y_isa - y_fp32| per (c, r): activation quantization plus accumulation."""
    m, n = x.shape
    absw = np.abs(wd).astype(np.float64)
    acc = REL_ACC * (np.abs(x).astype(np.float64) @ absw.T) + 1e-30
    if name in FLOAT_TYPES:
        return acc
    amax = np.abs(x).reshape(m, n // 32, 32).max(axis=2).astype(np.float64)
    step = np.repeat(amax / 127.0, 32, axis=1)  # [m, n] block step per element
    return acc + ACT_QUANT_ERR * (step @ absw.T)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_matmul_vs_scalar_and_fp32(isa: str, name: str) -> None:
    ns = QUANT_NS if name in QUANT_TYPES else FLOAT_NS
    for i, n in enumerate(ns):
        rows = ROWS[i % len(ROWS)] if n > 100 else 33
        w = _weights(name, rows, n, seed=i)
        wd = K.dequantize(name, w, n)
        for m in ACT_ROWS:
            x = _acts(m, n, seed=100 * i + m)
            y = K.matmul(name, w, x, n, isa=isa)
            assert y.shape == (m, rows) and y.dtype == np.float32
            ref = K.matmul(name, w, x, n, isa="scalar")
            # ISA vs scalar: same activation quants, only the summation order differs
            xq = (
                x if name in FLOAT_TYPES else K.dequantize(K.vec_dot_type(name), K.quantize(K.vec_dot_type(name), x), n)
            )
            tol_ref = REL_ACC * (np.abs(xq).astype(np.float64) @ np.abs(wd).T.astype(np.float64)) + 1e-30
            err_ref = np.abs(y.astype(np.float64) - ref)
            assert (err_ref <= tol_ref).all(), (
                f"{isa} {name} n={n} rows={rows} m={m}: vs scalar max err {err_ref.max()}"
            )
            # vs plain fp32 matmul of the dequantized weights with the unquantized activations
            exact = x.astype(np.float64) @ wd.T.astype(np.float64)
            err = np.abs(y - exact)
            bound = _act_error_bound(name, wd, x)
            assert (err <= bound).all(), f"{isa} {name} n={n} rows={rows} m={m}: vs fp32 max err {err.max()}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", QUANT_TYPES + FLOAT_TYPES)
def test_gemm_bit_identical_to_vec_dot(isa: str, name: str) -> None:
    """Batch invariance: a (weight row, activation row) result never depends on the tile or the
    batch it was computed in."""
    ns = [32, 224, 576, 1568] if name in QUANT_TYPES else [1, 33, 577]
    for i, n in enumerate(ns):
        rows = 37
        w = _weights(name, rows, n, seed=50 + i)
        x = _acts(17, n, seed=60 + i)
        full = K.matmul(name, w, x, n, isa=isa, use_gemm=True)
        pairs = K.matmul(name, w, x, n, isa=isa, use_gemm=False)
        assert np.array_equal(full, pairs), f"{isa} {name} n={n}: gemm != vec_dot"
        for m in [1, 2, 3, 5, 8, 9]:
            for off in [0, 1, 6]:
                sub = K.matmul(name, w[off:], x[off : off + m], n, isa=isa)
                assert np.array_equal(sub, full[off : off + m, off:]), f"{isa} {name} n={n} m={m} off={off}"


# ---- the x16 packed layout -----------------------------------------------------------------------

PACKED_ISAS = [(isa, name) for isa in ISAS for name in QUANT_TYPES if K.has_packed(name, isa)]


@pytest.mark.parametrize("name", QUANT_TYPES)
def test_pack_roundtrip_and_layout(name: str) -> None:
    n = 96
    w = _weights(name, 32, n, seed=3)
    p = K.pack(name, w, n)
    assert p.shape == (2, 16 * w.shape[1])  # the packed layout takes exactly the original bytes
    for g in range(2):
        for r in range(16):
            assert np.array_equal(K.unpack_row(name, p[g], n, r), w[16 * g + r])
    # chunk j of block 0 holds quant bytes 4j..4j+3 of each of the 16 rows, in row order
    scales = 2 if name == "Q4_1" else 1
    qs_off = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[name]
    chunk0 = p[0, 32 * scales : 32 * scales + 64].reshape(16, 4)
    expect = w[:16, qs_off : qs_off + 4]
    assert np.array_equal(chunk0, expect ^ 0x80 if name == "Q8_0" else expect)
    d = p[0, :32].view(np.float16)
    assert np.array_equal(d, w[:16, :2].copy().view(np.float16)[:, 0])


def test_pack_rejects_bad_input() -> None:
    w = _weights("Q4_0", 16, 64, seed=4)
    with pytest.raises(ValueError, match="multiple|16"):
        K.pack("Q4_0", w[:15], 64)
    with pytest.raises(ValueError, match="packed layout"):
        K.pack("F16", np.zeros((16, 128), np.uint8), 64)
    with pytest.raises(ValueError):
        K.unpack_row("Q4_0", K.pack("Q4_0", w, 64)[0], 64, 16)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="multiple of 16"):
        K.matmul("Q4_0", w[:15], x, 64, isa="scalar" if not PACKED_ISAS else PACKED_ISAS[0][0], packed=True)
    with pytest.raises(ValueError, match="no packed kernel"):
        K.matmul("Q4_0", w, x, 64, isa="scalar", packed=True)


@pytest.mark.parametrize("isa,name", PACKED_ISAS)
def test_packed_matmul_vs_scalar_and_fp32(isa: str, name: str) -> None:
    for i, n in enumerate(QUANT_NS):
        rows = [16, 48][i % 2]
        w = _weights(name, rows, n, seed=200 + i)
        wd = K.dequantize(name, w, n)
        for m in ACT_ROWS:
            x = _acts(m, n, seed=300 + 10 * i + m)
            y = K.matmul(name, w, x, n, isa=isa, packed=True)
            assert y.shape == (m, rows) and y.dtype == np.float32
            ref = K.matmul(name, w, x, n, isa="scalar")
            xq = K.dequantize(K.vec_dot_type(name), K.quantize(K.vec_dot_type(name), x), n)
            tol_ref = REL_ACC * (np.abs(xq).astype(np.float64) @ np.abs(wd).T.astype(np.float64)) + 1e-30
            err_ref = np.abs(y.astype(np.float64) - ref)
            assert (err_ref <= tol_ref).all(), f"{isa} {name} n={n} m={m}: packed vs scalar max err {err_ref.max()}"
            err = np.abs(y - x.astype(np.float64) @ wd.T.astype(np.float64))
            assert (err <= _act_error_bound(name, wd, x)).all(), f"{isa} {name} n={n} m={m}: vs fp32"


@pytest.mark.parametrize("isa,name", PACKED_ISAS)
def test_packed_results_never_depend_on_the_batch(isa: str, name: str) -> None:
    """Batch invariance on the packed path: every tile shape, chunk of rows and batch gives a
    (weight row, activation row) pair the same bits as computing it alone."""
    for i, n in enumerate([32, 224, 576, 1568]):
        w = _weights(name, 64, n, seed=70 + i)
        x = _acts(19, n, seed=80 + i)
        assert_packed_batch_invariant(isa, name, w, x, n, chunks=(16, 32))


@pytest.mark.parametrize("isa,name", PACKED_ISAS)
def test_packed_extreme_quants_are_exact(isa: str, name: str) -> None:
    """Quants at the ends of their range against activations at +-127 with matching signs: the
    largest integer block sums there are (Q8_0 stored as q + 128 would saturate a 16-bit pair sum)."""
    n, rows = 224, 32
    r = rng(90)
    w = _weights(name, rows, n, seed=91)
    qs_off = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[name]
    blk = w.reshape(rows, n // 32, -1)
    nq = blk.shape[2] - qs_off
    if name == "Q8_0":
        signs = np.where(r.random((rows, n // 32, nq)) < 0.5, 1, -1)
        signs[::2] = signs[0, 0]  # even rows: one sign pattern per block, repeated below in x
        blk[:, :, qs_off:] = np.where(signs > 0, 0x7F, 0x80).astype(np.uint8)  # 127 / -128
    else:
        blk[:, :, qs_off:] = r.choice(np.array([0xFF, 0x00, 0xF0, 0x0F], np.uint8), size=(rows, n // 32, nq))
        blk[::2, :, qs_off:] = 0xFF  # all nibbles 15
        signs = np.ones((rows, n // 32, 32), np.int64)
    w = blk.reshape(rows, -1)
    pattern = np.tile(signs[0, 0], n // len(signs[0, 0])).astype(np.float32)
    x = np.stack(
        [
            pattern,
            -pattern,
            np.ones(n, np.float32),
            -np.ones(n, np.float32),
            np.where(r.random(n) < 0.5, 1.0, -1.0).astype(np.float32),
        ]
    )
    y = K.matmul(name, w, x, n, isa=isa, packed=True)
    ref = K.matmul(name, w, x, n, isa="scalar")
    wd = K.dequantize(name, w, n)
    xq = K.dequantize(K.vec_dot_type(name), K.quantize(K.vec_dot_type(name), x), n)
    tol = REL_ACC * (np.abs(xq).astype(np.float64) @ np.abs(wd).T.astype(np.float64)) + 1e-30
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= tol).all(), f"{isa} {name}: packed vs scalar max err {err.max()}"


# ---- ops ----------------------------------------------------------------------------------------

OPS_NS = [1, 7, 16, 33, 64, 65, 576, 1537]


@pytest.mark.parametrize("isa", ISAS)
def test_ops_vs_numpy(isa: str) -> None:
    r = rng(5)
    for n in OPS_NS:
        x = r.standard_normal(n).astype(np.float32)
        y = r.standard_normal(n).astype(np.float32)
        h = (r.standard_normal(n) * 2).astype(np.float16)
        dots = np.abs(h.astype(np.float64) * y).sum()
        got = K.ops("dot_f16_f32", isa, h, y)
        assert abs(got - float(h.astype(np.float64) @ y)) <= REL_ACC * dots + 1e-30, n
        got = K.ops("dot_f16_f32", isa, h.view(np.uint16), y)
        assert abs(got - float(h.astype(np.float64) @ y)) <= REL_ACC * dots + 1e-30, n

        got = K.ops("dot_f32", isa, x, y)
        assert abs(got - float(x.astype(np.float64) @ y)) <= REL_ACC * np.abs(x * y).sum() + 1e-30, n

        a = 0.37
        ax = K.ops("axpy_f16", isa, a, h, y)
        ref = y.astype(np.float64) + a * h.astype(np.float64)
        assert np.allclose(ax, ref, rtol=2e-7, atol=1e-6), n

        w = r.standard_normal(n).astype(np.float32)
        eps = 1e-5
        xs = x * 30
        got = K.ops("rmsnorm", isa, xs, w, eps)
        x64 = xs.astype(np.float64)
        ref = x64 / np.sqrt(np.mean(x64 * x64) + eps) * w
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-6), n

        g = (r.standard_normal(n) * 6).astype(np.float32)
        if n >= 5:
            g[:5] = [-100.0, 100.0, -20.0, 0.0, 88.0]  # exp overflow/underflow edges
        got = K.ops("swiglu", isa, g, y)
        g64 = g.astype(np.float64)
        ref = g64 / (1 + np.exp(-g64)) * y
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-6), n


# ---- attention over one block of the f16 KV cache -------------------------------------------------

ATTN_SHAPES = [
    (64, 1),
    (64, 2),
    (64, 3),
    (64, 4),
    (64, 7),
    (32, 3),
    (48, 2),
    (80, 1),
    (13, 2),
    (5, 3),
    (256, 4),
]  # (hd, nq)
ATTN_NS = [1, 3, 4, 5, 16, 17, 31]


def _attn_inputs(r: np.random.Generator, hd: int, nq: int, n: int, stride: int):
    q = r.standard_normal(nq * hd).astype(np.float32)
    kv = (r.standard_normal(max(n, 1) * stride) * 1.5).astype(np.float16)
    return q, kv


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,nq", ATTN_SHAPES)
def test_attn_scores_vs_numpy_and_reference(isa: str, hd: int, nq: int) -> None:
    r = rng(hd * 10 + nq)
    scale = 1.0 / np.sqrt(hd)
    for n in ATTN_NS:
        stride = hd * 3 + 1  # K rows interleave other KV heads, unaligned
        q, k = _attn_inputs(r, hd, nq, n, stride)
        ld = n + 2
        got = K.ops("attn_scores_f16", isa, hd, nq, q, k, stride, n, scale, ld).reshape(nq, ld)
        ref = K.ops("attn_scores_f16", "scalar", hd, nq, q, k, stride, n, scale, ld).reshape(nq, ld)
        k64 = np.stack([k[j * stride : j * stride + hd].astype(np.float64) for j in range(n)])
        q64 = q.astype(np.float64).reshape(nq, hd)
        exact = scale * (q64 @ k64.T)
        bound = REL_ACC * scale * (np.abs(q64) @ np.abs(k64).T) + 1e-30
        assert np.all(np.abs(got[:, :n] - exact) <= bound), (n, hd, nq)
        assert np.all(np.abs(ref[:, :n] - exact) <= bound), (n, hd, nq)
        assert np.all(got[:, n:] == 0), "wrote past n"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,nq", ATTN_SHAPES)
def test_attn_scores_independent_of_n_and_nq(isa: str, hd: int, nq: int) -> None:
    """Each score has the same bits whatever block length, slot or head group computed it."""
    r = rng(7 + hd + nq)
    n, stride, scale = 19, hd + 3, 0.125
    q, k = _attn_inputs(r, hd, nq, n, stride)
    full = K.ops("attn_scores_f16", isa, hd, nq, q, k, stride, n, scale, n).reshape(nq, n)
    for h in range(nq):  # one head at a time
        one = K.ops("attn_scores_f16", isa, hd, 1, q[h * hd : (h + 1) * hd], k, stride, n, scale, n)
        assert np.array_equal(one, full[h]), h
    for j0, j1 in [(0, 1), (1, 6), (5, 19), (18, 19), (2, 3)]:  # sub-ranges at every slot offset
        part = K.ops("attn_scores_f16", isa, hd, nq, q, k[j0 * stride :], stride, j1 - j0, scale, j1 - j0)
        assert np.array_equal(part.reshape(nq, j1 - j0), full[:, j0:j1]), (j0, j1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,nq", ATTN_SHAPES)
def test_attn_scores_rows_are_the_per_row_bits(isa: str, hd: int, nq: int) -> None:
    """The prefill tile (many query rows against one K block) gives each row's own bits."""
    r = rng(31 + hd + 3 * nq)
    stride, scale = hd * 2 + 5, 0.0625
    for nr in sorted({1, 2, max(1, 16 // nq)}):
        if nr * nq > 16:
            continue
        for n in ATTN_NS:
            q = r.standard_normal(nr * nq * hd).astype(np.float32)
            _, k = _attn_inputs(r, hd, nq, n, stride)
            ld = n + 3
            got = K.ops("attn_scores_f16_rows", isa, hd, nr, nq, q, k, stride, n, scale, ld).reshape(nr, nq, ld)
            for row in range(nr):
                qr = q[row * nq * hd : (row + 1) * nq * hd]
                one = K.ops("attn_scores_f16", isa, hd, nq, qr, k, stride, n, scale, ld).reshape(nq, ld)
                assert np.array_equal(got[row, :, :n], one[:, :n]), (nr, n, row)
                assert np.all(got[row, :, n:] == 0), "wrote past n"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,nq", ATTN_SHAPES)
def test_attn_accum_vs_numpy_and_split(isa: str, hd: int, nq: int) -> None:
    r = rng(100 + hd * 10 + nq)
    for n in ATTN_NS:
        stride = hd * 3 + 1
        _, v = _attn_inputs(r, hd, nq, n, stride)
        ld = n + 1
        p = r.random(nq * ld).astype(np.float32)
        out0 = r.standard_normal(nq * hd).astype(np.float32)
        got = K.ops("attn_accum_f16", isa, hd, nq, p, ld, v, stride, n, out0)
        ref = K.ops("attn_accum_f16", "scalar", hd, nq, p, ld, v, stride, n, out0)
        v64 = np.stack([v[j * stride : j * stride + hd].astype(np.float64) for j in range(n)])
        p64 = p.astype(np.float64).reshape(nq, ld)[:, :n]
        exact = out0.astype(np.float64).reshape(nq, hd) + p64 @ v64
        # n sequential fp32 roundings, each at most eps/2 of the running sum's magnitude bound
        bound = (n + 1) * 2.0**-24 * (np.abs(out0).reshape(nq, hd) + np.abs(p64) @ np.abs(v64)) + 1e-30
        assert np.all(np.abs(got.reshape(nq, hd) - exact) <= bound), (n, hd, nq)
        assert np.all(np.abs(ref.reshape(nq, hd) - exact) <= bound), (n, hd, nq)
        # positions split over consecutive calls give the same bits
        for cut in sorted({0, 1, n // 2, n - 1, n}):
            pa = p.reshape(nq, ld)
            a = K.ops(
                "attn_accum_f16",
                isa,
                hd,
                nq,
                np.ascontiguousarray(pa[:, :cut]).ravel() if cut else np.zeros(nq, np.float32),
                max(cut, 1),
                v,
                stride,
                cut,
                out0,
            )
            rest = np.ascontiguousarray(pa[:, cut:n]).ravel() if n - cut else np.zeros(nq, np.float32)
            b = K.ops("attn_accum_f16", isa, hd, nq, rest, max(n - cut, 1), v[cut * stride :], stride, n - cut, a)
            assert np.array_equal(b, got), (n, cut)
        # one head at a time gives the same bits as the head group
        for h in range(nq):
            one = K.ops(
                "attn_accum_f16", isa, hd, 1, p[h * ld : (h + 1) * ld], ld, v, stride, n, out0[h * hd : (h + 1) * hd]
            )
            assert np.array_equal(one, got[h * hd : (h + 1) * hd]), h


def test_attn_bad_arguments_raise() -> None:
    q = np.ones(64, np.float32)
    k = np.ones(64 * 3, np.float16)
    with pytest.raises(ValueError, match="too short"):
        K.ops("attn_scores_f16", "", 64, 1, q, k, 64, 4, 1.0, 4)
    with pytest.raises(ValueError, match="nq \\* hd"):
        K.ops("attn_scores_f16", "", 64, 2, q, k, 64, 3, 1.0, 3)
    with pytest.raises(ValueError, match="nq \\* ld"):
        K.ops("attn_accum_f16", "", 64, 1, np.ones(2, np.float32), 3, k, 64, 3, q)


# ---- attention over one block of the int8 KV cache (q8_0) ----------------------------------------

KV8_SHAPES = [
    (64, 16),
    (64, 32),
    (256, 16),
    (128, 16),
    (96, 16),
    (16, 4),
    (16, 16),
    (48, 7),
    (13, 5),
    (5, 17),
]  # (hd, bs)
KV8_NQ = [1, 2, 3, 4, 5, 7]


def _q8_gguf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x quantized by gguf-py's Q8_0 (bit-exact with ggml's reference), the row zero-padded
    to whole blocks of 32: (q int8 [m, hd], d fp16 [m, groups])."""
    m, hd = x.shape
    g = -(-hd // 32)
    padded = np.zeros((m, g * 32), np.float32)
    padded[:, :hd] = x
    b = gguf_quantize("Q8_0", padded).reshape(m, g, 34)
    return b[:, :, 2:].copy().view(np.int8).reshape(m, g * 32)[:, :hd], b[:, :, :2].copy().view(np.float16)[..., 0]


def _k_run_fields(run: np.ndarray, hd: int, bs: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(q [m, hd], d [m, groups]) read out of a K run by the layout kernels.h documents."""
    L = K.kv8_layout(hd, bs)
    q = np.empty((m, hd), np.int8)
    d = np.empty((m, L["groups"]), np.float16)
    for j in range(m):
        tile = run[(j // 16) * L["k_tile_bytes"] :]
        for i in range(hd):
            q[j, i] = np.int8(tile[(i // 4) * 64 + 4 * (j % 16) + i % 4].astype(np.int8))
        for g in range(L["groups"]):
            d[j, g] = tile[L["k_scales_offset"] + 2 * (16 * g + j % 16) :][:2].copy().view(np.float16)[0]
    return q, d


def _kv8_inputs(r: np.random.Generator, hd: int, bs: int, m: int) -> np.ndarray:
    x = (r.standard_normal((m, hd)) * 1.5).astype(np.float32)
    if hd >= 8:
        x[:, 3] *= 12.0  # an outlier channel, as real K vectors have
    return x


@pytest.mark.parametrize("hd,bs", KV8_SHAPES)
def test_kv8_layout_and_rounding_match_gguf_q8_0(hd: int, bs: int) -> None:
    """Stored K/V are gguf-py's Q8_0 of each 32-element group (bit for bit), at the documented
    offsets; the last K chunk is zero-padded; the query record is int8 per 32 with a float scale."""
    r = rng(hd * 7 + bs)
    m = min(bs, 19)
    x = _kv8_inputs(r, hd, bs, m)
    L = K.kv8_layout(hd, bs)
    groups, chunks = -(-hd // 32), -(-hd // 4)
    assert (L["groups"], L["chunks"]) == (groups, chunks)
    pad = lambda n: -(-n // 64) * 64  # noqa: E731
    assert L["k_tile_bytes"] == pad(chunks * 64 + groups * 32)
    assert L["k_run_bytes"] == -(-bs // 16) * L["k_tile_bytes"]
    assert L["v_run_bytes"] == pad(pad(bs * hd) + bs * groups * 2)
    q_ref, d_ref = _q8_gguf(x)
    k = K.kv8_run(0, x, bs)
    v = K.kv8_run(1, x, bs)
    assert k.size == L["k_run_bytes"] and v.size == L["v_run_bytes"]
    kq, kd = _k_run_fields(k, hd, bs, m)
    np.testing.assert_array_equal(kq, q_ref)
    np.testing.assert_array_equal(kd.view(np.uint16), d_ref.view(np.uint16))
    for j in range(m):  # padding of the last chunk stays zero
        tile = k[(j // 16) * L["k_tile_bytes"] :]
        assert all(tile[(i // 4) * 64 + 4 * (j % 16) + i % 4] == 0 for i in range(hd, chunks * 4))
    vq = v[: bs * hd].view(np.int8).reshape(bs, hd)[:m]
    vd = (
        v[L["v_scales_offset"] : L["v_scales_offset"] + bs * groups * 2].copy().view(np.float16).reshape(bs, groups)[:m]
    )
    np.testing.assert_array_equal(vq, q_ref)
    np.testing.assert_array_equal(vd.view(np.uint16), d_ref.view(np.uint16))
    # the values a run holds are d * q, and within half a step of x
    deq = d_ref.astype(np.float32).repeat(32, axis=1)[:, :hd] * q_ref.astype(np.float32)
    np.testing.assert_array_equal(K.kv8_values(0, k, hd, bs, m), deq)
    np.testing.assert_array_equal(K.kv8_values(1, v, hd, bs, m), deq)
    step = d_ref.astype(np.float64).repeat(32, axis=1)[:, :hd]
    assert np.all(np.abs(deq - x) <= ACT_QUANT_ERR * step + 1e-30)
    # the query record: int8 per 32 with a float32 scale, zero-padded, then scales, then sums
    rec = K.kv8_query(x[0], hd)
    assert rec.size == L["query_bytes"] == chunks * 4 + groups * 8
    qs = rec[: chunks * 4].view(np.int8)
    qd = rec[chunks * 4 : chunks * 4 + groups * 4].view(np.float32)
    qsum = rec[chunks * 4 + groups * 4 :].view(np.int32)
    np.testing.assert_array_equal(qs[:hd], q_ref[0])
    assert np.all(qs[hd:] == 0)
    for g in range(groups):
        grp = x[0, 32 * g : 32 * g + 32]
        assert qd[g] == np.float32(np.abs(grp).max()) / np.float32(127)
        assert qsum[g] == int(q_ref[0, 32 * g : 32 * g + 32].astype(np.int64).sum())


def _kv8_special_rows(hd: int) -> np.ndarray:
    """Rows that probe every branch of the q8_0 rounding: exact ties (amax 127 makes d = 1, so
    x * id = x), values next to the ties and to +-127, +-0, an all-zero group, a NaN and an inf
    among finite values, a subnormal group (id overflows to inf), huge values (d overflows fp16)."""
    tiny = np.float32(1e-40)
    rows = []
    ties = np.array([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 63.5, -0.0, 0.0], np.float32)
    near = np.array(
        [127.0, np.nextafter(np.float32(0.5), np.float32(0)), np.nextafter(np.float32(0.5), np.float32(1)), 126.49999]
        + [-126.50001, np.nextafter(np.float32(127), np.float32(0)), -127.0, 1e-30],
        np.float32,
    )
    specials = [
        ties,
        near,
        np.zeros(1, np.float32),
        -np.zeros(hd, np.float32),
        np.array([np.nan, 1.0, -3.0, 2.5], np.float32),
        np.array([np.inf, 1.0, -2.0], np.float32),
        np.array([-np.inf, np.nan, 4.0], np.float32),
        np.array([tiny, -tiny, tiny / 3, 0.0], np.float32),
        np.array([3e38, -1e38, 1.0, 5e37], np.float32),
        np.array([7.0, -7.0, 3.5, -3.5, 0.0274], np.float32) * np.float32(1 / 127),
    ]
    for sp in specials:
        row = np.zeros(hd, np.float32)
        for i0 in range(0, hd, 32):  # each group gets the pattern (cut to the group's length)
            n = min(len(sp), hd - i0, 32)
            row[i0 : i0 + n] = sp[:n]
        rows.append(row)
    return np.stack(rows)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,bs", KV8_SHAPES)
def test_kv8_store_and_query_every_isa_give_the_reference_bytes(isa: str, hd: int, bs: int) -> None:
    """Each ISA's kv8_store and kv8_quantize_query write the scalar reference's bytes exactly:
    random rows (with an outlier channel and exact ties), every slot, and the special values."""
    r = rng(900 + hd * 5 + bs)
    x = _kv8_inputs(r, hd, bs, bs)
    x[::3, : min(hd, 8)] = np.round(x[::3, : min(hd, 8)]) + 0.5  # ties at the group's own scale too
    specials = _kv8_special_rows(hd)
    for rows in [x] + [specials[i : i + bs] for i in range(0, len(specials), bs)]:
        for kv in (0, 1):
            got = K.kv8_run(kv, rows, bs, isa)
            ref = K.kv8_run(kv, rows, bs)
            assert np.array_equal(got, ref), (kv, isa)
        got = K.kv8_query(rows, hd, isa)
        ref = K.kv8_query(rows, hd)
        assert np.array_equal(got, ref), isa
    # slots out of order over a run written earlier: each store touches its own slot's bytes only
    order = r.permutation(bs)
    for kv in (0, 1):
        a = K.kv8_run(kv, x, bs, isa)
        b = K.kv8_run(kv, x[order], bs, isa)
        q_a = K.kv8_values(kv, a, hd, bs, bs)
        q_b = K.kv8_values(kv, b, hd, bs, bs)
        np.testing.assert_array_equal(q_b, q_a[order])


@pytest.mark.parametrize("isa", ISAS)
def test_kv8_rounding_of_special_values(isa: str) -> None:
    """The rounding itself, written out (hd 32, one group): ties away from zero, NaN and inf to 0
    (the group's other values keep the scale of the finite ones or an inf scale), -0 as 0."""
    hd = 32

    def one(vals: list[float]) -> tuple[np.ndarray, np.uint16, np.ndarray]:
        x = np.zeros(hd, np.float32)
        x[: len(vals)] = vals
        v = K.kv8_run(1, x[None], 1, isa)
        L = K.kv8_layout(hd, 1)
        rec = K.kv8_query(x, hd, isa)
        return v[:hd].view(np.int8), v[L["v_scales_offset"] :][:2].copy().view(np.uint16)[0], rec[:hd].view(np.int8)

    q, d, qq = one([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, -0.0])
    assert q[:10].tolist() == [127, 1, -1, 2, -2, 3, -3, 127, -127, 0] and d == np.float16(1.0).view(np.uint16)
    assert np.array_equal(qq, q)
    q, d, _ = one([np.nan, 127.0, -63.5])
    assert q[:3].tolist() == [0, 127, -64] and d == np.float16(1.0).view(np.uint16)
    q, d, _ = one([np.inf, 127.0, -1.0])
    assert q[:3].tolist() == [0, 0, 0] and d == np.float16(np.inf).view(np.uint16)
    q, d, _ = one([1e-40, -1e-40])  # subnormal amax: id = 1 / d overflows, x * id is inf -> 0
    assert q[:2].tolist() == [0, 0] and d == 0
    q, d, _ = one([])
    assert not q.any() and d == 0


def _kv8_scores_exact(q: np.ndarray, kdeq: np.ndarray, hd: int, nq: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores of the int8 query (dequantized) against dequantized K, and a bound on the
    engine's float error (a few roundings per group of the products' magnitude)."""
    qrec = K.kv8_query(q, hd)
    qd = np.stack([_query_values(qrec, hd, h) for h in range(nq)])
    exact = scale * (qd @ kdeq.T.astype(np.float64))
    bound = 1e-6 * scale * (np.abs(qd) @ np.abs(kdeq.T.astype(np.float64))) + 1e-30
    return exact, bound


def _query_values(rec: np.ndarray, hd: int, h: int) -> np.ndarray:
    L = K.kv8_layout(hd, 1)
    r = rec[h * L["query_bytes"] : (h + 1) * L["query_bytes"]]
    qs = r[: L["chunks"] * 4].view(np.int8)[:hd].astype(np.float64)
    d = r[L["chunks"] * 4 : L["chunks"] * 4 + L["groups"] * 4].view(np.float32).astype(np.float64)
    return qs * d.repeat(32)[:hd]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,bs", KV8_SHAPES)
def test_attn_scores_q8_vs_reference_and_numpy(isa: str, hd: int, bs: int) -> None:
    """Every ISA gives the scalar reference's bits; the reference is the float64 product of the
    dequantized int8 values to a few float roundings."""
    r = rng(300 + hd + bs)
    x = _kv8_inputs(r, hd, bs, bs)
    k = K.kv8_run(0, x, bs)
    kdeq = K.kv8_values(0, k, hd, bs, bs)
    scale = 1.0 / np.sqrt(hd)
    for nq in KV8_NQ:
        q = r.standard_normal(nq * hd).astype(np.float32)
        qrec = K.kv8_query(q, hd)
        exact, bound = _kv8_scores_exact(q, kdeq, hd, nq, scale)
        for j0, n in sorted({(0, bs), (1, bs - 1), (bs // 2, bs - bs // 2), (bs - 1, 1), (0, 0)}):
            ld = n + 3
            got = K.ops("attn_scores_q8", isa, hd, bs, nq, qrec, k, j0, n, scale, ld).reshape(nq, ld)
            ref = K.ops("attn_scores_q8", "scalar", hd, bs, nq, qrec, k, j0, n, scale, ld).reshape(nq, ld)
            assert np.array_equal(got, ref), (nq, j0, n)
            assert np.all(np.abs(ref[:, :n] - exact[:, j0 : j0 + n]) <= bound[:, j0 : j0 + n]), (nq, j0, n)
            assert np.all(got[:, n:] == 0), "wrote past n"
        # within the int8 rounding of the f32 scores: |q k - q' k'| <= |q| |k - k'| + |k'| |q - q'|,
        # each rounding at most ACT_QUANT_ERR of its group's step
        q64 = q.reshape(nq, hd).astype(np.float64)
        f32 = scale * (q64 @ x.T.astype(np.float64))
        step_k = _q8_gguf(x)[1].astype(np.float64).repeat(32, axis=1)[:, :hd]
        step_q = np.stack(
            [
                np.concatenate(
                    [np.full(min(32, hd - i), np.abs(q64[h, i : i + 32]).max() / 127) for i in range(0, hd, 32)]
                )
                for h in range(nq)
            ]
        )
        bound_q8 = ACT_QUANT_ERR * scale * (np.abs(q64) @ step_k.T + step_q @ np.abs(kdeq.T.astype(np.float64)))
        assert np.all(np.abs(exact - f32) <= bound_q8 + 1e-6 * np.abs(f32)), nq


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,bs", [(64, 32), (256, 16), (48, 7), (13, 5)])
def test_attn_scores_q8_independent_of_n_and_nq(isa: str, hd: int, bs: int) -> None:
    """Each score has the same bits whatever range, slot or head group computed it."""
    r = rng(17 + hd + bs)
    nq = 5
    k = K.kv8_run(0, _kv8_inputs(r, hd, bs, bs), bs)
    qrec = K.kv8_query(r.standard_normal(nq * hd).astype(np.float32), hd)
    qb = K.kv8_layout(hd, bs)["query_bytes"]
    full = K.ops("attn_scores_q8", isa, hd, bs, nq, qrec, k, 0, bs, 0.125, bs).reshape(nq, bs)
    for h in range(nq):
        one = K.ops("attn_scores_q8", isa, hd, bs, 1, qrec[h * qb : (h + 1) * qb], k, 0, bs, 0.125, bs)
        assert np.array_equal(one, full[h]), h
    for j0 in range(bs):
        for j1 in sorted({j0 + 1, min(bs, j0 + 3), bs}):
            part = K.ops("attn_scores_q8", isa, hd, bs, nq, qrec, k, j0, j1 - j0, 0.125, j1 - j0)
            assert np.array_equal(part.reshape(nq, j1 - j0), full[:, j0:j1]), (j0, j1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("hd,bs", KV8_SHAPES)
def test_attn_accum_q8_vs_reference_numpy_and_split(isa: str, hd: int, bs: int) -> None:
    r = rng(500 + hd * 3 + bs)
    x = _kv8_inputs(r, hd, bs, bs)
    v = K.kv8_run(1, x, bs)
    vdeq = K.kv8_values(1, v, hd, bs, bs).astype(np.float64)
    for nq in KV8_NQ:
        for j0, n in sorted({(0, bs), (1, bs - 1), (bs - 1, 1)}):
            ld = n + 1
            p = r.random(nq * ld).astype(np.float32)
            out0 = r.standard_normal(nq * hd).astype(np.float32)
            got = K.ops("attn_accum_q8", isa, hd, bs, nq, p, ld, v, j0, n, out0)
            ref = K.ops("attn_accum_q8", "scalar", hd, bs, nq, p, ld, v, j0, n, out0)
            assert np.array_equal(got, ref), (nq, j0, n)
            p64 = p.astype(np.float64).reshape(nq, ld)[:, :n]
            exact = out0.astype(np.float64).reshape(nq, hd) + p64 @ vdeq[j0 : j0 + n]
            # per position: p * d (one rounding) and one fma
            bound = (2 * n + 1) * 2.0**-24 * (np.abs(out0).reshape(nq, hd) + p64 @ np.abs(vdeq[j0 : j0 + n])) + 1e-30
            assert np.all(np.abs(ref.reshape(nq, hd) - exact) <= bound), (nq, j0, n)
            # positions split over consecutive calls give the same bits
            pa = p.reshape(nq, ld)
            for cut in sorted({0, 1, n // 2, n - 1, n}):
                a = K.ops(
                    "attn_accum_q8",
                    isa,
                    hd,
                    bs,
                    nq,
                    np.ascontiguousarray(pa[:, : max(cut, 1)]).ravel(),
                    max(cut, 1),
                    v,
                    j0,
                    cut,
                    out0,
                )
                rest = np.ascontiguousarray(pa[:, cut : max(n, cut + 1)]).ravel()
                b = K.ops("attn_accum_q8", isa, hd, bs, nq, rest, max(n - cut, 1), v, j0 + cut, n - cut, a)
                assert np.array_equal(b, got), (nq, j0, n, cut)
            # one head at a time gives the same bits as the head group
            for h in range(nq):
                one = K.ops(
                    "attn_accum_q8", isa, hd, bs, 1, p[h * ld : (h + 1) * ld], ld, v, j0, n, out0[h * hd : (h + 1) * hd]
                )
                assert np.array_equal(one, got[h * hd : (h + 1) * hd]), (nq, h)


def test_attn_q8_bad_arguments_raise() -> None:
    hd, bs = 64, 16
    k = K.kv8_run(0, np.ones((bs, hd), np.float32), bs)
    q = K.kv8_query(np.ones(hd, np.float32), hd)
    with pytest.raises(ValueError, match="j0 \\+ n <= bs"):
        K.ops("attn_scores_q8", "", hd, bs, 1, q, k, 3, bs, 1.0, bs)
    with pytest.raises(ValueError, match="at least"):
        K.ops("attn_scores_q8", "", hd, bs, 2, q, k, 0, 4, 1.0, 4)  # two heads need two records
    with pytest.raises(ValueError, match="at least"):
        K.ops("attn_scores_q8", "", hd, bs, 1, q, k[:100], 0, 4, 1.0, 4)
    with pytest.raises(ValueError, match="length"):
        K.ops("attn_accum_q8", "", hd, bs, 1, np.ones(3, np.float32), 4, k, 0, 4, np.zeros(hd, np.float32))
    with pytest.raises(ValueError, match="more rows"):
        K.kv8_run(0, np.ones((bs + 1, hd), np.float32), bs)
    with pytest.raises(ValueError, match="kv must be"):
        K.kv8_run(2, np.ones((1, hd), np.float32), bs)


@pytest.mark.parametrize("isa", ISAS)
def test_softmax_vs_numpy(isa: str) -> None:
    r = rng(11)
    for n in [1, 2, 7, 8, 15, 16, 17, 33, 129, 640]:
        x = (r.standard_normal(n) * 8).astype(np.float32)
        if n >= 3:
            x[1] = x.max() - 200.0  # underflows to 0
        got = K.ops("softmax", isa, x)
        x64 = x.astype(np.float64)
        e = np.exp(x64 - x64.max())
        ref = e / e.sum()
        # exp to ~2 ulp, the sum and the scaling to n * eps relative
        assert np.allclose(got, ref, rtol=2e-6 + n * 2.0**-24, atol=1e-37), n
        assert abs(float(got.astype(np.float64).sum()) - 1.0) < 1e-5, n
        # a row's result depends on the row alone: copies give the same bits
        assert np.array_equal(K.ops("softmax", isa, x.copy()), got)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("nbytes", [8, 8 * 63 + 5, 1 << 20])
def test_read_bandwidth_reads_every_word_once(nbytes: int, threads: int) -> None:
    """The roofline reader (bench engine's peak_gbps) sums each whole 64-bit word once, whatever
    the split over the pool; a trailing partial word is not read."""
    rng = np.random.default_rng(nbytes)
    buf = rng.integers(0, 256, nbytes, dtype=np.uint8)
    words = buf[: nbytes // 8 * 8].view(np.uint64)
    want = int(words.sum(dtype=np.uint64))  # numpy wraps mod 2^64 as the reader does
    old = _core.get_num_threads()
    try:
        _core.set_num_threads(threads)
        gbps, got = _core.kernels.read_bandwidth(buf, 2)
    finally:
        _core.set_num_threads(old)
    assert got == want
    assert gbps > 0
    with pytest.raises(ValueError, match="read_bandwidth"):
        _core.kernels.read_bandwidth(np.zeros(7, np.uint8), 1)
