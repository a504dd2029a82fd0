"""Fixtures for tests/model: tiny random GGUF models (written once per session) and helpers that
drive `tinyserve._core.Model.forward` one sequence or one ragged batch at a time."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # reference.py, tiny_models.py (tests have no packages)

from tiny_models import TinySpec, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """tiny_model_path(spec) -> path of a GGUF written from `spec` (cached for the session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[TinySpec, Path] = {}

    def get(spec: TinySpec) -> Path:
        if spec not in made:
            made[spec] = write_tiny_model(root / f"tiny{len(made)}.gguf", spec)
        return made[spec]

    return get


def i32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.int32))


def forward_batch(model, kv, seqs, logit_rows=None) -> np.ndarray:
    """seqs: list of (tokens, start_pos, block_ids). Runs ONE forward over the ragged batch and
    returns the logits of `logit_rows` (default: every row)."""
    tokens = np.concatenate([i32(t) for t, _, _ in seqs])
    width = max(len(b) for _, _, b in seqs)
    tables = np.full((len(seqs), width), -1, dtype=np.int32)
    for s, (_, _, blocks) in enumerate(seqs):
        tables[s, : len(blocks)] = blocks
    rows = np.arange(len(tokens), dtype=np.int32) if logit_rows is None else i32(logit_rows)
    return model.forward(kv, tokens, i32([len(t) for t, _, _ in seqs]), i32([p for _, p, _ in seqs]), tables, rows)


def forward_seq(model, kv, tokens, start_pos, blocks) -> np.ndarray:
    """One sequence alone; logits of every new token."""
    return forward_batch(model, kv, [(tokens, start_pos, blocks)])


def blocks_needed(n_positions: int, block_size: int) -> int:
    return -(-n_positions // block_size)
