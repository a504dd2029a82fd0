"""The C++ forward (tinyserve._core.Model.forward) against the independent numpy reference, on
tiny random GGUF models, plus the ragged-batch / paged-KV properties the engine relies on.

Errors are measured relative to the largest reference logit of the case:
    rel_err = max |cpp - ref| / max |ref|
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import load_reference
from tiny_models import (
    WEIGHT_TYPES,
    TinySpec,
    blocks_needed,
    forward_batch,
    forward_chunks,
    forward_seq,
    i32,
    logits_on_isa,
)

from tinyserve import _core

# --- tolerances ----------------------------------------------------------------------------------
# Measured over the 48 combinations of weight type x GQA/MHA x tied/untied x KV dtype (seed 1):
#                           vs plain reference     vs emulating reference
#   F32/F16/BF16, f32 KV      <= 1.1e-6              <= 1.1e-6
#   F32/F16/BF16, f16 KV      <= 1.7e-3              <= 9.5e-5
#   Q8_0/Q4_0/Q4_1, either    <= 5.7e-2              typically 1e-7, up to 5.6e-3
# Against the plain float64 reference (no emulation):
#  - F32/F16/BF16 weights: the reference dequantizes exactly the same weight values, so only the
#    float32 summation order differs (~1e-6); with an f16 KV cache K and V are also rounded to
#    2^-11 relative, which the softmax and two layers amplify to ~1e-3.
#  - Q8_0/Q4_0/Q4_1 weights: the engine rounds activations to int8 per block of 32 before each
#    quantized matmul (step max|x|/127, ~0.6% noise per dot product). Fifteen such matmuls and the
#    attention softmax move the worst of 13 x 128 logits by up to ~6% of the largest; weight
#    quantization itself is not part of this error (the reference reads the same quantized
#    weights), so Q8_0 and Q4_x share one bound.
TOL_FLOAT = 2e-5  # F32/F16/BF16 weights, f32 KV cache
TOL_FLOAT_KV16 = 5e-3  # F32/F16/BF16 weights, f16 KV cache
TOL_FLOAT_KV8 = 5e-2  # F32/F16/BF16 weights, q8_0 KV cache (int8 K, V and query: ~1.5e-2 seen)
TOL_QUANT = 1e-1  # Q8_0/Q4_0/Q4_1 weights, either KV cache
# Against the reference that emulates the int8 activations (act_quant, including Q8_1's fp16
# block sum) and the f16 KV cache (kv_f16), agreement is usually ~1e-7: the same rounding happens
# on both sides. But the reference computes in float64 and the engine in float32, so an activation
# sitting on a rounding boundary now and then lands one int8 step apart, and that difference
# propagates through later layers (worst seen 5.6e-3). A wrong block scale, offset or sum term
# is larger than this (dropping the fp16 rounding of Q8_1's sum alone gives 1.8e-2).
TOL_EMULATED = 1e-2
# The q8_0 KV cache rounds K, V and the query to int8 steps of max|group| / 127, so the same float32
# difference can flip one of those roundings instead: measured on a tiny model, 1e-6 relative noise
# on K/V/q before rounding moves its logits by 1.6e-2 (the whole int8-vs-f16 effect is 1-4e-2). The
# kernels' arithmetic is checked bit for bit in tests/kernels; these model tests check the wiring.
TOL_EMULATED_KV8 = 4e-2

QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
KV_DTYPES = ("f32", "f16", "q8_0")
PROMPT = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 33, 80, 2]  # 13 tokens: crosses a 4-block at odd offsets


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def tolerance(spec: TinySpec, kv_dtype: str) -> float:
    if spec.wtype in QUANT_TYPES or (spec.embd_type or spec.wtype) in QUANT_TYPES:
        return TOL_QUANT
    return {"f32": TOL_FLOAT, "f16": TOL_FLOAT_KV16, "q8_0": TOL_FLOAT_KV8}[kv_dtype]


def assert_top1(got: np.ndarray, ref: np.ndarray, tol_abs: float) -> None:
    """The engine's top-1 token is the reference's in every row where the reference's top-2 margin
    exceeds twice the allowed error; where the two best are closer than that (a near tie, which any
    rounding may flip), the engine's pick must still be within tol_abs of the reference maximum."""
    ref_sorted = np.sort(ref, axis=1)
    margin = ref_sorted[:, -1] - ref_sorted[:, -2]
    clear = margin > 2 * tol_abs
    np.testing.assert_array_equal(got.argmax(1)[clear], ref.argmax(1)[clear])
    picked = ref[np.arange(len(ref)), got.argmax(1)]
    assert np.all(picked >= ref_sorted[:, -1] - tol_abs), "engine's top-1 is not a reference top-1"


