"""Bridge from a synchronous LLMEngine to asyncio: one engine per model, its step loop in its own
thread, each request's RequestOutputs delivered to that request's asyncio.Queue.

    handle = async_engine.submit(request_id, prompt_ids, sampling, stopping, tenant, deadline)
    async with handle:                  # leaving it aborts the request in the engine if unfinished
        async for event in handle:      # Started, then Tokens..., then Finished (or an exception)
            ...

Detokenization and stop strings (tinyserve.engine.stream.TextStream) run on the engine thread,
as part of a step's hand-off: after each step it turns every stream's new tokens into text, then
hands the step's outputs with their text to the event loop in one call_soon_threadsafe (one
wake-up of the loop per step, not one per stream, and no round trip through a thread pool per
token). That wake-up, and the step's metrics, are done by a waker thread (`_wake_loops`), so
that the engine thread never waits for the GIL while the loop it woke handles the outputs. The
text work is bounded per token: a stream's TextStream starts in constant time whatever
its prompt's length (it reads the prompt's last few tokens), and a push is one token's bytes
plus the held-back tail of a stop string. A stop-string hit ends the request in the engine at
once; so do a deadline, a cancelled handler or a drain (engine.abort_request frees the request's
KV blocks at the engine's next step).

Backpressure. A request's unread output is the generated tokens in its queue: delivered by the
engine, not yet taken by its consumer (the servicer stops taking while gRPC flow control holds its
last write, i.e. while the client does not read). Once that reaches `max_unread_tokens` the request
is paused in the engine (engine.pause_request: not scheduled; its KV blocks go to others when they
need them) and resumed when the consumer has taken half of it. A request that stays paused with
nothing taken for `stall_timeout_s` is aborted in the engine and ends, after its queued output,
with RESOURCE_EXHAUSTED. Everything here runs on the event loop except `_run` and what it calls
(`_hand_off`, `RequestHandle._text_of`); outputs reach a handle through loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tinyserve.api.errors import REASON_UNREAD_OUTPUT, Cancelled, DeadlineExceeded, ResourceExhausted, Unavailable
from tinyserve.engine.engine import EngineError, LLMEngine, RequestOutput, TokenLogprob
from tinyserve.engine.params import FinishReason, SamplingParams, StoppingParams
from tinyserve.engine.stream import TextStream

if TYPE_CHECKING:
    from tinyserve.metrics import ModelMetrics

log = logging.getLogger("tinyserve.engine.loop")


@dataclass
class Started:
    """The request was scheduled (first engine output)."""

    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int


@dataclass
class Tokens:
    """Text to append and the token ids behind this step (text may lag ids, see TextStream)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finished:
    """Last event: finish reason (STOP, STOP_SEQUENCE or LENGTH), counts and timings (seconds)."""

    reason: FinishReason
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    queue_time: float
    time_to_first_token: float
    total_time: float
    decode_tokens_per_second: float


_DEADLINE = object()  # queue sentinel: the request's deadline passed


