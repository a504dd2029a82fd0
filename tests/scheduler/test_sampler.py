"""The batch sampler in the core (csrc/sampling.cpp) against the numpy reference
(tinyserve.engine.sampling.sample): the same token for the same logits and the same draw, row by
row, for every kind of parameters; and the engine's seeded streams replayed with the reference."""

from __future__ import annotations

import numpy as np
import pytest
from fake_runner import VOCAB, make_engine, prompt

from tinyserve import _core
from tinyserve.engine import SamplingParams, StoppingParams
from tinyserve.engine.sampling import sample, sample_batch

CONFIGS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=2.0, top_p=0.5),
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),  # llama.cpp's defaults
    dict(temperature=1.3, min_p=0.1),
    dict(temperature=0.5, top_k=5),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=2000, top_p=0.99),
    dict(temperature=0.05, top_p=0.3, min_p=0.5),
]


class FixedDraw:
    """An rng whose random() returns the given values in turn (the reference draws one per token)."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def reference(x, params, u):
    return sample(x, params, FixedDraw([u]))[0]


def logits_batch(rng, rows, vocab, scale=3.0):
    x = (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)
    x[:, ::7] = np.round(x[:, ::7])  # exact ties, for the lowest-id rules
    if vocab > 9:
        x[:, 5:9] = x[:, 5:6]  # a tie at one id
        x[rows // 2, 5:9] = x[rows // 2].max() + 2  # among the very best
    return x


def core(x, params: SamplingParams, u):
    n = x.shape[0]
    return _core.sample_batch(
        x,
        np.full(n, params.temperature),
        np.full(n, params.top_k, np.int32),
        np.full(n, params.top_p),
        np.full(n, params.min_p),
        np.asarray(u),
    )


@pytest.mark.parametrize("vocab", [1, 3, 64, 1029, 4097, 49_157])  # odd sizes: every tail loop
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_core_sampler_matches_the_reference(vocab, cfg):
    rng = np.random.default_rng(vocab)
    params = SamplingParams(**cfg)
    rows = 40 if vocab < 10_000 else 12
    x = logits_batch(rng, rows, vocab)
    u = rng.random(rows)
    u[0], u[1] = 0.0, np.nextafter(1.0, 0.0)  # the ends of the draw
    got = core(x, params, u)
    want = [reference(x[r], params, u[r]) for r in range(rows)]
    assert got.dtype == np.int32 and got.tolist() == want


def test_greedy_edge_rows_match_numpy_argmax():
    v = 1000
    rows = np.zeros((6, v), np.float32)
    rows[0, :] = -np.inf  # all -inf: the first
    rows[1, 700] = np.inf
    rows[2, [3, 900]] = 5.0  # tie: the lowest id
    rows[3, 999] = 1.0  # in the scalar tail
    rows[4, [10, 500]] = [1.0, np.nan]  # a NaN wins wherever it is (numpy)
    rows[5, 17] = np.nan
    got = core(rows, SamplingParams(temperature=0.0), np.zeros(6))
    assert got.tolist() == [int(np.argmax(r)) for r in rows]


def test_rows_are_independent_of_the_batch():
    """Large batches go through the compute pool; every row is what it is alone."""
    rng = np.random.default_rng(1)
    x = logits_batch(rng, 64, 5003)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    u = rng.random(64)
    together = core(x, params, u)
    alone = [int(core(x[r : r + 1], params, u[r : r + 1])[0]) for r in range(64)]
    assert together.tolist() == alone


def test_mixed_rows_in_one_call():
    rng = np.random.default_rng(2)
    x = logits_batch(rng, len(CONFIGS), 3001)
    params = [SamplingParams(**c) for c in CONFIGS]
    u = rng.random(len(params))
    rngs = [FixedDraw([v]) for v in u]
    got = sample_batch(x, params, rngs)
    assert got.tolist() == [reference(x[r], params[r], u[r]) for r in range(len(params))]
    # greedy rows draw nothing (as the reference), the others one each
    assert [len(g.values) for g in rngs] == [1 if p.temperature == 0 else 0 for p in params]


def test_an_all_greedy_batch_is_each_rows_argmax_whatever_the_other_knobs():
    """sample_batch's greedy-only path (one call with shared columns) against the reference, and
    against the same rows sampled beside a non-greedy row (the general path)."""
    rng = np.random.default_rng(3)
    x = logits_batch(rng, 8, 4099)
    x[1, :] = -np.inf
    x[2, 77] = np.nan
    knobs = [dict(), dict(top_k=3), dict(top_p=0.2), dict(min_p=0.5), dict(top_k=1, top_p=0.5, min_p=0.9)]
    params = [SamplingParams(temperature=0.0, **knobs[r % len(knobs)]) for r in range(8)]
    rngs = [FixedDraw([]) for _ in params]  # a greedy row draws nothing: random() would fail
    got = sample_batch(x, params, rngs)
    assert got.dtype == np.int32 and got.tolist() == [reference(x[r], params[r], 0.0) for r in range(8)]
    mixed = sample_batch(np.vstack([x, x[:1]]), [*params, SamplingParams(temperature=1.0)], [*rngs, FixedDraw([0.5])])
    assert mixed.tolist()[:8] == got.tolist()


@pytest.mark.parametrize(
    "bad",
    [
        dict(logits=np.zeros(5, np.float32)),
        dict(temperature=np.zeros(3)),
        dict(u=np.full(2, 1.0)),
        dict(top_p=np.zeros(2)),
        dict(min_p=np.ones(2)),
        dict(top_k=np.full(2, -1, np.int32)),
        dict(temperature=np.full(2, np.nan)),
    ],
)
def test_bad_arguments_raise_value_error(bad):
    args = dict(
        logits=np.zeros((2, 10), np.float32),
        temperature=np.ones(2),
        top_k=np.zeros(2, np.int32),
        top_p=np.ones(2),
        min_p=np.zeros(2),
        u=np.zeros(2),
    )
    args.update(bad)
    with pytest.raises(ValueError):
        _core.sample_batch(**args)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(temperature=0.9, seed=7),
        dict(temperature=1.2, top_k=10, top_p=0.9, seed=123, logprobs=3),
        dict(
            temperature=0.8,
            min_p=0.05,
            repetition_penalty=1.3,
            presence_penalty=0.5,
            frequency_penalty=0.4,
            seed=2**63 + 5,
        ),
        dict(temperature=0.0, repetition_penalty=1.5, logprobs=2),
    ],
)
def test_engine_streams_replay_with_the_reference_sampler(cfg):
    """Seeded requests through the engine (batched, C++) = the same requests sampled one token at
    a time with the numpy reference on the same logits and the same seed."""
    engine, runner = make_engine(num_blocks=256)
    params = SamplingParams(**cfg)
    prompts = {f"r{i}": prompt(5 + i, salt=i) for i in range(4)}
    for rid, p in prompts.items():
        engine.add_request(rid, p, params, StoppingParams(max_tokens=12, ignore_eos=True))
    got: dict[str, list] = {rid: [] for rid in prompts}
    while engine.has_unfinished_requests():
        for o in engine.step():
            got[o.request_id] += list(zip(o.new_token_ids, o.logprobs or [None] * len(o.new_token_ids)))
    for rid, p in prompts.items():
        rng = np.random.Generator(np.random.PCG64(params.seed))
        out: list[int] = []
        for tok, lp in got[rid]:
            want, want_lp = sample(runner.next_logits(p + out), params, rng, p, out)
            assert tok == want
            if params.logprobs:
                assert (lp.token_id, lp.logprob, lp.top) == (want_lp.token_id, want_lp.logprob, want_lp.top)
            out.append(tok)
        assert len(out) == 12 and all(0 <= t < VOCAB for t in out)
