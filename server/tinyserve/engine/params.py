"""Request parameters (sampling, stopping), finish reasons and the engine configuration."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeGuard

# The request limits (the proto documents the same numbers); checked by violations() only.
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256  # per stop string, UTF-8 bytes
PENALTY_RANGE = (-2.0, 2.0)  # presence_penalty and frequency_penalty, inclusive


# KV cache element types (the core's KVCache): int8 with fp16 scales per 32 elements (q8_0; half
# the bytes of f16, README "int8 KV cache"), f16, or f32 (tests).
KV_DTYPES = ("q8_0", "f16", "f32")
DEFAULT_KV_DTYPE = "f16"


def default_kv_dtype() -> str:
    """$TINYSERVE_KV_DTYPE, else DEFAULT_KV_DTYPE (checked by EngineConfig.validate)."""
    return os.environ.get("TINYSERVE_KV_DTYPE") or DEFAULT_KV_DTYPE


class ParamError(ValueError):
    """A request parameter is invalid. `.field` names it (e.g. "sampling.top_p")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(name: str, value: object) -> ParamError | None:
    if not _is_number(value) or not math.isfinite(value):
        return ParamError(name, f"must be a finite number, got {value!r}")
    return None


def _int(name: str, value: object) -> ParamError | None:
    if not _is_int(value):
        return ParamError(name, f"must be an integer, got {value!r}")
    return None


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax, ties -> lowest id)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: smallest set with cumulative prob >= top_p; in (0, 1]
    min_p: float = 0.0  # drop tokens with prob < min_p * max prob; in [0, 1)
    repetition_penalty: float = 1.0  # > 0; 1 = off. Over prompt + output tokens (divide positive logits,
    # multiply negative ones), as llama.cpp / HF do
    presence_penalty: float = 0.0  # OpenAI style, over output tokens: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # logit -= frequency * count
    seed: int | None = None  # same seed + same request -> same tokens; None = random
    logprobs: int = 0  # > 0: chosen token's logprob and this many top alternatives (max 20)

    def validate(self) -> None:
        """Raise the first ParamError of violations()."""
        bad = self.violations()
        if bad:
            raise bad[0]

    def violations(self) -> list[ParamError]:
        """Every invalid field, in field order (empty: the parameters are valid)."""
        out: list[ParamError] = []
        lo, hi = PENALTY_RANGE
        ranges: tuple[tuple[str, Callable[[float], bool], str], ...] = (
            # (field, predicate on a finite value, what it must be)
            ("temperature", lambda v: v >= 0, "must be >= 0"),
            ("top_p", lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
            ("min_p", lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
            ("repetition_penalty", lambda v: v > 0, "must be > 0 (1 = off)"),
            ("presence_penalty", lambda v: lo <= v <= hi, f"must be in [{lo:g}, {hi:g}]"),
            ("frequency_penalty", lambda v: lo <= v <= hi, f"must be in [{lo:g}, {hi:g}]"),
        )
        for name, ok, must in ranges:
            value, field = getattr(self, name), f"sampling.{name}"
            err = _finite(field, value)
            if err is None and not ok(value):
                err = ParamError(field, f"{must}, got {value}")
            if err is not None:
                out.append(err)
        err = _int("sampling.top_k", self.top_k)
        if err is None and self.top_k < 0:
            err = ParamError("sampling.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if err is not None:
            out.append(err)
        if self.seed is not None:
            err = _int("sampling.seed", self.seed)
            if err is None and not 0 <= self.seed < 2**64:
                err = ParamError("sampling.seed", f"must be in [0, 2^64), got {self.seed}")
            if err is not None:
                out.append(err)
        err = _int("sampling.logprobs", self.logprobs)
        if err is None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            err = ParamError("sampling.logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if err is not None:
            out.append(err)
        return out


@dataclass
class StoppingParams:
    max_tokens: int = 256  # output tokens (the stop token included)
    stop: list[str] = field(default_factory=list)  # stop strings (cut exactly; may span tokens)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past the model's EOS/EOT tokens

    def validate(self) -> None:
        """Raise the first ParamError of violations()."""
        bad = self.violations()
        if bad:
            raise bad[0]

    def violations(self) -> list[ParamError]:
        """Every invalid field, in field order (token ids are checked against a vocabulary by
        whoever knows it). Stop strings are 1 to MAX_STOP_BYTES UTF-8 bytes each."""
        out: list[ParamError] = []
        err = _int("stopping.max_tokens", self.max_tokens)
        if err is None and self.max_tokens < 1:
            err = ParamError("stopping.max_tokens", f"must be >= 1, got {self.max_tokens}")
        if err is not None:
            out.append(err)
        if len(self.stop) > MAX_STOP_STRINGS:
            out.append(ParamError("stopping.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"))
        for i, s in enumerate(self.stop):
            if not isinstance(s, str):
                out.append(ParamError(f"stopping.stop[{i}]", f"must be a string, got {type(s).__name__}"))
                continue
            n = len(s.encode("utf-8", "surrogatepass"))
            if not 1 <= n <= MAX_STOP_BYTES:
                out.append(ParamError(f"stopping.stop[{i}]", f"must be 1 to {MAX_STOP_BYTES} bytes, got {n}"))
        for i, t in enumerate(self.stop_token_ids):
            err = _int(f"stopping.stop_token_ids[{i}]", t)
            if err is None and t < 0:
                err = ParamError(f"stopping.stop_token_ids[{i}]", f"token ids are >= 0, got {t}")
            if err is not None:
                out.append(err)
        return out


class FinishReason(str, enum.Enum):
    """Why a request ended: the one set of reasons, mapped to the API's enum once (api/servicer.py)."""

    STOP = "stop"  # EOS or a stop token id (LLM: also a stop string)
    STOP_SEQUENCE = "stop_sequence"  # a stop string matched (found while detokenizing: stream.py)
    LENGTH = "length"  # max_tokens or the context limit
    CANCELLED = "cancelled"  # abort_request (client gone, deadline)
    ERROR = "error"  # the forward failed, or the request can never fit


@dataclass
class EngineConfig:
    block_size: int = 16  # positions per KV block
    kv_budget_bytes: int = 256 << 20  # KV arena size; the number of blocks is what fits (the
    # server sizes its default from the machine: config.py)
    kv_dtype: str = field(default_factory=default_kv_dtype)  # one of KV_DTYPES
    max_num_seqs: int = 128  # cap on running sequences
    max_num_batched_tokens: int = 512  # per-step token budget (decode tokens + prefill chunk tokens)
    # while one tenant has the engine to itself
    contended_step_tokens: int = 96  # the budget while another tenant was busy in the last
    # contended_window_steps steps and all of them still have work (see scheduler.py, "Budget")
    idle_step_tokens: int = 32  # ... and one of them has none: its next request waits for the step
    contended_window_steps: int = 256
    max_waiting: int = 256  # bounded wait queue
    max_model_len: int | None = None  # default: model context length (and never more than the KV arena)
    num_kv_blocks: int | None = None  # overrides kv_budget_bytes (tests, benchmarks)
    enable_prefix_caching: bool = True  # reuse the KV of full prompt blocks (per tenant)
    scheduling: str = "fair"  # "fair": weighted fair share between tenants; "fifo": arrival order
    tenant_weight: Callable[[str], float] | None = None  # fair-share weight (default 1 each)
    tenant_kv_share: Callable[[str], float] | None = None  # fraction of KV blocks a tenant may hold
    # (default 1.0); called every step (reloads)
    turn_steps: int = 128  # a request waiting for its first token may preempt a sequence
    # admitted at least this many steps ago; 0 = never (see scheduler)

    def validate(self) -> None:
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_waiting",
            "contended_step_tokens",
            "idle_step_tokens",
            "contended_window_steps",
        ):
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
        if self.kv_dtype not in KV_DTYPES:
            raise ParamError(
                "engine.kv_dtype",
                f"must be one of {', '.join(KV_DTYPES)} (--kv-dtype, $TINYSERVE_KV_DTYPE), got {self.kv_dtype!r}",
            )
