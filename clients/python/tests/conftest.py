"""Fixtures for tinyserve_client's own tests: a scripted in-process gRPC server (no tinyserve).

In a source checkout without the package installed, the package is imported from ../src (its stubs
are then generated from the checkout's proto/ on first import); an installed copy wins otherwise.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if importlib.util.find_spec("tinyserve_client") is None and (_SRC / "tinyserve_client").is_dir():
    sys.path.insert(0, str(_SRC))

sys.path.insert(0, str(Path(__file__).parent))  # fake_server.py (tests have no packages)

import pytest  # noqa: E402
from fake_server import FakeServer  # noqa: E402


@pytest.fixture
def fake():
    srv = FakeServer()
    yield srv
    srv.stop()
