"""`tinyserve bench serve`: load a running server with concurrent streaming requests.

R requests of a P-token prompt, each generating exactly T tokens (ignore_eos, greedy), at most N
in flight. Measured on the client: time to first token, inter-token latency (the gap between token
events, spread over the tokens in the event) and generated tokens per second over the whole run.
A progress bar goes to stderr; the last stdout line is ONE JSON object (`tinyserve bench serve`).

`--json-schema FILE`: structured output's cost. Each of `--rounds` rounds runs the same load
twice, free (as above) and with every request constrained by the schema (its requests end when
the JSON is complete, or at max_tokens), and checks every constrained output (jsonschema when
installed, else json.loads). The JSON holds every round, the medians and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import grpc


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _temperature(text: str) -> float:
    t = float(text)
    if not (math.isfinite(t) and t >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return t


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of a running tinyserve")
    p.add_argument("--model", default="", help="model name (default: the server's default)")
    p.add_argument("--concurrency", type=_positive, default=8, help="requests in flight at once")
    p.add_argument("--requests", type=_positive, default=64, help="requests in total")
    p.add_argument("--prompt-tokens", type=_positive, default=128, help="prompt length in tokens")
    p.add_argument("--max-tokens", type=_positive, default=128, help="tokens generated per request")
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        help="sampling temperature of every request (0 = greedy; 1 = the API's default)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per request, seconds")
    p.add_argument(
        "--api-key",
        default=os.environ.get("TINYSERVE_API_KEY"),
        help="API key for a server started with --tenants (default: $TINYSERVE_API_KEY)",
    )
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="also run every request constrained by this JSON Schema, beside the free run",
    )
    p.add_argument(
        "--rounds",
        type=_positive,
        default=3,
        help="with --json-schema: rounds of (free, constrained) runs; medians reported",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")


@dataclass
class RequestResult:
    """One request of a load: its outcome, token counts and latencies (bench/llama_server.py
    fills the same record from llama-server's event stream)."""

    ok: bool = False
    code: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    finish: int = 0

    def arrived(self, n: int, now: float, t0: float, last: float | None) -> float:
        """n tokens arrived at `now` (request sent at t0, the previous ones at `last`): the TTFT or
        n inter-token latencies, and the count. Returns `now`, the next call's `last`."""
        if self.ttft is None:
            self.ttft = now - t0
        elif last is not None:
            self.itl += [(now - last) / n] * n
        self.tokens += n
        return now


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); 0 for an empty list."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def make_prompt(client, model: str, n_tokens: int) -> str:
    """A text that the server's tokenizer turns into about n_tokens tokens."""
    base = (
        "In a quiet valley between two rivers there was a village where every morning the baker "
        "opened his shop before sunrise and the smell of bread drifted over the sleeping houses. "
    )
    text = base
    ids = await client.tokenize(text, model=model)
    while len(ids) < n_tokens:
        text += base
        ids = await client.tokenize(text, model=model)
    return await client.detokenize(ids[:n_tokens], model=model, skip_special_tokens=True)


class _Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.errors, self.enabled = total, 0, 0, enabled
        self.t0 = time.monotonic()

    def tick(self, ok: bool) -> None:
        self.done += 1
        self.errors += not ok
        if not self.enabled:
            return
        width = 30
        fill = int(width * self.done / max(1, self.total))
        rate = self.done / max(1e-9, time.monotonic() - self.t0)
        sys.stderr.write(
            f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {rate:.2f} req/s errors {self.errors}"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def _one(client, req, timeout: float) -> RequestResult:
    res = RequestResult()
    t0 = time.monotonic()
    last = None
    try:
        async for ev in client.stream_events("Generate", req, timeout=timeout):
            now = time.monotonic()
            kind = ev.WhichOneof("event")
            if kind == "start":
                res.prompt_tokens = ev.start.prompt_tokens
            elif kind == "token" and ev.token.token_ids:
                last = res.arrived(len(ev.token.token_ids), now, t0, last)
            if kind == "token":
                res.text += ev.token.text
            elif kind == "end":
                res.finish = ev.end.finish_reason
        res.ok = True
    except grpc.RpcError as e:
        res.code = e.code().name
    res.e2e = time.monotonic() - t0
    return res


async def bench(args) -> dict:
    from tinyserve_client import AsyncClient, build_request

    async with AsyncClient(args.server, retries=0, api_key=getattr(args, "api_key", None)) as client:
        prompt = await make_prompt(client, args.model, args.prompt_tokens)
        params = {"max_tokens": args.max_tokens, "ignore_eos": True, "temperature": args.temperature}
        req = build_request("generate", args.model, prompt, params)
        model = (await client.get_model(args.model)).name
        for _ in range(args.warmup):
            await _one(client, build_request("generate", args.model, prompt, {**params, "max_tokens": 4}), args.timeout)
        head = {
            "bench": "serve",
            "server": args.server,
            "model": model,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
        }
        if getattr(args, "json_schema", None) is None:
            return head | load_stats(*await run_load(client, req, args))
        with open(args.json_schema, encoding="utf-8") as f:
            schema_text = f.read()
        schema = json.loads(schema_text)
        constrained = build_request("generate", args.model, prompt, {**params, "json_schema": schema_text})
        rounds = []
        for _ in range(args.rounds):
            free = load_stats(*await run_load(client, req, args))
            results, wall = await run_load(client, constrained, args)
            rounds.append({"free": free, "json_schema": load_stats(results, wall) | _validity(results, schema)})
    med = {k: {m: _median([r[k][m] for r in rounds]) for m in _MEDIANS} for k in ("free", "json_schema")}
    valid = sum(r["json_schema"]["valid"] for r in rounds)
    checked = sum(r["json_schema"]["completed"] for r in rounds)
    return head | {
        "json_schema": args.json_schema,
        "rounds": rounds,
        "median": med,
        "throughput_ratio": round(med["json_schema"]["throughput_tps"] / med["free"]["throughput_tps"], 3)
        if med["free"]["throughput_tps"]
        else 0.0,
        "ttft_p50_increase_ms": round(med["json_schema"]["ttft_p50_ms"] - med["free"]["ttft_p50_ms"], 2),
        "valid_outputs": f"{valid}/{checked}",
        "validator": _validator_name(),
        "errors": sum(r[k]["errors"] for r in rounds for k in ("free", "json_schema")),
    }


_MEDIANS = (
    "throughput_tps",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "e2e_p50_ms",
    "generated_tokens",
)


def _median(xs: list[float]) -> float:
    return round(percentile(xs, 50), 2)


async def run_load(client, req, args, one=_one) -> tuple[list[RequestResult], float]:
    """`args.requests` copies of `req`, at most `args.concurrency` in flight: results, wall time.
    `one(client, req, timeout)` runs one request (bench/llama_server.py passes its HTTP one)."""
    progress = _Progress(args.requests, enabled=True)
    todo: asyncio.Queue[Any] = asyncio.Queue()
    for _ in range(args.requests):
        todo.put_nowait(req)
    results: list[RequestResult] = []

    async def worker():
        while not todo.empty():
            r = todo.get_nowait()
            res = await one(client, r, args.timeout)
            results.append(res)
            progress.tick(res.ok)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(min(args.concurrency, args.requests))))
    return results, time.monotonic() - t0


