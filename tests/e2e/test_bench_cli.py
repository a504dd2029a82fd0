"""`tinyserve bench engine` prints one JSON object last, with the documented keys (no timing asserts)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from realservers import cli_json


@pytest.mark.slow
def test_bench_engine_json_shape(default_model_path):
    out = cli_json(
        *("bench", "engine", "--model", str(default_model_path), "--threads", "1", "--prompt-sizes", "32"),
        *("--batches", "1,2", "--gen", "4", "--reps", "1", "--json"),
        timeout=300,
    )
    for key in ("pp32", "pp32_gflops", "tg4_b1", "tg4_b1_gbps", "tg4_b2", "isa", "threads"):
        assert key in out, key
    assert out["threads"] == 1
    assert out["pp32"] > 0 and out["tg4_b2"] > 0
    # single-sequence decode against the measured roofline (the threads reading the step's bytes)
    assert out["peak_gbps"] > 0
    assert out["tg4_b1_roofline"] == pytest.approx(out["tg4_b1_gbps"] / out["peak_gbps"], abs=2e-3)


def test_bench_help_lists_the_benchmarks():
    r = subprocess.run([sys.executable, "-m", "tinyserve.cli", "bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in ("engine", "serve", "noisy"):
        assert name in r.stdout


@pytest.mark.slow
def test_bench_noisy_runs_the_engine_defaults_and_reports_the_ratios(default_model_path):
    out = cli_json(
        *("bench", "noisy", "--model", str(default_model_path), "--phases", "alone,a-alone,fair"),
        *("--a-streams", "2", "--a-prompt-tokens", "16", "--a-output-tokens", "4"),
        *("--b-requests", "2", "--b-prompt-tokens", "8", "--b-output-tokens", "2"),
        *("--duration", "5", "--warmup", "0.2", "--kv-mb", "16", "--json"),  # (B's 2 requests end it)
        timeout=600,
    )
    from tinyserve.engine import EngineConfig

    d = EngineConfig()
    eng = out["settings"]["engine"]
    assert (eng["max_num_batched_tokens"], eng["contended_step_tokens"], eng["max_num_seqs"]) == (
        d.max_num_batched_tokens,
        d.contended_step_tokens,
        d.max_num_seqs,
    )  # no hand-picked budget
    assert eng["kv_budget_bytes"] == 16 << 20
    assert out["phases"]["a-alone"]["a_output_tokens_per_s"] > 0
    # A alone floods for as long as A flooded beside B (the same window from the flood's start)
    assert out["phases"]["a-alone"]["a_tokens_per_s"] > out["phases"]["a-alone"]["a_output_tokens_per_s"]
    assert out["phases"]["a-alone"]["seconds"] >= out["phases"]["fair"]["seconds"] - 0.1  # (rounded)
    assert out["phases"]["fair"]["b_requests"] == 2 and out["phases"]["alone"]["b_requests"] == 2
    for key in ("fair_over_alone_p90", "fair_over_alone_p99", "a_fair_over_a_alone_tps", "a_fair_over_a_alone_tokens"):
        assert out[key] is not None and out[key] > 0, key
    assert out["fifo_over_fair_p99"] is None and isinstance(out["targets_met"], bool)
