"""The tenants file (`tinyserve serve --tenants tenants.toml`): one TOML table per tenant.

    [tenants.acme]
    api_keys_sha256 = ["<hex sha256 of the key>"]   # `tinyserve tenants hash-key` makes one
    weight = 2.0
    max_concurrent = 16
    ...

Every field is optional. Defaults and meaning:

    field                default   meaning
    -------------------  --------  -------------------------------------------------------------
    api_keys_sha256      []        hex SHA-256 digests (64 hex digits) of the tenant's API keys;
                                   keys themselves are never stored. No keys: nobody can act as
                                   the tenant (a way to switch it off without deleting it).
    weight               1.0       share of the machine when several tenants are busy (> 0);
                                   a weight-2 tenant gets twice the tokens of a weight-1 tenant.
    max_concurrent       16        streams generating at once (>= 1).
    max_queued           64        further streams that wait (in the server) for one of the
                                   tenant's concurrency slots; 0 = refuse at once when all are busy.
    requests_per_minute  0         request rate (token bucket, bursts up to one minute's worth);
                                   0 = unlimited.
    tokens_per_minute    0         prompt + generated tokens per minute (token bucket); 0 = unlimited.
    max_prompt_tokens    0         longest prompt, in tokens; 0 = only the model's context limit.
    max_output_tokens    0         largest max_tokens a request may ask for (and the default when a
                                   request leaves it unset, if smaller than the server's default);
                                   0 = only the server's and the model's limits.
    kv_share             1.0       at most this fraction of each model's KV blocks, in (0, 1]
                                   (rounded down, at least one block: the engine's scheduler).
    models               ["*"]     model names or glob patterns (fnmatch: "*", "smollm2-*") the
                                   tenant may use; patterns naming no served model are allowed.
    threads              1         size of the tenant's own thread pool (chat templates,
                                   tokenization, detokenization), 1..64.

Tenant names: 1-64 characters of letters, digits, "_", "-", "." starting with a letter or digit
(they appear in metric labels and in "tenant:<name>" quota subjects).

An invalid file is refused with `TenantConfigError` naming the file, the line and the field:
`tenants.toml:7: tenants.acme.weight: must be > 0, got -1.0`. tomllib reports no line numbers for
values, so the line is found by scanning the text for the tenant's table and the field's key.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from pathlib import Path
from types import MappingProxyType
from typing import Any

DEV_TENANT = "dev"  # the open development tenant (no tenants file)
MAX_THREADS = 64
MAX_WEIGHT = 1e6

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_TABLE_RE = re.compile(r"^\s*\[")  # a table header line ([x] or [[x]])
_TOML_POS_RE = re.compile(r"\(at line (\d+), column (\d+)\)")


class TenantConfigError(ValueError):
    """An unusable tenants file. `path`, `line` (1-based, or None) and `field` (a dotted path
    such as "tenants.acme.weight", or None) say where; str(e) says all of it."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str, column: int | None = None):
        where = str(path)
        if line is not None:
            where += f":{line}" + (f":{column}" if column is not None else "")
        text = f"{where}: {field}: {message}" if field else f"{where}: {message}"
        super().__init__(text)
        self.path = str(path)
        self.line = line
        self.column = column
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TenantConfig:
    """One tenant's settings (immutable: a reload makes new objects). See the module docstring."""

    name: str
    api_keys_sha256: tuple[str, ...] = ()  # lower-case hex digests
    weight: float = 1.0
    max_concurrent: int = 16
    max_queued: int = 64
    requests_per_minute: int = 0  # 0 = unlimited
    tokens_per_minute: int = 0  # 0 = unlimited
    max_prompt_tokens: int = 0  # 0 = the model's limit only
    max_output_tokens: int = 0  # 0 = the server's/model's limits only
    kv_share: float = 1.0
    models: tuple[str, ...] = ("*",)
    threads: int = 1

    def allows_model(self, model: str) -> bool:
        """Whether a pattern of `models` matches `model` (case-sensitive glob)."""
        return any(fnmatchcase(model, pattern) for pattern in self.models)


# The tenants-file fields (everything but `name`), in TenantConfig order.
FIELDS: tuple[str, ...] = tuple(f.name for f in fields(TenantConfig) if f.name != "name")