def load_stats(results: list[RequestResult], wall: float) -> dict:
    """A load's figures (throughput, TTFT, ITL, end-to-end latency, errors by code)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft * 1e3 for r in ok if r.ttft is not None]
    itl = [x * 1e3 for r in ok for x in r.itl]
    e2e = [r.e2e * 1e3 for r in ok]
    generated = sum(r.tokens for r in results)
    codes: dict[str, int] = {}
    for r in results:
        if not r.ok:
            codes[r.code] = codes.get(r.code, 0) + 1
    return {
        "prompt_tokens": round(sum(r.prompt_tokens for r in ok) / max(1, len(ok)), 1),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_codes": codes,
        "wall_s": round(wall, 3),
        "generated_tokens": generated,
        "throughput_tps": round(generated / wall, 2) if wall > 0 else 0.0,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else 0.0,
        "ttft_p50_ms": round(percentile(ttft, 50), 2),
        "ttft_p99_ms": round(percentile(ttft, 99), 2),
        "itl_p50_ms": round(percentile(itl, 50), 2),
        "itl_p99_ms": round(percentile(itl, 99), 2),
        "e2e_p50_ms": round(percentile(e2e, 50), 2),
        "e2e_p99_ms": round(percentile(e2e, 99), 2),
    }


def _validator_name() -> str:
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        return "json.loads"
    return "jsonschema"


def _validity(results: list[RequestResult], schema) -> dict:
    """How many completed outputs are complete JSON valid against `schema`."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    valid = 0
    for r in results:
        if not r.ok:
            continue
        try:
            value = json.loads(r.text)
            if jsonschema is not None:
                jsonschema.validate(value, schema)
            valid += 1
        except Exception:  # noqa: BLE001 - any failure is an invalid output
            pass
    return {"valid": valid}


def run(args: argparse.Namespace) -> dict:
    """The benchmark's result; raises RuntimeError when the set-up calls (tokenize, get model)
    fail (no server?). Failed requests are counted in "errors" and "error_codes"."""
    try:
        return asyncio.run(bench(args))
    except grpc.RpcError as e:
        raise RuntimeError(f"bench serve: {args.server}: {e.code().name}: {e.details()}") from None


def summary(out: dict) -> str:
    """One human-readable line (printed before the JSON unless --json)."""
    if "median" in out:
        f, c = out["median"]["free"], out["median"]["json_schema"]
        return (
            f"concurrency {out['concurrency']}, medians of {len(out['rounds'])} rounds: free "
            f"{f['throughput_tps']} tokens/s, TTFT p50 {f['ttft_p50_ms']} ms; with the schema "
            f"{c['throughput_tps']} tokens/s (x{out['throughput_ratio']}), TTFT p50 "
            f"{c['ttft_p50_ms']} ms (+{out['ttft_p50_increase_ms']}); valid {out['valid_outputs']}"
        )
    return (
        f"{out['completed']}/{out['requests']} requests at concurrency {out['concurrency']}: "
        f"{out['throughput_tps']} tokens/s, TTFT p50 {out['ttft_p50_ms']} ms "
        f"(p99 {out['ttft_p99_ms']}), ITL p50 {out['itl_p50_ms']} ms (p99 {out['itl_p99_ms']}), "
        f"{out['errors']} errors"
    )
