"""Tenants file parsing: every field, defaults, and each invalid case naming its line and field."""

from __future__ import annotations

import dataclasses

import pytest

from tinyserve.tenancy.config import (
    DEV_TENANT,
    FIELDS,
    TenantConfig,
    TenantConfigError,
    load_tenants,
    open_dev_tenant,
    parse_tenants,
)
from tinyserve.tenancy.keys import hash_key

KEY_A = hash_key("key-a")
KEY_B = hash_key("key-b")

FULL = f"""\
# two tenants
[tenants.acme]
api_keys_sha256 = ["{KEY_A}", "{KEY_B.upper()}"]
weight = 2.0
max_concurrent = 8
requests_per_minute = 600
tokens_per_minute = 200000
max_queued = 32
max_prompt_tokens = 4096
max_output_tokens = 1024
kv_share = 0.5
models = ["smollm2-*", "tiny"]
threads = 2

[tenants.hobby]
weight = 1
"""


def test_every_field_parsed(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text(FULL)
    cfg = load_tenants(path)
    assert cfg.names == ["acme", "hobby"]
    assert cfg.path == str(path) and not cfg.open
    acme = cfg.get("acme")
    assert acme == TenantConfig(
        name="acme",
        api_keys_sha256=(KEY_A, KEY_B),
        weight=2.0,
        max_concurrent=8,
        requests_per_minute=600,
        tokens_per_minute=200000,
        max_queued=32,
        max_prompt_tokens=4096,
        max_output_tokens=1024,
        kv_share=0.5,
        models=("smollm2-*", "tiny"),
        threads=2,
    )
    assert acme.allows_model("smollm2-135m") and acme.allows_model("tiny")
    assert not acme.allows_model("llama-7b") and not acme.allows_model("Tiny")


def test_defaults_for_missing_fields():
    t = parse_tenants("[tenants.bare]\n").get("bare")
    assert t == TenantConfig(name="bare")
    assert (t.api_keys_sha256, t.weight, t.max_concurrent, t.max_queued) == ((), 1.0, 16, 64)
    assert (t.requests_per_minute, t.tokens_per_minute) == (0, 0)
    assert (t.max_prompt_tokens, t.max_output_tokens, t.kv_share, t.models, t.threads) == (0, 0, 1.0, ("*",), 1)
    assert t.allows_model("anything")
    # the docstring's defaults table documents every field
    import tinyserve.tenancy.config as mod

    for f in FIELDS:
        assert f"\n    {f} " in mod.__doc__


def test_weight_int_accepted_and_tenant_order_kept():
    cfg = parse_tenants("[tenants.b]\nweight = 3\n[tenants.a]\n")
    assert [t.name for t in cfg] == ["b", "a"] and cfg.get("b").weight == 3.0


def test_dotted_and_inline_forms():
    cfg = parse_tenants("tenants.x.weight = 2.5\n[tenants.y]\n")
    assert cfg.get("x").weight == 2.5
    cfg = parse_tenants("[tenants]\nz = { threads = 3 }\n")
    assert cfg.get("z").threads == 3


def test_open_dev_tenant():
    cfg = open_dev_tenant()
    assert cfg.open and cfg.names == [DEV_TENANT] and cfg.path is None
    assert cfg.get(DEV_TENANT).allows_model("whatever")


def test_config_is_immutable():
    cfg = parse_tenants("[tenants.a]\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.get("a").weight = 5.0
    with pytest.raises(TypeError):
        cfg.tenants["b"] = cfg.get("a")


def _error(text: str) -> TenantConfigError:
    with pytest.raises(TenantConfigError) as info:
        parse_tenants(text, "t.toml")
    return info.value


# (text, expected line, expected field, a fragment of the message)
INVALID = [
    ("[tenants.a]\nweight = 0\n", 2, "tenants.a.weight", "> 0"),
    ("[tenants.a]\nthreads = 1\nweight = -1.5\n", 3, "tenants.a.weight", "-1.5"),
    ("[tenants.a]\nweight = inf\n", 2, "tenants.a.weight", "finite"),
    ("[tenants.a]\nweight = nan\n", 2, "tenants.a.weight", "finite"),
    ('[tenants.a]\nweight = "2"\n', 2, "tenants.a.weight", "number"),
    ("[tenants.a]\nweight = true\n", 2, "tenants.a.weight", "boolean"),
    ("[tenants.a]\n\n\nkv_share = 0.0\n", 4, "tenants.a.kv_share", "(0, 1]"),
    ("[tenants.a]\nkv_share = 1.5\n", 2, "tenants.a.kv_share", "(0, 1]"),
    ("[tenants.a]\nmax_concurrent = 0\n", 2, "tenants.a.max_concurrent", ">= 1"),
    ("[tenants.a]\nmax_concurrent = 2.0\n", 2, "tenants.a.max_concurrent", "integer"),
    ("[tenants.a]\nrequests_per_minute = -1\n", 2, "tenants.a.requests_per_minute", ">= 0"),
    ("[tenants.a]\ntokens_per_minute = -5\n", 2, "tenants.a.tokens_per_minute", ">= 0"),
    ("[tenants.a]\nmax_queued = -1\n", 2, "tenants.a.max_queued", ">= 0"),
    ("[tenants.a]\nmax_prompt_tokens = -1\n", 2, "tenants.a.max_prompt_tokens", ">= 0"),
    ("[tenants.a]\nmax_output_tokens = false\n", 2, "tenants.a.max_output_tokens", "integer"),
    ("[tenants.a]\nthreads = 0\n", 2, "tenants.a.threads", ">= 1"),
    ("[tenants.a]\nthreads = 1000\n", 2, "tenants.a.threads", "<= 64"),
    ('[tenants.a]\nmodels = "*"\n', 2, "tenants.a.models", "array"),
    ("[tenants.a]\nmodels = []\n", 2, "tenants.a.models", "at least one"),
    ('[tenants.a]\nmodels = ["x", 3]\n', 2, "tenants.a.models", "item 1"),
    ('[tenants.a]\nmodels = ["  "]\n', 2, "tenants.a.models", "empty"),
    ("[tenants.a]\nweight = 1\nwieght = 2\n", 3, "tenants.a.wieght", "unknown field"),
    ('[tenants.a]\napi_keys_sha256 = "abc"\n', 2, "tenants.a.api_keys_sha256", "array"),
    (
        '[tenants.a]\napi_keys_sha256 = [\n  "' + KEY_A + '",\n  "abc123",\n]\n',
        4,
        "tenants.a.api_keys_sha256",
        "not a hex SHA-256",
    ),
    ('[tenants.a]\napi_keys_sha256 = ["' + "g" * 64 + '"]\n', 2, "tenants.a.api_keys_sha256", "64 hex digits"),
    (
        '[tenants.a]\napi_keys_sha256 = ["' + KEY_A + '", "' + KEY_A.upper() + '"]\n',
        2,
        "tenants.a.api_keys_sha256",
        "repeats",
    ),
    (
        '[tenants.a]\napi_keys_sha256 = ["' + KEY_A + '"]\n\n[tenants.b]\nweight = 2\n'
        'api_keys_sha256 = [\n  "' + KEY_B + '",\n  "' + KEY_A + '",\n]\n',
        8,
        "tenants.b.api_keys_sha256",
        "already a key of tenant 'a'",
    ),
    ('[tenants."bad name"]\n', 1, "tenants.bad name", "bad tenant name"),
    ('[tenants.a]\n[tenants."-x"]\nweight = 1\n', 2, "tenants.-x", "bad tenant name"),
    ("tenants = 5\n", 1, "tenants", "table"),
    ("tenants.a = 5\n", 1, "tenants.a", "must be a table"),
    ("[tenant.a]\nweight = 1\n", 1, "tenant", "unknown top-level key"),
    ("[tenants.a]\n[server]\nport = 1\n", 2, "server", "unknown top-level key"),
    ("# nothing\n", None, "tenants", "no tenants"),
    ("[tenants]\n", 1, "tenants", "no tenants"),
]


@pytest.mark.parametrize("text,line,field,fragment", INVALID)
def test_invalid_names_line_and_field(text, line, field, fragment):
    e = _error(text)
    assert e.path == "t.toml"
    assert (e.line, e.field) == (line, field)
    assert fragment in e.message
    prefix = f"t.toml:{line}: " if line is not None else "t.toml: "
    assert str(e) == f"{prefix}{field}: {e.message}"
    assert isinstance(e, ValueError)


def test_field_line_found_in_the_right_table():
    # the same field in an earlier table must not be blamed
    text = "[tenants.a]\nweight = 1\n\n[tenants.b]\nthreads = 2\nweight = 0\n"
    e = _error(text)
    assert (e.line, e.field) == (6, "tenants.b.weight")


@pytest.mark.parametrize(
    "text,line",
    [
        ("[tenants.a]\nweight = \n", 2),
        ("[tenants.a]\nweight = 1\nweight = 2\n", 3),
        ("[tenants.a\n", 1),
        ("[tenants.a]\n[tenants.a]\n", 2),
    ],
)
def test_toml_syntax_errors_name_the_line(text, line):
    e = _error(text)
    assert e.line == line and e.field is None
    assert e.message.startswith("TOML syntax error")
    assert str(e).startswith(f"t.toml:{line}:")


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(TenantConfigError, match="cannot read") as info:
        load_tenants(tmp_path / "missing.toml")
    assert info.value.path.endswith("missing.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[tenants.a]\n# caf\xe9\n")
    with pytest.raises(TenantConfigError, match="UTF-8") as info:
        load_tenants(bad)
    assert info.value.line == 2
    with pytest.raises(TenantConfigError, match="cannot read"):
        load_tenants(tmp_path)  # a directory
