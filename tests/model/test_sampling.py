"""Sampling: greedy, seeded reproducibility, the support of top-k / top-p / min-p, penalties, logprobs."""

from __future__ import annotations

import numpy as np
import pytest

from tinyserve.engine import ParamError, SamplingParams
from tinyserve.engine.sampling import apply_penalties, candidate_probs, draw, log_softmax, sample

# a fixed distribution over 8 tokens: probs 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005 (shuffled ids)
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
IDS = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # IDS[i] has probability PROBS[i]
LOGITS = np.zeros(8, np.float32)
LOGITS[IDS] = np.log(PROBS)


def draws(params: SamplingParams, n: int = 4000, logits=LOGITS) -> np.ndarray:
    rng = np.random.Generator(np.random.PCG64(1234))
    return np.array([sample(logits, params, rng)[0] for _ in range(n)])


def test_greedy_is_argmax_with_lowest_id_on_ties():
    rng = np.random.Generator(np.random.PCG64(0))
    x = np.random.default_rng(3).normal(size=1000).astype(np.float32)
    assert sample(x, SamplingParams(temperature=0.0), rng)[0] == int(np.argmax(x))
    tie = np.array([0.0, 2.0, 1.0, 2.0], np.float32)
    assert sample(tie, SamplingParams(temperature=0.0), rng)[0] == 1


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    x = np.random.default_rng(5).normal(size=500).astype(np.float32)
    p = SamplingParams(temperature=1.0)

    def run(seed):
        rng = np.random.Generator(np.random.PCG64(seed))
        return [sample(x, p, rng)[0] for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_one_matches_the_distribution():
    d = draws(SamplingParams(temperature=1.0), n=20000)
    freq = np.array([(d == i).mean() for i in IDS])
    assert np.allclose(freq, PROBS, atol=0.015)


def test_top_k_restricts_support():
    d = draws(SamplingParams(temperature=1.0, top_k=3))
    assert set(d.tolist()) == set(IDS[:3].tolist())
    # renormalised over the kept three
    assert abs((d == IDS[0]).mean() - 0.4 / 0.8) < 0.03


def test_top_p_restricts_support():
    # cumulative: 0.4, 0.65, 0.8, 0.9 -> top_p=0.7 keeps the three best
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7)).tolist()) == set(IDS[:3].tolist())
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.65)).tolist()) == set(IDS[:2].tolist())
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.3)).tolist()) == {int(IDS[0])}


def test_min_p_restricts_support():
    # min_p=0.2 -> keep prob >= 0.08: the four best
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.2)).tolist()) == set(IDS[:4].tolist())


def test_filters_combine():
    ids, probs = candidate_probs(LOGITS, SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.3))
    # top_k 5 -> renormalised by 0.95; top_p 0.9 keeps 4 (0.4+0.25+0.15=0.8/0.95 < 0.9); min_p 0.3 -> >= 0.12
    assert ids.tolist() == IDS[:3].tolist()
    assert np.isclose(probs.sum(), 1.0) and np.allclose(probs, PROBS[:3] / PROBS[:3].sum())


def test_low_temperature_sharpens():
    d = draws(SamplingParams(temperature=0.2), n=2000)
    assert (d == IDS[0]).mean() > 0.9


def test_repetition_penalty_over_prompt_and_output():
    x = np.array([2.0, -2.0, 2.0, -2.0, 1.0], np.float32)
    y = apply_penalties(x, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1], output_ids=[1, 4])
    assert y.tolist() == [1.0, -4.0, 2.0, -2.0, 0.5]


def test_presence_and_frequency_penalties_over_output_only():
    x = np.zeros(5, np.float32)
    y = apply_penalties(
        x, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[0, 0, 0], output_ids=[2, 2, 2, 3]
    )
    assert y.tolist() == pytest.approx([0.0, 0.0, -1.25, -0.75, 0.0])
    assert x.tolist() == [0.0] * 5  # the input is not modified


