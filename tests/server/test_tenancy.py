"""The server side of multi-tenancy, in process with the fake echo engine: API keys -> tenants,
every quota and limit with its status and google.rpc details, leases released on every exit path,
GetUsage isolation, reload mid-stream, per-tenant thread pools, per-tenant metrics."""

from __future__ import annotations

import json
import re
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_fakes import FakeEngine
from test_ops import SERVING, health
from test_rpcs import text_of, wait_for
from test_status_codes import details

from tinyserve.api.protos import pb2 as P
from tinyserve.engine.params import EngineConfig
from tinyserve.tenancy import hash_key

T = P.StoppingParameters
QuotaFailure, RetryInfo = error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo
ErrorInfo = error_details_pb2.ErrorInfo


def error_info(err: grpc.RpcError) -> ErrorInfo:
    """The one ErrorInfo of the status, checked to be in tinyserve's domain."""
    (info,) = details(err, ErrorInfo)
    assert info.domain == "tinyserve.dev"
    return info


def write_tenants(path, tenants: dict[str, dict]) -> str:
    """A tenants file: {name: {"keys": [plain keys], field: value, ...}} (JSON values are TOML)."""
    lines = []
    for name, fields in tenants.items():
        fields = dict(fields)
        lines.append(f"[tenants.{name}]")
        lines.append(f"api_keys_sha256 = {json.dumps([hash_key(k) for k in fields.pop('keys', [])])}")
        lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def tenant_serve(serve, tmp_path):
    """tenant_serve(tenants, engines=None, **config) -> a server reading that tenants file."""

    def make(tenants: dict[str, dict], engines=None, **config):
        path = write_tenants(tmp_path / "tenants.toml", tenants)
        srv = serve(engines, tenants_file=path, **config)
        srv.tenants_path = tmp_path / "tenants.toml"
        return srv

    return make


def md(key):
    return [("authorization", f"Bearer {key}")] if key is not None else []


def gen(srv, key, timeout=20, **req):
    return list(srv.stub().Generate(P.GenerateRequest(**req), metadata=md(key), timeout=timeout))


def start(srv, key, timeout=30, **req):
    """A Generate call, started (not read)."""
    return srv.stub().Generate(P.GenerateRequest(**req), metadata=md(key), timeout=timeout)


def usage(srv, key) -> P.GetUsageResponse:
    return srv.stub().GetUsage(P.GetUsageRequest(), metadata=md(key), timeout=10)


def quota_state(srv, tenant):
    return srv.server.registry.quotas.state(tenant)


