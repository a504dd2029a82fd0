"""The token-level scheduler: a pure, synchronous state machine (no I/O, no clocks, no threads).

Every `schedule()`:
  1. cancelled sequences (waiting, prefilling, running or preempted) are finished and their blocks freed;
  2. running sequences that are decoding get one token each, oldest first; when the KV blocks run
     out, the newest running sequence is preempted (blocks freed, back to the front of the wait
     queue, recomputed later);
  3. the remaining per-step token budget goes to prompt chunks: first sequences part-way through
     their prompt, then waiting ones (up to max_num_seqs running). Chunked prefill: a long prompt is
     fed a budget's worth at a time, so it never stalls the decodes.
`postprocess()` appends the sampled tokens, applies the stop rules and frees finished sequences.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from .block_manager import BlockManager
from .params import EngineConfig, FinishReason
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, num_new_tokens)
    finished: list[Sequence] = field(default_factory=list)   # finished while scheduling (cancelled...)
    preempted: list[Sequence] = field(default_factory=list)
    num_decode_tokens: int = 0    # one per decoding sequence
    num_prefill_tokens: int = 0   # prompt (or recomputed) tokens

    @property
    def num_batched_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    def __len__(self) -> int:
        return len(self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int,
                 eos_token_ids: Iterable[int] = ()) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()  # no blocks; preempted ones go back to the front
        self.running: list[Sequence] = []        # hold blocks; admission order, newest last

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _waiting_order(self) -> list[Sequence]:
        """Who is admitted first. FIFO today; the hook for weighted fair share between tenants."""
        return list(self.waiting)

    # -- schedule ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        bm = self.block_manager
        for seq in [s for s in (*self.waiting, *self.running) if s.cancelled]:
            self._finish(seq, FinishReason.CANCELLED)
            batch.finished.append(seq)
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()  # id() of sequences in this batch: never preempted

        # 1. decodes, oldest first
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue
            while seq.status is SequenceStatus.RUNNING and not bm.can_append(seq):
                if not self._preempt_newest(seq, scheduled, batch, include_self=True):
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # it was the newest: preempted itself
            if not bm.can_append(seq):
                continue  # only older, already scheduled sequences hold blocks; wait a step
            bm.may_append(seq)
            batch.scheduled.append((seq, 1))
            batch.num_decode_tokens += 1
            scheduled.add(id(seq))
            budget -= 1

        # 2. prompt chunks: sequences part-way through their prompt, then waiting ones
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or id(seq) in scheduled:
                continue
            while bm.max_new_tokens(seq) == 0:  # no progress possible: take blocks from newer ones
                if not self._preempt_newest(seq, scheduled, batch, include_self=False):
                    break
            n = min(seq.num_uncomputed_tokens, budget, bm.max_new_tokens(seq))
            if n == 0:
                continue
            bm.allocate(seq, n)
            batch.scheduled.append((seq, n))
            batch.num_prefill_tokens += n
            scheduled.add(id(seq))
            budget -= n
        for seq in self._waiting_order():
            if budget == 0 or len(self.running) >= self.config.max_num_seqs or batch.preempted:
                break  # (no admissions in a step that had to preempt: that would only thrash)
            if bm.blocks_needed(seq.num_tokens) > bm.num_blocks:
                seq.error = (f"the sequence needs {bm.blocks_needed(seq.num_tokens)} KV blocks, "
                             f"the cache has {bm.num_blocks}")
                self._finish(seq, FinishReason.ERROR)
                batch.finished.append(seq)
                continue
            cached = bm.match_prefix(seq)
            n = min(seq.num_uncomputed_tokens, budget, bm.max_new_tokens(seq))
            if n == 0:
                bm.deallocate(seq)  # give the cached blocks back (they stay cached)
                break  # out of blocks: newer requests wait behind this one (no preemption for them)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            bm.allocate(seq, n)
            batch.scheduled.append((seq, n))
            batch.num_prefill_tokens += n
            scheduled.add(id(seq))
            budget -= n
        return batch

    def _preempt_newest(self, seq: Sequence, scheduled: set[int], batch: ScheduledBatch,
                        include_self: bool) -> bool:
        """Preempt the newest running sequence newer than `seq` (or `seq` itself when
        include_self) that is not in this batch. False if there is none."""
        start = self.running.index(seq) + (0 if include_self else 1)
        for victim in reversed(self.running[start:]):
            if id(victim) not in scheduled:
                self.running.remove(victim)
                self.block_manager.deallocate(victim)  # its KV is recomputed when it is readmitted
                victim.status = SequenceStatus.WAITING
                victim.num_preemptions += 1
                self.waiting.appendleft(victim)
                batch.preempted.append(victim)
                return True
        return False

    # -- postprocess -------------------------------------------------------------------------------
    def postprocess(self, scheduled: list[tuple[Sequence, int]], sampled: list[int | None]) -> None:
        """`sampled[i]` is the token sampled for `scheduled[i]`, or None when that sequence only
        fed part of its prompt this step."""
        for (seq, n), token in zip(scheduled, sampled, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.register_full_blocks(seq)
            if token is None:
                continue
            seq.token_ids.append(int(token))
            reason = self._stop_reason(seq, int(token))
            if reason is not None:
                self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in seq.stopping.stop_token_ids:
            return FinishReason.STOP
        if token in self.eos_token_ids and not seq.stopping.ignore_eos:
            return FinishReason.STOP
        if seq.num_output_tokens >= seq.stopping.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End `seq` now (from any state) and free its blocks."""
        if seq.status is not SequenceStatus.FINISHED:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
