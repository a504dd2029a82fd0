"""Every RPC of tinyserve.v1.TinyServeService against an in-process server with the fake echo engine."""

from __future__ import annotations

import grpc
import pytest
from grpc_fakes import EOS, EOS_TEXT, IM_END, FakeEngine, FakeModel

from tinyserve.api.protos import pb2

P = pb2


def events(stub, timeout=20, **req):
    return list(stub.Generate(P.GenerateRequest(**req), timeout=timeout))


def text_of(evs) -> str:
    return "".join(e.token.text for e in evs if e.WhichOneof("event") == "token")


def test_generate_streams_start_tokens_end(serve):
    srv = serve()
    call = srv.stub().Generate(P.GenerateRequest(prompt="hello world" + EOS_TEXT), timeout=20)
    evs = list(call)
    kinds = [e.WhichOneof("event") for e in evs]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"token"}
    start, end = evs[0].start, evs[-1].end
    assert start.model == "fake" and start.prompt_tokens == 12
    assert dict(call.initial_metadata())["x-request-id"] == start.request_id
    # the echo model repeats the prompt; EOS ends it and is not part of the text
    assert text_of(evs) == "hello world"
    assert [t for e in evs[1:-1] for t in e.token.token_ids][-1] == EOS
    assert end.finish_reason == P.FINISH_REASON_STOP
    assert end.usage.prompt_tokens == 12 and end.usage.generated_tokens == 12
    assert end.usage.total_tokens == 24
    ns = [d.ToNanoseconds() for d in (end.total_time, end.time_to_first_token, end.queue_time)]
    assert ns[0] >= ns[1] >= ns[2] >= 0 and ns[0] > 0  # Durations, each within the next


def test_max_tokens_gives_length(serve):
    srv = serve()
    evs = events(srv.stub(), prompt="abc", stopping=P.StoppingParameters(max_tokens=7))
    assert text_of(evs) == "abcabca"
    assert evs[-1].end.finish_reason == P.FINISH_REASON_LENGTH
    assert evs[-1].end.usage.generated_tokens == 7


def test_unset_max_tokens_is_fitted_to_the_context(serve):
    srv = serve([FakeEngine(FakeModel(context_length=40))])
    evs = events(srv.stub(), prompt="x" * 30)
    assert evs[-1].end.usage.generated_tokens == 10  # 40 - 30, not the default 256


def test_stop_string_cuts_text_and_frees_the_sequence(serve):
    eng = FakeEngine()
    srv = serve([eng])
    evs = events(srv.stub(), prompt="one two STOP three", stopping=P.StoppingParameters(stop=["STOP"], max_tokens=100))
    assert text_of(evs) == "one two "
    assert evs[-1].end.finish_reason == P.FINISH_REASON_STOP_SEQUENCE
    assert wait_for(lambda: eng.stats().kv_blocks_used == 0)


def test_stop_token_ids_and_ignore_eos(serve):
    srv = serve()
    stub = srv.stub()
    evs = events(stub, prompt="abcd", stopping=P.StoppingParameters(stop_token_ids=[ord("c") + 3]))
    assert text_of(evs) == "ab" and evs[-1].end.finish_reason == P.FINISH_REASON_STOP
    evs = events(stub, prompt="ab" + EOS_TEXT, stopping=P.StoppingParameters(ignore_eos=True, max_tokens=5))
    assert text_of(evs) == "abab" and evs[-1].end.finish_reason == P.FINISH_REASON_LENGTH


def test_logprobs_are_streamed(serve):
    srv = serve()
    evs = events(
        srv.stub(), prompt="ab", sampling=P.SamplingParameters(logprobs=3), stopping=P.StoppingParameters(max_tokens=2)
    )
    lps = [lp for e in evs if e.HasField("token") for lp in e.token.logprobs]
    assert [lp.token_id for lp in lps] == [ord("a") + 3, ord("b") + 3]
    assert [lp.text for lp in lps] == ["a", "b"]
    assert all(len(lp.top) == 3 and lp.top[0].token_id == lp.token_id for lp in lps)


def test_chat_applies_the_template(serve):
    srv = serve()
    req = P.ChatRequest(messages=[P.ChatMessage(role="user", content="hi there")])
    evs = list(srv.stub().Chat(req, timeout=20))
    # the echo model repeats "<|im_start|>user\nhi there<|im_end|>": specials are not text,
    # and <|im_end|> is an end-of-turn token
    assert text_of(evs) == "user\nhi there"
    assert evs[-1].end.finish_reason == P.FINISH_REASON_STOP
    ids = [t for e in evs if e.HasField("token") for t in e.token.token_ids]
    assert ids[-1] == IM_END


def test_tokenize_and_detokenize(serve):
    srv = serve()
    stub = srv.stub()
    r = stub.Tokenize(P.TokenizeRequest(text="hé" + EOS_TEXT), timeout=10)
    assert r.model == "fake"
    assert list(r.token_ids) == [ord("h") + 3, 0xC3 + 3, 0xA9 + 3, EOS]
    assert r.pieces[0] == "h" and r.pieces[3] == EOS_TEXT
    plain = stub.Tokenize(P.TokenizeRequest(text=EOS_TEXT, parse_special=False), timeout=10)
    assert EOS not in plain.token_ids and len(plain.token_ids) == len(EOS_TEXT)
    d = stub.Detokenize(P.DetokenizeRequest(token_ids=r.token_ids), timeout=10)
    assert d.text == "hé" + EOS_TEXT
    d = stub.Detokenize(P.DetokenizeRequest(token_ids=r.token_ids, skip_special_tokens=True), timeout=10)
    assert d.text == "hé"


def test_list_and_get_models_and_routing(serve):
    a, b = FakeEngine(FakeModel(name="alpha")), FakeEngine(FakeModel(name="beta", context_length=64))
    srv = serve([a, b])
    stub = srv.stub()
    r = stub.ListModels(P.ListModelsRequest(), timeout=10)
    assert [m.name for m in r.models] == ["alpha", "beta"] and r.default_model == "alpha"
    assert [m.is_default for m in r.models] == [True, False]
    m = stub.GetModel(P.GetModelRequest(name="beta"), timeout=10).model
    assert m.context_length == 64 and m.vocab_size == 259 and m.has_chat_template
    assert stub.GetModel(P.GetModelRequest(), timeout=10).model.name == "alpha"
    evs = events(stub, model="beta", prompt="xy", stopping=P.StoppingParameters(max_tokens=2))
    assert evs[0].start.model == "beta"
    assert b.num_steps > 0 and a.num_steps == 0


@pytest.mark.parametrize("call", ["generate", "chat", "get", "tokenize", "detokenize"])
def test_unknown_model_is_not_found(serve, call):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    srv = serve()
    stub = srv.stub()
    with pytest.raises(grpc.RpcError) as e:
        if call == "generate":
            events(stub, model="nope", prompt="x")
        elif call == "chat":
            list(stub.Chat(P.ChatRequest(model="nope", messages=[P.ChatMessage(role="u")]), timeout=10))
        elif call == "get":
            stub.GetModel(P.GetModelRequest(name="nope"), timeout=10)
        elif call == "tokenize":
            stub.Tokenize(P.TokenizeRequest(model="nope", text="x"), timeout=10)
        else:
            stub.Detokenize(P.DetokenizeRequest(model="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(e.value)
    info = error_details_pb2.ResourceInfo()
    assert status.details[0].Unpack(info)
    assert info.resource_type == "model" and info.resource_name == "nope"


def wait_for(pred, timeout=10.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()
