"""Two `tinyserve serve` processes sharing one redis-server (started here) hold a tenant's limits
globally: requests per minute, tokens per minute and concurrent streams are counted once across
both, GetUsage answers for both, a replica killed with SIGKILL mid-stream gives its slot back
within the lease time, and a Redis that goes away follows each replica's policy (open: admit and
count the failure; closed: UNAVAILABLE) and is used again when it returns. A tiny random model:
nothing here depends on what the model says."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from realservers import RedisServer, free_port
from tinyserve.api.protos import pb2 as P
from tinyserve.api.protos import pb2_grpc
from tinyserve.tenancy import hash_key

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from tiny_models import TinySpec, write_tiny_model  # noqa: E402

from replicas import Replica  # noqa: E402

LEASE_S = 2.0
TENANTS = {  # name: extra TOML lines; the key is "key-<name>"
    "rpm": "requests_per_minute = 10",
    "tpm": "tokens_per_minute = 60",
    "conc": "max_concurrent = 1\nmax_queued = 0",
    "outage": "max_concurrent = 1\nmax_queued = 0",
    "killed": "max_concurrent = 1\nmax_queued = 0",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    # a long context: a held stream's 8000 tokens overflow the client's HTTP/2 window, so the
    # stream pauses (backpressure) and holds its slot for as long as the test needs
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TinySpec(context_length=8192))


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis-replicas")) as server:
        yield server


@pytest.fixture(scope="module")
def pair(tiny_model, redis, tmp_path_factory):
    """Replica a (policy open) and b (policy closed) on one Redis."""
    d = tmp_path_factory.mktemp("replicas")
    tenants = d / "tenants.toml"
    tenants.write_text(
        "".join(f'[tenants.{n}]\napi_keys_sha256 = ["{hash_key("key-" + n)}"]\n{x}\n' for n, x in TENANTS.items())
    )
    common = [
        "--model",
        str(tiny_model),
        "--tenants",
        str(tenants),
        "--threads",
        "1",
        "--quota-store",
        redis.url,
        "--quota-lease-seconds",
        str(LEASE_S),
        "--max-unread-tokens",
        "4",
        "--stall-timeout-seconds",
        "0",
    ]
    a = Replica(free_port(), common + ["--quota-store-policy", "open", "--metrics-port", str(free_port())], d)
    b = Replica(free_port(), common + ["--quota-store-policy", "closed"], d)
    try:
        yield a.start(), b.start()
    finally:
        a.kill(), b.kill()


def stub(replica: Replica) -> pb2_grpc.TinyServeServiceStub:
    return pb2_grpc.TinyServeServiceStub(grpc.insecure_channel(replica.address))


def md(tenant: str):
    return (("authorization", f"Bearer key-{tenant}"),)


def generate(replica, tenant, max_tokens=2, prompt="hi") -> list:
    req = P.GenerateRequest(prompt=prompt, stopping=P.StoppingParameters(max_tokens=max_tokens, ignore_eos=True))
    return list(stub(replica).Generate(req, metadata=md(tenant), timeout=30))


def held_stream(replica, tenant):
    """A stream started and read once, then left unread: it holds its slot (paused once the
    client's HTTP/2 window is full; far before its 8000 tokens are done)."""
    req = P.GenerateRequest(prompt="hold", stopping=P.StoppingParameters(max_tokens=8000, ignore_eos=True))
    call = stub(replica).Generate(req, metadata=md(tenant), timeout=60)
    assert next(call).HasField("start")
    return call


def reason(err: grpc.RpcError) -> str:
    for any_ in rpc_status.from_call(err).details:
        info = error_details_pb2.ErrorInfo()
        if any_.Unpack(info):
            return info.reason
    return ""


def refusal(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), reason(e.value)


EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def test_requests_per_minute_hold_across_replicas(pair):
    a, b = pair
    ok, refused = 0, []
    for i in range(30):
        try:
            generate(a if i % 2 else b, "rpm")
            ok += 1
        except grpc.RpcError as e:
            refused.append((e.code(), reason(e)))
    assert ok == 10  # one tenant, 10 per minute, across both
    assert set(refused) == {(EXHAUSTED, "REQUESTS_PER_MINUTE")}


def test_tokens_per_minute_and_usage_across_replicas(pair):
    a, b = pair
    evs = generate(a, "tpm", max_tokens=70)  # the prompt + 70 generated: over 60, in debt
    assert evs[-1].end.usage.generated_tokens == 70
    time.sleep(0.5)  # a's buffered charges reach Redis (every 0.1 s)
    assert refusal(lambda: generate(b, "tpm")) == (EXHAUSTED, "TOKENS_PER_MINUTE")
    time.sleep(0.5)  # and b's count of that refusal
    for r in (a, b):
        u = stub(r).GetUsage(P.GetUsageRequest(), metadata=md("tpm"), timeout=10)
        assert (u.requests, u.generated_tokens) == (1, 70)
        assert u.prompt_tokens == evs[0].start.prompt_tokens
        assert dict(u.rejections) == {"tokens_per_minute": 1}


def test_concurrency_holds_across_replicas(pair):
    a, b = pair
    call = held_stream(a, "conc")
    assert refusal(lambda: generate(b, "conc")) == (EXHAUSTED, "CONCURRENCY_LIMIT")
    assert refusal(lambda: generate(a, "conc")) == (EXHAUSTED, "CONCURRENCY_LIMIT")
    call.cancel()
    deadline = time.monotonic() + 10
    while True:  # the slot comes back when the stream ends
        try:
            generate(b, "conc")
            break
        except grpc.RpcError as e:
            assert e.code() == EXHAUSTED and time.monotonic() < deadline
            time.sleep(0.1)


def metric(replica_metrics_port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{replica_metrics_port}/metrics", timeout=5).read()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines() if line.startswith(name))


def test_redis_stopped_follows_each_replicas_policy_and_recovers(pair, redis):
    a, b = pair
    metrics_port = int(a.args[a.args.index("--metrics-port") + 1])
    held = held_stream(a, "outage")
    redis.stop()
    try:
        t0 = time.monotonic()
        generate(a, "outage")  # open: admitted over the limit, counted
        assert time.monotonic() - t0 < 10  # (a hang guard)
        assert metric(metrics_port, 'tinyserve_quota_store_errors_total{operation="admit"}') >= 1
        code, why = refusal(lambda: generate(b, "outage"))  # closed: refuse, retry elsewhere
        assert (code, why) == (grpc.StatusCode.UNAVAILABLE, "QUOTA_STORE_UNAVAILABLE")
    finally:
        redis.start()  # an empty Redis on the same port
    held.cancel()
    held = held_stream(a, "outage")  # let the replicas reconnect: the limit
    deadline = time.monotonic() + 15  # holds again on both
    seen = []
    while True:
        try:
            generate(b, "outage")
        except grpc.RpcError as e:
            if (e.code(), reason(e)) == (EXHAUSTED, "CONCURRENCY_LIMIT"):
                break
            seen.append((e.code(), reason(e)))
        else:
            seen.append("ok")
        assert time.monotonic() < deadline, f"the replicas never used Redis again: {seen[-5:]}"
        time.sleep(0.2)
    held.cancel()


def test_a_replica_killed_mid_stream_frees_its_slot_within_the_lease(pair):
    a, b = pair
    call = held_stream(a, "killed")
    assert refusal(lambda: generate(b, "killed")) == (EXHAUSTED, "CONCURRENCY_LIMIT")
    a.proc.kill()  # SIGKILL: no release, no drain
    a.proc.wait()
    t0 = time.monotonic()
    while True:
        try:
            generate(b, "killed")
            break
        except grpc.RpcError as e:
            assert (e.code(), reason(e)) == (EXHAUSTED, "CONCURRENCY_LIMIT")
            assert time.monotonic() - t0 < LEASE_S + 5, "the dead replica's slot never lapsed"
            time.sleep(0.1)
    del call
