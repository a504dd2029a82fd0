"""Where the shared part of the quotas lives: concurrency slots, rate buckets and usage counters.

    store = open_store(None)                      # InProcessStore: one box, no Redis (default)
    store = open_store("redis://10.0.0.5:6379/0") # RedisStore: every replica sharing it shares limits

Quotas (quotas.py) keeps what is local to one replica (its queue of waiting leases, the callbacks
that wake them, the leases this process holds) and asks the store for everything the tenant's
limits count. Both stores implement QuotaStore; tests/tenancy/test_quotas.py runs one suite
against both. Every call takes `now` (seconds) from Quotas' clock, so tests need no sleeps; with
Redis that clock is the wall clock (time.time), the one clock replicas on different machines share.

Each operation is atomic in the store: the in-process store holds one lock, the Redis store runs
one Lua script per operation (no read-modify-write between replicas). Concurrency slots are
leases that expire: a slot is a member of the tenant's sorted set scored with its expiry; the
replica holding it renews it (Quotas.maintain, every lease_seconds / 3), and a replica that dies
stops renewing, so its slots come back after at most lease_seconds.

Token charges and usage increments are buffered locally and sent in batches (flush(), called by
maintenance, and by any read of a bucket or of usage): a stream generates many small chunks and
must not pay one round trip per chunk. A buffered charge that cannot be sent stays buffered.

A store that cannot be reached raises StoreUnavailable; Quotas applies the configured policy.
The Redis store fails fast: after one failed call it answers StoreUnavailable without touching
the network until its maintenance probe (ping, every RECONNECT_S) sees Redis back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar
from urllib.parse import urlparse

log = logging.getLogger("tinyserve.tenancy")

SECONDS_PER_MINUTE = 60.0
REDIS_TIMEOUT_S = 0.5  # one Redis call, connect or reply; then the store counts as down
RECONNECT_S = 0.5  # how often a down Redis store probes for its return
KEY_PREFIX = "tinyserve:"  # every key: tinyserve:{tenant}:slots|rpm|tpm|usage

_P = ParamSpec("_P")
_T = TypeVar("_T")
# a script's ARGV (Redis takes strings and integers; floats go as repr() strings, exact)
ScriptArgs = list[str | int]


class StoreUnavailable(Exception):
    """The quota store cannot be reached (Redis down, timed out, refused)."""


@dataclass(frozen=True)
class Limits:
    """The limits of one tenant that the store enforces (0 = unlimited)."""

    max_concurrent: int
    requests_per_minute: int
    tokens_per_minute: int


@dataclass(frozen=True)
class Grant:
    """The store's answer to admit().

    outcome: "active" (took a slot), "queued" (no slot; may wait locally), "full" (no slot and
             no queue room: refused), or the rate that refused: "requests_per_minute",
             "tokens_per_minute".
    num_active: the tenant's live slots across every replica when the decision was made.
    retry_after: for a rate refusal, seconds until the bucket holds one again (inf: never).
    """

    outcome: str
    num_active: int
    retry_after: float = 0.0


class QuotaStore(ABC):
    """The counters behind Quotas. Thread-safe; every method may raise StoreUnavailable
    (the in-process store never does)."""

    shared = False  # True: other processes may share the counters

    @abstractmethod
    def admit(
        self, tenant: str, lease_id: str, now: float, limits: Limits, want_slot: bool, may_queue: bool, expires: float
    ) -> Grant:
        """One request, atomically: with want_slot, take a slot if one is free; with no slot and
        not may_queue, refuse ("full"); else check that both rate buckets hold one (refuse with
        the rate and its wait), charge one request and take the slot (expiring at `expires`)
        or leave it to wait ("queued"). A refusal charges nothing."""

    @abstractmethod
    def take_slot(self, tenant: str, lease_id: str, now: float, max_concurrent: int, expires: float) -> bool:
        """Take a free slot for a queued lease (no rate charge); False when none is free."""

    @abstractmethod
    def release(self, tenant: str, lease_id: str) -> None:
        """Give the lease's slot back (a slot that already expired: nothing)."""

    @abstractmethod
    def renew(self, slots: list[tuple[str, str]], now: float, expires: float) -> None:
        """Extend the (tenant, lease_id) slots this process holds to `expires`."""

    @abstractmethod
    def num_active(self, tenant: str, now: float) -> int:
        """Live slots of the tenant (expired ones do not count)."""

    @abstractmethod
    def charge_tokens(self, tenant: str, num_tokens: int, now: float) -> None:
        """Take tokens from the tenant's tokens-per-minute bucket (may go into debt). A shared
        store buffers them: applied at the next flush, admit or read of the tenant's levels."""

    @abstractmethod
    def levels(self, tenant: str, now: float, limits: Limits) -> tuple[float | None, float | None]:
        """The rate buckets' levels (requests, tokens) now; None for an unlimited rate."""

    @abstractmethod
    def add_usage(self, tenant: str, counter: str, amount: int, reason: str | None) -> None:
        """Count `amount` into a usage counter ("rejections" takes a reason). Buffered."""

    @abstractmethod
    def usage(self, tenant: str) -> tuple[dict[str, int], dict[str, int]]:
        """The tenant's usage counters (name -> value) and rejections (reason -> count)."""

    @abstractmethod
    def forget(self, tenant: str) -> None:
        """A tenant removed from the config and idle: drop this process's state for it (a shared
        store keeps the shared numbers; its keys expire)."""

    def flush(self, now: float | None) -> None:  # noqa: B027 - a hook: only a shared store buffers
        """Send buffered usage and, given `now`, buffered token charges (a shared store)."""

    def probe(self) -> bool:
        """Whether the store answers now (a down store tries to reconnect)."""
        return True

    def close(self) -> None:  # noqa: B027 - a hook: only a shared store holds a connection
        pass


