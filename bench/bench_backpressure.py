#!/usr/bin/env python3
"""Slow readers and long streams against a running `tinyserve serve` (issue 13, items 3 and 5).

Scenario `slow` (item 3): 16 streams of 2000 tokens (ignore_eos, greedy), 8 reading one message a
second and 8 reading nothing. After --warmup seconds another client runs a 256-token stream
(its tokens/s), then a new 64-token request arrives (its time to first token and tokens/s).
Scenario `long` (item 5): 20 streams of 2000 tokens, all read at full speed; after --warmup seconds
a new 64-token request arrives (its TTFT and tokens/s).

KV blocks in use are sampled every 0.5 s from the server's Prometheus endpoint (--metrics-port).
Every client has its own channel (its own HTTP/2 connection), as separate clients would.
`--small-window` gives the slow and non-reading clients a 4 KiB receive window (grpc.http2.lookahead_bytes,
BDP probing off); with gRPC's defaults a client's window grows to megabytes, so the server's writes
to a client that reads nothing do not block before a 2000-token stream (~40 KB) has been sent.

Prints ONE JSON line per scenario (and nothing else with --json):
    python bench/bench_backpressure.py --server 127.0.0.1:50051 --metrics-port 9090 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))

import grpc  # noqa: E402

from tinyserve.api.protos import pb2, pb2_grpc  # noqa: E402

PROMPT = (
    "In a quiet valley between two rivers there was a village where every morning the baker "
    "opened his shop before sunrise and the smell of bread drifted over the sleeping houses. "
)
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]


def request(max_tokens: int, salt: int) -> pb2.GenerateRequest:
    # a distinct prompt per stream: no prefix-cache sharing between them
    return pb2.GenerateRequest(
        prompt=f"Story {salt}. " + PROMPT,
        sampling=pb2.SamplingParameters(temperature=0.0),
        stopping=pb2.StoppingParameters(max_tokens=max_tokens, ignore_eos=True),
    )


class Stream:
    """One streaming call on its own channel. mode: "fast", "slow" (1 message/s) or "none"."""

    def __init__(self, server: str, req: pb2.GenerateRequest, mode: str, options=()):
        self.channel = grpc.aio.insecure_channel(server, options=list(options))
        self.call = pb2_grpc.TinyServeServiceStub(self.channel).Generate(req)
        self.mode = mode
        self.t0 = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.code = "OK"
        self.task = asyncio.ensure_future(self._read()) if mode != "none" else None

    async def _read(self) -> None:
        try:
            async for ev in self.call:
                if ev.HasField("token") and ev.token.token_ids:
                    now = time.monotonic()
                    self.first = self.first or now
                    self.last = now
                    self.tokens += len(ev.token.token_ids)
                if self.mode == "slow":
                    await asyncio.sleep(1.0)
        except grpc.aio.AioRpcError as e:
            self.code = e.code().name
        except asyncio.CancelledError:
            self.code = "CANCELLED"

    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.t0

    def decode_tps(self) -> float:
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return 0.0
        return (self.tokens - 1) / (self.last - self.first)

    async def close(self) -> None:
        self.call.cancel()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()


class KvSampler:
    """tinyserve_kv_blocks_used / _free from /metrics, every `every` seconds."""

    def __init__(self, port: int, every: float = 0.5):
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self.total = 0
        self.t0 = time.monotonic()
        self.task = asyncio.ensure_future(self._run())

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(self.url, timeout=5).read().decode()
        return sum(float(m) for m in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)", text, re.M))

    def read(self) -> tuple[int, int]:
        used = int(self.metric("tinyserve_kv_blocks_used"))
        return used, used + int(self.metric("tinyserve_kv_blocks_free"))

    def step_time(self) -> tuple[float, float]:
        """(seconds, steps) of the engine so far."""
        return self.metric("tinyserve_step_seconds_sum"), self.metric("tinyserve_step_seconds_count")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            used, self.total = await loop.run_in_executor(None, self.read)
            self.samples.append((time.monotonic() - self.t0, used))
            await asyncio.sleep(self.every)

    def now(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    def between(self, a: float, b: float) -> list[int]:
        return [u for t, u in self.samples if a <= t <= b]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def wait_stream(s: Stream, timeout: float) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(s.task), timeout)
    except TimeoutError:
        pass


def summary(s: Stream) -> dict:
    ttft = s.ttft()
    return {
        "ttft_s": None if ttft is None else round(ttft, 3),
        "tokens": s.tokens,
        "decode_tok_s": round(s.decode_tps(), 1),
        "status": s.code if s.task.done() else "RUNNING",
    }


async def scenario(args, name: str) -> dict:
    kv = KvSampler(args.metrics_port)
    alone = Stream(args.server, request(256, 1000), "fast")  # the other client, on an idle server
    await wait_stream(alone, args.timeout)
    await alone.close()
    await asyncio.sleep(1.0)
    kv_idle = kv.now()
    if name == "slow":
        modes = ["slow"] * 8 + ["none"] * 8
    else:
        modes = ["fast"] * 20
    load = [
        Stream(args.server, request(args.max_tokens, i), m, SMALL_WINDOW if (m != "fast" and args.small_window) else ())
        for i, m in enumerate(modes)
    ]
    t_load = time.monotonic() - kv.t0
    await asyncio.sleep(args.warmup)
    out: dict = {
        "scenario": name,
        "small_window": bool(args.small_window and name == "slow"),
        "other_client_256_alone": summary(alone),
        "kv_blocks_total": kv.total,
        "kv_blocks_used_idle": kv_idle,
        "kv_blocks_used_at_warmup": kv.now(),
    }
    if name == "slow":
        other = Stream(args.server, request(256, 1000), "fast")
        await wait_stream(other, args.timeout)
        out["other_client_256"] = summary(other)
        await other.close()
    s0, n0 = kv.step_time()
    new = Stream(args.server, request(64, 2000), "fast")
    t_new = time.monotonic() - kv.t0
    await wait_stream(new, args.timeout)
    out["new_request_64"] = summary(new)
    s1, n1 = kv.step_time()
    out["engine_steps_while_new"] = int(n1 - n0)
    out["mean_step_ms_while_new"] = round(1e3 * (s1 - s0) / max(1.0, n1 - n0), 1)
    t_end = time.monotonic() - kv.t0
    await new.close()
    during = kv.between(t_load, t_end)
    out["kv_blocks_used_max"] = max(during, default=0)
    out["kv_blocks_used_when_new_arrived"] = next((u for t, u in kv.samples if t >= t_new), kv.now())
    out["load_tokens_received"] = {m: sum(s.tokens for s in load if s.mode == m) for m in sorted(set(modes))}
    out["elapsed_s"] = round(t_end - t_load, 1)
    for s in load:
        await s.close()
    await asyncio.sleep(3.0)  # let the server drop the cancelled streams
    out["kv_blocks_used_after"] = kv.now()
    await kv.stop()
    return out


async def amain(args) -> None:
    for name in args.scenario:
        res = await scenario(args, name)
        res["label"] = args.label
        print(json.dumps(res, separators=(",", ":")), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--metrics-port", type=int, required=True, help="the server's --metrics-port")
    p.add_argument(
        "--scenario", action="append", choices=("slow", "long"), help="slow (item 3) and/or long (item 5); default both"
    )
    p.add_argument("--max-tokens", type=int, default=2000, help="tokens per load stream")
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of load before measuring")
    p.add_argument("--timeout", type=float, default=120.0, help="longest wait for one measured stream")
    p.add_argument(
        "--small-window",
        action="store_true",
        help="slow and non-reading clients use a 4 KiB receive window (module doc)",
    )
    p.add_argument("--label", default="", help="copied into the JSON (e.g. before/after)")
    p.add_argument("--json", action="store_true", help="JSON lines only (the default output anyway)")
    args = p.parse_args(argv)
    args.scenario = args.scenario or ["slow", "long"]
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
