"""tinyserve_client against the real servicer: sync and asyncio clients, deadlines, retry on
UNAVAILABLE, and the CLI's --server commands built on it."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_fakes import EOS_TEXT, FakeEngine
from test_rpcs import wait_for

from realservers import free_port
from tinyserve.cli import main
from tinyserve_client import AsyncClient, Client, error_details


def test_sync_client_generate_chat_tokenize(serve):
    srv = serve()
    with Client(srv.address, timeout=20) as c:
        chunks = list(c.generate_stream("hey" + EOS_TEXT))
        assert "".join(ch.text for ch in chunks) == "hey"
        r = c.generate("abc", max_tokens=5, temperature=0)
        assert r.text == "abcab" and r.finish_reason == "length" and r.generated_tokens == 5
        assert r.model == "fake" and len(r.request_id) == 20
        assert c.generate("one STOP two", stop=["STOP"]).finish_reason == "stop_sequence"
        assert c.chat([{"role": "user", "content": "yo"}]).text == "user\nyo"
        ids = c.tokenize("ab")
        assert c.detokenize(ids) == "ab"
        assert [m.name for m in c.list_models().models] == ["fake"]
        assert c.get_model().name == "fake"
        with pytest.raises(TypeError):
            c.generate("x", temprature=1.0)


def test_sync_client_errors_have_details(serve):
    srv = serve()
    with Client(srv.address, timeout=10) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x", top_p=2.0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = [d for d in error_details(e.value) if isinstance(d, error_details_pb2.BadRequest)]
    assert bad[0].field_violations[0].field == "sampling.top_p"


def test_client_deadline(serve):
    eng = FakeEngine()
    eng.paused = True
    srv = serve([eng])
    with Client(srv.address, timeout=0.3) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x")
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_breaking_out_of_a_stream_cancels_it(serve):
    eng = FakeEngine(step_delay=0.005)
    srv = serve([eng])
    with Client(srv.address, timeout=20) as c:
        for i, _ in enumerate(c.generate_stream("abc", max_tokens=200)):
            if i == 3:
                break
    assert wait_for(lambda: eng.stats().kv_blocks_used == 0 and not eng.has_unfinished_requests())


def test_retry_on_unavailable_until_the_server_comes_up(serve):
    port = free_port()
    started = []

    def start_later():
        time.sleep(0.4)
        started.append(serve(port=port))

    t = threading.Thread(target=start_later)
    t.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=20, retries=20, backoff_s=0.05, max_backoff_s=0.2) as c:
            assert c.generate("ok", max_tokens=2).text == "ok"
    finally:
        t.join()
    assert started


def test_retries_give_up_with_unavailable_while_draining(serve):
    srv = serve(metrics_port=None)
    srv.server.state.draining = True  # what drain() does first: new streams get UNAVAILABLE
    with Client(srv.address, timeout=20, retries=2, backoff_s=0.01) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    body = srv.server.metrics.exposition().decode()
    assert 'tinyserve_requests_total{method="Generate",model="-",status="UNAVAILABLE"} 3.0' in body


def test_async_client(serve):
    srv = serve()

    async def main():
        async with AsyncClient(srv.address, timeout=20) as c:
            parts = [ch.text async for ch in c.generate_stream("hi" + EOS_TEXT)]
            r = await c.chat([{"role": "user", "content": "q"}], max_tokens=3)
            ids = await c.tokenize("xy")
            text = await c.detokenize(ids)
            models = await c.list_models()
            results = await asyncio.gather(*(c.generate(f"n{i}", max_tokens=4) for i in range(8)))
            return "".join(parts), r, text, models, results

    text, chat, detok, models, results = asyncio.run(main())
    assert text == "hi" and chat.text == "us" and chat.finish_reason == "length"
    assert detok == "xy" and models.default_model == "fake"
    assert [r.text for r in results] == [f"n{i}n{i}" for i in range(8)]


def test_cli_generate_and_chat_with_server(serve, capsys, monkeypatch):
    """`tinyserve generate|chat --server` go through tinyserve_client."""
    srv = serve()
    assert main(["generate", "echo", "--server", srv.address, "-n", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert out.out == "echo\n" and f"from {srv.address}" in out.err
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    assert main(["chat", "--server", srv.address, "-n", "12"]) == 0
    assert capsys.readouterr().out == "user\nfirst\nuser\nfirst\n"  # the echo model repeats turn 1
    assert main(["generate", "x", "--server", srv.address, "--server-model", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
