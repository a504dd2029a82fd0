"""The token-level scheduler: a pure, synchronous state machine (no I/O, no clocks, no threads).

Every `schedule()` (one step; `num_steps` counts them):
  1. cancelled sequences (waiting, prefilling, running or preempted) are finished and their blocks freed;
  2. turns (`_take_turns`): the first waiting sequence of each tenant that finds no seat, or not
     enough free blocks for all its tokens, takes them from victims and is admitted at once:
     paused sequences' first, then, if it still waits for its first token, those of running
     sequences whose turn is over (admitted `turn_steps` steps ago or more; the tenant furthest
     above its fair share first, then the longest held). Victims go to the back of the queue;
  3a. a fresh tenant's step: when a tenant that had no work in the last step now has a prompt
     to start, while other tenants are busy, and it is among the least served (fair share), this
     step carries only the fresh tenants' prompt chunks: no other tenant's decodes or prompts,
     so its first token comes one prompt-sized step after the step in flight when it arrived.
     Never two such steps in a row (the others decode at least every other step), and its
     admission leaves the blocks the others' decodes take next. Nothing to start: go on to 3.;
  3. running sequences that are decoding get one token each, in turn order: those whose turn is
     not over, oldest first, then the others, closest to their end (max_tokens) first. When the
     KV blocks run out, a sequence not yet in the batch is preempted (blocks freed, recomputed
     later; see `_preempt`): a paused one, else one whose turn is over (the one furthest from its
     end), else the newest; of the tenant furthest above its fair share (or its own tenant when
     that holds its whole KV share);
  4. the remaining per-step token budget goes to prompt chunks of sequences part-way through their
     prompt and to waiting ones (up to max_num_seqs running), one at a time, each to the tenant
     with the least service so far (`policy.interleave`): a newly arrived light tenant's short
     prompt goes first in the next step, not behind another tenant's long prefills. Chunked
     prefill: a long prompt is fed a budget's worth at a time, so it never stalls the decodes.
     The step that takes the first chunk of a tenant that just got work after being idle, while
     others were busy, when it is not that tenant's own (3a.: right after another), carries no
     other tenant's prompt tokens.
`postprocess()` appends the sampled tokens, applies the stop rules and frees finished sequences.

Budget (how long a step is). A step's cost is about linear in its tokens, and a request that
arrives waits for the step in flight, so the budget follows who is there. While one tenant has
had the engine to itself for `contended_window_steps` steps, a step takes up to
max_num_batched_tokens (long prefill chunks: throughput). While another tenant was busy within
that window, steps are short: the decodes, and prompt tokens up to a budget minus the decodes
(at least a quarter of it, so prompts always advance). The budget is idle_step_tokens while one
of those tenants has no work (it just had, and its next request would wait for the step in
flight: the shortest steps), and contended_step_tokens while they all have work (nobody is
fresh, so steps need only keep everyone's tokens flowing). The first chunk of a newcomer (3a.,
4.) may still take the whole budget: that step carries no other prefill, and usually no decodes
either. So a light tenant's request waits for the rest of one short step, then its prompt runs
alone, and a lone tenant keeps the long steps. Both budgets are flags for tuning; the window is counted in steps, since
the scheduler has no clock.

Admission takes blocks for all of a sequence's current tokens at once, so a running sequence only
ever waits for a block to decode. The wait queue holds the requests waiting for their first token
before those preempted while streaming, so a newcomer never queues behind long streams.

Backpressure: a paused sequence (`Sequence.paused`, set by the engine when its client stops
reading) is never scheduled and makes its tenant idle for fair share. It keeps its blocks while
nobody needs them (a reader that catches up continues at once, nothing recomputed); whoever needs
blocks or a seat takes a paused sequence's first. A paused waiting sequence is not admitted.

Turns bound a newcomer's wait: one that finds the cache (or the seats) full of sequences admitted
`turn_steps` steps ago or more is admitted in the next step and then has its own turn, during which
only sequences whose turn is not over either (older ones first) can take its blocks. So its first
token comes at most turn_steps steps plus its prefill after it reaches the head of its tenant's
queue (README, "Slow readers and long streams"). turn_steps = 0: no turns, and when blocks run out
the sequence furthest from its end gives way.

Fair share (config.scheduling == "fair"): fair.FairShare, a weighted virtual token counter
per tenant, charged for every prefill and decode token. Work conserving: a lone tenant gets the
whole budget. "fifo": arrival order, tenants ignored (the behaviour before fair share).
KV shares: a tenant holds at most kv_share_blocks(kv_share, num_blocks) blocks (cached-but-free
ones don't count); beyond it its waiting sequences wait and its running ones preempt its own. A
sequence can never outgrow its tenant's share (its length limit is the share), so this never
deadlocks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .fair import make_policy
from .params import EngineConfig, FinishReason
from .sequence import Sequence, SequenceStatus


def kv_share_blocks(share: float, num_blocks: int) -> int:
    """How many of `num_blocks` KV blocks a tenant with KV share `share` may hold: the share's
    blocks rounded down (within 1e-9, so 0.29 of 100 is 29), at least one. A share outside
    (0, 1] (or nan) caps nothing."""
    if not 0.0 < share <= 1.0:
        return num_blocks
    return max(1, min(num_blocks, math.floor(share * num_blocks + 1e-9)))


@dataclass
class ScheduledBatch:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, num_new_tokens)
    finished: list[Sequence] = field(default_factory=list)  # finished while scheduling (cancelled...)
    preempted: list[Sequence] = field(default_factory=list)  # the first num_turns of them in turns
    num_turns: int = 0  # sequences preempted to admit a waiting one (paused or turn over)
    num_decode_tokens: int = 0  # one per decoding sequence
    num_prefill_tokens: int = 0  # prompt (or recomputed) tokens
    solo: bool = False  # a fresh tenant's step: only fresh tenants' prompts (see scheduler "Budget")

    @property
    def num_batched_tokens(self) -> int:
        return self.num_decode_tokens + self.num_prefill_tokens

    def __len__(self) -> int:
        return len(self.scheduled)


class Scheduler:
    def __init__(
        self, config: EngineConfig, num_blocks: int, max_model_len: int, eos_token_ids: Iterable[int] = ()
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.fair = config.scheduling == "fair"
        self.policy = make_policy(config.scheduling, config.tenant_weight)
        self._kv_caps: dict[str, int] = {}  # tenant -> max blocks, recomputed every step (reloads)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, self.kv_cap if config.tenant_kv_share else None
        )
        self.waiting: deque[Sequence] = deque()  # no blocks; see _enqueue for the order
        self.running: list[Sequence] = []  # hold blocks; admission order, newest last
        self.num_steps = 0  # schedule() calls: the clock of turns
        self._last_busy: dict[str, int] = {}  # tenant -> last step it was busy (within the window)
        self.contended = False  # the last step ran on a short budget
        self.watching = False  # ... the idle one: a tenant busy within the window has no work
        self._solo_step = -1  # the last step that was a fresh tenant's own (see "Budget")

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, front=False)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_paused(self) -> int:
        return sum(1 for s in (*self.waiting, *self.running) if s.paused)

    def kv_cap(self, tenant: str) -> int:
        """Most KV blocks `tenant` may hold: its kv_share of the cache (at least one block)."""
        cap = self._kv_caps.get(tenant)
        if cap is None:
            cap = self._kv_caps[tenant] = self._compute_kv_cap(tenant)
        return cap

    def _compute_kv_cap(self, tenant: str) -> int:
        share = self.config.tenant_kv_share(tenant) if self.config.tenant_kv_share else 1.0
        return kv_share_blocks(share, self.block_manager.num_blocks)

    def max_len(self, tenant: str) -> int:
        """The longest sequence (prompt + output) `tenant` can have: the context limit, or what
        fits in its KV share."""
        # no caching here: the server asks from its own thread while admitting requests
        return self._len_within(self._compute_kv_cap(tenant))

    def _len_within(self, cap_blocks: int) -> int:
        """The longest sequence that fits both the context limit and `cap_blocks` KV blocks."""
        return min(self.max_model_len, cap_blocks * self.config.block_size)

    # -- schedule ----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        self.num_steps += 1
        batch = ScheduledBatch()
        bm = self.block_manager
        for seq in [s for s in (*self.waiting, *self.running) if s.cancelled]:
            self._finish(seq, FinishReason.CANCELLED)
            batch.finished.append(seq)
        self._kv_caps.clear()
        was_busy = set(self.policy.busy)
        busy = {s.tenant for s in (*self.waiting, *self.running) if not s.paused}
        self.policy.set_busy(busy)
        newcomers = busy - was_busy if self.fair else set()  # tenants that had no work last step
        self.contended = self._note_busy(busy)
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()  # id() of sequences in this batch: never preempted

        # 2. room for waiting sequences that do not fit: paused sequences' blocks, and for one
        #    waiting for its first token, those of sequences admitted turn_steps ago or more
        self._take_turns(batch)
        batch.num_turns = len(batch.preempted)
        just_preempted = {id(s) for s in batch.preempted}
        waiting = [s for s in self.waiting if not s.paused and id(s) not in just_preempted]
        fresh = newcomers if newcomers != busy else set()  # newcomers while others are busy

        # 3a. a fresh tenant's step: only fresh tenants' prompts, nobody's decodes (see "Budget")
        if self._solo_allowed(fresh, busy):
            solo = [s for s in self.running if s.tenant in fresh and not s.paused and not s.is_decoding]
            solo += [s for s in waiting if s.tenant in fresh]
            reserve = sum(self._decode_growth().values())  # the blocks the next step's decodes take
            self._prefill(batch, solo, budget, budget, set(), scheduled, reserve)
            if batch.scheduled:
                batch.solo = True
                self._solo_step = self.num_steps
                return batch

        # 3. decodes in turn order (see _decode_order)
        for seq in sorted(self.running, key=self._decode_order):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.paused or not seq.is_decoding:
                continue
            while seq.status is SequenceStatus.RUNNING and not bm.can_append(seq):
                self._preempt(seq, scheduled, batch)
            if seq.status is not SequenceStatus.RUNNING:
                continue  # it was the victim: preempted itself
            bm.may_append(seq)
            self._schedule(seq, 1, batch, scheduled)
            budget -= 1

        # 4. prompt chunks, one sequence at a time, each to the least-served tenant: sequences
        #    part-way through their prompt and waiting ones (each tenant's own in order)
        #    A newcomer's first chunk (it comes first: it is lifted to the least-served busy
        #    tenant and wins the tie) gets a short step: nobody else's prefill rides along.
        #    No admissions in a step whose decodes had to preempt: that would only thrash.
        if len(batch.preempted) != batch.num_turns:
            waiting = []
        prefilling = [s for s in self.running if id(s) not in scheduled and not s.paused]
        prefill_budget = budget
        if self.contended:  # short steps (see "Budget" in the module doc)
            short = self.config.idle_step_tokens if self.watching else self.config.contended_step_tokens
            short = min(short, self.config.max_num_batched_tokens)
            prefill_budget = min(budget, max(short - batch.num_decode_tokens, max(1, short // 4)))
        self._prefill(batch, prefilling + waiting, budget, prefill_budget, fresh, scheduled, 0)
        return batch

    def _solo_allowed(self, fresh: set[str], busy: set[str]) -> bool:
        """May this step be a fresh tenant's own (3a.)? Only when some fresh tenant is among the
        least served of the busy ones (a tenant that had more than its share waits its turn as
        usual), and not right after another such step (the others' decodes run at least every
        other step, however many tenants arrive)."""
        if not fresh or self._solo_step == self.num_steps - 1:
            return False
        least = min(self.policy.counter(t) for t in busy)
        return any(self.policy.counter(t) <= least for t in fresh)

    def _prefill(
        self,
        batch: ScheduledBatch,
        candidates: list[Sequence],
        budget: int,
        prefill_budget: int,
        fresh: set[str],
        scheduled: set[int],
        reserve: int,
    ) -> None:
        """Prompt chunks for `candidates` (running ones part-way through their prompt, then
        waiting ones), one at a time, each to the least-served tenant, within `budget` tokens:
        a chunk of a `fresh` tenant may take all of it, and then no other tenant's chunk rides
        along; the others take at most `prefill_budget` together. Admissions leave `reserve`
        free blocks."""
        blocked: set[str] = set()  # tenants whose next waiting sequence cannot get blocks
        newcomer_in = False
        for seq in self.policy.interleave(candidates, lambda s: s.tenant):
            if budget == 0:
                break
            if newcomer_in and seq.tenant not in fresh:
                continue
            allowed = budget if seq.tenant in fresh else prefill_budget
            if allowed == 0:
                continue
            if seq.status is SequenceStatus.RUNNING:
                n = min(seq.num_uncomputed_tokens, allowed)  # its blocks came with its admission
            elif seq.status is SequenceStatus.WAITING:
                n = self._admit(seq, allowed, batch, blocked, reserve)
            else:
                continue  # finished (an error) while scheduling
            if n:
                self._schedule(seq, n, batch, scheduled)
                budget -= n
                prefill_budget = max(0, prefill_budget - n)
                newcomer_in = newcomer_in or seq.tenant in fresh

    def _note_busy(self, busy: set[str]) -> bool:
        """Record this step's busy tenants; True when more than one tenant was busy within the
        last contended_window_steps steps (this one included): the step is short. `watching`:
        and one of them has no work now (its next request waits for this step)."""
        step, window = self.num_steps, self.config.contended_window_steps
        for t in busy:
            self._last_busy[t] = step
        if len(self._last_busy) > len(busy):
            self._last_busy = {t: s for t, s in self._last_busy.items() if step - s < window}
        self.watching = len(self._last_busy) > len(busy)
        return len(self._last_busy) > 1

    def _admit(self, seq: Sequence, budget: int, batch: ScheduledBatch, blocked: set[str], reserve: int) -> int:
        """Move waiting `seq` to running and return its first chunk; 0 if it must wait (or failed).
        It must leave `reserve` blocks free."""
        key = seq.tenant if self.fair else ""  # fifo: one blocked request holds back all behind it
        if key in blocked or self._too_big(seq, batch):
            return 0
        bm = self.block_manager
        if (
            len(self.running) >= self.config.max_num_seqs
            or bm.num_blocks_to_admit(seq) > bm.num_free_for(seq.tenant)
            or bm.num_blocks_to_admit(seq) > bm.num_free_blocks - reserve
        ):
            blocked.add(key)  # out of blocks (or share): its tenant's newer requests wait behind it
            return 0
        self._start(seq)
        return min(seq.num_uncomputed_tokens, budget)

    def _too_big(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Finish (and return True) a waiting `seq` that can never fit the cache or its share."""
        bm = self.block_manager
        cap = self.kv_cap(seq.tenant)
        if bm.blocks_needed(seq.num_tokens) <= min(bm.num_blocks, cap):
            return False
        if seq.num_output_tokens and seq.num_tokens >= self.max_len(seq.tenant):
            self._finish(seq, FinishReason.LENGTH)  # preempted, then its share shrank
        else:
            seq.error = f"the sequence needs {bm.blocks_needed(seq.num_tokens)} KV blocks, " + (
                f"the cache has {bm.num_blocks}"
                if cap >= bm.num_blocks
                else f"tenant {seq.tenant!r} may hold {cap} (its kv_share)"
            )
            self._finish(seq, FinishReason.ERROR)
        batch.finished.append(seq)
        return True

    def _start(self, seq: Sequence) -> None:
        """WAITING -> RUNNING, with blocks for all its tokens (its cached prefix reused): a
        running sequence never waits for blocks part-way through its prompt."""
        bm = self.block_manager
        cached = bm.match_prefix(seq)
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = cached
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        seq.admitted_at_step = self.num_steps
        self.running.append(seq)
        bm.allocate(seq, seq.num_uncomputed_tokens)

    def _schedule(self, seq: Sequence, n: int, batch: ScheduledBatch, scheduled: set[int]) -> None:
        batch.scheduled.append((seq, n))
        scheduled.add(id(seq))
        if seq.is_decoding:
            batch.num_decode_tokens += n
            self.policy.charge(seq.tenant, decode_tokens=n)
        else:
            batch.num_prefill_tokens += n
            self.policy.charge(seq.tenant, prefill_tokens=n)

    # -- turns ---------------------------------------------------------------------------------------
    def _protected(self, seq: Sequence) -> bool:
        """Running, not paused and admitted fewer than turn_steps steps ago: its turn is not over,
        no waiting request may take its blocks."""
        return (
            self.config.turn_steps > 0
            and not seq.paused
            and self.num_steps - seq.admitted_at_step < self.config.turn_steps
        )

    def _take_turns(self, batch: ScheduledBatch) -> None:
        """Before the decodes: the first waiting sequence of each tenant (fifo: the first of all)
        that finds no seat, or not enough blocks for all its tokens once this step's decodes
        have taken theirs, gets them from victims: paused sequences first (longest held), and,
        for one still waiting for its first token, running sequences whose turn is over (the
        tenant furthest above its fair share first, then the longest held). It is admitted at
        once; its victims go to the back of the queue. Victims are only taken if together they
        make it fit. One that fits is left to step 3."""
        bm = self.block_manager
        heads: dict[str, Sequence] = {}
        for s in self.waiting:
            if not s.paused:
                heads.setdefault(s.tenant if self.fair else "", s)
        if not heads:
            return
        max_blocks = bm.max_blocks  # None: no tenant is capped
        growth = self._decode_growth()  # tenant -> blocks this step's decodes take

        def room(tenant: str, free_gain: int, own_gain: int) -> int:
            r = bm.num_free_blocks + free_gain - sum(growth.values())
            if max_blocks is not None:
                r = min(r, max_blocks(tenant) - bm.num_held(tenant) + own_gain - growth.get(tenant, 0))
            return r

        for seq in self.policy.interleave(list(heads.values()), lambda s: s.tenant):
            if bm.blocks_needed(seq.num_tokens) > min(bm.num_blocks, self.kv_cap(seq.tenant)):
                continue  # it can never fit: _admit finishes it
            need = bm.num_blocks_to_admit(seq)
            seats = self.config.max_num_seqs - len(self.running)
            victims: list[Sequence] = []
            free_gain = own_gain = 0
            for v in self._turn_victims(seq):
                if seats >= 1 and need <= room(seq.tenant, free_gain, own_gain):
                    break
                f = bm.num_freed_by(v)
                g = f if v.tenant == seq.tenant else 0
                if seats >= 1 and room(seq.tenant, free_gain + f, own_gain + g) <= room(
                    seq.tenant, free_gain, own_gain
                ):
                    continue  # it frees nothing `seq` may use
                victims.append(v)
                seats += 1
                free_gain, own_gain = free_gain + f, own_gain + g
            if not victims or not (seats >= 1 and need <= room(seq.tenant, free_gain, own_gain)):
                continue  # it fits already (step 3 admits it), or it cannot be made to fit
            for v in victims:
                self._evict(v, batch, front=False)
            self._start(seq)
            growth = self._decode_growth()

    def _turn_victims(self, seq: Sequence) -> list[Sequence]:
        """Who may give up blocks for waiting `seq`, in order (see _take_turns)."""
        paused = sorted((v for v in self.running if v.paused), key=lambda v: v.admitted_at_step)
        if self.config.turn_steps == 0 or seq.has_output:
            return paused
        over = [v for v in self.running if not v.paused and not self._protected(v)]
        over.sort(key=lambda v: (-self.policy.counter(v.tenant) if self.fair else 0.0, v.admitted_at_step))
        return paused + over

    def _decode_growth(self) -> dict[str, int]:
        """tenant -> blocks that its decoding sequences take this step (one each at a block edge)."""
        growth: dict[str, int] = {}
        for s in self.running:
            if not s.paused and s.is_decoding and self.block_manager.num_new_blocks(s, 1):
                growth[s.tenant] = growth.get(s.tenant, 0) + 1
        return growth

    # -- preemption ----------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence, scheduled: set[int], batch: ScheduledBatch) -> None:
        """Free blocks for decoding `seq`. Only sequences not in this batch (and, if `seq`'s tenant
        holds its whole KV share, only its own) are victims, in this order:
          - a paused one (the longest held);
          - if `seq`'s turn is not over: one whose turn is over, else the newest newer one, else
            `seq` itself (the rule before turns: the oldest always progresses);
          - if `seq`'s turn is over: of `seq` and the others whose turn is over, the one furthest
            from its end (most of its max_tokens left; ties: the newest), so a stream that is
            nearly done is not thrown back behind one that has most of its way to go.
        Among candidates, first those of the tenant with the largest fair-share counter (fifo:
        any). With the decode order (_decode_order), the oldest sequence whose turn is not over
        always progresses, and so, among the others, does the one closest to its end."""
        own = self.block_manager.at_share(seq.tenant)

        def eligible(v: Sequence) -> bool:
            return v is not seq and id(v) not in scheduled and (not own or v.tenant == seq.tenant)

        paused = [v for v in self.running if v.paused and eligible(v)]
        over = [v for v in self.running if eligible(v) and not v.paused and not self._protected(v)]
        newer = [v for v in self.running[self.running.index(seq) + 1 :] if eligible(v) and not v.paused]
        if paused:
            victim = min(paused, key=lambda v: v.admitted_at_step)
        elif self._protected(seq):
            if over:
                victim = self._furthest_from_end(over)
            else:
                victim = self._of_top_tenant(newer)[-1] if newer else seq
        else:
            victim = self._furthest_from_end([seq] + over)
        self._evict(victim, batch, front=not victim.paused)

    def _decode_order(self, seq: Sequence) -> tuple[int, int]:
        """Sort key of the decode loop: sequences whose turn is not over first, oldest first;
        then the others, closest to their end first (ties: oldest first). A victim is never
        already in the batch, so this order decides who can still give way."""
        if self._protected(seq):
            return (0, 0)
        return (1, seq.stopping.max_tokens - seq.num_output_tokens)

    def _of_top_tenant(self, candidates: list[Sequence]) -> list[Sequence]:
        """The candidates of the tenant with the largest fair-share counter (fifo: all)."""
        if self.fair:
            top = max(self.policy.counter(v.tenant) for v in candidates)
            candidates = [v for v in candidates if self.policy.counter(v.tenant) == top]
        return candidates

    def _furthest_from_end(self, candidates: list[Sequence]) -> Sequence:
        """Of the top tenant's candidates (in running order), the one with the most output tokens
        left to its max_tokens; ties: the newest."""
        top = self._of_top_tenant(candidates)
        return max(reversed(top), key=lambda v: v.stopping.max_tokens - v.num_output_tokens)

    def _evict(self, victim: Sequence, batch: ScheduledBatch, front: bool) -> None:
        """Preempt running `victim`: free its blocks (its KV is recomputed when readmitted)."""
        self.running.remove(victim)
        self.block_manager.deallocate(victim)
        victim.status = SequenceStatus.WAITING
        victim.num_preemptions += 1
        self._enqueue(victim, front)
        batch.preempted.append(victim)

    def _enqueue(self, seq: Sequence, front: bool) -> None:
        """The wait queue holds the sequences waiting for their first token, then those with
        output (preempted while streaming); `seq` goes to the back of its group, or the front."""
        first_started = next((i for i, s in enumerate(self.waiting) if s.has_output), len(self.waiting))
        if seq.has_output:
            self.waiting.insert(first_started if front else len(self.waiting), seq)
        else:
            self.waiting.insert(0 if front else first_started, seq)

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
        if seq.num_output_tokens >= seq.stopping.max_tokens:
            return FinishReason.LENGTH
        # max_len(tenant) with this step's cap (kv_cap: the share read once a step, not per token)
        if seq.num_tokens >= self._len_within(self.kv_cap(seq.tenant)):
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