def test_penalty_changes_greedy_choice():
    x = np.array([1.0, 0.9, 0.0], np.float32)
    rng = np.random.Generator(np.random.PCG64(0))
    assert sample(x, SamplingParams(temperature=0.0), rng, output_ids=[0])[0] == 0
    assert sample(x, SamplingParams(temperature=0.0, repetition_penalty=1.5), rng, output_ids=[0])[0] == 1


def test_logprobs_from_penalised_pre_temperature_logits():
    rng = np.random.Generator(np.random.PCG64(0))
    tok, lp = sample(LOGITS, SamplingParams(temperature=0.5, logprobs=3), rng)
    ref = log_softmax(LOGITS)
    assert lp.token_id == tok and lp.logprob == pytest.approx(ref[tok])
    assert [i for i, _ in lp.top] == IDS[:3].tolist()
    assert [v for _, v in lp.top] == pytest.approx(np.log(PROBS[:3]).tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"temperature": -1.0}, "sampling.temperature"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"min_p": 1.0}, "sampling.min_p"),
        ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
        ({"logprobs": 21}, "sampling.logprobs"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"seed": -1}, "sampling.seed"),
    ],
)
def test_invalid_params_name_the_field(kw, field):
    with pytest.raises(ParamError) as ei:
        SamplingParams(**kw).validate()
    assert ei.value.field == field


@pytest.mark.parametrize("scale,top_p", [(1.0, 0.5), (3.0, 0.9), (0.3, 0.99), (8.0, 0.95)])
def test_top_p_on_a_large_vocabulary_matches_a_full_sort(scale, top_p):
    x = (np.random.default_rng(int(scale * 10)).normal(size=5000) * scale).astype(np.float32)
    ids, probs = candidate_probs(x, SamplingParams(temperature=1.0, top_p=top_p))
    p = np.exp(x.astype(np.float64) - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = int(np.argmax(np.cumsum(p[order]) >= top_p)) + 1
    assert ids.tolist() == order[:keep].tolist()
    assert np.allclose(probs, p[order[:keep]] / p[order[:keep]].sum())


@pytest.mark.parametrize("n", [1, 2, 1024, 1025, 1280, 5000, 49152, 49153])
def test_draw_is_the_inverse_cdf(n):
    """draw() walks block sums instead of one long cumsum; it must pick what the plain inverse CDF
    picks (up to a rounding tie right at the threshold), including the ends of [0, 1)."""
    r = np.random.default_rng(n)
    p = r.random(n) ** 4  # uneven, like real distributions
    p /= p.sum()
    c = np.cumsum(p)
    us = np.concatenate([r.random(300), [0.0, 1e-300, 0.5, 1 - 1e-12, np.nextafter(1.0, 0.0)]])
    for u in us:
        want = min(int(np.searchsorted(c, u, side="right")), n - 1)
        got = draw(p, float(u))
        assert 0 <= got < n
        assert got == want or abs(c[min(got, want)] - u) < 1e-12, (n, u, got, want)
    # a zero-probability token is never drawn
    p[n // 2] = 0.0
    assert all(draw(p, float(u)) != n // 2 or n == 1 for u in r.random(500))


# ---------------------------------------------------------------------------------------------
# the vocabulary-scale rework against the sampler it replaced (tests/model/sampling_reference.py)


def zipf_logits(vocab: int, seed: int, s: float = 1.1) -> np.ndarray:
    """Logits shaped like a language model's: Zipf-distributed probabilities, noise, random ids."""
    r = np.random.default_rng(seed)
    lp = -s * np.log(np.arange(1, vocab + 1)) + r.normal(0, 0.5, vocab)
    return (r.permutation(lp) * 1.0 + 3.0).astype(np.float32)


SAME_SEMANTICS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=1.3, top_p=0.5),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.8, top_p=0.95, min_p=0.02),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.9, logprobs=5),
    SamplingParams(temperature=0.0, logprobs=20, repetition_penalty=1.3, presence_penalty=0.5),
]