def run_prompt(path, tokens, kv_dtype="f32", block_size=4):
    model = _core.Model(str(path))
    kv = _core.KVCache(
        model, block_size=block_size, num_blocks=blocks_needed(len(tokens), block_size) + 2, dtype=kv_dtype
    )
    return model, kv, forward_seq(model, kv, tokens, 0, list(range(blocks_needed(len(tokens), block_size))))


# --- logits against the reference --------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_logits_match_reference(tiny_model_path, wtype, n_kv_heads, tied):
    spec = TinySpec(wtype=wtype, n_kv_heads=n_kv_heads, tied=tied, seed=1)
    path = tiny_model_path(spec)
    model, _, got = run_prompt(path, PROMPT)
    cfg = model.config
    assert (cfg["n_kv_heads"], cfg["tied_output"], cfg["arch"]) == (n_kv_heads, tied, "llama")
    assert got.shape == (len(PROMPT), spec.n_vocab) and got.dtype == np.float32
    ref = load_reference(str(path)).logits(PROMPT)
    tol = tolerance(spec, "f32")
    assert rel_err(got, ref) < tol
    assert_top1(got, ref, tol * np.abs(ref).max())


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_logits_match_emulating_reference(tiny_model_path, wtype, kv_dtype):
    """Tight check: the reference rounds activations to int8 before quantized matmuls and K/V to
    f16 (or K, V and the query to int8) like the engine does, so an error in a kernel's scales or
    offsets cannot hide in TOL_QUANT."""
    spec = TinySpec(wtype=wtype, seed=2)
    path = tiny_model_path(spec)
    _, _, got = run_prompt(path, PROMPT, kv_dtype=kv_dtype)
    ref = load_reference(str(path)).logits(PROMPT, act_quant=True, kv_f16=kv_dtype == "f16", kv_q8=kv_dtype == "q8_0")
    assert rel_err(got, ref) < (TOL_EMULATED_KV8 if kv_dtype == "q8_0" else TOL_EMULATED)
    plain = load_reference(str(path)).logits(PROMPT)
    assert rel_err(got, plain) < tolerance(spec, kv_dtype)


def test_mixed_types_and_quantized_tied_head(tiny_model_path):
    """Like the default model: Q4_1 matrices, a Q8_0 embedding that is also the output head."""
    spec = TinySpec(wtype="Q4_1", embd_type="Q8_0", tied=True, n_kv_heads=2, seed=3)
    path = tiny_model_path(spec)
    _, _, got = run_prompt(path, PROMPT, kv_dtype="f16")
    ref = load_reference(str(path)).logits(PROMPT)
    assert rel_err(got, ref) < TOL_QUANT
    assert rel_err(got, load_reference(str(path)).logits(PROMPT, act_quant=True, kv_f16=True)) < TOL_EMULATED
    assert_top1(got, ref, TOL_QUANT * np.abs(ref).max())


def test_qwen2_bias_and_neox_rope(tiny_model_path):
    spec = TinySpec(arch="qwen2", wtype="F32", n_kv_heads=2, seed=4)
    path = tiny_model_path(spec)
    model, _, got = run_prompt(path, PROMPT)
    cfg = model.config
    assert cfg["arch"] == "qwen2" and cfg["rope_type"] == "neox" and cfg["qkv_bias"] is True
    ref = load_reference(str(path)).logits(PROMPT)
    assert rel_err(got, ref) < TOL_FLOAT
    assert_top1(got, ref, TOL_FLOAT * np.abs(ref).max())


def test_rope_linear_scaling(tiny_model_path):
    spec = TinySpec(wtype="F32", rope_scale=4.0, seed=5)
    path = tiny_model_path(spec)
    tokens = [(7 * i + 3) % spec.n_vocab for i in range(40)]  # long enough for positions to matter
    model, _, got = run_prompt(path, tokens)
    assert model.config["rope_scale"] == pytest.approx(4.0)
    ref = load_reference(str(path)).logits(tokens)
    assert rel_err(got, ref) < TOL_FLOAT
    # and the scaling is really applied: the unscaled model gives different logits
    unscaled = load_reference(str(tiny_model_path(TinySpec(wtype="F32", seed=5)))).logits(tokens)
    assert rel_err(unscaled, ref) > 100 * TOL_FLOAT


