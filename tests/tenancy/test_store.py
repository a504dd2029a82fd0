"""Two Quotas sharing one store stand for two replicas: limits hold across them. With Redis:
slot leases lapse when their replica stops renewing them, and a Redis that goes away follows the
configured policy without hanging, then recovers by itself. (The same Quotas interface as
test_quotas.py; there every test runs against both stores.)"""

from __future__ import annotations

import time
import uuid

import pytest
from test_quotas import FakeClock, refused

from realservers import RedisServer
from tinyserve.tenancy.config import parse_tenants
from tinyserve.tenancy.errors import QuotaStoreUnavailable
from tinyserve.tenancy.quotas import Quotas
from tinyserve.tenancy.store import InProcessStore, RedisStore, StoreUnavailable, open_store
from tinyserve.tenancy.usage import Usage

LEASE_S = 10.0


@pytest.fixture(params=["memory", "redis"])
def shared(request):
    """new() -> one more store over the same counters (a replica's view)."""
    made = []
    if request.param == "memory":
        one = InProcessStore()
        yield lambda: one
        return
    url, prefix = request.getfixturevalue("redis_server").url, f"test:{uuid.uuid4().hex}:"

    def new():
        s = RedisStore(url, key_prefix=prefix)
        made.append(s)
        return s

    yield new
    for s in made:
        s.close()


def replicas(text: str, new_store, n: int = 2, clock=None, **kw) -> tuple[list[Quotas], FakeClock]:
    clock = clock or FakeClock()
    cfg = parse_tenants(text)
    out = []
    for _ in range(n):
        store = new_store()
        out.append(Quotas(cfg, clock=clock, store=store, usage=Usage(store=store), lease_seconds=LEASE_S, **kw))
    return out, clock


def test_concurrency_is_global_across_replicas(shared):
    (a, b), _ = replicas("[tenants.t]\nmax_concurrent = 2\nmax_queued = 0\n", shared)
    la, lb = a.admit("t"), b.admit("t")
    e = refused(a.admit, "t")
    assert e.kind == "concurrency" and "2 streams running" in e.description
    refused(b.admit, "t")
    assert a.state("t")["active"] == b.state("t")["active"] == 2
    lb.release()
    assert a.admit("t").active  # the slot b freed, taken through a
    la.release()


def test_requests_per_minute_are_global_across_replicas(shared):
    (a, b), clock = replicas("[tenants.t]\nrequests_per_minute = 10\nmax_concurrent = 100\n", shared)
    admitted = 0
    for i in range(30):  # alternating, as a balancer would send them
        try:
            (a if i % 2 else b).admit("t").release()
            admitted += 1
        except Exception as e:
            assert e.kind == "requests_per_minute"
    assert admitted == 10  # 10 in total, not 10 per replica
    clock.advance(6)  # one refills every 6 s
    b.admit("t")
    refused(a.admit, "t")


def test_tokens_per_minute_are_global_across_replicas(shared):
    (a, b), _ = replicas("[tenants.t]\ntokens_per_minute = 100\nmax_concurrent = 100\n", shared)
    la = a.admit("t")
    la.charge_prompt(60)
    a.maintain()  # a shared store buffers charges: they reach the others within MAINTAIN_S
    lb = b.admit("t")
    lb.charge_generated(45)  # 105 charged: 5 in debt
    assert refused(b.admit, "t").kind == "tokens_per_minute"  # b's admission sends b's charges
    assert a.state("t")["tpm_available"] == pytest.approx(-5)
    assert refused(a.admit, "t").kind == "tokens_per_minute"


def test_a_queued_lease_takes_a_slot_another_replica_freed(shared):
    (a, b), _ = replicas("[tenants.t]\nmax_concurrent = 1\nmax_queued = 1\n", shared)
    running = b.admit("t")
    queued = a.admit("t")
    assert not queued.active
    woken = []
    queued.when_active(lambda: woken.append(1))
    running.release()  # on the other replica
    a.maintain()  # what a's maintenance thread does
    assert queued.active and woken == [1]


def test_usage_counts_every_replica(shared):
    (a, b), _ = replicas("[tenants.t]\nmax_concurrent = 1\nmax_queued = 0\n", shared)
    la = a.admit("t")
    la.charge_prompt(7)
    refused(b.admit, "t")
    la.release()
    lb = b.admit("t")
    lb.charge_generated(5)
    a.maintain(), b.maintain()  # buffered counts are sent every MAINTAIN_S
    for q in (a, b):
        snap = q._usage.snapshot("t")
        assert (snap.requests, snap.prompt_tokens, snap.generated_tokens) == (2, 7, 5)
        assert dict(snap.rejections) == {"concurrency": 1}


# ---- Redis only: leases that lapse, a Redis that goes away ----------------------------------------
def redis_replicas(url: str, text: str, n=2, **kw):
    prefix = f"test:{uuid.uuid4().hex}:"
    return replicas(text, lambda: RedisStore(url, key_prefix=prefix), n, **kw)


