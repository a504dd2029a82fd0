"""The tenancy package stands alone: importing it pulls in neither grpc nor the engine, the C++
core or the CLI's argparse (`tinyserve tenants` lives in cli.py)."""

from __future__ import annotations

import subprocess
import sys


def test_tenancy_imports_no_grpc_engine_core_or_cli():
    code = (
        "import sys, tinyserve.tenancy; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google') "
        "or m == 'argparse' or m.startswith(('tinyserve.engine', 'tinyserve.api', 'tinyserve._core', "
        "'tinyserve.cli'))); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
