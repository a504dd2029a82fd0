"""Python clients for a tinyserve server: `Client` (blocking) and `AsyncClient` (asyncio).

    from tinyserve_client import Client
    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate_stream("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
        print(c.chat([{"role": "user", "content": "Hi!"}], temperature=0).text)

Keyword parameters of generate*/chat* are the fields of SamplingParameters (temperature, top_k,
top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, seed, logprobs) and of
StoppingParameters (max_tokens, stop, stop_token_ids, ignore_eos), and at most one response
format: json_schema (a dict or JSON text), json_object=True, regex, lark_grammar or choice (a list
of strings). chat* also take tools (dicts {"name", "description", "parameters"} with parameters a
JSON Schema dict, OpenAI-style {"type": "function", "function": {...}}, or pb2.Tool) and
tool_choice ("auto", "none", "required" or a function name); Completion.tool_calls holds the
calls the model made. `timeout` is the deadline in
seconds for the whole call, retries included. UNAVAILABLE (a draining or restarting server, no
connection yet) is retried with exponential backoff and jitter, honouring the server's RetryInfo;
a stream is only retried before its first event, so no text is ever repeated.
`api_key` is sent as `authorization: Bearer <key>` (servers with a tenants file require it).
Errors are grpc.RpcError; `error_details(err)` unpacks their google.rpc details (QuotaFailure
and RetryInfo for a tenant limit; RESOURCE_EXHAUSTED is not retried automatically).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tinyserve_client.stubs import pb2, pb2_grpc

__all__ = ["AsyncClient", "Client", "Completion", "TextChunk", "ToolCall", "error_details"]

# the keywords that fill SamplingParameters and StoppingParameters: their fields, by name
_SAMPLING = {f.name for f in pb2.SamplingParameters.DESCRIPTOR.fields}
_STOPPING = {f.name for f in pb2.StoppingParameters.DESCRIPTOR.fields}
_FORMATS = {"json_schema", "json_object", "regex", "lark_grammar", "choice"}
_TOOLS = {"tools", "tool_choice"}
_FINISH = {
    pb2.FINISH_REASON_STOP: "stop",
    pb2.FINISH_REASON_LENGTH: "length",
    pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
}


@dataclass
class TextChunk:
    """One token event: new text, its token ids, and logprobs if asked for."""

    text: str
    token_ids: list[int]
    logprobs: list = field(default_factory=list)


@dataclass
class Completion:
    """A finished generation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "stop_sequence"
    request_id: str
    model: str
    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int
    queue_time_ms: float  # StreamEnd's Durations, in milliseconds
    time_to_first_token_ms: float
    total_time_ms: float
    decode_tokens_per_second: float
    tool_calls: list[ToolCall] = field(default_factory=list)  # chat with tools: the calls made


@dataclass
class ToolCall:
    """A call the model made to one of the request's tools."""

    id: str
    name: str
    arguments: str  # a JSON object, as JSON text (json.loads it)


def build_request(kind: str, model: str, payload, params: Mapping):
    """GenerateRequest (payload = prompt) or ChatRequest (payload = messages) from keywords."""
    unknown = set(params) - _SAMPLING - _STOPPING - _FORMATS - (_TOOLS if kind == "chat" else set())
    if unknown:
        raise TypeError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
    sampling = pb2.SamplingParameters(**{k: v for k, v in params.items() if k in _SAMPLING and v is not None})
    stopping = pb2.StoppingParameters(**{k: v for k, v in params.items() if k in _STOPPING and v is not None})
    fmt = _response_format({k: v for k, v in params.items() if k in _FORMATS and v is not None})
    if kind == "generate":
        return pb2.GenerateRequest(
            model=model, prompt=payload, sampling=sampling, stopping=stopping, response_format=fmt
        )
    msgs = [
        m if isinstance(m, pb2.ChatMessage) else pb2.ChatMessage(role=m["role"], content=m["content"]) for m in payload
    ]
    return pb2.ChatRequest(
        model=model,
        messages=msgs,
        sampling=sampling,
        stopping=stopping,
        response_format=fmt,
        tools=[_tool(t) for t in params.get("tools") or ()],
        tool_choice=params.get("tool_choice") or "",
    )


