"""Weighted fair share between tenants in the scheduler, KV shares and FIFO mode, step by step
with the fake paged model.

Service is measured from the scheduled batches themselves, in the fair-share counter's units:
prefill tokens + DECODE_WEIGHT * decode tokens (a generated token costs twice a prompt token).

The bound under test. Let S_t(window) be tenant t's service in a window of steps, w_t its weight.
While two tenants both have requests waiting, the scheduler hands each prompt chunk and each free
running slot to the one with the smaller counter (counter = service / weight); the other still
gets the decodes of the sequences it already runs. So the counter of the tenant ahead can grow
past the other's by at most one chunk plus what its running sequences may still need before their
slots go to the other: D = (B + S * (P + DECODE_WEIGHT * M)) / min(w), B the per-step budget,
S max_num_seqs, P the longest prompt, M max_tokens; over ANY window |S_a / w_a - S_b / w_b| <= 2 * D.
(A loose bound: in practice the counters stay within a few chunks, which the tests check too.)
"""

from __future__ import annotations

import random
from collections import defaultdict
from itertools import accumulate

import pytest
from fake_runner import VOCAB, make_engine, random_budget, run_all

from tinyserve.engine import FinishReason, SamplingParams, StoppingParams
from tinyserve.engine.fair import DECODE_WEIGHT, PREFILL_WEIGHT
from tinyserve.engine.scheduler import kv_share_blocks

G = SamplingParams(temperature=0.0)


def record_service(engine) -> list[dict[str, list[int]]]:
    """Wrap the scheduler: log, per step, {tenant: [prefill_tokens, decode_tokens, num_seqs]}."""
    log: list[dict[str, list[int]]] = []
    sched = engine.scheduler
    schedule = sched.schedule

    def recording():
        batch = schedule()
        step: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for seq, n in batch.scheduled:
            step[seq.tenant][1 if seq.is_decoding else 0] += n
            step[seq.tenant][2] += 1
        log.append(dict(step))
        return batch

    sched.schedule = recording
    return log


def service(log, tenant) -> list[float]:
    return [PREFILL_WEIGHT * s.get(tenant, [0, 0])[0] + DECODE_WEIGHT * s.get(tenant, [0, 0])[1] for s in log]


class Load:
    """Keeps `outstanding[t]` requests of each tenant in the engine: a new one as one finishes.
    `prompt_len` and `max_tokens` are (lo, hi) ranges, or dicts of them per tenant."""

    def __init__(self, engine, outstanding: dict[str, int], prompt_len=(8, 30), max_tokens=(3, 10), seed=0):
        self.engine = engine
        self.outstanding = dict(outstanding)
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.rnd = random.Random(seed)
        self.live: dict[str, set[str]] = {t: set() for t in outstanding}
        self.n = 0
        self.first_token: dict[str, int] = {}  # request id -> step of its first token
        self.steps = 0

    def add(self, tenant: str, prompt_len: int | None = None, max_tokens: int | None = None) -> str:
        rid = f"{tenant}{self.n}"
        self.n += 1
        pick = lambda r: self.rnd.randint(*(r[tenant] if isinstance(r, dict) else r))  # noqa: E731
        p = prompt_len or pick(self.prompt_len)
        m = max_tokens or pick(self.max_tokens)
        self.engine.add_request(
            rid, [self.rnd.randrange(VOCAB - 1) for _ in range(p)], G, StoppingParams(max_tokens=m), tenant=tenant
        )
        self.live.setdefault(tenant, set()).add(rid)
        return rid

    def step(self) -> None:
        for t, k in self.outstanding.items():
            while len(self.live[t]) < k:
                self.add(t)
        for o in self.engine.step():
            if o.new_token_ids:
                self.first_token.setdefault(o.request_id, self.steps)
            if o.finished:
                assert o.finish_reason is FinishReason.LENGTH, o
                for live in self.live.values():
                    live.discard(o.request_id)
        self.steps += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


def bound(budget, max_num_seqs, max_prompt, max_tokens, min_weight=1.0) -> float:
    return (budget + max_num_seqs * (max_prompt * PREFILL_WEIGHT + max_tokens * DECODE_WEIGHT)) / min_weight


def worst_gap(sa: list[float], sb: list[float], wa: float, wb: float, min_len: int = 1) -> float:
    """max over windows [i, j) of |sa/wa - sb/wb|."""
    pa, pb = [0.0, *accumulate(sa)], [0.0, *accumulate(sb)]
    d = [x / wa - y / wb for x, y in zip(pa, pb)]
    n = len(sa)
    return max(abs(d[j] - d[i]) for i in range(n) for j in range(i + min_len, n + 1))


