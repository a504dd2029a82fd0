"""Per-tenant thread pools: one tenant flooding its pool does not delay another tenant's work
(shown by ordering and events, never by timing); resizes and removals cancel nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from tinyserve.tenancy.config import parse_tenants
from tinyserve.tenancy.executors import TenantExecutors

HANG_GUARD_S = 30  # only so a broken build fails instead of hanging; never a timing assertion


@pytest.fixture
def pools():
    ex = TenantExecutors(parse_tenants("[tenants.a]\nthreads = 2\n[tenants.b]\nthreads = 1\n"))
    yield ex
    ex.shutdown(wait=True)


def test_a_flooded_pool_does_not_delay_another_tenant(pools):
    gate = threading.Event()  # holds all of a's jobs
    started = threading.Semaphore(0)
    order: list[str] = []

    def slow(i):
        started.release()
        gate.wait(HANG_GUARD_S)
        order.append(f"a{i}")

    flood = [pools.submit("a", slow, i) for i in range(50)]  # far more than a's 2 threads
    for _ in range(2):
        assert started.acquire(timeout=HANG_GUARD_S)  # a's threads are both busy
    b_job = pools.submit("b", lambda: order.append("b") or threading.current_thread().name)
    name = b_job.result(timeout=HANG_GUARD_S)  # runs while a's flood is blocked
    assert order == ["b"] and not any(f.done() for f in flood)
    assert "tinyserve-tenant-b" in name
    gate.set()
    for f in flood:
        f.result(timeout=HANG_GUARD_S)
    assert len(order) == 51


def test_pool_sizes_follow_the_config(pools):
    names = set()
    barrier = threading.Barrier(2, timeout=HANG_GUARD_S)

    def rendezvous():  # succeeds only if two of a's jobs run at once
        barrier.wait()
        names.add(threading.current_thread().name)

    futures = [pools.submit("a", rendezvous) for _ in range(2)]
    for f in futures:
        f.result(timeout=HANG_GUARD_S)
    assert len(names) == 2 and all(n.startswith("tinyserve-tenant-a") for n in names)
    assert pools.size("a") == 2 and pools.size("b") == 1 and pools.size("zzz") is None


def test_resize_and_removal_cancel_nothing(pools):
    gate = threading.Event()
    results = []

    def job(i):
        gate.wait(HANG_GUARD_S)
        results.append(i)
        return threading.current_thread().name

    old = [pools.submit("b", job, i) for i in range(3)]  # one running, two queued on b's pool
    pools.update(parse_tenants("[tenants.b]\nthreads = 3\n"))  # b resized, a removed
    new = pools.submit("b", job, 99)
    orphan = pools.submit("a", lambda: threading.current_thread().name)  # a's stream goes on
    assert "orphans" in orphan.result(timeout=HANG_GUARD_S)
    gate.set()
    old_names = {f.result(timeout=HANG_GUARD_S) for f in old}
    new_name = new.result(timeout=HANG_GUARD_S)
    assert sorted(results) == [0, 1, 2, 99]  # queued work on the old pool still ran
    assert new_name not in old_names  # and new work used the new pool
    assert all(n.startswith("tinyserve-tenant-b-") for n in old_names | {new_name})
    assert pools.size("b") == 3


def test_async_run(pools):
    async def main():
        return await pools.run("b", lambda x: x * 2, 21)

    assert asyncio.run(main()) == 42


def test_shutdown_refuses_new_work():
    ex = TenantExecutors(parse_tenants("[tenants.a]\n"))
    assert ex.submit("a", lambda: 1).result(timeout=HANG_GUARD_S) == 1
    ex.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        ex.submit("a", lambda: 1)
