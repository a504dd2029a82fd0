"""The fuzz harnesses' seed corpora (make_seeds.py) are what they claim to be: every model seed
loads and runs, together they cover every architecture and weight type the loader accepts, the
GGUF seeds read as gguf-py (an independent reader) reads them, the tokenizer seeds build, and the
dictionary parses. A seed that stopped loading would leave the fuzzer mutating files that never
get past the first check. (The harnesses themselves run under tools/fuzz.sh, not pytest.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "model"))

import make_seeds  # noqa: E402
from tiny_models import forward_batch  # noqa: E402

_core = pytest.importorskip("tinyserve._core")


# the model config's feature flags (Model.config) that the seeds must each switch on
FLAGS = ("tied_output", "qkv_bias", "qk_norm", "fused_qkv", "fused_gate_up", "rope_freq_factors", "rope_yarn")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, list[Path]]:
    return make_seeds.write_seeds(tmp_path_factory.mktemp("seeds"))


def test_model_seeds_cover_every_architecture_and_weight_type(seeds):
    archs, types, features = set(), set(), set()
    for path in seeds["model"]:
        m = _core.Model(str(path))
        c = m.config
        archs.add(c["arch"])
        types.update(t for _, t, shape in m.tensors() if len(shape) == 2)
        for flag in FLAGS:
            if c[flag]:
                features.add(flag)
        if any(c["sliding_layers"]) and not all(c["sliding_layers"]):
            features.add("sliding and global layers")
        if c["sliding_window"] and all(c["sliding_layers"]):
            features.add("every layer sliding")
        if c["rope_scale"] != 1.0:
            features.add("rope scale")
        if c["repacked_bytes"]:
            features.add("repacked")
    assert archs == set(make_seeds.ARCHS)
    assert types == set(make_seeds.WEIGHT_TYPES)
    assert features == {*FLAGS, "sliding and global layers", "every layer sliding", "rope scale", "repacked"}


def test_every_model_seed_runs_the_harness_batch(seeds):
    """What fuzz_model does with a file that loads: two sequences prefilled in one ragged batch
    (crossing a block edge), then one decode step each; every logit finite, except for the seeds
    made to carry NaN/Inf weights, which must only run."""
    for path in seeds["model"]:
        m = _core.Model(str(path))
        n = m.config["n_vocab"]
        for dtype in ("f16", "f32"):
            kv = _core.KVCache(m, block_size=4, num_blocks=3, dtype=dtype)
            a, b = [(7 * i + 3) % n for i in range(5)], [(5 * i + 1) % n for i in range(3)]
            first = forward_batch(m, kv, [(a, 0, [0, 1]), (b, 0, [2])], logit_rows=[4, 7])
            second = forward_batch(m, kv, [([1 % n], 3, [2]), ([2 % n], 5, [0, 1])])
            assert first.shape == (2, n) and second.shape == (2, n)
            if "nonfinite" not in path.name:
                assert np.isfinite(first).all() and np.isfinite(second).all(), path.name


def test_gguf_seeds_read_as_gguf_py_reads_them(seeds):
    for path in seeds["gguf"]:
        if path.name == "model-header-only.gguf":
            with pytest.raises(_core.GGUFError, match=r"data .* lies outside the file"):
                _core.read_gguf(str(path))
            continue
        ours = _core.read_gguf(str(path))
        theirs = gguf.GGUFReader(str(path))
        assert ours["data_offset"] == theirs.data_offset, path.name
        assert [(name, shape) for name, _, shape in ours["tensors"]] == [
            (t.name, tuple(int(d) for d in t.shape)) for t in theirs.tensors
        ], path.name
        assert set(ours["metadata"]) == {k for k in theirs.fields if not k.startswith("GGUF.")}, path.name


def test_tokenizer_seeds_build_and_encode(seeds):
    from tinyserve.models.tokenizer import Tokenizer

    models = set()
    for path in seeds["tokenizer"]:
        tok = Tokenizer.from_gguf(path)
        models.add(tok.model)
        ids = tok.encode("hello world")
        assert ids and tok.decode(ids).strip().endswith("world"), path.name
    assert models == {"gpt2", "llama"}


def test_tokenizer_harness_passes_its_seeds(seeds):
    """fuzz_tokenizer's checks, run once on each seed without the fuzzer (atheris installed only)."""
    pytest.importorskip("atheris")
    import fuzz_tokenizer

    for path in seeds["tokenizer"] + seeds["gguf"]:
        fuzz_tokenizer.TestOneInput(path.read_bytes())


def test_dictionary_is_libfuzzer_syntax():
    """libFuzzer refuses the whole run on one bad line: every entry is a quoted string of printable
    ASCII, \\\\, \\" or \\xNN escapes."""
    entry = re.compile(r'^(\w+=)?"(?:[ !#-\[\]-~]|\\\\|\\"|\\x[0-9a-fA-F]{2})+"$')
    lines = [ln for ln in (HERE / "gguf.dict").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) > 100
    assert [ln for ln in lines if not entry.match(ln)] == []
