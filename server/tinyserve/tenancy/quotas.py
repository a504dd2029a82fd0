"""Per-tenant admission: concurrency slots, a bounded per-tenant queue, request and token rates,
prompt/output caps and allowed models. Thread-safe (one lock); the clock is injectable.

Life of a request (what the server calls):

    lease = quotas.admit(tenant, model, max_output_tokens)   # fail fast, before any work
    try:
        await lease.wait_active()          # only waits when it was queued (max_queued)
        lease.charge_prompt(n)             # after tokenization: max_prompt_tokens, tpm charge
        ... for each generated chunk: lease.charge_generated(k)
    finally:
        lease.release()                    # frees the slot (or queue place), wakes the next one

Rates are token buckets: capacity = the per-minute amount, refilled continuously at amount/60
per second, starting full. Why buckets rather than a sliding window: O(1) state and time per
tenant, an exact `retry_after` ((needed - level) / rate), and smooth recovery: a tenant that
burst its whole minute gets capacity back at the steady rate instead of being locked out for up
to 60 s and then stampeding. Over any interval of T seconds a tenant gets at most
amount * (1 + T/60).

Tokens per minute (prompt + generated): a request is admitted while the bucket holds at least
one token (the prompt's size is not known before tokenization); its prompt tokens are charged
after tokenization and its generated tokens as they are produced. The bucket may go negative
(a stream is never cut mid-way for the rate: a half answer is worse than a late next request);
the debt delays the tenant's next admissions, so the long-run rate still holds. The per-request
cap is max_prompt_tokens, not the rate.

Concurrency: at most max_concurrent leases are active; up to max_queued more wait FIFO for a
slot (in the server, before the engine), each woken when a slot frees. Beyond that the request
is refused ("max_queued", or "concurrency" when max_queued = 0) with a retry hint.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from typing import Callable

from .config import TenantConfig, TenantsConfig
from .errors import PermissionDenied, QuotaExceeded, Unauthenticated
from .usage import Usage

log = logging.getLogger("tinyserve.tenancy")

CONCURRENCY_RETRY_S = 1.0   # retry hint when all slots are busy (streams' ends are unknown)
SECONDS_PER_MINUTE = 60.0


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second; the level may go negative (debt)."""

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / SECONDS_PER_MINUTE
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)
        return self.level

    def wait_for(self, needed: float) -> float:
        """Seconds until the level reaches `needed` (0 if it is there; inf if it never will)."""
        if self.level >= needed:
            return 0.0
        if needed > self.capacity:
            return math.inf
        return (needed - self.level) / self.rate

    def resize(self, per_minute: int, now: float) -> None:
        self.refill(now)
        self.capacity = float(per_minute)
        self.rate = per_minute / SECONDS_PER_MINUTE
        self.level = min(self.level, self.capacity)


class _TenantState:
    def __init__(self, config: TenantConfig, now: float):
        self.config = config
        self.removed = False                 # dropped by a reload; in-flight leases finish
        self.num_active = 0
        self.queue: deque[Lease] = deque()   # waiting for a slot, oldest first
        self.rpm: TokenBucket | None = None
        self.tpm: TokenBucket | None = None
        self.configure(config, now)

    def configure(self, config: TenantConfig, now: float) -> None:
        self.config = config
        self.rpm = _rebucket(self.rpm, config.requests_per_minute, now)
        self.tpm = _rebucket(self.tpm, config.tokens_per_minute, now)


def _rebucket(bucket: TokenBucket | None, per_minute: int, now: float) -> TokenBucket | None:
    if per_minute == 0:
        return None
    if bucket is None:
        return TokenBucket(per_minute, now)
    bucket.resize(per_minute, now)
    return bucket


