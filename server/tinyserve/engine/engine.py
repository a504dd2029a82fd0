"""The step loop: schedule() -> one forward over the ragged batch -> sample -> postprocess().

`add_request`, `abort_request`, `pause_request` and `resume_request` may be called from any thread:
they only put events in an inbox (lock + deque) that `step()` drains first. Everything else runs in
the thread that calls `step()`.

Pausing is backpressure: a paused request is not scheduled (the scheduler hands its KV blocks to
others when they need them, see scheduler.py) until it is resumed; `step()` returns no outputs for
it meanwhile. A step with nothing to run returns [] at once: the caller should wait for an event.

The engine is the one registry of live requests: a request id is in use from add_request until
the step that returns its finished output, and add_request refuses an id in use. A caller that
routes outputs (the server) passes `sink=` and gets it back in every RequestOutput of the request,
so it keeps no table of ids of its own.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .params import EngineConfig, FinishReason, ParamError, SamplingParams, StoppingParams
from .sampling import TokenLogprob, has_penalties, logprob_record, penalise, sample_batch
from .scheduler import ScheduledBatch, Scheduler
from .sequence import Sequence

if TYPE_CHECKING:
    from tinyserve.models.loader import LoadedModel

    from .grammar import GrammarMatcher

__all__ = ["EngineError", "EngineStats", "LLMEngine", "QueueFullError", "RequestOutput", "TokenLogprob"]

# forward(kv, tokens, seq_lens, start_pos, block_tables, logit_rows) -> logits [R, n_vocab]
ForwardFn = Callable[[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class QueueFullError(RuntimeError):
    """add_request while the bounded wait queue is full."""


class EngineError(RuntimeError):
    """The engine cannot serve (e.g. the model's forward failed)."""


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]  # usually 1 token; [] for a step that only prefilled
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    num_output_tokens: int
    first_scheduled_time: float | None  # time.monotonic() when first scheduled
    error: str | None = None  # message when finish_reason is ERROR
    sink: Any = None  # what add_request(sink=) was given for this request


@dataclass(frozen=True)
class EngineStats:
    """What the engine holds after its last step (LLMEngine.stats(); the metrics read it)."""

    num_running: int
    num_waiting: int  # in the wait queue or the inbox
    num_paused: int  # paused for backpressure (running or waiting)
    kv_blocks_total: int
    kv_blocks_used: int
    last_batch_size: int  # sequences in the last step
    last_prefill_tokens: int
    last_decode_tokens: int
    num_preemptions: int  # since start
    num_turns: int  # of which to admit a waiting request (scheduler.py)
    scheduling: str  # "fair" or "fifo"
    kv_blocks_by_tenant: Mapping[str, int] = field(default_factory=dict)  # blocks in use per tenant
    kv_dtype: str = "f16"  # the cache's element type (EngineConfig.kv_dtype)
    kv_bytes_per_block: int = 0  # the arena's real bytes per block
    kv_bytes_total: int = 0  # bytes of the arena (blocks x bytes per block)
    kv_tokens_total: int = 0  # positions the cache holds (blocks x block size)


