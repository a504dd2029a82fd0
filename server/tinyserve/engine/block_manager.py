"""Hands out fixed-size KV blocks (ids 0..num_blocks-1) from a free list, with reference counts.

The C++ KVCache only stores; which block holds which positions of which sequence is decided here.
Reference counts are there for prefix caching (several sequences sharing the same full prompt
blocks, found through a hash chained over full blocks and salted with the tenant); today every
block has exactly one owner.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # Prefix-cache hook: hash of a full block's tokens (chained with the previous block's hash
        # and the tenant salt) -> block id. Empty until prefix caching lands.
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold positions [0, num_tokens)."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must still get to write `num_new_tokens` more positions."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def max_new_tokens(self, seq: Sequence) -> int:
        """How many more positions `seq` could write with its blocks plus every free block."""
        capacity = (len(seq.block_table) + self.num_free_blocks) * self.block_size
        return max(0, capacity - seq.num_computed_tokens)

    # -- prompt chunks ---------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > self.num_free_blocks:
            raise RuntimeError(f"allocate: {seq.request_id} needs {n} blocks, {self.num_free_blocks} free")
        for _ in range(n):
            block_id = self.free_block_ids.popleft()
            assert self.ref_counts[block_id] == 0
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    # -- decode: one more position ---------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        return self.can_allocate(seq, 1)

    def may_append(self, seq: Sequence) -> None:
        self.allocate(seq, 1)

    # -- release ---------------------------------------------------------------------------------
    def deallocate(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks (newest first, so the oldest are reused last)."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
