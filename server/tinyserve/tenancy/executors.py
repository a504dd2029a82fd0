"""Per-tenant thread pools for chat-template rendering, tokenization and detokenization, so one
tenant's huge prompts queue behind each other and never in front of another tenant's work.

Pools are created on first use with the tenant's `threads` workers. A reload that changes a
tenant's size gives it a new pool; the old one is shut down without cancelling anything (work
already queued on it still runs, then its threads exit). A removed tenant's pool goes the same
way; its in-flight streams keep working through a small shared pool for unknown tenants.
Submitting goes through `submit()` (under the lock that guards the swap), so work is never
handed to a pool that has just been shut down.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from .config import TenantsConfig

R = TypeVar("R")

ORPHAN_THREADS = 1  # pool for tenants not in the config (removed by a reload, streams in flight)


class TenantExecutors:
    def __init__(self, tenants: TenantsConfig, thread_name_prefix: str = "tinyserve-tenant"):
        self._lock = threading.Lock()
        self._prefix = thread_name_prefix
        self._sizes = {t.name: t.threads for t in tenants}
        self._pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}  # tenant -> (size, pool)
        self._orphans: ThreadPoolExecutor | None = None
        self._closed = False
        self._generation = 0  # in thread names: tells a resized pool's threads from the old ones

    def _pool(self, tenant: str) -> ThreadPoolExecutor:
        """The tenant's current pool, created if needed (lock held)."""
        if self._closed:
            raise RuntimeError("the tenant executors are shut down")
        size = self._sizes.get(tenant)
        if size is None:
            if self._orphans is None:
                self._orphans = ThreadPoolExecutor(ORPHAN_THREADS, f"{self._prefix}-orphans")
            return self._orphans
        entry = self._pools.get(tenant)
        if entry is None or entry[0] != size:
            self._generation += 1
            pool = ThreadPoolExecutor(size, f"{self._prefix}-{tenant}-g{self._generation}")
            self._pools[tenant] = (size, pool)
            return pool
        return entry[1]

    def submit(self, tenant: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> Future[R]:
        """Run fn(*args, **kwargs) on the tenant's pool."""
        with self._lock:
            return self._pool(tenant).submit(fn, *args, **kwargs)

    async def run(self, tenant: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Await fn(*args, **kwargs) run on the tenant's pool (from the asyncio thread)."""
        return await asyncio.wrap_future(self.submit(tenant, fn, *args, **kwargs))

    def size(self, tenant: str) -> int | None:
        """Workers of the tenant's pool (None: not a configured tenant)."""
        return self._sizes.get(tenant)

    def update(self, tenants: TenantsConfig) -> None:
        """Apply a reload: resized and removed tenants' pools are replaced/dropped (shut down
        without waiting or cancelling; their queued work still runs)."""
        old: list[ThreadPoolExecutor] = []
        with self._lock:
            self._sizes = {t.name: t.threads for t in tenants}
            for name, (size, pool) in list(self._pools.items()):
                if self._sizes.get(name) != size:
                    del self._pools[name]
                    old.append(pool)
        for pool in old:
            pool.shutdown(wait=False, cancel_futures=False)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            pools = [p for _, p in self._pools.values()] + ([self._orphans] if self._orphans else [])
            self._pools.clear()
            self._orphans = None
        for pool in pools:
            pool.shutdown(wait=wait)
