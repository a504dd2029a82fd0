"""Prefix caching: full prompt blocks are reused, per tenant, without changing any output."""

from __future__ import annotations

import random

from fake_runner import VOCAB, make_engine, run_all

from tinyserve.engine import SamplingParams, StoppingParams

G = SamplingParams(temperature=0.0)
SYSTEM = [(5 * i + 2) % (VOCAB - 1) for i in range(22)]  # a shared "system prompt"


def outputs(engine, reqs, **step_kw):
    """reqs: (rid, prompt, tenant). Add all, run, return {rid: (tokens, num_cached_tokens)}."""
    cached = {}
    for rid, prompt, tenant in reqs:
        engine.add_request(rid, prompt, G, StoppingParams(max_tokens=7), tenant=tenant)

    def on_step(_, outs):
        for o in outs:
            cached[o.request_id] = o.num_cached_tokens

    res = run_all(engine, on_step=on_step)
    return {k: (v["tokens"], cached[k]) for k, v in res.items()}


def test_second_identical_prompt_reuses_full_blocks():
    engine, runner = make_engine(block_size=4)
    prompt = SYSTEM + [1, 2, 3]  # 25 tokens: 6 full blocks, of which all 6 are reusable (24 <= 25 - 1)
    first = outputs(engine, [("a", prompt, "t")])["a"]
    n_before = sum(sum(c["seq_lens"]) for c in runner.calls)
    second = outputs(engine, [("b", prompt, "t")])["b"]
    fed = sum(sum(c["seq_lens"]) for c in runner.calls) - n_before
    assert first[1] == 0 and second[1] == 24
    assert second[0] == first[0]
    assert fed == (25 - 24) + 6  # one prompt token, then six decodes
    assert engine.stats().kv_blocks_used == 0


def test_last_token_is_always_computed():
    engine, _ = make_engine(block_size=4)
    prompt = SYSTEM[:20]  # exactly 5 full blocks: the 5th holds the last token, so only 4 reused
    outputs(engine, [("a", prompt, "t")])
    assert outputs(engine, [("b", prompt, "t")])["b"][1] == 16


def test_tenants_do_not_share_blocks():
    engine, _ = make_engine(block_size=4)
    prompt = SYSTEM + [9]
    outputs(engine, [("a", prompt, "alice")])
    res = outputs(engine, [("b", prompt, "bob"), ("c", prompt + [4], "alice")])
    assert res["b"][1] == 0 and res["c"][1] == 20


def test_concurrent_requests_share_blocks_and_match_uncached():
    reqs = [(f"r{i}", SYSTEM + [(i * 11 + j) % (VOCAB - 1) for j in range(3 + i)], "t") for i in range(6)]
    ref_engine, _ = make_engine(num_blocks=512, enable_prefix_caching=False)
    ref = outputs(ref_engine, reqs)
    engine, runner = make_engine(num_blocks=512, max_num_batched_tokens=32)
    engine.add_request("warm", SYSTEM + [0], G, StoppingParams(max_tokens=1), tenant="t")
    run_all(engine)
    got = outputs(engine, reqs)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in ref.items()}
    assert all(v[1] == 20 for v in got.values())
    assert runner.shared_blocks_seen > 0
    assert engine.stats().kv_blocks_used == 0


def test_random_workload_under_block_pressure_matches_uncached():
    rnd = random.Random(7)
    prefixes = [[rnd.randrange(VOCAB - 1) for _ in range(rnd.randrange(4, 30))] for _ in range(4)]
    reqs = []
    for i in range(40):
        p = rnd.choice(prefixes) + [rnd.randrange(VOCAB - 1) for _ in range(rnd.randrange(1, 12))]
        reqs.append((f"r{i}", p, rnd.choice(["x", "y"])))
    ref_engine, _ = make_engine(num_blocks=1024, enable_prefix_caching=False)
    ref = outputs(ref_engine, reqs)
    engine, runner = make_engine(num_blocks=30, max_num_batched_tokens=20, max_num_seqs=6)
    got = {}
    for k in range(0, 40, 5):  # arrivals in waves, so later waves find earlier blocks cached
        got.update(outputs(engine, reqs[k : k + 5]))
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in ref.items()}
    assert sum(v[1] for v in got.values()) > 0
    bm = engine.scheduler.block_manager
    assert engine.stats().kv_blocks_used == 0 and bm.num_free_blocks == 30
    assert all(bm.hash_to_block[bm.block_hash[b]] == b for b in range(30) if bm.block_hash[b] is not None)
