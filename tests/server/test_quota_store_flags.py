"""--quota-store / $TINYSERVE_QUOTA_STORE and its policy reach the server's registry; bad values
are refused at start with the flag named."""

from __future__ import annotations

import pytest

from tinyserve.api.server import load_registry
from tinyserve.cli import build_parser, config_from_args
from tinyserve.config import ServerConfig
from tinyserve.metrics import Metrics
from tinyserve.tenancy.store import InProcessStore, RedisStore


def parse(*args: str) -> ServerConfig:
    return config_from_args(build_parser(with_serve=True).parse_args(["serve", *args]))


def test_flag_env_and_default(monkeypatch):
    monkeypatch.delenv("TINYSERVE_QUOTA_STORE", raising=False)
    assert parse().quota_store is None
    monkeypatch.setenv("TINYSERVE_QUOTA_STORE", "redis://10.0.0.5:6379/2")
    assert parse().quota_store == "redis://10.0.0.5:6379/2"
    assert parse("--quota-store", "redis://other:6379/0").quota_store == "redis://other:6379/0"
    c = parse("--quota-store-policy", "closed", "--quota-lease-seconds", "3")
    assert (c.quota_store_policy, c.quota_lease_seconds) == ("closed", 3.0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("quota_store", "http://x:1", "--quota-store"),
        ("quota_lease_seconds", 0.0, "quota_lease_seconds"),
        ("drain_notice_s", -1.0, "drain_notice_s"),
    ],
)
def test_bad_values_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(**{field: value}).validate()


def test_the_registry_uses_the_store(redis_server):
    registry = load_registry(ServerConfig(quota_store=redis_server.url, quota_store_policy="closed"), Metrics())
    try:
        assert isinstance(registry.quotas.store, RedisStore)
        lease = registry.quotas.admit("dev")
        assert registry.quotas.state("dev")["active"] >= 1
        lease.release()
    finally:
        registry.close(wait=False)
    registry = load_registry(ServerConfig(), Metrics())
    assert isinstance(registry.quotas.store, InProcessStore)
    registry.close(wait=False)
