"""A scripted tinyserve.v1.TinyServeService: records every request and its metadata, answers as
told. Built on the client package's own generated stubs, so these tests need no tinyserve server
(and no C++ core)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tinyserve_client import pb2, pb2_grpc


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def abort_with(context, code: grpc.StatusCode, message: str, *details) -> None:
    """Abort the call with a google.rpc.Status carrying `details` (packed into Any)."""
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for d in details:
        status.details.add().Pack(d)
    context.abort_with_status(rpc_status.to_status(status))


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(retry_delay=duration(seconds))


class Servicer(pb2_grpc.TinyServeServiceServicer):
    """Generate/Chat stream the prompt (or the last message) back one character per token."""

    def __init__(self):
        self.calls: list[tuple[str, object, dict]] = []  # (method, request, metadata)
        self.fail: list = []  # callables (context) run, and popped, one per call
        self.fail_after_start = None  # a StatusCode to end the next stream with, after `start`
        self.token_delay = 0.0  # seconds between token events
        self.cancelled = threading.Event()
        self.lock = threading.Lock()

    def _record(self, method, request, context):
        with self.lock:
            self.calls.append((method, request, dict(context.invocation_metadata())))
            fail = self.fail.pop(0) if self.fail else None
        if fail is not None:
            fail(context)

    def _stream(self, response, text, request, context):
        context.add_callback(lambda: None if context.is_active() else self.cancelled.set())
        yield response(
            start=pb2.StreamStart(
                request_id="r-1", model=request.model or "fake", prompt_tokens=len(text), cached_prompt_tokens=1
            )
        )
        if self.fail_after_start is not None:
            code, self.fail_after_start = self.fail_after_start, None
            context.abort(code, "went away after the first event")
        n = request.stopping.max_tokens if request.stopping.HasField("max_tokens") else len(text)
        out = text[:n]
        for ch in out:
            if self.token_delay:
                time.sleep(self.token_delay)
                if not context.is_active():
                    self.cancelled.set()
                    return
            yield response(token=pb2.TokenChunk(text=ch, token_ids=[ord(ch)]))
        reason = pb2.FINISH_REASON_LENGTH if n < len(text) else pb2.FINISH_REASON_STOP
        yield response(
            end=pb2.StreamEnd(
                finish_reason=reason,
                usage=pb2.Usage(
                    prompt_tokens=len(text),
                    generated_tokens=len(out),
                    cached_prompt_tokens=1,
                    total_tokens=len(text) + len(out),
                ),
                queue_time=duration(0.002),
                time_to_first_token=duration(0.25),
                total_time=duration(1.5),
                decode_tokens_per_second=42.0,
                # a chat with tools "calls" its first tool with no arguments
                tool_calls=[
                    pb2.ToolCall(id="call_1", name=t.name, arguments="{}") for t in getattr(request, "tools", [])[:1]
                ],
            )
        )

    def Generate(self, request, context):
        self._record("Generate", request, context)
        yield from self._stream(pb2.GenerateResponse, request.prompt, request, context)

    def Chat(self, request, context):
        self._record("Chat", request, context)
        yield from self._stream(pb2.ChatResponse, request.messages[-1].content, request, context)

    def Tokenize(self, request, context):
        self._record("Tokenize", request, context)
        return pb2.TokenizeResponse(model="fake", token_ids=[ord(c) for c in request.text], pieces=list(request.text))

    def Detokenize(self, request, context):
        self._record("Detokenize", request, context)
        return pb2.DetokenizeResponse(model="fake", text="".join(map(chr, request.token_ids)))

    def ListModels(self, request, context):
        self._record("ListModels", request, context)
        return pb2.ListModelsResponse(models=[pb2.ModelInfo(name="fake", is_default=True)], default_model="fake")

    def GetModel(self, request, context):
        self._record("GetModel", request, context)
        return pb2.GetModelResponse(model=pb2.ModelInfo(name=request.name or "fake", context_length=256))

    def GetUsage(self, request, context):
        self._record("GetUsage", request, context)
        return pb2.GetUsageResponse(tenant="dev", requests=len(self.calls))


class FakeServer:
    def __init__(self):
        self.servicer = Servicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb2_grpc.add_TinyServeServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.address = f"127.0.0.1:{self.port}"

    def methods(self) -> list[str]:
        return [m for m, _, _ in self.servicer.calls]

    def stop(self) -> None:
        self.server.stop(0).wait()
