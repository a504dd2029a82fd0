"""The per-step token budget follows who is there (scheduler.py, "Budget"): long steps for a lone
tenant, short ones while another tenant is around (the shortest while one of them is idle and
may come back), and a newcomer's prompt in the next step, alone.
Driven step by step with the fake model; steps are counted, nothing is timed."""

from __future__ import annotations

import pytest
from fake_runner import make_engine, prompt

from tinyserve.engine import ParamError, SamplingParams, StoppingParams
from tinyserve.engine.params import EngineConfig

G = SamplingParams(temperature=0.0)
BIG, SHORT, IDLE, WINDOW = 256, 32, 20, 20


def engine_(**kw):
    cfg = dict(
        num_blocks=2048,
        block_size=4,
        max_num_batched_tokens=BIG,
        contended_step_tokens=SHORT,
        idle_step_tokens=IDLE,
        contended_window_steps=WINDOW,
        max_num_seqs=64,
    )
    cfg.update(kw)
    return make_engine(**cfg)


def add(engine, rid, n, tenant, max_tokens=1000, salt=0):
    engine.add_request(rid, prompt(n, salt), G, StoppingParams(max_tokens=max_tokens, ignore_eos=True), tenant=tenant)


def tokens_of(runner) -> int:
    return sum(runner.calls[-1]["seq_lens"])


def flood(engine, n_streams=8, prompt_len=600):
    """Tenant a: n_streams long generations, then a long prompt waiting behind them."""
    for i in range(n_streams):
        add(engine, f"a{i}", 3, "a", salt=i)
    engine.step()  # their prompts (24 tokens)
    add(engine, "a-long", prompt_len, "a", salt=99)


def test_a_lone_tenant_gets_the_long_steps():
    engine, runner = engine_()
    flood(engine)
    for _ in range(2):
        engine.step()
        # 8 decodes + the rest of the budget in a's long prompt
        assert engine.stats().last_decode_tokens == 8 and tokens_of(runner) == BIG
        assert not engine.scheduler.contended


def test_a_newcomer_gets_its_first_token_in_the_next_step_and_the_steps_stay_short():
    engine, runner = engine_()
    flood(engine, prompt_len=2000)
    engine.step()  # the step in flight when b arrives: a long one
    assert tokens_of(runner) == BIG
    add(engine, "b0", 20, "b", max_tokens=1)
    outs = {o.request_id: o for o in engine.step()}
    assert outs["b0"].new_token_ids and outs["b0"].finished  # first token: the next step
    assert engine.stats().last_prefill_tokens == 20  # b's prompt, none of a's
    assert engine.stats().last_decode_tokens == 0  # nor a's decodes: b's own step
    # b has nothing now, but was just busy: a's steps are the shortest for the whole window
    for _ in range(WINDOW - 1):
        engine.step()
        assert engine.scheduler.contended and engine.scheduler.watching
        assert engine.stats().last_decode_tokens == 8
        assert engine.stats().last_prefill_tokens == IDLE - 8
    # b quiet for a whole window: a has the long steps back
    engine.step()
    assert not engine.scheduler.contended and tokens_of(runner) == BIG


def test_a_newcomer_arriving_during_short_steps_waits_one_short_step():
    engine, runner = engine_()
    flood(engine, prompt_len=2000)
    add(engine, "b0", 10, "b", max_tokens=1)
    engine.step()
    for i in range(1, 6):  # b: one request at a time, a few steps apart
        for _ in range(3):
            engine.step()
            assert tokens_of(runner) <= IDLE  # what the next request of b waits for
        add(engine, f"b{i}", 10 + i, "b", max_tokens=1, salt=i)
        outs = {o.request_id: o for o in engine.step()}
        assert outs[f"b{i}"].new_token_ids, "b's first token came one step after it arrived"
        assert engine.stats().last_prefill_tokens == 10 + i


def test_a_newcomer_with_a_long_prompt_takes_the_remaining_budget_at_once():
    engine, runner = engine_()
    flood(engine)
    engine.step()
    add(engine, "b0", 200, "b", max_tokens=1)
    outs = {o.request_id: o for o in engine.step()}
    assert outs["b0"].new_token_ids  # 200 <= BIG - 8 decodes: one step
    assert engine.stats().last_prefill_tokens == 200


def test_prompts_still_advance_when_the_decodes_fill_the_short_budget():
    engine, runner = engine_()
    flood(engine, n_streams=40, prompt_len=100)  # 40 decodes > SHORT
    add(engine, "b0", 5, "b", max_tokens=1)
    engine.step()
    engine.step()
    assert engine.scheduler.contended
    assert engine.stats().last_decode_tokens == 40  # every decode runs
    assert engine.stats().last_prefill_tokens == IDLE // 4  # and a's prompt moves


def test_the_long_budget_caps_the_short_one():
    engine, runner = engine_(max_num_batched_tokens=16, contended_step_tokens=64)
    flood(engine, n_streams=4)
    add(engine, "b0", 5, "b", max_tokens=1)
    for _ in range(4):
        engine.step()
        assert tokens_of(runner) <= 16