@dataclass(frozen=True)
class TenantsConfig:
    """All tenants. `open` is the development mode without a tenants file: every caller, with
    or without a key, is the one tenant DEV_TENANT."""

    tenants: Mapping[str, TenantConfig]
    path: str | None = None
    open: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenants", MappingProxyType(dict(self.tenants)))

    def get(self, name: str) -> TenantConfig | None:
        return self.tenants.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.tenants

    def __iter__(self) -> Iterator[TenantConfig]:
        return iter(self.tenants.values())

    def __len__(self) -> int:
        return len(self.tenants)

    @property
    def names(self) -> list[str]:
        return sorted(self.tenants)


def open_dev_tenant() -> TenantsConfig:
    """No tenants file: one open tenant, no key needed, limits left to the engine (its wait
    queue and batch caps), a 2-thread pool like the server's shared one."""
    dev = TenantConfig(name=DEV_TENANT, max_concurrent=1 << 20, max_queued=0, threads=2)
    return TenantsConfig({DEV_TENANT: dev}, path=None, open=True)


# -- loading ---------------------------------------------------------------------------------------
class _Invalid(Exception):
    """A bad value; `needle` (optional) is text whose line is more precise than the key's."""

    def __init__(self, message: str, needle: str | None = None):
        super().__init__(message)
        self.message = message
        self.needle = needle


