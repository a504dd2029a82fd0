"""API keys: hashing, lookup over hashes only, bearer parsing, and the `tenants` CLI."""

from __future__ import annotations

import hashlib
import io
import re

import pytest

import tinyserve.tenancy.keys as keys_mod
from tinyserve.cli import build_parser, cmd_tenants
from tinyserve.tenancy.config import open_dev_tenant, parse_tenants
from tinyserve.tenancy.keys import KEY_PREFIX, KeyRing, bearer_key, hash_key, new_key

KEYS = {"acme": ["acme-key-1", "acme-key-2"], "hobby": ["hobby-key"]}


def _config():
    lines = []
    for tenant, ks in KEYS.items():
        digests = ", ".join(f'"{hash_key(k)}"' for k in ks)
        lines.append(f"[tenants.{tenant}]\napi_keys_sha256 = [{digests}]\n")
    lines.append("[tenants.nokeys]\n")
    return parse_tenants("\n".join(lines))


def test_hash_key_is_sha256_hex():
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_key("ключ") == hashlib.sha256("ключ".encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", hash_key("x"))


def test_new_keys_are_random_and_prefixed():
    a, b = new_key(), new_key()
    assert a != b and a.startswith(KEY_PREFIX) and b.startswith(KEY_PREFIX)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", a) and len(a) >= len(KEY_PREFIX) + 40


def test_lookup_finds_the_right_tenant():
    ring = KeyRing(_config())
    assert len(ring) == 3
    for tenant, ks in KEYS.items():
        for k in ks:
            assert ring.lookup(k) == tenant


@pytest.mark.parametrize(
    "bad", [None, "", "acme-key-3", "ACME-KEY-1", "acme-key-1 ", "a" * 5000, hash_key("acme-key-1"), "\ud800"]
)
def test_unknown_keys_are_refused(bad):
    # includes the digest itself: knowing the stored hash does not let anyone in
    assert KeyRing(_config()).lookup(bad) is None


def test_keys_are_never_stored_plain():
    ring = KeyRing(_config())
    stored = repr(ring._entries) + repr(vars(ring))
    for ks in KEYS.values():
        for k in ks:
            assert k not in stored and k.encode() not in b"".join(d for d, _ in ring._entries)


def test_lookup_compares_every_digest(monkeypatch):
    """No early exit: compare_digest runs once per known digest whatever the key."""
    calls = []
    real = keys_mod.hmac.compare_digest
    monkeypatch.setattr(keys_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    ring = KeyRing(_config())
    for key in ("acme-key-1", "hobby-key", "nobody"):
        calls.clear()
        ring.lookup(key)
        assert len(calls) == 3


def test_open_config_needs_no_key():
    ring = KeyRing(open_dev_tenant())
    assert ring.lookup(None) == "dev" and ring.lookup("anything") == "dev"


@pytest.mark.parametrize(
    "value,key",
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("BEARER abc", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("abc", None),
        ("", None),
    ],
)
def test_bearer_key(value, key):
    assert bearer_key({"authorization": value}) == key


def test_bearer_key_missing():
    assert bearer_key({}) is None and bearer_key({"x-api-key": "abc"}) is None


# -- CLI ----------------------------------------------------------------------------------------
def _parse(argv):
    return build_parser().parse_args(argv)


def run_tenants(args) -> int:
    return args.func(args)


def test_cli_hash_key_prints_a_new_key_and_its_hash(capsys):
    args = _parse(["tenants", "hash-key"])
    assert args.func is cmd_tenants
    assert run_tenants(args) == 0
    out = capsys.readouterr().out
    key = re.search(r"^key:\s+(\S+)$", out, re.M).group(1)
    digest = re.search(r"^sha256:\s+([0-9a-f]{64})$", out, re.M).group(1)
    assert key.startswith(KEY_PREFIX) and hash_key(key) == digest


@pytest.mark.parametrize(
    "stdin,code", [("my-key\n", 0), ("my-key\r\n", 0), ("my-key", 0), ("", 2), ("\n", 2), ("a\nb\n", 2)]
)
def test_cli_hash_key_stdin(monkeypatch, capsys, stdin, code):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert run_tenants(_parse(["tenants", "hash-key", "--stdin"])) == code
    out, err = capsys.readouterr()
    if code == 0:
        assert out.strip() == hash_key("my-key")
    else:
        assert out == "" and "one non-empty key" in err


def test_cli_check(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text("[tenants.acme]\nweight = 2\nthreads = 3\n")
    assert run_tenants(_parse(["tenants", "check", str(good)])) == 0
    assert "acme:" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[tenants.acme]\nweight = -2\n")
    assert run_tenants(_parse(["tenants", "check", str(bad)])) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: tenants.acme.weight" in err
