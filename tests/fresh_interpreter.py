"""What a fresh Python interpreter loads: the import-isolation tests of the engine and tenancy
packages (tests/scheduler/test_engine_package.py, tests/tenancy/test_package.py)."""

from __future__ import annotations

import subprocess
import sys


def modules_loaded_by(statement: str) -> list[str]:
    """sys.modules of a new interpreter (this one's executable and environment) after `statement`."""
    code = f"import sys; {statement}; print(','.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().split(",")