# ---- one box -----------------------------------------------------------------------------------
class TokenBucket:
    """`capacity` tokens, refilled at capacity/60 per second, starting full; the level may go
    negative (debt). The same arithmetic as _RATE_LUA below."""

    def __init__(self, per_minute: int, now: float):
        self.capacity = float(per_minute)
        self.level = self.capacity
        self.stamp = now

    @property
    def rate(self) -> float:
        return self.capacity / SECONDS_PER_MINUTE

    def refill(self, now: float, per_minute: int) -> float:
        """The level now, with the capacity set to `per_minute` (a reload may change it)."""
        self.capacity = float(per_minute)
        if now > self.stamp:
            self.level += (now - self.stamp) * self.rate
            self.stamp = now
        self.level = min(self.capacity, self.level)
        return self.level

    def wait_for(self, needed: float) -> float:
        """Seconds until the level reaches `needed` (0 if it is there; inf if it never will)."""
        if self.level >= needed:
            return 0.0
        if needed > self.capacity:
            return math.inf
        return (needed - self.level) / self.rate


class _Tenant:
    def __init__(self) -> None:
        self.slots: set[str] = set()
        self.rpm: TokenBucket | None = None
        self.tpm: TokenBucket | None = None
        self.usage: dict[str, int] = {}
        self.rejections: dict[str, int] = {}


