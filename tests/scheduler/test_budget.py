"""The per-step token budget follows who is there (scheduler.py, "Budget"): long steps for a lone
tenant, short ones while another tenant is around, and a newcomer's prompt in the next step.
Driven step by step with the fake model; steps are counted, nothing is timed."""

from __future__ import annotations

import pytest
from fake_runner import make_engine, prompt

from tinyserve.engine import ParamError, SamplingParams, StoppingParams
from tinyserve.engine.params import EngineConfig

G = SamplingParams(temperature=0.0)
BIG, SHORT, WINDOW = 256, 32, 20


def engine_(**kw):
    cfg = dict(
        num_blocks=2048,
        block_size=4,
        max_num_batched_tokens=BIG,
        contended_step_tokens=SHORT,
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
    # b has nothing now, but was just busy: a's steps are short for the whole window
    for _ in range(WINDOW - 1):
        engine.step()
        assert engine.scheduler.contended
        assert engine.stats().last_decode_tokens == 8
        assert engine.stats().last_prefill_tokens == SHORT - 8
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
            assert tokens_of(runner) <= SHORT  # what the next request of b waits for
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
    assert engine.stats().last_prefill_tokens == SHORT // 4  # and a's prompt moves


def test_the_long_budget_caps_the_short_one():
    engine, runner = engine_(max_num_batched_tokens=16, contended_step_tokens=64)
    flood(engine, n_streams=4)
    add(engine, "b0", 5, "b", max_tokens=1)
    for _ in range(4):
        engine.step()
        assert tokens_of(runner) <= 16


@pytest.mark.parametrize("field", ["contended_step_tokens", "contended_window_steps"])
def test_budget_settings_are_checked(field):
    with pytest.raises(ParamError, match=field):
        EngineConfig(**{field: 0}).validate()
