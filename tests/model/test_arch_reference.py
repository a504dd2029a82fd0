"""Every architecture against an independent forward: Hugging Face transformers (CPU torch, float64)
on the same tiny random weights, written once as a transformers model and once as a GGUF laid out
like llama.cpp's converter does (tests/model/hf_arch.py). Slow: needs torch.

Errors are relative to the largest reference logit of the case (rel_err in test_forward.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hf_arch import ArchSpec, hf_logits, hf_model, make_weights, write_gguf
from test_forward import assert_top1, rel_err
from tiny_models import blocks_needed, forward_seq

from tinyserve import _core

torch = pytest.importorskip("torch", reason="the transformers reference needs torch (pip install torch)")
pytestmark = pytest.mark.slow

# --- tolerances -----------------------------------------------------------------------------------
# Measured over the 12 CASES below (the command in README "Architectures"), as max |ours - ref| /
# max |ref| over 40 positions x 128 logits:
#   F32 weights, f32 KV cache    4.5e-7 .. 2.1e-6   both sides compute with the same weight values;
#                                                   only float32 summation order differs
#   F16 weights, f16 KV cache    3.5e-4 .. 2.0e-3   K and V rounded to 2^-11 relative in the cache
#   Q8_0 weights, f16 KV cache   2.0e-2 .. 9.6e-2   the engine rounds activations to int8 per block
#                                                   of 32 before each matmul; transformers does not
TOL_FLOAT = 2e-5
TOL_FLOAT_KV16 = 5e-3
TOL_QUANT = 1.5e-1

PROMPT = [(7 * i + 3) % 128 for i in range(40)]  # longer than the sliding windows below

CASES = {
    # llama with Llama 3.1/3.2 rope scaling (rope_freqs.weight), YaRN and linear scaling
    "llama": ArchSpec("llama", seed=1),
    "llama-rope_freqs": ArchSpec("llama", rope_scaling=("llama3", 8.0, 1.0, 4.0, 32), seed=2),
    "llama-yarn": ArchSpec("llama", rope_scaling=("yarn", 4.0, 64), seed=3),
    "llama-linear": ArchSpec("llama", rope_scaling=("linear", 4.0), seed=4),
    # qwen3: QK-norm, head_dim (key_length) != dim / n_heads, no bias
    "qwen3": ArchSpec("qwen3", head_dim=24, seed=5),
    # gemma3: 7 layers = 5 sliding + 1 global + 1 sliding, one KV head, head_dim 32 != dim/heads
    "gemma3": ArchSpec("gemma3", n_layers=7, n_kv_heads=1, head_dim=32, sliding_window=8, seed=6),
    "gemma3-tied": ArchSpec("gemma3", n_layers=7, head_dim=32, sliding_window=8, tied=True, seed=7),
    "gemma3-no-window": ArchSpec("gemma3", n_layers=3, head_dim=32, seed=8),
    # phi3: fused qkv and gate_up; partial rotary with a sliding window; LongRoPE long and short
    "phi3": ArchSpec("phi3", seed=9),
    "phi3-partial-rope-window": ArchSpec("phi3", rope_dim=8, sliding_window=8, seed=10),
    "phi3-longrope-long": ArchSpec("phi3", rope_scaling=("longrope", 32), seed=11),
    "phi3-longrope-short": ArchSpec("phi3", rope_scaling=("longrope", 256), seed=12),
}


def run_tinyserve(path, tokens, kv_dtype="f32", bs=4):
    model = _core.Model(str(path))
    n = blocks_needed(len(tokens) + 32, bs)
    kv = _core.KVCache(model, block_size=bs, num_blocks=n, dtype=kv_dtype)
    return model, kv, forward_seq(model, kv, tokens, 0, list(range(n)))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_models")
    cache: dict[ArchSpec, tuple] = {}

    def get(spec: ArchSpec):
        if spec not in cache:
            w = make_weights(spec)
            cache[spec] = (write_gguf(root / f"m{len(cache)}.gguf", spec, w), w)
        return cache[spec]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(written, case):
    spec = CASES[case]
    path, w = written(spec)
    model, _, got = run_tinyserve(path, PROMPT)
    assert model.config["arch"] == spec.arch
    ref = hf_logits(spec, w, PROMPT)
    assert rel_err(got, ref) < TOL_FLOAT
    assert_top1(got, ref, TOL_FLOAT * np.abs(ref).max())


@pytest.mark.parametrize("case", ["llama-rope_freqs", "qwen3", "gemma3", "phi3-longrope-long"])
@pytest.mark.parametrize("wtype,kv_dtype,tol", [("F16", "f16", TOL_FLOAT_KV16), ("Q8_0", "f16", TOL_QUANT)])
def test_logits_match_transformers_f16_q8_0(written, case, wtype, kv_dtype, tol):
    spec = dataclasses.replace(CASES[case], wtype=wtype)
    path, w = written(spec)
    _, _, got = run_tinyserve(path, PROMPT, kv_dtype=kv_dtype)
    ref = hf_logits(spec, w, PROMPT)
    assert rel_err(got, ref) < tol
    assert_top1(got, ref, tol * np.abs(ref).max())


@pytest.mark.parametrize(
    "case", ["llama-rope_freqs", "llama-yarn", "qwen3", "gemma3", "phi3-partial-rope-window", "phi3-longrope-long"]
)
def test_greedy_tokens_equal_transformers(written, case):
    """Greedy decoding, token by token through the paged KV cache, past the sliding window:
    the same 24 tokens as transformers' greedy continuation (recomputed from scratch each step).
    The prompt (34 tokens) is longer than phi3-longrope-long's original context (32), because
    transformers picks the LongRoPE factors by the current sequence length and tinyserve (like
    llama.cpp) once, by the model's context length."""
    spec = CASES[case]
    path, w = written(spec)
    prompt = PROMPT[:34]
    model, kv, logits = run_tinyserve(path, prompt)
    blocks = list(range(kv.num_blocks))
    ours = [int(logits[-1].argmax())]
    for _ in range(23):
        ours.append(int(forward_seq(model, kv, [ours[-1]], len(prompt) + len(ours) - 1, blocks)[-1].argmax()))
    hf = hf_model(spec, w)
    seq, compared = list(prompt), 0
    with torch.no_grad():
        for step in range(24):
            out = hf(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].numpy()
            top2 = np.sort(out)[-2:]
            if top2[1] - top2[0] < 2 * TOL_FLOAT * np.abs(out).max():
                break  # a near tie: either pick is right, and the continuations part here
            seq.append(int(out.argmax()))
            assert ours[step] == seq[-1], (
                f"step {step}: tinyserve {ours[: step + 1]}, transformers {seq[len(prompt) :]}"
            )
            compared += 1
    assert compared >= 8, f"only {compared} tokens before a near tie: pick another seed"


