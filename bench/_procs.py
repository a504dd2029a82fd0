"""The local processes the bench/ programs and the tests start (tests/realservers.py re-exports
these): a free port, waiting for a port or for grpc.health.v1 SERVING, the `tinyserve serve`
command, and a `tinyserve` command whose last stdout line is one JSON object.

    port = free_port()
    proc = subprocess.Popen(serve_command(port, "--model", path), ...)
    wait_serving(f"127.0.0.1:{port}", proc, log=log_path)   # raises when proc exits or on timeout
    out = cli_json("bench", "engine", "--json")              # raises, with stderr, when it fails
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(port: int, *args: str) -> list[str]:
    """`tinyserve serve --port PORT ARGS...` run by this interpreter."""
    return [sys.executable, "-m", "tinyserve.cli", "serve", "--port", str(port), *args]


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM (a server drains), then SIGKILL after grace_s; returns once it has exited."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_json(argv: list[str], timeout: float | None = 1800) -> dict:
    """`python ARGV...` run by this interpreter: its last stdout line, parsed as JSON. Raises
    RuntimeError with the tail of stderr when it exits non-zero."""
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cli_json(*args: str, timeout: float | None = 1800) -> dict:
    """`tinyserve ARGS...` run by this interpreter: its last stdout line, parsed as JSON."""
    return run_json(["-m", "tinyserve.cli", *args], timeout)


def _exited(proc: subprocess.Popen | None, log: Path | None) -> None:
    if proc is not None and proc.poll() is not None:
        tail = f":\n{log.read_text(errors='replace')[-2000:]}" if log is not None else ""
        raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before serving{tail}")


def wait_port(port: int, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    """Until 127.0.0.1:port accepts a connection (a hang guard; raises after timeout_s)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        _exited(proc, None)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def health(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The grpc.health.v1 status of `service` ("" = the server as a whole), or None when it does not
    answer."""
    with grpc.insecure_channel(address) as ch:
        try:
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
                .status
            )
        except grpc.RpcError:
            return None


def wait_serving(
    address: str,
    proc: subprocess.Popen | None = None,
    timeout_s: float = 120.0,
    service: str = "",
    log: Path | None = None,
) -> None:
    """Until `address` reports `service` SERVING. Raises RuntimeError (with the tail of `log`) when
    `proc` exits first, TimeoutError after timeout_s."""
    end = time.monotonic() + timeout_s
    while health(address, service, timeout=2.0) != SERVING:
        _exited(proc, log)
        if time.monotonic() > end:
            raise TimeoutError(f"{address} not SERVING after {timeout_s} s")
        time.sleep(0.2)