def window_ratios(sa, sb, min_len: int) -> tuple[float, float]:
    """(min, max) over windows of >= min_len steps of sum(sb) / sum(sa)."""
    pa, pb = [0.0, *accumulate(sa)], [0.0, *accumulate(sb)]
    n = len(sa)
    r = [(pb[j] - pb[i]) / (pa[j] - pa[i]) for i in range(n) for j in range(i + min_len, n + 1)]
    return min(r), max(r)


# -- weighted share ------------------------------------------------------------------------------
def test_weights_1_and_3_split_service_1_to_3_within_the_bound():
    B, S = 24, 12
    engine, _ = make_engine(
        num_blocks=512, max_num_batched_tokens=B, max_num_seqs=S, tenant_weight={"a": 1.0, "b": 3.0}.__getitem__
    )
    log = record_service(engine)
    load = Load(engine, {"a": 8, "b": 8}, prompt_len=(8, 30), max_tokens=(3, 10))
    load.run(800)
    sa, sb = service(log, "a")[50:], service(log, "b")[50:]  # (both busy from step 0; skip the start)
    D = bound(B, S, 30, 10)
    gap = worst_gap(sa, sb, 1.0, 3.0)
    assert gap <= 2 * D
    # the bound alone makes the split 1:3 within 25% over any window of >= 400 steps (~13000
    # units); in practice the counters stay within a few chunks: 10% over >= 100 steps
    lo, hi = window_ratios(sa, sb, 400)
    assert 3 * 0.75 <= lo <= hi <= 3 * 1.25, (lo, hi)
    lo, hi = window_ratios(sa, sb, 100)
    assert 3 * 0.9 <= lo <= hi <= 3 * 1.1, (lo, hi)
    assert 2.9 <= sum(sb) / sum(sa) <= 3.1  # and over the whole run, closely
    # work conserving: every step is full
    assert all(sum(x[0] + x[1] for x in s.values()) == B for s in log[50:])


def test_equal_weights_split_evenly_and_fifo_does_not():
    def run(scheduling):
        engine, _ = make_engine(num_blocks=512, max_num_batched_tokens=16, max_num_seqs=4, scheduling=scheduling)
        log = record_service(engine)
        # a's requests are long (big prompts), b's short: FIFO serves per request, not per tenant
        Load(
            engine, {"a": 6, "b": 6}, prompt_len={"a": (40, 60), "b": (3, 6)}, max_tokens={"a": (8, 10), "b": (2, 3)}
        ).run(700)
        return sum(service(log, "a")[100:]), sum(service(log, "b")[100:])

    a, b = run("fair")
    assert 0.9 <= b / a <= 1.1
    a, b = run("fifo")
    assert b / a < 0.5  # per request: b's short requests get a small part


# -- arrivals and idling -------------------------------------------------------------------------
def test_late_tenant_is_served_in_the_next_step_and_not_starved():
    B = 16
    engine, _ = make_engine(num_blocks=512, max_num_batched_tokens=B, max_num_seqs=8)
    log = record_service(engine)
    load = Load(engine, {"a": 8}, prompt_len=(40, 60), max_tokens=(6, 10))
    load.run(400)  # a alone, for long: a huge counter; it has prefills in progress
    assert any(s.tenant == "a" and not s.is_decoding for s in engine.scheduler.running)
    rid = load.add("b", prompt_len=6, max_tokens=4)
    n0 = len(log)
    load.step()
    # b's whole short prompt went into the very next step, b's own: none of a's decodes or prompt
    # chunks (they resume in the step after)
    assert log[n0] == {"b": [6, 0, 1]}
    assert load.first_token[rid] == load.steps - 1
    load.step()
    assert log[n0 + 1]["a"][0] > 0 and log[n0 + 1]["a"][1] > 0
    # from now on b keeps 4 requests going: it gets half, not nothing (a's head start does not
    # count against it) and not everything (it banked nothing while absent)
    load.outstanding["b"] = 4
    load.run(400)
    sa, sb = service(log, "a")[n0:], service(log, "b")[n0:]
    D = bound(B, 8, 60, 10)
    assert worst_gap(sa, sb, 1.0, 1.0) <= 2 * D
    assert 0.8 <= sum(sb) / sum(sa) <= 1.25


