"""Generation on the real default model through the engine and the LLM API."""

from __future__ import annotations

import re

import pytest
from tiny_models import run_greedy

from tinyserve.engine import EngineConfig, FinishReason, LLMEngine, SamplingParams, StoppingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def llm(default_model_path):
    from tinyserve.llm import LLM

    return LLM(default_model_path)


def ids_of(llm, prompt, sampling, n):
    text = "".join(llm.generate(prompt, sampling, StoppingParams(max_tokens=n)))
    return list(llm.last_stats.token_ids), text


def test_capital_of_france_greedy(llm):
    ids, text = ids_of(llm, PROMPT, GREEDY, 12)
    assert len(ids) == 12 and llm.last_stats.finish_reason is FinishReason.LENGTH
    assert "Paris" in text
    assert re.search(r"[A-Za-z]{3,}", text) and sum(c.isascii() for c in text) >= 0.9 * len(text)
    assert text == llm.tokenizer.decode(ids, skip_special=True)


def test_greedy_is_deterministic(llm):
    a = ids_of(llm, "Once upon a time", GREEDY, 16)
    b = ids_of(llm, "Once upon a time", GREEDY, 16)
    assert a == b and len(a[0]) == 16


def test_seeded_sampling_reproducible_and_seeds_differ(llm):
    def run(seed):
        return ids_of(llm, "My favourite animal is", SamplingParams(temperature=1.0, seed=seed), 12)[0]

    first = run(11)
    assert run(11) == first
    assert any(run(s) != first for s in (12, 13))


def test_stop_string_cuts_exactly(llm):
    _, full = ids_of(llm, "Once upon a time", GREEDY, 24)
    # a stop string that starts in the middle of the text and spans a token boundary
    k = len(full) // 2
    stop = full[k : k + 6]
    assert len(stop) == 6
    out = "".join(llm.generate("Once upon a time", GREEDY, StoppingParams(max_tokens=24, stop=[stop])))
    assert out == full[: full.find(stop)]
    assert llm.last_stats.finish_reason is FinishReason.STOP_SEQUENCE and llm.last_stats.stop_string == stop
    assert llm.engine.stats().kv_blocks_used == 0  # the stopped request was freed


def test_chat_answers_and_stops_at_end_of_turn(llm):
    text = "".join(
        llm.chat(
            [{"role": "user", "content": "What is the capital of Germany?"}], GREEDY, StoppingParams(max_tokens=48)
        )
    )
    assert "Berlin" in text and "<|im_end|>" not in text
    st = llm.last_stats
    assert st.finish_reason is FinishReason.STOP and st.token_ids[-1] in llm.tokenizer.stop_ids
    assert st.num_output_tokens < 48


def test_batched_requests_with_chunked_prefill_and_small_budget(default_model_path, llm):
    """Several requests at once, a per-step budget smaller than the prompts: every request still
    ends with max_tokens tokens and all KV blocks come back."""
    engine = LLMEngine(llm.model, EngineConfig(max_num_batched_tokens=8, num_kv_blocks=64))
    prompts = [PROMPT, "Once upon a time there was", "1, 2, 3, 4, 5,"]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", llm.tokenizer.encode(p), GREEDY, StoppingParams(max_tokens=6, ignore_eos=True))
    got = {f"r{i}": [] for i in range(len(prompts))}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
        assert engine.stats().last_prefill_tokens + engine.stats().last_decode_tokens <= 8
    assert all(len(v) == 6 for v in got.values())
    assert engine.stats().kv_blocks_used == 0
    counting = llm.tokenizer.decode(got["r2"])
    assert "6" in counting  # the model continues the count


def test_perplexity_chunked_equals_whole_windows(llm):
    text = (
        "The sun rose over the quiet village, and the farmers walked out to their fields. "
        "Birds sang in the trees while the river flowed gently past the old mill. By noon the "
        "air was warm, and the children came home from school for lunch. Their mother had made "
        "soup with carrots and potatoes from the garden, and bread that was still warm. After "
        "the meal, the youngest boy fell asleep in the shade of the apple tree, while his sister "
        "read a book about ships and the sea. In the evening the whole family sat outside and "
        "watched the stars appear one by one above the dark hills."
    )
    whole = llm.perplexity(text, ctx=32, batch_size=256)  # all windows in one forward
    chunked = llm.perplexity(text, ctx=32, batch_size=12)  # each window in three forwards
    n_tokens = len(llm.tokenizer.encode(text))
    assert whole.num_windows == chunked.num_windows == n_tokens // 32 >= 2
    assert whole.num_scored_tokens == whole.num_windows * (32 - 1 - 16)
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-3)
    assert 1.0 < whole.ppl < 100.0
    with pytest.raises(ValueError, match="needs at least"):
        llm.perplexity("too short", ctx=64)


def test_perplexity_scores_the_second_half_of_each_window(llm):
    """Recompute llama-perplexity's number by hand: window w = tokens [w*ctx, (w+1)*ctx) (first
    token -> BOS when the model adds BOS), logits at positions [ctx/2, ctx-1) predict the next token."""
    import numpy as np

    from tinyserve import _core

    text = (
        "Water boils at one hundred degrees at sea level, but at lower temperatures on high "
        "mountains, because the air pressure there is lower. Cooks in the mountains know this. " * 3
    )
    ctx, first = 24, 12
    ids = llm.tokenizer.encode(text)
    nll = []
    for w in range(len(ids) // ctx):
        win = np.asarray(ids[w * ctx : (w + 1) * ctx], np.int32)
        if llm.tokenizer.add_bos:
            win[0] = llm.tokenizer.bos_id
        kv = _core.KVCache(llm.model.core, block_size=16, num_blocks=2, dtype=llm.engine.config.kv_dtype)
        logits = llm.model.core.forward(
            kv,
            win,
            np.array([ctx], np.int32),
            np.array([0], np.int32),
            np.array([[0, 1]], np.int32),
            np.arange(ctx, dtype=np.int32),
        )
        x = logits.astype(np.float64)
        lse = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) + x.max(1)
        for p in range(first, ctx - 1):
            nll.append(lse[p] - x[p, win[p + 1]])
    res = llm.perplexity(text, ctx=ctx)
    assert res.num_scored_tokens == len(nll)
    assert res.ppl == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-4)


def test_prefix_cache_on_the_real_model_gives_the_same_tokens(llm):
    """A second request with the same 40-token prompt reuses its full KV blocks and, greedy,
    produces exactly the tokens of the first (which computed everything)."""
    engine = LLMEngine(llm.model, EngineConfig(num_kv_blocks=32))
    prompt = llm.tokenizer.encode(
        "The history of the printing press begins in the fifteenth century, "
        "when craftsmen in several European cities experimented with metal "
        "type, oil-based inks and wooden presses adapted from the screw presses "
        "that farmers used to squeeze olives and grapes"
    )
    assert len(prompt) > 33

    first, c1 = run_greedy(engine, "a", prompt, 8)
    second, c2 = run_greedy(engine, "b", prompt, 8)
    assert c1 == 0 and c2 == (len(prompt) - 1) // 16 * 16 >= 32
    assert second == first


def test_closing_the_stream_early_frees_the_request(llm):
    it = llm.generate("Once upon a time", GREEDY, StoppingParams(max_tokens=50))
    got = [next(it), next(it)]
    assert all(got)
    it.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.stats().kv_blocks_used == 0
