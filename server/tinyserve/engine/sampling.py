"""Turning rows of logits into tokens.

The engine samples a whole step at once: `penalise` (in place, per row that has penalties), then
`sample_batch` (one C++ call for every row: csrc/sampling.cpp, GIL released), then
`logprob_record` for the rows that asked for logprobs. `sample` below is the same thing for one
row in numpy: the reference the C++ sampler is tested against (same token for the same seed).

Reference semantics (numpy, one row):

Order: penalties (repetition over prompt + output, presence/frequency over output) -> temperature
(0 = greedy argmax, ties -> lowest id) -> top-k -> top-p -> min-p -> draw with the request's own
np.random.Generator. Logprobs come from the log-softmax of the penalised logits, before temperature.

Cost with the vocabulary (49k to 262k entries): every step is a handful of vectorised passes over
the row and nothing else of that size. No full sort and no full-vocabulary `argpartition` (numpy's
takes ~4 ms on 262k floats): the top k tokens come from a threshold found on a strided sample and
checked to let at least k through, then an exact sort of the few that pass. Full-vocabulary float64
work goes into one buffer per thread that is reused: a fresh 2 MB array each step costs more in page
faults than the arithmetic in it. `bench/bench_sampling.py` measures the cost per step.

Candidates are in token-id order until top-p sorts them (descending probability, ties -> lowest id);
the top-k set breaks ties at its edge towards the lowest id.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from .params import SamplingParams


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) alternatives, best first


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    """This thread's float64 work buffer of n entries (contents undefined; reused by the next call)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[0] != n:
        buf = _local.buf = np.empty(n, np.float64)
    return buf


