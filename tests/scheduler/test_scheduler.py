"""The scheduler and the step loop, driven step by step with the fake model runner."""

from __future__ import annotations

import pytest
from fake_runner import EOS, make_engine, prompt, random_budget, run_all

from tinyserve.engine import FinishReason, ParamError, QueueFullError, SamplingParams, StoppingParams
from tinyserve.engine.sequence import SequenceStatus

G = SamplingParams(temperature=0.0)


def add(engine, rid, n_prompt, max_tokens=8, salt=None, sampling=G, **stop):
    engine.add_request(
        rid,
        prompt(n_prompt, hash(rid) % 50 if salt is None else salt),
        sampling,
        StoppingParams(max_tokens=max_tokens, **stop),
    )


def test_single_request_greedy_matches_fake_model():
    engine, runner = make_engine()
    add(engine, "a", 5, max_tokens=6)
    res = run_all(engine)["a"]
    hist = prompt(5, hash("a") % 50)
    expected = []
    for _ in range(6):
        expected.append(int(runner.next_logits(hist + expected).argmax()))
    assert res["tokens"] == expected
    assert res["finish_reason"] is FinishReason.LENGTH
    assert engine.stats().kv_blocks_used == 0


def test_per_step_token_budget_is_respected():
    engine, runner = make_engine(num_blocks=256, max_num_batched_tokens=24)
    for i in range(6):
        add(engine, f"r{i}", 30 + 7 * i, max_tokens=10)
    res = run_all(engine)
    assert all(r["finish_reason"] is FinishReason.LENGTH and len(r["tokens"]) == 10 for r in res.values())
    assert max(sum(c["seq_lens"]) for c in runner.calls) == 24  # the budget is used, never exceeded
    assert all(sum(c["seq_lens"]) <= 24 for c in runner.calls)


def test_chunked_prefill_interleaves_with_decodes():
    engine, runner = make_engine(num_blocks=256, max_num_batched_tokens=10)
    add(engine, "a", 3, max_tokens=40, salt=1)
    add(engine, "b", 4, max_tokens=40, salt=2)
    engine.step()  # both prompts in one step (7 tokens)
    engine.step()
    assert engine.stats().last_decode_tokens == 2
    add(engine, "long", 100, max_tokens=2, salt=3)  # (distinct prompts: no prefix-cache hits)
    chunks = []
    while True:
        outs = {o.request_id: o for o in engine.step()}
        # the two running sequences decode one token in every step of the long prefill
        assert len(outs["a"].new_token_ids) == 1 and len(outs["b"].new_token_ids) == 1
        chunks.append(engine.stats().last_prefill_tokens)
        if outs["long"].new_token_ids:
            break
        assert outs["long"].new_token_ids == [] and not outs["long"].finished
    assert sum(chunks) == 100 and max(chunks) == 8 and len(chunks) == 13
    res = run_all(engine)
    assert len(res["long"]["tokens"]) == 1  # one more after the step that sampled the first


def test_chunked_prefill_gives_same_tokens_as_one_shot():
    ref_engine, _ = make_engine(num_blocks=256, max_num_batched_tokens=1000)
    add(ref_engine, "x", 77, max_tokens=12)
    ref = run_all(ref_engine)["x"]["tokens"]
    engine, runner = make_engine(num_blocks=256, max_num_batched_tokens=5)
    add(engine, "x", 77, max_tokens=12)
    assert run_all(engine)["x"]["tokens"] == ref
    assert max(sum(c["seq_lens"]) for c in runner.calls) == 5


def test_max_num_seqs_caps_running():
    engine, _ = make_engine(num_blocks=256, max_num_seqs=2)
    for i in range(5):
        add(engine, f"r{i}", 6, max_tokens=5)
    seen = []
    res = run_all(
        engine, on_step=lambda i, outs: seen.append((engine.stats().num_running, len({o.request_id for o in outs})))
    )
    assert max(r for r, _ in seen) == 2 and max(n for _, n in seen) == 2
    assert len(res) == 5 and all(len(r["tokens"]) == 5 for r in res.values())


