#!/usr/bin/env python3
"""llama.cpp's llama-server under `tinyserve bench serve`'s load: issue 12's serving baseline.

    bench/build_llamacpp.sh                                   # once: builds build/llamacpp/bin/llama-server
    python bench/llama_server.py --concurrency 32 --requests 32

Starts `llama-server -m MODEL -np N -c N*(P+T+slack) -t THREADS` on a free port (or, with --url,
loads one already running), waits for /health, then sends R streaming /completion requests, at
most N in flight: a P-token prompt built as `bench serve` builds it (the same text, cut at P tokens
by llama-server's own /tokenize and /detokenize), exactly T new tokens (n_predict, ignore_eos),
temperature 0, cache_prompt false (no request reuses another's KV). HTTP/1.1 and the server-sent
events are read with asyncio's streams (one connection per request, as a gRPC stream is one call).

Measured and summarised by `tinyserve.benchmarks.serve`'s own code, so the figures mean the same:
TTFT is the time to the first event that carries a token; an event's tokens are the step of its
`tokens_predicted` (a token held back for an incomplete UTF-8 character arrives with the next one),
the gap to the previous event spread over them is the inter-token latency; throughput is every
generated token (the final event's `tokens_predicted`) over the run's wall time; a request without
a final event, or with a non-200 status or an error event, is an error. The last stdout line is
ONE JSON object, with the keys of `tinyserve bench serve --json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from _procs import stop
from tinyserve.benchmarks.serve import RequestResult, load_stats, make_prompt, run_load, summary

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = ROOT / "build" / "llamacpp" / "bin" / "llama-server"


class ProtocolError(Exception):
    """The server's bytes are not the HTTP/1.1 response or event stream this client expects."""


