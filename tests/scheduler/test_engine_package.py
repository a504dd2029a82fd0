"""The engine package does no I/O of its own: importing it pulls in neither asyncio, grpc or
argparse nor the tenancy, api or CLI layers (the server drives it from a thread of its own)."""

from __future__ import annotations

from fresh_interpreter import modules_loaded_by


def test_engine_imports_no_asyncio_grpc_argparse_or_tenancy():
    loaded = modules_loaded_by("import tinyserve.engine, tinyserve.engine.scheduler, tinyserve.engine.fair")
    assert "tinyserve.engine.scheduler" in loaded  # the statement ran
    bad = [
        m
        for m in loaded
        if m.split(".")[0] in ("asyncio", "grpc", "google", "argparse")
        or m.startswith(("tinyserve.tenancy", "tinyserve.api", "tinyserve.cli"))
    ]
    assert bad == []