class LLMEngine:
    def __init__(
        self, model: LoadedModel, config: EngineConfig | None = None, forward: ForwardFn | None = None
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.config.validate()
        cfg = model.config
        self.vocab_size = int(cfg["n_vocab"])
        if forward is None:
            from tinyserve import _core

            kw = (
                {"num_blocks": self.config.num_kv_blocks}
                if self.config.num_kv_blocks
                else {"budget_bytes": self.config.kv_budget_bytes}
            )
            self.kv: _core.KVCache | None = _core.KVCache(
                model.core, block_size=self.config.block_size, dtype=self.config.kv_dtype, **kw
            )
            num_blocks = self.kv.num_blocks
            core_forward = model.core.forward

            def forward(
                kv: Any, tokens: np.ndarray, lens: np.ndarray, start: np.ndarray, tables: np.ndarray, rows: np.ndarray
            ) -> np.ndarray:
                # into a buffer kept across steps: a fresh [rows, vocab] array each step is mapped
                # and faulted in anew (32 MB at 32 rows of a 262k vocabulary)
                return core_forward(kv, tokens, lens, start, tables, rows, out=self._logits_out(len(rows)))

            self._forward: ForwardFn = forward
        else:
            from tinyserve import _core

            self.kv = None
            # no arena: a block's bytes are the core's for the model's shape (0 for a fake model
            # that gives num_kv_blocks and no shape)
            shape = [cfg.get(k) for k in ("n_layers", "n_kv_heads", "head_dim")]
            if self.config.num_kv_blocks and None in shape:
                block_bytes = 0
            else:
                n_layers, n_kv_heads, head_dim = (int(cfg[k]) for k in ("n_layers", "n_kv_heads", "head_dim"))
                block_bytes = _core.KVCache.block_bytes(
                    n_layers, n_kv_heads, head_dim, self.config.block_size, self.config.kv_dtype
                )
            num_blocks = self.config.num_kv_blocks or max(1, self.config.kv_budget_bytes // block_bytes)
            self._forward = forward
        # the arena's real bytes per block (the budget was divided by this)
        self.kv_bytes_per_block = self.kv.bytes_per_block if self.kv is not None else block_bytes
        ctx = int(cfg.get("context_length") or 2048)
        self.max_model_len = min(self.config.max_model_len or ctx, ctx, num_blocks * self.config.block_size)
        self.scheduler = Scheduler(self.config, num_blocks, self.max_model_len, model.tokenizer.stop_ids)
        self._lock = threading.Lock()
        self._logits_buf = np.empty((0, self.vocab_size), np.float32)
        # ("add", Sequence) | ("abort" | "pause" | "resume", request_id)
        self._inbox: deque[tuple[str, Any]] = deque()
        self._num_pending_adds = 0
        self._num_waiting = 0  # snapshot of the scheduler's wait queue, under _lock
        self._live: set[str] = set()  # request ids added and not yet finished, under _lock
        self._seqs: dict[str, Sequence] = {}  # engine thread only
        self._last = ScheduledBatch()
        self._kv_by_tenant: dict[str, int] = {}  # snapshot after each step, under _lock
        self.num_preemptions = 0  # sequences preempted (KV blocks freed, recomputed later)
        self.num_turns = 0  # of which to admit a waiting one (see scheduler.py)

    # -- any thread ------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        stopping: StoppingParams,
        tenant: str = "default",
        arrival_time: float | None = None,
        sink: Any = None,
        grammar: GrammarMatcher | None = None,
    ) -> None:
        """Queue a request (raises ParamError, ValueError for an id in use, QueueFullError).
        `sink` comes back in every RequestOutput of the request. `grammar` (a fresh matcher of
        a compiled grammar, engine/grammar.py) constrains every output token to its structure."""
        sampling.validate()
        stopping.validate()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise ParamError("prompt", "the prompt is empty")
        if len(prompt) >= self.max_model_len:
            raise ParamError(
                "prompt",
                f"the prompt has {len(prompt)} tokens; the limit is "
                f"{self.max_model_len - 1} (context {self.max_model_len})",
            )
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ParamError("prompt", f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(64)
        seq = Sequence(
            request_id,
            prompt,
            sampling,
            stopping,
            tenant,
            time.monotonic() if arrival_time is None else arrival_time,
            seed,
        )
        seq.sink = sink
        seq.grammar = grammar
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            if self._num_pending_adds + self._num_waiting >= self.config.max_waiting:
                raise QueueFullError(f"the wait queue is full ({self.config.max_waiting} requests)")
            self._live.add(request_id)
            self._num_pending_adds += 1
            self._inbox.append(("add", seq))

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))

    def pause_request(self, request_id: str) -> None:
        """Stop scheduling the request (its client is not reading) until resume_request."""
        with self._lock:
            self._inbox.append(("pause", request_id))

    def resume_request(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("resume", request_id))

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._live)

    def max_len(self, tenant: str) -> int:
        """The longest sequence (prompt + output) `tenant` can have here: the context limit, or
        what its KV share of the cache holds."""
        return self.scheduler.max_len(tenant)

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + self._num_pending_adds,
            num_paused=self.scheduler.num_paused,
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            last_batch_size=len(self._last.scheduled),
            last_prefill_tokens=self._last.num_prefill_tokens,
            last_decode_tokens=self._last.num_decode_tokens,
            num_preemptions=self.num_preemptions,
            num_turns=self.num_turns,
            scheduling=self.config.scheduling,
            kv_blocks_by_tenant=self._kv_by_tenant,  # a snapshot, replaced after each step
            kv_dtype=self.config.kv_dtype,
            kv_bytes_per_block=self.kv_bytes_per_block,
            kv_bytes_total=self.kv_bytes_per_block * bm.num_blocks,
            kv_tokens_total=bm.num_blocks * bm.block_size,
        )

    # -- engine thread -----------------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        with self._lock:
            events = list(self._inbox)
            self._inbox.clear()
            self._num_pending_adds = 0
        for kind, arg in events:
            if kind == "add":
                self._seqs[arg.request_id] = arg
                self.scheduler.add(arg)
            elif (seq := self._seqs.get(arg)) is not None:
                if kind == "abort":
                    seq.cancelled = True
                else:
                    seq.paused = kind == "pause"

    def step(self) -> list[RequestOutput]:
        self._drain_inbox()
        batch = self.scheduler.schedule()
        self._last = batch
        self.num_preemptions += len(batch.preempted)
        self.num_turns += batch.num_turns
        outputs = [self._output(seq, [], None) for seq in batch.finished]
        if batch.scheduled:
            now = time.monotonic()
            for seq, _ in batch.scheduled:
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
            try:
                sampled, logprobs = self._run(batch)
            except Exception as e:  # a failed forward fails this batch's requests, not the engine
                msg = f"forward failed: {type(e).__name__}: {e}"
                for seq, _ in batch.scheduled:
                    seq.error = msg
                    self.scheduler.finish(seq, FinishReason.ERROR)
                    outputs.append(self._output(seq, [], None))
            else:
                self.scheduler.postprocess(batch.scheduled, sampled)
                for (seq, _), tok, lp in zip(batch.scheduled, sampled, logprobs):
                    new = [] if tok is None else [tok]
                    lps = None if lp is None else [lp]
                    if seq.grammar is not None and not seq.is_finished and (tok is not None or seq.error):
                        forced = self._end_structure(seq)
                        new += forced
                        if lps is not None:  # the only allowed token: probability 1
                            lps += [TokenLogprob(t, 0.0, [(t, 0.0)]) for t in forced]
                    outputs.append(self._output(seq, new, lps))
        kv_by_tenant = dict(self.scheduler.block_manager.num_held_by)
        with self._lock:
            self._num_waiting = len(self.scheduler.waiting)
            self._kv_by_tenant = kv_by_tenant
            for out in outputs:
                if out.finished:
                    self._live.discard(out.request_id)
        for out in outputs:
            if out.finished:
                self._seqs.pop(out.request_id, None)
        return outputs

    def _logits_out(self, rows: int) -> np.ndarray:
        """rows x vocab float32, C-contiguous, reused from step to step (grown as needed). Its
        contents live until the next forward: a step's logits are consumed within the step."""
        if self._logits_buf.shape[0] < rows:
            self._logits_buf = np.empty((rows, self.vocab_size), np.float32)
        return self._logits_buf[:rows]

    def _run(self, batch: ScheduledBatch) -> tuple[list[int | None], list[TokenLogprob | None]]:
        """Build the ragged batch, run the model once, sample the sequences that need a token."""
        sched = batch.scheduled
        tokens: list[int] = []
        logit_rows: list[int] = []
        lens: list[int] = []
        starts: list[int] = []
        rows: list[Sequence] = []  # the sequences that get a token, in batch order
        tables: list[int] = []  # the block tables, row by row, padded with -1 to `width`
        width = max(len(seq.block_table) for seq, _ in sched)
        for seq, n in sched:
            start = seq.num_computed_tokens
            ids = seq.token_ids
            tokens += ids[start : start + n]
            lens.append(n)
            starts.append(start)
            if start + n == len(ids):  # last row of a finished prompt, or a decode
                logit_rows.append(len(tokens) - 1)
                rows.append(seq)
            table = seq.block_table
            tables += table
            if len(table) < width:
                tables += [-1] * (width - len(table))
        logits = self._forward(
            self.kv,
            np.array(tokens, dtype=np.int32),
            np.array(lens, dtype=np.int32),
            np.array(starts, dtype=np.int32),
            np.array(tables, dtype=np.int32).reshape(len(sched), width),
            np.array(logit_rows, dtype=np.int32),
        )
        sampled_tokens, lps, refused = self._sample(logits, rows)
        sampled: list[int | None] = []
        logprobs: list[TokenLogprob | None] = []
        r = 0
        for seq, n in sched:
            if seq.num_computed_tokens + n != seq.num_tokens:
                sampled.append(None)
                logprobs.append(None)
                continue
            tok, lp = sampled_tokens[r], lps[r]
            r += 1
            if refused and id(seq) in refused:  # its grammar failed: no token (step() ends it)
                sampled.append(None)
                logprobs.append(None)
                continue
            if seq.grammar is not None and not seq.grammar.consume(tok):
                seq.error = f"structured output: the grammar refused token {tok}: {seq.grammar.error}"
                sampled.append(None)
                logprobs.append(None)
                continue
            sampled.append(tok)
            logprobs.append(lp)
        return sampled, logprobs

    def _sample(
        self, logits: np.ndarray, rows: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None], set[int]]:
        """One token per row of `logits` (row r belongs to rows[r]): penalties, the grammar masks
        of structured rows, then the whole batch in one C++ call, then the logprobs the rows
        asked for (of the masked distribution). Also returns id() of the sequences whose grammar
        failed (their error set; their token is to be dropped)."""
        if not rows:
            return [], [], set()
        logits = np.require(logits, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])
        any_logprobs = False
        for r, seq in enumerate(rows):
            sp = seq.sampling
            any_logprobs = any_logprobs or sp.logprobs > 0
            p = seq.num_prompt_tokens
            if has_penalties(sp, p, seq.num_tokens - p):
                penalise(logits[r], sp, seq.token_ids[:p], seq.token_ids[p:])
        # Here `logits` is the step's [len(rows), vocab] float32 array, writable, row r for rows[r],
        # penalties applied: the one place to change logits before sampling.
        refused = self._mask_structured(rows, logits)
        for r, seq in enumerate(rows):
            if refused and id(seq) in refused:
                logits[r] = 0.0  # its token is dropped: give the sampler a finite row
        tokens = sample_batch(logits, [s.sampling for s in rows], [s.rng for s in rows]).tolist()
        if not any_logprobs:
            return tokens, [None] * len(rows), refused
        lps = [
            logprob_record(logits[r], tokens[r], seq.sampling.logprobs) if seq.sampling.logprobs > 0 else None
            for r, seq in enumerate(rows)
        ]
        return tokens, lps, refused

    def _mask_structured(self, rows: list[Sequence], logits: np.ndarray) -> set[int]:
        """Forbid, in the logits rows of sequences with a grammar, every token their structure
        does not allow next (masks computed together, without the GIL). Rows of other sequences
        are not touched. Returns id() of the sequences whose grammar failed (their error set)."""
        structured = [(seq, r) for r, seq in enumerate(rows) if seq.grammar is not None]
        if not structured:
            return set()
        from .grammar import apply_mask, fill_masks

        masks = fill_masks([seq.grammar for seq, _ in structured], self.vocab_size)
        refused: set[int] = set()
        for (seq, r), mask in zip(structured, masks):
            err = seq.grammar.error
            if err is None and not apply_mask(logits[r], mask):
                err = "no token is allowed here"
            if err is not None:
                seq.error = f"structured output: {err}"
                refused.add(id(seq))
        return refused

    def _end_structure(self, seq: Sequence) -> list[int]:
        """A structured sequence whose grammar failed ends with ERROR; one whose structure is
        complete ends now with STOP and its grammar's stop token (no forward for a token that
        could only be that). Returns the token appended ([] or [stop token])."""
        if seq.error is not None:
            self.scheduler.finish(seq, FinishReason.ERROR)
            return []
        if seq.grammar.is_complete:
            seq.token_ids.append(seq.grammar.end_token)
            self.scheduler.finish(seq, FinishReason.STOP)
            return [seq.grammar.end_token]
        return []

    def _output(self, seq: Sequence, new: list[int], lps: list[TokenLogprob] | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new,
            logprobs=lps,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            first_scheduled_time=seq.first_scheduled_time,
            error=seq.error,
            sink=seq.sink,
        )
