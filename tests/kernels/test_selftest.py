"""Builds and runs the stand-alone C++ kernel self-test (tests/kernels/kernel_selftest.cpp) on
this machine: every available ISA vs scalar vs fp32 without Python in the loop. The NEON path
runs the same program under qemu-user (tools/neon_qemu.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernel_selftest_binary(tmp_path: Path) -> None:
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    bdir = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(bdir),
            *gen,
            "-DCMAKE_BUILD_TYPE=Release",
            "-DTINYSERVE_PYTHON=OFF",
            "-DTINYSERVE_KERNEL_SELFTEST=ON",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    subprocess.run(
        ["cmake", "--build", str(bdir), "-j2", "--target", "kernel_selftest"],
        check=True,
        capture_output=True,
        timeout=900,
    )
    env = {k: v for k, v in os.environ.items() if k != "TINYSERVE_ISA"}
    p = subprocess.run([str(bdir / "kernel_selftest")], capture_output=True, text=True, timeout=600, env=env)
    m = re.search(r"^(\d+) passed, (\d+) failed$", p.stdout, re.M)
    assert m, p.stdout[-2000:] + p.stderr[-2000:]
    assert int(m.group(2)) == 0 and p.returncode == 0, p.stdout[-4000:]
    assert int(m.group(1)) > 1000