def test_idle_tenant_banks_no_credit():
    B = 16
    engine, _ = make_engine(num_blocks=512, max_num_batched_tokens=B, max_num_seqs=8)
    log = record_service(engine)
    load = Load(engine, {"a": 6, "b": 6})
    load.run(100)
    load.outstanding["b"] = 0  # b goes idle; a is served alone for 400 steps
    load.run(400)
    assert not load.live["b"] and "b" not in engine.scheduler.policy.busy
    n0 = len(log)
    load.outstanding["b"] = 6  # b comes back
    load.run(300)
    sa, sb = service(log, "a")[n0:], service(log, "b")[n0:]
    # without the lift b would have had ~400 steps of a's service in hand and starved a
    D = bound(B, 8, 30, 10)
    assert worst_gap(sa, sb, 1.0, 1.0) <= 2 * D
    assert sum(sa[:100]) >= 0.3 * sum(sb[:100] + sa[:100])  # a keeps its half at once
    assert 0.8 <= sum(sb) / sum(sa) <= 1.25


def test_lone_tenant_uses_the_whole_budget():
    for weights in (None, {"a": 0.25}.__getitem__):
        engine, _ = make_engine(num_blocks=512, max_num_batched_tokens=20, max_num_seqs=16, tenant_weight=weights)
        log = record_service(engine)
        Load(engine, {"a": 10}, prompt_len=(5, 40)).run(300)
        assert all(s["a"][0] + s["a"][1] == 20 for s in log)


def test_light_tenant_leaves_the_rest_to_the_heavy_one():
    engine, _ = make_engine(
        num_blocks=512, max_num_batched_tokens=20, max_num_seqs=16, tenant_weight={"a": 1.0, "b": 100.0}.__getitem__
    )
    log = record_service(engine)
    Load(engine, {"a": 10, "b": 1}, prompt_len=(5, 12), max_tokens=(2, 4)).run(300)
    assert all(sum(x[0] + x[1] for x in s.values()) == 20 for s in log)  # work conserving
    a, b = sum(service(log, "a")), sum(service(log, "b"))
    assert a > b > 0  # b, for all its weight, has one request at a time: a gets the rest


# -- FIFO mode -----------------------------------------------------------------------------------
def _workload(engine, tenants):
    rnd = random.Random(3)
    for i in range(40):
        engine.add_request(
            f"r{i}",
            [rnd.randrange(VOCAB - 1) for _ in range(rnd.randrange(1, 40))],
            G,
            StoppingParams(max_tokens=rnd.randrange(1, 12)),
            tenant=tenants[i % len(tenants)],
        )
        if i % 4 == 3:
            engine.step()


@pytest.mark.parametrize("num_blocks", [14, 40, 512])
def test_fifo_ignores_tenants(num_blocks):
    """FIFO with three tenants schedules exactly what one tenant would (the pre-fair-share
    scheduler: arrival order, preempt the newest)."""

    def trace(scheduling, tenants):
        engine, _ = make_engine(
            num_blocks=num_blocks,
            max_num_batched_tokens=16,
            max_num_seqs=5,
            scheduling=scheduling,
            tenant_weight={"x": 1, "y": 5, "z": 2}.get,
        )
        steps = []
        sched = engine.scheduler
        schedule = sched.schedule
        sched.schedule = lambda: steps.append(b := schedule()) or b
        _workload(engine, tenants)
        res = run_all(engine)
        return (
            [[(s.request_id, n) for s, n in b.scheduled] for b in steps],
            {k: v["tokens"] for k, v in res.items()},
            engine.num_preemptions,
        )

    fifo = trace("fifo", ["x", "y", "z"])
    assert fifo == trace("fair", ["solo"])
    assert fifo == trace("fifo", ["solo"])
    assert fifo != trace("fair", ["x", "y", "z"])


def test_fifo_short_request_waits_behind_long_prompts_fair_does_not():
    def first_token_step(scheduling):
        engine, _ = make_engine(num_blocks=512, max_num_batched_tokens=16, scheduling=scheduling)
        load = Load(engine, {"a": 0})
        for _ in range(5):
            load.add("a", prompt_len=100, max_tokens=4)
        load.step()
        rid = load.add("b", prompt_len=5, max_tokens=2)
        start = load.steps
        while rid not in load.first_token:
            load.step()
        return load.first_token[rid] - start

    assert first_token_step("fair") == 0
    assert first_token_step("fifo") >= 500 // 16


