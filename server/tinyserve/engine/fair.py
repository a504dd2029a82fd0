"""Weighted fair share between tenants for the scheduler: the Virtual Token Counter (VTC) of
"Fairness in Serving Large Language Models" (Sheng et al., OSDI 2024), with weights.

Each tenant has a counter of the service it has received, in weighted tokens:

    charge(t, prefill, decode):  c[t] += (prefill_weight * prefill + decode_weight * decode) / weight[t]

The scheduler serves the busy tenant with the smallest counter first (ties: the one served
least recently, then by name). A tenant that becomes busy after being idle is lifted to the
smallest counter among the busy tenants (or, when none is busy, to the floor they had reached),
so idling never banks credit, and a newcomer starts level with the least-served busy tenant: it
is served at once (the tie goes to it, as it was served least recently) but gets no more than its
share afterwards.

Guarantee (two tenants busy throughout, each step handing at most B tokens to one of them, the
other taking none): the counters never differ by more than D = B * max(w_p, w_d) / min(weight),
so over ANY interval |service_a / weight_a - service_b / weight_b| <= 2 * D (service in
prefill/decode-weighted tokens). With weights 1 and 3 that is a 1:3 split up to 2 * D tokens.

Work conserving: order() ranks every tenant with work; the scheduler hands leftover budget down
the list, so a lone tenant gets the whole machine.

Pure: no I/O, no threads, no clock. Weights come from a mapping or a callable (e.g. the tenant
registry's, which follows reloads). `FifoPolicy` has the same interface and keeps arrival order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

PREFILL_WEIGHT = 1.0  # the paper's w_p
DECODE_WEIGHT = 2.0  # the paper's w_q: a generated token costs twice a prompt token


def _weight_fn(weights: Mapping[str, float] | Callable[[str], float] | None, default: float) -> Callable[[str], float]:
    if weights is None:
        return lambda t: default
    if callable(weights):
        return weights
    return lambda t: weights.get(t, default)


class FairShare:
    """Virtual token counters, one per tenant (see the module docstring)."""

    name = "fair"

    def __init__(
        self,
        weights: Mapping[str, float] | Callable[[str], float] | None = None,
        *,
        prefill_weight: float = PREFILL_WEIGHT,
        decode_weight: float = DECODE_WEIGHT,
        default_weight: float = 1.0,
    ):
        self._weight_of = _weight_fn(weights, default_weight)
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.counters: dict[str, float] = {}
        self.busy: set[str] = set()
        self._floor = 0.0  # min busy counter ever reached (monotone)
        self._last_served: dict[str, int] = {}  # tie-break: served longest ago first
        self._num_charges = 0

    def set_weights(self, weights: Mapping[str, float] | Callable[[str], float]) -> None:
        """New weights (a reload); counters are kept."""
        self._weight_of = _weight_fn(weights, 1.0)

    def weight(self, tenant: str) -> float:
        w = self._weight_of(tenant)
        return float(w) if w and w > 0 else 1.0

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, self._floor)

    # -- busy / idle -------------------------------------------------------------------------------
    def on_active(self, tenant: str) -> None:
        """`tenant` got work while it had none: lift it so it cannot spend banked credit."""
        if tenant in self.busy:
            return
        lift = min((self.counters[t] for t in self.busy), default=self._floor)
        self.counters[tenant] = max(self.counters.get(tenant, 0.0), lift)
        self.busy.add(tenant)
        self._update_floor()

    def on_idle(self, tenant: str) -> None:
        """`tenant` has no work left (nothing waiting or running)."""
        self._update_floor()
        self.busy.discard(tenant)

    def set_busy(self, tenants: Iterable[str]) -> None:
        """Make exactly `tenants` the busy set (on_active for newcomers, on_idle for the rest).
        Convenient for a scheduler that recomputes who has work every step."""
        now = set(tenants)
        for t in sorted(self.busy - now):
            self.on_idle(t)
        for t in sorted(now - self.busy):
            self.on_active(t)

    def _update_floor(self) -> None:
        if self.busy:
            self._floor = max(self._floor, min(self.counters[t] for t in self.busy))

    # -- service -----------------------------------------------------------------------------------
    def cost(self, tenant: str, prefill_tokens: int, decode_tokens: int) -> float:
        return (self.prefill_weight * prefill_tokens + self.decode_weight * decode_tokens) / self.weight(tenant)

    def charge(self, tenant: str, prefill_tokens: int = 0, decode_tokens: int = 0) -> None:
        """Account service given to `tenant` (an idle tenant is made busy first)."""
        if tenant not in self.busy:
            self.on_active(tenant)
        self.counters[tenant] += self.cost(tenant, prefill_tokens, decode_tokens)
        self._num_charges += 1
        self._last_served[tenant] = self._num_charges
        self._update_floor()

    def _key(self, tenant: str) -> tuple[float, int, str]:
        return (self.counters.get(tenant, self._floor), self._last_served.get(tenant, 0), tenant)

    def order(self, tenants_with_work: Iterable[str]) -> list[str]:
        """Who is served first: smallest counter, then served least recently, then name.
        Tenants not yet busy are lifted first (as on_active)."""
        tenants = list(dict.fromkeys(tenants_with_work))
        for t in tenants:
            if t not in self.busy:
                self.on_active(t)
        return sorted(tenants, key=self._key)

    def pick(self, tenants_with_work: Iterable[str]) -> str | None:
        ranked = self.order(tenants_with_work)
        return ranked[0] if ranked else None

    def interleave(self, candidates: Sequence[T], tenant_of: Callable[[T], str]) -> Iterator[T]:
        """Yield `candidates` one at a time, each the next of the tenant with the smallest
        counter AT THAT MOMENT (each tenant's own in their given order). Charge between yields:
        the next pick sees it. For the scheduler's prefill loop:

            for seq in policy.interleave(prefilling + waiting, lambda s: s.tenant):
                n = ...tokens this step...;  policy.charge(seq.tenant, prefill_tokens=n)
        """
        queues: dict[str, deque[T]] = {}
        for c in candidates:
            queues.setdefault(tenant_of(c), deque()).append(c)
        self.order(queues)  # lift newcomers
        while queues:
            t = min(queues, key=self._key)
            q = queues[t]
            item = q.popleft()
            if not q:
                del queues[t]
            yield item

    def order_requests(
        self, requests: Sequence[T], tenant_of: Callable[[T], str], cost_of: Callable[[T], int] | None = None
    ) -> list[T]:
        """An admission order for `requests` (each tenant's own kept in their given order):
        repeatedly the next request of the tenant with the smallest projected counter, each
        projected to cost `cost_of(r)` prefill tokens (default 1). Charges nothing (tenants
        not yet busy are lifted, as in order())."""
        queues: dict[str, list[T]] = {}
        for r in requests:
            queues.setdefault(tenant_of(r), []).append(r)
        self.order(queues)  # lift newcomers
        projected = {t: self._key(t) for t in queues}
        heads = {t: 0 for t in queues}
        out: list[T] = []
        while len(out) < len(requests):
            t = min((t for t in queues if heads[t] < len(queues[t])), key=lambda t: projected[t])
            r = queues[t][heads[t]]
            heads[t] += 1
            out.append(r)
            c, _, name = projected[t]
            projected[t] = (c + self.cost(t, cost_of(r) if cost_of else 1, 0), self._num_charges + len(out), name)
        return out

    def forget(self, tenant: str) -> None:
        """Drop an idle tenant's state (a tenant removed by a reload)."""
        if tenant not in self.busy:
            self.counters.pop(tenant, None)
            self._last_served.pop(tenant, None)


class FifoPolicy:
    """First come, first served, with FairShare's interface (for comparison runs): order() keeps
    the order it is given (pass tenants by their oldest waiting request), charges only count."""

    name = "fifo"

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.counters: dict[str, float] = {}  # plain token counts, for reports
        self.busy: set[str] = set()

    def set_weights(self, weights: object) -> None:
        pass

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def on_active(self, tenant: str) -> None:
        self.busy.add(tenant)

    def on_idle(self, tenant: str) -> None:
        self.busy.discard(tenant)

    def set_busy(self, tenants: Iterable[str]) -> None:
        self.busy = set(tenants)

    def charge(self, tenant: str, prefill_tokens: int = 0, decode_tokens: int = 0) -> None:
        self.counters[tenant] = self.counters.get(tenant, 0.0) + prefill_tokens + decode_tokens

    def order(self, tenants_with_work: Iterable[str]) -> list[str]:
        return list(dict.fromkeys(tenants_with_work))

    def pick(self, tenants_with_work: Iterable[str]) -> str | None:
        ranked = self.order(tenants_with_work)
        return ranked[0] if ranked else None

    def interleave(self, candidates: Sequence[T], tenant_of: Callable[[T], str]) -> Iterator[T]:
        return iter(list(candidates))

    def order_requests(
        self, requests: Sequence[T], tenant_of: Callable[[T], str], cost_of: Callable[[T], int] | None = None
    ) -> list[T]:
        return list(requests)

    def forget(self, tenant: str) -> None:
        self.counters.pop(tenant, None)


def make_policy(
    name: str, weights: Mapping[str, float] | Callable[[str], float] | None = None
) -> FairShare | FifoPolicy:
    """ "fair" (default) or "fifo" (the --scheduling flag)."""
    if name == "fair":
        return FairShare(weights)
    if name == "fifo":
        return FifoPolicy()
    raise ValueError(f"unknown scheduling policy {name!r} (use 'fair' or 'fifo')")
