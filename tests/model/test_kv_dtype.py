"""The KV cache's element type (q8_0 / f16 / f32): block sizes from the real layout, the engine and
config plumbing, and the int8 cache on the real default model (prefix caching, quality)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import TinySpec, run_greedy

from tinyserve import _core
from tinyserve.config import ServerConfig
from tinyserve.engine import EngineConfig, LLMEngine, ParamError, SamplingParams
from tinyserve.engine.params import KV_DTYPES

K = _core.kernels
GREEDY = SamplingParams(temperature=0.0)


def layout_block_bytes(n_layers: int, n_kv_heads: int, hd: int, bs: int, dtype: str) -> int:
    """Bytes of one block from the documented layouts: f16/f32 runs of bs * hd elements; q8_0 runs
    as kernels.h's KV8Layout (K tiles of 16 positions, V rows, fp16 scales per 32, 64-byte padding)."""
    if dtype == "q8_0":
        L = K.kv8_layout(hd, bs)
        run = L["k_run_bytes"] + L["v_run_bytes"]
    else:
        run = 2 * bs * hd * (2 if dtype == "f16" else 4)
    return n_layers * n_kv_heads * run


@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("shape", [(30, 3, 64, 16), (18, 1, 256, 16), (24, 2, 64, 32), (2, 2, 16, 4), (3, 1, 13, 5)])
def test_block_bytes_follow_the_layout(shape, dtype):
    n_layers, n_kv_heads, hd, bs = shape
    got = _core.KVCache.block_bytes(n_layers, n_kv_heads, hd, bs, dtype)
    assert got == layout_block_bytes(n_layers, n_kv_heads, hd, bs, dtype)


@pytest.mark.parametrize("hd", [64, 128, 256])
def test_q8_0_holds_nearly_twice_the_positions_of_f16(hd):
    """int8 plus one fp16 scale per 32 elements: 34/64 of f16's bytes at block sizes that are a
    multiple of 16, so 1.88x the positions (and sequences) per byte of budget."""
    f16 = _core.KVCache.block_bytes(30, 3, hd, 16, "f16")
    q8 = _core.KVCache.block_bytes(30, 3, hd, 16, "q8_0")
    assert q8 * 64 == f16 * 34
    assert f16 / q8 > 1.88


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_cache_and_engine_size_blocks_from_the_real_bytes(tiny_model_path, dtype):
    spec = TinySpec(wtype="Q8_0", dim=128, n_heads=4, n_kv_heads=2, seed=31)
    model = _core.Model(str(tiny_model_path(spec)))
    c = model.config
    per_block = _core.KVCache.block_bytes(c["n_layers"], c["n_kv_heads"], c["head_dim"], 16, dtype)
    budget = 1000 * per_block + per_block // 2
    kv = _core.KVCache(model, block_size=16, budget_bytes=budget, dtype=dtype)
    assert (kv.dtype, kv.bytes_per_block, kv.num_blocks) == (dtype, per_block, 1000)
    assert kv.total_bytes == 1000 * per_block
    from tinyserve.models.loader import load_model

    engine = LLMEngine(load_model(tiny_model_path(spec)), EngineConfig(kv_budget_bytes=budget, kv_dtype=dtype))
    st = engine.stats()
    assert engine.scheduler.block_manager.num_blocks == st.kv_blocks_total == 1000
    assert (st.kv_dtype, st.kv_bytes_per_block, st.kv_bytes_total, st.kv_tokens_total) == (
        dtype,
        per_block,
        1000 * per_block,
        16000,
    )


def test_fake_forward_engine_sizes_blocks_like_the_cache(tiny_model_path):
    """Without a core forward (scheduler tests) the engine still divides the budget by the real
    bytes of a block of the chosen type."""
    from tinyserve.models.loader import load_model

    m = load_model(tiny_model_path(TinySpec(seed=32)))
    c = m.config
    for dtype in KV_DTYPES:
        per_block = _core.KVCache.block_bytes(c["n_layers"], c["n_kv_heads"], c["head_dim"], 8, dtype)
        engine = LLMEngine(
            m, EngineConfig(block_size=8, kv_budget_bytes=77 * per_block, kv_dtype=dtype), forward=lambda *a: None
        )
        assert engine.scheduler.block_manager.num_blocks == 77
        assert engine.stats().kv_bytes_per_block == per_block


