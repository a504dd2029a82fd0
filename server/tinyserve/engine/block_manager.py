"""Hands out fixed-size KV blocks (ids 0..num_blocks-1) from a free list, with reference counts,
and keeps a prefix cache of full blocks.

Prefix caching: once a block is full and its K/V computed, it is registered under a hash chained
over every token from position 0 (hash(previous block's hash, this block's tokens)), the chain
starting from the tenant's salt, so tenants never share blocks. A new sequence reuses the blocks of
its longest cached prefix (reference count + 1) and only computes the rest. Freed blocks keep their
contents and hash: they stay reusable until the allocator takes them for something else, oldest
freed first (a sequence's tail blocks are freed before its head, so shared heads live longest).
Blocks in the cache are never written: a sequence only writes positions past its full blocks.

Per-tenant accounting: a block in use (reference count > 0) belongs to one tenant (the salted
chain means only that tenant's sequences can share it). `num_held(tenant)` counts them; cached but
free blocks count for nobody. With `max_blocks(tenant)` set (the scheduler's KV shares), a tenant
never gets more blocks than that: `can_allocate`/`max_new_tokens` say no once it holds its share.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from .sequence import Sequence


def _root_hash(salt: str) -> int:
    return hash(("tinyserve-prefix", salt))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        max_blocks: Callable[[str], int] | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.block_hash: list[int | None] = [None] * num_blocks  # set once full and computed
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # guards against collisions
        self.hash_to_block: dict[int, int] = {}
        self.num_cache_hits = 0  # blocks reused, in all
        self.block_owner: list[str | None] = [None] * num_blocks  # tenant of each block in use
        self.num_held_by: dict[str, int] = {}  # tenant -> blocks in use
        self.max_blocks = max_blocks  # tenant -> most blocks it may hold; None = no per-tenant cap

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def num_held(self, tenant: str) -> int:
        """Blocks in use by `tenant`'s sequences (shared ones once)."""
        return self.num_held_by.get(tenant, 0)

    def num_free_for(self, tenant: str) -> int:
        """Free blocks `tenant` may still take: the free list, capped by its share."""
        if self.max_blocks is None:
            return self.num_free_blocks
        return max(0, min(self.num_free_blocks, self.max_blocks(tenant) - self.num_held(tenant)))

    def at_share(self, tenant: str) -> bool:
        """True when `tenant` may take no block because it holds its whole share."""
        return self.max_blocks is not None and self.num_held(tenant) >= self.max_blocks(tenant)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold positions [0, num_tokens)."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must still get to write `num_new_tokens` more positions."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return max(0, need - len(seq.block_table))

    def max_new_tokens(self, seq: Sequence) -> int:
        """How many more positions `seq` could write with its blocks plus the free blocks its
        tenant may take."""
        capacity = (len(seq.block_table) + self.num_free_for(seq.tenant)) * self.block_size
        return max(0, capacity - seq.num_computed_tokens)

    # -- prefix cache ----------------------------------------------------------------------------
    def _cached_prefix(self, seq: Sequence) -> Iterator[tuple[int, int]]:
        """(hash, block id) of each block of `seq`'s longest cached prefix, in order (never the
        block holding its last token, whose logits we need)."""
        bs = self.block_size
        prev = _root_hash(seq.tenant)
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((prev, tokens))
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.block_tokens[block_id] != tokens:
                return
            yield h, block_id
            prev = h

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence without blocks: take the cached blocks of its longest cached prefix.
        Returns the number of tokens reused."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        for h, block_id in list(self._cached_prefix(seq)):
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
                self._hold(block_id, seq.tenant)
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        self.num_cache_hits += len(seq.block_table)
        return seq.num_computed_tokens

    def num_blocks_to_admit(self, seq: Sequence) -> int:
        """Free blocks that admitting `seq` (no blocks yet) with blocks for all its tokens takes:
        all it needs, less the cached prefix blocks other sequences hold (those it shares; cached
        blocks on the free list still come off it)."""
        shared = 0
        if self.enable_prefix_caching and not seq.block_table:
            shared = sum(1 for _, b in self._cached_prefix(seq) if self.ref_counts[b] > 0)
        return self.blocks_needed(seq.num_tokens) - len(seq.block_table) - shared

    def num_freed_by(self, seq: Sequence) -> int:
        """Blocks that deallocating `seq` would put back on the free list (not those it shares)."""
        return sum(1 for b in seq.block_table if self.ref_counts[b] == 1)

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a forward: put the sequence's newly full, computed blocks into the cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(len(seq.block_table), seq.num_computed_tokens // bs)
        for i in range(len(seq.block_hashes), n_full):
            prev = seq.block_hashes[-1] if seq.block_hashes else _root_hash(seq.tenant)
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash((prev, tokens))
            seq.block_hashes.append(h)
            block_id = seq.block_table[i]
            if self.block_hash[block_id] is None and h not in self.hash_to_block:
                self.block_hash[block_id] = h
                self.block_tokens[block_id] = tokens
                self.hash_to_block[h] = block_id

    def _hold(self, block_id: int, tenant: str) -> None:
        self.block_owner[block_id] = tenant
        self.num_held_by[tenant] = self.num_held_by.get(tenant, 0) + 1

    def _release(self, block_id: int) -> None:
        tenant = self.block_owner[block_id]
        self.block_owner[block_id] = None
        if tenant is not None:
            n = self.num_held_by[tenant] - 1
            if n:
                self.num_held_by[tenant] = n
            else:
                del self.num_held_by[tenant]

    def _take_free_block(self, tenant: str) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        h = self.block_hash[block_id]
        if h is not None:  # evict it from the prefix cache: it is about to be overwritten
            if self.hash_to_block.get(h) == block_id:
                del self.hash_to_block[h]
            self.block_hash[block_id] = None
            self.block_tokens[block_id] = None
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        self._hold(block_id, tenant)
        return block_id

    # -- prompt chunks ---------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_new_tokens) <= self.num_free_for(seq.tenant)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        n = self.num_new_blocks(seq, num_new_tokens)
        if n > self.num_free_for(seq.tenant):
            raise RuntimeError(
                f"allocate: {seq.request_id} needs {n} blocks, {self.num_free_blocks} free, "
                f"{self.num_free_for(seq.tenant)} within tenant {seq.tenant!r}'s share"
            )
        for _ in range(n):
            seq.block_table.append(self._take_free_block(seq.tenant))

    # -- decode: one more position ---------------------------------------------------------------
    def can_append(self, seq: Sequence) -> bool:
        return self.can_allocate(seq, 1)

    def may_append(self, seq: Sequence) -> None:
        self.allocate(seq, 1)

    # -- release ---------------------------------------------------------------------------------
    def deallocate(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks (tail first, so heads stay cached longest)."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] >= 0, f"block {block_id} freed twice"
            if self.ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
                self._release(block_id)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