class InProcessStore(QuotaStore):
    """Counters in this process's memory (one lock): the default, for one replica. Slots never
    expire here (the process holding them is this one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tenants: dict[str, _Tenant] = {}

    def _get(self, tenant: str) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None:
            t = self._tenants[tenant] = _Tenant()
        return t

    @staticmethod
    def _bucket(bucket: TokenBucket | None, per_minute: int, now: float) -> TokenBucket | None:
        if per_minute == 0:
            return None
        if bucket is None:
            return TokenBucket(per_minute, now)
        bucket.refill(now, per_minute)
        return bucket

    def _refill(self, t: _Tenant, now: float, limits: Limits) -> None:
        t.rpm = self._bucket(t.rpm, limits.requests_per_minute, now)
        t.tpm = self._bucket(t.tpm, limits.tokens_per_minute, now)

    def admit(
        self, tenant: str, lease_id: str, now: float, limits: Limits, want_slot: bool, may_queue: bool, expires: float
    ) -> Grant:
        with self._lock:
            t = self._get(tenant)
            num_active = len(t.slots)
            has_slot = want_slot and num_active < limits.max_concurrent
            if not has_slot and not may_queue:
                return Grant("full", num_active)
            self._refill(t, now, limits)
            for bucket, name in ((t.rpm, "requests_per_minute"), (t.tpm, "tokens_per_minute")):
                if bucket is not None and bucket.wait_for(1.0) > 0:
                    return Grant(name, num_active, bucket.wait_for(1.0))
            if t.rpm is not None:
                t.rpm.level -= 1.0
            if has_slot:
                t.slots.add(lease_id)
                return Grant("active", num_active + 1)
            return Grant("queued", num_active)

    def take_slot(self, tenant: str, lease_id: str, now: float, max_concurrent: int, expires: float) -> bool:
        with self._lock:
            t = self._get(tenant)
            if len(t.slots) >= max_concurrent:
                return False
            t.slots.add(lease_id)
            return True

    def release(self, tenant: str, lease_id: str) -> None:
        with self._lock:
            t = self._tenants.get(tenant)
            if t is not None:
                t.slots.discard(lease_id)

    def renew(self, slots: list[tuple[str, str]], now: float, expires: float) -> None:
        pass

    def num_active(self, tenant: str, now: float) -> int:
        with self._lock:
            t = self._tenants.get(tenant)
            return len(t.slots) if t else 0

    def charge_tokens(self, tenant: str, num_tokens: int, now: float) -> None:
        with self._lock:
            t = self._tenants.get(tenant)
            if t is not None and t.tpm is not None:
                t.tpm.refill(now, int(t.tpm.capacity))
                t.tpm.level -= num_tokens

    def levels(self, tenant: str, now: float, limits: Limits) -> tuple[float | None, float | None]:
        with self._lock:
            t = self._get(tenant)
            self._refill(t, now, limits)
            return (t.rpm.level if t.rpm else None, t.tpm.level if t.tpm else None)

    def add_usage(self, tenant: str, counter: str, amount: int, reason: str | None) -> None:
        with self._lock:
            t = self._get(tenant)
            into, key = (t.rejections, reason) if reason is not None else (t.usage, counter)
            into[key] = into.get(key, 0) + amount

    def usage(self, tenant: str) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            t = self._tenants.get(tenant)
            return (dict(t.usage), dict(t.rejections)) if t else ({}, {})

    def forget(self, tenant: str) -> None:
        with self._lock:
            t = self._tenants.get(tenant)
            if t is not None:  # usage counters stay readable: GetUsage answers since start
                t.slots.clear()
                t.rpm = t.tpm = None


# ---- many replicas: Redis ------------------------------------------------------------------------
# A bucket is a hash {level, stamp}; absent = full. Refill to ARGV now, clamp to the capacity,
# then the script's own step. Keys expire once the bucket would be full again (plus a minute).
_RATE_LUA = """
local function refill(key, per_minute, now)
  local v = redis.call('HMGET', key, 'level', 'stamp')
  local level, stamp = tonumber(v[1]), tonumber(v[2])
  if level == nil then return per_minute, now end
  if now > stamp then
    level = level + (now - stamp) * per_minute / 60
    stamp = now
  end
  if level > per_minute then level = per_minute end
  return level, stamp
end
local function store(key, per_minute, level, stamp)
  redis.call('HSET', key, 'level', tostring(level), 'stamp', tostring(stamp))
  local full_in = (per_minute - level) * 60 / per_minute
  redis.call('EXPIRE', key, math.ceil(full_in) + 60)
end
"""

# KEYS: slots, rpm, tpm. ARGV: now, lease_id, expires, max_concurrent, rpm, tpm, want_slot,
# may_queue, pending tpm debit. Returns {outcome, num_active, retry_after} (strings: Lua numbers
# would be cut to integers).
_ADMIT_LUA = (
    _RATE_LUA
    + """