class Lease:
    """One admitted request's hold on its tenant's quotas. Release exactly once (idempotent)."""

    def __init__(self, quotas: "Quotas", state: _TenantState, tenant: str):
        self._quotas = quotas
        self._state = state
        self.tenant = tenant
        self.active = False        # holds a concurrency slot (False: queued)
        self.released = False
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._callbacks: list[Callable[[], None]] = []

    def when_active(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the lease holds a slot (now, if it already does). It runs on
        whichever thread frees the slot: keep it short (e.g. loop.call_soon_threadsafe)."""
        with self._quotas._lock:
            if not self.active:
                self._callbacks.append(callback)
                return
        _call(callback)

    async def wait_active(self) -> None:
        """Wait (asyncio) until the lease holds a slot. On cancellation the caller must still
        release() it, which gives up its queue place."""
        if self.active:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def wake():
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))
        self.when_active(wake)
        await fut

    def charge_prompt(self, num_tokens: int) -> None:
        """After tokenization: refuse a prompt over max_prompt_tokens (no retry can help), else
        charge it to tokens_per_minute."""
        self._quotas._charge_prompt(self, num_tokens)

    def charge_generated(self, num_tokens: int) -> None:
        """Generated tokens, as they are produced (never refuses; may put the bucket in debt)."""
        self._quotas._charge_tokens(self, num_tokens, generated=True)

    def release(self) -> None:
        self._quotas._release(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _call(cb: Callable[[], None]) -> None:
    try:
        cb()
    except Exception:  # a closed event loop, say: never break the thread that freed the slot
        log.exception("lease activation callback failed")


class Quotas:
    """Admission accounting for every tenant of a TenantsConfig (update() on reload)."""

    def __init__(self, tenants: TenantsConfig, clock: Callable[[], float] = time.monotonic,
                 concurrency_retry_s: float = CONCURRENCY_RETRY_S, usage: Usage | None = None):
        self._clock = clock
        self._usage = usage   # when given: admitted requests, refusals and charged tokens counted
        self._lock = threading.Lock()
        self._retry_s = concurrency_retry_s
        self._states: dict[str, _TenantState] = {}
        self.update(tenants)

    # -- configuration -----------------------------------------------------------------------------
    def update(self, tenants: TenantsConfig) -> None:
        """Apply a (re)loaded config: kept tenants keep their in-flight streams, queue and bucket
        levels (clamped to new capacities); removed tenants admit nothing new; new ones start fresh."""
        wake: list[Callable[[], None]] = []
        with self._lock:
            now = self._clock()
            for name, state in list(self._states.items()):
                if name not in tenants:
                    state.removed = True
                    if state.num_active == 0 and not state.queue:
                        del self._states[name]
            for t in tenants:
                state = self._states.get(t.name)
                if state is None:
                    self._states[t.name] = _TenantState(t, now)
                else:
                    state.removed = False
                    state.configure(t, now)
                    wake += self._fill_slots(state)
        for cb in wake:
            _call(cb)

    def tenant_config(self, tenant: str) -> TenantConfig | None:
        state = self._states.get(tenant)
        return None if state is None or state.removed else state.config

    # -- checks (nothing charged; refusals are counted in usage) ---------------------------------
    def check_model(self, tenant: str, model: str) -> None:
        """PermissionDenied unless the tenant may use `model`."""
        config = self._config(tenant)
        if not config.allows_model(model):
            e = PermissionDenied(tenant, model)
            self._record_rejection(tenant, e)
            raise e

    def max_output_tokens(self, tenant: str, requested: int | None, default: int) -> int:
        """The max_tokens to run with: `default` (the server's) capped by the tenant's limit
        when the request left it unset; refuses a request asking for more than the limit."""
        cap = self._config(tenant).max_output_tokens
        if requested is None:
            return min(default, cap) if cap else default
        if cap and requested > cap:
            e = QuotaExceeded(tenant, "max_output_tokens", "max_output_tokens",
                              f"max_tokens {requested} is over the tenant's limit of {cap}", None)
            self._record_rejection(tenant, e)
            raise e
        return requested

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, tenant: str, model: str | None = None,
              max_output_tokens: int | None = None) -> Lease:
        """Admit one request or raise (nothing is charged on refusal). The lease is active, or
        queued for a slot (see Lease.wait_active). Charges one request to requests_per_minute.
        Raises Unauthenticated (tenant removed), PermissionDenied (model), QuotaExceeded."""
        try:
            lease = self._admit(tenant, model, max_output_tokens)
        except (QuotaExceeded, PermissionDenied) as e:
            self._record_rejection(tenant, e)
            raise
        if self._usage is not None:
            self._usage.record_request(tenant)
        return lease

    def _record_rejection(self, tenant: str, e: Exception) -> None:
        if self._usage is not None:
            self._usage.record_rejection(
                tenant, e.kind if isinstance(e, QuotaExceeded) else "permission_denied")

    def _admit(self, tenant: str, model: str | None, max_output_tokens: int | None) -> Lease:
        with self._lock:
            state = self._live_state(tenant)
            config = state.config
            if model is not None and not config.allows_model(model):
                raise PermissionDenied(tenant, model)
            if max_output_tokens is not None and config.max_output_tokens \
                    and max_output_tokens > config.max_output_tokens:
                raise QuotaExceeded(tenant, "max_output_tokens", "max_output_tokens",
                                    f"max_tokens {max_output_tokens} is over the tenant's limit "
                                    f"of {config.max_output_tokens}", None)
            has_slot = state.num_active < config.max_concurrent and not state.queue
            if not has_slot and len(state.queue) >= config.max_queued:
                if config.max_queued == 0:
                    raise QuotaExceeded(tenant, "concurrency", "max_concurrent",
                                        f"{state.num_active} streams running, the limit is "
                                        f"{config.max_concurrent}", self._retry_s)
                raise QuotaExceeded(tenant, "max_queued", "max_queued",
                                    f"{state.num_active} streams running and {len(state.queue)} "
                                    f"queued, the limits are {config.max_concurrent} and "
                                    f"{config.max_queued}", self._retry_s)
            now = self._clock()
            rates = ((state.rpm, "requests_per_minute", config.requests_per_minute),
                     (state.tpm, "tokens_per_minute", config.tokens_per_minute))
            for bucket, limit, per_minute in rates:   # one request and one token must be left
                if bucket is not None:
                    bucket.refill(now)
                    wait = bucket.wait_for(1.0)
                    if wait > 0:   # "over 600 requests per minute"
                        raise QuotaExceeded(tenant, limit, limit,
                                            f"over {per_minute} {limit.replace('_', ' ')}", wait)
            if state.rpm is not None:
                state.rpm.level -= 1.0
            lease = Lease(self, state, tenant)
            if has_slot:
                state.num_active += 1
                lease.active = True
            else:
                state.queue.append(lease)
            return lease

    def _charge_prompt(self, lease: Lease, num_tokens: int) -> None:
        cap = lease._state.config.max_prompt_tokens
        if cap and num_tokens > cap:
            e = QuotaExceeded(lease.tenant, "max_prompt_tokens", "max_prompt_tokens",
                              f"the prompt has {num_tokens} tokens, the tenant's limit is {cap}",
                              None)
            self._record_rejection(lease.tenant, e)
            raise e
        self._charge_tokens(lease, num_tokens, generated=False)

    def _charge_tokens(self, lease: Lease, num_tokens: int, generated: bool) -> None:
        if num_tokens < 0:
            raise ValueError(f"cannot charge {num_tokens} tokens")
        with self._lock:
            if generated:
                lease.generated_tokens += num_tokens
            else:
                lease.prompt_tokens += num_tokens
            tpm = lease._state.tpm
            if tpm is not None and num_tokens:
                tpm.refill(self._clock())
                tpm.level -= num_tokens
        if self._usage is not None:
            if generated:
                self._usage.record_generated(lease.tenant, num_tokens)
            else:
                self._usage.record_prompt(lease.tenant, num_tokens)

    def _release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            lease._callbacks.clear()
            state = lease._state
            if lease.active:
                state.num_active -= 1
                wake = self._fill_slots(state)
            else:
                try:
                    state.queue.remove(lease)
                except ValueError:
                    pass
                wake = []
            if state.removed and state.num_active == 0 and not state.queue \
                    and self._states.get(lease.tenant) is state:
                del self._states[lease.tenant]
        for cb in wake:
            _call(cb)

    def _fill_slots(self, state: _TenantState) -> list[Callable[[], None]]:
        """Activate queued leases while slots are free (lock held); their callbacks to call."""
        wake: list[Callable[[], None]] = []
        while state.queue and state.num_active < state.config.max_concurrent:
            lease = state.queue.popleft()
            lease.active = True
            state.num_active += 1
            wake += lease._callbacks
            lease._callbacks = []
        return wake

    # -- introspection -----------------------------------------------------------------------------
    def state(self, tenant: str) -> dict:
        """The tenant's live numbers (for tests, logs and gauges): active, queued, and the rate
        buckets' current levels (None = unlimited)."""
        with self._lock:
            s = self._states.get(tenant)
            if s is None:
                return {"active": 0, "queued": 0, "rpm_available": None, "tpm_available": None,
                        "removed": True}
            now = self._clock()
            return {"active": s.num_active, "queued": len(s.queue),
                    "rpm_available": s.rpm.refill(now) if s.rpm else None,
                    "tpm_available": s.tpm.refill(now) if s.tpm else None,
                    "removed": s.removed}

    def _config(self, tenant: str) -> TenantConfig:
        with self._lock:
            return self._live_state(tenant).config

    def _live_state(self, tenant: str) -> _TenantState:
        state = self._states.get(tenant)
        if state is None or state.removed:
            raise Unauthenticated(f"tenant {tenant!r} does not exist (any more)")
        return state
