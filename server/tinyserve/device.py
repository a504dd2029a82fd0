"""Where the forward runs: `--device cpu|cuda`, default $TINYSERVE_DEVICE, else cpu.

The core's Backend seam (csrc/backend.h) does the work; this module names the choice once for the
CLI, the server and the library, and says up front (before any model is read, before any gRPC
port is opened) why CUDA cannot be used: not built with CUDA, no driver, no device.
"""

from __future__ import annotations

import os

DEVICES = ("cpu", "cuda")
ENV = "TINYSERVE_DEVICE"


class DeviceUnavailable(RuntimeError):
    """The chosen device cannot be used here; the message says why."""


def resolve_device(device: str | None = None) -> str:
    """`device`, else $TINYSERVE_DEVICE, else "cpu"; ValueError for any other name."""
    name = device if device else os.environ.get(ENV, "").strip().lower() or "cpu"
    if name not in DEVICES:
        source = "" if device else f" (from ${ENV})"
        raise ValueError(f"unknown device {name!r}{source}: choose one of {', '.join(DEVICES)}")
    return name


def check_device(device: str | None = None) -> str:
    """The resolved device name, or DeviceUnavailable naming why it cannot be used."""
    from tinyserve import _core

    name = resolve_device(device)
    if name == "cuda":
        why = _core.cuda_status()
        if why:
            raise DeviceUnavailable(f"--device cuda: {why}")
    return name


def cuda_line() -> str:
    """One line for `tinyserve info`: the CUDA device, or why there is none."""
    from tinyserve import _core

    why = _core.cuda_status()
    return _core.cuda_device() if not why else f"not usable: {why}"