def _response_format(given: Mapping):
    """pb2.ResponseFormat from at most one of the format keywords (None: free text)."""
    if len(given) > 1:
        raise TypeError(f"at most one response format, got {', '.join(sorted(given))}")
    if not given:
        return None
    ((name, value),) = given.items()
    if name == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    if name == "choice":
        if isinstance(value, str):
            raise TypeError("choice is a list of strings")
        value = pb2.Choice(options=list(value))
    return pb2.ResponseFormat(**{name: value})


def _tool(t):
    """pb2.Tool from a pb2.Tool, {"name", "description", "parameters"} or an OpenAI-style entry."""
    if isinstance(t, pb2.Tool):
        return t
    if t.get("type") == "function" and "function" in t:
        t = t["function"]
    params = t.get("parameters", "")
    return pb2.Tool(
        name=t["name"],
        description=t.get("description", ""),
        parameters=params if isinstance(params, str) else json.dumps(params),
    )


def error_details(err: grpc.RpcError) -> list:
    """The google.rpc detail messages (BadRequest, QuotaFailure, RetryInfo, ...) of an error."""
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    out = []
    for any_ in status.details if status else []:
        for cls in (
            error_details_pb2.BadRequest,
            error_details_pb2.QuotaFailure,
            error_details_pb2.RetryInfo,
            error_details_pb2.ErrorInfo,
            error_details_pb2.ResourceInfo,
        ):
            msg = cls()
            if any_.Unpack(msg):
                out.append(msg)
    return out


