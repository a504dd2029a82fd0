"""`tinyserve bench engine` prints one JSON object last, with the documented keys (no timing asserts)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_engine_json_shape(default_model_path):
    r = subprocess.run(
        [sys.executable, "-m", "tinyserve.cli", "bench", "engine", "--model", str(default_model_path),
         "--threads", "1", "--prompt-sizes", "32", "--batches", "1,2", "--gen", "4", "--reps", "1", "--json"],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("pp32", "pp32_gflops", "tg4_b1", "tg4_b1_gbps", "tg4_b2", "isa", "threads"):
        assert key in out, key
    assert out["threads"] == 1
    assert out["pp32"] > 0 and out["tg4_b2"] > 0


def test_bench_help_lists_the_benchmarks():
    r = subprocess.run([sys.executable, "-m", "tinyserve.cli", "bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in ("engine", "serve", "noisy"):
        assert name in r.stdout
