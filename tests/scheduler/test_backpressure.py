"""Backpressure (paused sequences) and turns (a request waiting for its first token may take the
blocks of sequences admitted turn_steps ago or more), step by step with the fake paged model.

The fake model's next token is a hash of the whole history read back from the KV blocks, so a
sequence whose blocks were released and recomputed, or that sat paused, gives other tokens if
anything went wrong on the way.
"""

from __future__ import annotations

import random

import pytest
from fake_runner import make_engine, prompt, random_budget, run_all

from tinyserve.engine import FinishReason, SamplingParams, StoppingParams
from tinyserve.engine.sequence import SequenceStatus

G = SamplingParams(temperature=0.0)


def add(engine, rid, n_prompt, max_tokens, salt=None, sampling=G, tenant="default"):
    engine.add_request(
        rid,
        prompt(n_prompt, hash(rid) % 50 if salt is None else salt),
        sampling,
        StoppingParams(max_tokens=max_tokens),
        tenant=tenant,
    )


def reference(reqs: dict[str, tuple], **cfg) -> dict[str, list[int]]:
    """Tokens of each request run alone-ish on an engine with room for everything."""
    engine, _ = make_engine(num_blocks=2048, **cfg)
    for rid, (n, mt, salt, sampling) in reqs.items():
        add(engine, rid, n, mt, salt, sampling)
    return {k: v["tokens"] for k, v in run_all(engine).items()}


def seq_of(engine, rid):
    return next(s for s in (*engine.scheduler.running, *engine.scheduler.waiting) if s.request_id == rid)


class Tracker:
    """Steps the engine, recording each request's tokens, the step of its first token and of its
    end, and every turn (a waiting request's admission) with its victims' turn lengths."""

    def __init__(self, engine):
        self.engine = engine
        self.steps = 0
        self.tokens: dict[str, list[int]] = {}
        self.first: dict[str, int] = {}
        self.end: dict[str, int] = {}
        self.finished: dict[str, FinishReason] = {}
        self.turns: list[tuple[int, str, int]] = []  # (step, victim, steps it had held its blocks)
        self.paused_scheduled = 0  # paused sequences found in a batch (never)
        sched = engine.scheduler
        schedule = sched.schedule

        def recording():
            b = schedule()
            for v in b.preempted[: b.num_turns]:
                self.turns.append((self.steps, v.request_id, sched.num_steps - v.admitted_at_step))
            self.paused_scheduled += sum(s.paused for s, _ in b.scheduled)
            return b

        sched.schedule = recording

    def step(self) -> list:
        outs = self.engine.step()
        for o in outs:
            self.tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.new_token_ids:
                self.first.setdefault(o.request_id, self.steps)
            if o.finished:
                self.finished[o.request_id] = o.finish_reason
                self.end[o.request_id] = self.steps
        self.steps += 1
        return outs

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def until_idle(self, limit: int = 20_000) -> None:
        for _ in range(limit):
            if not self.engine.has_unfinished_requests():
                assert self.paused_scheduled == 0
                return
            self.step()
        raise AssertionError("engine did not go idle")


# -- pause / resume ------------------------------------------------------------------------------
def test_paused_sequence_is_not_scheduled_keeps_its_blocks_and_resumes_exactly():
    reqs = {"a": (6, 30, 1, G), "b": (7, 30, 2, SamplingParams(temperature=0.9, seed=7))}
    ref = reference(reqs)
    engine, runner = make_engine(num_blocks=64)
    for rid, (n, mt, salt, sp) in reqs.items():
        add(engine, rid, n, mt, salt, sp)
    t = Tracker(engine)
    t.run(5)
    a = seq_of(engine, "a")
    blocks, fed = list(a.block_table), sum(sum(c["seq_lens"]) for c in runner.calls)
    engine.pause_request("a")
    for _ in range(10):
        outs = {o.request_id: o for o in t.step()}
        assert "a" not in outs and len(outs["b"].new_token_ids) == 1
        assert a.status is SequenceStatus.RUNNING and a.block_table == blocks  # no pressure: kept
    assert engine.stats().num_paused == 1
    engine.resume_request("a")
    t.until_idle()
    assert t.tokens == ref
    # resumed with its KV in place: each prompt fed once, then one token per step, no recompute
    assert fed == 13 + 2 * 4 and sum(sum(c["seq_lens"]) for c in runner.calls) == 13 + 2 * 29
    assert engine.num_preemptions == 0 and engine.stats().kv_blocks_used == 0