# -- KV shares -----------------------------------------------------------------------------------
def test_kv_share_blocks_rounds_the_exact_share_down():
    """kv_share_blocks(k/100, n) is floor(k * n / 100) computed exactly (at least 1): float
    products such as 0.29 * 100 = 28.999... must not lose a block."""
    for k in range(1, 101):
        for n in range(1, 301):
            assert kv_share_blocks(k / 100, n) == max(1, k * n // 100), (k, n)
    assert kv_share_blocks(0.29, 100) == 29 and kv_share_blocks(0.5, 1) == 1
    for no_cap in (0.0, -0.5, 1.5, float("nan")):
        assert kv_share_blocks(no_cap, 40) == 40


def test_kv_share_caps_a_tenants_blocks():
    engine, _ = make_engine(
        num_blocks=40,
        block_size=4,
        max_num_batched_tokens=24,
        max_num_seqs=12,
        tenant_kv_share={"a": 0.25, "b": 1.0}.__getitem__,
    )
    bm = engine.scheduler.block_manager
    load = Load(engine, {"a": 6, "b": 2}, prompt_len=(6, 20), max_tokens=(4, 12))
    held = []
    for _ in range(400):
        load.step()
        held.append((bm.num_held("a"), bm.num_held("b")))
        assert bm.num_held("a") + bm.num_held("b") == bm.num_used_blocks
        assert engine.stats().kv_blocks_by_tenant == {t: n for t, n in zip("ab", held[-1]) if n}
    assert max(a for a, _ in held) == 10  # a uses its share, never more
    assert max(b for _, b in held) > 10  # b is not capped
    done = [rid for rid in load.first_token if all(rid not in v for v in load.live.values())]
    assert sum(r[0] == "a" for r in done) > 40 and sum(r[0] == "b" for r in done) > 20  # nobody stuck


def test_kv_share_limits_length_and_rejects_what_cannot_fit():
    engine, _ = make_engine(num_blocks=40, block_size=4, tenant_kv_share={"a": 0.25, "b": 1.0}.get)
    assert engine.max_len("a") == 40 and engine.max_len("b") == 160  # the servicer asks this
    engine.add_request("long", list(range(1, 30)), G, StoppingParams(max_tokens=100), tenant="a")
    engine.add_request("huge", list(range(1, 50)), G, StoppingParams(max_tokens=5), tenant="a")
    engine.add_request("b", list(range(1, 50)), G, StoppingParams(max_tokens=5), tenant="b")
    outs = {}
    for _ in range(200):
        for o in engine.step():
            outs[o.request_id] = o
        if not engine.has_unfinished_requests():
            break
    assert outs["long"].finish_reason is FinishReason.LENGTH and outs["long"].num_output_tokens == 11
    assert outs["huge"].finish_reason is FinishReason.ERROR and "kv_share" in outs["huge"].error
    assert outs["b"].finish_reason is FinishReason.LENGTH and outs["b"].num_output_tokens == 5
    assert engine.stats().kv_blocks_used == 0


def test_kv_share_over_the_cap_preempts_the_tenants_own_newest():
    engine, _ = make_engine(
        num_blocks=40, block_size=4, max_num_batched_tokens=64, tenant_kv_share={"a": 0.25, "b": 1.0}.get
    )
    for i in range(3):  # 3 x (8 + up to 12) tokens: 3 x 5 blocks > a's 10
        engine.add_request(f"a{i}", list(range(1 + i, 9 + i)), G, StoppingParams(max_tokens=12), tenant="a")
    engine.add_request("b0", list(range(2, 30)), G, StoppingParams(max_tokens=12), tenant="b")
    sched = engine.scheduler
    preempted = []
    schedule = sched.schedule
    sched.schedule = lambda: (b := schedule(), preempted.extend(s.request_id for s in b.preempted))[0]
    res = run_all(engine)
    assert preempted and set(preempted) <= {"a1", "a2"}  # a's own, never b's, never its oldest
    assert all(len(r["tokens"]) == 12 for r in res.values())


@pytest.mark.parametrize("seed", range(8))
def test_random_multi_tenant_workloads_end_and_match(seed):
    """Random tenants, weights, shares, sizes, arrivals and aborts, fair and fifo: every request
    ends, no tenant ever holds more than its share, the survivors' tokens equal an unconstrained
    engine's, and every block comes back."""
    rnd = random.Random(seed)
    tenants = {t: (rnd.choice([0.5, 1.0, 3.0]), rnd.choice([0.3, 0.5, 1.0])) for t in "xyz"}
    engine, _ = make_engine(
        **random_budget(rnd),
        scheduling=rnd.choice(["fair", "fair", "fifo"]),
        tenant_weight=lambda t: tenants[t][0],
        tenant_kv_share=lambda t: tenants[t][1],
    )
    sched, bm = engine.scheduler, engine.scheduler.block_manager
    reqs = {}
    for i in range(36):
        t = rnd.choice("xyz")
        n = rnd.randrange(1, min(30, sched.max_len(t)))
        reqs[f"r{i}"] = (t, [rnd.randrange(VOCAB - 1) for _ in range(n)], rnd.randrange(1, 15))
    pending = list(reqs)
    finished = {}
    for _ in range(20_000):
        if pending and rnd.random() < 0.5:
            rid = pending.pop(0)
            t, p, mt = reqs[rid]
            engine.add_request(rid, p, G, StoppingParams(max_tokens=mt), tenant=t)
        if rnd.random() < 0.03:
            engine.abort_request(rnd.choice(list(reqs)))
        for o in engine.step():
            finished.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id].append(o.finish_reason)
        for t in "xyz":
            assert bm.num_held(t) <= sched.kv_cap(t)
        if not pending and not engine.has_unfinished_requests():
            break
    assert set(finished) == set(reqs) and engine.stats().kv_blocks_used == 0
    assert bm.num_held_by == {}
    ref_engine, _ = make_engine(num_blocks=2048, block_size=4, enable_prefix_caching=False)
    for rid, (t, p, mt) in reqs.items():
        ref_engine.add_request(rid, p, G, StoppingParams(max_tokens=mt), tenant=t)
    ref = run_all(ref_engine)
    for rid, got in finished.items():
        if got[-1] is FinishReason.CANCELLED:
            continue
        t = reqs[rid][0]
        want = ref[rid]["tokens"][: sched.max_len(t) - len(reqs[rid][1])]  # a share caps the length
        assert got[:-1] == want and got[-1] is FinishReason.LENGTH