def test_kv_dtype_is_checked_everywhere(tiny_model_path, monkeypatch):
    model = _core.Model(str(tiny_model_path(TinySpec(seed=33))))
    with pytest.raises(ValueError, match="'f16', 'q8_0' or 'f32'"):
        _core.KVCache(model, num_blocks=2, dtype="q4_0")
    with pytest.raises(ValueError, match="'f16', 'q8_0' or 'f32'"):
        _core.KVCache.block_bytes(2, 2, 16, 16, "int8")
    with pytest.raises(ParamError) as e:
        EngineConfig(kv_dtype="int8").validate()
    assert e.value.field == "engine.kv_dtype" and "q8_0" in e.value.message
    with pytest.raises(ValueError, match="kv_dtype"):
        ServerConfig(kv_dtype="bf16").validate()
    # $TINYSERVE_KV_DTYPE is the default of the engine, the server and the CLI
    for value in ("f16", "q8_0"):
        monkeypatch.setenv("TINYSERVE_KV_DTYPE", value)
        assert EngineConfig().kv_dtype == ServerConfig().kv_dtype == value
        from tinyserve.cli import _engine_config, build_parser

        for cmd in (["perplexity", "x.txt"], ["generate", "hi"], ["chat"], ["info"]):
            assert _engine_config(build_parser().parse_args(cmd)).kv_dtype == value
        assert _engine_config(build_parser().parse_args(["chat", "--kv-dtype", "f32"])).kv_dtype == "f32"
    monkeypatch.setenv("TINYSERVE_KV_DTYPE", "fp8")
    with pytest.raises(ParamError, match="TINYSERVE_KV_DTYPE"):
        EngineConfig().validate()


def test_serve_flag_takes_the_dtype_and_refuses_others(monkeypatch, capsys):
    """`tinyserve serve --kv-dtype` is ServerConfig's flag: its choices are KV_DTYPES, its default
    $TINYSERVE_KV_DTYPE (read when the parser is built), and it reaches every model's engine."""
    import argparse

    from tinyserve.cli import add_serve_arguments, config_from_args

    def parse(argv):
        p = argparse.ArgumentParser()
        add_serve_arguments(p)
        return config_from_args(p.parse_args(argv))

    assert parse(["--kv-dtype", "q8_0"]).engine_config().kv_dtype == "q8_0"
    monkeypatch.setenv("TINYSERVE_KV_DTYPE", "q8_0")
    assert parse([]).kv_dtype == "q8_0"
    assert parse(["--kv-dtype", "f16"]).engine_config().kv_dtype == "f16"
    with pytest.raises(SystemExit):
        parse(["--kv-dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_metrics_report_the_cache_size_and_dtype(tiny_model_path):
    """tinyserve_kv_cache_bytes / _tokens, labelled with the dtype, are the engine's real arena;
    q8_0's holds 64/34 the positions of f16's in the same budget (head_dim 64)."""
    from tinyserve.metrics import Metrics
    from tinyserve.models.loader import load_model

    model = load_model(tiny_model_path(TinySpec(wtype="Q8_0", dim=256, n_heads=4, n_kv_heads=2, seed=35)))
    metrics = Metrics()
    tokens = {}
    for dtype in ("f16", "q8_0"):
        engine = LLMEngine(model, EngineConfig(kv_budget_bytes=4 << 20, kv_dtype=dtype))
        metrics.for_model(f"m-{dtype}", dtype).observe_kv_cache(engine.stats())
        body = metrics.exposition().decode()
        line = f'tinyserve_kv_cache_bytes{{kv_dtype="{dtype}",model="m-{dtype}"}} '
        assert float(body.split(line)[1].split()[0]) == engine.kv.total_bytes <= 4 << 20
        line = f'tinyserve_kv_cache_tokens{{kv_dtype="{dtype}",model="m-{dtype}"}} '
        tokens[dtype] = float(body.split(line)[1].split()[0])
        assert tokens[dtype] == engine.kv.num_blocks * 16
    assert tokens["q8_0"] / tokens["f16"] == pytest.approx(64 / 34, rel=0.01)


def test_copy_block_and_prefix_reuse_keep_their_meaning_in_q8_0(tiny_model_path):
    """Two requests with one prompt through the engine on a q8_0 cache: the second reuses the
    first's full blocks and yields the same greedy tokens; the KV comes back."""
    from tinyserve.models.loader import load_model

    engine = LLMEngine(
        load_model(tiny_model_path(TinySpec(wtype="Q4_1", context_length=256, seed=34))),
        EngineConfig(block_size=4, num_kv_blocks=64, kv_dtype="q8_0"),
    )
    prompt = [(7 * i + 3) % 128 for i in range(23)]

    first, c1 = run_greedy(engine, "a", prompt, 9)
    second, c2 = run_greedy(engine, "b", prompt, 9)
    assert c1 == 0 and c2 == (len(prompt) - 1) // 4 * 4
    assert second == first and len(first) == 9
    assert engine.stats().kv_blocks_used == 0


# ---- the real default model --------------------------------------------------------------------
@pytest.mark.slow
def test_q8_0_perplexity_within_half_a_percent_of_f16(default_model_path):
    """The quality target on the default model: GPL-3's first 9,000 characters (Debian ships it;
    tests/model/test_real_models.py uses the same), windows of 256 tokens."""
    from pathlib import Path

    from tinyserve.llm import LLM

    text = Path("/usr/share/common-licenses/GPL-3").read_text(encoding="utf-8")[:9000]
    ppl = {
        d: LLM(default_model_path, engine_config=EngineConfig(kv_dtype=d)).perplexity(text, ctx=256).ppl
        for d in ("f16", "q8_0")
    }
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.005, ppl
    assert ppl["q8_0"] != ppl["f16"], "the two caches should not compute the same thing"


@pytest.mark.slow
def test_q8_0_greedy_decode_is_batch_invariant_on_the_real_model(default_model_path):
    """A sequence decoded alone and the same sequence decoded beside 5 others: the same logits,
    bit for bit (the int8 attention's results never depend on the batch)."""
    from tiny_models import forward_batch

    model = _core.Model(str(default_model_path))
    kv = _core.KVCache(model, block_size=16, num_blocks=48, dtype="q8_0")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, model.config["n_vocab"], 40 + 7 * i).astype(np.int32) for i in range(6)]
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(6)]
    forward_batch(model, kv, [(p, 0, t) for p, t in zip(prompts, tables)])
    step = forward_batch(model, kv, [([5], len(p), t) for p, t in zip(prompts, tables)])
    alone_kv = _core.KVCache(model, block_size=16, num_blocks=8, dtype="q8_0")
    forward_batch(model, alone_kv, [(prompts[3], 0, list(range(8)))])
    alone = forward_batch(model, alone_kv, [([5], len(prompts[3]), list(range(8)))])
    assert np.array_equal(step[3], alone[0])


