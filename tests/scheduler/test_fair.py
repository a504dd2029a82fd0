"""Weighted fair share (virtual token counters), by deterministic simulation of a scheduler loop:
every step hands out BUDGET tokens in chunks of at most CHUNK, each chunk to order()[0], and
charges it. Tenants with work always want more (always busy) unless the scenario idles them.

Bound under test (fair.py): the counters of two busy tenants never differ by more than
D = CHUNK / min(weight), so over any window |served_a / w_a - served_b / w_b| <= 2 * D.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import pytest

from tinyserve.engine.fair import DECODE_WEIGHT, PREFILL_WEIGHT, FairShare, FifoPolicy, make_policy

BUDGET = 256
CHUNK = 64


def simulate(policy, has_work: dict[str, Callable[[int], bool]], steps: int) -> dict[str, list[int]]:
    """Tokens served per tenant per step."""
    served = {t: [0] * steps for t in has_work}
    for step in range(steps):
        busy = [t for t, f in has_work.items() if f(step)]
        policy.set_busy(busy)
        left = BUDGET
        while left and busy:
            t = policy.order(busy)[0]
            n = min(CHUNK, left)
            policy.charge(t, n, 0)
            served[t][step] += n
            left -= n
    return served


def always(step: int) -> bool:
    return True


def window_sums(xs: list[int]) -> Callable[[int, int], int]:
    pre = [0, *accumulate(xs)]
    return lambda i, j: pre[j] - pre[i]


def worst_window_gap(served_a, served_b, w_a, w_b, start=0, min_len=1) -> float:
    """max over windows [i, j) within [start, end) of |a/w_a - b/w_b|."""
    sa, sb = window_sums(served_a), window_sums(served_b)
    n = len(served_a)
    return max(abs(sa(i, j) / w_a - sb(i, j) / w_b) for i in range(start, n) for j in range(i + min_len, n + 1))


def test_weights_1_and_3_split_1_to_3_within_the_bound():
    policy = FairShare({"a": 1.0, "b": 3.0})
    served = simulate(policy, {"a": always, "b": always}, 300)
    bound = 2 * CHUNK / 1.0
    assert worst_window_gap(served["a"], served["b"], 1.0, 3.0) <= bound
    # so over any window of >= 50 steps the split is 1:3 within 5%: |a - 64 L| <= 96 tokens
    sa, sb = window_sums(served["a"]), window_sums(served["b"])
    for i in range(0, 300):
        for j in range(i + 50, 301):
            assert 2.85 <= sb(i, j) / sa(i, j) <= 3.15
    assert sum(served["a"]) + sum(served["b"]) == 300 * BUDGET  # work conserving


def test_weights_follow_a_callable():
    weights = {"a": 1.0, "b": 1.0}
    policy = FairShare(lambda t: weights[t])
    served = simulate(policy, {"a": always, "b": always}, 100)
    assert abs(sum(served["a"]) - sum(served["b"])) <= 2 * CHUNK
    weights["b"] = 3.0  # a reload
    later = simulate(policy, {"a": always, "b": always}, 100)
    # the counters are within CHUNK of each other when the weights change: the bound still holds
    assert worst_window_gap(later["a"], later["b"], 1.0, 3.0) <= 2 * CHUNK
    assert 2.5 <= sum(later["b"]) / sum(later["a"]) <= 3.5


def test_lone_tenant_gets_the_whole_budget():
    policy = FairShare({"a": 0.5, "b": 8.0})
    served = simulate(policy, {"a": always, "b": lambda s: False}, 50)
    assert served["a"] == [BUDGET] * 50 and served["b"] == [0] * 50


def test_late_arriver_is_served_at_once_and_shares_fairly():
    policy = FairShare()
    arrive = 300
    served = simulate(policy, {"a": always, "b": lambda s: s >= arrive}, 500)
    assert served["b"][arrive] > 0  # served in its first step
    # from then on, equal weights share equally (within the bound), in every window
    assert worst_window_gap(served["a"], served["b"], 1, 1, start=arrive) <= 2 * CHUNK
    # and the long-busy tenant is not starved by the newcomer either: half each, from the start
    half = 100 * BUDGET // 2
    assert abs(sum(served["a"][arrive : arrive + 100]) - half) <= CHUNK


def test_late_arriver_gets_the_first_chunk():
    policy = FairShare()
    policy.set_busy(["a"])
    for _ in range(100):
        policy.charge("a", CHUNK)
    policy.set_busy(["a", "b"])
    assert policy.order(["a", "b"])[0] == "b"
    assert policy.counter("b") == policy.counter("a")  # lifted, not left at zero


def test_fifo_starves_the_late_arriver_where_fair_share_does_not():
    arrive = 100
    scenario = {"a": always, "b": lambda s: s >= arrive}
    fifo = simulate(FifoPolicy(), scenario, 200)
    fair = simulate(FairShare(), scenario, 200)
    assert sum(fifo["b"]) == 0
    assert sum(fair["b"]) >= 100 * BUDGET // 2 - 2 * CHUNK


class NoLift(FairShare):
    """A broken variant: idle tenants keep their old counter (bank credit)."""

    def on_active(self, tenant):
        self.counters.setdefault(tenant, 0.0)
        self.busy.add(tenant)


@pytest.mark.parametrize("policy_cls,banks", [(FairShare, False), (NoLift, True)])
def test_idle_tenant_does_not_bank_credit(policy_cls, banks):
    # both busy for 100 steps, b idle for 300, both busy again for 100
    scenario = {"a": always, "b": lambda s: s < 100 or s >= 400}
    served = simulate(policy_cls(), scenario, 500)
    gap = worst_window_gap(served["a"], served["b"], 1, 1, start=400)
    if banks:  # the check below can fail: without the lift b takes everything for a long time
        assert gap > 100 * CHUNK and served["a"][400:450] == [0] * 50
    else:
        assert gap <= 2 * CHUNK
        assert served["b"][400] > 0 and sum(served["a"][400:]) >= 100 * BUDGET // 2 - 2 * CHUNK


def test_all_idle_then_a_newcomer_starts_at_the_floor():
    policy = FairShare()
    simulate(policy, {"a": lambda s: s < 200}, 300)  # a busy, then everyone idle
    high = policy.counter("a")
    assert high == 200 * BUDGET
    policy.set_busy(["new"])  # nobody busy: lifted to the floor
    assert policy.counter("new") == high
    policy.set_busy(["new", "a"])
    served = simulate(policy, {"a": always, "new": always}, 100)
    assert abs(sum(served["a"]) - sum(served["new"])) <= 2 * CHUNK


def test_charge_weights_prefill_and_decode():
    policy = FairShare({"w2": 2.0})
    policy.charge("x", prefill_tokens=10, decode_tokens=5)
    assert policy.counter("x") == PREFILL_WEIGHT * 10 + DECODE_WEIGHT * 5
    policy.charge("w2", 10, 5)
    assert policy.counter("w2") == (PREFILL_WEIGHT * 10 + DECODE_WEIGHT * 5) / 2 + policy.counter(
        "x"
    )  # w2 started idle: lifted to x's counter first
    custom = FairShare(prefill_weight=1.0, decode_weight=4.0)
    custom.charge("t", 1, 1)
    assert custom.counter("t") == 5.0


def test_order_ties_go_to_the_least_recently_served_then_name():
    policy = FairShare()
    assert policy.order(["b", "a", "c"]) == ["a", "b", "c"]
    policy.charge("a", 0)  # a served most recently at equal counters
    assert policy.order(["a", "b"]) == ["b", "a"]
    assert policy.pick([]) is None and policy.pick(["a", "b"]) == "b"
    assert policy.order(["a", "a"]) == ["a"]


def test_order_requests_interleaves_by_weight_and_keeps_each_tenants_order():
    policy = FairShare({"a": 1.0, "b": 3.0})
    reqs = [("a", i) for i in range(4)] + [("b", i) for i in range(8)]
    ordered = policy.order_requests(reqs, tenant_of=lambda r: r[0], cost_of=lambda r: 100)
    assert sorted(ordered) == sorted(reqs)
    assert [r for r in ordered if r[0] == "a"] == [("a", i) for i in range(4)]
    assert [r for r in ordered if r[0] == "b"] == [("b", i) for i in range(8)]
    # b is admitted 3 times per a while both have requests left
    first8 = [t for t, _ in ordered[:8]]
    assert first8.count("b") == 6 and first8.count("a") == 2
    assert policy.counter("a") == policy.counter("b") == 0.0  # projection charges nothing
    assert FifoPolicy().order_requests(reqs, tenant_of=lambda r: r[0]) == reqs


def test_fifo_policy_interface():
    fifo = FifoPolicy()
    assert fifo.order(["b", "a", "b"]) == ["b", "a"] and fifo.pick(["b", "a"]) == "b"
    fifo.charge("a", 10, 2)
    assert fifo.counter("a") == 12


def test_forget_and_make_policy():
    policy = make_policy("fair", {"a": 2.0})
    assert isinstance(policy, FairShare) and policy.weight("a") == 2.0 and policy.weight("z") == 1.0
    policy.charge("a", 10)
    policy.forget("a")  # busy: kept
    assert policy.counter("a") == 5.0
    policy.set_busy([])
    policy.forget("a")
    assert "a" not in policy.counters
    assert isinstance(make_policy("fifo"), FifoPolicy)
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        make_policy("lottery")


def test_interleave_sees_charges_made_between_picks():
    policy = FairShare()
    policy.set_busy(["a"])
    policy.charge("a", 1000)  # a has been busy for a while
    cands = [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]
    picked = []
    for t, i in policy.interleave(cands, tenant_of=lambda c: c[0]):
        picked.append((t, i))
        policy.charge(t, 100 if t == "a" else 30)  # the caller charges what it scheduled
    # b (newcomer, lifted to a's 1000) wins the tie -> b 1030; a (1000) -> 1100; b (1030) again;
    # then only a is left
    assert picked == [("b", 1), ("a", 1), ("b", 2), ("a", 2), ("a", 3)]
    assert [c for c in picked if c[0] == "a"] == [("a", 1), ("a", 2), ("a", 3)]


def test_interleave_without_charges_and_fifo():
    policy = FairShare({"a": 1.0, "b": 1.0})
    cands = ["a1", "b1", "a2"]
    # nothing charged between picks: the least-served tenant keeps the lead until it runs out
    assert list(policy.interleave(cands, tenant_of=lambda c: c[0])) == ["a1", "a2", "b1"]
    assert list(FifoPolicy().interleave(cands, tenant_of=lambda c: c[0])) == cands
