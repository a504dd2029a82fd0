"""Usage counters: per tenant, isolated, thread-safe, mirrored to an observer (metrics)."""

from __future__ import annotations

import threading

import pytest

from tinyserve.tenancy.usage import COUNTERS, Usage, UsageSnapshot


def test_counts_per_tenant_are_isolated():
    u = Usage()
    u.record_request("a")
    u.record_prompt("a", 100, cached_tokens=32)
    u.record_generated("a", 7)
    u.record_rejection("a", "requests_per_minute")
    u.record_rejection("a", "requests_per_minute")
    u.record_request("b")
    a, b = u.snapshot("a"), u.snapshot("b")
    assert (a.requests, a.prompt_tokens, a.cached_prompt_tokens, a.generated_tokens) == (1, 100, 32, 7)
    assert dict(a.rejections) == {"requests_per_minute": 2} and a.total_rejections == 2
    assert (b.requests, b.prompt_tokens, b.generated_tokens, dict(b.rejections)) == (1, 0, 0, {})
    assert u.snapshot("nobody") == UsageSnapshot("nobody")


def test_no_way_to_read_every_tenant():
    public = [n for n in dir(Usage) if not n.startswith("_")]
    assert sorted(public) == ["record_generated", "record_prompt", "record_rejection", "record_request", "snapshot"]


def test_snapshot_is_a_copy():
    u = Usage()
    u.record_rejection("a", "concurrency")
    snap = u.snapshot("a")
    u.record_rejection("a", "concurrency")
    assert snap.rejections["concurrency"] == 1
    with pytest.raises(TypeError):
        snap.rejections["concurrency"] = 0


def test_counters_never_go_down():
    with pytest.raises(ValueError):
        Usage().record_generated("a", -1)


def test_observer_mirrors_every_increment():
    seen = []
    u = Usage(observer=lambda *a: seen.append(a))
    u.record_request("a")
    u.record_prompt("a", 10, 4)
    u.record_generated("a", 0)  # nothing to report
    u.record_rejection("b", "max_queued")
    assert seen == [
        ("a", "requests", 1, None),
        ("a", "prompt_tokens", 10, None),
        ("a", "cached_prompt_tokens", 4, None),
        ("b", "rejections", 1, "max_queued"),
    ]
    assert {c for _, c, _, _ in seen} <= set(COUNTERS)


def test_thread_safe_counts():
    u = Usage()

    def work(tenant):
        for _ in range(2000):
            u.record_generated(tenant, 1)
            u.record_request(tenant)

    threads = [threading.Thread(target=work, args=(t,)) for t in ("a", "a", "b", "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert u.snapshot("a").generated_tokens == 6000 and u.snapshot("a").requests == 6000
    assert u.snapshot("b").generated_tokens == 2000