@pytest.mark.slow
def test_bench_engine_measures_dtypes_side_by_side(default_model_path):
    """`bench engine --kv-dtype f16,q8_0`: each type's figures under by_kv_dtype, with its real KV
    bytes per token; the top-level figures are the first type's (no timing asserts)."""
    import subprocess
    import sys

    from realservers import cli_json

    out = cli_json(
        *("bench", "engine", "--model", str(default_model_path), "--threads", "1", "--prompt-sizes", "16"),
        *("--batches", "2", "--gen", "3", "--reps", "2", "--kv-dtype", "q8_0,f16", "--json"),
        timeout=300,
    )
    c = _core.Model(str(default_model_path)).config
    assert out["kv_dtype"] == "q8_0" and set(out["by_kv_dtype"]) == {"q8_0", "f16"}
    for d, figs in out["by_kv_dtype"].items():
        assert figs["kv_bytes_per_token"] * 16 == _core.KVCache.block_bytes(
            c["n_layers"], c["n_kv_heads"], c["head_dim"], 16, d
        )
        assert figs["pp16"] > 0 and figs["tg3_b2"] > 0
    assert out["tg3_b2"] == out["by_kv_dtype"]["q8_0"]["tg3_b2"]
    bad = subprocess.run(
        [sys.executable, "-m", "tinyserve.cli", "bench", "engine", "--kv-dtype", "f16,int4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "int4" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_info_reports_the_dtypes_bytes_and_positions_per_mib(default_model_path):
    """`tinyserve info --kv-dtype q8_0` on SmolLM2 (30 layers, 3 KV heads of 64): Q8_0's 34 bytes per
    32 elements for K and V, and the positions a MiB of --kv-budget-mb holds, beside f16's."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "tinyserve.cli", "info", "--model", str(default_model_path), "--kv-dtype", "q8_0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    row = next(x for x in r.stdout.splitlines() if x.startswith("KV bytes per token:")).split(":", 1)[1]
    q8, f16 = 2 * 30 * 3 * 64 * 34 // 32, 2 * 30 * 3 * 64 * 2
    assert row.split()[0] == str(q8) and f"(q8_0; f16: {f16})" in row
    assert f"{(1 << 20) / q8:.0f} tokens per MiB" in row and f"(f16: {(1 << 20) / f16:.0f})" in row
