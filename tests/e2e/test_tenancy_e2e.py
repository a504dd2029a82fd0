"""A real `tinyserve serve --tenants FILE` process (default model) shared by two API keys: each runs
as its own tenant under its own limits, reads only its own usage, SIGHUP swaps keys without a
restart, and a bad tenants file stops the server at start with the line and field."""

from __future__ import annotations

import signal
import subprocess
import time

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from realservers import free_port, serve_command, wait_serving
from tinyserve.api.protos import pb2 as P
from tinyserve.api.protos import pb2_grpc
from tinyserve.tenancy import hash_key

KEY_A, KEY_B, KEY_C = "ts_alpha_e2e_key", "ts_beta_e2e_key", "ts_gamma_e2e_key"


def tenants_toml(entries: dict[str, tuple[str, str]]) -> str:
    """{name: (key, extra TOML lines)} -> a tenants file."""
    return "".join(
        f'[tenants.{name}]\napi_keys_sha256 = ["{hash_key(key)}"]\n{extra}\n' for name, (key, extra) in entries.items()
    )


def until(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(default_model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    tenants = d / "tenants.toml"
    tenants.write_text(
        tenants_toml(
            {
                "alpha": (KEY_A, "max_output_tokens = 4\nweight = 2.0"),
                "beta": (KEY_B, "max_prompt_tokens = 64\nrequests_per_minute = 100"),
            }
        )
    )
    port = free_port()
    log = d / "stderr.log"
    cmd = serve_command(port, "--model", str(default_model_path), "--tenants", str(tenants), "--drain-seconds", "30")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_serving(f"127.0.0.1:{port}", proc, 120, log=log)  # no key needed for health
        yield proc, pb2_grpc.TinyServeServiceStub(channel), tenants, log
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def md(key):
    return [("authorization", f"Bearer {key}")]


def generate(stub, key, prompt="The capital of France is", **stopping):
    req = P.GenerateRequest(
        prompt=prompt, sampling=P.SamplingParameters(temperature=0), stopping=P.StoppingParameters(**stopping)
    )
    return list(stub.Generate(req, metadata=md(key), timeout=60))


def text(evs) -> str:
    return "".join(e.token.text for e in evs if e.HasField("token"))


def error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def quota(err: grpc.RpcError):
    status = rpc_status.from_call(err)
    out = {}
    for any_ in status.details:
        for cls in (error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo):
            msg = cls()
            if any_.Unpack(msg):
                out[cls.__name__] = msg
    return out


@pytest.mark.slow
def test_two_tenants_share_one_server(server):
    _, stub, _, _ = server
    a = generate(stub, KEY_A, max_tokens=3)
    b = generate(stub, KEY_B, max_tokens=3)
    assert a[-1].end.usage.generated_tokens == 3 and text(a) == text(b)  # same model, greedy
    # alpha's cap: an unset max_tokens runs to it, a larger one is refused without RetryInfo
    assert generate(stub, KEY_A, prompt="Once upon a time", ignore_eos=True)[-1].end.usage.generated_tokens == 4
    err = error(lambda: generate(stub, KEY_A, max_tokens=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    d = quota(err)
    assert d["QuotaFailure"].violations[0].subject == "tenant:alpha" and "RetryInfo" not in d
    # beta's prompt cap
    err = error(lambda: generate(stub, KEY_B, prompt="word " * 100, max_tokens=1))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert quota(err)["QuotaFailure"].violations[0].subject == "tenant:beta"
    # a wrong key
    assert error(lambda: generate(stub, "ts_not_a_key", max_tokens=1)).code() == grpc.StatusCode.UNAUTHENTICATED
    # each reads its own usage
    ua = stub.GetUsage(P.GetUsageRequest(), metadata=md(KEY_A), timeout=10)
    ub = stub.GetUsage(P.GetUsageRequest(), metadata=md(KEY_B), timeout=10)
    assert (ua.tenant, ua.requests, ua.generated_tokens) == ("alpha", 2, 7)
    assert dict(ua.rejections) == {"max_output_tokens": 1}
    assert (ub.tenant, ub.requests, ub.generated_tokens) == ("beta", 2, 3)
    assert dict(ub.rejections) == {"max_prompt_tokens": 1}
    assert ua.prompt_tokens == a[0].start.prompt_tokens + generate_prompt_tokens(stub)


def generate_prompt_tokens(stub) -> int:
    """Tokens of "Once upon a time" (alpha's second prompt)."""
    return len(stub.Tokenize(P.TokenizeRequest(text="Once upon a time"), metadata=md(KEY_A), timeout=10).token_ids)


@pytest.mark.slow
def test_prefix_cache_is_per_tenant(server):
    _, stub, _, _ = server
    prompt = "A shared system prompt that is long enough to fill a few KV cache blocks. " * 3

    def cached(key):
        evs = generate(stub, key, prompt=prompt, max_tokens=1)
        assert evs[0].start.prompt_tokens > 32
        return evs[-1].end.usage.cached_prompt_tokens

    assert cached(KEY_A) == 0
    assert cached(KEY_A) > 0  # alpha reuses its own blocks
    assert cached(KEY_B) == 0  # beta never hits alpha's, for the very same prompt
    assert cached(KEY_B) > 0


@pytest.mark.slow
def test_sighup_reloads_keys_then_sigterm_drains(server):
    proc, stub, tenants, log = server
    tenants.write_text(tenants_toml({"alpha": (KEY_A, ""), "gamma": (KEY_C, "")}))  # beta removed
    proc.send_signal(signal.SIGHUP)

    def gamma_works():
        try:
            return generate(stub, KEY_C, max_tokens=2)[-1].end.usage.generated_tokens == 2
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
            return False

    until(gamma_works, 30, "the reloaded key to work")
    assert error(lambda: generate(stub, KEY_B, max_tokens=1)).code() == grpc.StatusCode.UNAUTHENTICATED
    assert generate(stub, KEY_A, max_tokens=5)[-1].end.usage.generated_tokens == 5  # cap lifted
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    err = log.read_text()
    assert "tenants reloaded" in err and "removed: beta" in err and "Traceback" not in err


def test_a_bad_tenants_file_stops_the_server_at_start(tmp_path):
    bad = tmp_path / "tenants.toml"
    bad.write_text(f'[tenants.acme]\napi_keys_sha256 = ["{hash_key("k")}"]\nweight = -1\n')
    r = subprocess.run(
        serve_command(0, "--tenants", str(bad)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1, r.stderr
    assert f"{bad}:3: tenants.acme.weight: must be > 0" in r.stderr
    assert "Traceback" not in r.stderr
