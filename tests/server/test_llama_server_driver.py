"""bench/llama_server.py's reading of llama-server's responses, on bytes recorded from a real
llama-server (tests/server/data/llama_server_*.http; how they were recorded is in that folder's
README), checked against the stdlib's own HTTP parser (http.client) and a plain split of the
event stream. Nothing timed: the clock is a counter."""

from __future__ import annotations

import asyncio
import http.client
import io
import itertools
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import llama_server  # noqa: E402
from tinyserve.benchmarks.serve import load_stats  # noqa: E402

DATA = Path(__file__).with_name("data")
STREAM = (DATA / "llama_server_completion.http").read_bytes()
ERROR = (DATA / "llama_server_error.http").read_bytes()


class _Sock:
    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode: str):
        return io.BytesIO(self.data)


def stdlib_body(raw: bytes) -> tuple[int, bytes]:
    """Status and de-chunked body by http.client, an independent HTTP/1.1 parser."""
    r = http.client.HTTPResponse(_Sock(raw))  # type: ignore[arg-type]
    r.begin()
    return r.status, r.read()


def plain_events(body: bytes) -> list[dict]:
    """The event stream split the obvious way (llama-server writes `data: JSON` + blank line)."""
    out = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            out.append(json.loads(block[len("data: ") :]))
    return out