@pytest.mark.parametrize("vocab", [3000, 49152, 151937])
@pytest.mark.parametrize(
    "params",
    SAME_SEMANTICS,
    ids=lambda p: (f"T{p.temperature}-top_p{p.top_p}-min_p{p.min_p}-lp{p.logprobs}-rep{p.repetition_penalty}"),
)
def test_same_tokens_and_logprobs_as_the_old_sampler(vocab, params):
    import sampling_reference as old

    rows = [zipf_logits(vocab, seed) for seed in range(3)] + [
        (np.random.default_rng(9).normal(size=vocab) * 3).astype(np.float32)
    ]
    prompt, output = [1, 5, 5, 9], [5, 7, 7, 7]
    new_rng, old_rng = np.random.default_rng(42), np.random.default_rng(42)
    for i in range(24):
        x = rows[i % len(rows)]
        tok, lp = sample(x, params, new_rng, prompt, output)
        want, want_lp = old.sample(x, params, old_rng, prompt, output)
        assert tok == want
        if params.logprobs:
            assert (lp.token_id, lp.logprob) == (want_lp.token_id, want_lp.logprob)  # bitwise
            assert lp.top == want_lp.top
        if params.temperature:
            ids, probs = candidate_probs(apply_penalties(x, params, prompt, output), params)
            want_ids, want_probs = old.candidate_probs(old.apply_penalties(x, params, prompt, output), params)
            assert np.array_equal(ids, want_ids) and np.array_equal(probs, want_probs)


@pytest.mark.parametrize("vocab", [500, 49152, 262144])
@pytest.mark.parametrize("top_k", [1, 5, 40, 1000])
def test_top_k_keeps_the_same_tokens_and_probabilities(vocab, top_k):
    """top-k: the same candidate set and distribution as before; candidates are now in id order
    (before: whatever order numpy's argpartition left them in), so a seed maps to other draws."""
    import sampling_reference as old

    x = zipf_logits(vocab, top_k)
    for p in (SamplingParams(temperature=0.8, top_k=top_k), SamplingParams(temperature=1.0, top_k=top_k, top_p=0.9)):
        ids, probs = candidate_probs(x, p)
        want_ids, want_probs = old.candidate_probs(x, p)
        if p.top_p == 1.0:
            assert ids.tolist() == sorted(ids.tolist())
            order = np.argsort(want_ids)
            want_ids, want_probs = want_ids[order], want_probs[order]
        assert ids.tolist() == want_ids.tolist()
        assert np.allclose(probs, want_probs, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "n,k",
    [(1, 1), (10, 3), (5000, 1), (5000, 7), (5000, 700), (70001, 40), (70001, 5000), (262144, 20), (262144, 262144)],
)
def test_top_k_ids_is_a_stable_full_sort_prefix(n, k):
    r = np.random.default_rng(n + k)
    x = r.normal(size=n).astype(np.float32)
    x[r.integers(0, n, n // 10 + 1)] = 1.5  # many ties, some at the edge of the top k
    x[r.integers(0, n, n // 20 + 1)] = -np.inf
    want = np.argsort(-x, kind="stable")[:k]
    from tinyserve.engine.sampling import top_k_ids

    assert top_k_ids(x, k).tolist() == want.tolist()
    assert top_k_ids(x.astype(np.float64), k).tolist() == want.tolist()


def test_sampling_does_not_modify_the_logits_row():
    x = zipf_logits(49152, 1)
    before = x.copy()
    rng = np.random.default_rng(0)
    for p in SAME_SEMANTICS + [SamplingParams(temperature=1.0, top_k=40, repetition_penalty=1.2)]:
        sample(x, p, rng, [1, 2], [3])
    assert np.array_equal(x, before)
