"""The x16 GEMV tiles' software prefetch (driver.h gemv_ahead, kernels.h gemv_prefetch): on by
default on Intel CPUs only, TINYSERVE_GEMV_PREFETCH=1|0 overriding, read once per process. A
prefetch never changes a result: one-sequence decode logits (all of them, by their sha256) are the same bits either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import hashlib, json, sys
import numpy as np
from tinyserve import _core
m = _core.Model(sys.argv[1])
kv = _core.KVCache(m, block_size=16, num_blocks=4)
i32 = lambda *v: np.array(v, np.int32)
tables = np.arange(4, dtype=np.int32).reshape(1, 4)
m.forward(kv, i32(1, 2, 3, 4, 5), i32(5), i32(0), tables, i32(4))
logits = m.forward(kv, i32(6), i32(1), i32(5), tables, i32(0))  # one row: the GEMV tiles
print(json.dumps({"on": _core.gemv_prefetch(), "intel": _core.cpu_features()["intel"],
                  "isa": _core.isa(), "logits": hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()}))
"""


def _probe(model, value: str | None, isa: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("TINYSERVE_GEMV_PREFETCH", None)
    if value is not None:
        env["TINYSERVE_GEMV_PREFETCH"] = value
    if isa:
        env["TINYSERVE_ISA"] = isa
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(model)], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_on_for_intel_by_default_and_the_environment_overrides_it(default_model_path):
    default = _probe(default_model_path, None)
    assert default["on"] == default["intel"]
    assert _probe(default_model_path, "1")["on"] is True
    assert _probe(default_model_path, "0")["on"] is False


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_the_prefetch_changes_no_bit(default_model_path, isa):
    from tinyserve import _core

    if isa not in _core.available_isas():
        pytest.skip(f"{isa} is not available here")
    on, off = _probe(default_model_path, "1", isa), _probe(default_model_path, "0", isa)
    assert on["isa"] == off["isa"] == isa
    assert on["on"] and not off["on"]
    assert on["logits"] == off["logits"]