local now = tonumber(ARGV[1])
local max_concurrent, rpm, tpm = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local debit = tonumber(ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local active = redis.call('ZCARD', KEYS[1])
if tpm > 0 and debit ~= 0 then
  local level, stamp = refill(KEYS[3], tpm, now)
  store(KEYS[3], tpm, level - debit, stamp)
end
local has_slot = ARGV[7] == '1' and active < max_concurrent
if not has_slot and ARGV[8] ~= '1' then return {'full', tostring(active), '0'} end
local rl, rs, tl, ts
if rpm > 0 then
  rl, rs = refill(KEYS[2], rpm, now)
  if rl < 1 then return {'requests_per_minute', tostring(active), tostring((1 - rl) * 60 / rpm)} end
end
if tpm > 0 then
  tl, ts = refill(KEYS[3], tpm, now)
  if tl < 1 then
    if tpm < 1 then return {'tokens_per_minute', tostring(active), 'inf'} end
    return {'tokens_per_minute', tostring(active), tostring((1 - tl) * 60 / tpm)}
  end
end
if rpm > 0 then store(KEYS[2], rpm, rl - 1, rs) end
if has_slot then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) - now) + 60)
  return {'active', tostring(active + 1), '0'}
end
return {'queued', tostring(active), '0'}
"""
)

# KEYS: slots. ARGV: now, lease_id, expires, max_concurrent. Returns 1 when the slot was taken.
_TAKE_SLOT_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) - tonumber(ARGV[1])) + 60)
return 1
"""

# KEYS: tpm. ARGV: now, tokens per minute, debit. Returns the level (string).
_CHARGE_LUA = (
    _RATE_LUA
    + """
local now, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local level, stamp = refill(KEYS[1], tpm, now)
level = level - tonumber(ARGV[3])
if tonumber(ARGV[3]) ~= 0 then store(KEYS[1], tpm, level, stamp) end
return tostring(level)
"""
)

# KEYS: rpm. ARGV: now, requests per minute. Returns the level (string), changing nothing.
_LEVEL_LUA = (
    _RATE_LUA
    + """
local level = refill(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[1]))
return tostring(level)
"""
)


# One flush, applied at most once: KEYS[1] marks the batch as done (a retry after a timeout whose
# reply was lost finds it and applies nothing). ARGV: now, then n_tpm, then per tenant (tpm key,
# tokens per minute, debit), then (usage key, field, amount) triples.
_FLUSH_LUA = (
    _RATE_LUA
    + """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 3600) == false then return 0 end
local now, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local i = 3
for _ = 1, n do
  local key, tpm, debit = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local level, stamp = refill(key, tpm, now)
  store(key, tpm, level - debit, stamp)
  i = i + 3
end
while i <= #ARGV do
  redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
return 1
"""
)