def test_paused_sequences_blocks_go_first_to_a_sequence_that_needs_them():
    # 24 blocks of 4: "p" (paused, 40 tokens = 10 blocks) and "x" hold most of the cache; when x
    # needs blocks to grow it takes p's, not its own turn nor anyone else's
    reqs = {"p": (30, 40, 1, G), "x": (30, 60, 2, G), "y": (8, 20, 3, G)}
    ref = reference(reqs)
    engine, _ = make_engine(num_blocks=24, max_num_batched_tokens=64)
    for rid, (n, mt, salt, sp) in reqs.items():
        add(engine, rid, n, mt, salt, sp)
    t = Tracker(engine)
    t.run(3)
    engine.pause_request("p")
    victims = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (b := schedule(), victims.extend(s.request_id for s in b.preempted))[0]
    while not victims:
        t.step()
        assert t.steps < 200
    assert victims[0] == "p" and seq_of(engine, "p").status is SequenceStatus.WAITING
    assert seq_of(engine, "p").block_table == []
    for _ in range(20):  # paused and waiting: never readmitted, whatever frees up
        t.step()
        assert seq_of(engine, "p").status is SequenceStatus.WAITING
    engine.resume_request("p")
    t.until_idle()
    assert t.tokens == ref and t.finished == dict.fromkeys(reqs, FinishReason.LENGTH)
    assert engine.stats().kv_blocks_used == 0


def test_waiting_request_takes_a_paused_sequences_blocks_and_seat():
    # max_num_seqs 2, both seats held; "p" is paused: the waiting request gets its seat at once
    engine, _ = make_engine(num_blocks=64, max_num_seqs=2, turn_steps=0)  # (no turns: only pause)
    add(engine, "p", 8, 50, 1)
    add(engine, "q", 8, 50, 2)
    t = Tracker(engine)
    t.run(3)
    add(engine, "new", 5, 3, 3)
    t.run(5)
    assert "new" not in t.first  # seats full, nobody paused: it waits
    engine.pause_request("p")
    t.step()  # the pause lands; "new" is admitted in the same step, its 5-token prompt prefilled
    assert "new" in t.first and t.first["new"] == t.steps - 1
    assert seq_of(engine, "p").status is SequenceStatus.WAITING
    engine.resume_request("p")
    t.until_idle()
    assert len(t.tokens["p"]) == 50 and engine.stats().kv_blocks_used == 0


def test_paused_tenant_is_not_busy_for_fair_share():
    engine, _ = make_engine(num_blocks=128, max_num_batched_tokens=8)
    add(engine, "a", 6, 100, 1, tenant="a")
    add(engine, "b", 6, 100, 2, tenant="b")
    t = Tracker(engine)
    t.run(4)
    engine.pause_request("a")
    t.run(40)  # a is idle for fair share meanwhile: it banks no credit
    policy = engine.scheduler.policy
    assert policy.busy == {"b"}
    engine.resume_request("a")
    t.step()
    assert policy.busy == {"a", "b"} and policy.counter("a") >= policy.counter("b") - 2 * 8


