"""The repacked weights and the KV arena sit in transparent huge pages (csrc/model.cpp,
alloc_streamed): decode sweeps them every token, and at 4 KiB pages that is a TLB miss every
4 KiB. Where the kernel's THP mode is "madvise", only the advice asks for them, so the test reads
what the process really got (AnonHugePages in /proc/self/smaps_rollup) in a fresh interpreter,
with the advice on and with TINYSERVE_HUGEPAGES=0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_PROBE = """
import json, sys
from tinyserve import _core
def huge_kib():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0
before = huge_kib()
m = _core.Model(sys.argv[1])
kv = _core.KVCache(m, block_size=16, num_blocks=int(sys.argv[2]))
print(json.dumps({"huge_mib": (huge_kib() - before) / 1024, "packed_mib": m.config["repacked_bytes"] / 2**20,
                  "kv_mib": kv.bytes_per_block * int(sys.argv[2]) / 2**20}))
"""


def _probe(model: Path, env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("TINYSERVE_HUGEPAGES", None)
    if env_value is not None:
        env["TINYSERVE_HUGEPAGES"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(model), "512"], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_weights_and_kv_arena_get_huge_pages(default_model_path):
    if not _THP.exists() or "[never]" in _THP.read_text() or not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("this kernel gives no transparent huge pages (THP mode never, or not Linux)")
    on = _probe(default_model_path, None)
    off = _probe(default_model_path, "0")
    assert on["packed_mib"] > 32 and on["kv_mib"] > 8, on  # the default model repacks ~96 MiB
    # most of both buffers in 2 MiB pages (a page that compaction could not find stays 4 KiB)
    assert on["huge_mib"] >= 0.75 * (on["packed_mib"] + on["kv_mib"]), on
    # and it is the advice that gives them: without it, "madvise" mode leaves them 4 KiB
    if "[madvise]" in _THP.read_text():
        assert off["huge_mib"] < 0.25 * (off["packed_mib"] + off["kv_mib"]), off