def _type_name(v: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _int(v: Any, minimum: int, what: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Invalid(f"must be an integer, got {_type_name(v)} ({v!r})")
    if v < minimum:
        raise _Invalid(f"must be >= {minimum}{what}, got {v}")
    return v


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Invalid(f"must be a number, got {_type_name(v)} ({v!r})")
    f = float(v)
    if not math.isfinite(f):
        raise _Invalid(f"must be a finite number, got {f}")
    return f


def _weight(v: Any) -> float:
    w = _float(v)
    if not 0 < w <= MAX_WEIGHT:
        raise _Invalid(f"must be > 0 and <= {MAX_WEIGHT:g}, got {w:g}")
    return w


def _kv_share(v: Any) -> float:
    s = _float(v)
    if not 0 < s <= 1:
        raise _Invalid(f"must be in (0, 1], got {s:g}")
    return s


def _threads(v: Any) -> int:
    n = _int(v, 1)
    if n > MAX_THREADS:
        raise _Invalid(f"must be <= {MAX_THREADS}, got {n}")
    return n


def _str_list(v: Any, what: str) -> list[str]:
    if not isinstance(v, list):
        raise _Invalid(f"must be an array of {what}, got {_type_name(v)} ({v!r})")
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise _Invalid(f"item {i} must be a string, got {_type_name(item)} ({item!r})")
    return v


def _keys(v: Any) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(_str_list(v, "hex SHA-256 digests")):
        if not _HEX64_RE.match(item):
            raise _Invalid(
                f"item {i} is not a hex SHA-256 digest (64 hex digits), got {item!r}; "
                "`tinyserve tenants hash-key` prints one",
                needle=item or None,
            )
        digest = item.lower()
        if digest in out:
            raise _Invalid(f"item {i} repeats digest {item}", needle=item)
        out.append(digest)
    return tuple(out)


def _models(v: Any) -> tuple[str, ...]:
    items = _str_list(v, 'model names or patterns, e.g. ["*"]')
    if not items:
        raise _Invalid('must name at least one model or pattern (["*"] allows all)')
    for i, item in enumerate(items):
        if not item.strip():
            raise _Invalid(f"item {i} is an empty model name")
    return tuple(items)


_CHECKS = {
    "api_keys_sha256": _keys,
    "weight": _weight,
    "max_concurrent": lambda v: _int(v, 1),
    "max_queued": lambda v: _int(v, 0),
    "requests_per_minute": lambda v: _int(v, 0, " (0 = unlimited)"),
    "tokens_per_minute": lambda v: _int(v, 0, " (0 = unlimited)"),
    "max_prompt_tokens": lambda v: _int(v, 0, " (0 = no tenant limit)"),
    "max_output_tokens": lambda v: _int(v, 0, " (0 = no tenant limit)"),
    "kv_share": _kv_share,
    "models": _models,
    "threads": _threads,
}
assert set(_CHECKS) == set(FIELDS)


class _Lines:
    """Finds the line (1-based) of a tenant's table, of a key inside it, or of some text."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def _find(self, pattern: re.Pattern[str], start: int = 0, stop: int | None = None) -> int | None:
        for i in range(start, len(self.lines) if stop is None else stop):
            if pattern.search(self.lines[i]):
                return i + 1
        return None

    @staticmethod
    def _key(name: str) -> str:
        q = re.escape(name)
        return rf'(?:{q}|"{q}"|\'{q}\')'

    def table(self, tenant: str) -> int | None:
        """`[tenants.NAME]`; else a dotted `tenants.NAME...` / `NAME = {` line."""
        k = self._key(tenant)
        return self._find(re.compile(rf"^\s*\[\s*tenants\s*\.\s*{k}\s*\]")) or self._find(
            re.compile(rf"^\s*(?:tenants\s*\.\s*)?{k}\s*[.=]")
        )

    def _section(self, tenant: str) -> tuple[int, int] | None:
        start = self.table(tenant)
        if start is None:
            return None
        stop = self._find(_TABLE_RE, start) or len(self.lines) + 1
        return start, stop - 1  # 0-based [start, stop) over lines after the header

    def key(self, tenant: str, key: str, needle: str | None = None) -> int | None:
        """The line of `key =` inside the tenant's table (or of `needle` there), falling back to
        a dotted `NAME.key =` anywhere, then to the table's line."""
        section = self._section(tenant)
        if section is not None:
            start, stop = section
            if needle:
                line = self._find(re.compile(re.escape(needle), re.IGNORECASE), start - 1, stop)
                if line:
                    return line
            line = self._find(re.compile(rf"^\s*{self._key(key)}\s*="), start, stop)
            if line:
                return line
        t = self._key(tenant)
        return self._find(re.compile(rf"{t}\s*\.\s*{self._key(key)}\s*=")) or (section[0] if section else None)

    def top_level(self, key: str) -> int | None:
        k = self._key(key)
        return self._find(re.compile(rf"^\s*\[\[?\s*{k}\s*[.\]]")) or self._find(re.compile(rf"^\s*{k}\s*[.=]"))


def parse_tenants(text: str, path: str = "<tenants>") -> TenantsConfig:
    """Parse tenants-file text; `path` only names it in errors. Raises TenantConfigError."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS_RE.search(msg)
        line, col = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        line, col = getattr(e, "lineno", None) or line, getattr(e, "colno", None) or col  # 3.14+
        msg = _TOML_POS_RE.sub("", msg).strip()
        raise TenantConfigError(path, line, None, f"TOML syntax error: {msg}", column=col) from None
    lines = _Lines(text)

    for key in data:
        if key != "tenants":
            raise TenantConfigError(
                path, lines.top_level(key), key, "unknown top-level key (tenants go in [tenants.NAME] tables)"
            )
    tables = data.get("tenants")
    if tables is None:
        raise TenantConfigError(path, None, "tenants", "no tenants defined (add a [tenants.NAME] table)")
    if not isinstance(tables, dict):
        raise TenantConfigError(
            path, lines.top_level("tenants"), "tenants", f"must be a table of tenants, got {_type_name(tables)}"
        )
    if not tables:
        raise TenantConfigError(
            path, lines.top_level("tenants"), "tenants", "no tenants defined (add a [tenants.NAME] table)"
        )

    tenants: dict[str, TenantConfig] = {}
    key_owner: dict[str, str] = {}
    for name, table in tables.items():
        where = f"tenants.{name}"
        if not _NAME_RE.match(name):
            raise TenantConfigError(
                path,
                lines.table(name),
                where,
                "bad tenant name: use 1-64 letters, digits, '_', '-', '.', starting with a letter or digit",
            )
        if not isinstance(table, dict):
            raise TenantConfigError(path, lines.table(name), where, f"must be a table, got {_type_name(table)}")
        values: dict[str, Any] = {}
        for key, raw in table.items():
            if key not in _CHECKS:
                raise TenantConfigError(
                    path, lines.key(name, key), f"{where}.{key}", f"unknown field (known: {', '.join(FIELDS)})"
                )
            try:
                values[key] = _CHECKS[key](raw)
            except _Invalid as e:
                raise TenantConfigError(path, lines.key(name, key, e.needle), f"{where}.{key}", e.message) from None
        for digest in values.get("api_keys_sha256", ()):
            if digest in key_owner:
                raise TenantConfigError(
                    path,
                    lines.key(name, "api_keys_sha256", digest),
                    f"{where}.api_keys_sha256",
                    f"digest {digest} is already a key of tenant {key_owner[digest]!r}; "
                    "a key must pick exactly one tenant",
                )
            key_owner[digest] = name
        tenants[name] = TenantConfig(name=name, **values)
    return TenantsConfig(tenants, path=path, open=False)


def load_tenants(path: str | Path) -> TenantsConfig:
    """Read and validate a tenants file. Raises TenantConfigError naming the file, line and field."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise TenantConfigError(path, None, None, f"cannot read the tenants file: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise TenantConfigError(path, line, None, "not UTF-8 text (TOML files are UTF-8)") from None
    return parse_tenants(text, path)