# -- prefix-cache isolation ----------------------------------------------------------------------
def test_tenant_never_reuses_another_tenants_blocks():
    engine, runner = make_engine(num_blocks=64, block_size=4)
    prompt = [(5 * i + 2) % (VOCAB - 1) for i in range(25)]  # 6 full reusable blocks
    cached = {}
    tables = {}
    schedule = engine.scheduler.schedule

    def recording():
        b = schedule()
        for s, _ in b.scheduled:
            tables.setdefault(s.request_id, set()).update(s.block_table)
        return b

    engine.scheduler.schedule = recording

    def run(rid, tenant):
        engine.add_request(rid, prompt, G, StoppingParams(max_tokens=5), tenant=tenant)
        fed = sum(sum(c["seq_lens"]) for c in runner.calls)
        res = run_all(engine, on_step=lambda _, outs: cached.update({o.request_id: o.num_cached_tokens for o in outs}))
        return res[rid]["tokens"], sum(sum(c["seq_lens"]) for c in runner.calls) - fed

    a1, fed_a1 = run("a1", "alice")
    b1, fed_b1 = run("b1", "bob")  # identical prompt, other tenant: computes everything
    a2, fed_a2 = run("a2", "alice")  # alice's blocks survived bob's run
    b2, fed_b2 = run("b2", "bob")  # bob reuses his own
    assert a1 == b1 == a2 == b2
    assert (cached["a1"], cached["b1"], cached["a2"], cached["b2"]) == (0, 0, 24, 24)
    assert fed_a1 == fed_b1 == 25 + 4 and fed_a2 == fed_b2 == 1 + 4
    assert not tables["b1"] & tables["a1"] and not tables["b2"] & tables["a2"]
    assert tables["a2"] & tables["a1"] and tables["b2"] & tables["b1"]


@pytest.mark.parametrize("scheduling, victim", [("fair", "a1"), ("fifo", "b1")])
def test_preemption_victim_is_the_tenant_furthest_above_its_share(scheduling, victim):
    # 6 blocks of 4; "old" (8 tokens) needs a 3rd block for its first decode and none is free:
    # fair preempts the newest of tenant a (far above its share: weight 1 vs 100), fifo the newest
    engine, _ = make_engine(
        num_blocks=6,
        block_size=4,
        max_num_batched_tokens=64,
        scheduling=scheduling,
        tenant_weight={"a": 1.0, "b": 100.0}.__getitem__,
    )
    for rid, tenant, n in (("old", "a", 8), ("a1", "a", 7), ("b1", "b", 7)):
        engine.add_request(rid, list(range(1, n + 1)), G, StoppingParams(max_tokens=6), tenant=tenant)
    preempted = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: (b := schedule(), preempted.extend(s.request_id for s in b.preempted))[0]
    engine.step()
    engine.step()
    assert preempted == [victim]
    res = run_all(engine)
    assert all(r["num_output_tokens"] == 6 for r in res.values()) and len(res) == 3