def _retry_delay(err: grpc.RpcError, attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter, never below the server's RetryInfo."""
    delay = random.uniform(0, min(cap, base * (2**attempt)))
    try:
        for d in error_details(err):
            if isinstance(d, error_details_pb2.RetryInfo):
                delay = max(delay, d.retry_delay.ToMilliseconds() / 1000)
    except Exception:  # noqa: BLE001 - malformed details must not break retrying
        pass
    return min(delay, cap)


def _credentials(root_certificates, private_key, certificate_chain):
    def read(x):
        if x is None or isinstance(x, bytes):
            return x
        with open(x, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(read(root_certificates), read(private_key), read(certificate_chain))


class _Base:
    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        tls: bool = False,
        root_certificates=None,
        private_key=None,
        certificate_chain=None,
        options: Sequence = (),
    ):
        self.target = target
        self.timeout = timeout  # default deadline (seconds) of every call
        self.retries = retries  # extra attempts on UNAVAILABLE
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._tls = tls or bool(root_certificates or private_key)
        self._creds = _credentials(root_certificates, private_key, certificate_chain) if self._tls else None
        self._options = list(options)

    def _deadline(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.001, deadline - time.monotonic())

    def _can_retry(self, err: grpc.RpcError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None if we should give up."""
        if err.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        delay = _retry_delay(err, attempt, self.backoff_s, self.max_backoff_s)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


class _Attempts:
    """The attempts of one call, under one deadline. `timeout()` is the next attempt's; wrap each
    attempt in `with attempts.start(call):` (call: a stream, cancelled on leaving). An UNAVAILABLE
    error that may be retried (see _Base._can_retry; a stream that gave no event yet) leaves the
    block quietly with `delay` set to the wait before the next attempt; any other error propagates."""

    def __init__(self, client: _Base, timeout: float | None):
        self.client, self.deadline = client, client._deadline(timeout)
        self.attempt, self.delay, self.got_any, self.call = 0, 0.0, False, None

    def timeout(self) -> float | None:
        return self.client._remaining(self.deadline)

    def start(self, call=None) -> _Attempts:
        self.call, self.got_any = call, False
        return self

    def __enter__(self) -> _Attempts:
        return self

    def __exit__(self, typ, err, tb) -> bool:
        if self.call is not None:
            self.call.cancel()  # no-op when finished; frees the server's work if we stop early
        if not isinstance(err, grpc.RpcError) or self.got_any:
            return False
        delay = self.client._can_retry(err, self.attempt, self.deadline)
        if delay is None:
            return False
        self.delay, self.attempt = delay, self.attempt + 1
        return True


def _chunk(ev) -> TextChunk:
    return TextChunk(ev.token.text, list(ev.token.token_ids), list(ev.token.logprobs))


class _Collector:
    def __init__(self):
        self.parts, self.ids, self.start, self.end = [], [], None, None

    def add(self, ev) -> None:
        kind = ev.WhichOneof("event")
        if kind == "start":
            self.start = ev.start
        elif kind == "token":
            self.parts.append(ev.token.text)
            self.ids += ev.token.token_ids
        elif kind == "end":
            self.end = ev.end

    def result(self) -> Completion:
        s, e = self.start or pb2.StreamStart(), self.end or pb2.StreamEnd()
        return Completion(
            "".join(self.parts),
            self.ids,
            _FINISH.get(e.finish_reason, "unspecified"),
            s.request_id,
            s.model,
            e.usage.prompt_tokens,
            e.usage.generated_tokens,
            e.usage.cached_prompt_tokens,
            _ms(e.queue_time),
            _ms(e.time_to_first_token),
            _ms(e.total_time),
            e.decode_tokens_per_second,
            [ToolCall(c.id, c.name, c.arguments) for c in e.tool_calls],
        )


def _ms(d) -> float:
    """A google.protobuf.Duration in milliseconds."""
    return d.seconds * 1e3 + d.nanos / 1e6


class Client(_Base):
    """Blocking client. Use as a context manager or call close()."""

    def __init__(self, target: str = "127.0.0.1:50051", **kw):
        super().__init__(target, **kw)
        self.channel = (
            grpc.secure_channel(target, self._creds, self._options)
            if self._tls
            else grpc.insecure_channel(target, self._options)
        )
        self.stub = pb2_grpc.TinyServeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- streaming ---------------------------------------------------------------------------
    def stream_events(self, method: str, request, timeout: float | None = None) -> Iterator:
        """Raw events of Generate/Chat (GenerateResponse/ChatResponse: the same oneof `event`),
        retried on UNAVAILABLE before the first."""
        tries = _Attempts(self, timeout)
        while True:
            call = getattr(self.stub, method)(request, timeout=tries.timeout(), metadata=self._metadata)
            with tries.start(call):
                for ev in call:
                    tries.got_any = True
                    yield ev
                return
            time.sleep(tries.delay)

    def generate_stream(
        self, prompt: str, *, model: str = "", timeout: float | None = None, **params
    ) -> Iterator[TextChunk]:
        for ev in self.stream_events("Generate", build_request("generate", model, prompt, params), timeout):
            if ev.HasField("token"):
                yield _chunk(ev)

    def chat_stream(self, messages, *, model: str = "", timeout: float | None = None, **params) -> Iterator[TextChunk]:
        for ev in self.stream_events("Chat", build_request("chat", model, messages, params), timeout):
            if ev.HasField("token"):
                yield _chunk(ev)

    def generate(self, prompt: str, *, model: str = "", timeout: float | None = None, **params) -> Completion:
        col = _Collector()
        for ev in self.stream_events("Generate", build_request("generate", model, prompt, params), timeout):
            col.add(ev)
        return col.result()

    def chat(self, messages, *, model: str = "", timeout: float | None = None, **params) -> Completion:
        col = _Collector()
        for ev in self.stream_events("Chat", build_request("chat", model, messages, params), timeout):
            col.add(ev)
        return col.result()

    # -- unary -------------------------------------------------------------------------------
    def _unary(self, method: str, request, timeout: float | None):
        tries = _Attempts(self, timeout)
        while True:
            with tries.start():
                return getattr(self.stub, method)(request, timeout=tries.timeout(), metadata=self._metadata)
            time.sleep(tries.delay)

    def tokenize(
        self, text: str, *, model: str = "", add_bos: bool | None = None, timeout: float | None = None
    ) -> list[int]:
        req = pb2.TokenizeRequest(model=model, text=text, add_bos=add_bos)
        return list(self._unary("Tokenize", req, timeout).token_ids)

    def detokenize(
        self,
        token_ids: Sequence[int],
        *,
        model: str = "",
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> str:
        req = pb2.DetokenizeRequest(model=model, token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return self._unary("Detokenize", req, timeout).text

    def list_models(self, timeout: float | None = None):
        return self._unary("ListModels", pb2.ListModelsRequest(), timeout)

    def get_model(self, name: str = "", timeout: float | None = None):
        """One model's description (a tinyserve.v1.ModelInfo); "" = the default model."""
        return self._unary("GetModel", pb2.GetModelRequest(name=name), timeout).model

    def get_usage(self, timeout: float | None = None):
        """This client's tenant's usage counters (a tinyserve.v1.GetUsageResponse)."""
        return self._unary("GetUsage", pb2.GetUsageRequest(), timeout)


class AsyncClient(_Base):
    """asyncio client (grpc.aio). Use `async with` or await close()."""

    def __init__(self, target: str = "127.0.0.1:50051", **kw):
        super().__init__(target, **kw)
        self.channel = (
            grpc.aio.secure_channel(target, self._creds, self._options)
            if self._tls
            else grpc.aio.insecure_channel(target, self._options)
        )
        self.stub = pb2_grpc.TinyServeServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def stream_events(self, method: str, request, timeout: float | None = None) -> AsyncIterator:
        tries = _Attempts(self, timeout)
        while True:
            call = getattr(self.stub, method)(request, timeout=tries.timeout(), metadata=self._metadata)
            with tries.start(call):
                async for ev in call:
                    tries.got_any = True
                    yield ev
                return
            await asyncio.sleep(tries.delay)

    async def generate_stream(
        self, prompt: str, *, model: str = "", timeout: float | None = None, **params
    ) -> AsyncIterator[TextChunk]:
        async for ev in self.stream_events("Generate", build_request("generate", model, prompt, params), timeout):
            if ev.HasField("token"):
                yield _chunk(ev)

    async def chat_stream(
        self, messages, *, model: str = "", timeout: float | None = None, **params
    ) -> AsyncIterator[TextChunk]:
        async for ev in self.stream_events("Chat", build_request("chat", model, messages, params), timeout):
            if ev.HasField("token"):
                yield _chunk(ev)

    async def generate(self, prompt: str, *, model: str = "", timeout: float | None = None, **params) -> Completion:
        col = _Collector()
        async for ev in self.stream_events("Generate", build_request("generate", model, prompt, params), timeout):
            col.add(ev)
        return col.result()

    async def chat(self, messages, *, model: str = "", timeout: float | None = None, **params) -> Completion:
        col = _Collector()
        async for ev in self.stream_events("Chat", build_request("chat", model, messages, params), timeout):
            col.add(ev)
        return col.result()

    async def _unary(self, method: str, request, timeout: float | None):
        tries = _Attempts(self, timeout)
        while True:
            with tries.start():
                return await getattr(self.stub, method)(request, timeout=tries.timeout(), metadata=self._metadata)
            await asyncio.sleep(tries.delay)

    async def tokenize(
        self, text: str, *, model: str = "", add_bos: bool | None = None, timeout: float | None = None
    ) -> list[int]:
        req = pb2.TokenizeRequest(model=model, text=text, add_bos=add_bos)
        return list((await self._unary("Tokenize", req, timeout)).token_ids)

    async def detokenize(
        self,
        token_ids: Sequence[int],
        *,
        model: str = "",
        skip_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> str:
        req = pb2.DetokenizeRequest(model=model, token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        return (await self._unary("Detokenize", req, timeout)).text

    async def list_models(self, timeout: float | None = None):
        return await self._unary("ListModels", pb2.ListModelsRequest(), timeout)

    async def get_model(self, name: str = "", timeout: float | None = None):
        """One model's description (a tinyserve.v1.ModelInfo); "" = the default model."""
        return (await self._unary("GetModel", pb2.GetModelRequest(name=name), timeout)).model

    async def get_usage(self, timeout: float | None = None):
        """This client's tenant's usage counters (a tinyserve.v1.GetUsageResponse)."""
        return await self._unary("GetUsage", pb2.GetUsageRequest(), timeout)