def _reference(n_req, **kw):
    engine, _ = make_engine(num_blocks=512, **kw)
    for i in range(n_req):
        add(engine, f"r{i}", 9 + 5 * i, max_tokens=20, **_samp(i))
    return {k: v["tokens"] for k, v in run_all(engine).items()}


def _samp(i):
    # half greedy, half seeded sampling: the per-request generator must survive preemption
    return {"sampling": G if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i)}


@pytest.mark.parametrize("num_blocks", [11, 14, 24])  # r3 needs 11 blocks alone
def test_preemption_when_blocks_run_out_resumes_correctly(num_blocks):
    ref = _reference(4)
    engine, runner = make_engine(num_blocks=num_blocks)  # 4 positions per block
    for i in range(4):
        add(engine, f"r{i}", 9 + 5 * i, max_tokens=20, **_samp(i))
    used = []
    res = run_all(engine, on_step=lambda i, o: used.append(engine.stats().kv_blocks_used))
    assert engine.num_preemptions > 0
    assert max(used) <= num_blocks
    assert {k: v["tokens"] for k, v in res.items()} == ref
    assert all(v["finish_reason"] is FinishReason.LENGTH for v in res.values())
    assert engine.stats().kv_blocks_used == 0


def test_preempts_the_newest_running_sequence():
    engine, _ = make_engine(num_blocks=6, max_num_batched_tokens=64)
    add(engine, "old", 8, max_tokens=30)
    add(engine, "new", 8, max_tokens=30)
    engine.step()  # both prompts: 2 + 2 blocks
    sched = engine.scheduler
    while not sched.waiting:
        engine.step()
    assert [s.request_id for s in sched.waiting] == ["new"]
    assert sched.waiting[0].num_preemptions == 1 and sched.waiting[0].block_table == []
    assert [s.request_id for s in sched.running] == ["old"]


def test_sequence_longer_than_the_cache_is_capped_not_looping():
    engine, _ = make_engine(num_blocks=4, block_size=4)  # 16 positions in all
    assert engine.max_model_len == 16
    with pytest.raises(ParamError):
        add(engine, "big", 16)
    add(engine, "a", 10, max_tokens=100)
    res = run_all(engine)["a"]
    assert res["finish_reason"] is FinishReason.LENGTH and 10 + len(res["tokens"]) == 16
    assert engine.stats().kv_blocks_used == 0


def _cancel_and_check(engine, rid):
    engine.abort_request(rid)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[rid].finished and outs[rid].finish_reason is FinishReason.CANCELLED
    assert rid not in {s.request_id for s in (*engine.scheduler.running, *engine.scheduler.waiting)}
    held = sum(len(s.block_table) for s in engine.scheduler.running)
    assert engine.stats().kv_blocks_used == held
    run_all(engine)
    assert engine.stats().kv_blocks_used == 0


def test_cancel_waiting():
    engine, _ = make_engine(max_num_seqs=1)
    add(engine, "a", 5, max_tokens=10)
    add(engine, "b", 5, max_tokens=10)
    engine.step()
    assert engine.scheduler.waiting[0].request_id == "b"
    _cancel_and_check(engine, "b")


def test_cancel_before_first_step():
    engine, runner = make_engine()
    add(engine, "a", 5)
    engine.abort_request("a")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", FinishReason.CANCELLED)]
    assert runner.calls == [] and not engine.has_unfinished_requests()


def test_cancel_mid_prefill():
    engine, _ = make_engine(max_num_batched_tokens=8)
    add(engine, "a", 50)
    add(engine, "b", 3)
    engine.step()
    seq = engine.scheduler.running[0]
    assert seq.request_id == "a" and 0 < seq.num_computed_tokens < 50 and seq.block_table
    _cancel_and_check(engine, "a")


def test_cancel_running():
    engine, _ = make_engine()
    add(engine, "a", 5, max_tokens=50)
    add(engine, "b", 5, max_tokens=50)
    for _ in range(4):
        engine.step()
    assert engine.scheduler.running[0].is_decoding
    _cancel_and_check(engine, "a")


