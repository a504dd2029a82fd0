"""The weight types of real small-model files (Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K, IQ4_XS) through
the whole forward, on tiny random GGUF models, against the independent numpy reference
(tests/model/reference.py dequantizes the same bytes with the `gguf` package), on every ISA, with
the matrices in the x16 packed layout and in the file's layout.

Tolerance: as for Q8_0/Q4_x in test_forward.py, the engine rounds activations to int8 before each
quantized matmul (per 32 for Q8_0/Q8_1, per 256 for the K-quants' Q8_K) and the reference does
not; with two layers that moves the worst logit by a few percent of the largest (measured here,
seed 21: 3.0e-2 to 6.0e-2 for the new types, 2.9e-2 for Q8_0). A wrong scale, sub-block or bit in
a kernel moves logits by far more.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import load_reference
from tiny_models import TinySpec, blocks_needed, forward_seq, logits_on_isa

from tinyserve import _core

TOL = 1e-1
NEW_TYPES = ("Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")
PROMPT = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 33, 80, 2]


def spec_for(wtype: str, **kw) -> TinySpec:
    # 256-wide rows so that every matrix can hold super-blocks
    return TinySpec(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, wtype=wtype, seed=21, **kw)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def top1_agrees(got: np.ndarray, ref: np.ndarray) -> None:
    srt = np.sort(ref, axis=1)
    clear = srt[:, -1] - srt[:, -2] > 2 * TOL * np.abs(ref).max()
    np.testing.assert_array_equal(got.argmax(1)[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_logits_match_reference(tiny_model_path, wtype, tied):
    path = tiny_model_path(spec_for(wtype, tied=tied))
    model = _core.Model(str(path))
    kv = _core.KVCache(model, block_size=4, num_blocks=8)
    got = forward_seq(model, kv, PROMPT, 0, list(range(blocks_needed(len(PROMPT), 4))))
    ref = load_reference(str(path)).logits(PROMPT)
    assert rel_err(got, ref) < TOL
    top1_agrees(got, ref)


def test_mixed_types_like_a_q4_k_m_file(tiny_model_path):
    """Q5_0 embedding, Q6_K layer matrices and a Q8_0 head, as small Q4_K_M files mix them (and a
    Q4_K head when tied to a Q4_K embedding)."""
    for spec in (spec_for("Q6_K", embd_type="Q5_0", out_type="Q8_0"), spec_for("Q4_K", embd_type="Q4_K", tied=True)):
        path = tiny_model_path(spec)
        model = _core.Model(str(path))
        kv = _core.KVCache(model, block_size=4, num_blocks=8)
        got = forward_seq(model, kv, PROMPT, 0, list(range(4)))
        ref = load_reference(str(path)).logits(PROMPT)
        assert rel_err(got, ref) < TOL, spec
        top1_agrees(got, ref)


@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("isa", _core.available_isas())
@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_every_isa_and_layout(tiny_model_path, tmp_path, isa, wtype, pack):
    """Each ISA (a child process: the table is chosen once per process), packed where the ISA has
    x16 kernels for the type (pack=1, the default) and in the file's layout (TINYSERVE_PACK=0);
    a split prefill over scattered KV blocks, then the same tolerance against the reference."""
    packs = _core.kernels.has_packed(wtype, isa)
    if pack == "0" and not packs:
        pytest.skip(f"{isa} never packs {wtype}")
    path = tiny_model_path(spec_for(wtype))
    got, repacked = logits_on_isa(path, isa, pack, PROMPT, tmp_path / "logits.npy")
    assert (repacked > 0) == (packs and pack == "1")
    ref = load_reference(str(path)).logits(PROMPT, kv_f16=True)
    assert rel_err(got, ref) < TOL
    top1_agrees(got, ref)
