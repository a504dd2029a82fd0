"""The tenancy package stands alone: importing it pulls in neither grpc nor the engine, the C++
core or the CLI's argparse (`tinyserve tenants` lives in cli.py)."""

from __future__ import annotations

from fresh_interpreter import modules_loaded_by


def test_tenancy_imports_no_grpc_engine_core_or_cli():
    loaded = modules_loaded_by("import tinyserve.tenancy")
    assert "tinyserve.tenancy" in loaded  # the statement ran
    bad = [
        m
        for m in loaded
        if m.split(".")[0] in ("grpc", "google", "argparse")
        or m.startswith(("tinyserve.engine", "tinyserve.api", "tinyserve._core", "tinyserve.cli"))
    ]
    assert bad == []