def test_last_position_of_context(tiny_model_path):
    spec = TinySpec(wtype="F32", context_length=24, seed=6)
    path = tiny_model_path(spec)
    tokens = [(5 * i + 1) % spec.n_vocab for i in range(spec.context_length)]
    _, _, got = run_prompt(path, tokens)
    assert rel_err(got, load_reference(str(path)).logits(tokens)) < TOL_FLOAT


# --- ragged batches and the paged KV cache -------------------------------------------------------
BATCH_SPECS = [TinySpec(wtype="Q4_1", seed=7), TinySpec(wtype="F16", n_kv_heads=4, seed=8)]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("spec", BATCH_SPECS, ids=lambda s: s.wtype)
def test_ragged_batch_rows_equal_sequences_alone(tiny_model_path, spec, kv_dtype):
    """A prefills 7 tokens in two chunks, B decodes one token at a time, C arrives fresh: every
    row of every batched step is bitwise identical to the same sequence run alone (batch
    invariance: no row's result may depend on which other rows share its forward)."""
    path = tiny_model_path(spec)
    model = _core.Model(str(path))
    bs = 4
    A = [11, 12, 13, 14, 15, 16, 17]
    B_prompt, B_next = [21, 22, 23, 24, 25], [26, 27, 28]
    C = [31, 32, 33, 34, 35, 36]
    # each sequence owns disjoint blocks of one shared arena, interleaved on purpose
    blk = {"A": [0, 3, 6], "B": [1, 4, 7], "C": [2, 5, 8]}
    steps = [  # one ragged batch per step: (name, new tokens, start position)
        [("B", B_prompt, 0)],
        [("A", A[:4], 0), ("B", B_next[:1], 5), ("C", C, 0)],
        [("B", B_next[1:2], 6), ("A", A[4:], 4), ("C", [37], 6)],
        [("C", [38], 7), ("B", B_next[2:], 7)],
    ]
    kv = _core.KVCache(model, block_size=bs, num_blocks=9, dtype=kv_dtype)
    batched: dict[str, list[np.ndarray]] = {"A": [], "B": [], "C": []}
    for step in steps:
        out = forward_batch(model, kv, [(t, p, blk[n]) for n, t, p in step])
        row = 0
        for name, toks, _ in step:
            batched[name].append(out[row : row + len(toks)])
            row += len(toks)
        assert row == len(out)

    for name in "ABC":  # the same chunks, each sequence alone in its own cache
        alone_kv = _core.KVCache(model, block_size=bs, num_blocks=3, dtype=kv_dtype)
        alone = [forward_seq(model, alone_kv, t, p, [0, 1, 2]) for step in steps for n, t, p in step if n == name]
        for got, want in zip(batched[name], alone, strict=True):
            assert np.array_equal(got, want), f"sequence {name}: batched rows differ from the sequence alone"

    # and the result is right: the last logits of A equal the reference's
    ref = load_reference(str(path)).logits(A, act_quant=True, kv_f16=kv_dtype == "f16", kv_q8=kv_dtype == "q8_0")
    assert rel_err(np.concatenate(batched["A"]), ref) < (TOL_EMULATED_KV8 if kv_dtype == "q8_0" else TOL_EMULATED)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_scattered_blocks_equal_contiguous(tiny_model_path, kv_dtype):
    spec = TinySpec(wtype="Q8_0", seed=9)
    model = _core.Model(str(tiny_model_path(spec)))
    bs, n_blocks = 4, 32
    tokens = [(3 * i + 2) % spec.n_vocab for i in range(19)]
    need = blocks_needed(len(tokens) + 1, bs)
    perm = np.random.default_rng(0).permutation(n_blocks)[:need]
    assert list(perm) != list(range(need))
    results = []
    for blocks in (list(range(need)), [int(b) for b in perm]):
        kv = _core.KVCache(model, block_size=bs, num_blocks=n_blocks, dtype=kv_dtype)
        prefill = forward_seq(model, kv, tokens[:13], 0, blocks)
        rest = forward_seq(model, kv, tokens[13:], 13, blocks)
        decode = forward_seq(model, kv, [9], len(tokens), blocks)
        results.append(np.concatenate([prefill, rest, decode]))
    assert np.array_equal(results[0], results[1])


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("wtype", ["F32", "Q4_0"])
def test_prefill_whole_equals_chunks_equals_decode(tiny_model_path, wtype, kv_dtype):
    """The same positions computed as one prefill, as chunks, and token by token agree.
    Expected bitwise: each row's matmuls are the same dot products (GEMM == GEMV bit for bit) and
    its attention reads the same cached keys and values in the same order."""
    spec = TinySpec(wtype=wtype, seed=10)
    model = _core.Model(str(tiny_model_path(spec)))
    tokens = [(11 * i + 4) % spec.n_vocab for i in range(21)]

    def run(chunks):
        return forward_chunks(model, tokens, chunks, 8, kv_dtype)

    whole = run([21])
    chunked = run([5, 8, 1, 7])
    decoded = run([1] * 21)
    assert np.array_equal(whole, chunked)
    assert np.array_equal(whole, decoded)