def _penalised(
    logits: np.ndarray, params: SamplingParams, prompt_ids: Seq[int], output_ids: Seq[int], copy: bool
) -> np.ndarray:
    """The logits row as float32 with the penalties applied. Without penalties (and copy False)
    the row itself, never written to."""
    rep = params.repetition_penalty != 1.0 and (len(prompt_ids) or len(output_ids))
    pres = (params.presence_penalty or params.frequency_penalty) and len(output_ids)
    if not (rep or pres or copy):
        return np.asarray(logits, dtype=np.float32)
    x = np.array(logits, dtype=np.float32, copy=True)
    if rep:
        seen = np.unique(np.asarray([*prompt_ids, *output_ids], dtype=np.int64))
        v = x[seen]
        x[seen] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if pres:
        ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
        x[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return x


def has_penalties(params: SamplingParams, num_prompt: int, num_output: int) -> bool:
    return bool(
        (params.repetition_penalty != 1.0 and (num_prompt or num_output))
        or ((params.presence_penalty or params.frequency_penalty) and num_output)
    )


def penalise(row: np.ndarray, params: SamplingParams, prompt_ids: Seq[int], output_ids: Seq[int]) -> None:
    """Apply the penalties to one float32 row of logits in place (what `sample` applies to a copy)."""
    if params.repetition_penalty != 1.0 and (len(prompt_ids) or len(output_ids)):
        seen = np.unique(np.asarray([*prompt_ids, *output_ids], dtype=np.int64))
        v = row[seen]
        row[seen] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(output_ids):
        ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
        row[ids] -= params.frequency_penalty * counts + params.presence_penalty


def sample_batch(logits: np.ndarray, params: Seq[SamplingParams], rngs: Seq[np.random.Generator]) -> np.ndarray:
    """One token per row of `logits` [R, V] (float32, penalties and masks already applied), row r
    with params[r], drawing from rngs[r] once when params[r].temperature > 0 (as `sample` does).
    Returns int32 [R]. One call into the core for the whole batch."""
    from tinyserve import _core

    n = len(params)
    if all(p.temperature == 0 for p in params):  # all greedy: argmax, whatever the other knobs
        return _core.sample_batch(np.ascontiguousarray(logits, dtype=np.float32), *_greedy_columns(n))
    temperature = np.fromiter((p.temperature for p in params), np.float64, n)
    u = np.fromiter((g.random() if p.temperature > 0 else 0.0 for p, g in zip(params, rngs)), np.float64, n)
    return _core.sample_batch(
        np.ascontiguousarray(logits, dtype=np.float32),
        temperature,
        np.fromiter((p.top_k for p in params), np.int32, n),
        np.fromiter((p.top_p for p in params), np.float64, n),
        np.fromiter((p.min_p for p in params), np.float64, n),
        u,
    )


_greedy: dict[int, tuple[np.ndarray, ...]] = {}


def _greedy_columns(n: int) -> tuple[np.ndarray, ...]:
    """sample_batch's parameter columns for n greedy rows (temperature 0, u 0, the other knobs
    off), kept per n: read-only, shared by every step of that many rows."""
    cols = _greedy.get(n)
    if cols is None:
        zeros, ones = np.zeros(n, np.float64), np.ones(n, np.float64)
        cols = (zeros, np.zeros(n, np.int32), ones, zeros, zeros)
        for c in cols:
            c.flags.writeable = False
        _greedy[n] = cols
    return cols


def logprob_record(x: np.ndarray, token: int, n: int) -> TokenLogprob:
    """The chosen token's logprob and the n best alternatives, from the log-softmax of row `x`
    (the penalised logits, before temperature)."""
    lse = _logsumexp(x)
    top = [(int(i), float(x[i]) - lse) for i in top_k_ids(x, n)]
    return TokenLogprob(token, float(x[token]) - lse, top)


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, prompt_ids: Seq[int], output_ids: Seq[int]
) -> np.ndarray:
    """Penalised copy of `logits` [V] (float32)."""
    return _penalised(logits, params, prompt_ids, output_ids, copy=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    out: np.ndarray = x - (m + np.log(np.sum(np.exp(x - m))))
    return out


def _logsumexp(x: np.ndarray) -> float:
    """log(sum(exp(x))) in float64, the same value log_softmax subtracts, without a new array."""
    buf = _scratch(x.shape[0])
    np.copyto(buf, x)
    m = float(np.max(x))
    np.subtract(buf, m, out=buf)
    np.exp(buf, out=buf)
    return float(m + np.log(buf.sum()))


_SAMPLE_STRIDE = 16


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest entries of x, best first (ties -> lowest id), without sorting x.

    A threshold t taken from every 16th entry is lowered until at least k entries are >= t; the
    k best all lie in that set, so sorting only it gives the exact answer."""
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, np.int64)
    cand = None
    if n >= 64 * _SAMPLE_STRIDE and k * 8 <= n:
        sample = x[::_SAMPLE_STRIDE]
        m = 2 * (k // _SAMPLE_STRIDE) + 4  # about twice the sample's share of the k best
        while m < sample.shape[0] // 2:
            t = np.partition(sample, sample.shape[0] - m)[sample.shape[0] - m]
            c = np.flatnonzero(x >= t)
            if c.shape[0] >= k:
                cand = c
                break
            m *= 4
    if cand is None:
        cand = np.arange(n)
    order = np.lexsort((cand, -x[cand]))[:k]
    return cand[order]


def top_logprobs(logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    """The n best (id, logprob), best first; ties -> lowest id."""
    return [(int(i), float(logprobs[i])) for i in top_k_ids(logprobs, n)]


def _nucleus(ids: np.ndarray | None, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most likely tokens whose mass reaches top_p, sorted (descending
    probability, ties -> lowest id) and renormalised. ids None: probs covers every token in id order.

    Tokens with p >= t are a prefix of the sorted order; once their mass reaches top_p the nucleus
    lies inside them, so only they are sorted. t starts at max/64 and drops 64x at a time."""
    n = int(probs.shape[0])
    if n > 1024:
        pmax = float(np.max(probs))
        t = pmax / 64
        while True:
            sel = np.flatnonzero(probs >= t)
            if sel.shape[0] == n or probs[sel].sum() >= top_p:
                break
            t /= 64
            if t < pmax * 1e-300:
                sel = np.arange(n)
                break
    else:
        sel = np.arange(n)
    p = probs[sel]
    order = np.lexsort((sel if ids is None else ids[sel], -p))  # descending probability, ties -> lowest id
    sel, p = sel[order], p[order]
    keep = int(np.searchsorted(np.cumsum(p), top_p * (1 - 1e-12))) + 1
    sel, p = sel[:keep], p[:keep]
    return (sel if ids is None else ids[sel]), p / p.sum()


def _candidates(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray | None, np.ndarray]:
    """(ids, probs) after temperature, top-k, top-p and min-p. ids None means every token in id
    order, and probs may then be this thread's scratch buffer (valid until the next call)."""
    vocab = x.shape[0]
    ids: np.ndarray | None = None
    if 0 < params.top_k < vocab:  # (temperature > 0 does not change the order)
        ids = np.sort(top_k_ids(x, params.top_k))
        probs = x[ids].astype(np.float64) / params.temperature
        probs = np.exp(probs - np.max(probs))
        probs /= probs.sum()
    else:
        probs = _scratch(vocab)
        np.copyto(probs, x)
        np.divide(probs, params.temperature, out=probs)
        np.subtract(probs, float(np.max(x)) / params.temperature, out=probs)  # = max of the quotients
        np.exp(probs, out=probs)
        np.divide(probs, probs.sum(), out=probs)
    if params.top_p < 1.0:
        ids, probs = _nucleus(ids, probs, params.top_p)
    if params.min_p > 0.0:
        keep = np.flatnonzero(probs >= params.min_p * probs.max())
        ids = keep if ids is None else ids[keep]
        probs = probs[keep]
        probs = probs / probs.sum()
    return ids, probs


def candidate_probs(x: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """After temperature, top-k, top-p and min-p: (token ids, their probabilities summing to 1)."""
    ids, probs = _candidates(np.asarray(x, dtype=np.float32), params)
    if ids is None:
        return np.arange(x.shape[0]), probs.copy()
    return ids, probs


_DRAW_BLOCK = 256


def draw(probs: np.ndarray, u: float) -> int:
    """Inverse CDF: the first index whose running sum exceeds u * sum(probs), u in [0, 1).

    numpy's cumsum is sequential (~165 us over a 49k vocabulary, more than all the rest of a
    sampling step), so sum fixed blocks of 256 first (vectorised), walk the block sums, and
    take the running sum inside the one block that holds the target.
    """
    n = int(probs.shape[0])
    if n <= 4 * _DRAW_BLOCK:
        c = np.cumsum(probs, dtype=np.float64)
        return min(int(np.searchsorted(c, u * c[-1], side="right")), n - 1)
    full = n - n % _DRAW_BLOCK
    sums = probs[:full].reshape(-1, _DRAW_BLOCK).sum(axis=1, dtype=np.float64)
    if full < n:
        sums = np.append(sums, probs[full:].sum(dtype=np.float64))
    csum = np.cumsum(sums)
    target = u * csum[-1]
    j = min(int(np.searchsorted(csum, target, side="right")), len(csum) - 1)
    start = j * _DRAW_BLOCK
    inside = np.cumsum(probs[start : start + _DRAW_BLOCK], dtype=np.float64) + (csum[j - 1] if j else 0.0)
    i = int(np.searchsorted(inside, target, side="right"))
    if i == len(inside):  # block sum and running sum round differently: take the last nonzero entry
        i = int(np.flatnonzero(probs[start : start + _DRAW_BLOCK])[-1])
    return start + i


def sample(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    prompt_ids: Seq[int] = (),
    output_ids: Seq[int] = (),
) -> tuple[int, TokenLogprob | None]:
    """One token from one row of logits [V]; plus its logprob record when params.logprobs > 0."""
    x = _penalised(logits, params, prompt_ids, output_ids, copy=False)
    if params.temperature == 0.0:
        token = int(np.argmax(x))  # first maximum = lowest id
    else:
        ids, probs = _candidates(x, params)
        i = draw(probs, rng.random())
        token = i if ids is None else int(ids[i])
    if params.logprobs <= 0:
        return token, None
    return token, logprob_record(x, token, params.logprobs)
