"""clients/python/examples run as documented, against the scripted server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tinyserve_client

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    pkg_root = str(Path(tinyserve_client.__file__).resolve().parents[1])  # src/ or site-packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([pkg_root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_stream_example(fake):
    r = run("stream.py", fake.address, "Once upon a time")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Once upon a time\n"  # the scripted server echoes the prompt
    req = fake.servicer.calls[0][1]
    assert req.stopping.max_tokens == 64 and req.sampling.seed == 1


def test_async_many_example(fake):
    r = run("async_many.py", fake.address)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 16 and fake.methods() == ["Chat"] * 8
    # each answer echoes its 40-character question (under max_tokens=48), with the server's TTFT
    assert lines[1] == "  -> Give me one fun fact about the number 0.  [40 tokens, ttft 250 ms]"
