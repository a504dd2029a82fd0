"""Admission quotas with a fake clock: each limit refuses with its kind and a sensible retry_after,
recovers as time passes, and streams give their slot back when they end.

Every test runs twice: against the in-process store and against a real redis-server (the
RedisStore's Lua scripts), through the same Quotas interface."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest

from tinyserve.tenancy.config import parse_tenants
from tinyserve.tenancy.errors import PermissionDenied, QuotaExceeded, Unauthenticated
from tinyserve.tenancy.quotas import CONCURRENCY_RETRY_S, Quotas
from tinyserve.tenancy.store import InProcessStore, QuotaStore, RedisStore


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_new_store = [InProcessStore]  # set per test by the `store` fixture


@pytest.fixture(params=["memory", "redis"], autouse=True)
def store_kind(request):
    """Run the test with in-process stores, then with Redis stores (each with its own keys)."""
    stores: list[QuotaStore] = []

    def new() -> QuotaStore:
        if request.param == "memory":
            s: QuotaStore = InProcessStore()
        else:
            url = request.getfixturevalue("redis_server").url
            s = RedisStore(url, key_prefix=f"test:{uuid.uuid4().hex}:")
        stores.append(s)
        return s

    _new_store[0] = new
    yield request.param
    for s in stores:
        s.close()


def make(text: str, clock: FakeClock | None = None) -> tuple[Quotas, FakeClock]:
    clock = clock or FakeClock()
    return Quotas(parse_tenants(text), clock=clock, store=_new_store[0]()), clock


def refused(fn, *args, **kwargs) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        fn(*args, **kwargs)
    return info.value


def test_concurrency_without_queue_refuses_and_recovers_on_release():
    q, _ = make("[tenants.a]\nmax_concurrent = 2\nmax_queued = 0\n")
    l1, l2 = q.admit("a"), q.admit("a")
    assert l1.active and l2.active
    e = refused(q.admit, "a")
    assert (e.kind, e.limit, e.tenant, e.subject) == ("concurrency", "max_concurrent", "a", "tenant:a")
    assert e.retry_after == CONCURRENCY_RETRY_S
    assert "2" in e.description
    l1.release()
    l1.release()  # idempotent: frees one slot, not two
    l3 = q.admit("a")
    assert l3.active
    refused(q.admit, "a")
    assert q.state("a")["active"] == 2


def test_queue_fills_then_refuses_and_queued_leases_activate_in_order():
    q, _ = make("[tenants.a]\nmax_concurrent = 1\nmax_queued = 2\n")
    running = q.admit("a")
    woken: list[str] = []
    w1, w2 = q.admit("a"), q.admit("a")
    assert not w1.active and not w2.active
    w1.when_active(lambda: woken.append("w1"))
    w2.when_active(lambda: woken.append("w2"))
    e = refused(q.admit, "a")
    assert (e.kind, e.limit, e.retry_after) == ("max_queued", "max_queued", CONCURRENCY_RETRY_S)
    assert q.state("a")["queued"] == 2
    running.release()
    assert woken == ["w1"] and w1.active and not w2.active
    w1.release()
    assert woken == ["w1", "w2"] and w2.active
    # a callback registered on an already active lease runs at once
    w2.when_active(lambda: woken.append("again"))
    assert woken[-1] == "again"


def test_a_queued_lease_released_gives_up_its_place():
    q, _ = make("[tenants.a]\nmax_concurrent = 1\nmax_queued = 2\n")
    running = q.admit("a")
    gone, stays = q.admit("a"), q.admit("a")
    woken = []
    gone.when_active(lambda: woken.append("gone"))
    gone.release()  # client went away while queued
    assert q.state("a")["queued"] == 1
    running.release()
    assert stays.active and woken == [] and not gone.active


def test_new_requests_queue_behind_queued_ones():
    q, _ = make("[tenants.a]\nmax_concurrent = 1\nmax_queued = 5\n")
    first = q.admit("a")
    queued = q.admit("a")
    first.release()
    assert queued.active
    later = q.admit("a")  # a slot is busy (queued took it): this one waits
    assert not later.active


def test_tenants_do_not_share_slots():
    q, _ = make("[tenants.a]\nmax_concurrent = 1\nmax_queued = 0\n[tenants.b]\nmax_concurrent = 1\n")
    q.admit("a")
    refused(q.admit, "a")
    assert q.admit("b").active


def test_requests_per_minute_bucket():
    q, clock = make("[tenants.a]\nrequests_per_minute = 60\nmax_concurrent = 1000\n")
    for _ in range(60):  # a burst of one minute's worth
        q.admit("a").release()
    e = refused(q.admit, "a")
    assert (e.kind, e.limit) == ("requests_per_minute", "requests_per_minute")
    assert e.retry_after == pytest.approx(1.0)  # 60/min refills one per second
    clock.advance(0.5)
    assert refused(q.admit, "a").retry_after == pytest.approx(0.5)
    clock.advance(0.5)
    q.admit("a")
    refused(q.admit, "a")
    clock.advance(600)  # refills up to capacity, no more
    for _ in range(60):
        q.admit("a")
    refused(q.admit, "a")


def test_refusal_charges_nothing():
    q, clock = make("[tenants.a]\nrequests_per_minute = 2\nmax_concurrent = 1\nmax_queued = 0\n")
    q.admit("a")
    refused(q.admit, "a")  # concurrency refuses before the rate is charged
    assert q.state("a")["rpm_available"] == pytest.approx(1.0)


def test_tokens_per_minute_prompt_and_generated():
    q, clock = make("[tenants.a]\ntokens_per_minute = 600\nmax_concurrent = 100\n")
    lease = q.admit("a")
    lease.charge_prompt(500)
    lease.charge_generated(50)
    assert lease.prompt_tokens == 500 and lease.generated_tokens == 50
    other = q.admit("a")  # 50 tokens left: admitted
    other.charge_prompt(200)  # goes into debt (-150): a stream is never cut
    lease.charge_generated(10)
    assert q.state("a")["tpm_available"] == pytest.approx(-160)
    e = refused(q.admit, "a")
    assert (e.kind, e.limit) == ("tokens_per_minute", "tokens_per_minute")
    assert e.retry_after == pytest.approx(161 / 10)  # 600/min = 10 per second, up to 1 token
    clock.advance(e.retry_after)
    q.admit("a")


def test_max_prompt_tokens_cannot_be_retried():
    q, _ = make("[tenants.a]\nmax_prompt_tokens = 100\ntokens_per_minute = 1000\n")
    lease = q.admit("a")
    e = refused(lease.charge_prompt, 101)
    assert (e.kind, e.limit, e.retry_after) == ("max_prompt_tokens", "max_prompt_tokens", None)
    assert "101" in e.description and "100" in e.description
    assert q.state("a")["tpm_available"] == pytest.approx(1000)  # nothing charged
    lease.charge_prompt(100)
    assert q.state("a")["tpm_available"] == pytest.approx(900)


def test_max_output_tokens():
    q, _ = make("[tenants.a]\nmax_output_tokens = 64\n[tenants.b]\n")
    e = refused(q.admit, "a", max_output_tokens=65)
    assert (e.kind, e.retry_after) == ("max_output_tokens", None)
    q.admit("a", max_output_tokens=64).release()
    assert q.max_output_tokens("a", None, default=256) == 64
    assert q.max_output_tokens("a", 10, default=256) == 10
    assert refused(q.max_output_tokens, "a", 100, default=256).kind == "max_output_tokens"
    assert q.max_output_tokens("b", None, default=256) == 256
    assert q.max_output_tokens("b", 5000, default=256) == 5000


def test_models():
    q, _ = make('[tenants.a]\nmodels = ["smollm2-*"]\n[tenants.b]\n')
    q.admit("a", model="smollm2-135m").release()
    with pytest.raises(PermissionDenied) as info:
        q.admit("a", model="llama")
    assert (info.value.tenant, info.value.model) == ("a", "llama")
    with pytest.raises(PermissionDenied):
        q.check_model("a", "llama")
    q.check_model("b", "llama")
    assert q.state("a")["active"] == 0


def test_unknown_tenant():
    q, _ = make("[tenants.a]\n")
    with pytest.raises(Unauthenticated):
        q.admit("zzz")


def test_negative_charge_is_a_bug():
    q, _ = make("[tenants.a]\n")
    with pytest.raises(ValueError):
        q.admit("a").charge_generated(-1)


def test_context_manager_releases():
    q, _ = make("[tenants.a]\nmax_concurrent = 1\nmax_queued = 0\n")
    with q.admit("a"):
        refused(q.admit, "a")
    assert q.admit("a").active


def test_update_keeps_in_flight_and_applies_new_limits():
    q, clock = make(
        "[tenants.a]\nmax_concurrent = 1\nmax_queued = 3\nrequests_per_minute = 10\n"
        "[tenants.gone]\nmax_concurrent = 1\nmax_queued = 0\n"
    )
    running, queued = q.admit("a"), q.admit("a")
    gone = q.admit("gone")
    woken = []
    queued.when_active(lambda: woken.append(1))
    q.update(parse_tenants("[tenants.a]\nmax_concurrent = 2\nmax_queued = 3\nrequests_per_minute = 5\n[tenants.new]\n"))
    assert queued.active and woken == [1]  # the new room woke the queued lease
    assert q.state("a")["active"] == 2
    assert q.state("a")["rpm_available"] == pytest.approx(5)  # 8 left, clamped to the new 5
    with pytest.raises(Unauthenticated):
        q.admit("gone")  # removed: nothing new
    gone.charge_generated(3)  # its stream runs on
    gone.release()
    assert q.state("gone")["removed"]
    q.admit("new").release()
    running.release()
    assert q.state("a")["active"] == 1


def test_wait_active_asyncio_woken_from_another_thread():
    q, _ = make("[tenants.a]\nmax_concurrent = 1\nmax_queued = 1\n")

    async def main():
        running = q.admit("a")
        queued = q.admit("a")
        waiter = asyncio.ensure_future(queued.wait_active())
        await asyncio.sleep(0)
        assert not waiter.done()
        t = threading.Thread(target=running.release)  # e.g. the engine thread ending a stream
        t.start()
        await asyncio.wait_for(waiter, 30)  # (a hang guard, not a timing check)
        t.join()
        assert queued.active

    asyncio.run(main())


def test_thread_safety_of_slots():
    q, _ = make("[tenants.a]\nmax_concurrent = 3\nmax_queued = 0\n")
    peak = []
    lock = threading.Lock()
    active = [0]
    refusals = [0]

    def worker():
        for _ in range(300):
            try:
                lease = q.admit("a")
            except QuotaExceeded:
                with lock:
                    refusals[0] += 1
                continue
            with lock:
                active[0] += 1
                peak.append(active[0])
            with lock:
                active[0] -= 1
            lease.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peak) <= 3 and q.state("a")["active"] == 0
    assert len(peak) + refusals[0] == 8 * 300


def test_usage_counts_admissions_refusals_and_tokens():
    from tinyserve.tenancy.usage import Usage

    store = _new_store[0]()
    usage = Usage(store=store)
    q = Quotas(
        parse_tenants(
            "[tenants.a]\nmax_concurrent = 1\nmax_queued = 0\n"
            'max_prompt_tokens = 10\nmax_output_tokens = 5\nmodels = ["m"]\n'
        ),
        clock=FakeClock(),
        usage=usage,
        store=store,
    )
    lease = q.admit("a", model="m")
    lease.charge_prompt(8)
    lease.charge_generated(3)
    refused(q.admit, "a")  # concurrency
    refused(lease.charge_prompt, 11)  # max_prompt_tokens
    refused(q.max_output_tokens, "a", 6, default=5)  # max_output_tokens
    with pytest.raises(PermissionDenied):
        q.admit("a", model="other")
    snap = usage.snapshot("a")
    assert (snap.requests, snap.prompt_tokens, snap.generated_tokens) == (1, 8, 3)
    assert dict(snap.rejections) == {
        "concurrency": 1,
        "max_prompt_tokens": 1,
        "max_output_tokens": 1,
        "permission_denied": 1,
    }