def test_logit_rows_selects_exactly_those_rows(tiny_model_path):
    spec = TinySpec(wtype="Q4_1", seed=11)
    model = _core.Model(str(tiny_model_path(spec)))
    seqs = [([1, 2, 3, 4, 5], 0, [0, 1]), ([6, 7, 8], 0, [2])]
    kv = _core.KVCache(model, block_size=4, num_blocks=3)
    full = forward_batch(model, kv, seqs)
    for rows in ([4, 7], [7, 0, 3], [2], []):
        kv = _core.KVCache(model, block_size=4, num_blocks=3)
        got = forward_batch(model, kv, seqs, logit_rows=rows)
        assert got.shape == (len(rows), spec.n_vocab)
        assert np.array_equal(got, full[rows])


def test_forward_into_a_given_buffer(tiny_model_path):
    # out=: the logits land in the caller's array (the engine reuses one from step to step), the
    # same values as a fresh array's; a wrong buffer is refused before anything runs
    spec = TinySpec(wtype="Q4_1", seed=13)
    model = _core.Model(str(tiny_model_path(spec)))
    V = spec.n_vocab
    args = (i32([1, 2, 3, 4, 5]), i32([5]), i32([0]), np.array([[0, 1]], np.int32), i32([2, 4]))
    fresh = model.forward(_core.KVCache(model, block_size=4, num_blocks=2), *args)
    big = np.full((4, V), np.nan, np.float32)
    got = model.forward(_core.KVCache(model, block_size=4, num_blocks=2), *args, out=big[1:3])
    assert np.shares_memory(got, big)
    assert np.array_equal(big[1:3], fresh)
    assert np.isnan(big[0]).all() and np.isnan(big[3]).all()  # nothing written outside it
    bad = {
        "rows != logit rows": np.empty((3, V), np.float32),
        "columns != vocab": np.empty((2, V + 1), np.float32),
        "float64": np.empty((2, V), np.float64),
        "not C-contiguous": np.empty((V, 2), np.float32).T,
        "read-only": np.frombuffer(bytes(2 * V * 4), np.float32).reshape(2, V),
        "not an array": [[0.0] * V] * 2,
    }
    for what, buf in bad.items():
        kv = _core.KVCache(model, block_size=4, num_blocks=2)
        with pytest.raises(ValueError, match="out must be"):
            model.forward(kv, *args, out=buf)
            pytest.fail(f"no ValueError for {what}")


