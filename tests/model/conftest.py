"""Fixtures for tests/model: tiny random GGUF models, written once per session.

The helpers that drive `Model.forward` live in tiny_models.py (import them from there, not from
this file: several test directories have a conftest.py, so `import conftest` is ambiguous)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # reference.py, tiny_models.py (tests have no packages)

from tiny_models import model_cache, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """tiny_model_path(spec) -> path of a GGUF written from `spec` (cached for the session)."""
    return model_cache(tmp_path_factory.mktemp("tiny_models"), write_tiny_model)