@pytest.mark.parametrize(
    "case", ["llama", "llama-rope_freqs", "qwen3", "gemma3", "gemma3-tied", "phi3", "phi3-longrope-long"]
)
def test_gguf_layout_is_what_transformers_reads(written, case):
    """Our GGUF writer against transformers' own GGUF reader (integrations/ggml): reading the file
    back gives exactly the transformers weights we started from, so the layout both tinyserve and
    this test assume (permuted llama q/k, gemma's 1 + w norms, phi3's fused rows) is also
    transformers' reading of llama.cpp's format, not ours alone."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    spec = CASES[case]
    path, w = written(spec)
    model = hf_model(spec, w)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)
    assert parsed["config"]["tie_word_embeddings"] == spec.tied
    tensors = parsed["tensors"]
    for name, want in model.state_dict().items():
        if "rotary_emb" in name or (spec.tied and name == "lm_head.weight"):
            continue
        assert name in tensors, f"transformers reads no {name} from the GGUF"
        # gemma's norms go through float32 1 + w and back: exact to one float32 step of 1.0
        atol = 2.0**-23 if spec.arch == "gemma3" and name.endswith("norm.weight") else 0.0
        np.testing.assert_allclose(tensors[name].double().numpy(), want.numpy(), rtol=0, atol=atol, err_msg=name)
