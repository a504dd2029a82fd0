"""Real components the tests start themselves: redis-server (Debian); and, from bench/_procs.py (shared
with the benchmarks), free ports and waiting for a port or a `tinyserve serve` process.

    with RedisServer(tmp_path) as redis:       # skips the test when redis-server is missing
        store = RedisStore(redis.url)
        redis.stop(); ...; redis.start()        # the same port again: clients reconnect

.ci/run installs redis-server (and nginx) from Debian when they are missing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _procs import cli_json, free_port, health, serve_command, wait_port, wait_serving  # noqa: E402

__all__ = ["RedisServer", "cli_json", "free_port", "health", "serve_command", "wait_port", "wait_serving"]


class RedisServer:
    """A private redis-server on a free port, no persistence, in `workdir`."""

    def __init__(self, workdir: Path):
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
        self.exe, self.workdir, self.port = exe, Path(workdir), free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