# --- bad inputs ----------------------------------------------------------------------------------
def test_bad_inputs_raise_and_model_keeps_working(tiny_model_path):
    spec = TinySpec(wtype="Q8_0", context_length=32, seed=12)
    model = _core.Model(str(tiny_model_path(spec)))
    bs = 4
    kv = _core.KVCache(model, block_size=bs, num_blocks=10, dtype="f32")  # 40 positions > context
    blocks = [0, 1, 2]
    prompt = [10, 11, 12, 13, 14, 15]
    first = forward_seq(model, kv, prompt, 0, blocks)
    V, ctx = spec.n_vocab, spec.context_length

    def fwd(tokens, seq_lens, start_pos, tables, rows):
        return model.forward(
            kv, i32(tokens), i32(seq_lens), i32(start_pos), np.asarray(tables, dtype=np.int32), i32(rows)
        )

    bad_calls = {
        "token id == vocab": lambda: fwd([V], [1], [6], [blocks], [0]),
        "token id < 0": lambda: fwd([-1], [1], [6], [blocks], [0]),
        "position == context length": lambda: fwd([1], [1], [ctx], [list(range(9))], [0]),
        "positions run past the context": lambda: fwd([1, 2, 3], [3], [ctx - 2], [list(range(9))], [0]),
        "negative start position": lambda: fwd([1], [1], [-1], [blocks], [0]),
        "too few blocks": lambda: fwd([1, 2, 3, 4, 5, 6, 7], [7], [6], [[0, 1, 2]], [0]),
        "block id == num_blocks": lambda: fwd([1], [1], [6], [[0, 10]], [0]),
        "negative block id inside the table": lambda: fwd([1], [1], [6], [[0, -5, 2]], [0]),
        "seq_lens do not add up to tokens": lambda: fwd([1, 2], [3], [6], [blocks], [0]),
        "start_pos shorter than seq_lens": lambda: fwd([1, 2], [1, 1], [6], [blocks, [3]], [0]),
        "block_tables rows != sequences": lambda: fwd([1, 2], [1, 1], [6, 0], [blocks], [0]),
        "block_tables not 2-D": lambda: fwd([1], [1], [6], blocks, [0]),
        "tokens not 1-D": lambda: fwd([[1]], [1], [6], [blocks], [0]),
        "logit row == T": lambda: fwd([1], [1], [6], [blocks], [1]),
        "negative logit row": lambda: fwd([1], [1], [6], [blocks], [-1]),
        "zero-token sequence": lambda: fwd([], [0], [6], [blocks], []),
    }
    for what, call in bad_calls.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"no ValueError for {what}")

    # a rejected call must not have written the cache: a call whose first token is valid but whose
    # second is out of range is refused as a whole, so position 6 still holds nothing stale
    with pytest.raises(ValueError):
        fwd([99, V + 3], [2], [6], [blocks], [0])
    nxt = forward_seq(model, kv, [16, 17], 6, blocks)
    kv2 = _core.KVCache(model, block_size=bs, num_blocks=8, dtype="f32")
    again = forward_seq(model, kv2, prompt + [16, 17], 0, blocks)
    assert np.array_equal(np.concatenate([first, nxt]), again)


def test_kv_cache_for_another_model_is_refused(tiny_model_path):
    a = _core.Model(str(tiny_model_path(TinySpec(wtype="F32", n_kv_heads=2, seed=13))))
    b = _core.Model(str(tiny_model_path(TinySpec(wtype="F32", n_kv_heads=4, seed=13))))
    kv = _core.KVCache(a, block_size=4, num_blocks=2)
    with pytest.raises(ValueError):
        forward_seq(b, kv, [1, 2], 0, [0])
    assert forward_seq(a, kv, [1, 2], 0, [0]).shape == (2, 128)


# --- every kernel path, threads, block copies ----------------------------------------------------
@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("isa", _core.available_isas())
@pytest.mark.parametrize("wtype", WEIGHT_TYPES)
def test_every_isa_matches_reference(tiny_model_path, tmp_path, isa, wtype, pack):
    """The ISA is chosen once per process (TINYSERVE_ISA forces a lower one), so each path runs in
    a child process; each must match the emulating reference as tightly as the default path, with
    the matrices in the x16 packed layout where the ISA has kernels for it (pack=1, the default)
    and in the file's layout (TINYSERVE_PACK=0)."""
    packs = wtype in ("Q4_0", "Q4_1", "Q8_0") and _core.kernels.has_packed(wtype, isa)
    if pack == "0" and not packs:
        pytest.skip(f"{isa} never packs {wtype}")
    spec = TinySpec(wtype=wtype, tied=wtype == "Q4_1", embd_type="Q8_0" if wtype == "Q4_1" else None, seed=14)
    path = tiny_model_path(spec)
    got, repacked = logits_on_isa(path, isa, pack, PROMPT, tmp_path / "logits.npy")
    assert (repacked > 0) == (packs and pack == "1")
    ref = load_reference(str(path)).logits(PROMPT, act_quant=True, kv_f16=True)
    assert rel_err(got, ref) < TOL_EMULATED


