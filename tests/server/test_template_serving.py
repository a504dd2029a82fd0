"""A hostile chat template on one model cannot stall the server: while its render runs away (a
big-integer power that holds the GIL for ~20 s if it ran in the server process), another model's
stream keeps its inter-token time and Health.Check answers; the runaway ends as INTERNAL with a
request id and no exception text; a client deadline ends it as DEADLINE_EXCEEDED and its worker is
killed; the server's memory stays within a stated bound while allocating templates fail; and
SIGTERM during a runaway render drains and exits 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from realservers import free_port, serve_command

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))  # tiny_models, template_corpus

from template_corpus import HOSTILE  # noqa: E402
from tiny_models import CHATML_TEMPLATE, TinySpec, write_tiny_model  # noqa: E402

from tinyserve.api.protos import pb2, pb2_grpc  # noqa: E402
from tinyserve.models.chat_template import ChatTemplate, TemplateFault, TemplateLimits  # noqa: E402
from tinyserve.models.template_workers import default_pool  # noqa: E402

# ChatML, except for a conversation ending in "boom": 10**(10**7), ~33M bits of big-integer
# arithmetic in one C call (the issue measured a 19 s freeze in-process).
BOOM = "{% if messages[-1].content == 'boom' %}{{ ((10**10)**1000)**1000 }}{% endif %}" + CHATML_TEMPLATE
MAX_GAP_S = 1.0  # another model's inter-token gap while the runaway renders (normally ~ms)
HOSTILE_TIME_S = 3.0  # the hostile template's time limit in these tests


def _engines(tmp_path, hostile: str):
    from tinyserve.engine.engine import LLMEngine
    from tinyserve.engine.params import EngineConfig
    from tinyserve.models.loader import load_model

    calm = load_model(write_tiny_model(tmp_path / "calm.gguf", TinySpec(context_length=2048, seed=1)), "calm")
    bad = load_model(write_tiny_model(tmp_path / "bad.gguf", TinySpec(seed=2)), "bad")
    # Lift the integer bound the sandbox would stop BOOM with at once: only the worker process
    # (and its time limit) stands between the runaway and the server.
    bad.chat_template = ChatTemplate(hostile, limits=TemplateLimits(max_int_bits=1 << 40, time_s=HOSTILE_TIME_S))
    return [LLMEngine(m, EngineConfig(kv_budget_bytes=16 << 20)) for m in (calm, bad)]


def _stream_calm(stub, stop: threading.Event, arrivals: list[float]) -> None:
    """Generate on the calm model, one stream after another, until `stop`; every token's arrival time."""
    while not stop.is_set():
        req = pb2.GenerateRequest(
            model="calm",
            prompt="hello world",
            stopping=pb2.StoppingParameters(max_tokens=1500, ignore_eos=True),
            sampling=pb2.SamplingParameters(temperature=0),
        )
        for ev in stub.Generate(req, timeout=60):
            if ev.HasField("token"):
                arrivals.append(time.monotonic())
            if stop.is_set():
                break


def test_a_runaway_template_does_not_stall_another_model(serve, tmp_path):
    srv = serve(engines=_engines(tmp_path, BOOM))
    stub = srv.stub()
    health = health_pb2_grpc.HealthStub(srv.channel())
    list(stub.Chat(pb2.ChatRequest(model="bad", messages=[pb2.ChatMessage(role="user", content="hi")]), timeout=30))

    stop, arrivals = threading.Event(), []
    calm = threading.Thread(target=_stream_calm, args=(stub, stop, arrivals))
    calm.start()
    try:
        while not arrivals:
            time.sleep(0.01)
        t0 = time.monotonic()
        result = {}

        def chat_boom():
            try:
                list(
                    stub.Chat(
                        pb2.ChatRequest(model="bad", messages=[pb2.ChatMessage(role="user", content="boom")]),
                        timeout=30,
                    )
                )
            except grpc.RpcError as e:
                result["error"] = e
            result["t"] = time.monotonic()

        boom = threading.Thread(target=chat_boom)
        boom.start()
        healthy = []
        while boom.is_alive():
            time.sleep(0.4)
            healthy.append(health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status)
        boom.join()
    finally:
        stop.set()
        calm.join(60)
    t1 = result["t"]
    during = [a for a in arrivals if t0 <= a <= t1]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert len(during) > 100 and max(gaps) < MAX_GAP_S, (len(during), max(gaps, default=None))
    assert len(healthy) >= 3 and set(healthy) == {health_pb2.HealthCheckResponse.SERVING}
    e = result["error"]
    assert e.code() == grpc.StatusCode.INTERNAL, e
    assert "time_s" in e.details() and re.search(r"request id [0-9a-f]{20}", e.details())
    assert "Traceback" not in e.details() and "TemplateLimitExceeded" not in e.details()
    assert dict(e.trailing_metadata()).get("x-request-id")
    assert t1 - t0 >= HOSTILE_TIME_S * 0.9  # it really ran away (until its limit)
    # and the bad model's template still serves ordinary conversations
    list(stub.Chat(pb2.ChatRequest(model="bad", messages=[pb2.ChatMessage(role="user", content="hi")]), timeout=30))