class RequestHandle:
    """One request's stream of events. Iterate it inside `async with` (see module doc)."""

    def __init__(
        self,
        owner: AsyncEngine,
        request_id: str,
        prompt_token_ids: list[int],
        stopping: StoppingParams,
        loop: asyncio.AbstractEventLoop,
        arrival: float,
        deadline: float | None,
    ):
        self.request_id = request_id
        self.num_unread_tokens = 0  # generated, queued, not yet taken (backpressure)
        self.paused = False  # paused in the engine for it
        self._last_read = arrival  # when the consumer last asked for an event
        self._stall_timer: asyncio.TimerHandle | None = None
        self.arrival = arrival  # time.monotonic()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = loop
        self.finished = False  # the engine is done with it (or never had it)
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.num_output_tokens = 0
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self._owner = owner
        # Used on the engine thread only (_text_of), from the first output on.
        self._text = TextStream(owner.tokenizer, list(stopping.stop), skip_special=True, prefix_ids=prompt_token_ids)
        self._deadline_timer = None
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._deadline_timer = loop.call_later(delay, self.queue.put_nowait, _DEADLINE)

    async def __aenter__(self) -> RequestHandle:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Abort the request in the engine unless it finished; idempotent."""
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._cancel_stall_timer()
        if not self.finished:
            self.finished = True
            self._owner.abort(self)

    # ---- backpressure (on the loop) ----------------------------------------------------------
    def _put(self, item) -> None:
        """An engine output with its text (or an error) for the consumer."""
        self.queue.put_nowait(item)
        if type(item) is not tuple:
            return
        out: RequestOutput = item[0]
        self.num_unread_tokens += len(out.new_token_ids)
        if out.finished:
            self._cancel_stall_timer()  # the engine is done with it: nothing left to free
            return
        limit = self._owner.max_unread_tokens
        if limit and not self.paused and not self.finished and self.num_unread_tokens >= limit:
            self.paused = True
            self._owner.pause(self.request_id)
            self._arm_stall_timer(self._owner.stall_timeout_s)

    def _taken(self, out: RequestOutput) -> None:
        """The consumer took `out`: it reads. Resume once half the bound is read."""
        self.num_unread_tokens -= len(out.new_token_ids)
        if self.paused and self.num_unread_tokens <= self._owner.max_unread_tokens // 2:
            self.paused = False
            self._cancel_stall_timer()
            if not self.finished:
                self._owner.resume(self.request_id)

    def _arm_stall_timer(self, delay: float) -> None:
        if self._owner.stall_timeout_s:
            self._stall_timer = self.loop.call_later(delay, self._check_stall)

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _check_stall(self) -> None:
        self._stall_timer = None
        if not self.paused or self.finished:
            return
        timeout = self._owner.stall_timeout_s
        idle = time.monotonic() - self._last_read
        if idle < timeout:
            self._arm_stall_timer(timeout - idle)  # it read meanwhile: count from that read
            return
        unread = self.num_unread_tokens
        self.close()  # frees its KV blocks at the engine's next step
        self.queue.put_nowait(
            ResourceExhausted(
                "unread output",
                f"the client read nothing for {timeout:g} s with {unread} generated "
                f"tokens waiting (the server holds at most {self._owner.max_unread_tokens} per "
                f"stream); the stream was cancelled",
                retry_after_s=None,
                reason=REASON_UNREAD_OUTPUT,
            )
        )

    def __aiter__(self) -> AsyncIterator[Started | Tokens | Finished]:
        return self._reads()

    async def _reads(self):
        """The events, noting when the consumer asks for each (it reads: see _check_stall)."""
        self._last_read = time.monotonic()
        async for ev in self._events():
            yield ev
            self._last_read = time.monotonic()

    async def _events(self):
        metrics = self._owner.metrics
        started = False
        while True:
            item = await self.queue.get()
            if item is _DEADLINE:
                self.close()
                raise DeadlineExceeded(f"deadline exceeded after {self.num_output_tokens} generated tokens")
            if isinstance(item, BaseException):
                self.close()
                raise item
            out: RequestOutput
            out, text, stopped = item
            self._taken(out)
            now = time.monotonic()
            self.num_prompt_tokens = out.num_prompt_tokens
            self.num_cached_tokens = out.num_cached_tokens
            self.num_output_tokens = out.num_output_tokens
            if out.first_scheduled_time is not None and self.first_scheduled is None:
                self.first_scheduled = out.first_scheduled_time
            if out.finished:
                self.finished = True  # nothing left to abort
            if out.finished and out.finish_reason in (FinishReason.CANCELLED, FinishReason.ERROR):
                self.close()
                if out.finish_reason == FinishReason.CANCELLED:
                    raise Cancelled("the request was cancelled by the server")
                raise EngineError(
                    f"request {self.request_id} failed inside the engine: {out.error or 'no reason given'}"
                )
            if not started:
                started = True
                yield Started(self.request_id, out.num_prompt_tokens, out.num_cached_tokens)
            if out.new_token_ids:
                if self.first_token is None:
                    self.first_token = now
                elif metrics is not None and self.last_token is not None:
                    metrics.itl.observe((now - self.last_token) / len(out.new_token_ids))
                self.last_token = now
            if stopped:
                self.close()  # (the engine thread already stopped it in the engine)
                yield Tokens(text, out.new_token_ids, out.logprobs)
                yield self._finish(FinishReason.STOP_SEQUENCE, now)
                return
            if out.finished:
                if text or out.new_token_ids:
                    yield Tokens(text, out.new_token_ids, out.logprobs)
                reason = FinishReason.LENGTH if out.finish_reason == FinishReason.LENGTH else FinishReason.STOP
                yield self._finish(reason, now)
                return
            if text or out.new_token_ids:
                yield Tokens(text, out.new_token_ids, out.logprobs)

    def _text_of(self, out: RequestOutput) -> tuple[str, bool]:
        """On the engine thread: the text of `out`'s new tokens (with the rest flushed when the
        request finished) and whether a stop string ended it there."""
        if out.finished and out.finish_reason in (FinishReason.CANCELLED, FinishReason.ERROR):
            return "", False  # the consumer raises: no text
        text, stopped = "", False
        ids = out.new_token_ids
        if ids:
            if out.finished and out.finish_reason == FinishReason.STOP:
                ids = ids[:-1]  # the stop token (EOS or a stop_token_id) is not text
            text, stopped = self._text.push(ids)
        if out.finished and not stopped:
            text += self._text.finish()
        return text, stopped

    def _finish(self, reason: FinishReason, now: float) -> Finished:
        scheduled = self.first_scheduled if self.first_scheduled is not None else self.arrival
        first = self.first_token if self.first_token is not None else now
        decode_tps = 0.0
        if self.num_output_tokens > 1 and self.last_token is not None and self.last_token > first:
            decode_tps = (self.num_output_tokens - 1) / (self.last_token - first)
        return Finished(
            reason,
            self.num_prompt_tokens,
            self.num_output_tokens,
            self.num_cached_tokens,
            max(0.0, scheduled - self.arrival),
            first - self.arrival,
            now - self.arrival,
            decode_tps,
        )


class AsyncEngine:
    """Runs `engine.step()` in a thread of its own and routes outputs to request handles.

    The engine keeps the live requests (and refuses a request id in use); each output carries
    its request's handle back (`RequestOutput.sink`). Here only the open handles are kept, to end
    them all at once (fail_all)."""

    def __init__(
        self,
        engine: LLMEngine,
        name: str,
        metrics: ModelMetrics | None = None,
        idle_wait_s: float = 0.5,
        max_unread_tokens: int = 0,
        stall_timeout_s: float = 0.0,
    ):
        self.engine = engine
        self.name = name
        self.max_unread_tokens = max_unread_tokens  # per request; 0 = no backpressure
        self.stall_timeout_s = stall_timeout_s  # paused and unread this long: cancelled; 0 = never
        self.tokenizer = engine.model.tokenizer
        self.metrics = metrics
        self._idle_wait_s = idle_wait_s
        self._open: set[RequestHandle] = set()  # submitted, not finished nor closed; under _lock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # What waits for the waker thread, in order (see _post).
        self._outbox: deque[tuple[asyncio.AbstractEventLoop | None, Any]] = deque()
        self._outbox_signal = threading.Lock()  # held while the waker has nothing to deliver
        self._outbox_signal.acquire()
        self._waker: threading.Thread | None = None
        self._waker_stopping = False

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._waker is None:
            self._waker = threading.Thread(target=self._wake_loops, name=f"waker[{self.name}]", daemon=True)
            self._waker.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"engine[{self.name}]", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the step loop; requests still open end with UNAVAILABLE."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.fail_all(Unavailable("the server is shutting down"))
        if self._waker is not None:  # after what fail_all handed it
            self._waker_stopping = True
            self._signal_waker()
            self._waker.join(timeout)
            self._waker = None
            while self._outbox:  # handed off after the waker's last look (a step loop that outlived join)
                self._handle(*self._outbox.popleft())

    @property
    def num_open(self) -> int:
        """Requests submitted and not yet finished or closed."""
        with self._lock:
            return len(self._open)

    @property
    def max_model_len(self) -> int:
        """Prompt + output tokens of the longest sequence the model's engine takes."""
        return self.engine.max_model_len

    def max_len(self, tenant: str) -> int:
        """The longest sequence `tenant` can have: the context, or what its KV share holds."""
        return self.engine.max_len(tenant)

    # ---- requests --------------------------------------------------------------------------
    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        stopping: StoppingParams,
        tenant: str = "default",
        deadline: float | None = None,
        grammar=None,
    ) -> RequestHandle:
        """Admit a request (raises ParamError, ValueError, QueueFullError); must run on the loop.
        `grammar` (a GrammarMatcher) constrains its output (LLMEngine.add_request)."""
        if self._stopping:
            raise Unavailable("the server is shutting down")
        loop = asyncio.get_running_loop()
        handle = RequestHandle(self, request_id, prompt_token_ids, stopping, loop, time.monotonic(), deadline)
        with self._lock:  # open before the engine can produce its first output
            self._open.add(handle)
        try:
            structured = {} if grammar is None else {"grammar": grammar}
            self.engine.add_request(
                request_id,
                prompt_token_ids,
                sampling,
                stopping,
                tenant=tenant,
                arrival_time=handle.arrival,
                sink=handle,
                **structured,
            )
        except BaseException:
            with self._lock:
                self._open.discard(handle)
            handle.finished = True
            handle.close()
            raise
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop routing to `handle` and ask the engine to drop its request (KV blocks freed at its
        next step)."""
        with self._lock:
            known = handle in self._open
            self._open.discard(handle)
        if known:
            try:
                self.engine.abort_request(handle.request_id)
            except Exception:  # an unknown / finished id is not an error worth surfacing
                log.debug("abort_request(%s) failed", handle.request_id, exc_info=True)
            self._wake.set()

    def pause(self, request_id: str) -> None:
        """Backpressure: stop generating for the request (see the module doc)."""
        self.engine.pause_request(request_id)

    def resume(self, request_id: str) -> None:
        self.engine.resume_request(request_id)
        self._wake.set()

    def fail_all(self, exc: BaseException) -> None:
        """End every open request with `exc` (engine failure, shutdown)."""
        with self._lock:
            handles = list(self._open)
        for h in handles:
            self._deliver(h, exc)
            self.abort(h)

    # ---- the engine thread -----------------------------------------------------------------
    def _deliver(self, h: RequestHandle, item) -> None:
        self._deliver_all(h.loop, [(h, item)])

    def _deliver_all(self, loop: asyncio.AbstractEventLoop, items: list[tuple[RequestHandle, Any]]) -> None:
        """Hand (handle, item) pairs to `loop` in one wake-up, in order, through the waker thread
        (see _wake_loops)."""
        self._post(loop, items)

    def _post(self, loop: asyncio.AbstractEventLoop | None, payload: Any) -> None:
        """To the waker thread, in order: (loop, [(handle, item), ...]) to wake `loop` with, or
        (None, (stats, step_seconds)) for the metrics. Done here when the waker is not running."""
        if self._waker is None:
            self._handle(loop, payload)
            return
        self._outbox.append((loop, payload))
        self._signal_waker()

    def _handle(self, loop: asyncio.AbstractEventLoop | None, payload: Any) -> None:
        if loop is not None:
            _wake(loop, payload)
        elif self.metrics is not None:
            try:
                self.metrics.observe_step(*payload)
            except Exception:  # metrics never stop the outputs
                log.exception("engine %s: observing a step failed", self.name)

    def _signal_waker(self) -> None:
        try:
            self._outbox_signal.release()  # a C call that keeps the GIL
        except RuntimeError:  # released already: the waker has not woken yet, and will drain all
            pass

    def _wake_loops(self) -> None:
        """The waker thread: wakes the event loops for what the engine thread handed off.

        Waking a loop (call_soon_threadsafe) is a write to its self-pipe, a system call that lets
        go of the GIL; the woken loop takes it at once and keeps it while it handles the step's
        outputs (gRPC writes and all), so the thread that wrote waits that long to get the GIL
        back. Here that is this thread, not the engine thread: the engine thread only appends to
        the outbox and releases a lock (neither lets go of the GIL), and this thread gets the GIL
        when the engine thread next lets go of it, in its next forward, which then runs while the
        loop writes. The step's metrics (observe_step) are fed here too, before its outputs."""
        outbox = self._outbox
        while True:
            self._outbox_signal.acquire()
            stopping = self._waker_stopping  # read before draining: all it was sent is there
            while outbox:
                loop, payload = outbox.popleft()
                while loop is not None and outbox and outbox[0][0] is loop:  # one wake-up per loop
                    payload = payload + outbox.popleft()[1]
                self._handle(loop, payload)
            if stopping:
                return

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            if self._outbox:  # the waker is a step behind: this step's Python holds the GIL
                time.sleep(0)  # (a step that never lets go of it, say): let it and the loop run
            try:
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(self._idle_wait_s)
                    continue
                t0 = time.perf_counter()
                outputs = self.engine.step()
                step_s = time.perf_counter() - t0
                stats = self.engine.stats() if self.metrics is not None else None
            except Exception as e:  # a broken step fails its requests, not the server
                log.exception("engine %s: step failed", self.name)
                self.fail_all(EngineError(f"engine step failed: {type(e).__name__}"))
                time.sleep(0.05)
                continue
            if stats is not None:  # the metrics, by the waker: before this step's outputs
                self._post(None, (stats, step_s))
            if not outputs:  # nothing could run (every request paused): wait for an event
                self._wake.wait(self._idle_wait_s)
                continue
            self._hand_off(outputs)

    def _hand_off(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their open handles, each with its text (detokenized here), one
        call_soon_threadsafe per event loop."""
        routed: list[tuple[RequestHandle, RequestOutput]] = []
        with self._lock:
            for out in outputs:
                h = out.sink
                if h in self._open:  # else closed (its abort is on its way to the engine)
                    if out.finished:
                        self._open.discard(h)
                    routed.append((h, out))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestHandle, Any]]] = {}
        for h, out in routed:
            item: Any
            try:
                text, stopped = h._text_of(out)
            except Exception as e:  # a detokenizer's bug fails its request, not the engine thread
                log.exception("engine %s: detokenizing %s failed", self.name, h.request_id)
                item = EngineError(f"detokenizing failed: {type(e).__name__}")
                self.abort(h)
            else:
                item = (out, text, stopped)
                if stopped and not out.finished:
                    self.abort(h)  # the stop string ends it now, not after the consumer saw it
            by_loop.setdefault(h.loop, []).append((h, item))
        for loop, items in by_loop.items():
            self._deliver_all(loop, items)


def _wake(loop: asyncio.AbstractEventLoop, items: list[tuple[RequestHandle, Any]]) -> None:
    """Hand (handle, item) pairs to `loop` in one wake-up, in order."""
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


def _put_all(items: list[tuple[RequestHandle, Any]]) -> None:
    """On the loop: each item to its handle (one step's outputs, delivered together)."""
    for h, item in items:
        h._put(item)
