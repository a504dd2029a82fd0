"""Backpressure and turns through the real server: slow or absent readers, long streams, newcomers.

The engine is the real LLMEngine and scheduler over the fake paged model of tests/scheduler (its
next token is a hash of the history read back from the KV blocks: a stream whose blocks were given
away and recomputed must still produce the same tokens), with a short sleep per step standing in
for the model's compute, behind the real grpc.aio server and servicer.

A client that does not read only stops the server's writes once HTTP/2 flow control has filled
its receive window. gRPC clients grow that window (BDP probing) up to megabytes, which would take
a long stream to fill, so the non-reading clients here fix theirs at 8 KiB and ask for 20 logprobs
per token (~250 bytes a message): the server's writes block after a few dozen tokens.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_fakes import EOS, VOCAB, FakeModel

sys.path.insert(0, str(Path(__file__).parent.parent / "scheduler"))
from fake_runner import FakeRunner  # noqa: E402

from tinyserve.api.async_engine import AsyncEngine  # noqa: E402
from tinyserve.api.errors import ResourceExhausted  # noqa: E402
from tinyserve.api.protos import pb2 as P  # noqa: E402
from tinyserve.api.protos import pb2_grpc  # noqa: E402
from tinyserve.engine.engine import LLMEngine  # noqa: E402
from tinyserve.engine.params import EngineConfig, SamplingParams, StoppingParams  # noqa: E402

STEP_S = 0.002  # simulated compute per engine step
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8192)]


def paged_engine(num_blocks: int, block_size: int = 4, **cfg) -> LLMEngine:
    """LLMEngine + scheduler over the fake paged model, with the fake byte-level tokenizer."""
    runner = FakeRunner(num_blocks, block_size, vocab=VOCAB, avoid=EOS)

    def forward(*args):
        time.sleep(STEP_S)
        return runner(*args)

    engine = LLMEngine(
        FakeModel(context_length=4096), EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **cfg), forward
    )
    runner.bm = engine.scheduler.block_manager
    return engine


def reference_tokens(prompts: dict[str, tuple[list[int], int]]) -> dict[str, list[int]]:
    """Greedy tokens of each prompt on an engine with room for everything, stepped directly."""
    engine = paged_engine(4096)
    for rid, (ids, max_tokens) in prompts.items():
        engine.add_request(
            rid, ids, SamplingParams(temperature=0.0), StoppingParams(max_tokens=max_tokens, ignore_eos=True)
        )
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return out


def wait_until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def request(text: str, max_tokens: int, logprobs: int = 0) -> P.GenerateRequest:
    return P.GenerateRequest(
        prompt=text,
        sampling=P.SamplingParameters(temperature=0.0, logprobs=logprobs),
        stopping=P.StoppingParameters(max_tokens=max_tokens, ignore_eos=True),
    )


def ids_of(text: str) -> list[int]:
    return FakeModel().tokenizer.encode(text)


class Stream:
    """One Generate call on its own channel, read by a thread when told to (not at all before)."""

    def __init__(self, address: str, req: P.GenerateRequest, options=()):
        self.ended_at: float | None = None
        self.channel = grpc.insecure_channel(address, options=list(options))
        self.call = pb2_grpc.TinyServeServiceStub(self.channel).Generate(req, timeout=120)
        self.tokens: list[int] = []
        self.request_id = ""
        self.end = None
        self.error: grpc.RpcError | None = None
        self.first_token_at: float | None = None
        self.started = time.monotonic()
        self.delay = 0.0
        self._go = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def read(self, delay: float = 0.0) -> Stream:
        """Start reading (sleeping `delay` seconds after each message)."""
        self.delay = delay
        self._go.set()
        return self

    def _read(self) -> None:
        self._go.wait()
        try:
            for ev in self.call:
                if ev.HasField("start"):
                    self.request_id = ev.start.request_id
                if ev.HasField("token") and ev.token.token_ids:
                    if self.first_token_at is None:
                        self.first_token_at = time.monotonic()
                    self.tokens += ev.token.token_ids
                if ev.HasField("end"):
                    self.end = ev.end
                    self.ended_at = time.monotonic()
                if self.delay:
                    time.sleep(self.delay)
        except grpc.RpcError as e:
            self.error = e

    def join(self, timeout: float = 60.0) -> Stream:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not end"
        return self

    def close(self) -> None:
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def streams():
    made: list[Stream] = []

    def make(*args, **kw) -> Stream:
        s = Stream(*args, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def prompt_text(i: int, n: int = 12) -> str:
    return "".join(chr(ord("a") + (i * 7 + k) % 26) for k in range(n))


# -- slow and absent readers ---------------------------------------------------------------------
def test_non_reading_streams_pause_release_their_blocks_and_resume_with_the_same_tokens(serve, streams):
    """6 streams whose clients read nothing: each is paused once its unread output reaches the
    bound, generating a small fraction of its 300 tokens; a new request then needs their blocks,
    is admitted and gets its first token; when the 6 clients read again, their streams resume
    (recomputed) and end with exactly the tokens of an undisturbed run."""
    engine = paged_engine(num_blocks=100, max_num_batched_tokens=64)
    srv = serve([engine], max_unread_tokens=16, stall_timeout_s=0)
    idle = [streams(srv.address, request(prompt_text(i), 300, logprobs=20), SMALL_WINDOW) for i in range(6)]
    wait_until(lambda: engine.stats().num_paused == 6, what="6 paused streams")
    held = [s.num_output_tokens for s in engine.scheduler.running]
    assert len(held) == 6 and max(held) < 150  # (8 KiB window + 16 queued: about 50 tokens each)
    time.sleep(0.3)
    assert [s.num_output_tokens for s in engine.scheduler.running] == held  # nothing generated

    # the newcomer's 120-token prompt and 40 tokens need 40 of the 100 blocks: paused ones give them
    new = streams(srv.address, request("N" * 120, 40)).read()
    new.join()
    assert new.end is not None and len(new.tokens) == 40
    assert new.first_token_at - new.started < 5.0  # generous: a few ms of steps in fact
    assert engine.num_turns >= 1 and engine.stats().num_paused == 6

    for s in idle:
        s.read()
    for s in idle:
        s.join()
    want = reference_tokens(
        {f"s{i}": (ids_of(prompt_text(i)), 300) for i in range(6)} | {"new": (ids_of("N" * 120), 40)}
    )
    assert [s.tokens for s in idle] == [want[f"s{i}"] for i in range(6)]
    assert new.tokens == want["new"]
    wait_until(lambda: engine.stats().kv_blocks_used == 0, what="all blocks back")
    assert engine.stats().num_paused == 0


def test_stalled_stream_is_cancelled_with_resource_exhausted_and_frees_its_blocks(serve, streams):
    engine = paged_engine(num_blocks=200)
    srv = serve([engine], max_unread_tokens=8, stall_timeout_s=0.3)
    s = streams(srv.address, request(prompt_text(1), 500, logprobs=20), SMALL_WINDOW)
    wait_until(lambda: engine.stats().num_paused == 1, what="a paused stream")
    # 0.3 s later, nothing read: the engine drops it and its blocks come back
    wait_until(lambda: not engine.has_unfinished_requests(), what="the stream cancelled")
    assert engine.stats().kv_blocks_used == 0
    s.read().join()  # the client gets what was generated, then the status
    assert s.error is not None and s.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "read nothing for 0.3 s" in s.error.details()
    from google.rpc import error_details_pb2
    from test_status_codes import details

    assert [i.reason for i in details(s.error, error_details_pb2.ErrorInfo)] == ["UNREAD_OUTPUT_STALLED"]
    assert 0 < len(s.tokens) < 500 and s.end is None
    # counted as RESOURCE_EXHAUSTED, and the server still serves
    ok = streams(srv.address, request("hello", 5)).read().join()
    assert len(ok.tokens) == 5
    counted = srv.server.metrics.requests.labels("fake", "Generate", "RESOURCE_EXHAUSTED")._value.get()
    assert counted == 1


def test_a_slow_reader_is_paused_and_resumed_without_being_cancelled(serve, streams):
    # it reads a message every 20 ms while the engine makes one every ~2 ms: paused and resumed
    # again and again; with a stall timeout far above its pauses it completes, exactly
    engine = paged_engine(num_blocks=200)
    srv = serve([engine], max_unread_tokens=8, stall_timeout_s=2.0)
    pauses = []
    bridge = srv.server.models[0].engine
    pause = bridge.pause
    bridge.pause = lambda rid: (pauses.append(rid), pause(rid))[1]
    s = streams(srv.address, request(prompt_text(2), 150, logprobs=20), SMALL_WINDOW).read(delay=0.02)
    s.join()
    assert s.error is None and s.end is not None
    assert s.tokens == reference_tokens({"x": (ids_of(prompt_text(2)), 150)})["x"]
    assert len(pauses) >= 2
    assert engine.stats().kv_blocks_used == 0


# -- long streams and newcomers ------------------------------------------------------------------
def test_new_request_ttft_with_the_cache_full_of_long_streams(serve, streams):
    """8 long streams (fast readers and slow ones) hold the whole cache and more; a new request's
    first token comes within the stated bound, turn_steps steps plus its prefill (here it takes a
    turn at once), and it then runs to its end without being preempted: 30 tokens in about 30
    steps. (Without turns its first token comes quickly too, as it is first in the queue, but it
    is preempted over and over: ~500 steps for its 30 tokens.)"""
    Q = 32
    engine = paged_engine(num_blocks=128, max_num_batched_tokens=32, turn_steps=Q)
    srv = serve([engine], max_unread_tokens=64, stall_timeout_s=0)
    longs = [streams(srv.address, request(prompt_text(i), 400)).read(delay=0.0 if i % 2 else 0.002) for i in range(8)]
    sched = engine.scheduler
    wait_until(lambda: engine.num_preemptions >= 3 and sched.block_manager.num_free_blocks < 4, what="a full cache")
    steps: dict[str, list[int]] = {}  # request id -> engine steps of its outputs with tokens
    step = engine.step

    def recording():
        outs = step()
        for o in outs:
            if o.new_token_ids:
                steps.setdefault(o.request_id, []).append(sched.num_steps)
        return outs

    arrival = sched.num_steps
    engine.step = recording
    new = streams(srv.address, request("fresh prompt", 30)).read().join()
    assert new.end is not None and len(new.tokens) == 30
    mine = steps[new.request_id]
    assert mine[0] - arrival <= Q + 2  # first token, in engine steps
    assert mine[-1] - mine[0] <= 29 + 4  # then a token every step
    assert new.end.time_to_first_token.ToMilliseconds() < 5000  # and in time, generously
    for s in longs:
        s.join(120)
    want = reference_tokens({f"l{i}": (ids_of(prompt_text(i)), 400) for i in range(8)})
    assert [s.tokens for s in longs] == [want[f"l{i}"] for i in range(8)]
    wait_until(lambda: engine.stats().kv_blocks_used == 0, what="all blocks back")


# -- the bridge on its own -----------------------------------------------------------------------
def on_a_bridge(max_tokens: int, body, **bridge_kw):
    """`await body(engine, handle)` with one greedy request "r" ("abc", max_tokens, ignore_eos)
    submitted to an AsyncEngine(**bridge_kw) over a fresh paged engine: (the engine, body's result)."""
    engine = paged_engine(num_blocks=64)
    bridge = AsyncEngine(engine, "fake", **bridge_kw)

    async def main():
        bridge.start()
        try:
            greedy, stopping = SamplingParams(temperature=0.0), StoppingParams(max_tokens=max_tokens, ignore_eos=True)
            return await body(engine, bridge.submit("r", ids_of("abc"), greedy, stopping))
        finally:
            bridge.stop()

    return engine, asyncio.run(main())


def test_unread_output_pauses_at_the_bound_and_resumes_at_half():
    async def body(engine, h):
        while not h.paused:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # the pause reached the engine: no more tokens come
        unread = h.num_unread_tokens
        assert 10 <= unread <= 14 and h.queue.qsize() <= unread + 1
        got = []
        events = aiter(h)
        while len(got) < unread - 5 - 1:
            ev = await anext(events)
            got += getattr(ev, "token_ids", [])
            assert h.paused
        ev = await anext(events)  # unread is now 5 = half of 10: resumed
        got += ev.token_ids
        assert not h.paused
        async for ev in events:
            got += getattr(ev, "token_ids", [])
        assert len(got) == 100
        return got

    engine, got = on_a_bridge(100, body, max_unread_tokens=10, stall_timeout_s=0)
    assert got == reference_tokens({"r": (ids_of("abc"), 100)})["r"]
    assert engine.stats().kv_blocks_used == 0


def test_stall_timeout_counts_from_the_last_read():
    async def body(engine, h):
        events = aiter(h)
        while not h.paused:
            await asyncio.sleep(0.005)
        for _ in range(6):  # reads one event every 0.2 s: paused (unread stays > 20),
            await asyncio.sleep(0.2)  # but never idle for 0.4 s
            await anext(events)
            assert h.paused and not h.finished
        t0 = time.monotonic()
        while not h.finished:  # stops reading: cancelled 0.4 s after the last read
            await asyncio.sleep(0.01)
        waited = time.monotonic() - t0
        with pytest.raises(ResourceExhausted):
            async for _ in events:
                pass
        for _ in range(500):  # the engine drops it at its next step
            if not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        return waited

    engine, waited = on_a_bridge(1000, body, max_unread_tokens=40, stall_timeout_s=0.4)
    assert 0.3 <= waited <= 2.0
    assert not engine.has_unfinished_requests() and engine.stats().kv_blocks_used == 0


# -- flags ---------------------------------------------------------------------------------------
def test_flags_reach_the_config_and_the_bridge(serve):
    import argparse

    from tinyserve.cli import add_serve_arguments, config_from_args
    from tinyserve.config import ServerConfig

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    cfg = config_from_args(
        p.parse_args(["--max-unread-tokens", "7", "--stall-timeout-seconds", "2.5", "--turn-steps", "9"])
    )
    assert (cfg.max_unread_tokens, cfg.stall_timeout_s, cfg.turn_steps) == (7, 2.5, 9)
    d = config_from_args(p.parse_args([]))
    assert (d.max_unread_tokens, d.stall_timeout_s, d.turn_steps) == (256, 30.0, 128)
    for bad in (dict(max_unread_tokens=-1), dict(turn_steps=-2), dict(stall_timeout_s=float("nan"))):
        with pytest.raises(ValueError):
            ServerConfig(**bad).validate()
    with pytest.raises(ValueError, match="turn_steps"):
        EngineConfig(turn_steps=-1).validate()
    srv = serve([paged_engine(16)], max_unread_tokens=7, stall_timeout_s=2.5)
    bridge = srv.server.models[0].engine
    assert (bridge.max_unread_tokens, bridge.stall_timeout_s) == (7, 2.5)