def test_out_of_blocks_the_stream_furthest_from_its_end_gives_way():
    # both turns over: "long" (older, further from its end) and "short" (newer, nearly done):
    # when the cache runs out it is "long" that steps back, not the newer one
    engine, _ = make_engine(num_blocks=48, max_num_batched_tokens=64, turn_steps=4)
    add(engine, "long", 8, 180, 1)  # 47 of the 48 blocks at its end
    t = Tracker(engine)
    victims = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (b := schedule(), victims.extend(s.request_id for s in b.preempted))[0]
    t.run(110)
    add(engine, "short", 8, 40, 2)
    while not victims:
        t.step()
        assert t.steps < 300
    long = seq_of(engine, "long")
    assert victims == ["long"] and "short" not in t.finished
    assert 180 - len(t.tokens["long"]) > 40 - len(t.tokens["short"])
    t.until_idle()
    assert "short" not in victims and t.end["short"] - t.first["short"] == 39
    assert len(t.tokens["long"]) == 180 and long.num_preemptions >= 1
    assert engine.stats().kv_blocks_used == 0


# -- turns: a newcomer with the cache full of long streams ----------------------------------------
LONG = {f"long{i}": (8, 240, i, G) for i in range(4)}  # 4 x 62 blocks at the end, the cache has 64


def _full_of_long_streams(turn_steps, steps=120, **cfg):
    engine, _ = make_engine(num_blocks=64, block_size=4, max_num_batched_tokens=16, turn_steps=turn_steps, **cfg)
    for rid, (n, mt, salt, sp) in LONG.items():
        add(engine, rid, n, mt, salt, sp)
    t = Tracker(engine)
    t.run(steps)
    sched = engine.scheduler
    assert sched.block_manager.num_free_blocks <= 1 and sched.waiting  # full; long ones wait
    assert all(sched.num_steps - s.admitted_at_step >= turn_steps for s in sched.running)
    return engine, t


@pytest.mark.parametrize("turn_steps", [16, 64])
def test_newcomer_gets_its_first_token_at_once_when_the_cache_is_full_of_long_streams(turn_steps):
    new = {"new": (12, 20, 9, G)}
    ref = reference(LONG | new)
    engine, t = _full_of_long_streams(turn_steps)
    arrival = t.steps
    add(engine, "new", *new["new"][:3])
    t.step()  # admitted at once (a turn), its 12 prompt tokens share the step with the decodes
    assert t.first["new"] == arrival
    assert [(step, held >= turn_steps) for step, _, held in t.turns] == [(arrival, True)]
    t.run(19)  # then it has its turn: one token per step, never preempted
    assert t.finished["new"] is FinishReason.LENGTH and t.end["new"] == arrival + 19
    t.until_idle()
    assert t.tokens == ref and engine.stats().kv_blocks_used == 0


def test_newcomer_waits_at_most_turn_steps_for_a_seat():
    # every seat held by streams admitted 10 steps ago (blocks to spare): the newcomer gets the
    # seat of the longest held when its turn is over, at its admission + turn_steps
    Q = 50
    engine, _ = make_engine(num_blocks=512, max_num_seqs=3, turn_steps=Q)
    for i in range(3):
        add(engine, f"long{i}", 8, 400, i)
    t = Tracker(engine)
    t.run(10)
    admitted = min(s.admitted_at_step for s in engine.scheduler.running)
    add(engine, "new", 6, 5, 9)
    t.run(Q)
    assert t.first["new"] + 1 == admitted + Q  # (step k of the Tracker is scheduler step k + 1)
    assert [(victim, held) for _, victim, held in t.turns] == [("long0", Q)]
    t.until_idle()
    assert len(t.tokens["long0"]) == 400 and engine.stats().kv_blocks_used == 0


def test_without_turns_the_newcomer_waits_for_a_stream_to_end():
    engine, _ = make_engine(num_blocks=512, max_num_seqs=3, turn_steps=0)
    for i in range(3):
        add(engine, f"long{i}", 8, 400, i)
    t = Tracker(engine)
    t.run(10)
    add(engine, "new", 6, 5, 9)
    t.until_idle()
    assert t.first["new"] == t.end["long0"] + 1 and not t.turns


