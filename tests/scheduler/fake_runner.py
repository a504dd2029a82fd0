"""A fake model runner for driving the engine step by step without the C++ core.

It keeps a paged "KV cache" of token ids: each forward writes its new tokens into the blocks named by
the block tables and reads the whole history of every sequence back from them. The next-token logits
are a hash of that history, so a wrong block table, a block shared by two live sequences or a block
freed too early changes the generated tokens.
"""

from __future__ import annotations

import random
import zlib
from types import SimpleNamespace

import numpy as np

from tinyserve.engine import EngineConfig, LLMEngine, SamplingParams

VOCAB = 64
EOS = 63


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab: int = VOCAB, avoid: int | None = EOS):
        self.cache = np.full((num_blocks, block_size), -1, dtype=np.int64)
        self.block_size = block_size
        self.vocab = vocab
        self.avoid = avoid
        self.calls: list[dict] = []
        self.shared_blocks_seen = 0
        self.bm = None  # the engine's block manager (set by make_engine): cached blocks are read-only

    def next_logits(self, history: list[int]) -> np.ndarray:
        h = zlib.crc32(np.asarray(history, dtype=np.int64).tobytes())
        rng = np.random.default_rng(h)
        logits = rng.normal(0.0, 1.0, self.vocab).astype(np.float32)
        top = h % self.vocab
        if top == self.avoid:
            top = (top + 1) % self.vocab
        logits[top] += 4.0
        if self.avoid is not None:
            logits[self.avoid] = -30.0  # the fake never says EOS unless a test asks for it
        return logits

    def __call__(self, kv, tokens, seq_lens, start_pos, block_tables, logit_rows):
        assert kv is None
        assert tokens.dtype == np.int32 and seq_lens.dtype == np.int32 and start_pos.dtype == np.int32
        assert block_tables.dtype == np.int32 and logit_rows.dtype == np.int32
        assert block_tables.shape[0] == len(seq_lens) == len(start_pos)
        assert int(seq_lens.sum()) == len(tokens) and (seq_lens > 0).all()
        bs = self.block_size
        owners: dict[int, int] = {}  # block -> number of sequences in this batch using it
        for row in block_tables:
            for b in set(row.tolist()) - {-1}:
                owners[b] = owners.get(b, 0) + 1
        self.shared_blocks_seen += sum(1 for n in owners.values() if n > 1)
        self.calls.append(
            {"seq_lens": seq_lens.tolist(), "start_pos": start_pos.tolist(), "num_logit_rows": len(logit_rows)}
        )
        row_logits: dict[int, np.ndarray] = {}
        off = 0
        wanted = set(logit_rows.tolist())
        for s in range(len(seq_lens)):
            table = block_tables[s]
            for j in range(int(seq_lens[s])):
                p = int(start_pos[s]) + j
                blk = int(table[p // bs])
                assert blk >= 0, f"position {p} has no block"
                assert owners[blk] == 1, f"block {blk} is shared (prefix cache) but written"
                assert self.bm is None or self.bm.block_hash[blk] is None, (
                    f"block {blk} is in the prefix cache but written"
                )
                self.cache[blk, p % bs] = tokens[off + j]
                if off + j in wanted:
                    hist = [int(self.cache[table[q // bs], q % bs]) for q in range(p + 1)]
                    assert -1 not in hist
                    row_logits[off + j] = self.next_logits(hist)
            off += int(seq_lens[s])
        return (
            np.stack([row_logits[r] for r in logit_rows.tolist()])
            if len(logit_rows)
            else np.zeros((0, self.vocab), np.float32)
        )


def make_engine(num_blocks: int = 64, block_size: int = 4, context_length: int = 4096, **cfg):
    config = EngineConfig(block_size=block_size, num_kv_blocks=num_blocks, **cfg)
    model = SimpleNamespace(
        name="fake",
        config={"n_vocab": VOCAB, "context_length": context_length, "n_layers": 1, "n_kv_heads": 1, "head_dim": 8},
        tokenizer=SimpleNamespace(stop_ids=frozenset({EOS})),
    )
    runner = FakeRunner(num_blocks, block_size)
    engine = LLMEngine(model, config, forward=runner)
    runner.bm = engine.scheduler.block_manager
    return engine, runner


def random_budget(rnd: random.Random, min_blocks: int = 16, max_blocks: int = 48) -> dict:
    """make_engine() keywords for a small random budget (the random-workload tests): a block count
    in [min_blocks, max_blocks), block size 4, then batch tokens, sequences and prefix caching,
    drawn from `rnd` in that order."""
    return dict(
        num_blocks=rnd.randrange(min_blocks, max_blocks),
        block_size=4,
        max_num_batched_tokens=rnd.randrange(4, 40),
        max_num_seqs=rnd.randrange(1, 8),
        enable_prefix_caching=rnd.random() < 0.5,
    )


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def run_all(engine: LLMEngine, max_steps: int = 10_000, on_step=None) -> dict[str, dict]:
    """Step until idle; per request: tokens, finish reason, number of outputs."""
    res: dict[str, dict] = {}
    for step in range(max_steps):
        if not engine.has_unfinished_requests():
            return res
        outs = engine.step()
        if on_step:
            on_step(step, outs)
        for o in outs:
            r = res.setdefault(o.request_id, {"tokens": [], "finish_reason": None, "finished": False})
            assert not r["finished"], "output after the request finished"
            r["tokens"] += o.new_token_ids
            r["finished"] = o.finished
            r["finish_reason"] = o.finish_reason
            r["num_output_tokens"] = o.num_output_tokens
    raise AssertionError("engine did not go idle (deadlock or livelock)")


def prompt(n: int, salt: int = 0) -> list[int]:
    return [(7 * i + 3 * salt + 1) % (VOCAB - 1) for i in range(n)]