def refused(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def spy_engine(**kw) -> tuple[FakeEngine, list]:
    """A FakeEngine recording the tenant of every add_request."""
    eng = FakeEngine(**kw)
    seen, orig = [], eng.add_request

    def add_request(*a, tenant="default", **kw):
        seen.append(tenant)
        return orig(*a, tenant=tenant, **kw)

    eng.add_request = add_request
    return eng, seen


class CountingTokenizer:
    """Wraps the fake tokenizer; counts encode() calls and records their thread names."""

    def __init__(self, inner):
        self._inner = inner
        self.encodes: list[tuple[str, str]] = []  # (text, thread name)

    def encode(self, text, **kw):
        self.encodes.append((text, threading.current_thread().name))
        return self._inner.encode(text, **kw)

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ---- authentication -----------------------------------------------------------------------------
def test_missing_or_wrong_key_is_unauthenticated_and_never_reaches_the_model(tenant_serve):
    eng, seen = spy_engine()
    tok = eng.model.tokenizer = CountingTokenizer(eng.model.tokenizer)
    srv = tenant_serve({"acme": {"keys": ["key-acme"]}}, [eng])
    stub = srv.stub()
    for key in (None, "wrong", "", "key-acme " + "x"):
        err = refused(lambda: gen(srv, key, prompt="hello"))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, key
    assert "missing API key" in refused(lambda: gen(srv, None, prompt="x")).details()
    basic = [("authorization", "Basic key-acme")]
    assert (
        refused(lambda: list(stub.Generate(P.GenerateRequest(prompt="x"), metadata=basic, timeout=10))).code()
        == grpc.StatusCode.UNAUTHENTICATED
    )
    for call in (
        lambda: stub.Tokenize(P.TokenizeRequest(text="hi"), metadata=md("wrong"), timeout=5),
        lambda: stub.ListModels(P.ListModelsRequest(), timeout=5),
        lambda: usage(srv, "wrong"),
        lambda: list(stub.Chat(P.ChatRequest(messages=[P.ChatMessage(role="user", content="x")]), timeout=5)),
    ):
        assert refused(call).code() == grpc.StatusCode.UNAUTHENTICATED
    assert seen == [] and tok.encodes == []  # nothing reached the model or its tokenizer
    assert health(srv) == SERVING and health(srv, "tinyserve.v1.TinyServeService") == SERVING  # open
    # the right key works, as its tenant
    evs = gen(srv, "key-acme", prompt="hi", stopping=T(max_tokens=2))
    assert text_of(evs) == "hi" and seen == ["acme"]
    metrics = srv.server.metrics.exposition().decode()
    assert 'tinyserve_unauthenticated_requests_total{status="UNAUTHENTICATED"} 10.0' in metrics


def test_open_dev_tenant_ignores_keys(serve):
    eng, seen = spy_engine()
    srv = serve([eng])
    for key in (None, "anything"):
        assert text_of(gen(srv, key, prompt="ab", stopping=T(max_tokens=2))) == "ab"
    assert seen == ["dev", "dev"]
    u = usage(srv, "whatever")
    assert (u.tenant, u.requests, u.generated_tokens) == ("dev", 2, 4)


def test_a_model_the_tenant_may_not_use_is_permission_denied(tenant_serve):
    eng, seen = spy_engine()
    srv = tenant_serve({"acme": {"keys": ["k"], "models": ["other-*"]}}, [eng])
    stub, key = srv.stub(), md("k")
    calls = {
        "Generate": lambda: gen(srv, "k", prompt="hi"),
        "Chat": lambda: list(
            stub.Chat(P.ChatRequest(messages=[P.ChatMessage(role="user", content="x")]), metadata=key, timeout=5)
        ),
        "Tokenize": lambda: stub.Tokenize(P.TokenizeRequest(text="hi"), metadata=key, timeout=5),
        "Detokenize": lambda: stub.Detokenize(P.DetokenizeRequest(token_ids=[70]), metadata=key, timeout=5),
        "GetModel": lambda: stub.GetModel(P.GetModelRequest(name="fake"), metadata=key, timeout=5),
    }
    for name, call in calls.items():
        err = refused(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert "may not use model 'fake'" in err.details()
        info = error_info(err)
        assert (info.reason, dict(info.metadata)) == ("MODEL_NOT_ALLOWED", {"tenant": "acme", "model": "fake"}), name
    assert seen == []
    assert list(stub.ListModels(P.ListModelsRequest(), metadata=key, timeout=5).models) == []
    assert dict(usage(srv, "k").rejections) == {"permission_denied": 5}


# ---- quotas: RESOURCE_EXHAUSTED with QuotaFailure (+ RetryInfo when waiting helps) -------------
def quota_error(err: grpc.RpcError, tenant: str, reason: str, limit: str, value: int) -> tuple[str, float | None]:
    """(violation description, retry delay in seconds or None), checking code, subject and the
    ErrorInfo (reason, tenant, the tenants-file field and its value)."""
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    (quota,) = details(err, QuotaFailure)
    (v,) = quota.violations
    assert v.subject == f"tenant:{tenant}"
    info = error_info(err)
    assert info.reason == reason
    assert dict(info.metadata) == {"tenant": tenant, "limit": limit, "limit_value": str(value)}
    retry = details(err, RetryInfo)
    return v.description, (retry[0].retry_delay.ToMilliseconds() / 1000 if retry else None)


def test_max_concurrent_without_a_queue(tenant_serve):
    eng = FakeEngine()
    eng.paused = True
    srv = tenant_serve({"a": {"keys": ["ka"], "max_concurrent": 1, "max_queued": 0}}, [eng])
    first = start(srv, "ka", prompt="abc", stopping=T(max_tokens=2))
    assert wait_for(lambda: quota_state(srv, "a")["active"] == 1)
    desc, retry = quota_error(
        refused(lambda: gen(srv, "ka", prompt="x")), "a", "CONCURRENCY_LIMIT", "max_concurrent", 1
    )
    assert "the limit is 1" in desc and retry is not None and retry > 0
    eng.paused = False
    assert list(first)[-1].end.usage.generated_tokens == 2
    assert wait_for(lambda: quota_state(srv, "a")["active"] == 0)
    assert text_of(gen(srv, "ka", prompt="ok", stopping=T(max_tokens=2))) == "ok"  # slot is back
    assert dict(usage(srv, "ka").rejections) == {"concurrency": 1}


def one_running_one_queue_place(tenant_serve, max_tokens: int):
    """Tenant "a" (key "ka", max_concurrent 1, max_queued 1) on a paused spy engine, with the
    request "one" running: (engine, tenants the engine saw, server, the running stream)."""
    eng, seen = spy_engine()
    eng.paused = True
    srv = tenant_serve({"a": {"keys": ["ka"], "max_concurrent": 1, "max_queued": 1}}, [eng])
    first = start(srv, "ka", prompt="one", stopping=T(max_tokens=max_tokens))
    assert wait_for(lambda: quota_state(srv, "a")["active"] == 1)
    return eng, seen, srv, first


def test_max_queued_waits_then_refuses(tenant_serve):
    eng, seen, srv, first = one_running_one_queue_place(tenant_serve, 3)
    second = start(srv, "ka", prompt="two", stopping=T(max_tokens=3))
    assert wait_for(lambda: quota_state(srv, "a")["queued"] == 1)
    desc, retry = quota_error(refused(lambda: gen(srv, "ka", prompt="three")), "a", "QUEUE_FULL", "max_queued", 1)
    assert "queued" in desc and retry is not None and retry > 0
    assert seen == ["a"]  # the queued request waits in the server, not the engine
    eng.paused = False
    assert text_of(list(first)) == "one" and text_of(list(second)) == "two"
    assert seen == ["a", "a"]
    assert dict(usage(srv, "ka").rejections) == {"max_queued": 1}


def test_a_deadline_while_queued_gives_up_the_queue_place(tenant_serve):
    eng, seen, srv, first = one_running_one_queue_place(tenant_serve, 2)
    err = refused(lambda: gen(srv, "ka", timeout=0.3, prompt="late"))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: quota_state(srv, "a")["queued"] == 0)
    queued = start(srv, "ka", prompt="two", stopping=T(max_tokens=2))  # the place is free again
    assert wait_for(lambda: quota_state(srv, "a")["queued"] == 1)
    eng.paused = False
    assert text_of(list(first)) == "on" and text_of(list(queued)) == "tw"
    assert seen == ["a", "a"]  # the one that timed out in the queue never reached the engine


def test_requests_per_minute(tenant_serve):
    srv = tenant_serve({"a": {"keys": ["ka"], "requests_per_minute": 2}})
    for _ in range(2):
        gen(srv, "ka", prompt="x", stopping=T(max_tokens=1))
    desc, retry = quota_error(
        refused(lambda: gen(srv, "ka", prompt="x")), "a", "REQUESTS_PER_MINUTE", "requests_per_minute", 2
    )
    assert "2 requests per minute" in desc
    assert retry is not None and 0 < retry <= 30.001  # one request refills in 60/2 s
    u = usage(srv, "ka")
    assert u.requests == 2 and dict(u.rejections) == {"requests_per_minute": 1}


def test_tokens_per_minute_counts_prompt_and_generated_tokens(tenant_serve):
    srv = tenant_serve({"a": {"keys": ["ka"], "tokens_per_minute": 10}})
    gen(srv, "ka", prompt="abcdefgh", stopping=T(max_tokens=4))  # 8 + 4 = 12 tokens: 2 in debt
    assert quota_state(srv, "a")["tpm_available"] < 0
    desc, retry = quota_error(
        refused(lambda: gen(srv, "ka", prompt="x")), "a", "TOKENS_PER_MINUTE", "tokens_per_minute", 10
    )
    assert "10 tokens per minute" in desc
    assert retry is not None and retry > 6  # 3 tokens to earn back at 10/60 per second
    u = usage(srv, "ka")
    assert (u.prompt_tokens, u.generated_tokens) == (8, 4)


def test_max_prompt_tokens_has_no_retry_info(tenant_serve):
    eng, seen = spy_engine()
    srv = tenant_serve({"a": {"keys": ["ka"], "max_prompt_tokens": 4}}, [eng])
    desc, retry = quota_error(
        refused(lambda: gen(srv, "ka", prompt="abcde")), "a", "MAX_PROMPT_TOKENS", "max_prompt_tokens", 4
    )
    assert "5 tokens" in desc and "limit is 4" in desc
    assert retry is None  # the same request can never succeed
    assert seen == []
    assert text_of(gen(srv, "ka", prompt="abcd", stopping=T(max_tokens=4))) == "abcd"
    assert dict(usage(srv, "ka").rejections) == {"max_prompt_tokens": 1}


def test_max_output_tokens_caps_and_refuses(tenant_serve):
    eng, seen = spy_engine()
    srv = tenant_serve({"a": {"keys": ["ka"], "max_output_tokens": 3}}, [eng])
    desc, retry = quota_error(
        refused(lambda: gen(srv, "ka", prompt="abc", stopping=T(max_tokens=4))),
        "a",
        "MAX_OUTPUT_TOKENS",
        "max_output_tokens",
        3,
    )
    assert "max_tokens 4" in desc and retry is None
    assert seen == []
    evs = gen(srv, "ka", prompt="abcdef")  # unset max_tokens: the tenant's cap, not the server's
    assert evs[-1].end.usage.generated_tokens == 3
    assert evs[-1].end.finish_reason == P.FINISH_REASON_LENGTH
    assert dict(usage(srv, "ka").rejections) == {"max_output_tokens": 1}


def test_the_model_wait_queue_is_still_resource_exhausted(tenant_serve):
    eng = FakeEngine(config=EngineConfig(block_size=4, max_num_seqs=1, max_waiting=1))
    eng.paused = True
    srv = tenant_serve({"a": {"keys": ["ka"]}}, [eng])
    waiting = start(srv, "ka", prompt="a", stopping=T(max_tokens=1))
    assert wait_for(lambda: eng.stats().num_waiting == 1)
    err = refused(lambda: gen(srv, "ka", prompt="b"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue" in details(err, QuotaFailure)[0].violations[0].subject
    assert error_info(err).reason == "SERVER_QUEUE_FULL"
    assert wait_for(lambda: quota_state(srv, "a")["active"] == 1)  # the refused one let go
    eng.paused = False
    assert list(waiting)[-1].HasField("end")


# ---- leases: released on every exit path ----------------------------------------------------------
def _finish(srv, eng):
    gen(srv, "ka", prompt="abc", stopping=T(max_tokens=3))


def _stop_string(srv, eng):
    evs = gen(srv, "ka", prompt="abcabc", stopping=T(max_tokens=50, stop=["c"]))
    assert evs[-1].end.finish_reason == P.FINISH_REASON_STOP_SEQUENCE


def _cancel(srv, eng):
    call = start(srv, "ka", prompt="abc", stopping=T(max_tokens=200))
    it = iter(call)
    next(it), next(it)
    call.cancel()


def _deadline(srv, eng):
    eng.paused = True
    try:
        assert refused(lambda: gen(srv, "ka", timeout=0.3, prompt="x")).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        eng.paused = False


def _engine_error(srv, eng):
    assert refused(lambda: gen(srv, "ka", prompt="__error__")).code() == grpc.StatusCode.INTERNAL


def _invalid_after_admission(srv, eng):
    assert refused(lambda: gen(srv, "ka", prompt="x" * 300)).code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "path",
    [_finish, _stop_string, _cancel, _deadline, _engine_error, _invalid_after_admission],
    ids=lambda f: f.__name__.strip("_"),
)
def test_the_lease_is_released_on_every_exit_path(tenant_serve, path):
    eng = FakeEngine(step_delay=0.002)
    srv = tenant_serve({"a": {"keys": ["ka"], "max_concurrent": 1, "max_queued": 0}}, [eng])
    for _ in range(2):  # a leaked slot would refuse the second round with RESOURCE_EXHAUSTED
        path(srv, eng)
        assert wait_for(lambda: quota_state(srv, "a")["active"] == 0)
    assert text_of(gen(srv, "ka", prompt="ok", stopping=T(max_tokens=2))) == "ok"


def test_drain_releases_leases(tenant_serve):
    eng = FakeEngine(step_delay=0.02)
    srv = tenant_serve({"a": {"keys": ["ka"], "max_concurrent": 1}}, [eng])
    call = start(srv, "ka", prompt="abc", stopping=T(max_tokens=250))
    assert next(iter(call)).HasField("start")
    assert srv.call(lambda: srv.server.drain(0.2)) is False
    assert refused(lambda: list(call)).code() == grpc.StatusCode.UNAVAILABLE
    assert wait_for(lambda: quota_state(srv, "a")["active"] == 0)


# ---- usage: each tenant reads its own ------------------------------------------------------------
class CachingEngine(FakeEngine):
    """Reports half of every prompt as served from the prefix cache."""

    def _out(self, seq, new, finished, reason, logprobs=None):
        out = super()._out(seq, new, finished, reason, logprobs)
        out.num_cached_tokens = len(seq.prompt) // 2
        return out


def test_get_usage_is_the_callers_own(tenant_serve):
    srv = tenant_serve({"a": {"keys": ["ka"]}, "b": {"keys": ["kb"], "max_output_tokens": 5}}, [CachingEngine()])
    assert not P.GetUsageRequest.DESCRIPTOR.fields  # nothing to name another tenant with
    for _ in range(2):
        evs = gen(srv, "ka", prompt="abcd", stopping=T(max_tokens=3))
        assert evs[-1].end.usage.cached_prompt_tokens == 2
    gen(srv, "kb", prompt="xy", stopping=T(max_tokens=2))
    refused(lambda: gen(srv, "kb", prompt="xy", stopping=T(max_tokens=9)))
    a, b = usage(srv, "ka"), usage(srv, "kb")
    assert (a.tenant, a.requests, a.prompt_tokens, a.cached_prompt_tokens, a.generated_tokens) == ("a", 2, 8, 4, 6)
    assert dict(a.rejections) == {}
    assert (b.tenant, b.requests, b.prompt_tokens, b.cached_prompt_tokens, b.generated_tokens) == ("b", 1, 2, 1, 2)
    assert dict(b.rejections) == {"max_output_tokens": 1}


def test_tenant_metrics_are_labelled_by_configured_tenants_only(tenant_serve):
    srv = tenant_serve({"a": {"keys": ["ka"]}, "b": {"keys": ["kb"], "max_prompt_tokens": 1}}, [CachingEngine()])
    gen(srv, "ka", prompt="abcd", stopping=T(max_tokens=3))
    refused(lambda: gen(srv, "kb", prompt="xy"))
    for key in ("intruder-1", "intruder-2", None):
        refused(lambda: gen(srv, key, prompt="x"))
    text = srv.server.metrics.exposition().decode()
    for line in (
        'tinyserve_tenant_requests_total{tenant="a"} 1.0',
        'tinyserve_tenant_prompt_tokens_total{tenant="a"} 4.0',
        'tinyserve_tenant_cached_prompt_tokens_total{tenant="a"} 2.0',
        'tinyserve_tenant_generated_tokens_total{tenant="a"} 3.0',
        'tinyserve_tenant_requests_finished_total{status="OK",tenant="a"} 1.0',
        'tinyserve_tenant_time_to_first_token_seconds_count{tenant="a"} 1.0',
        'tinyserve_tenant_rejections_total{reason="max_prompt_tokens",tenant="b"} 1.0',
        'tinyserve_tenant_requests_finished_total{status="RESOURCE_EXHAUSTED",tenant="b"} 1.0',
        'tinyserve_unauthenticated_requests_total{status="UNAUTHENTICATED"} 3.0',
    ):
        assert line in text, line
    assert set(re.findall(r'tenant="([^"]*)"', text)) == {"a", "b"}


# ---- reload -------------------------------------------------------------------------------------
def test_reload_mid_stream(tenant_serve):
    eng, seen = spy_engine(step_delay=0.01)
    srv = tenant_serve({"acme": {"keys": ["k-old"], "threads": 2}}, [eng])
    call = start(srv, "k-old", prompt="abc", stopping=T(max_tokens=40))
    it = iter(call)
    assert next(it).HasField("start") and next(it).HasField("token")
    # the SIGHUP handler runs exactly this (on a worker thread): acme is gone, beta is new
    write_tenants(srv.tenants_path, {"beta": {"keys": ["k-new"]}})
    assert srv.server.registry.reload() is True
    assert refused(lambda: gen(srv, "k-old", prompt="x")).code() == grpc.StatusCode.UNAUTHENTICATED
    assert text_of(gen(srv, "k-new", prompt="new", stopping=T(max_tokens=3))) == "new"
    rest = list(it)  # the stream from before the reload runs to its end
    assert rest[-1].end.usage.generated_tokens == 40
    assert text_of(rest).startswith("bcabc")
    assert seen == ["acme", "beta"]
    assert quota_state(srv, "acme")["removed"] and quota_state(srv, "acme")["active"] == 0
    # a broken file is refused and the current tenants stay
    srv.tenants_path.write_text("[tenants.beta]\nweight = -1\n")
    assert srv.server.registry.reload() is False
    assert text_of(gen(srv, "k-new", prompt="ok", stopping=T(max_tokens=2))) == "ok"


# ---- per-tenant thread pools ---------------------------------------------------------------------
class GatedTokenizer(CountingTokenizer):
    """encode() of a text containing HUGE blocks until `gate` is set (a slow, huge prompt)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.gate = threading.Event()
        self.blocked = 0
        self.detok_threads: set[str] = set()

    def encode(self, text, **kw):
        if "HUGE" in text:
            self.blocked += 1
            assert self.gate.wait(30), "never released"
        return super().encode(text, **kw)

    def _join_bytes(self, *a, **kw):  # IncrementalDetokenizer's work
        self.detok_threads.add(threading.current_thread().name)
        return self._inner._join_bytes(*a, **kw)


def test_a_flooding_tenant_does_not_delay_another_tenants_tokenization(tenant_serve):
    eng = FakeEngine()
    tok = eng.model.tokenizer = GatedTokenizer(eng.model.tokenizer)
    srv = tenant_serve(
        {"flood": {"keys": ["kf"], "threads": 1, "max_concurrent": 8}, "light": {"keys": ["kl"], "threads": 1}}, [eng]
    )
    try:
        floods = [start(srv, "kf", prompt=f"HUGE {i}", stopping=T(max_tokens=2)) for i in range(3)]
        assert wait_for(lambda: tok.blocked == 1)  # flood's one thread is stuck, two more queued
        # flood's own next request waits behind its huge prompts...
        flood_small = start(srv, "kf", prompt="small", stopping=T(max_tokens=2))
        # ...while light's request is tokenized, generated and detokenized to the end meanwhile
        evs = gen(srv, "kl", prompt="quick", stopping=T(max_tokens=5), timeout=20)
        assert text_of(evs) == "quick"
        assert not tok.gate.is_set() and tok.blocked == 1
        texts = [t for t, _ in tok.encodes]
        assert "quick" in texts and "small" not in texts  # "small" is still behind the flood
        (light_thread,) = {th for t, th in tok.encodes if t == "quick"}
        assert "-light-" in light_thread
        # its text came from the engine thread's hand-off (its stream started, in constant time,
        # on the event loop), never from the flood's stuck pool
        assert tok.detok_threads == {"engine[fake]", "test-server"}
    finally:
        tok.gate.set()
    for call in floods + [flood_small]:
        assert list(call)[-1].HasField("end")
    assert all("-flood-" in th for t, th in tok.encodes if t != "quick")


def test_bench_serve_uses_the_api_key(tenant_serve, capsys):
    """`tinyserve bench serve --api-key` loads a server that has a tenants file; without it, every
    request is UNAUTHENTICATED."""
    from tinyserve.cli import main as cli_main

    def bench_main(argv):
        return cli_main(["bench", "serve", *argv])

    srv = tenant_serve({"acme": {"keys": ["k-bench"]}})
    args = f"--server {srv.address} --concurrency 2 --requests 3 --prompt-tokens 8 --max-tokens 2 --warmup 0 --json".split()
    assert bench_main(args + ["--api-key", "k-bench"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["completed"] == 3 and res["errors"] == 0
    assert bench_main(args + ["--api-key", ""]) == 1
    out = capsys.readouterr()
    assert "UNAUTHENTICATED" in out.out + out.err


def test_kv_share_limits_the_prompt_through_the_real_engine(tenant_serve):
    """The servicer asks the engine how long a tenant's sequences may be (LLMEngine.max_len): with
    the real engine and scheduler, a prompt that fits the cache but not the tenant's KV share is
    INVALID_ARGUMENT naming the share, and the other tenant runs the same prompt."""
    from test_slow_readers import paged_engine
    from test_status_codes import violations

    shares = {"small": 0.25, "big": 1.0}
    engine = paged_engine(16, block_size=4, tenant_kv_share=lambda t: shares.get(t, 1.0))
    srv = tenant_serve({"small": {"keys": ["k-small"]}, "big": {"keys": ["k-big"]}}, [engine])
    assert engine.max_len("small") == 16 and engine.max_len("big") == 64
    prompt = "x" * 20  # 20 tokens (one per byte): more than 4 blocks of 4
    err = refused(lambda: gen(srv, "k-small", prompt=prompt, stopping=T(max_tokens=2)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV share" in violations(err)["prompt"] and "'small'" in violations(err)["prompt"]
    evs = gen(srv, "k-big", prompt=prompt, stopping=T(max_tokens=2, ignore_eos=True))
    assert evs[-1].end.usage.generated_tokens == 2


def test_generated_tokens_are_charged_in_full_however_the_stream_ends(tenant_serve):
    """The servicer charges a stream's tokens CHARGE_EVERY_TOKENS at a time and the rest at its
    end: the totals (GetUsage, the metric, the token bucket) are every token's, for a stream that
    runs to its end and for one whose client goes away part-way."""
    from tinyserve.api.servicer import CHARGE_EVERY_TOKENS

    eng, _ = spy_engine(step_delay=0.01)
    srv = tenant_serve({"a": {"keys": ["ka"], "tokens_per_minute": 1_000_000}}, [eng])
    n = 2 * CHARGE_EVERY_TOKENS + 5  # not a multiple
    evs = gen(srv, "ka", prompt="abc", stopping=T(max_tokens=n))
    assert evs[-1].end.usage.generated_tokens == n
    assert usage(srv, "ka").generated_tokens == n
    assert (
        f'tinyserve_tenant_generated_tokens_total{{tenant="a"}} {float(n)}' in srv.server.metrics.exposition().decode()
    )
    # the bucket: full, less the prompt and every token (refills at ~16.7k a second: a bound)
    assert quota_state(srv, "a")["tpm_available"] <= 1_000_000 - 3 - n + 16_667 * 2

    call = start(srv, "ka", prompt="xyz", stopping=T(max_tokens=250))
    read = 0
    for ev in call:
        read += len(ev.token.token_ids)
        if read >= CHARGE_EVERY_TOKENS + 3:
            break
    call.cancel()
    wait_for(lambda: quota_state(srv, "a")["active"] == 0)
    streamed = usage(srv, "ka").generated_tokens - n
    assert CHARGE_EVERY_TOKENS + 3 <= streamed < 250  # what was read, at least: the rest was charged too
