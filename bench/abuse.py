#!/usr/bin/env python3
"""Abuse benchmark (issue 13, part 6): what hostile or careless clients do to a real server.

For every scenario it starts a fresh `tinyserve serve` process on the default model (or
--model), and measures, before / during / after the abuse:
  - health: grpc.health.v1 Check every 0.5 s (2 s deadline): answered, failed, slowest;
  - KV blocks used (the server's Prometheus endpoint) and the server's RSS (/proc/PID/status);
  - a victim: another client streaming greedy 64-token requests on the default model the whole
    time: its tokens/s, longest gap between two chunks, and time to first token.
Scenarios:
  cancel_storm     16 clients start streams and cancel them at random (before the first
                   event, or after 0-40 events)
  slow_readers     16 streams of 2000 tokens (ignore_eos): 8 read one message a second, 8 read
                   nothing; cancelled when the phase ends
  garbage          raw TCP on the gRPC port: random bytes, HTTP/1.1 requests, an HTTP/2 preface
                   then garbage, and 64 idle connections held open
  templates        per hostile chat template (--templates FILE: a JSON list of strings or of
                   {"name", "template"}; default: a small built-in list), a copy of the model with
                   that template served as a second model "hostile", Chat sent to it in a loop

Prints one JSON object. The server runs under RLIMIT_AS (--as-limit-gb) so that a template's
memory bomb fails there instead of taking the box; a server that does not drain within 15 s of
SIGTERM is killed and reported. The clients share the machine with the server.

    PYTHONPATH=server python bench/abuse.py > abuse.json
    PYTHONPATH=server python bench/abuse.py --scenarios garbage --before 2 --during 4 --after 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from _procs import free_port, serve_command, wait_serving
from tinyserve.api.protos import pb2, pb2_grpc

HOSTILE_TEMPLATES = [  # name, template (the issue-13 cases, sized to finish on a shared box)
    ("bigint_chain", "{{ ((10**10)**1000)**1000 }}"),
    (
        "int_square_loop",
        "{% set ns = namespace(n=7) %}{% for i in range(24) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n % 10 }}",
    ),
    ("format_width", "{{ '{0:>{1}}'.format('x', 500000000) }}"),
    ("tojson_indent", "{{ messages|tojson(indent=100000000) }}"),
    ("lipsum", "{{ lipsum(100000) }}"),
    (
        "string_doubling",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    ),
    ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
    ("syntax_error", "{% for %}"),
]
VICTIM_PROMPT = "Once upon a time, in a small village by the sea, there lived"
POLL_S = 0.5


# ---- the server process ---------------------------------------------------------------------
class Server:
    """A `tinyserve serve` child process with its ports, log file and stop logic."""

    def __init__(self, models: list[str], as_limit_gb: float, workdir: Path, extra: list[str]):
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = workdir / f"serve-{self.port}.log"
        cmd = serve_command(self.port, "--metrics-port", str(self.metrics_port), "--log-format", "json", *extra)
        for m in models:
            cmd += ["--model", m]
        limit = int(as_limit_gb * 2**30)

        def cap():
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=cap)
        self.address = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until SERVING; RuntimeError when the server exits first or is not ready after `timeout` s."""
        try:
            wait_serving(self.address, self.proc, timeout, log=self.log_path)
        except TimeoutError as e:
            raise RuntimeError(f"{e}; see {self.log_path}") from e

    def rss_mib(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def kv(self) -> dict[str, tuple[float, float]] | None:
        """{model: (used, total)} from the metrics endpoint, None if it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        used, free = {}, {}
        for line in text.splitlines():
            for name, into in (("tinyserve_kv_blocks_used{", used), ("tinyserve_kv_blocks_free{", free)):
                if line.startswith(name):
                    model = line.split('model="', 1)[1].split('"', 1)[0]
                    into[model] = float(line.rsplit(" ", 1)[1])
        return {m: (used[m], used[m] + free.get(m, 0.0)) for m in used}

    def stop(self, grace_s: float = 15.0) -> dict:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(grace_s)
            how = "exited"
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            how = f"killed (no exit {grace_s:.0f}s after SIGTERM)"
        self._log.close()
        log = self.log_path.read_text(errors="replace")
        return {
            "stop": how,
            "returncode": rc,
            "stop_s": round(time.monotonic() - t0, 2),
            "tracebacks_in_log": log.count("Traceback"),
            "error_lines_in_log": sum('"level":"ERROR"' in line for line in log.splitlines()),
        }


# ---- monitors ---------------------------------------------------------------------------------
@dataclass
class Samples:
    health: list = field(default_factory=list)  # (t, ok, latency_s)
    kv: list = field(default_factory=list)  # (t, used or None, total or None)
    rss: list = field(default_factory=list)  # (t, MiB)
    chunks: list = field(default_factory=list)  # (t, n tokens) of the victim
    ttft: list = field(default_factory=list)  # (t request started, seconds to first token)
    victim_errors: list = field(default_factory=list)  # (t, code)


class Monitors:
    """Background threads sampling the server and running the victim client."""

    def __init__(self, server: Server, victim_model: str):
        self.server, self.victim_model = server, victim_model
        self.s = Samples()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._health, self._stats, self._victim)]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(40)

    def _health(self):
        ch = grpc.insecure_channel(self.server.address)
        stub = health_pb2_grpc.HealthStub(ch)
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                ok = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1
            except grpc.RpcError:
                ok = False
            self.s.health.append((t0, ok, time.monotonic() - t0))
            self.stop_event.wait(max(0.0, POLL_S - (time.monotonic() - t0)))
        ch.close()

    def _stats(self):
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            kv = self.server.kv()
            model = kv.get(self.victim_model) if kv else None
            self.s.kv.append((t0, model[0] if model else None, model[1] if model else None))
            self.s.rss.append((t0, self.server.rss_mib()))
            self.stop_event.wait(max(0.0, POLL_S - (time.monotonic() - t0)))

    def _victim(self):
        ch = grpc.insecure_channel(self.server.address)
        stub = pb2_grpc.TinyServeServiceStub(ch)
        req = pb2.GenerateRequest(
            prompt=VICTIM_PROMPT,
            sampling=pb2.SamplingParameters(temperature=0),
            stopping=pb2.StoppingParameters(max_tokens=64, ignore_eos=True),
        )
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            first = None
            try:
                for ev in stub.Generate(req, timeout=30):
                    if ev.HasField("token") and ev.token.token_ids:
                        now = time.monotonic()
                        if first is None:
                            first = now
                            self.s.ttft.append((t0, now - t0))
                        self.s.chunks.append((now, len(ev.token.token_ids)))
            except grpc.RpcError as e:
                self.s.victim_errors.append((time.monotonic(), e.code().name))
                self.stop_event.wait(0.2)
        ch.close()


def summarize(s: Samples, t0: float, t1: float) -> dict:
    """One phase [t0, t1) of the samples."""

    def within(rows):
        return [r for r in rows if t0 <= r[0] < t1]

    health = within(s.health)
    lat = [r[2] for r in health if r[1]]
    kv = [r for r in within(s.kv) if r[1] is not None]
    rss = [r[1] for r in within(s.rss) if r[1] is not None]
    chunks = within(s.chunks)
    times = [r[0] for r in chunks]
    gaps = [b - a for a, b in zip([t0] + times, times + [t1], strict=True)]
    ttft = [r[1] for r in within(s.ttft)]
    return {
        "seconds": round(t1 - t0, 2),
        "health_ok": sum(1 for r in health if r[1]),
        "health_failed": sum(1 for r in health if not r[1]),
        "health_max_ms": round(max(lat) * 1e3, 1) if lat else None,
        "metrics_answered": f"{len(kv)}/{len(within(s.kv))}",
        "kv_blocks_used_max": max(r[1] for r in kv) if kv else None,
        "kv_blocks_used_last": kv[-1][1] if kv else None,
        "kv_blocks_total": kv[-1][2] if kv else None,
        "rss_mib_max": round(max(rss), 1) if rss else None,
        "rss_mib_last": round(rss[-1], 1) if rss else None,
        "victim_tokens_per_s": round(sum(r[1] for r in chunks) / (t1 - t0), 1),
        "victim_max_gap_ms": round(max(gaps) * 1e3, 1),
        "victim_ttft_ms_median": round(statistics.median(ttft) * 1e3, 1) if ttft else None,
        "victim_ttft_ms_max": round(max(ttft) * 1e3, 1) if ttft else None,
        "victim_errors": sorted({r[1] for r in within(s.victim_errors)}),
    }


# ---- scenarios --------------------------------------------------------------------------------
class Abuse:
    """Runs in threads between start() and stop(); report() says what it did."""

    def __init__(self, server: Server):
        self.server = server
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def stop(self):
        self.stop_event.set()
        self.finish()
        for t in self.threads:
            t.join(30)

    def finish(self):
        pass

    def report(self) -> dict:
        return dict(sorted(self.counts.items()))


class CancelStorm(Abuse):
    def start(self, clients: int = 16):
        for i in range(clients):
            self.spawn(self._client, i)

    def _client(self, i):
        rng = random.Random(i)
        ch = grpc.insecure_channel(self.server.address)
        stub = pb2_grpc.TinyServeServiceStub(ch)
        words = VICTIM_PROMPT.split()
        while not self.stop_event.is_set():
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(8, 120)))
            call = stub.Generate(
                pb2.GenerateRequest(prompt=prompt, stopping=pb2.StoppingParameters(max_tokens=rng.randint(16, 256))),
                timeout=60,
            )
            self.count("streams")
            if rng.random() < 0.1:
                call.cancel()
                self.count("cancelled_before_first_event")
                continue
            k = rng.randint(0, 40)
            try:
                for n, _ in enumerate(call):
                    if n >= k:
                        call.cancel()
                        self.count("cancelled_midway")
                        break
                else:
                    self.count("completed")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    self.count(f"error_{e.code().name}")
        ch.close()


class SlowReaders(Abuse):
    def start(self, n: int = 16):
        self.ch = grpc.insecure_channel(self.server.address)
        stub = pb2_grpc.TinyServeServiceStub(self.ch)
        self.calls = []
        for i in range(n):
            call = stub.Generate(
                pb2.GenerateRequest(
                    prompt=f"Story {i}: " + VICTIM_PROMPT,
                    stopping=pb2.StoppingParameters(max_tokens=2000, ignore_eos=True),
                ),
                timeout=600,
            )
            self.calls.append(call)
            if i % 2 == 0:
                self.spawn(self._one_a_second, call)
            else:
                self.count("not_reading")

    def _one_a_second(self, call):
        try:
            for _ in call:
                self.count("messages_read")
                if self.stop_event.wait(1.0):
                    break
        except grpc.RpcError:
            pass

    def finish(self):
        for c in self.calls:
            c.cancel()
        self.ch.close()


class Garbage(Abuse):
    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def start(self, idle: int = 64):
        self.idle = []
        for _ in range(idle):
            try:
                self.idle.append(socket.create_connection(("127.0.0.1", self.server.port), timeout=5))
                self.count("idle_connections_opened")
            except OSError:
                self.count("idle_connect_failed")
        for kind in ("random", "http1_get", "http1_post", "h2_garbage"):
            self.spawn(self._loop, kind)

    def _payload(self, kind, rng) -> bytes:
        if kind == "random":
            return rng.randbytes(rng.randint(1, 8192))
        if kind == "http1_get":
            return b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        if kind == "http1_post":
            body = b'{"prompt": "hi"}'
            return (
                b"POST /tinyserve.v1.TinyServeService/Generate HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/grpc\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )
        # a valid preface, then frames with random types, flags, stream ids and lengths
        frames = b"".join(
            struct.pack(">I", rng.randint(0, 2**24 - 1))[1:]
            + bytes([rng.randint(0, 255), rng.randint(0, 255)])
            + rng.randbytes(4)
            + rng.randbytes(rng.randint(0, 64))
            for _ in range(rng.randint(1, 8))
        )
        return self.PREFACE + frames

    def _loop(self, kind):
        rng = random.Random(kind)
        while not self.stop_event.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.server.port), timeout=3) as s:
                    s.sendall(self._payload(kind, rng))
                    got = b""
                    try:
                        while len(got) < 65536:
                            b = s.recv(4096)
                            if not b:
                                break
                            got += b
                    except (TimeoutError, ConnectionResetError):
                        pass
                self.count(f"{kind}_sent")
                self.count(f"{kind}_reply:{_reply_kind(got)}")
            except OSError as e:
                self.count(f"{kind}_error_{type(e).__name__}")
                self.stop_event.wait(0.1)
            self.stop_event.wait(0.01)  # a steady flood (~100 connections/s each), not a CPU race

    def finish(self):
        alive = 0
        for s in self.idle:
            try:
                s.setblocking(False)
                try:
                    alive += s.recv(1) != b""
                except BlockingIOError:
                    alive += 1
            except OSError:
                pass
            s.close()
        self.count("idle_connections_still_open_at_end", alive)


def _reply_kind(got: bytes) -> str:
    """What the server sent back: nothing, an HTTP/1 status line, or HTTP/2 frame types."""
    if not got:
        return "nothing"
    if got.startswith(b"HTTP/"):
        return got.split(b"\r\n", 1)[0][:40].decode(errors="replace")
    names = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE"}
    kinds, at = [], 0
    while at + 9 <= len(got):
        length = int.from_bytes(got[at : at + 3], "big")
        kinds.append(names.get(got[at + 3], str(got[at + 3])))
        at += 9 + length
    return "h2 " + "+".join(dict.fromkeys(kinds)) if kinds else "other"


class HostileChat(Abuse):
    def start(self):
        self.spawn(self._loop)

    def _loop(self):
        ch = grpc.insecure_channel(self.server.address)
        stub = pb2_grpc.TinyServeServiceStub(ch)
        req = pb2.ChatRequest(
            model="hostile",
            messages=[pb2.ChatMessage(role="user", content="hi")],
            stopping=pb2.StoppingParameters(max_tokens=8),
        )
        self.latencies = []
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                list(stub.Chat(req, timeout=5))
                self.count("chat_OK")
            except grpc.RpcError as e:
                self.count(f"chat_{e.code().name}")
                if "detail" not in self.counts:
                    self.counts["detail"] = e.details()[:160]
            self.latencies.append(time.monotonic() - t0)
        ch.close()

    def report(self) -> dict:
        out = super().report()
        lat = getattr(self, "latencies", [])
        out["chat_max_s"] = round(max(lat), 2) if lat else None
        return out


def with_template(src: Path, template: str, dst: Path) -> None:
    """A copy of the GGUF `src` whose tokenizer.chat_template is `template` (the key/value
    section re-encoded around that one string, tensor infos kept, data realigned)."""
    import gguf

    r = gguf.GGUFReader(src)
    f = r.fields.get("tokenizer.chat_template")
    raw = src.read_bytes()
    key = b"tokenizer.chat_template"
    value = template.encode()
    new_kv = struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value
    last = r.tensors[-1].field
    ti_end = last.offset + sum(int(p.nbytes) for p in last.parts)
    if f is not None:
        kv_start, kv_end = f.offset, f.offset + sum(int(p.nbytes) for p in f.parts)
        head, n_kv_delta = raw[:kv_start] + new_kv + raw[kv_end:ti_end], 0
    else:
        first_ti = r.tensors[0].field.offset
        head, n_kv_delta = raw[:first_ti] + new_kv + raw[first_ti:ti_end], 1
    if n_kv_delta:  # header: magic, version (u32), tensor count (u64), kv count (u64)
        n_kv = struct.unpack_from("<Q", head, 16)[0] + 1
        head = head[:16] + struct.pack("<Q", n_kv) + head[24:]
    align = int(r.fields["general.alignment"].parts[-1][0]) if "general.alignment" in r.fields else 32
    pad = (-len(head)) % align
    with open(dst, "wb") as out:
        out.write(head + b"\0" * pad)
        out.write(memoryview(raw)[r.data_offset :])


# ---- running ----------------------------------------------------------------------------------
def run_phases(server: Server, victim_model: str, abuse: Abuse | None, args) -> dict:
    mon = Monitors(server, victim_model)
    mon.start()
    t0 = time.monotonic()
    time.sleep(args.before)
    t1 = time.monotonic()
    if abuse is not None:
        abuse.start()
    time.sleep(args.during)
    if abuse is not None:
        abuse.stop()
    t2 = time.monotonic()
    time.sleep(args.after)
    t3 = time.monotonic()
    mon.stop()
    out = {"before": summarize(mon.s, t0, t1), "during": summarize(mon.s, t1, t2), "after": summarize(mon.s, t2, t3)}
    if abuse is not None:
        out["abuse"] = abuse.report()
    return out


def model_name(path: Path) -> str:
    return path.name[:-5] if path.name.endswith(".gguf") else path.name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", help="GGUF to serve (default: the built-in default model)")
    p.add_argument("--scenarios", default="cancel_storm,slow_readers,garbage,templates")
    p.add_argument("--templates", help="JSON file: a list of templates, or of {name, template}")
    p.add_argument("--before", type=float, default=5.0, help="seconds measured before the abuse")
    p.add_argument("--during", type=float, default=15.0, help="seconds of abuse")
    p.add_argument("--after", type=float, default=5.0, help="seconds measured after it stopped")
    p.add_argument("--template-during", type=float, default=8.0, help="seconds per hostile template")
    p.add_argument("--as-limit-gb", type=float, default=6.0, help="the server's address-space cap")
    p.add_argument("--server-arg", action="append", default=[], help="extra `tinyserve serve` flag")
    args = p.parse_args(argv)

    if args.model:
        model = Path(args.model)
    else:
        from tinyserve.models.default import default_model_path

        model = Path(default_model_path())
    if args.templates:
        data = json.loads(Path(args.templates).read_text())
        templates = [
            (t.get("name", f"t{i}"), t["template"]) if isinstance(t, dict) else (f"t{i}", t) for i, t in enumerate(data)
        ]
    else:
        templates = HOSTILE_TEMPLATES
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    known = {"cancel_storm": CancelStorm, "slow_readers": SlowReaders, "garbage": Garbage, "templates": None}
    unknown = set(scenarios) - set(known)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    result = {
        "model": str(model),
        "cpus": os.cpu_count(),
        "phases_s": [args.before, args.during, args.after],
        "as_limit_gb": args.as_limit_gb,
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="tinyserve-abuse-") as tmp:
        work = Path(tmp)
        for name in scenarios:
            if name == "templates":
                per = {}
                targs = argparse.Namespace(
                    **{
                        **vars(args),
                        "during": args.template_during,
                        "before": min(args.before, 3.0),
                        "after": min(args.after, 4.0),
                    }
                )
                for tname, template in templates:
                    hostile = work / "hostile.gguf"
                    with_template(model, template, hostile)
                    server = Server([str(model), f"hostile={hostile}"], args.as_limit_gb, work, args.server_arg)
                    try:
                        t0 = time.monotonic()
                        try:
                            server.wait_ready()
                        except RuntimeError:
                            # the load-time validation refused the template (issue 13, part 1): the
                            # server never serves it; record the error it started with
                            lines = Path(server.log_path).read_text(errors="replace").strip().splitlines()
                            per[tname] = {
                                "refused_at_load": lines[-1][-300:] if lines else "",
                                "exit_code": server.proc.returncode,
                                "seconds_to_refuse": round(time.monotonic() - t0, 2),
                            }
                        else:
                            per[tname] = run_phases(server, model_name(model), HostileChat(server), targs)
                    finally:
                        per.setdefault(tname, {})["server"] = server.stop()
                        hostile.unlink(missing_ok=True)
                    print(f"templates/{tname}: done", file=sys.stderr)
                result["scenarios"]["templates"] = per
                continue
            server = Server([str(model)], args.as_limit_gb, work, args.server_arg)
            try:
                server.wait_ready()
                out = run_phases(server, model_name(model), known[name](server), args)
            finally:
                stop = server.stop()
            out["server"] = stop
            result["scenarios"][name] = out
            print(f"{name}: done", file=sys.stderr)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
