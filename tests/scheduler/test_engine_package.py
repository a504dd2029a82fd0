"""The engine package does no I/O of its own: importing it pulls in neither asyncio, grpc or
argparse nor the tenancy, api or CLI layers (the server drives it from a thread of its own)."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_no_asyncio_grpc_argparse_or_tenancy():
    code = (
        "import sys, tinyserve.engine, tinyserve.engine.scheduler, tinyserve.engine.fair; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('asyncio', 'grpc', 'google', "
        "'argparse') or m.startswith(('tinyserve.tenancy', 'tinyserve.api', 'tinyserve.cli'))); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