class SSEDecoder:
    """Server-sent events (the WHATWG event-stream format) from bytes split anywhere.

    feed() returns the data of each event that the bytes complete: its `data:` lines joined by
    newlines. Lines end in LF or CRLF; comment lines (`:`, llama-server's keep-alive pings) and
    other fields (event, id, retry) are skipped; an event with no data line yields nothing."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] | None = None

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        events = []
        for raw in lines:
            line = raw.removesuffix(b"\r")
            if not line:
                if self._data is not None:
                    events.append("\n".join(self._data))
                self._data = None
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                if self._data is None:
                    self._data = []
                self._data.append(value.removeprefix(b" ").decode("utf-8"))
        return events

    @property
    def pending(self) -> bool:
        """Bytes or data lines of an event not yet ended by a blank line."""
        return bool(self._buf) or self._data is not None


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """An HTTP/1.x response's status code and headers (names lower-cased)."""
    line = await reader.readline()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
    headers = {}
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ProtocolError("the connection closed inside the response headers")
        if line in (b"\r\n", b"\n"):
            return int(parts[1]), headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ProtocolError(f"not a header line: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The response body as it arrives: chunked, Content-Length, or up to the connection's end."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readline()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise ProtocolError(f"not a chunk size line: {line[:80]!r}") from None
            if size == 0:  # the last chunk; then trailers up to a blank line
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise ProtocolError("a chunk does not end in CRLF")
            yield data
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if n:
            yield await reader.readexactly(n)
    else:
        while chunk := await reader.read(65536):
            yield chunk


async def read_completion(
    reader: asyncio.StreamReader, t0: float, clock: Callable[[], float] = time.monotonic
) -> RequestResult:
    """One streamed /completion response, timed from t0 as `bench serve` times a Generate stream.

    ok only with status 200 and a final event (`"stop": true`); `code` names what went wrong
    otherwise (HTTP_<status>, SERVER_ERROR for an error event, INCOMPLETE_STREAM)."""
    res = RequestResult()
    status, headers = await read_head(reader)
    if status != 200:
        async for _ in read_body(reader, headers):
            pass
        res.code = f"HTTP_{status}"
        return res
    sse, predicted, last, final = SSEDecoder(), 0, None, False
    async for chunk in read_body(reader, headers):
        for data in sse.feed(chunk):
            now = clock()
            ev = json.loads(data)
            if "error" in ev:
                res.code = "SERVER_ERROR"
                return res
            n = int(ev.get("tokens_predicted", predicted)) - predicted
            if ev.get("stop"):  # the final event: the counts (its text came in the partials)
                res.prompt_tokens = int(ev.get("tokens_evaluated", 0))
                res.tokens = max(res.tokens, int(ev.get("tokens_predicted", res.tokens)))
                final = True
                continue
            res.text += ev.get("content", "")
            if n > 0:
                last = res.arrived(n, now, t0, last)
                predicted += n
    if not final or sse.pending:
        res.code = "INCOMPLETE_STREAM"
        return res
    res.ok = True
    return res


class LlamaServerClient:
    """What `bench serve`'s make_prompt and load loop need, over llama-server's HTTP API."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def _post(self, path: str, body: dict, timeout: float = 60.0) -> dict:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(self.request(path, body))
                await writer.drain()
                status, headers = await read_head(reader)
                data = b"".join([c async for c in read_body(reader, headers)])
            finally:
                writer.close()
        if status != 200:
            raise RuntimeError(f"llama-server {path}: HTTP {status}: {data[:300]!r}")
        return json.loads(data)

    def request(self, path: str, body: dict) -> bytes:
        payload = json.dumps(body).encode()
        return (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode() + payload

    async def tokenize(self, text: str, model: str = "") -> list[int]:
        return list((await self._post("/tokenize", {"content": text, "add_special": False}))["tokens"])

    async def detokenize(self, ids: list[int], model: str = "", skip_special_tokens: bool = True) -> str:
        return str((await self._post("/detokenize", {"tokens": ids}))["content"])


async def one(client: LlamaServerClient, body: dict, timeout: float) -> RequestResult:
    """One streaming completion, timed on the client from before it connects to the last event."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(client.host, client.port)
            try:
                writer.write(client.request("/completion", body))
                await writer.drain()
                res = await read_completion(reader, t0)
            finally:
                writer.close()
    except TimeoutError:
        res = RequestResult(code="DEADLINE_EXCEEDED")
    except (OSError, asyncio.IncompleteReadError, ProtocolError, ValueError) as e:
        res = RequestResult(code=type(e).__name__)
    res.e2e = time.monotonic() - t0
    return res


def completion_body(prompt: str, max_tokens: int) -> dict:
    """A /completion request of `bench serve`'s shape: exactly max_tokens new tokens, greedy."""
    return {
        "prompt": prompt,
        "n_predict": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
        "stream": True,
    }


async def bench(args: argparse.Namespace) -> dict:
    host, port = args.url.rsplit(":", 1)
    client = LlamaServerClient(host, int(port))
    prompt = await make_prompt(client, "", args.prompt_tokens)
    body = completion_body(prompt, args.max_tokens)
    for _ in range(args.warmup):
        await one(client, completion_body(prompt, 4), args.timeout)
    results, wall = await run_load(client, body, args, one=one)
    return {
        "bench": "llama_server",
        "server": args.url,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "temperature": 0.0,
    } | load_stats(results, wall)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerProcess:
    """`llama-server` on a free local port for the length of a with block; its log in a temp file.

    Context: parallel * (prompt + new tokens + slack) tokens, so every slot holds a whole request."""

    def __init__(
        self,
        binary: str | os.PathLike,
        model: str,
        parallel: int,
        threads: int,
        slot_tokens: int,
        extra: list[str] | None = None,
    ):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.argv = [
            os.fspath(binary),
            "-m",
            model,
            "-np",
            str(parallel),
            "-c",
            str(parallel * slot_tokens),
            "-t",
            str(threads),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(extra or []),
        ]
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)

    def __enter__(self) -> LlamaServerProcess:
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 300) -> None:
        assert self.proc is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):  # 503 while it loads, refused before it listens
                pass
            time.sleep(0.5)
        raise SystemExit(f"llama-server did not become healthy in {timeout:.0f} s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:]

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop(self.proc)
        self.log.close()
        os.unlink(self.log.name)


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--requests", type=int, default=32, help="requests in total")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests (4 new tokens) first")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per request, seconds")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="HOST:PORT of a running llama-server (default: start one)")
    p.add_argument("--llama-server", default=str(DEFAULT_BINARY), help="the binary to start")
    p.add_argument("--model", help="GGUF file or catalog name (default: tinyserve's default model)")
    p.add_argument("--parallel", type=int, help="llama-server -np (default: --concurrency)")
    p.add_argument("--threads", type=int, default=2, help="llama-server -t")
    p.add_argument("--ctx-slack", type=int, default=16, help="context tokens per slot beyond prompt + new")
    add_load_arguments(p)
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")
    args = p.parse_args()
    if args.url:
        out = asyncio.run(bench(args))
    else:
        from tinyserve.models.catalog import DEFAULT_MODEL, resolve_model

        model = str(resolve_model(args.model or DEFAULT_MODEL)[1])
        if not Path(args.llama_server).exists():
            print(f"no {args.llama_server}: run bench/build_llamacpp.sh first", file=sys.stderr)
            return 2
        slot = args.prompt_tokens + args.max_tokens + args.ctx_slack
        with LlamaServerProcess(args.llama_server, model, args.parallel or args.concurrency, args.threads, slot) as srv:
            args.url = srv.url
            out = asyncio.run(bench(args)) | {"model": os.path.basename(model), "argv": srv.argv[1:]}
    if not args.json:
        print(summary(out), file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
