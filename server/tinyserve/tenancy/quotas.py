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

The counters (slots, buckets, usage) live in a QuotaStore (store.py): in this process by
default, or in a Redis that several replicas share, which makes the limits global. The queue
stays in each replica (max_queued is per replica); with a shared store a queued lease also takes
a slot freed by another replica, at the next maintain() (every MAINTAIN_S). A store that cannot
be reached follows `store_policy`: "open" admits (the request is not counted anywhere; a warning
is logged and on_store_error called), "closed" refuses with QuotaStoreUnavailable (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TypedDict

from .config import TenantConfig, TenantsConfig
from .errors import PermissionDenied, QuotaExceeded, QuotaStoreUnavailable, Unauthenticated
from .store import InProcessStore, Limits, QuotaStore, StoreUnavailable
from .usage import Usage

log = logging.getLogger("tinyserve.tenancy")

CONCURRENCY_RETRY_S = 1.0  # retry hint when all slots are busy (streams' ends are unknown)
LEASE_S = 10.0  # a shared slot lapses this long after its replica last renewed it
MAINTAIN_S = 0.1  # period of the maintenance thread (shared stores only)
STORE_POLICIES = ("open", "closed")
OPEN_WARNING_S = 10.0  # at most one "admitting without limits" warning this often


class QuotaState(TypedDict):
    """Quotas.state(tenant): the tenant's live numbers."""

    active: int  # slots held across every replica sharing the store
    queued: int  # leases waiting here
    rpm_available: float | None  # the rate buckets' levels now (None = unlimited)
    tpm_available: float | None
    removed: bool


class _TenantState:
    def __init__(self, config: TenantConfig):
        self.config = config
        self.removed = False  # dropped by a reload; in-flight leases finish
        self.active: set[Lease] = set()  # this process's leases holding a slot
        self.queue: deque[Lease] = deque()  # waiting for a slot, oldest first

    @property
    def limits(self) -> Limits:
        c = self.config
        return Limits(c.max_concurrent, c.requests_per_minute, c.tokens_per_minute)


class Lease:
    """One admitted request's hold on its tenant's quotas. Release exactly once (idempotent)."""

    def __init__(self, quotas: Quotas, state: _TenantState, tenant: str):
        self._quotas = quotas
        self._state = state
        self.tenant = tenant
        self.id = uuid.uuid4().hex  # its slot's name in the store
        self.active = False  # holds a concurrency slot (False: queued)
        self.shared = True  # its slot is counted in the store (False: admitted open)
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
        fut: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not fut.done():
                fut.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(resolve)

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

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _call(cb: Callable[[], None]) -> None:
    try:
        cb()
    except Exception:  # a closed event loop, say: never break the thread that freed the slot
        log.exception("lease activation callback failed")


class Quotas:
    """Admission accounting for every tenant of a TenantsConfig (update() on reload)."""

    def __init__(
        self,
        tenants: TenantsConfig,
        clock: Callable[[], float] | None = None,
        concurrency_retry_s: float = CONCURRENCY_RETRY_S,
        usage: Usage | None = None,
        store: QuotaStore | None = None,
        lease_seconds: float = LEASE_S,
        store_policy: str = "open",
        on_store_error: Callable[[str], None] | None = None,
    ):
        """`store`: the counters (default: this process's). `clock` defaults to time.monotonic,
        or for a shared store to time.time (the clock every replica agrees on); a shared store
        also wants maintain() called (start_maintenance())."""
        if store_policy not in STORE_POLICIES:
            raise ValueError(f"store_policy must be one of {STORE_POLICIES}, got {store_policy!r}")
        self.store = store or InProcessStore()
        if clock is None:
            clock = time.time if self.store.shared else time.monotonic
        self._clock = clock
        self._usage = usage  # when given: admitted requests, refusals and charged tokens counted
        self._lock = threading.Lock()
        self._retry_s = concurrency_retry_s
        self._states: dict[str, _TenantState] = {}
        self._lease_s = lease_seconds
        self._policy = store_policy
        self._on_store_error = on_store_error
        self._last_renew = -float("inf")
        self._last_open_warning = -float("inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.update(tenants)

    # -- configuration -----------------------------------------------------------------------------
    def update(self, tenants: TenantsConfig) -> None:
        """Apply a (re)loaded config: kept tenants keep their in-flight streams, queue and bucket
        levels (clamped to new capacities); removed tenants admit nothing new; new ones start fresh."""
        wake: list[Callable[[], None]] = []
        with self._lock:
            for name, state in list(self._states.items()):
                if name not in tenants:
                    state.removed = True
                    self._forget_if_idle(name, state)
            for t in tenants:
                kept = self._states.get(t.name)
                if kept is None:
                    self._states[t.name] = _TenantState(t)
                else:
                    kept.removed = False
                    kept.config = t
                    wake += self._fill_slots(kept)
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
            e = QuotaExceeded(
                tenant,
                "max_output_tokens",
                "max_output_tokens",
                f"max_tokens {requested} is over the tenant's limit of {cap}",
                None,
                cap,
            )
            self._record_rejection(tenant, e)
            raise e
        return requested

    # -- admission ---------------------------------------------------------------------------------
    def admit(self, tenant: str, model: str | None = None, max_output_tokens: int | None = None) -> Lease:
        """Admit one request or raise (nothing is charged on refusal). The lease is active, or
        queued for a slot (see Lease.wait_active). Charges one request to requests_per_minute.
        Raises Unauthenticated (tenant removed), PermissionDenied (model), QuotaExceeded,
        QuotaStoreUnavailable (the store is down and the policy is "closed")."""
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
            self._usage.record_rejection(tenant, e.kind if isinstance(e, QuotaExceeded) else "permission_denied")

    def _store_failed(self, operation: str, e: StoreUnavailable) -> None:
        if self._on_store_error is not None:
            self._on_store_error(operation)
        if operation == "admit" and self._policy == "open":
            now = time.monotonic()
            if now - self._last_open_warning >= OPEN_WARNING_S:
                self._last_open_warning = now
                log.warning(
                    "admitting requests without their tenant limits: %s (quota store "
                    "policy 'open'; logged every %.0f s while it lasts)",
                    e,
                    OPEN_WARNING_S,
                )

    def _admit(self, tenant: str, model: str | None, max_output_tokens: int | None) -> Lease:
        with self._lock:
            state = self._live_state(tenant)
            config = state.config
            if model is not None and not config.allows_model(model):
                raise PermissionDenied(tenant, model)
            if (
                max_output_tokens is not None
                and config.max_output_tokens
                and max_output_tokens > config.max_output_tokens
            ):
                raise QuotaExceeded(
                    tenant,
                    "max_output_tokens",
                    "max_output_tokens",
                    f"max_tokens {max_output_tokens} is over the tenant's limit of {config.max_output_tokens}",
                    None,
                    config.max_output_tokens,
                )
            lease = Lease(self, state, tenant)
            now = self._clock()
            try:
                grant = self.store.admit(
                    tenant,
                    lease.id,
                    now,
                    state.limits,
                    want_slot=not state.queue,
                    may_queue=len(state.queue) < config.max_queued,
                    expires=now + self._lease_s,
                )
            except StoreUnavailable as e:
                self._store_failed("admit", e)
                if self._policy == "closed":
                    raise QuotaStoreUnavailable(str(e)) from None
                lease.shared = False
                lease.active = True
                state.active.add(lease)
                return lease
            if grant.outcome == "full":
                if config.max_queued == 0:
                    raise QuotaExceeded(
                        tenant,
                        "concurrency",
                        "max_concurrent",
                        f"{grant.num_active} streams running, the limit is {config.max_concurrent}",
                        self._retry_s,
                        config.max_concurrent,
                    )
                raise QuotaExceeded(
                    tenant,
                    "max_queued",
                    "max_queued",
                    f"{grant.num_active} streams running and {len(state.queue)} "
                    f"queued, the limits are {config.max_concurrent} and "
                    f"{config.max_queued}",
                    self._retry_s,
                    config.max_queued,
                )
            if grant.outcome in ("requests_per_minute", "tokens_per_minute"):
                limit = grant.outcome  # "over 600 requests per minute"
                per_minute = getattr(config, limit)
                raise QuotaExceeded(
                    tenant, limit, limit, f"over {per_minute} {limit.replace('_', ' ')}", grant.retry_after, per_minute
                )
            if grant.outcome == "active":
                lease.active = True
                state.active.add(lease)
            else:
                state.queue.append(lease)
            return lease

    def _charge_prompt(self, lease: Lease, num_tokens: int) -> None:
        cap = lease._state.config.max_prompt_tokens
        if cap and num_tokens > cap:
            e = QuotaExceeded(
                lease.tenant,
                "max_prompt_tokens",
                "max_prompt_tokens",
                f"the prompt has {num_tokens} tokens, the tenant's limit is {cap}",
                None,
                cap,
            )
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
            if num_tokens and lease._state.config.tokens_per_minute:
                self.store.charge_tokens(lease.tenant, num_tokens, self._clock())
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
            wake: list[Callable[[], None]] = []
            if lease.active:
                state.active.discard(lease)
                if lease.shared:
                    try:
                        self.store.release(lease.tenant, lease.id)
                    except StoreUnavailable as e:  # the slot lapses after lease_seconds
                        self._store_failed("release", e)
                wake = self._fill_slots(state)
            else:
                try:
                    state.queue.remove(lease)
                except ValueError:
                    pass
            if self._states.get(lease.tenant) is state:
                self._forget_if_idle(lease.tenant, state)
        for cb in wake:
            _call(cb)

    def _forget_if_idle(self, tenant: str, state: _TenantState) -> None:
        """A removed tenant with nothing in flight: drop it (lock held)."""
        if state.removed and not state.active and not state.queue:
            del self._states[tenant]
            self.store.forget(tenant)

    def _fill_slots(self, state: _TenantState) -> list[Callable[[], None]]:
        """Activate queued leases while the store has free slots (lock held); their callbacks."""
        wake: list[Callable[[], None]] = []
        while state.queue:
            lease = state.queue[0]
            now = self._clock()
            try:
                took = self.store.take_slot(
                    lease.tenant, lease.id, now, state.config.max_concurrent, now + self._lease_s
                )
            except StoreUnavailable as e:
                self._store_failed("take_slot", e)
                if self._policy == "closed":
                    break  # they wait for the store (or their deadline)
                took, lease.shared = True, False
            if not took:
                break
            state.queue.popleft()
            lease.active = True
            state.active.add(lease)
            wake += lease._callbacks
            lease._callbacks = []
        return wake

    # -- a shared store's upkeep -------------------------------------------------------------------
    def maintain(self) -> None:
        """What the maintenance thread does every MAINTAIN_S: reconnect a store that is down,
        send buffered charges, renew this process's slots every lease_seconds / 3 (at once when
        some were admitted open during an outage: from then on they count), and give queued
        leases slots that other replicas freed. Never raises."""
        if not self.store.probe():
            return
        now = self._clock()
        try:
            self.store.flush(now)
        except StoreUnavailable as e:
            self._store_failed("flush", e)
            return
        wake: list[Callable[[], None]] = []
        with self._lock:
            leases = [lease for s in self._states.values() for lease in s.active]
            unshared = any(not lease.shared for lease in leases)
            if unshared or now - self._last_renew >= self._lease_s / 3:
                try:  # leases admitted open during an outage are counted from now on
                    self.store.renew([(lease.tenant, lease.id) for lease in leases], now, now + self._lease_s)
                    self._last_renew = now
                except StoreUnavailable as e:
                    self._store_failed("renew", e)
                    return
                for lease in leases:
                    lease.shared = True
            for state in self._states.values():
                if state.queue:
                    wake += self._fill_slots(state)
        for cb in wake:
            _call(cb)

    def start_maintenance(self, interval_s: float = MAINTAIN_S) -> None:
        """Run maintain() every interval_s on a daemon thread until close()."""
        if self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.maintain()
                except Exception:  # a bug: log it, keep maintaining
                    log.exception("quota store maintenance failed")

        self._thread = threading.Thread(target=loop, name="tinyserve-quota-store", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop maintenance, send what is buffered, close the store."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.store.close()

    # -- introspection -----------------------------------------------------------------------------
    def state(self, tenant: str) -> QuotaState:
        """The tenant's live numbers (for tests, logs and gauges): active (across every replica
        sharing the store), queued (here), and the rate buckets' current levels (None =
        unlimited). Raises StoreUnavailable when the store is down."""
        with self._lock:
            s = self._states.get(tenant)
            if s is None:
                return {"active": 0, "queued": 0, "rpm_available": None, "tpm_available": None, "removed": True}
            now = self._clock()
            rpm, tpm = self.store.levels(tenant, now, s.limits)
            return {
                "active": self.store.num_active(tenant, now),
                "queued": len(s.queue),
                "rpm_available": rpm,
                "tpm_available": tpm,
                "removed": s.removed,
            }

    def _config(self, tenant: str) -> TenantConfig:
        with self._lock:
            return self._live_state(tenant).config

    def _live_state(self, tenant: str) -> _TenantState:
        state = self._states.get(tenant)
        if state is None or state.removed:
            raise Unauthenticated(f"tenant {tenant!r} does not exist (any more)")
        return state
