"""Health, reflection, drain, metrics, request logs and the auth hook."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import grpc
import pytest
from grpc_fakes import FakeEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_rpcs import events, text_of, wait_for

from tinyserve.api.protos import pb2 as P

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(srv, service=""):
    stub = health_pb2_grpc.HealthStub(srv.channel())
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_overall_and_per_service(serve):
    srv = serve()
    assert health(srv) == SERVING
    assert health(srv, "tinyserve.v1.TinyServeService") == SERVING
    with pytest.raises(grpc.RpcError) as e:
        health(srv, "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(serve):
    srv = serve()
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel())
    reqs = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="tinyserve.v1.TinyServeService"),
    ]
    resps = list(stub.ServerReflectionInfo(iter(reqs), timeout=5))
    names = {s.name for s in resps[0].list_services_response.service}
    assert {"tinyserve.v1.TinyServeService", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(resps[1].file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "tinyserve.v1"
    assert [m.name for m in fd.service[0].method] == [
        "Generate",
        "Chat",
        "Tokenize",
        "Detokenize",
        "ListModels",
        "GetModel",
        "GetUsage",
    ]


def test_drain_finishes_inflight_streams_and_refuses_new_ones(serve):
    eng = FakeEngine(step_delay=0.01)
    srv = serve([eng])
    stub = srv.stub()
    inflight = stub.Generate(P.GenerateRequest(prompt="abc", stopping=P.StoppingParameters(max_tokens=60)), timeout=30)
    it = iter(inflight)
    assert next(it).HasField("start")
    drained = asyncio.run_coroutine_threadsafe(srv.server.drain(10.0), srv.loop)
    assert wait_for(lambda: srv.server.state.draining)
    assert health(srv) == NOT_SERVING and health(srv, "tinyserve.v1.TinyServeService") == NOT_SERVING
    with pytest.raises(grpc.RpcError) as e:
        events(stub, prompt="new")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(it)
    assert rest[-1].end.usage.generated_tokens == 60  # the in-flight stream ran to its end
    assert drained.result(15) is True


def test_drain_notice_keeps_serving_new_streams_while_health_says_not_serving(serve):
    from google.rpc import error_details_pb2
    from test_status_codes import details

    srv = serve([FakeEngine(step_delay=0.01)], drain_notice_s=1.5)
    stub = srv.stub()
    assert health(srv, "liveness") == SERVING
    drained = asyncio.run_coroutine_threadsafe(srv.server.drain(10.0), srv.loop)
    assert wait_for(lambda: health(srv) == NOT_SERVING)
    assert health(srv, "tinyserve.v1.TinyServeService") == NOT_SERVING
    assert health(srv, "liveness") == SERVING  # a liveness probe never fails a drain
    # the notice: balancers see NOT_SERVING, but a stream routed here meanwhile is still served
    assert not srv.server.state.draining
    assert text_of(events(stub, prompt="late", stopping=P.StoppingParameters(max_tokens=4))) == "late"
    long = iter(
        stub.Generate(P.GenerateRequest(prompt="ab", stopping=P.StoppingParameters(max_tokens=150)), timeout=30)
    )
    assert next(long).HasField("start")
    assert wait_for(lambda: srv.server.state.draining, timeout=5)  # then: refuse new ones
    with pytest.raises(grpc.RpcError) as e:
        events(stub, prompt="new")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [i.reason for i in details(e.value, error_details_pb2.ErrorInfo)] == ["DRAINING"]
    assert health(srv, "liveness") == SERVING
    assert list(long)[-1].end.usage.generated_tokens == 150  # admitted in the notice: finishes
    assert drained.result(15) is True


def test_connection_age_grace_covers_the_whole_drain():
    from tinyserve.api.server import _channel_options
    from tinyserve.config import ServerConfig

    opts = dict(_channel_options(ServerConfig(max_connection_age_s=60, drain_notice_s=5, drain_seconds=30)))
    assert opts["grpc.max_connection_age_grace_ms"] == 35_000


def test_drain_grace_period_ends_long_streams_with_unavailable(serve):
    eng = FakeEngine(step_delay=0.01)
    srv = serve([eng])
    call = srv.stub().Generate(
        P.GenerateRequest(prompt="abc", stopping=P.StoppingParameters(max_tokens=250)), timeout=30
    )
    it = iter(call)
    next(it)
    drained = asyncio.run_coroutine_threadsafe(srv.server.drain(0.2), srv.loop)
    with pytest.raises(grpc.RpcError) as e:
        list(it)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert drained.result(15) is False
    assert wait_for(lambda: eng.stats().kv_blocks_used == 0)


def test_metrics_endpoint(serve):
    srv = serve(metrics_port=0)
    assert text_of(events(srv.stub(), prompt="hi", stopping=P.StoppingParameters(max_tokens=4))) == "hihi"
    with pytest.raises(grpc.RpcError):
        events(srv.stub(), prompt="")
    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'tinyserve_requests_total{method="Generate",model="fake",status="OK"} 1.0' in body
    assert 'tinyserve_requests_total{method="Generate",model="fake",status="INVALID_ARGUMENT"} 1.0' in body
    assert 'tinyserve_time_to_first_token_seconds_count{model="fake"} 1.0' in body
    assert 'tinyserve_inter_token_latency_seconds_count{model="fake"} 3.0' in body
    assert 'tinyserve_generated_tokens_total{model="fake"} 4.0' in body
    for name in (
        "tinyserve_running_sequences",
        "tinyserve_waiting_sequences",
        "tinyserve_kv_blocks_used",
        "tinyserve_kv_blocks_free",
        "tinyserve_batch_size_bucket",
        "tinyserve_prefill_tokens_per_step_bucket",
        "tinyserve_request_duration_seconds_bucket",
    ):
        assert f"{name}{{" in body, name


def test_inference_gateway_metrics_under_the_names_its_picker_reads(serve):
    """The Gateway API Inference Extension's endpoint picker reads vllm:num_requests_waiting,
    vllm:num_requests_running, vllm:kv_cache_usage_perc and vllm:cache_config_info{block_size,
    num_gpu_blocks} by default; parsed here with prometheus-client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    eng = FakeEngine(step_delay=0.01)
    srv = serve([eng], metrics_port=0)
    call = iter(
        srv.stub().Generate(
            P.GenerateRequest(prompt="abcdefgh", stopping=P.StoppingParameters(max_tokens=200)), timeout=30
        )
    )
    next(call), next(call)
    url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"

    def scrape() -> dict:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }

    stats = eng.stats()
    m = scrape()
    assert m[("vllm:num_requests_running", (("model_name", "fake"),))] == 1
    assert m[("vllm:num_requests_waiting", (("model_name", "fake"),))] == 0
    usage = m[("vllm:kv_cache_usage_perc", (("model_name", "fake"),))]
    assert 0 < usage <= 1 and usage == pytest.approx(
        m[("tinyserve_kv_blocks_used", (("model", "fake"),))] / stats.kv_blocks_total
    )
    info = (
        ("block_size", str(eng.config.block_size)),
        ("model_name", "fake"),
        ("num_gpu_blocks", str(stats.kv_blocks_total)),
    )
    assert m[("vllm:cache_config_info", info)] == 1
    list(call)
    assert wait_for(lambda: scrape()[("vllm:num_requests_running", (("model_name", "fake"),))] == 0)