def reader_of(*pieces: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    for p in pieces:
        r.feed_data(p)
    r.feed_eof()
    return r


def read(raw: bytes, clock=None) -> llama_server.RequestResult:
    async def go():
        return await llama_server.read_completion(reader_of(raw), 0.0, clock or itertools.count(1).__next__)

    return asyncio.run(go())


def chunked(raw: bytes, body: bytes, size: int) -> bytes:
    """raw's head with `body` sent in chunks of `size` bytes (cut anywhere)."""
    head = raw[: raw.index(b"\r\n\r\n") + 4]
    parts = (body[i : i + size] for i in range(0, len(body), size))
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def rechunk(raw: bytes, size: int) -> bytes:
    """The same response with its body re-sent in chunks of `size` bytes."""
    return chunked(raw, stdlib_body(raw)[1], size)


def test_the_recording_is_a_chunked_event_stream():
    status, body = stdlib_body(STREAM)
    head = STREAM[: STREAM.index(b"\r\n\r\n")].decode().lower()
    assert status == 200 and "transfer-encoding: chunked" in head and "text/event-stream" in head
    events = plain_events(body)
    assert events[-1]["stop"] is True and not any(e["stop"] for e in events[:-1])
    assert events[-1]["tokens_predicted"] == 8


def test_completion_matches_the_stdlib_parse():
    _, body = stdlib_body(STREAM)
    events = plain_events(body)
    partials, final = events[:-1], events[-1]
    res = read(STREAM)
    assert res.ok and res.code == ""
    assert res.tokens == final["tokens_predicted"] == sum(len(e["tokens"]) for e in partials)
    assert res.prompt_tokens == final["tokens_evaluated"]
    assert res.text == "".join(e["content"] for e in partials)
    # the clock ticks once per event: first token at 1, then one token per tick
    assert res.ttft == 1.0
    assert res.itl == [1.0] * (len(partials) - 1)


@pytest.mark.parametrize("size", [1, 2, 7, 64, 100_000])
def test_any_chunking_gives_the_same_result(size):
    a, b = read(STREAM), read(rechunk(STREAM, size))
    assert (b.ok, b.tokens, b.prompt_tokens, b.text, b.ttft, b.itl) == (
        a.ok,
        a.tokens,
        a.prompt_tokens,
        a.text,
        a.ttft,
        a.itl,
    )


def test_reads_split_anywhere_on_the_wire():
    async def go(cut: int):
        return await llama_server.read_completion(
            reader_of(STREAM[:cut], STREAM[cut:]), 0.0, itertools.count(1).__next__
        )

    want = read(STREAM)
    for cut in range(1, len(STREAM), 97):
        got = asyncio.run(go(cut))
        assert (got.ok, got.tokens, got.text) == (want.ok, want.tokens, want.text)


def test_sse_decoder_byte_by_byte_equals_whole():
    _, body = stdlib_body(STREAM)
    whole = llama_server.SSEDecoder().feed(body)
    dec = llama_server.SSEDecoder()
    one_by_one = [e for i in range(len(body)) for e in dec.feed(body[i : i + 1])]
    assert one_by_one == whole and [json.loads(e) for e in whole] == plain_events(body)
    assert not dec.pending


def test_sse_decoder_crlf_comments_and_multiline_data():
    dec = llama_server.SSEDecoder()
    assert dec.feed(b": ping\r\n\r\nevent: x\r\ndata: a\r\ndata:b\r\n") == []
    assert dec.pending
    assert dec.feed(b"\r\n:\n\ndata: {}\n\n") == ["a\nb", "{}"]
    assert not dec.pending


def test_a_token_held_for_utf8_counts_with_the_next_event():
    """llama-server sends nothing for a token that ends inside a UTF-8 character; the next event's
    tokens_predicted steps by 2, and both tokens share that event's gap."""
    events = [
        {"content": "a", "tokens": [1], "stop": False, "tokens_predicted": 1, "tokens_evaluated": 5},
        {"content": "\u00e9", "tokens": [3], "stop": False, "tokens_predicted": 3, "tokens_evaluated": 5},
        {"content": "", "tokens": [], "stop": True, "tokens_predicted": 3, "tokens_evaluated": 5},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + body  # no length: read to EOF
    times = iter([10.0, 16.0, 17.0]).__next__
    res = read(raw, clock=times)
    assert res.ok and res.tokens == 3 and res.text == "a\u00e9" and res.prompt_tokens == 5
    assert res.ttft == 10.0 and res.itl == [3.0, 3.0]


def test_an_http_error_is_an_error_with_its_status():
    status, body = stdlib_body(ERROR)
    assert status >= 400 and "error" in json.loads(body)
    res = read(ERROR)
    assert not res.ok and res.code == f"HTTP_{status}" and res.tokens == 0


def test_a_stream_without_its_final_event_is_an_error():
    _, body = stdlib_body(STREAM)
    res = read(chunked(STREAM, body[: body.rindex(b"data: ")], 64))
    assert not res.ok and res.code == "INCOMPLETE_STREAM" and res.tokens == 8
    res = read(chunked(STREAM, body[:-1], 64))  # the last event not ended by its blank line
    assert not res.ok and res.code == "INCOMPLETE_STREAM"


def test_a_connection_closed_mid_chunk_raises_what_one_counts_as_an_error():
    with pytest.raises(asyncio.IncompleteReadError):
        read(STREAM[: len(STREAM) // 2])


def test_an_error_event_is_an_error():
    raw = b'HTTP/1.1 200 OK\r\n\r\ndata: {"error": {"code": 500, "message": "boom"}}\n\n'
    res = read(raw)
    assert not res.ok and res.code == "SERVER_ERROR"


def test_not_http_is_a_protocol_error():
    with pytest.raises(llama_server.ProtocolError):
        read(b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(llama_server.ProtocolError):
        read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


def test_the_summary_is_bench_serves():
    """Two recorded streams and one error, through `bench serve`'s own load_stats."""
    ok = read(STREAM)
    out = load_stats([ok, read(STREAM), read(ERROR)], wall=2.0)
    assert out["completed"] == 2 and out["errors"] == 1 and out["error_codes"] == {read(ERROR).code: 1}
    assert out["generated_tokens"] == 2 * ok.tokens and out["throughput_tps"] == ok.tokens
    assert out["ttft_p50_ms"] == 1000.0 and out["prompt_tokens"] == ok.prompt_tokens


def test_the_request_is_bench_serves_shape():
    body = llama_server.completion_body("text", 128)
    assert body == {
        "prompt": "text",
        "n_predict": 128,
        "ignore_eos": True,
        "temperature": 0.0,
        "cache_prompt": False,
        "stream": True,
    }
    raw = llama_server.LlamaServerClient("127.0.0.1", 8080).request("/completion", body)
    head, payload = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /completion HTTP/1.1\r\n") and json.loads(payload) == body
    assert f"Content-Length: {len(payload)}".encode() in head