def test_steps_are_shortest_while_a_tenant_that_was_busy_has_no_work():
    engine, runner = engine_()
    flood(engine, prompt_len=2000)
    engine.step()
    add(engine, "b0", 10, "b", max_tokens=6)
    engine.step()  # b's prompt, alone
    for _ in range(5):  # b decodes beside a: everyone has work, the contended budget
        engine.step()
        assert not engine.scheduler.watching and tokens_of(runner) == SHORT
    assert not any(s.tenant == "b" for s in engine.scheduler.running)  # b is done
    for _ in range(3):  # b has nothing: its next request waits for these steps
        engine.step()
        assert engine.scheduler.watching and tokens_of(runner) == IDLE
    add(engine, "c0", 10, "c", max_tokens=100)  # another tenant keeps one request going
    engine.step()
    for _ in range(3):  # b still idle: the idle budget, with c decoding too
        engine.step()
        assert engine.scheduler.watching and tokens_of(runner) == IDLE
    for _ in range(WINDOW):  # b gone for a window: a and c both have work, the contended budget
        engine.step()
    assert engine.scheduler.contended and not engine.scheduler.watching and tokens_of(runner) == SHORT


@pytest.mark.parametrize("field", ["contended_step_tokens", "idle_step_tokens", "contended_window_steps"])
def test_budget_settings_are_checked(field):
    with pytest.raises(ParamError, match=field):
        EngineConfig(**{field: 0}).validate()


# -- a fresh tenant's own step ----------------------------------------------------------------------
def batches(engine) -> list[tuple[bool, dict[str, list[int]]]]:
    """Wrap the scheduler: from now on, every step's (solo, {tenant: [prompt, decode tokens]})."""
    log: list[tuple[bool, dict[str, list[int]]]] = []
    schedule = engine.scheduler.schedule

    def recording():
        batch = schedule()
        tenants: dict[str, list[int]] = {}
        for seq, n in batch.scheduled:
            tenants.setdefault(seq.tenant, [0, 0])[1 if seq.is_decoding else 0] += n
        log.append((batch.solo, tenants))
        return batch

    engine.scheduler.schedule = recording
    return log


def flooded():
    """An engine with a's flood running (one step in), and the log of its steps (batches())."""
    engine, runner = engine_()
    log = batches(engine)
    flood(engine, prompt_len=2000)
    engine.step()
    return engine, runner, log


def test_a_fresh_tenants_first_step_is_its_own_and_the_others_resume_after_it():
    engine, runner, log = flooded()
    add(engine, "b0", 20, "b", max_tokens=3)
    outs = {o.request_id: o for o in engine.step()}
    assert outs["b0"].new_token_ids
    assert log[-1] == (True, {"b": [20, 0]}) and runner.calls[-1]["seq_lens"] == [20]
    engine.step()  # then a's decodes and prompt again, beside b's decode, in a short step
    assert log[-1] == (False, {"a": [SHORT - 9, 8], "b": [0, 1]})


def test_two_fresh_tenants_arriving_together_share_one_step():
    engine, runner, log = flooded()
    add(engine, "b0", 10, "b", max_tokens=2)
    add(engine, "c0", 12, "c", max_tokens=2)
    outs = {o.request_id: o for o in engine.step()}
    assert outs["b0"].new_token_ids and outs["c0"].new_token_ids
    assert log[-1] == (True, {"b": [10, 0], "c": [12, 0]})


def test_others_decode_at_least_every_other_step_however_many_tenants_arrive():
    engine, runner, log = flooded()
    first: dict[str, int] = {}
    for i in range(12):  # a new tenant every step, each with one short request
        add(engine, f"t{i}", 6, f"t{i}", max_tokens=1, salt=i)
        for o in engine.step():
            if o.new_token_ids:
                first.setdefault(o.request_id, len(log))
    solo = [b[0] for b in log[-12:]]
    assert solo == [True, False] * 6  # a fresh tenant's own step, then one with a's decodes
    for is_solo, tenants in log[-12:]:
        assert is_solo or tenants["a"][1] == 8
    # the newcomer that finds the last step a solo one still gets its first token in this step
    assert all(first[f"t{i}"] == len(log) - 12 + i + 1 for i in range(12))


def test_a_fresh_tenant_ahead_of_its_share_gets_no_step_of_its_own():
    engine, runner, log = flooded()
    # b went idle while ahead of a (it was just served a big chunk): it comes back above a
    pol = engine.scheduler.policy
    pol.counters["b"] = pol.counter("a") + 10_000
    add(engine, "b0", 6, "b", max_tokens=1)
    engine.step()
    assert not log[-1][0] and log[-1][1]["a"][1] == 8


def test_a_fresh_tenants_step_leaves_the_blocks_the_next_decodes_need():
    engine, runner = engine_(num_blocks=64, block_size=4)
    log = batches(engine)
    sched, bm = engine.scheduler, engine.scheduler.block_manager
    for i in range(8):
        add(engine, f"a{i}", 4, "a", max_tokens=100, salt=i)
    engine.step()
    add(engine, "a-long", 4 * 36 - 2, "a", salt=99)  # 36 blocks: the cache is nearly full
    engine.step()
    while sum(sched._decode_growth().values()) < 8:  # until a's 8 streams are at a block edge
        engine.step()
    free, growth = bm.num_free_blocks, sum(sched._decode_growth().values())
    assert 0 <= free - growth < free
    # b's prompt fits the free blocks, but not beside the blocks the decodes take next
    add(engine, "b0", 4 * (free - growth + 1), "b", max_tokens=1)
    engine.step()
    assert not log[-1][0] and log[-1][1]["a"][1] == 9  # no step of its own: a decodes
    assert "b" not in log[-1][1] and engine.num_preemptions == 0  # and nothing thrown back
