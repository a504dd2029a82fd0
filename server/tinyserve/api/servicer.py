"""The tinyserve.v1.TinyServeService servicer: validate, admit, enqueue, stream. No model math here.

The tenant (api.interceptors.TENANT, set by the auth interceptor) decides everything per request:
its quotas admit it (tenancy.Quotas: a lease, released on every exit path), its own thread pool
renders the chat template, tokenizes and decodes logprobs' alternatives (so one tenant's huge
prompts never delay another's; a stream's text is detokenized on the engine thread, bounded work
per token: api/async_engine.py), its usage counters are charged, and the engine gets its name (fair share, KV share,
prefix-cache salt). Generation runs in each model's engine thread (api/async_engine.py).

Every stream is counted and logged once with its final status: OK, the error's code, CANCELLED
for a client that went away, DEADLINE_EXCEEDED for one whose deadline passed. Names that come
back to the client (the model) are checked for length before anything echoes them, and a prompt
that cannot fit the context by its byte length alone is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf import duration_pb2

from tinyserve.api import errors
from tinyserve.api.async_engine import AsyncEngine, Finished, Started, Tokens
from tinyserve.api.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from tinyserve.api.interceptors import TENANT, request_id
from tinyserve.api.protos import pb2
from tinyserve.config import ServerConfig
from tinyserve.engine.grammar import COMPILE_TIMEOUT_S, GrammarCompiler, ResponseFormat
from tinyserve.engine.params import FinishReason, ParamError, SamplingParams, StoppingParams
from tinyserve.metrics import Metrics
from tinyserve.models.chat_template import TemplateRefused, check_message_contents
from tinyserve.models.tools import (
    ToolErrors,
    ToolSpec,
    call_format,
    check_tools,
    parse_calls,
    resolve_choice,
    with_tools,
)
from tinyserve.tenancy import TenantRegistry

if TYPE_CHECKING:
    from tinyserve.models.loader import LoadedModel
    from tinyserve.models.tokenizer import Tokenizer

log = logging.getLogger("tinyserve.api")
request_log = logging.getLogger("tinyserve.requests")

MAX_NAME_CHARS = 256  # a model name in a request (longer: INVALID_ARGUMENT, never echoed)
TRIM_AFTER_CHARS = 64 << 10  # after tokenizing a text this long, give freed heap back to the OS
# A stream's generated tokens are charged to its tenant (usage, tokens_per_minute) this many at a
# time, and the rest when it ends, whatever the end: the same totals as charging each token, at a
# sixteenth of the lock and metric work a token (one stream's token cost, README).
CHARGE_EVERY_TOKENS = 16

# The engine's finish reasons as the API's enum: the one mapping (a stream ends with one of these).
_FINISH = {
    FinishReason.STOP: pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb2.FINISH_REASON_STOP_SEQUENCE,
}


@dataclass
class ServedModel:
    """One model the server serves: the loaded model and its engine bridge."""

    name: str
    model: LoadedModel
    engine: AsyncEngine

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def max_model_len(self) -> int:
        """Prompt + output tokens (the engine's limit: the context, or what the KV arena holds)."""
        return self.engine.max_model_len

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """The most text bytes one token stands for (None: the tokenizer does not say). A text
        of B bytes is at least ceil(B / max_token_bytes) tokens: our normalizers only add bytes."""
        tok = self.tokenizer
        try:
            n = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
        except (AttributeError, TypeError, ValueError):
            return None
        return n if n > 0 else None


class ServingState:
    """What the server is doing: serving or draining, and how many streams are in flight."""

    def __init__(self):
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining:
            raise Unavailable("the server is draining; retry on another replica", reason=errors.REASON_DRAINING)
        self.inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class TinyServeServicer:
    """Implements every RPC of tinyserve.v1.TinyServeService (see proto/tinyserve/v1/tinyserve.proto)."""

    def __init__(
        self,
        models: list[ServedModel],
        config: ServerConfig,
        metrics: Metrics,
        state: ServingState,
        registry: TenantRegistry,
    ):
        if not models:
            raise ValueError("a server needs at least one model")
        self.models = {m.name: m for m in models}
        self.default = models[0]
        self.config = config
        self.metrics = metrics
        self.state = state
        self.registry = registry

    # ---- helpers ---------------------------------------------------------------------------
    def _resolve(self, name: str, field: str = "model") -> ServedModel:
        if not name:
            return self.default
        if len(name) > MAX_NAME_CHARS:
            raise InvalidArgument(
                FieldViolation(field, f"a model name is at most {MAX_NAME_CHARS} characters, got {len(name)}")
            )
        m = self.models.get(name)
        if m is None:
            raise NotFound("model", name, f"served models: {', '.join(self.models)}")
        return m

    async def _offload(self, fn, *args):
        """fn(*args) on the calling tenant's own thread pool."""
        return await self.registry.executors.run(TENANT.get(), fn, *args)

    def _allowed(self, served: ServedModel) -> ServedModel:
        """The model, if the calling tenant may use it (else PermissionDenied)."""
        self.registry.quotas.check_model(TENANT.get(), served.name)
        return served

    def _log(self, fields: dict) -> None:
        request_log.info(json.dumps(fields, separators=(",", ":")), extra={"json_fields": fields})

    # ---- streaming RPCs --------------------------------------------------------------------
    async def Generate(self, request, context):
        async def prompt_ids(served: ServedModel, structure: Structure) -> list[int]:
            if not request.prompt:
                raise InvalidArgument(FieldViolation("prompt", "must not be empty"))
            return await self._offload(_encode, served, request.prompt, "prompt", self._prompt_limit(served))

        async for event in self._stream("Generate", request, context, prompt_ids, "prompt", pb2.GenerateResponse):
            yield event

    async def Chat(self, request, context):
        async def prompt_ids(served: ServedModel, structure: Structure) -> list[int]:
            bad = []
            if not request.messages:
                bad.append(FieldViolation("messages", "must hold at least one message"))
            for i, m in enumerate(request.messages):
                if not m.role:
                    bad.append(FieldViolation(f"messages[{i}].role", "must not be empty"))
            if bad:
                raise InvalidArgument(bad)
            msgs = [{"role": m.role, "content": m.content} for m in request.messages]
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            limit = self._prompt_limit(served)

            def render_and_encode():
                # ChatTemplateErrors map in api/errors.py: a refused conversation is the client's
                # fault (INVALID_ARGUMENT), a template that fails or overruns is the server's (INTERNAL).
                check_message_contents(msgs, served.tokenizer)
                if structure.tools:  # tool text reaches the prompt too: no forged turns there either
                    try:
                        check_message_contents(
                            [
                                {
                                    "content": json.dumps(
                                        [t.template_entry() for t in structure.tools], ensure_ascii=False
                                    )
                                }
                            ],
                            served.tokenizer,
                        )
                    except TemplateRefused as e:
                        raise InvalidArgument(
                            FieldViolation("tools", str(e).replace("messages[0].content", "a tool"))
                        ) from None
                template = served.model.chat_template
                shown, extra = with_tools(msgs, structure.tools, template.uses_tools)
                text = template.render(shown, add_generation_prompt=True, deadline=deadline, **extra)
                return _encode(served, text, "messages", limit)

            return await self._offload(render_and_encode)

        async for event in self._stream("Chat", request, context, prompt_ids, "messages", pb2.ChatResponse):
            yield event

    async def _stream(self, method, request, context, make_prompt_ids, prompt_field, response):
        rid = request_id()
        t0 = time.monotonic()
        tenant = TENANT.get()
        fields = {
            "event": "request",
            "request_id": rid,
            "method": method,
            "tenant": tenant,
            "model": errors.clip(request.model) or None,
        }
        status, handle, served, lease = "OK", None, None, None
        ended = False
        uncharged = 0  # generated tokens not yet charged to the lease (CHARGE_EVERY_TOKENS)

        def charge() -> None:
            nonlocal uncharged
            if uncharged:
                n, uncharged = uncharged, 0
                lease.charge_generated(n)

        def end(status: str) -> None:
            """Close the books once: free the tenant's slot, count and log the request."""
            nonlocal ended
            if ended:
                return
            ended = True
            if lease is not None:
                charge()
                lease.release()
            if handle is not None:
                fields["generated_tokens"] = handle.num_output_tokens
                fields.setdefault("cached_tokens", handle.num_cached_tokens)
            self.state.leave()
            self._finish_log(fields, method, status, t0, served)

        try:
            self.state.enter()
        except Unavailable as e:
            self._finish_log(fields, method, "UNAVAILABLE", t0)
            await errors.abort(context, e, rid)
        try:
            await context.send_initial_metadata(((errors.REQUEST_ID_KEY, rid),))
            served = self._resolve(request.model)
            fields["model"] = served.name
            sampling, stopping, explicit_max_tokens, bad = self._params(request, served)
            structure = self._structure(request, bad)
            if bad:
                raise InvalidArgument(bad)
            # Tenant admission, fail fast before any work: model allowed, max_tokens within the
            # tenant's cap (an unset one defaults to it), concurrency, queue and rates.
            quotas = self.registry.quotas
            stopping.max_tokens = quotas.max_output_tokens(tenant, explicit_max_tokens, self.config.default_max_tokens)
            lease = quotas.admit(tenant, served.name, explicit_max_tokens)
            await lease.wait_active()  # queued behind the tenant's own streams (max_queued)
            ids = await make_prompt_ids(served, structure)
            fields["prompt_tokens"] = len(ids)
            lease.charge_prompt(len(ids))  # max_prompt_tokens, then tokens_per_minute
            bad = self._fit_length(served, ids, stopping, explicit_max_tokens, prompt_field)
            if bad:
                raise InvalidArgument(bad)
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            grammar = None
            if structure.format is not None:
                fields["response_format"] = structure.format.kind
                grammar = await self._compile(served, structure)
            handle = served.engine.submit(
                rid, ids, sampling, stopping, tenant=tenant, deadline=deadline, grammar=grammar
            )
            if served.engine.metrics is not None:
                served.engine.metrics.prompt_tokens.inc(len(ids))
            answer: list[str] = []  # the text, when tool calls are parsed from it at the end
            async with handle:
                async for ev in handle:
                    calls = None
                    if isinstance(ev, Tokens):
                        if structure.parse_calls:
                            answer.append(ev.text)
                        if ev.token_ids:
                            uncharged += len(ev.token_ids)
                            if uncharged >= CHARGE_EVERY_TOKENS:
                                charge()
                        if ev.logprobs:  # decodes every alternative: the tenant's pool
                            yield await self._offload(self._event_proto, ev, served, response)
                            continue
                    elif isinstance(ev, Finished):
                        charge()  # before the client can see the end
                        self.registry.usage.record_prompt(tenant, 0, ev.num_cached_tokens)
                        self._observe_finished(served, ev, fields, tenant)
                        if structure.parse_calls:
                            calls = parse_calls("".join(answer), structure.tools)
                            fields["tool_calls"] = len(calls)
                    yield self._event_proto(ev, served, response, calls)
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away or its deadline passed; the handle already aborted the request.
            # CancelledError: grpc cancelled the handler while it waited; GeneratorExit: grpc
            # stopped reading this stream while it waited to send an event, and closed it.
            status = "DEADLINE_EXCEEDED" if errors.deadline_passed(context, errors.DEADLINE_SLACK_S) else "CANCELLED"
            raise
        except Exception as e:  # noqa: BLE001 - every exception gets a status, none a traceback
            status = errors.status_name(e)
            # Close the books before abort() (the client may see the status before a `finally`
            # here runs): a client that retries at once finds its slot free, the request counted.
            end(status)
            await errors.abort(context, e, rid)
        finally:
            end(status)

    def _finish_log(self, fields, method, status, t0, served=None):
        fields["status"] = status
        fields["total_ms"] = round((time.monotonic() - t0) * 1e3, 3)
        model = served.name if served else ""  # a metric label: served names only, never the client's
        self.metrics.count_request(model, method, status)
        self.metrics.tenant_finished.labels(fields["tenant"], status).inc()
        if served is not None and served.engine.metrics is not None:
            served.engine.metrics.e2e.observe(time.monotonic() - t0)
        self._log(fields)

    def _observe_finished(self, served: ServedModel, ev: Finished, fields: dict, tenant: str) -> None:
        m = served.engine.metrics
        if m is not None:
            if ev.num_output_tokens:
                m.ttft.observe(ev.time_to_first_token)
            m.generated_tokens.inc(ev.num_output_tokens)
        if ev.num_output_tokens:
            self.metrics.tenant_ttft.labels(tenant).observe(ev.time_to_first_token)
        fields.update(
            finish_reason=ev.reason.value,
            cached_tokens=ev.num_cached_tokens,
            queue_ms=round(ev.queue_time * 1e3, 3),
            ttft_ms=round(ev.time_to_first_token * 1e3, 3),
            decode_tps=round(ev.decode_tokens_per_second, 2),
        )

    def _event_proto(self, ev, served: ServedModel, response, tool_calls=None):
        """The stream event for `ev`: a `response` (GenerateResponse or ChatResponse)."""
        if isinstance(ev, Tokens):
            chunk = pb2.TokenChunk(text=ev.text, token_ids=ev.token_ids)
            if ev.logprobs:
                dec = served.tokenizer.decode
                for lp in ev.logprobs:
                    chunk.logprobs.append(
                        pb2.TokenLogprob(
                            token_id=lp.token_id,
                            text=dec([lp.token_id]),
                            logprob=lp.logprob,
                            top=[pb2.TopLogprob(token_id=t, text=dec([t]), logprob=p) for t, p in lp.top],
                        )
                    )
            return response(token=chunk)
        if isinstance(ev, Started):
            return response(
                start=pb2.StreamStart(
                    request_id=ev.request_id,
                    model=served.name,
                    prompt_tokens=ev.num_prompt_tokens,
                    cached_prompt_tokens=ev.num_cached_tokens,
                )
            )
        assert isinstance(ev, Finished)
        return response(
            end=pb2.StreamEnd(
                finish_reason=_FINISH[ev.reason],
                usage=pb2.Usage(
                    prompt_tokens=ev.num_prompt_tokens,
                    generated_tokens=ev.num_output_tokens,
                    cached_prompt_tokens=ev.num_cached_tokens,
                    total_tokens=ev.num_prompt_tokens + ev.num_output_tokens,
                ),
                queue_time=_duration(ev.queue_time),
                time_to_first_token=_duration(ev.time_to_first_token),
                total_time=_duration(ev.total_time),
                decode_tokens_per_second=ev.decode_tokens_per_second,
                tool_calls=[pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in tool_calls or ()],
            )
        )

    # ---- structured output -------------------------------------------------------------------
    def _structure(self, request, bad: list[FieldViolation]) -> Structure:
        """The request's response format and tools (its violations appended to `bad`)."""
        fmt = None
        if request.HasField("response_format"):
            fmt = _response_format(request.response_format)
            if fmt is not None:
                try:
                    fmt.validate()
                except ParamError as e:
                    bad.append(FieldViolation(e.field, e.message))
        if not isinstance(request, pb2.ChatRequest):
            return Structure(fmt)
        try:
            specs = check_tools([(t.name, t.description, t.parameters) for t in request.tools])
            choice = resolve_choice(request.tool_choice, specs)
        except ToolErrors as e:
            bad += [FieldViolation(v.field, v.message) for v in e.errors]
            return Structure(fmt)
        except ParamError as e:
            bad.append(FieldViolation(e.field, e.message))
            return Structure(fmt)
        if choice in ("auto", "none", None):
            return Structure(fmt, tuple(specs), parse_calls=choice == "auto")
        if fmt is not None:
            bad.append(
                FieldViolation(
                    "response_format",
                    f"cannot be combined with tool_choice {choice!r}, which constrains the answer to a call",
                )
            )
        return Structure(call_format(specs, choice), tuple(specs), parse_calls=True, from_tools=True)

    async def _compile(self, served: ServedModel, structure: Structure):
        """A fresh matcher of the request's compiled grammar, built on the tenant's own pool
        (cached per model and format: engine/grammar.py). INVALID_ARGUMENT on the field used
        when it does not compile, or not within COMPILE_TIMEOUT_S."""
        fmt = structure.format
        assert fmt is not None  # only a structured request compiles
        field = "tools" if structure.from_tools else fmt.field

        def work():
            return GrammarCompiler.for_tokenizer(served.tokenizer).compile(fmt).matcher()

        try:
            return await asyncio.wait_for(self._offload(work), COMPILE_TIMEOUT_S)
        except TimeoutError:
            raise InvalidArgument(FieldViolation(field, f"did not compile within {COMPILE_TIMEOUT_S:g} s")) from None
        except ParamError as e:
            raise InvalidArgument(FieldViolation(field if structure.from_tools else e.field, e.message)) from None

    # ---- validation ------------------------------------------------------------------------
    def _params(self, request, served: ServedModel):
        """SamplingParams, StoppingParams, the request's max_tokens (None if unset) and the
        violations found. StoppingParams.max_tokens is fitted to the prompt by _fit_length."""
        bad: list[FieldViolation] = []
        s, st = request.sampling, request.stopping

        def get(msg, name, default):
            return getattr(msg, name) if msg.HasField(name) else default

        sp = SamplingParams(
            temperature=get(s, "temperature", 1.0),
            top_k=get(s, "top_k", 0),
            top_p=get(s, "top_p", 1.0),
            min_p=get(s, "min_p", 0.0),
            repetition_penalty=get(s, "repetition_penalty", 1.0),
            presence_penalty=get(s, "presence_penalty", 0.0),
            frequency_penalty=get(s, "frequency_penalty", 0.0),
            seed=get(s, "seed", None),
            logprobs=s.logprobs,
        )
        cfg = self.config
        max_tokens = st.max_tokens if st.HasField("max_tokens") else None
        stp = StoppingParams(
            max_tokens=cfg.default_max_tokens if max_tokens is None else max_tokens,
            stop=list(st.stop),
            stop_token_ids=list(st.stop_token_ids),
            ignore_eos=st.ignore_eos,
        )
        # The ranges are the engine's (engine/params.py), checked here to report all at once.
        bad += [FieldViolation(e.field, e.message) for e in sp.violations()]
        bad += [FieldViolation(e.field, e.message) for e in stp.violations()]
        vocab = served.vocab_size
        for i, t in enumerate(st.stop_token_ids):
            if not 0 <= t < vocab:
                bad.append(
                    FieldViolation(f"stopping.stop_token_ids[{i}]", f"token id {t} outside the vocabulary [0, {vocab})")
                )
        return sp, stp, max_tokens, bad

    def _prompt_limit(self, served: ServedModel) -> tuple[int, str]:
        """(context, why) for the calling tenant: a prompt must be shorter than `context`."""
        ctx, limit = served.max_model_len, f"context {served.max_model_len}"
        tenant_len = served.engine.max_len(TENANT.get())
        if tenant_len < ctx:  # the tenant's KV share holds less
            ctx, limit = tenant_len, f"{tenant_len} tokens fit in tenant {TENANT.get()!r}'s KV share"
        return ctx, limit

    def _fit_length(self, served, ids, stopping, explicit, prompt_field):
        """Violations of the context length; fits an unset max_tokens to what is left."""
        n = len(ids)
        ctx, limit = self._prompt_limit(served)
        if n == 0:
            return [FieldViolation(prompt_field, "tokenizes to no tokens")]
        if n >= ctx:
            return [_too_long(prompt_field, f"{n} tokens", served, ctx, limit)]
        room = ctx - n
        if explicit is not None and explicit > room:
            return [
                FieldViolation(
                    "stopping.max_tokens",
                    f"{explicit} tokens do not fit: the prompt is {n} tokens and "
                    f"the limit is {limit}, so at most {room}",
                )
            ]
        if explicit is None:
            stopping.max_tokens = min(stopping.max_tokens, room)
        return []

    # ---- unary RPCs ------------------------------------------------------------------------
    async def _unary(self, method, request, context, body):
        rid = request_id()
        model_name = ""
        try:
            await context.send_initial_metadata(((errors.REQUEST_ID_KEY, rid),))
            resp, model_name = await body()
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            status = "DEADLINE_EXCEEDED" if errors.deadline_passed(context, errors.DEADLINE_SLACK_S) else "CANCELLED"
            self.metrics.count_request(model_name, method, status)
            raise
        except Exception as e:  # noqa: BLE001
            self.metrics.count_request(model_name, method, errors.status_name(e))  # before the
            await errors.abort(context, e, rid)  # client sees it
        self.metrics.count_request(model_name, method, "OK")
        return resp

    async def Tokenize(self, request, context):
        async def body():
            served = self._allowed(self._resolve(request.model))
            add_bos = request.add_bos if request.HasField("add_bos") else None
            parse_special = request.parse_special if request.HasField("parse_special") else True

            def work():
                ids = _encode(served, request.text, "text", add_bos=add_bos, parse_special=parse_special)
                return ids, [served.tokenizer.decode([i]) for i in ids]

            ids, pieces = await self._offload(work)
            return pb2.TokenizeResponse(model=served.name, token_ids=ids, pieces=pieces), served.name

        return await self._unary("Tokenize", request, context, body)

    async def Detokenize(self, request, context):
        async def body():
            served = self._allowed(self._resolve(request.model))
            vocab = served.vocab_size
            bad = [
                FieldViolation(f"token_ids[{i}]", f"token id {t} outside the vocabulary [0, {vocab})")
                for i, t in enumerate(request.token_ids)
                if t >= vocab
            ]
            if bad:
                raise InvalidArgument(bad[:16])
            text = await self._offload(
                lambda: served.tokenizer.decode(list(request.token_ids), skip_special=request.skip_special_tokens)
            )
            return pb2.DetokenizeResponse(model=served.name, text=text), served.name

        return await self._unary("Detokenize", request, context, body)

    async def ListModels(self, request, context):
        async def body():
            tenant = self.registry.tenant(TENANT.get())  # None: removed by a reload
            if tenant is None:
                raise errors.Unauthenticated("the API key's tenant no longer exists")
            return pb2.ListModelsResponse(  # only the models this tenant may use
                models=[self._model_info(m) for m in self.models.values() if tenant.allows_model(m.name)],
                default_model=self.default.name,
            ), ""

        return await self._unary("ListModels", request, context, body)

    async def GetModel(self, request, context):
        async def body():
            served = self._allowed(self._resolve(request.name, "name"))
            return pb2.GetModelResponse(model=self._model_info(served)), served.name

        return await self._unary("GetModel", request, context, body)

    async def GetUsage(self, request, context):
        async def body():
            u = self.registry.usage.snapshot(TENANT.get())  # the caller's own, never another's
            return pb2.GetUsageResponse(
                tenant=u.tenant,
                requests=u.requests,
                prompt_tokens=u.prompt_tokens,
                cached_prompt_tokens=u.cached_prompt_tokens,
                generated_tokens=u.generated_tokens,
                rejections=dict(u.rejections),
            ), ""

        return await self._unary("GetUsage", request, context, body)

    def _model_info(self, m: ServedModel):
        c, meta = m.model.config, m.model.metadata
        return pb2.ModelInfo(
            name=m.name,
            architecture=str(c["arch"]),
            context_length=m.max_model_len,
            vocab_size=m.vocab_size,
            num_layers=int(c["n_layers"]),
            hidden_size=int(c["dim"]),
            num_heads=int(c["n_heads"]),
            num_kv_heads=int(c["n_kv_heads"]),
            weight_bytes=int(c["weight_bytes"]),
            has_chat_template="tokenizer.chat_template" in meta,
            is_default=m is self.default,
        )


@dataclass(frozen=True)
class Structure:
    """What shapes a request's output: a response format (given, or a tool call's), its tools,
    and whether the calls are parsed out of the answer."""

    format: ResponseFormat | None = None
    tools: tuple[ToolSpec, ...] = ()
    parse_calls: bool = False
    from_tools: bool = False  # the format is tool_choice's (its errors point at "tools")


def _response_format(rf) -> ResponseFormat | None:
    """The engine's ResponseFormat for a proto ResponseFormat (None: free text)."""
    which = rf.WhichOneof("format")
    if which is None or which == "json_object" and not rf.json_object:
        return None
    if which == "json_object":
        return ResponseFormat("json_object")
    if which == "choice":
        return ResponseFormat("choice", tuple(rf.choice.options))
    return ResponseFormat(which, getattr(rf, which))


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _encode(served: ServedModel, text: str, field: str, limit: tuple[int, str] | None = None, **kw) -> list[int]:
    """Tokenize; a text the tokenizer refuses (TokenizerError, a ValueError) is INVALID_ARGUMENT.

    `limit` = (context, why) from _prompt_limit: a text too long for it by its length alone is
    refused before tokenizing (a rejected 1 MB prompt costs no tokenizer memory). A text of C
    characters has at least C bytes, so at least ceil(C / max_token_bytes) tokens."""
    try:
        if limit is not None and served.max_token_bytes:
            ctx, why = limit
            at_least = -(-len(text) // served.max_token_bytes)
            if at_least >= ctx:
                raise InvalidArgument(
                    _too_long(
                        field,
                        (
                            f"at least {at_least} tokens ({len(text)} characters, at most "
                            f"{served.max_token_bytes} bytes a token)"
                        ),
                        served,
                        ctx,
                        why,
                    )
                )
        try:
            ids = served.tokenizer.encode(text, **kw)
        except ValueError as e:
            raise InvalidArgument(FieldViolation(field, f"cannot tokenize: {e}")) from None
        if limit is not None and len(ids) >= limit[0]:  # refused here, so its ids are freed
            n = len(ids)  # before the heap is trimmed
            del ids
            raise InvalidArgument(_too_long(field, f"{n} tokens", served, *limit))
        return ids
    finally:
        if len(text) >= TRIM_AFTER_CHARS:  # what receiving and tokenizing it freed goes back
            trim_heap()


def _too_long(field: str, size: str, served: ServedModel, ctx: int, why: str) -> FieldViolation:
    return FieldViolation(field, f"prompt is {size}; the model {served.name!r} takes at most {ctx - 1} ({why})")


def _find_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent on musl and macOS
    except (AttributeError, OSError):
        return None


_malloc_trim = _find_malloc_trim()


def trim_heap() -> None:
    """Hand the heap memory that is free back to the OS. Tokenizing a large text allocates
    ~100x its size in short-lived buffers on a tenant pool thread; glibc keeps them in that
    thread's arena for good unless asked (a 1 MB prompt left ~120 MB of RSS)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
