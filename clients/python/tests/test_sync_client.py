"""tinyserve_client.Client against a scripted server: requests as documented, results, retries,
deadlines, cancellation, error details."""

from __future__ import annotations

import json
import sys
import time

import grpc
import pytest
from fake_server import abort_with, retry_info
from google.rpc import error_details_pb2

import tinyserve_client
from tinyserve_client import Client, error_details, pb2


def test_the_package_needs_no_server_package():
    assert "tinyserve" not in sys.modules  # nothing of the server (nor its C++ core) is loaded
    from conftest import INSTALLED

    # the stubs came from the wheel (installed) or were generated from the checkout's proto/
    assert tinyserve_client.stubs.ORIGIN == ("installed" if INSTALLED else "checkout")
    assert tinyserve_client.SERVICE_NAME == "tinyserve.v1.TinyServeService"
    assert tinyserve_client.pb2.DESCRIPTOR.name == "tinyserve/v1/tinyserve.proto"


def test_generate_collects_the_stream(fake):
    with Client(fake.address, timeout=10) as c:
        r = c.generate("hello", max_tokens=3, temperature=0.5, top_k=7, stop=["x"], stop_token_ids=[2, 3], seed=None)
    assert (r.text, r.token_ids, r.finish_reason) == ("hel", [104, 101, 108], "length")
    assert (r.request_id, r.model, r.prompt_tokens, r.generated_tokens, r.cached_prompt_tokens) == (
        "r-1",
        "fake",
        5,
        3,
        1,
    )
    # the server's Durations, in milliseconds
    assert (r.queue_time_ms, r.time_to_first_token_ms, r.total_time_ms) == (2.0, 250.0, 1500.0)
    assert r.decode_tokens_per_second == 42.0
    ((method, req, _),) = fake.servicer.calls
    assert method == "Generate" and isinstance(req, pb2.GenerateRequest) and req.prompt == "hello"
    assert req.sampling.temperature == 0.5 and req.sampling.top_k == 7
    assert not req.sampling.HasField("seed") and not req.sampling.HasField("top_p")  # unset: default
    assert req.stopping.max_tokens == 3 and list(req.stopping.stop) == ["x"]
    assert list(req.stopping.stop_token_ids) == [2, 3]


def test_chat_sends_messages_and_reads_chat_responses(fake):
    msgs = [{"role": "system", "content": "be brief"}, pb2.ChatMessage(role="user", content="hi!")]
    with Client(fake.address, timeout=10) as c:
        r = c.chat(msgs, model="m")
        chunks = list(c.chat_stream([{"role": "user", "content": "yo"}]))
    assert r.text == "hi!" and r.finish_reason == "stop" and r.model == "m"
    assert [ch.text for ch in chunks] == ["y", "o"] and chunks[0].token_ids == [ord("y")]
    req = fake.servicer.calls[0][1]
    assert isinstance(req, pb2.ChatRequest) and req.model == "m"
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "hi!")]


def test_response_formats_and_tools_reach_the_request(fake):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with Client(fake.address, timeout=10) as c:
        c.generate("x", json_schema=schema)
        c.generate("x", regex="[0-9]+")
        c.generate("x", choice=["yes", "no"])
        c.generate("x", json_object=True)
        r = c.chat(
            [{"role": "user", "content": "hi"}],
            lark_grammar='start: "a"',
            tools=[
                {"name": "f", "description": "d", "parameters": schema},
                {"type": "function", "function": {"name": "g", "parameters": "{}"}},
            ],
            tool_choice="f",
        )
        with pytest.raises(TypeError, match="at most one response format"):
            c.generate("x", regex="a", json_object=True)
        with pytest.raises(TypeError, match="tools"):
            c.generate("x", tools=[])  # tools belong to chat
    reqs = [req for _, req, _ in fake.servicer.calls]
    assert json.loads(reqs[0].response_format.json_schema) == schema
    assert reqs[1].response_format.regex == "[0-9]+"
    assert list(reqs[2].response_format.choice.options) == ["yes", "no"]
    assert reqs[3].response_format.json_object
    chat = reqs[4]
    assert chat.response_format.lark_grammar == 'start: "a"' and chat.tool_choice == "f"
    assert [(t.name, t.description) for t in chat.tools] == [("f", "d"), ("g", "")]
    assert json.loads(chat.tools[0].parameters) == schema and chat.tools[1].parameters == "{}"
    assert r.tool_calls == [tinyserve_client.ToolCall("call_1", "f", "{}")]


