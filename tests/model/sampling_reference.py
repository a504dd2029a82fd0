"""The sampler as it was before the 262k-vocabulary rework (commit 2e95caf), kept as the reference
the new one must agree with: same tokens for the same seed wherever the semantics did not change
(temperature, top-p, min-p, greedy, logprobs). Its draw is the inverse CDF by definition (the old
one's blocked sums live on in the server's sampler, so they are not repeated here)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from tinyserve.engine.params import SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) alternatives, best first


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, prompt_ids: Seq[int], output_ids: Seq[int]
) -> np.ndarray:
    """Penalised copy of `logits` [V] (float32), one token at a time (the server's sampler does it
    with array ops): the repetition penalty over every token seen (prompt and output) in float32,
    presence and frequency over the output's counts in float64, rounded back to float32."""
    x = np.array(logits, dtype=np.float32, copy=True)
    rep = np.float32(params.repetition_penalty)
    if rep != 1:
        for t in set(prompt_ids) | set(output_ids):
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t, count in Counter(output_ids).items():
        x[t] = np.float64(x[t]) - (params.frequency_penalty * count + params.presence_penalty)
    return x


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n best (id, logprob), best first; ties -> lowest id."""
    n = min(n, logprobs.shape[0])
    if n <= 0:
        return []
    cand = np.argpartition(-logprobs, n - 1)[:n]
    order = np.lexsort((cand, -logprobs[cand]))
    return [(int(cand[i]), float(logprobs[cand[i]])) for i in order]


def candidate_probs(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """After temperature, top-k, top-p and min-p: (token ids, their probabilities summing to 1)."""
    vocab = x.shape[0]
    if 0 < params.top_k < vocab:  # (temperature > 0 does not change the order)
        ids = np.argpartition(x, vocab - params.top_k)[vocab - params.top_k :]
        vals = x[ids].astype(np.float64) / params.temperature
    else:
        ids = np.arange(vocab)
        vals = x.astype(np.float64) / params.temperature
    probs = np.exp(vals - np.max(vals))
    probs /= probs.sum()
    if params.top_p < 1.0:
        n = len(ids)
        m = 256
        while m < n:  # the nucleus lies in the m most likely tokens once they hold top_p: sort only those
            part = np.argpartition(probs, n - m)[n - m :]
            if probs[part].sum() >= params.top_p:
                ids, probs = ids[part], probs[part]
                break
            m *= 4
        order = np.lexsort((ids, -probs))  # descending probability, ties -> lowest id
        ids, probs = ids[order], probs[order]
        # smallest prefix of the sorted tokens whose mass reaches top_p
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p * (1 - 1e-12))) + 1
        ids, probs = ids[:keep], probs[:keep]
        probs = probs / probs.sum()
    if params.min_p > 0.0:
        mask = probs >= params.min_p * probs.max()
        ids, probs = ids[mask], probs[mask]
        probs = probs / probs.sum()
    return ids, probs


def draw(probs: np.ndarray, u: float) -> int:
    """Inverse CDF by its definition: the first index whose running sum (float64, in index order)
    exceeds u * sum(probs), u in [0, 1). (The old sampler summed blocks of 256 first, for speed, as
    the server's still does; this reference keeps the definition instead, so the two stay separate
    implementations. They could disagree only where u lands within rounding of a boundary.)"""
    running = np.cumsum(probs, dtype=np.float64)
    return min(int(np.searchsorted(running, u * running[-1], side="right")), len(probs) - 1)


def sample(logits, params: SamplingParams, rng: np.random.Generator, prompt_ids=(), output_ids=()):
    """(token, its TokenLogprob or None) for one row of logits [V]: greedy takes the first maximum
    (lowest id); otherwise one draw from the candidates; the record only when params.logprobs > 0."""
    x = apply_penalties(logits, params, prompt_ids, output_ids)
    if params.temperature == 0.0:
        token = int(np.argmax(x))
    else:
        ids, probs = candidate_probs(x, params)
        token = int(ids[draw(probs, rng.random())])
    record = None
    if params.logprobs > 0:
        lp = log_softmax(x)
        record = TokenLogprob(token, float(lp[token]), top_logprobs(lp, params.logprobs))
    return token, record
