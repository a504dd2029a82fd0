"""Fixtures for tinyserve_client's own tests: a scripted in-process gRPC server (no tinyserve).

These tests run the package in ../src (its stubs generated from the checkout's proto/ on first
import), ahead of any installed copy, unless TINYSERVE_CLIENT_INSTALLED=1 asks for the installed
one (CI's fresh venv).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

INSTALLED = os.environ.get("TINYSERVE_CLIENT_INSTALLED") == "1"
_SRC = Path(__file__).resolve().parents[1] / "src"
if not INSTALLED and (_SRC / "tinyserve_client").is_dir():
    sys.path.insert(0, str(_SRC))

sys.path.insert(0, str(Path(__file__).parent))  # fake_server.py (tests have no packages)

import pytest  # noqa: E402
from fake_server import FakeServer  # noqa: E402


@pytest.fixture
def fake():
    srv = FakeServer()
    yield srv
    srv.stop()
