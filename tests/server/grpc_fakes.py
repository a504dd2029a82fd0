"""A fake LLMEngine (same public API as tinyserve.engine.engine.LLMEngine) for fast server tests.

The "model" is an echo: it generates its prompt's tokens again, cyclically. The tokenizer is the
real Tokenizer over a tiny byte-level vocabulary (ids 0..2 are <|endoftext|> = BOS/EOS,
<|im_start|>, <|im_end|>; id 3 + b is byte b, no merges), so a prompt "ab<|endoftext|>" generates
"a", "b", EOS and finishes with STOP. KV blocks are counted like the real block manager so tests
can check that cancelled requests give theirs back.

Test knobs: `paused` (steps do nothing), `step_delay` (seconds per step), a prompt containing
"__error__" finishes with FinishReason.ERROR, one containing "__crash__" makes step() raise.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from tinyserve.engine.engine import EngineStats, QueueFullError, RequestOutput, TokenLogprob
from tinyserve.engine.params import EngineConfig, FinishReason, SamplingParams, StoppingParams
from tinyserve.models.chat_template import ChatTemplate
from tinyserve.models.tokenizer import Tokenizer

EOS, IM_START, IM_END, OFFSET = 0, 1, 2, 3
EOS_TEXT = "<|endoftext|>"
VOCAB = 256 + OFFSET

# ChatML, plus a role the template refuses (to test chat template errors).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'forbidden' %}{{ raise_exception('role forbidden') }}"
    "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    """GPT-2 style: printable bytes stand for themselves, the rest map to U+0100 onwards."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + n))
            n += 1
    return out


def fake_tokenizer() -> Tokenizer:
    tokens = [EOS_TEXT, "<|im_start|>", "<|im_end|>"] + _byte_symbols()
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * 256,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": EOS,
        "tokenizer.ggml.eos_token_id": EOS,
        "tokenizer.ggml.add_bos_token": False,
    }
    return Tokenizer.from_metadata(meta)


@dataclass
class FakeModel:
    name: str = "fake"
    path: str = "/dev/null"
    context_length: int = 256
    tokenizer: Tokenizer = field(default_factory=fake_tokenizer)
    chat_template: ChatTemplate = field(default_factory=lambda: ChatTemplate(CHAT_TEMPLATE))
    metadata: dict = field(default_factory=lambda: {"tokenizer.chat_template": CHAT_TEMPLATE})

    @property
    def config(self) -> dict:
        return {
            "arch": "fake",
            "context_length": self.context_length,
            "n_vocab": VOCAB,
            "n_layers": 2,
            "dim": 8,
            "n_heads": 2,
            "n_kv_heads": 1,
            "weight_bytes": 123,
        }


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    sink: object = None
    output: list[int] = field(default_factory=list)
    blocks: int = 0
    first_scheduled_time: float | None = None
    text: str = ""