def test_unknown_keyword_is_a_type_error(fake):
    with Client(fake.address) as c:
        with pytest.raises(TypeError, match="temprature"):
            c.generate("x", temprature=1.0)
    assert fake.servicer.calls == []  # nothing was sent


def test_unary_calls(fake):
    with Client(fake.address, timeout=10) as c:
        assert c.tokenize("ab") == [97, 98]
        assert c.detokenize([104, 105]) == "hi"
        assert c.list_models().default_model == "fake"
        m = c.get_model("other")
        assert isinstance(m, pb2.ModelInfo) and m.name == "other" and m.context_length == 256
        assert c.get_usage().tenant == "dev"
    assert fake.methods() == ["Tokenize", "Detokenize", "ListModels", "GetModel", "GetUsage"]


def test_api_key_is_sent_as_bearer_metadata(fake):
    with Client(fake.address, api_key="sk-123", timeout=10) as c:
        c.tokenize("a")
        c.generate("a")
    for _, _, md in fake.servicer.calls:
        assert md["authorization"] == "Bearer sk-123"
    with Client(fake.address, timeout=10) as c:
        c.tokenize("a")
    assert "authorization" not in fake.servicer.calls[-1][2]


def test_unavailable_is_retried_with_backoff_and_retry_info(fake, monkeypatch):
    slept = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda s: (slept.append(s), real_sleep(0)))

    def unavailable(ctx):
        return abort_with(ctx, grpc.StatusCode.UNAVAILABLE, "draining", retry_info(0.75))

    fake.servicer.fail = [unavailable, unavailable]
    with Client(fake.address, timeout=30, retries=3, backoff_s=0.01, max_backoff_s=2.0) as c:
        assert c.generate("ok").text == "ok"
    assert fake.methods() == ["Generate"] * 3
    assert len(slept) == 2 and all(0.75 <= s <= 2.0 for s in slept)  # never below RetryInfo
    fake.servicer.fail = [unavailable]
    slept.clear()
    with Client(fake.address, timeout=30, retries=3, backoff_s=0.01, max_backoff_s=0.1) as c:
        assert c.tokenize("a") == [97]  # unary calls retry too, capped backoff
    assert slept == [0.1]


def test_retries_give_up_after_the_last_attempt(fake, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    fake.servicer.fail = [lambda ctx: ctx.abort(grpc.StatusCode.UNAVAILABLE, "down")] * 5
    with Client(fake.address, timeout=30, retries=2, backoff_s=0.01) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and fake.methods() == ["Generate"] * 3


def test_a_stream_is_not_retried_after_its_first_event(fake):
    fake.servicer.fail_after_start = grpc.StatusCode.UNAVAILABLE
    with Client(fake.address, timeout=10, retries=3, backoff_s=0.01) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("abc")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and fake.methods() == ["Generate"]


def test_resource_exhausted_is_not_retried_and_has_details(fake):
    quota = error_details_pb2.QuotaFailure(
        violations=[
            error_details_pb2.QuotaFailure.Violation(subject="tenant:acme", description="over 1 requests per minute")
        ]
    )
    fake.servicer.fail = [
        lambda ctx: abort_with(ctx, grpc.StatusCode.RESOURCE_EXHAUSTED, "tenant:acme: over", quota, retry_info(59.5))
    ]
    with Client(fake.address, timeout=10, retries=3) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and fake.methods() == ["Generate"]
    details = error_details(e.value)
    assert [type(d) for d in details] == [error_details_pb2.QuotaFailure, error_details_pb2.RetryInfo]
    assert details[0].violations[0].subject == "tenant:acme"
    assert details[1].retry_delay.ToMilliseconds() == 59500


def test_deadline_covers_the_whole_call(fake):
    fake.servicer.token_delay = 0.2
    with Client(fake.address, timeout=0.3) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("a long prompt")
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_breaking_out_of_a_stream_cancels_it_on_the_server(fake):
    fake.servicer.token_delay = 0.05
    with Client(fake.address, timeout=30) as c:
        for i, _ in enumerate(c.generate_stream("x" * 200)):
            if i == 2:
                break
    assert fake.servicer.cancelled.wait(10)