def test_cancel_preempted():
    engine, _ = make_engine(num_blocks=6)
    add(engine, "old", 8, max_tokens=30)
    add(engine, "new", 8, max_tokens=30)
    while not engine.scheduler.waiting:
        engine.step()
    seq = engine.scheduler.waiting[0]
    assert seq.request_id == "new" and seq.num_preemptions >= 1
    _cancel_and_check(engine, "new")
    assert seq.status is SequenceStatus.FINISHED


def test_many_cancelled_requests_leak_no_blocks():
    engine, _ = make_engine(num_blocks=40, max_num_batched_tokens=16, max_num_seqs=8)
    n = 0
    outs = []
    for round_ in range(30):
        for _ in range(3):
            add(engine, f"r{n}", 3 + (n * 7) % 20, max_tokens=25)
            n += 1
        outs += engine.step()
        engine.abort_request(f"r{n - 1 - round_ % 3}")
        engine.abort_request(f"r{n - 5}")
        engine.abort_request("not-a-request")
        outs += engine.step()
    for i in range(n):
        engine.abort_request(f"r{i}")
    res = run_all(engine)
    for o in outs:
        if o.finished:
            assert o.request_id not in res
            res[o.request_id] = {"finished": True, "finish_reason": o.finish_reason}
    assert len(res) == n and all(r["finished"] for r in res.values())
    assert sum(r["finish_reason"] is FinishReason.CANCELLED for r in res.values()) > n // 2
    assert engine.stats().kv_blocks_used == 0
    assert engine.scheduler.block_manager.num_free_blocks == 40
    assert sorted(engine.scheduler.block_manager.free_block_ids) == list(range(40))


def test_wait_queue_bound_raises_queue_full():
    engine, _ = make_engine(max_waiting=3, max_num_seqs=1)
    for i in range(3):
        add(engine, f"r{i}", 4)
    with pytest.raises(QueueFullError):
        add(engine, "r3", 4)
    engine.step()  # r0 starts running: one place frees up in the queue
    add(engine, "r3", 4)
    with pytest.raises(QueueFullError):
        add(engine, "r4", 4)
    assert len(run_all(engine)) == 4


def test_duplicate_request_id_and_bad_prompts_rejected():
    engine, _ = make_engine()
    add(engine, "a", 4)
    with pytest.raises(ValueError, match="already in use"):
        add(engine, "a", 4)
    with pytest.raises(ParamError, match="empty"):
        engine.add_request("e", [], G, StoppingParams())
    with pytest.raises(ParamError, match="vocabulary"):
        engine.add_request("v", [1, 64], G, StoppingParams())
    with pytest.raises(ParamError) as ei:
        engine.add_request("t", [1], SamplingParams(top_p=0.0), StoppingParams())
    assert ei.value.field == "sampling.top_p"


def test_stop_token_ids_and_max_tokens():
    engine, _ = make_engine()
    add(engine, "ref", 6, max_tokens=10, salt=1)
    ref = run_all(engine)["ref"]["tokens"]
    stop_tok = ref[3]
    first = ref.index(stop_tok)
    add(engine, "s", 6, max_tokens=10, salt=1, stop_token_ids=[stop_tok])
    add(engine, "m", 6, max_tokens=4, salt=1)
    res = run_all(engine)
    assert res["s"]["tokens"] == ref[: first + 1] and res["s"]["finish_reason"] is FinishReason.STOP
    assert res["m"]["tokens"] == ref[:4] and res["m"]["finish_reason"] is FinishReason.LENGTH
    assert res["m"]["num_output_tokens"] == 4


def test_eos_stops_unless_ignored():
    engine, runner = make_engine()
    real = runner.next_logits
    runner.next_logits = lambda h: _eos_after(real(h), h, 9)  # prompt 6 + 3 outputs -> EOS
    add(engine, "e", 6, max_tokens=10)
    add(engine, "i", 6, max_tokens=10, ignore_eos=True)
    res = run_all(engine)
    assert res["e"]["tokens"][-1] == EOS and len(res["e"]["tokens"]) == 4
    assert res["e"]["finish_reason"] is FinishReason.STOP
    assert len(res["i"]["tokens"]) == 10 and res["i"]["finish_reason"] is FinishReason.LENGTH


def _eos_after(logits, hist, n):
    if len(hist) == n:
        logits = logits.copy()
        logits[EOS] = 100.0
    return logits


