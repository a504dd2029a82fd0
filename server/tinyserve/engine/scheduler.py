"""The token-level scheduler: a pure, synchronous state machine (no I/O, no clocks, no threads).

Every `schedule()`:
  1. cancelled sequences (waiting, prefilling, running or preempted) are finished and their blocks freed;
  2. running sequences that are decoding get one token each, oldest first; when the KV blocks run
     out, a running sequence is preempted (blocks freed, back to the front of the wait queue,
     recomputed later): one newer than the sequence that needs the block, of the tenant furthest
     above its fair share (or of its own tenant when that holds its whole KV share), its newest;
  3. the remaining per-step token budget goes to prompt chunks of sequences part-way through their
     prompt and to waiting ones (up to max_num_seqs running), one at a time, each to the tenant
     with the least service so far (`policy.interleave`): a newly arrived light tenant's short
     prompt goes first in the next step, not behind another tenant's long prefills. Chunked
     prefill: a long prompt is fed a budget's worth at a time, so it never stalls the decodes.
     The step that takes the first chunk of a tenant that just got work after being idle, while
     others were busy, carries no other tenant's prompt tokens: it is short, so that tenant's
     first token comes one short step after the step in flight when it arrived.
`postprocess()` appends the sampled tokens, applies the stop rules and frees finished sequences.

Fair share (config.scheduling == "fair"): tenancy.fair.FairShare, a weighted virtual token counter
per tenant, charged for every prefill and decode token. Work conserving: a lone tenant gets the
whole budget. "fifo": arrival order, tenants ignored (the behaviour before fair share).
KV shares: a tenant holds at most `kv_share * num_blocks` blocks (cached-but-free ones don't count);
beyond it its waiting sequences wait and its running ones preempt its own newest. A sequence can
never outgrow its tenant's share (its length limit is the share), so this never deadlocks.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from tinyserve.tenancy.fair import make_policy

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
        self.fair = config.scheduling == "fair"
        self.policy = make_policy(config.scheduling, config.tenant_weight)
        self._kv_caps: dict[str, int] = {}  # tenant -> max blocks, recomputed every step (reloads)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          self.kv_cap if config.tenant_kv_share else None)
        self.waiting: deque[Sequence] = deque()  # no blocks; preempted ones go back to the front
        self.running: list[Sequence] = []        # hold blocks; admission order, newest last

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_cap(self, tenant: str) -> int:
        """Most KV blocks `tenant` may hold: its kv_share of the cache (at least one block)."""
        cap = self._kv_caps.get(tenant)
        if cap is None:
            cap = self._kv_caps[tenant] = self._compute_kv_cap(tenant)
        return cap

    def _compute_kv_cap(self, tenant: str) -> int:
        n = self.block_manager.num_blocks
        share = self.config.tenant_kv_share(tenant) if self.config.tenant_kv_share else 1.0
        return max(1, int(share * n)) if 0.0 < share <= 1.0 else n  # (nan/out of range: no cap)

    def max_len(self, tenant: str) -> int:
        """The longest sequence (prompt + output) `tenant` can have: the context limit, or what
        fits in its KV share."""
        # no caching here: the server asks from its own thread while admitting requests
        return min(self.max_model_len, self._compute_kv_cap(tenant) * self.config.block_size)

    # -- schedule ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        bm = self.block_manager
        for seq in [s for s in (*self.waiting, *self.running) if s.cancelled]:
            self._finish(seq, FinishReason.CANCELLED)
            batch.finished.append(seq)
        self._kv_caps.clear()
        was_busy = set(self.policy.busy)
        busy = {s.tenant for s in (*self.waiting, *self.running)}
        self.policy.set_busy(busy)
        newcomers = busy - was_busy if self.fair else set()  # tenants that had no work last step
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()  # id() of sequences in this batch: never preempted

        # 1. decodes, oldest first
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue
            while seq.status is SequenceStatus.RUNNING and not bm.can_append(seq):
                if not self._preempt(seq, scheduled, batch, include_self=True):
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # it was the victim: preempted itself
            if not bm.can_append(seq):
                continue  # only older, already scheduled sequences hold blocks; wait a step
            bm.may_append(seq)
            self._schedule(seq, 1, batch, scheduled)
            budget -= 1

        # 2. prompt chunks, one sequence at a time, each to the least-served tenant: sequences
        #    part-way through their prompt and waiting ones (each tenant's own in order)
        #    A newcomer's first chunk (it comes first: it is lifted to the least-served busy
        #    tenant and wins the tie) gets a short step: nobody else's prefill rides along.
        prefilling = [s for s in self.running if id(s) not in scheduled]
        blocked: set[str] = set()  # tenants whose next waiting sequence cannot get blocks
        newcomer_in = False
        for seq in self.policy.interleave(prefilling + list(self.waiting), lambda s: s.tenant):
            if budget == 0:
                break
            if newcomer_in and seq.tenant not in newcomers:
                continue
            if seq.status is SequenceStatus.RUNNING:
                n = self._prefill_chunk(seq, budget, batch, scheduled)
            elif seq.status is SequenceStatus.WAITING:
                n = self._admit(seq, budget, batch, blocked)
            else:
                continue  # finished (an error) while scheduling
            if n:
                self._schedule(seq, n, batch, scheduled)
                budget -= n
                newcomer_in = newcomer_in or (seq.tenant in newcomers and newcomers != busy)
        return batch

    def _prefill_chunk(self, seq: Sequence, budget: int, batch: ScheduledBatch, scheduled: set[int]) -> int:
        """Tokens of `seq`'s prompt (running, part-way) to feed this step; 0 if it cannot progress."""
        bm = self.block_manager
        while bm.max_new_tokens(seq) == 0:  # no progress possible: take blocks from newer ones
            if not self._preempt(seq, scheduled, batch, include_self=False):
                break
        n = min(seq.num_uncomputed_tokens, budget, bm.max_new_tokens(seq))
        if n:
            bm.allocate(seq, n)
        return n

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch, blocked: set[str]) -> int:
        """Move waiting `seq` to running with its first chunk; 0 if it must wait (or failed)."""
        bm = self.block_manager
        key = seq.tenant if self.fair else ""  # fifo: one blocked request holds back all behind it
        if key in blocked or len(self.running) >= self.config.max_num_seqs or batch.preempted:
            return 0  # (no admissions in a step that had to preempt: that would only thrash)
        cap = self.kv_cap(seq.tenant)
        if bm.blocks_needed(seq.num_tokens) > min(bm.num_blocks, cap):
            if seq.num_output_tokens and seq.num_tokens >= self.max_len(seq.tenant):
                self._finish(seq, FinishReason.LENGTH)  # preempted, then its share shrank
            else:
                seq.error = (f"the sequence needs {bm.blocks_needed(seq.num_tokens)} KV blocks, "
                             + (f"the cache has {bm.num_blocks}" if cap >= bm.num_blocks else
                                f"tenant {seq.tenant!r} may hold {cap} (its kv_share)"))
                self._finish(seq, FinishReason.ERROR)
            batch.finished.append(seq)
            return 0
        cached = bm.match_prefix(seq)
        n = min(seq.num_uncomputed_tokens, budget, bm.max_new_tokens(seq))
        if n == 0:
            bm.deallocate(seq)  # give the cached blocks back (they stay cached)
            blocked.add(key)    # out of blocks (or share): its tenant's newer requests wait behind it
            return 0
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = cached
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        bm.allocate(seq, n)
        return n

    def _schedule(self, seq: Sequence, n: int, batch: ScheduledBatch, scheduled: set[int]) -> None:
        batch.scheduled.append((seq, n))
        scheduled.add(id(seq))
        if seq.is_decoding:
            batch.num_decode_tokens += n
            self.policy.charge(seq.tenant, decode_tokens=n)
        else:
            batch.num_prefill_tokens += n
            self.policy.charge(seq.tenant, prefill_tokens=n)

    def _preempt(self, seq: Sequence, scheduled: set[int], batch: ScheduledBatch,
                 include_self: bool) -> bool:
        """Free blocks for `seq`: preempt a running sequence newer than it that is not in this
        batch, else (include_self) `seq` itself. Among the newer ones: if `seq`'s tenant holds its
        whole KV share, its own; otherwise those of the tenant with the largest fair-share
        counter (fifo: any); the newest of them. The oldest running sequence is thus never
        preempted for another: it always progresses. False if there is no victim."""
        own = self.block_manager.at_share(seq.tenant)
        newer = [v for v in self.running[self.running.index(seq) + 1:]
                 if id(v) not in scheduled and (not own or v.tenant == seq.tenant)]
        if self.fair and newer:
            top = max(self.policy.counter(v.tenant) for v in newer)
            newer = [v for v in newer if self.policy.counter(v.tenant) == top]
        if newer:
            victim = newer[-1]
        elif include_self:
            victim = seq
        else:
            return False
        self.running.remove(victim)
        self.block_manager.deallocate(victim)  # its KV is recomputed when it is readmitted
        victim.status = SequenceStatus.WAITING
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        batch.preempted.append(victim)
        return True

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
        if seq.num_output_tokens >= seq.stopping.max_tokens or seq.num_tokens >= self.max_len(seq.tenant):
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
