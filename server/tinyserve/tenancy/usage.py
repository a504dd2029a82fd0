"""Per-tenant usage counters: requests, prompt tokens, prompt tokens served from the prefix
cache, generated tokens, and rejections by reason. Thread-safe.

There is deliberately no "all tenants" getter: `snapshot(tenant)` answers for one named tenant
(the API passes the caller's own tenant, so nobody reads another's numbers). The operator's view
is the Prometheus metrics: pass `observer` and every increment is mirrored there with a tenant
label.

The counts live in a QuotaStore (store.py): this process's memory by default, or the Redis the
replicas share, so that GetUsage answers for the tenant across every replica.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .store import InProcessStore, QuotaStore

# observer(tenant, counter, amount, reason): counter is one of COUNTERS; reason only for
# "rejections" (a QuotaExceeded.kind, "unauthenticated", "permission_denied", ...).
Observer = Callable[[str, str, int, "str | None"], None]

COUNTERS = ("requests", "prompt_tokens", "cached_prompt_tokens", "generated_tokens", "rejections")


@dataclass(frozen=True)
class UsageSnapshot:
    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    rejections: Mapping[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def total_rejections(self) -> int:
        return sum(self.rejections.values())


class Usage:
    def __init__(self, observer: Observer | None = None, store: QuotaStore | None = None):
        self._store = store or InProcessStore()
        self._observer = observer

    def _add(self, tenant: str, counter: str, amount: int, reason: str | None = None) -> None:
        if amount < 0:
            raise ValueError(f"usage counter {counter} cannot go down (got {amount})")
        if amount == 0:
            return
        self._store.add_usage(tenant, counter, amount, reason)  # buffered: never blocks
        if self._observer is not None:
            self._observer(tenant, counter, amount, reason)

    def record_request(self, tenant: str) -> None:
        """An admitted request."""
        self._add(tenant, "requests", 1)

    def record_prompt(self, tenant: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        """The prompt of an admitted request; `cached_tokens` of them came from the prefix cache
        (known once the request is scheduled: call again with prompt_tokens=0 then)."""
        self._add(tenant, "prompt_tokens", prompt_tokens)
        self._add(tenant, "cached_prompt_tokens", cached_tokens)

    def record_generated(self, tenant: str, num_tokens: int) -> None:
        self._add(tenant, "generated_tokens", num_tokens)

    def record_rejection(self, tenant: str, reason: str) -> None:
        """A refused request (reason: QuotaExceeded.kind, "permission_denied", ...)."""
        self._add(tenant, "rejections", 1, reason)

    def snapshot(self, tenant: str) -> UsageSnapshot:
        """One tenant's counters (all zero for a tenant never seen); StoreUnavailable when a
        shared store cannot be read."""
        counts, rejections = self._store.usage(tenant)
        return UsageSnapshot(
            tenant,
            requests=counts.get("requests", 0),
            prompt_tokens=counts.get("prompt_tokens", 0),
            cached_prompt_tokens=counts.get("cached_prompt_tokens", 0),
            generated_tokens=counts.get("generated_tokens", 0),
            rejections=MappingProxyType(rejections),
        )
