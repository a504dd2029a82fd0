"""The new architectures' properties that need no reference model: what the loader reads from the
metadata, sliding-window masking, bitwise batch invariance, every ISA path, clear errors.
(Their logits against transformers: test_arch_reference.py.)"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from hf_arch import ArchSpec, make_weights, write_gguf
from tiny_models import forward_batch, forward_chunks, forward_seq, model_cache

from tinyserve import _core

GEMMA = ArchSpec("gemma3", n_layers=7, n_kv_heads=1, head_dim=32, sliding_window=8, seed=21)
PHI3_WINDOW = ArchSpec("phi3", rope_dim=8, sliding_window=8, seed=22)  # every layer sliding
PHI3_LONGROPE = ArchSpec("phi3", rope_scaling=("longrope", 32), seed=23)
QWEN3 = ArchSpec("qwen3", head_dim=24, seed=24)
LLAMA3 = ArchSpec("llama", rope_scaling=("llama3", 8.0, 1.0, 4.0, 32), seed=25)
LLAMA_YARN = ArchSpec("llama", rope_scaling=("yarn", 4.0, 64), seed=26)
ALL = {
    "gemma3": GEMMA,
    "phi3-window": PHI3_WINDOW,
    "phi3-longrope": PHI3_LONGROPE,
    "qwen3": QWEN3,
    "llama3": LLAMA3,
    "llama-yarn": LLAMA_YARN,
}
TOKENS = [(5 * i + 7) % 128 for i in range(37)]


@pytest.fixture(scope="module")
def arch_path(tmp_path_factory):
    return model_cache(tmp_path_factory.mktemp("arch"), lambda path, spec: write_gguf(path, spec, make_weights(spec)))


def test_gemma3_config(arch_path):
    c = _core.Model(str(arch_path(GEMMA))).config
    assert (c["arch"], c["head_dim"], c["n_heads"], c["n_kv_heads"]) == ("gemma3", 32, 4, 1)
    # every 6th layer global, as transformers' sliding_window_pattern and llama.cpp
    assert c["sliding_layers"] == [True, True, True, True, True, False, True]
    assert c["sliding_window"] == 8
    assert (c["rope_base"], c["rope_base_local"]) == (10000.0, 10000.0)
    assert c["embd_scale"] == pytest.approx(math.sqrt(64)) and c["attn_scale"] == pytest.approx(32**-0.5)
    assert (c["ffn_act"], c["qk_norm"], c["post_norms"], c["rope_type"]) == ("gelu_tanh", True, True, "neox")


def test_other_configs(arch_path):
    q = _core.Model(str(arch_path(QWEN3))).config
    assert (q["head_dim"], q["qk_norm"], q["qkv_bias"], q["sliding_window"]) == (24, True, False, 0)
    p = _core.Model(str(arch_path(PHI3_WINDOW))).config
    assert (p["fused_qkv"], p["fused_gate_up"], p["rope_dim"], p["head_dim"]) == (True, True, 8, 16)
    assert p["sliding_layers"] == [True, True] and p["sliding_window"] == 8
    lr = _core.Model(str(arch_path(PHI3_LONGROPE))).config
    assert lr["rope_freq_factors"] and lr["rope_attn_factor"] == pytest.approx(
        math.sqrt(1 + math.log(8) / math.log(32))
    )
    assert _core.Model(str(arch_path(LLAMA3))).config["rope_freq_factors"]
    y = _core.Model(str(arch_path(LLAMA_YARN))).config
    assert y["rope_yarn"] and y["rope_scale"] == 4.0 and y["rope_type"] == "norm"


def test_sliding_window_hides_what_fell_out(arch_path):
    """phi3 with every layer sliding (window 8, 2 layers): position p sees tokens back to p - 14 at
    most, so changing token 0 leaves positions >= 15 bit for bit unchanged and changes earlier
    ones. gemma3 has a global layer: there token 0 reaches every position."""
    for spec, reach in ((PHI3_WINDOW, 15), (GEMMA, None)):
        model = _core.Model(str(arch_path(spec)))
        outs = []
        for first in (TOKENS[0], (TOKENS[0] + 1) % 128):
            kv = _core.KVCache(model, block_size=4, num_blocks=10)
            outs.append(forward_seq(model, kv, [first] + TOKENS[1:], 0, list(range(10))))
        same = [bool(np.array_equal(a, b)) for a, b in zip(*outs, strict=True)]
        if reach is None:
            assert not any(same)
        else:
            assert same == [False] * reach + [True] * (len(TOKENS) - reach)


@pytest.mark.parametrize("kv_dtype", ["f32", "f16"])
@pytest.mark.parametrize("case", list(ALL))
def test_prefill_chunks_decode_bitwise(arch_path, case, kv_dtype):
    """One prefill, chunks that cross the window and block edges, token by token: the same bits."""
    model = _core.Model(str(arch_path(ALL[case])))

    def run(chunks):
        return forward_chunks(model, TOKENS, chunks, 4, kv_dtype)

    whole = run([len(TOKENS)])
    assert np.array_equal(whole, run([5, 9, 1, 3, 19]))
    assert np.array_equal(whole, run([1] * len(TOKENS)))


@pytest.mark.parametrize("case", ["gemma3", "phi3-window", "qwen3"])
def test_many_sequence_decode_equals_prefill(arch_path, case):
    """Decode as the engine runs it: 10 sequences over 16-position blocks at random places, one row
    each, in one forward (the per-row attention path over whole and partial blocks, sliding
    windows starting inside a block) for 3 steps, on 2 threads. Every row has the bits of the
    same position in a prefill of the whole sequence (the multi-row path) and of the sequence
    decoded alone (one row: the per-head path)."""
    model = _core.Model(str(arch_path(ALL[case])))
    rng = np.random.default_rng(31)
    bs, n_seq, steps = 16, 10, 3
    lens = rng.integers(5, 60, size=n_seq)
    toks = [rng.integers(0, 128, size=int(n) + steps).tolist() for n in lens]
    per = -(-(int(lens.max()) + steps) // bs)
    ids = rng.permutation(n_seq * per)
    blocks = [ids[per * s : per * (s + 1)].tolist() for s in range(n_seq)]
    before = _core.get_num_threads()
    try:
        _core.set_num_threads(2)
        kv = _core.KVCache(model, block_size=bs, num_blocks=n_seq * per, dtype="f16")
        for s in range(n_seq):
            forward_seq(model, kv, toks[s][: lens[s]], 0, blocks[s])
        decoded = [
            forward_batch(model, kv, [([toks[s][lens[s] + i]], int(lens[s]) + i, blocks[s]) for s in range(n_seq)])
            for i in range(steps)
        ]
        for s in range(n_seq):
            whole = forward_chunks(model, toks[s], [len(toks[s])], bs, "f16")
            alone = forward_chunks(model, toks[s], [int(lens[s])] + [1] * steps, bs, "f16")
            for i in range(steps):
                p = int(lens[s]) + i
                assert np.array_equal(decoded[i][s], whole[p]), f"sequence {s}, step {i}: decode != prefill"
                assert np.array_equal(decoded[i][s], alone[p]), f"sequence {s}, step {i}: batched != alone"
    finally:
        _core.set_num_threads(before)


@pytest.mark.parametrize("case", ["gemma3", "phi3-window", "qwen3"])
def test_ragged_batch_rows_equal_sequences_alone(arch_path, case):
    model = _core.Model(str(arch_path(ALL[case])))
    bs = 4
    a, b = TOKENS[:23], TOKENS[3:14]
    kv = _core.KVCache(model, block_size=bs, num_blocks=12, dtype="f16")
    blk_a, blk_b = [0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]
    first = forward_batch(model, kv, [(a[:17], 0, blk_a), (b[:10], 0, blk_b)])
    second = forward_batch(model, kv, [(b[10:], 10, blk_b), (a[17:], 17, blk_a)])
    alone_a = forward_seq(model, _core.KVCache(model, block_size=bs, num_blocks=6, dtype="f16"), a, 0, list(range(6)))
    alone_b = forward_seq(model, _core.KVCache(model, block_size=bs, num_blocks=6, dtype="f16"), b, 0, list(range(6)))
    assert np.array_equal(np.concatenate([first[:17], second[1:]]), alone_a)
    assert np.array_equal(np.concatenate([first[17:], second[:1]]), alone_b)


ISA_SCRIPT = """
import sys
import numpy as np
from tinyserve import _core
sys.path.insert(0, sys.argv[1])
from tiny_models import forward_seq
model = _core.Model(sys.argv[2])
kv = _core.KVCache(model, block_size=4, num_blocks=10, dtype="f16")
tokens = [int(t) for t in sys.argv[4].split(",")]
np.save(sys.argv[3], forward_seq(model, kv, tokens, 0, list(range(10))))
"""


@pytest.mark.parametrize("isa", _core.available_isas())
def test_every_isa_agrees_on_gemma3(arch_path, tmp_path, isa):
    """Each ISA's ops (GeGLU, QK-norm through rmsnorm, attention with a window) against the scalar
    path on the gemma3 model with Q8_0 weights: the same int8 activations on both sides, so only
    float summation order and the SIMD exp differ (seen 8.7e-8 of the largest logit)."""
    spec = dataclasses.replace(GEMMA, wtype="Q8_0")
    path = arch_path(spec)
    got = {}
    for name in ("scalar", isa):
        out = tmp_path / f"{name}.npy"
        subprocess.run(
            [
                sys.executable,
                "-c",
                ISA_SCRIPT,
                str(Path(__file__).parent),
                str(path),
                str(out),
                ",".join(map(str, TOKENS)),
            ],
            env=dict(os.environ, TINYSERVE_ISA=name),
            check=True,
            timeout=120,
        )
        got[name] = np.load(out).astype(np.float64)
    assert np.abs(got[isa] - got["scalar"]).max() / np.abs(got["scalar"]).max() < 1e-5


def _rewrite(src: Path, dst: Path, drop: tuple[str, ...] = (), add=None, tensors=None, arch=None) -> Path:
    """Copy a GGUF, dropping metadata keys and tensors named in `drop`, adding keys
    (key -> (value, GGUFValueType)), replacing tensors (name -> array), renaming the architecture."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop:
            continue
        w.add_key_value(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for k, (v, t) in (add or {}).items():
        w.add_key_value(k, v, t)
    for t in r.tensors:
        if t.name in drop:
            continue
        if tensors and t.name in tensors:
            w.add_tensor(t.name, tensors[t.name])
        else:
            w.add_tensor(
                t.name, np.asarray(t.data), raw_shape=list(reversed([int(n) for n in t.shape])), raw_dtype=t.tensor_type
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_bad_architecture_files_are_clear_errors(arch_path, tmp_path):
    S = gguf.GGUFValueType.STRING
    llama = arch_path(LLAMA3)
    bad_scaling = _rewrite(
        llama,
        tmp_path / "s.gguf",
        drop=("llama.rope.scaling.type",),
        add={"llama.rope.scaling.type": ("dynamic-ntk", S)},
    )
    with pytest.raises(
        _core.GGUFError, match=r"unsupported rope scaling type 'dynamic-ntk' \(supported: none, linear, yarn\)"
    ):
        _core.Model(str(bad_scaling))
    bad_factor = _rewrite(llama, tmp_path / "f.gguf", tensors={"rope_freqs.weight": np.full(8, -1.0, np.float32)})
    with pytest.raises(_core.GGUFError, match=r"rope_freqs.weight.*rope factors must be positive"):
        _core.Model(str(bad_factor))
    short_factor = _rewrite(llama, tmp_path / "g.gguf", tensors={"rope_freqs.weight": np.ones(5, np.float32)})
    with pytest.raises(_core.GGUFError, match=r"tensor 'rope_freqs.weight' has shape \[5\], expected \[8\]"):
        _core.Model(str(short_factor))
    phi = arch_path(PHI3_WINDOW)
    half_up = _rewrite(phi, tmp_path / "p.gguf", tensors={"blk.1.ffn_up.weight": np.zeros((96, 64), np.float32)})
    with pytest.raises(
        _core.GGUFError, match=r"tensor 'blk.1.ffn_up.weight' has shape \[64, 96\], expected \[64, 192\]"
    ):
        _core.Model(str(half_up))
    gemma = arch_path(GEMMA)
    no_post = _rewrite(gemma, tmp_path / "n.gguf", drop=("blk.3.post_ffw_norm.weight",))
    with pytest.raises(_core.GGUFError, match=r"missing tensor 'blk.3.post_ffw_norm.weight'"):
        _core.Model(str(no_post))
    other = _rewrite(gemma, tmp_path / "o.gguf", arch="gemma2")
    with pytest.raises(
        _core.GGUFError, match=r"unsupported architecture 'gemma2' \(supported: llama, qwen2, qwen3, gemma3, phi3\)"
    ):
        _core.Model(str(other))
