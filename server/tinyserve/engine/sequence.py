"""One request's state inside the engine: its tokens, its KV blocks and where it is in its life."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from .params import FinishReason, SamplingParams, StoppingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds KV blocks (for all its tokens, plus the next one's once decoding):
    # prefilling in chunks, decoding one token per step, or paused
    FINISHED = "finished"  # blocks freed; finish_reason says why


class Sequence:
    """Tokens are `prompt + output`. The KV of the first `num_computed_tokens` of them is in the
    sequence's blocks; a step feeds the model the next `num_tokens - num_computed_tokens` (a prefill
    chunk, or the one token sampled last step) and samples a new token once all are computed."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        stopping: StoppingParams,
        tenant: str = "default",
        arrival_time: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.stopping = stopping
        self.tenant = tenant  # fair share, KV share and the prefix cache's salt
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None  # message when finish_reason is ERROR
        self.cancelled = False  # set by abort; honoured at the next schedule()
        self.paused = False  # its client is not reading: not scheduled (backpressure)
        self.admitted_at_step = 0  # scheduler step that last moved it to RUNNING
        self.num_computed_tokens = 0  # tokens whose K/V are in the blocks
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_table: list[int] = []  # KV block ids, in position order
        self.block_hashes: list[int] = []  # prefix-cache hash of each full, computed block
        self.num_preemptions = 0
        self.seed = seed  # the per-request RNG; also survives preemption
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.sink: Any = None  # the caller's, handed back with every output
        self.grammar: Any = None  # grammar.GrammarMatcher of a structured request: it
        # follows the output tokens, so preemption keeps it

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Running with only the last sampled token left to feed (its prompt is fully computed)."""
        return self.status is SequenceStatus.RUNNING and self.num_uncomputed_tokens == 1 and self.num_output_tokens > 0

    @property
    def has_output(self) -> bool:
        """It has generated a token: its client is streaming (or waits for the next one), not
        waiting for its first."""
        return len(self.token_ids) > self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