class RedisStore(QuotaStore):
    """Counters in a Redis that every replica shares (`redis://HOST:PORT/DB`, or rediss:// for
    TLS). One Lua script per operation; see the module doc for buffering and failing fast."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = KEY_PREFIX,
        timeout_s: float = REDIS_TIMEOUT_S,
        reconnect_s: float = RECONNECT_S,
    ):
        import redis  # only a Redis store needs the client
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self._redis_errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            decode_responses=True,
        )
        self._prefix = key_prefix
        self._reconnect_s = reconnect_s
        self._lock = threading.Lock()  # the buffers and the up/down state
        self._down_since: float | None = None  # monotonic time of the failure; None = up
        self._last_probe = 0.0
        self._pending_tpm: dict[str, int] = {}  # tenant -> tokens not yet charged
        self._tpm_limit: dict[str, int] = {}  # tenant -> its last tokens/minute
        self._forgotten: set[str] = set()  # forgotten tenants whose last charges are not sent yet
        self._pending_usage: dict[tuple[str, str], int] = {}  # (tenant, field) -> amount
        self._unsent: tuple[str, ScriptArgs] | None = None  # a batch whose fate is unknown
        self._admit = self._client.register_script(_ADMIT_LUA)
        self._take = self._client.register_script(_TAKE_SLOT_LUA)
        self._charge = self._client.register_script(_CHARGE_LUA)
        self._level = self._client.register_script(_LEVEL_LUA)
        self._flush = self._client.register_script(_FLUSH_LUA)

    def _key(self, tenant: str, what: str) -> str:
        return f"{self._prefix}{{{tenant}}}:{what}"  # {tenant}: one Redis Cluster slot per tenant

    def _call(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run one Redis operation, failing fast while the store is known to be down."""
        with self._lock:
            if self._down_since is not None:
                raise StoreUnavailable(f"quota store {self._safe_url()} is unreachable")
        try:
            return fn(*args, **kwargs)
        except self._redis_errors as e:
            with self._lock:
                first = self._down_since is None
                if first:
                    self._down_since = time.monotonic()
            if first:
                log.warning("quota store %s unreachable: %s", self._safe_url(), e)
            raise StoreUnavailable(f"quota store {self._safe_url()} is unreachable: {e}") from None

    def _safe_url(self) -> str:
        u = urlparse(self.url)  # never log a password
        return f"{u.scheme}://{u.hostname}:{u.port or 6379}{u.path}"

    @property
    def up(self) -> bool:
        return self._down_since is None

    def probe(self) -> bool:
        with self._lock:
            if self._down_since is None:
                return True
            if time.monotonic() - self._last_probe < self._reconnect_s:
                return False
            self._last_probe = time.monotonic()
        try:
            self._client.ping()
        except self._redis_errors:
            return False
        with self._lock:
            self._down_since = None
        log.warning("quota store %s reachable again", self._safe_url())
        return True

    # -- the scripts ------------------------------------------------------------------------------
    def _take_debit(self, tenant: str, per_minute: int) -> int:
        """The tenant's buffered token charge, taken out of the buffer to send now."""
        with self._lock:
            self._tpm_limit[tenant] = per_minute
            self._forgotten.discard(tenant)  # configured again before its last charges went out
            return self._pending_tpm.pop(tenant, 0)

    def _give_back_debit(self, tenant: str, debit: int) -> None:
        if debit:
            with self._lock:
                self._pending_tpm[tenant] = self._pending_tpm.get(tenant, 0) + debit

    def admit(
        self, tenant: str, lease_id: str, now: float, limits: Limits, want_slot: bool, may_queue: bool, expires: float
    ) -> Grant:
        debit = self._take_debit(tenant, limits.tokens_per_minute)
        keys = [self._key(tenant, "slots"), self._key(tenant, "rpm"), self._key(tenant, "tpm")]
        args: ScriptArgs = [
            repr(now),
            lease_id,
            repr(expires),
            limits.max_concurrent,
            limits.requests_per_minute,
            limits.tokens_per_minute,
            int(want_slot),
            int(may_queue),
            debit,
        ]
        try:
            outcome, active, wait = self._call(self._admit, keys=keys, args=args)
        except StoreUnavailable:
            self._give_back_debit(tenant, debit)
            raise
        return Grant(outcome, int(active), float(wait))

    def take_slot(self, tenant: str, lease_id: str, now: float, max_concurrent: int, expires: float) -> bool:
        return bool(
            self._call(
                self._take, keys=[self._key(tenant, "slots")], args=[repr(now), lease_id, repr(expires), max_concurrent]
            )
        )

    def release(self, tenant: str, lease_id: str) -> None:
        self._call(self._client.zrem, self._key(tenant, "slots"), lease_id)

    def renew(self, slots: list[tuple[str, str]], now: float, expires: float) -> None:
        if not slots:
            return
        pipe = self._client.pipeline(transaction=False)
        for tenant, lease_id in slots:  # ZADD, not XX: a slot that lapsed while Redis was away
            pipe.zadd(self._key(tenant, "slots"), {lease_id: expires})  # is held again
            pipe.expire(self._key(tenant, "slots"), math.ceil(expires - now) + 60)
        self._call(pipe.execute)

    def num_active(self, tenant: str, now: float) -> int:
        return int(self._call(self._client.zcount, self._key(tenant, "slots"), f"({now!r}", "+inf"))

    def charge_tokens(self, tenant: str, num_tokens: int, now: float) -> None:
        with self._lock:
            if self._tpm_limit.get(tenant, 0):
                self._pending_tpm[tenant] = self._pending_tpm.get(tenant, 0) + num_tokens

    def levels(self, tenant: str, now: float, limits: Limits) -> tuple[float | None, float | None]:
        rpm: float | None = None
        tpm: float | None = None
        if limits.requests_per_minute:
            rpm = float(
                self._call(self._level, keys=[self._key(tenant, "rpm")], args=[repr(now), limits.requests_per_minute])
            )
        if limits.tokens_per_minute:
            debit = self._take_debit(tenant, limits.tokens_per_minute)
            try:
                tpm = float(
                    self._call(
                        self._charge, keys=[self._key(tenant, "tpm")], args=[repr(now), limits.tokens_per_minute, debit]
                    )
                )
            except StoreUnavailable:
                self._give_back_debit(tenant, debit)
                raise
        return rpm, tpm

    def add_usage(self, tenant: str, counter: str, amount: int, reason: str | None) -> None:
        field = counter if reason is None else f"rejections:{reason}"
        with self._lock:
            self._pending_usage[(tenant, field)] = self._pending_usage.get((tenant, field), 0) + amount

    def usage(self, tenant: str) -> tuple[dict[str, int], dict[str, int]]:
        self.flush(None)
        raw = self._call(self._client.hgetall, self._key(tenant, "usage"))
        counts: dict[str, int] = {}
        rejections: dict[str, int] = {}
        for raw_field, value in raw.items():
            # str with decode_responses (ours); redis-py's types also allow bytes
            field = raw_field.decode() if isinstance(raw_field, bytes) else str(raw_field)
            if field.startswith("rejections:"):
                rejections[field.split(":", 1)[1]] = int(value)
            else:
                counts[field] = int(value)
        return counts, rejections

    def forget(self, tenant: str) -> None:
        with self._lock:  # charges still buffered go out with the next flush, against the last limit
            if self._pending_tpm.get(tenant):
                self._forgotten.add(tenant)
            else:
                self._tpm_limit.pop(tenant, None)

    def flush(self, now: float | None) -> None:
        """Send the buffered usage increments and, given `now`, the token charges, as one batch
        that Redis applies at most once. A batch whose reply was lost is sent again (as the same
        batch) before anything newer, so nothing is lost and nothing counted twice."""
        with self._lock:
            if self._down_since is not None:
                raise StoreUnavailable(f"quota store {self._safe_url()} is unreachable")
            if self._unsent is None:
                args: ScriptArgs = []
                if now is not None:
                    tpm = [(t, self._tpm_limit.get(t, 0), d) for t, d in self._pending_tpm.items()]
                    tpm = [(t, per_minute, d) for t, per_minute, d in tpm if per_minute and d]
                    self._pending_tpm = {}
                    for t in self._forgotten:
                        self._tpm_limit.pop(t, None)
                    self._forgotten.clear()
                    args += [repr(now), len(tpm)]
                    for t, per_minute, d in tpm:
                        args += [self._key(t, "tpm"), per_minute, d]
                else:
                    args += ["0", 0]
                for (t, field), amount in self._pending_usage.items():
                    args += [self._key(t, "usage"), field, amount]
                self._pending_usage = {}
                if args[1] == 0 and len(args) == 2:
                    return
                self._unsent = (f"{self._prefix}batch:{uuid.uuid4().hex}", args)
            batch, args = self._unsent
        self._call(self._flush, keys=[batch], args=args)
        with self._lock:
            if self._unsent is not None and self._unsent[0] == batch:
                self._unsent = None

    def close(self) -> None:
        try:
            self.flush(time.time())
        except StoreUnavailable:
            log.warning("quota store: buffered usage not sent at shutdown (the store is down)")
        self._client.close()


def open_store(url: str | None) -> QuotaStore:
    """The store for `--quota-store`: None or "memory" -> InProcessStore; redis://, rediss:// or
    unix:// -> RedisStore (nothing is contacted yet). ValueError for anything else."""
    if url is None or url in ("", "memory"):
        return InProcessStore()
    scheme = urlparse(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"--quota-store {url!r}: give redis://HOST:PORT/DB (or rediss://, "
            f"unix://), or leave it unset for the in-process store"
        )
    return RedisStore(url)
