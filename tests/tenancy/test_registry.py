"""TenantRegistry: authentication, and SIGHUP-style reloads that keep in-flight streams and
survive broken files."""

from __future__ import annotations

import logging

import pytest

from tinyserve.tenancy.config import DEV_TENANT, TenantConfigError
from tinyserve.tenancy.errors import QuotaExceeded, Unauthenticated
from tinyserve.tenancy.keys import hash_key
from tinyserve.tenancy.registry import TenantRegistry


def tenants_text(**tenants: str) -> str:
    """tenants_text(acme="weight = 2") with a key "<name>-key" for each tenant."""
    return "".join(
        f'[tenants.{name}]\napi_keys_sha256 = ["{hash_key(name + "-key")}"]\n{body}\n' for name, body in tenants.items()
    )


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def tenants_file(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(
        tenants_text(acme="weight = 2\nmax_concurrent = 2\nmax_queued = 0", hobby="max_concurrent = 1\nmax_queued = 0")
    )
    return path


@pytest.fixture
def registry(tenants_file):
    reg = TenantRegistry.from_file(tenants_file)
    yield reg
    reg.close()


def test_authenticate(registry):
    assert registry.authenticate(bearer("acme-key")) == "acme"
    assert registry.authenticate(bearer("hobby-key")) == "hobby"
    with pytest.raises(Unauthenticated, match="missing API key"):
        registry.authenticate({})
    with pytest.raises(Unauthenticated, match="unknown API key"):
        registry.authenticate(bearer("acme-key2"))
    with pytest.raises(Unauthenticated, match="missing"):
        registry.authenticate({"authorization": "Basic acme-key"})
    assert registry.weight("acme") == 2.0 and registry.weight("gone") == 1.0
    assert not registry.is_open


def test_open_dev_registry():
    reg = TenantRegistry.open_dev()
    try:
        assert reg.is_open and reg.authenticate({}) == DEV_TENANT
        assert reg.authenticate(bearer("whatever")) == DEV_TENANT
        assert reg.reload() is False  # no file to reload
    finally:
        reg.close()


def test_start_up_refuses_a_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants.a]\nkv_share = 2\n")
    with pytest.raises(TenantConfigError) as info:
        TenantRegistry.from_file(bad)
    assert (info.value.line, info.value.field) == (2, "tenants.a.kv_share")


def test_reload_keeps_in_flight_streams_and_swaps_keys(registry, tenants_file):
    acme1 = registry.quotas.admit("acme")
    acme2 = registry.quotas.admit("acme")
    hobby = registry.quotas.admit("hobby")
    seen = []
    registry.add_listener(lambda cfg: seen.append(cfg.names))

    # acme: new limits and a new key; hobby removed; newco added
    tenants_file.write_text(
        tenants_text(acme="weight = 5\nmax_concurrent = 3\nmax_queued = 0", newco="").replace(
            hash_key("acme-key"), hash_key("acme-key-v2")
        )
    )
    assert registry.reload() is True
    assert seen == [["acme", "newco"]]

    # in-flight counts survive: acme had 2 of (now) 3 slots
    assert registry.quotas.state("acme")["active"] == 2
    acme3 = registry.quotas.admit("acme")
    with pytest.raises(QuotaExceeded):
        registry.quotas.admit("acme")
    # keys swapped with the config
    assert registry.authenticate(bearer("acme-key-v2")) == "acme"
    with pytest.raises(Unauthenticated):
        registry.authenticate(bearer("acme-key"))
    with pytest.raises(Unauthenticated):
        registry.authenticate(bearer("hobby-key"))
    assert registry.authenticate(bearer("newco-key")) == "newco"
    assert registry.weight("acme") == 5.0
    # the removed tenant admits nothing new; its stream runs on and ends normally
    with pytest.raises(Unauthenticated):
        registry.quotas.admit("hobby")
    hobby.charge_generated(5)
    hobby.release()
    assert registry.executors.submit("hobby", lambda: 7).result(timeout=30) == 7
    # usage (counted by the quotas) kept across the reload, and the removed tenant's too
    assert registry.usage.snapshot("acme").requests == 3
    assert registry.usage.snapshot("acme").rejections == {"concurrency": 1}
    assert registry.usage.snapshot("hobby").generated_tokens == 5
    for lease in (acme1, acme2, acme3):
        lease.release()
    assert registry.quotas.state("acme")["active"] == 0


@pytest.mark.parametrize(
    "broken,line,field",
    [
        ("[tenants.acme]\nweight = 1\nmax_concurrent = -3\n", 3, "tenants.acme.max_concurrent"),
        ("[tenants.acme\n", 1, None),
        (None, None, None),  # the file was deleted
    ],
)
def test_reload_survives_a_broken_file(registry, tenants_file, caplog, broken, line, field):
    lease = registry.quotas.admit("acme")
    if broken is None:
        tenants_file.unlink()
    else:
        tenants_file.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="tinyserve.tenancy"):
        assert registry.reload() is False
    message = caplog.records[-1].getMessage()
    assert "keeping the current tenants" in message and str(tenants_file) in message
    if line is not None:
        assert f"{tenants_file}:{line}:" in message
    if field is not None:
        assert field in message
    # the old config is intact
    assert registry.config.names == ["acme", "hobby"]
    assert registry.authenticate(bearer("hobby-key")) == "hobby"
    assert registry.weight("acme") == 2.0
    assert registry.quotas.state("acme")["active"] == 1
    registry.quotas.admit("acme").release()
    lease.release()


def test_reload_from_another_path_and_listener_errors_are_contained(registry, tmp_path, caplog):
    other = tmp_path / "other.toml"
    other.write_text(tenants_text(solo="threads = 3"))

    def broken_listener(cfg):
        raise RuntimeError("listener bug")

    registry.add_listener(broken_listener)
    with caplog.at_level(logging.ERROR, logger="tinyserve.tenancy"):
        assert registry.reload(other) is True
    assert any("listener failed" in r.getMessage() for r in caplog.records)
    assert registry.config.path == str(other) and registry.config.names == ["solo"]
    assert registry.executors.size("solo") == 3