class FakeEngine:
    def __init__(
        self,
        model: FakeModel | None = None,
        config: EngineConfig | None = None,
        num_blocks: int = 256,
        step_delay: float = 0.0,
    ):
        self.model = model or FakeModel()
        self.config = config or EngineConfig(block_size=4, max_num_seqs=8, max_waiting=16)
        self.num_blocks = num_blocks
        self.step_delay = step_delay
        self.paused = False
        self.num_steps = 0
        self._lock = threading.Lock()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._aborts: set[str] = set()
        self._paused: set[str] = set()
        self._live: set[str] = set()
        self._used = 0
        self._last = (0, 0)

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len or self.model.context_length

    def max_len(self, tenant: str) -> int:
        return self.max_model_len  # no KV shares here

    # ---- the LLMEngine API -----------------------------------------------------------------
    def add_request(
        self, request_id, prompt_token_ids, sampling, stopping, tenant="default", arrival_time=None, sink=None
    ) -> None:
        sampling.validate()
        stopping.validate()
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError("prompt does not fit the context")
        with self._lock:
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._waiting) >= self.config.max_waiting:
                raise QueueFullError(f"wait queue full ({self.config.max_waiting} requests)")
            self._live.add(request_id)
            seq = _Seq(request_id, list(prompt_token_ids), sampling, stopping, sink)
            seq.text = self.model.tokenizer.decode(prompt_token_ids)
            self._waiting.append(seq)

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def pause_request(self, request_id: str) -> None:
        with self._lock:
            self._paused.add(request_id)

    def resume_request(self, request_id: str) -> None:
        with self._lock:
            self._paused.discard(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running or self._aborts)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                num_running=len(self._running),
                num_waiting=len(self._waiting),
                num_paused=len(self._paused),
                kv_blocks_total=self.num_blocks,
                kv_blocks_used=self._used,
                last_batch_size=self._last[0],
                last_prefill_tokens=self._last[1],
                last_decode_tokens=self._last[0],
                num_preemptions=0,
                num_turns=0,
                scheduling=self.config.scheduling,
            )

    def step(self) -> list[RequestOutput]:
        if self.paused:
            time.sleep(0.005)
            return []
        if self.step_delay:
            time.sleep(self.step_delay)
        with self._lock:
            self.num_steps += 1
            outs = self._drop_aborted()
            while self._waiting and len(self._running) < self.config.max_num_seqs:
                seq = self._waiting[0]
                need = self._blocks_for(len(seq.prompt) + 1)
                if self._used + need > self.num_blocks:
                    break
                self._waiting.popleft()
                seq.blocks, self._used = need, self._used + need
                seq.first_scheduled_time = time.monotonic()
                self._running.append(seq)
            prefill = sum(len(s.prompt) for s in self._running if not s.output)
            for seq in self._running:
                if "__crash__" in seq.text:
                    raise RuntimeError("simulated engine failure")
            for seq in list(self._running):
                if seq.request_id not in self._paused:
                    outs.append(self._advance(seq))
            self._last = (len(self._running) + sum(1 for o in outs if o.finished), prefill)
            return outs

    # ---- internals -------------------------------------------------------------------------
    def _blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.config.block_size)

    def _out(self, seq, new, finished, reason, logprobs=None) -> RequestOutput:
        if finished:
            self._live.discard(seq.request_id)
        return RequestOutput(
            seq.request_id,
            new,
            logprobs,
            finished,
            reason,
            len(seq.prompt),
            0,
            len(seq.output),
            seq.first_scheduled_time,
            sink=seq.sink,
        )

    def _finish(self, seq) -> None:
        self._paused.discard(seq.request_id)
        self._running.remove(seq)
        self._used -= seq.blocks
        seq.blocks = 0

    def _drop_aborted(self) -> list[RequestOutput]:
        outs = []
        for rid in self._aborts:
            for seq in list(self._waiting):
                if seq.request_id == rid:
                    self._paused.discard(rid)
                    self._waiting.remove(seq)
                    outs.append(self._out(seq, [], True, FinishReason.CANCELLED))
            for seq in list(self._running):
                if seq.request_id == rid:
                    self._finish(seq)
                    outs.append(self._out(seq, [], True, FinishReason.CANCELLED))
        self._aborts.clear()
        return outs

    def _advance(self, seq: _Seq) -> RequestOutput:
        if "__error__" in seq.text:
            self._finish(seq)
            return self._out(seq, [], True, FinishReason.ERROR)
        body = seq.prompt
        tok = body[len(seq.output) % len(body)]
        seq.output.append(tok)
        need = self._blocks_for(len(seq.prompt) + len(seq.output) + 1)
        if need > seq.blocks:
            self._used += need - seq.blocks
            seq.blocks = need
        logprobs = None
        if seq.sampling.logprobs:
            top = [(tok, -0.25)] + [((tok + k) % VOCAB, -1.0 - k) for k in range(1, seq.sampling.logprobs)]
            logprobs = [TokenLogprob(tok, -0.25, top)]
        reason = None
        stop_ids = set(seq.stopping.stop_token_ids)
        if not seq.stopping.ignore_eos:
            stop_ids |= self.model.tokenizer.stop_ids
        if tok in stop_ids:
            reason = FinishReason.STOP
        elif len(seq.output) >= seq.stopping.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._finish(seq)
        return self._out(seq, [tok], reason is not None, reason, logprobs)
