"""Fixtures for tests/cuda: the tiny random models of tests/model, and `gpu`, which skips a test
(with the reason the core gives) unless a usable CUDA device is there.

tests/cuda/test_device.py runs everywhere (the clean errors of --device cuda without a GPU);
tests/cuda/test_cuda_forward.py needs a GPU and a build with TINYSERVE_CUDA
(tools/cuda_device_check.sh builds one and runs them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "model"))  # tiny_models.py, hf_arch.py

from tiny_models import model_cache, write_tiny_model  # noqa: E402

from tinyserve import _core  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """tiny_model_path(spec) -> path of a GGUF written from `spec` (cached for the session)."""
    return model_cache(tmp_path_factory.mktemp("cuda_tiny_models"), write_tiny_model)


@pytest.fixture(scope="session")
def gpu() -> str:
    """The CUDA device's description; skips the test when there is none (with the reason)."""
    why = _core.cuda_status()
    if why:
        pytest.skip(f"needs a CUDA device: {why}")
    return _core.cuda_device()
