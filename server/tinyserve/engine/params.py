"""Request parameters (sampling, stopping), finish reasons and the engine configuration."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Callable

MAX_LOGPROBS = 20


class ParamError(ValueError):
    """A request parameter is invalid. `.field` names it (e.g. "sampling.top_p")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ParamError(name, f"must be a finite number, got {value!r}")


def _int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ParamError(name, f"must be an integer, got {value!r}")


@dataclass
class SamplingParams:
    temperature: float = 1.0         # 0 = greedy (argmax, ties -> lowest id)
    top_k: int = 0                   # keep the k most likely tokens; 0 = off
    top_p: float = 1.0               # nucleus: smallest set with cumulative prob >= top_p; in (0, 1]
    min_p: float = 0.0               # drop tokens with prob < min_p * max prob; in [0, 1)
    repetition_penalty: float = 1.0  # > 0; 1 = off. Over prompt + output tokens (divide positive logits,
                                     # multiply negative ones), as llama.cpp / HF do
    presence_penalty: float = 0.0    # OpenAI style, over output tokens: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0   # logit -= frequency * count
    seed: int | None = None          # same seed + same request -> same tokens; None = random
    logprobs: int = 0                # > 0: chosen token's logprob and this many top alternatives (max 20)

    def validate(self) -> None:
        _finite("sampling.temperature", self.temperature)
        if self.temperature < 0:
            raise ParamError("sampling.temperature", f"must be >= 0, got {self.temperature}")
        _int("sampling.top_k", self.top_k)
        if self.top_k < 0:
            raise ParamError("sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _finite("sampling.top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ParamError("sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        _finite("sampling.min_p", self.min_p)
        if not 0.0 <= self.min_p < 1.0:
            raise ParamError("sampling.min_p", f"must be in [0, 1), got {self.min_p}")
        _finite("sampling.repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ParamError("sampling.repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        _finite("sampling.presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ParamError("sampling.presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _finite("sampling.frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ParamError("sampling.frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None:
            _int("sampling.seed", self.seed)
            if not 0 <= self.seed < 2**64:
                raise ParamError("sampling.seed", f"must be in [0, 2^64), got {self.seed}")
        _int("sampling.logprobs", self.logprobs)
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ParamError("sampling.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


@dataclass
class StoppingParams:
    max_tokens: int = 256                                  # output tokens (the stop token included)
    stop: list[str] = field(default_factory=list)          # stop strings (cut exactly; may span tokens)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False                               # keep going past the model's EOS/EOT tokens

    def validate(self) -> None:
        _int("stopping.max_tokens", self.max_tokens)
        if self.max_tokens < 1:
            raise ParamError("stopping.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if len(self.stop) > 16:
            raise ParamError("stopping.stop", f"at most 16 stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ParamError("stopping.stop", f"stop strings must be non-empty strings, got {s!r}")
            if len(s) > 256:
                raise ParamError("stopping.stop", "a stop string is longer than 256 characters")
        for t in self.stop_token_ids:
            _int("stopping.stop_token_ids", t)
            if t < 0:
                raise ParamError("stopping.stop_token_ids", f"token ids are >= 0, got {t}")


class FinishReason(str, enum.Enum):
    STOP = "stop"            # EOS / stop token id / stop string
    LENGTH = "length"        # max_tokens or the context limit
    CANCELLED = "cancelled"  # abort_request (client gone, deadline)
    ERROR = "error"


@dataclass
class EngineConfig:
    block_size: int = 16                # positions per KV block
    kv_budget_bytes: int = 256 << 20    # KV arena size; the number of blocks is what fits
    kv_dtype: str = "f16"
    max_num_seqs: int = 64              # cap on running sequences
    max_num_batched_tokens: int = 512   # per-step token budget (decode tokens + prefill chunk tokens)
    max_waiting: int = 256              # bounded wait queue
    max_model_len: int | None = None    # default: model context length (and never more than the KV arena)
    num_kv_blocks: int | None = None    # overrides kv_budget_bytes (tests, benchmarks)
    enable_prefix_caching: bool = True  # reuse the KV of full prompt blocks (per tenant)
    scheduling: str = "fair"            # "fair": weighted fair share between tenants; "fifo": arrival order
    tenant_weight: Callable[[str], float] | None = None    # fair-share weight (default 1 each)
    tenant_kv_share: Callable[[str], float] | None = None  # fraction of KV blocks a tenant may hold
                                                           # (default 1.0); called every step (reloads)
    turn_steps: int = 128               # a request waiting for its first token may preempt a sequence
                                        # admitted at least this many steps ago; 0 = never (see scheduler)

    def validate(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ParamError(f"engine.{name}", f"must be a positive integer, got {v!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ParamError("engine.max_model_len", f"must be >= 2, got {self.max_model_len}")
        if not isinstance(self.turn_steps, int) or self.turn_steps < 0:
            raise ParamError("engine.turn_steps", f"must be an integer >= 0, got {self.turn_steps!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ParamError("engine.num_kv_blocks", f"must be >= 1, got {self.num_kv_blocks}")
        if self.scheduling not in ("fair", "fifo"):
            raise ParamError("engine.scheduling", f"must be 'fair' or 'fifo', got {self.scheduling!r}")