def test_stream_of_newcomers_into_a_full_cache():
    """A newcomer every 5 steps for 150 steps: each gets its first token within turn_steps + 2
    steps (in practice at once), every victim had held its blocks for turn_steps steps or more,
    and every request ends with the tokens it would have had alone."""
    Q = 24
    news = {f"n{i}": (5 + i % 7, 6, 20 + i, G) for i in range(30)}
    ref = reference(LONG | news)
    engine, t = _full_of_long_streams(turn_steps=Q)
    arrival = {}
    for rid, (n, mt, salt, _) in news.items():
        arrival[rid] = t.steps
        add(engine, rid, n, mt, salt)
        t.run(5)
    t.until_idle()
    assert t.tokens == ref and all(t.finished[r] is FinishReason.LENGTH for r in ref)
    waits = [t.first[r] - a for r, a in arrival.items()]
    assert max(waits) <= Q + 2 and sorted(waits)[len(waits) // 2] == 0
    assert t.turns and min(held for _, _, held in t.turns) >= Q
    assert {v for _, v, _ in t.turns} <= set(LONG)
    assert engine.stats().kv_blocks_used == 0


# -- everything at once --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_random_pauses_turns_and_aborts_never_deadlock_leak_or_change_outputs(seed):
    rnd = random.Random(seed)
    budget = random_budget(rnd)
    num_blocks = budget["num_blocks"]
    engine, _ = make_engine(
        **budget,
        turn_steps=rnd.choice([0, 1, 5, 20]),
        scheduling=rnd.choice(["fair", "fifo"]),
        tenant_kv_share=rnd.choice([None, lambda t: 0.6 if t == "x" else 1.0]),
    )
    limit = engine.max_model_len
    reqs = {}
    for i in range(30):
        n = rnd.randrange(1, min(30, limit // 2))
        seed_i = None if i % 2 else 100 + i
        reqs[f"r{i}"] = (
            rnd.choice("xy"),
            prompt(n, rnd.randrange(50)),
            rnd.randrange(1, 40),
            G if seed_i is None else SamplingParams(temperature=1.0, seed=seed_i),
        )
    pending, paused, aborted = list(reqs), set(), set()
    t = Tracker(engine)
    for _ in range(20_000):
        if pending and rnd.random() < 0.4:
            rid = pending.pop(0)
            tenant, p, mt, sp = reqs[rid]
            engine.add_request(rid, p, sp, StoppingParams(max_tokens=mt), tenant=tenant)
        live = [r for r in reqs if r not in pending and r not in t.finished]
        if live and rnd.random() < 0.2:
            rid = rnd.choice(live)
            if rid in paused:
                engine.resume_request(rid)
                paused.discard(rid)
            else:
                engine.pause_request(rid)
                paused.add(rid)
        if live and rnd.random() < 0.02:
            rid = rnd.choice(live)
            engine.abort_request(rid)
            aborted.add(rid)
        if not pending and rnd.random() < 0.05:  # in the end everyone reads again
            for rid in paused:
                engine.resume_request(rid)
            paused.clear()
        t.step()
        assert engine.stats().kv_blocks_used <= num_blocks
        if not pending and not engine.has_unfinished_requests():
            break
    assert set(t.finished) == set(reqs) and t.paused_scheduled == 0
    assert engine.stats().kv_blocks_used == 0 and engine.scheduler.block_manager.num_held_by == {}
    ref_engine, _ = make_engine(num_blocks=2048, block_size=4, context_length=limit, enable_prefix_caching=False)
    for rid, (tenant, p, mt, sp) in reqs.items():
        ref_engine.add_request(rid, p, sp, StoppingParams(max_tokens=mt), tenant=tenant)
    ref = run_all(ref_engine)
    sched = engine.scheduler
    for rid, reason in t.finished.items():
        if reason is FinishReason.CANCELLED:
            assert rid in aborted
            continue
        tenant, p = reqs[rid][:2]
        want = ref[rid]["tokens"][: sched.max_len(tenant) - len(p)]  # a share caps the length
        assert t.tokens.get(rid, []) == want and reason is FinishReason.LENGTH
