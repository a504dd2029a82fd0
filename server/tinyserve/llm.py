"""The small Python API: load a model, stream text, chat, tokenize, measure perplexity.

from tinyserve.llm import LLM
llm = LLM()                                   # the default model (downloaded on first use)
for piece in llm.generate("The capital of France is", stopping=StoppingParams(max_tokens=20)):
    print(piece, end="", flush=True)
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinyserve.engine import EngineConfig, FinishReason, LLMEngine, SamplingParams, StoppingParams
from tinyserve.engine.grammar import GrammarCompiler, GrammarMatcher, ResponseFormat
from tinyserve.engine.stream import TextStream
from tinyserve.models.chat_template import check_message_contents
from tinyserve.models.loader import LoadedModel, load_model


@dataclass
class GenerationStats:
    """What the last generate()/chat() did (filled in as it runs)."""

    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)  # output tokens
    finish_reason: FinishReason | None = None
    prefill_s: float = 0.0  # request added -> first token
    decode_s: float = 0.0  # first token -> last token
    stop_string: str | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.num_output_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.num_output_tokens / total if total > 0 else float("nan")


@dataclass
class PerplexityResult:
    ppl: float
    uncertainty: float  # +/- on the PPL (standard error of the mean NLL, times PPL)
    num_windows: int
    num_scored_tokens: int
    estimates: list[float]  # running PPL after each window


class LLM:
    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        name: str | None = None,
        engine_config: EngineConfig | None = None,
        threads: int | None = None,
        chat_template_fallback: str | None = None,
        device: str | None = None,
    ) -> None:
        from tinyserve import _core

        if threads is not None:
            _core.set_num_threads(threads)
        from tinyserve.models.catalog import DEFAULT_MODEL, resolve_model

        # a path, a catalog name (pulled on first use), or the default model
        served, model_path = resolve_model(DEFAULT_MODEL if model_path is None else model_path)
        self.model: LoadedModel = load_model(
            model_path, name or served, chat_template_fallback=chat_template_fallback, device=device
        )
        self.tokenizer = self.model.tokenizer
        self.engine = LLMEngine(self.model, engine_config or EngineConfig())
        self.last_stats = GenerationStats()
        self._ids = itertools.count()

    # -- text ------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special=skip_special)

    def generate(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        stopping: StoppingParams | None = None,
        response_format: ResponseFormat | None = None,
    ) -> Iterator[str]:
        """Stream text deltas. Stop strings are cut exactly; `last_stats` describes the run.
        `response_format` constrains the output (JSON Schema, regex, ...: engine/grammar.py)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        grammar = None
        if response_format is not None:  # compiled (and cached) before anything is queued
            grammar = GrammarCompiler.for_tokenizer(self.tokenizer).compile(response_format).matcher()
        return self._stream(ids, sampling or SamplingParams(), stopping or StoppingParams(), grammar)

    def generate_text(
        self,
        prompt: str | list[int],
        sampling: SamplingParams | None = None,
        stopping: StoppingParams | None = None,
        response_format: ResponseFormat | None = None,
    ) -> str:
        return "".join(self.generate(prompt, sampling, stopping, response_format))

    def chat(
        self,
        messages: list[dict],
        sampling: SamplingParams | None = None,
        stopping: StoppingParams | None = None,
        response_format: ResponseFormat | None = None,
        tools: list[dict] | None = None,
    ) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]).
        `tools` (OpenAI-style function tools) reach the chat template as its `tools` variable."""
        check_message_contents(messages, self.tokenizer)
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        text = self.model.chat_template.render(messages, add_generation_prompt=True, **extra)
        return self.generate(self.tokenizer.encode(text), sampling, stopping, response_format)

    def _stream(
        self, ids: list[int], sampling: SamplingParams, stopping: StoppingParams, grammar: GrammarMatcher | None = None
    ) -> Iterator[str]:
        engine = self.engine
        rid = f"llm-{next(self._ids)}"
        stats = self.last_stats = GenerationStats(num_prompt_tokens=len(ids))
        stream = TextStream(self.tokenizer, stopping.stop, skip_special=True, prefix_ids=ids)
        t0 = time.perf_counter()
        t_first = None
        engine.add_request(rid, ids, sampling, stopping, grammar=grammar)
        done = False
        try:
            while not done:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    if out.new_token_ids:
                        now = time.perf_counter()
                        if t_first is None:
                            t_first = now
                            stats.prefill_s = now - t0
                        stats.decode_s = now - t_first
                        stats.token_ids += out.new_token_ids
                        stats.num_output_tokens = len(stats.token_ids)
                    if out.finished:
                        done = True
                        stats.finish_reason = out.finish_reason
                        if out.finish_reason is FinishReason.ERROR:
                            raise RuntimeError(out.error or "generation failed")
                    text, stopped = stream.push(out.new_token_ids)
                    if text:
                        yield text
                    if stopped:
                        stats.finish_reason = FinishReason.STOP_SEQUENCE
                        stats.stop_string = stream.stop_string
                        return
            tail = stream.finish()
            if tail:
                yield tail
        finally:
            if not done:  # stop string, or the caller stopped iterating: free the request now
                engine.abort_request(rid)
                while engine.has_unfinished_requests():
                    engine.step()

    # -- perplexity --------------------------------------------------------------------------------
    def perplexity(
        self, text: str, ctx: int, batch_size: int = 512, callback: Callable[[int, float], None] | None = None
    ) -> PerplexityResult:
        """Perplexity the way llama.cpp's llama-perplexity measures it.

        The whole text is tokenized once (BOS first if the model adds one), cut into
        non-overlapping windows of `ctx` tokens (the incomplete tail is dropped); each window starts
        from an empty KV cache, its first token is replaced by BOS (if the model adds one), and only
        its second half is scored: the logits at positions [ctx/2, ctx-1) predict the tokens at
        [ctx/2 + 1, ctx). `batch_size` is the number of tokens per forward call (several windows
        share one call when they fit). callback(window number, running PPL) after each window.
        The KV cache has the engine's element type (EngineConfig.kv_dtype).
        """
        from tinyserve import _core

        cfg = self.model.config
        if ctx < 4 or ctx > cfg["context_length"]:
            raise ValueError(f"ctx must be in [4, {cfg['context_length']}], got {ctx}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tok = self.tokenizer
        bos = tok.bos_id if tok.add_bos else None  # each window starts with BOS, if the model wants one
        add_bos = bos is not None
        ids = tok.encode(text, add_bos=add_bos)
        n_windows = len(ids) // ctx
        if n_windows == 0:
            raise ValueError(f"the text has {len(ids)} tokens; perplexity with ctx={ctx} needs at least {ctx}")
        first = ctx // 2
        seqs_per_call = max(1, batch_size // ctx)
        chunk = min(ctx, batch_size)  # tokens of one window per call
        block = 16
        blocks_per_window = -(-ctx // block)
        kv = _core.KVCache(
            self.model.core,
            block_size=block,
            num_blocks=blocks_per_window * seqs_per_call,
            dtype=self.engine.config.kv_dtype,
        )
        tables = np.arange(blocks_per_window * seqs_per_call, dtype=np.int32).reshape(seqs_per_call, -1)
        nll = nll2 = 0.0
        count = 0
        estimates: list[float] = []
        for w0 in range(0, n_windows, seqs_per_call):
            windows = []
            for w in range(w0, min(w0 + seqs_per_call, n_windows)):
                win = np.asarray(ids[w * ctx : (w + 1) * ctx], dtype=np.int32)
                if bos is not None:
                    win[0] = bos
                windows.append(win)
            S = len(windows)
            scored: list[list[float]] = [[] for _ in range(S)]  # per window: logprob of each target, in order
            for c0 in range(0, ctx, chunk):
                c1 = min(c0 + chunk, ctx)
                rows, where = [], []
                for s in range(S):
                    for p in range(max(c0, first), min(c1, ctx - 1)):
                        rows.append(s * (c1 - c0) + p - c0)
                        where.append((s, p))
                logits = self.model.core.forward(
                    kv,
                    np.concatenate([win[c0:c1] for win in windows]),
                    np.full(S, c1 - c0, np.int32),
                    np.full(S, c0, np.int32),
                    tables[:S],
                    np.asarray(rows, dtype=np.int32),
                )
                if rows:
                    x = logits.astype(np.float64)
                    m = x.max(axis=1, keepdims=True)
                    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
                    targets = np.asarray([windows[s][p + 1] for s, p in where])
                    lp = x[np.arange(len(rows)), targets] - lse
                    for (s, _), v in zip(where, lp):
                        scored[s].append(float(v))
            for s in range(S):
                v = -np.asarray(scored[s])
                nll += float(v.sum())
                nll2 += float((v * v).sum())
                count += len(v)
                estimates.append(math.exp(nll / count))
                if callback:
                    callback(w0 + s + 1, estimates[-1])
        mean = nll / count
        var = max(nll2 / count - mean * mean, 0.0)
        unc = math.sqrt(var / (count - 1)) if count > 1 else float("nan")
        ppl = math.exp(mean)
        return PerplexityResult(
            ppl=ppl, uncertainty=unc * ppl, num_windows=n_windows, num_scored_tokens=count, estimates=estimates
        )
