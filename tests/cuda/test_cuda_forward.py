"""The CUDA backend against the CPU on a GPU (skipped elsewhere, with the core's reason).
tools/cuda_device_check.sh runs these with TINYSERVE_ISA=scalar, so "the CPU" is the scalar
reference; on any other ISA the bounds hold as well (the ISAs agree with scalar more closely
than these bounds).

Errors are relative to the largest CPU logit of the case, rel_err = max |gpu - cpu| / max |cpu|:
  TOL_FLOAT  F32/F16/BF16 weights: the same f16 KV rounding and fp32 products on both sides; only
             the order of the float sums differs (warp trees against sequential loops), ~1e-6,
             and now and then a K or V element lands one f16 step apart. 1e-3.
  TOL_QUANT  quantized weights: both sides round activations to int8 the same way, but a float
             sum that differs in its last bit moves an activation sitting on a rounding boundary
             one int8 step, and two layers carry it (tests/model/test_forward.py's TOL_EMULATED,
             1e-2, for the same effect between float64 and float32). 2e-2.
The default model (30 layers): the bounds of tests/model/test_default_model.py, which the CPU's
own ISA paths need against each other for the same reason, in logits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hf_arch import ArchSpec, make_weights, write_gguf
from tiny_models import TinySpec, blocks_needed, forward_batch, forward_seq

from tinyserve import _core

TOL_FLOAT = 1e-3
TOL_QUANT = 2e-2
FLOAT_TYPES = ("F32", "F16", "BF16")
SMALL_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")  # rows of 64: blocks of 32
WIDE_TYPES = ("Q5_0", "Q5_1", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")  # rows of 256: super-blocks
PROMPT = [5, 17, 99, 3, 42, 42, 7, 120, 64, 1, 33, 80, 2]
# tests/model/test_default_model.py's bounds (logits) and prompts (SmolLM2 token ids)
TOL_MAX_ABS, TOL_ROW_STD, TOP1_MARGIN = 3.0, 0.5, 1.0
DEFAULT_PROMPTS = {
    "chat": [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
    "prose": [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 378, 2365, 6354, 16438],
    "code": [1604, 3987, 46477, 24, 94, 727, 472, 585, 304, 2067, 216, 34, 42, 448, 1003, 304, 472, 1003],
}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def spec_for(wtype: str, **kw) -> TinySpec:
    if wtype in WIDE_TYPES:
        return TinySpec(dim=256, hidden_dim=512, n_heads=4, n_kv_heads=2, wtype=wtype, seed=21, **kw)
    return TinySpec(wtype=wtype, seed=1, **kw)


def two_chunks(model, prompt, block_size=4) -> np.ndarray:
    """Logits of `prompt` in two prefill chunks over scattered (reversed) blocks of an f16 cache."""
    n = blocks_needed(len(prompt), block_size)
    kv = _core.KVCache(model, block_size=block_size, num_blocks=n + 1, dtype="f16")
    blocks = list(range(n, 0, -1))
    cut = len(prompt) * 2 // 3
    return np.concatenate(
        [forward_seq(model, kv, prompt[:cut], 0, blocks), forward_seq(model, kv, prompt[cut:], cut, blocks)]
    )


def both(path: Path, prompt=PROMPT) -> tuple[np.ndarray, np.ndarray]:
    cpu = _core.Model(str(path))
    gpu = _core.Model(str(path), device="cuda")
    assert gpu.device == "cuda" and gpu.device_description.startswith("cuda:0 ")
    return two_chunks(cpu, prompt), two_chunks(gpu, prompt)


def assert_top1(got: np.ndarray, ref: np.ndarray, tol: float) -> None:
    srt = np.sort(ref, axis=1)
    clear = srt[:, -1] - srt[:, -2] > 2 * tol * np.abs(ref).max()
    np.testing.assert_array_equal(got.argmax(1)[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("wtype", SMALL_TYPES + WIDE_TYPES)
def test_logits_match_cpu(gpu, tiny_model_path, wtype, tied):
    ref, got = both(tiny_model_path(spec_for(wtype, tied=tied)))
    tol = TOL_FLOAT if wtype in FLOAT_TYPES else TOL_QUANT
    assert rel_err(got, ref) < tol
    assert_top1(got, ref, tol)


def test_mixed_types_as_k_quant_files_mix_them(gpu, tiny_model_path):
    for spec in (spec_for("Q6_K", embd_type="Q5_0", out_type="Q8_0"), spec_for("Q4_K", embd_type="Q4_K", tied=True)):
        ref, got = both(tiny_model_path(spec))
        assert rel_err(got, ref) < TOL_QUANT


ARCHS = {
    "qwen2-bias": None,  # TinySpec below
    "gemma3": ArchSpec("gemma3", n_layers=7, n_kv_heads=1, head_dim=32, sliding_window=8, seed=21),
    "phi3-window": ArchSpec("phi3", rope_dim=8, sliding_window=8, seed=22),
    "phi3-longrope": ArchSpec("phi3", rope_scaling=("longrope", 32), seed=23),
    "qwen3": ArchSpec("qwen3", head_dim=24, seed=24),
    "llama3": ArchSpec("llama", rope_scaling=("llama3", 8.0, 1.0, 4.0, 32), seed=25),
    "llama-yarn": ArchSpec("llama", rope_scaling=("yarn", 4.0, 64), seed=26),
}


@pytest.mark.parametrize("case", list(ARCHS))
def test_architectures_match_cpu(gpu, tiny_model_path, tmp_path, case):
    if ARCHS[case] is None:
        path = tiny_model_path(TinySpec(arch="qwen2", seed=3))
    else:
        path = write_gguf(tmp_path / f"{case}.gguf", ARCHS[case], make_weights(ARCHS[case]))
    prompt = [(5 * i + 7) % 128 for i in range(37)]  # past the sliding windows of 8
    ref, got = both(path, prompt)
    assert rel_err(got, ref) < TOL_FLOAT
    assert_top1(got, ref, TOL_FLOAT)


@pytest.mark.parametrize("wtype", ["Q4_1", "Q6_K", "F16"])
def test_batch_invariance_on_the_gpu(gpu, tiny_model_path, wtype):
    """A sequence's logits do not depend on its batch, bit for bit: alone, in a ragged batch with
    others, prefilled whole, in chunks, or one token at a time."""
    model = _core.Model(str(tiny_model_path(spec_for(wtype))), device="cuda")
    rng = np.random.default_rng(7)
    bs = 4
    seqs = [list(rng.integers(0, 128, n)) for n in (13, 1, 7, 22, 5)]
    per = blocks_needed(max(map(len, seqs)), bs)
    kv = _core.KVCache(model, block_size=bs, num_blocks=per * len(seqs))
    tables = [list(range(i * per, (i + 1) * per)) for i in range(len(seqs))]
    alone = [forward_seq(model, kv, s, 0, t) for s, t in zip(seqs, tables)]
    batch = forward_batch(model, kv, [(s, 0, t) for s, t in zip(seqs, tables)])
    np.testing.assert_array_equal(batch, np.concatenate(alone))
    s, t = seqs[3], tables[3]
    chunks = np.concatenate([forward_seq(model, kv, s[:9], 0, t), forward_seq(model, kv, s[9:], 9, t)])
    np.testing.assert_array_equal(chunks, alone[3])
    steps = np.concatenate([forward_seq(model, kv, [tok], p, t) for p, tok in enumerate(s)])
    np.testing.assert_array_equal(steps, alone[3])


def test_cuda_graphs_replay_the_same_bits(gpu, tiny_model_path, monkeypatch):
    """TINYSERVE_CUDA_GRAPHS=1 captures a step's kernels once per shape and replays them with the
    next step's positions and block tables: the logits are the plain launches' bit for bit."""
    path = str(tiny_model_path(spec_for("Q4_K")))
    plain = _core.Model(path, device="cuda")
    monkeypatch.setenv("TINYSERVE_CUDA_GRAPHS", "1")  # read when the backend is made
    graphed = _core.Model(path, device="cuda")
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 128, n)) for n in (9, 4)]
    steps = [[[int(t)] for t in rng.integers(0, 128, len(prompts))] for _ in range(20)]
    tables = [list(range(0, 16)), list(range(16, 32))]

    def run(model):
        kv = _core.KVCache(model, block_size=4, num_blocks=32)
        out = [forward_batch(model, kv, [(p, 0, t) for p, t in zip(prompts, tables)])]
        pos = [len(p) for p in prompts]
        for toks in steps:  # the same shape every step: one graph, replayed with new positions
            out.append(forward_batch(model, kv, [(tk, p, t) for tk, p, t in zip(toks, pos, tables)]))
            pos = [p + 1 for p in pos]
        return np.concatenate(out)

    np.testing.assert_array_equal(run(graphed), run(plain))


def test_copied_block_continues_like_the_original(gpu, tiny_model_path):
    model = _core.Model(str(tiny_model_path(spec_for("Q8_0"))), device="cuda")
    kv = _core.KVCache(model, block_size=4, num_blocks=8)
    forward_seq(model, kv, PROMPT[:6], 0, [0, 1])
    kv.copy_block(1, 5)  # the partly filled block, copied (copy-on-write of a shared prefix)
    a = forward_seq(model, kv, PROMPT[6:9], 6, [0, 1, 2])
    b = forward_seq(model, kv, PROMPT[6:9], 6, [0, 5, 3])
    np.testing.assert_array_equal(a, b)


def test_cuda_kv_cache_is_f16_and_on_the_device(gpu, tiny_model_path):
    path = str(tiny_model_path(spec_for("Q8_0")))
    model = _core.Model(path, device="cuda")
    kv = _core.KVCache(model, block_size=4, num_blocks=4)
    assert kv.device == "cuda" and kv.dtype == "f16"
    with pytest.raises(ValueError, match="f16 only"):
        _core.KVCache(model, block_size=4, num_blocks=4, dtype="f32")
    cpu_kv = _core.KVCache(_core.Model(path), block_size=4, num_blocks=4)
    with pytest.raises(ValueError, match="KV cache is on cpu but the model is on cuda"):
        forward_seq(model, cpu_kv, [1, 2], 0, [0])
    with pytest.raises(ValueError, match="outside the vocabulary"):  # checked before the device is touched
        forward_seq(model, kv, [1, 100000], 0, [0])
    forward_seq(model, kv, [1, 2], 0, [0])  # and it keeps working


def _real_models() -> list[str]:
    paths = []
    try:
        from tinyserve.models.default import default_model_path

        paths.append(str(default_model_path(download=False)))
    except Exception:  # not cached: only what TINYSERVE_CUDA_TEST_MODELS names
        pass
    paths += [p for p in os.environ.get("TINYSERVE_CUDA_TEST_MODELS", "").split(os.pathsep) if p]
    return paths or ["(none cached)"]


@pytest.mark.parametrize("path", _real_models(), ids=lambda p: Path(p).name)
def test_real_model_logits_and_greedy_tokens(gpu, path):
    """Logits within the CPU ISAs' own bounds; greedy decoding, fed the CPU's tokens, picks the
    CPU's token at every step where the CPU's top two logits are more than TOP1_MARGIN apart."""
    if not os.path.isfile(path):
        pytest.skip(f"model file not available here: {path}")
    cpu, dev = _core.Model(path), _core.Model(path, device="cuda")
    n_vocab = cpu.config["n_vocab"]
    for name, prompt in DEFAULT_PROMPTS.items():
        prompt = [t % n_vocab for t in prompt]
        kvs = [_core.KVCache(m, block_size=16, num_blocks=8) for m in (cpu, dev)]
        blocks = list(range(8))
        ref, got = (forward_seq(m, kv, prompt, 0, blocks) for m, kv in zip((cpu, dev), kvs))
        err = got.astype(np.float64) - ref
        assert np.abs(err).max() < TOL_MAX_ABS, name
        assert (err - err.mean(1, keepdims=True)).std(1).max() < TOL_ROW_STD, name
        pos, last_ref, last_got = len(prompt), ref[-1], got[-1]
        for _ in range(32):
            srt = np.sort(last_ref)
            if srt[-1] - srt[-2] > TOP1_MARGIN:
                assert int(last_got.argmax()) == int(last_ref.argmax()), (name, pos)
            tok = [int(last_ref.argmax())]  # both continue with the CPU's token
            last_ref = forward_seq(cpu, kvs[0], tok, pos, blocks)[-1]
            last_got = forward_seq(dev, kvs[1], tok, pos, blocks)[-1]
            pos += 1


def test_engine_serves_from_the_gpu(gpu, tiny_model_path):
    """The scheduler, block manager and sampler above the seam are the CPU's: greedy text from
    LLM(device="cuda") is the GPU model's own greedy decoding."""
    from tinyserve.engine import SamplingParams, StoppingParams
    from tinyserve.llm import LLM

    path = str(tiny_model_path(spec_for("Q4_K")))
    llm = LLM(path, device="cuda")
    assert llm.model.core.device == "cuda"
    prompt = [5, 17, 99, 3, 42]
    llm.generate_text(prompt, SamplingParams(temperature=0.0), StoppingParams(max_tokens=12, ignore_eos=True))
    model = _core.Model(path, device="cuda")
    kv = _core.KVCache(model, block_size=16, num_blocks=4)
    logits = forward_seq(model, kv, prompt, 0, [0, 1])[-1]
    ids = []
    for i in range(12):
        ids.append(int(logits.argmax()))
        logits = forward_seq(model, kv, ids[-1:], len(prompt) + i, [0, 1])[-1]
    assert llm.last_stats.token_ids == ids