def test_forward_failure_fails_the_batch_not_the_engine():
    engine, runner = make_engine()
    add(engine, "a", 5)
    real = runner.__call__
    engine._forward = lambda *a: (_ for _ in ()).throw(ValueError("boom"))
    outs = engine.step()
    assert outs[0].finish_reason is FinishReason.ERROR and "boom" in outs[0].error
    engine._forward = real
    add(engine, "b", 5, max_tokens=3)
    assert len(run_all(engine)["b"]["tokens"]) == 3
    assert engine.stats().kv_blocks_used == 0


def test_logprobs_are_returned():
    engine, runner = make_engine()
    add(engine, "a", 5, max_tokens=3, sampling=SamplingParams(temperature=0.0, logprobs=3))
    outs = [o for _ in range(3) for o in engine.step()]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == 3
    for lp, o in zip(lps, outs):
        assert lp.token_id == o.new_token_ids[0] == lp.top[0][0]
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob < 0


def test_add_and_abort_from_another_thread_while_stepping():
    import threading

    engine, _ = make_engine(num_blocks=48, max_num_batched_tokens=16, max_num_seqs=4)
    n = 60
    done = threading.Event()

    def producer():
        for i in range(n):
            add(engine, f"r{i}", 3 + i % 17, max_tokens=1 + i % 9)
            if i % 3 == 0:
                engine.abort_request(f"r{i}")
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    finished = {}
    for _ in range(100_000):
        for o in engine.step():
            if o.finished:
                assert o.request_id not in finished
                finished[o.request_id] = o.finish_reason
        if done.is_set() and not engine.has_unfinished_requests():
            break
    t.join()
    assert len(finished) == n
    for rid, reason in finished.items():
        aborted = int(rid[1:]) % 3 == 0  # (an abort can land after a 1-token request finished)
        assert reason in ((FinishReason.CANCELLED, FinishReason.LENGTH) if aborted else (FinishReason.LENGTH,))
    assert sum(r is FinishReason.CANCELLED for r in finished.values()) >= n // 6
    assert engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_workloads_never_deadlock_leak_or_change_outputs(seed):
    """Random sizes, budgets, arrivals and aborts: every request ends, the survivors' tokens equal
    those of an unconstrained engine, and every block comes back."""
    import random

    rnd = random.Random(seed)
    budget = random_budget(rnd, 12, 40)
    num_blocks = budget["num_blocks"]
    engine, _ = make_engine(**budget)
    limit = engine.max_model_len
    reqs = {}
    for i in range(30):
        n = rnd.randrange(1, min(30, limit - 1))
        reqs[f"r{i}"] = (prompt(n, rnd.randrange(50)), rnd.randrange(1, 15), None if i % 2 else 100 + i)
    pending = list(reqs)
    finished = {}
    aborted = set()
    for _ in range(20_000):
        if pending and rnd.random() < 0.5:
            rid = pending.pop(0)
            p, mt, s = reqs[rid]
            engine.add_request(
                rid, p, G if s is None else SamplingParams(temperature=1.0, seed=s), StoppingParams(max_tokens=mt)
            )
        if rnd.random() < 0.05 and reqs:
            rid = rnd.choice(list(reqs))
            engine.abort_request(rid)
            aborted.add(rid)
        for o in engine.step():
            finished.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id].append(o.finish_reason)
        assert engine.stats().kv_blocks_used <= num_blocks
        if not pending and not engine.has_unfinished_requests():
            break
    assert set(finished) == set(reqs) and engine.stats().kv_blocks_used == 0
    ref_engine, _ = make_engine(num_blocks=1024, block_size=4, context_length=limit, enable_prefix_caching=False)
    for rid, (p, mt, s) in reqs.items():
        ref_engine.add_request(
            rid, p, G if s is None else SamplingParams(temperature=1.0, seed=s), StoppingParams(max_tokens=mt)
        )
    ref = run_all(ref_engine)
    for rid, got in finished.items():
        if got[-1] is not FinishReason.CANCELLED:
            assert rid not in aborted or got[-1] is FinishReason.LENGTH
            assert got[:-1] == ref[rid]["tokens"] and got[-1] is ref[rid]["finish_reason"]