def test_a_client_deadline_ends_the_render_and_its_worker(serve, tmp_path):
    srv = serve(engines=_engines(tmp_path, BOOM))
    stub = srv.stub()
    killed = default_pool().num_killed
    with pytest.raises(grpc.RpcError) as e:
        list(
            stub.Chat(
                pb2.ChatRequest(model="bad", messages=[pb2.ChatMessage(role="user", content="boom")]), timeout=0.5
            )
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    end = time.monotonic() + HOSTILE_TIME_S  # killed at the deadline (+ grace), not at time_s
    while default_pool().num_killed == killed and time.monotonic() < end:
        time.sleep(0.05)
    assert default_pool().num_killed == killed + 1
    events = list(
        stub.Chat(pb2.ChatRequest(model="bad", messages=[pb2.ChatMessage(role="user", content="hi")]), timeout=30)
    )
    assert events[-1].HasField("end")


# ---- memory ----------------------------------------------------------------------------------
PARENT_GROWTH_MB = 64  # the server process itself, while allocating templates fail
WORKER_PEAK_MB = 128  # each worker, for this corpus (measured ~25-40); RLIMIT_AS caps it at memory_mb anyway
ALLOCATING = [h for h in HOSTILE if h[2] in ("max_output_chars", "max_items", "max_indent", "max_width")]


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def test_server_memory_stays_bounded_while_allocating_templates_fail():
    pool = default_pool()
    limits = TemplateLimits()
    ChatTemplate.chatml().render([{"role": "user", "content": "warm up"}])
    base = _rss_mb(os.getpid())
    peak = {"parent": 0.0, "tree": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            parent = _rss_mb(os.getpid())
            peak["parent"] = max(peak["parent"], parent)
            peak["tree"] = max(peak["tree"], parent + sum(_rss_mb(p) for p in pool.pids()))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for name, source, limit in ALLOCATING:
            with pytest.raises(TemplateFault):
                ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    finally:
        stop.set()
        sampler.join()
    assert len(ALLOCATING) >= 10
    assert peak["parent"] - base < PARENT_GROWTH_MB, peak
    assert peak["tree"] - base < pool.size * WORKER_PEAK_MB + PARENT_GROWTH_MB, peak
    assert WORKER_PEAK_MB < limits.memory_mb


# ---- SIGTERM during a runaway render ---------------------------------------------------------
# Under the default limits: textwrap over 4M characters is one filter call no budget sees, so the
# worker's time limit (time_s, 5 s) ends it.
SLOW = "{% if messages[-1].content == 'boom' %}{{ ('x' * 4000000)|wordwrap(1) }}{% endif %}" + CHATML_TEMPLATE


@pytest.mark.slow
def test_sigterm_during_a_runaway_render_drains_and_exits_0(tmp_path):
    path = write_tiny_model(tmp_path / "slow.gguf", TinySpec(), chat_template=SLOW)
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            serve_command(port, "--model", f"slow={path}"),
            stdout=err,
            stderr=err,
        )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = pb2_grpc.TinyServeServiceStub(channel)
        result = {}

        def chat():
            try:
                list(stub.Chat(pb2.ChatRequest(messages=[pb2.ChatMessage(role="user", content="boom")]), timeout=30))
            except grpc.RpcError as e:
                result["code"] = e.code()

        t = threading.Thread(target=chat)
        t.start()
        time.sleep(0.5)  # the render is running in a worker now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        t.join(10)
        assert result.get("code") == grpc.StatusCode.INTERNAL  # the render hit its limit
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "draining: 1 stream(s) in flight" in text and "Traceback" not in text