@pytest.mark.parametrize("isa", _core.available_isas())
@pytest.mark.parametrize("wtype", ["F16", "Q4_1"])
def test_every_isa_q8_0_kv_matches_reference(tiny_model_path, tmp_path, isa, wtype):
    """The int8 KV cache on each ISA (child processes) against the reference that emulates its
    rounding of K, V and the query; heads of 32 (one full group), 16 (a short group) and 64 (K, V and
    the query rotated by the Walsh-Hadamard matrix first)."""
    for dim in (128, 64, 256):
        spec = TinySpec(wtype=wtype, dim=dim, hidden_dim=96, n_heads=4, seed=19)
        path = tiny_model_path(spec)
        got, _ = logits_on_isa(path, isa, "1", PROMPT, tmp_path / "logits.npy", kv_dtype="q8_0")
        ref = load_reference(str(path)).logits(PROMPT, act_quant=True, kv_q8=True)
        assert rel_err(got, ref) < TOL_EMULATED_KV8, dim
        if dim == 256:  # ~1e-7 seen; the unrotated emulation is ~4e-2 away, so this catches a missing rotation
            assert rel_err(got, ref) < TOL_EMULATED, dim


def test_thread_count_does_not_change_results(tiny_model_path):
    """Every output is one dot product computed by one thread, so the pool size changes nothing."""
    spec = TinySpec(wtype="Q4_0", hidden_dim=128, seed=15)
    model = _core.Model(str(tiny_model_path(spec)))
    seqs = [(PROMPT, 0, [0, 1, 2, 3]), ([9, 8, 7], 0, [4])]
    before = _core.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            _core.set_num_threads(n)
            results.append(forward_batch(model, _core.KVCache(model, block_size=4, num_blocks=5), seqs))
    finally:
        _core.set_num_threads(before)
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_random_ragged_batches_equal_sequences_alone(tiny_model_path):
    """Six sequences with random prompt lengths and random chunking, scheduled in random mixes
    over shuffled blocks; every row equals the same sequence run alone with the same chunks."""
    spec = TinySpec(wtype="Q8_0", n_kv_heads=2, seed=16)
    model = _core.Model(str(tiny_model_path(spec)))
    rng = np.random.default_rng(17)
    bs, n_seq = 4, 6
    lengths = rng.integers(3, 30, size=n_seq)
    toks = [rng.integers(0, spec.n_vocab, size=int(n)).tolist() for n in lengths]
    ids = rng.permutation(n_seq * 8)
    blocks = [ids[8 * s : 8 * s + 8].tolist() for s in range(n_seq)]
    # random chunk plans: each sequence is cut into chunks of 1..9 tokens
    plans = []
    for n in lengths:
        cuts, pos = [], 0
        while pos < n:
            c = int(min(n - pos, rng.integers(1, 10)))
            cuts.append((pos, c))
            pos += c
        plans.append(cuts)
    kv = _core.KVCache(model, block_size=bs, num_blocks=n_seq * 8)
    batched = [[] for _ in range(n_seq)]
    cursor = [0] * n_seq
    while any(cursor[s] < len(plans[s]) for s in range(n_seq)):
        live = [s for s in range(n_seq) if cursor[s] < len(plans[s])]
        chosen = [s for s in live if rng.random() < 0.6] or live[:1]
        rng.shuffle(chosen)
        batch = []
        for s in chosen:
            pos, c = plans[s][cursor[s]]
            batch.append((toks[s][pos : pos + c], pos, blocks[s]))
            cursor[s] += 1
        out = forward_batch(model, kv, batch)
        row = 0
        for s, (t, _, _) in zip(chosen, batch):
            batched[s].append(out[row : row + len(t)])
            row += len(t)
    for s in range(n_seq):
        kv1 = _core.KVCache(model, block_size=bs, num_blocks=8)
        alone = [forward_seq(model, kv1, toks[s][p : p + c], p, list(range(8))) for p, c in plans[s]]
        assert np.array_equal(np.concatenate(batched[s]), np.concatenate(alone)), f"sequence {s}"


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_copied_block_continues_like_the_original(tiny_model_path, kv_dtype):
    """copy_block (copy-on-write of a shared prefix block): a sequence continued on the copy gives
    the same logits as one continued on the original."""
    spec = TinySpec(wtype="F16", seed=18)
    model = _core.Model(str(tiny_model_path(spec)))
    kv = _core.KVCache(model, block_size=4, num_blocks=6, dtype=kv_dtype)
    forward_seq(model, kv, [3, 4, 5, 6, 7, 8], 0, [0, 1])  # block 1 holds positions 4..5
    kv.copy_block(1, 4)
    fork = forward_seq(model, kv, [9, 10], 6, [0, 4])  # writes positions 6, 7 into block 4
    orig = forward_seq(model, kv, [9, 10], 6, [0, 1])
    assert np.array_equal(fork, orig)
    for bad in ((0, 6), (-1, 2), (6, 0)):
        with pytest.raises(ValueError):
            kv.copy_block(*bad)