def test_a_removed_tenants_last_charges_still_reach_the_shared_bucket(redis_server):
    # a rolling config change: replica a drops tenant t while its last stream runs, b still serves t
    text = "[tenants.t]\ntokens_per_minute = 100\nmax_concurrent = 100\n"
    (a, b), _ = redis_replicas(redis_server.url, text)
    la = a.admit("t")
    a.update(parse_tenants("[tenants.other]\n"))
    la.charge_prompt(30)
    la.charge_generated(50)
    la.release()  # t is idle and removed on a: a forgets it, with 80 tokens still buffered
    assert "t" not in a._states
    a.maintain()  # the flush that sends them
    assert b.state("t")["tpm_available"] == pytest.approx(20)
    assert a.store._tpm_limit.get("t") is None  # and then a holds nothing more for t


def test_a_slot_whose_replica_stops_renewing_lapses(redis_server):
    (dead, alive), clock = redis_replicas(redis_server.url, "[tenants.t]\nmax_concurrent = 1\nmax_queued = 0\n")
    dead.admit("t")  # then the replica dies: nobody renews it
    held = None
    clock.advance(LEASE_S - 1)
    refused(alive.admit, "t")
    clock.advance(1.5)  # past the lease: the slot is free
    held = alive.admit("t")
    assert held.active
    for _ in range(5):  # a live replica's renewals keep it held
        clock.advance(LEASE_S / 2)
        alive.maintain()
        refused(dead.admit, "t")
    held.release()
    assert dead.admit("t").active


@pytest.fixture
def own_redis(tmp_path):
    with RedisServer(tmp_path) as server:
        yield server


def test_redis_down_policy_open_admits_and_counts_then_recovers(own_redis):
    errors = []
    (q,), _ = redis_replicas(
        own_redis.url,
        "[tenants.t]\nmax_concurrent = 1\nmax_queued = 0\n",
        n=1,
        store_policy="open",
        on_store_error=errors.append,
    )
    first = q.admit("t")
    first.charge_generated(3)
    own_redis.stop()
    t0 = time.monotonic()
    admitted = [q.admit("t") for _ in range(3)]  # over max_concurrent, but nobody can count
    assert all(lease.active and not lease.shared for lease in admitted)
    assert time.monotonic() - t0 < 5  # failing fast, not hanging (a hang guard)
    assert errors and set(errors) <= {"admit", "release", "flush"}
    for lease in admitted + [first]:
        lease.release()  # first's slot: lapses in Redis (gone anyway)
    own_redis.start()  # the same port, an empty Redis
    deadline = time.monotonic() + 10
    while not q.store.probe():  # reconnects by itself (maintain probes)
        assert time.monotonic() < deadline, "the store never came back"
        time.sleep(0.1)
    again = q.admit("t")
    assert again.shared and again.active
    refused(q.admit, "t")  # limits hold again


def test_a_stream_admitted_open_counts_once_redis_is_back(own_redis):
    (q, other), _ = redis_replicas(
        own_redis.url, "[tenants.t]\nmax_concurrent = 1\nmax_queued = 0\n", store_policy="open"
    )
    own_redis.stop()
    running = q.admit("t")  # admitted open: not counted anywhere
    assert not running.shared
    own_redis.start()
    deadline = time.monotonic() + 10
    while not q.store.probe():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    q.maintain()  # registers it in the store
    assert running.shared
    assert refused(other.admit, "t").kind == "concurrency"
    running.release()
    assert other.admit("t").active


def test_redis_down_policy_closed_refuses_with_unavailable(own_redis):
    (q,), _ = redis_replicas(own_redis.url, "[tenants.t]\n", n=1, store_policy="closed")
    q.admit("t").release()
    own_redis.stop()
    with pytest.raises(QuotaStoreUnavailable):
        q.admit("t")
    with pytest.raises(StoreUnavailable):
        q._usage.snapshot("t")  # GetUsage: UNAVAILABLE, not a made-up zero


def test_usage_buffered_while_redis_is_down_is_sent_after(own_redis):
    (q,), _ = redis_replicas(own_redis.url, "[tenants.t]\n", n=1)
    lease = q.admit("t")
    q.maintain()
    own_redis.proc.send_signal(19)  # SIGSTOP: Redis hangs, the calls time out
    try:
        lease.charge_generated(4)
        q.maintain()  # flush fails (timeout), the counts stay
    finally:
        own_redis.proc.send_signal(18)  # SIGCONT
    deadline = time.monotonic() + 10
    while not q.store.probe():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    q.maintain()
    assert q._usage.snapshot("t").generated_tokens == 4


def test_open_store_urls():
    assert isinstance(open_store(None), InProcessStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    with pytest.raises(ValueError, match="redis://"):
        open_store("http://x")