def test_one_json_log_line_per_request(serve, caplog):
    srv = serve()
    with caplog.at_level(logging.INFO, logger="tinyserve.requests"):
        events(srv.stub(), prompt="xyz", stopping=P.StoppingParameters(max_tokens=3))
        with pytest.raises(grpc.RpcError):
            events(srv.stub(), prompt="", timeout=5)
        assert wait_for(lambda: len([r for r in caplog.records if r.name == "tinyserve.requests"]) == 2)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tinyserve.requests"]
    ok, bad = lines
    assert ok["status"] == "OK" and ok["model"] == "fake" and ok["method"] == "Generate"
    assert ok["prompt_tokens"] == 3 and ok["generated_tokens"] == 3 and ok["finish_reason"] == "length"
    assert len(ok["request_id"]) == 20 and ok["ttft_ms"] >= 0 and ok["total_ms"] >= ok["ttft_ms"]
    assert bad["status"] == "INVALID_ARGUMENT" and bad["request_id"] != ok["request_id"]


def test_default_tenant_is_the_open_dev_tenant(serve):
    eng = FakeEngine()
    seen = []
    orig = eng.add_request
    eng.add_request = lambda *a, tenant="default", **kw: (seen.append(tenant), orig(*a, tenant=tenant, **kw))
    srv = serve([eng])
    events(srv.stub(), prompt="x", stopping=P.StoppingParameters(max_tokens=1))
    assert seen == ["dev"]


def test_json_log_format_merges_request_fields():
    from tinyserve.api.server import JsonFormatter

    rec = logging.LogRecord("tinyserve.requests", logging.INFO, __file__, 1, "ignored", None, None)
    rec.json_fields = {"request_id": "abc", "status": "OK"}
    out = json.loads(JsonFormatter().format(rec))
    assert out["request_id"] == "abc" and out["status"] == "OK" and out["level"] == "INFO"
    plain = logging.LogRecord("tinyserve.server", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    assert json.loads(JsonFormatter().format(plain))["msg"] == "hello you"


def test_client_examples_run(serve, capsys, monkeypatch):
    import runpy
    from pathlib import Path

    srv = serve()
    examples = Path(__file__).resolve().parents[2] / "clients" / "python" / "examples"
    monkeypatch.setattr("sys.argv", ["stream.py", srv.address, "abc"])
    runpy.run_path(str(examples / "stream.py"), run_name="__main__")
    assert capsys.readouterr().out.startswith("abcabc")
    monkeypatch.setattr("sys.argv", ["async_many.py", srv.address])
    runpy.run_path(str(examples / "async_many.py"), run_name="__main__")
    assert capsys.readouterr().out.count("-> user") == 8
