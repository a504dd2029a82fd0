"""API keys: hashing, constant-time lookup, and `tinyserve tenants hash-key|check`.

Keys are never stored: the tenants file holds their SHA-256 digests, and so does the KeyRing.
A presented key is hashed once and compared with EVERY known digest using hmac.compare_digest,
with no early exit, so the time taken does not depend on which tenant (if any) the key belongs
to, nor on how many leading bytes match. (Even a leak would only concern digests, which reveal
nothing usable about keys: SHA-256 is preimage resistant and keys carry 256 random bits.)
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import sys
from typing import Mapping

from .config import TenantConfigError, TenantsConfig, load_tenants

KEY_PREFIX = "ts_"
KEY_BYTES = 32                 # 256 random bits per key
MAX_KEY_CHARS = 4096           # longer "keys" are refused without hashing


def hash_key(key: str) -> str:
    """Hex SHA-256 of the key's UTF-8 bytes (what goes in api_keys_sha256)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    """A fresh random API key, e.g. "ts_Xq3...": URL-safe, 256 bits of entropy."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def bearer_key(metadata: Mapping[str, str]) -> str | None:
    """The key in `authorization: Bearer <key>` (metadata keys lower-case), or None."""
    value = metadata.get("authorization")
    if not isinstance(value, str):
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    key = key.strip()
    return key or None


class KeyRing:
    """Digest -> tenant, looked up in constant time. `open` configs (no tenants file) map every
    caller, with or without a key, to their one tenant."""

    def __init__(self, tenants: TenantsConfig):
        self._open_tenant = next(iter(tenants.tenants)) if tenants.open else None
        entries: list[tuple[bytes, str]] = []
        for t in tenants:
            for digest in t.api_keys_sha256:
                entries.append((bytes.fromhex(digest), t.name))
        self._entries = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, presented_key: str | None) -> str | None:
        """The tenant whose key this is, or None (no key, unknown key)."""
        if self._open_tenant is not None:
            return self._open_tenant
        if not presented_key or len(presented_key) > MAX_KEY_CHARS:
            return None
        digest = hashlib.sha256(presented_key.encode("utf-8", "surrogatepass")).digest()
        found: str | None = None
        for known, tenant in self._entries:   # all of them, always: no early exit
            match = hmac.compare_digest(digest, known)
            found = tenant if match else found
        return found


# -- CLI: tinyserve tenants ... --------------------------------------------------------------------
def add_tenants_arguments(subparsers) -> argparse.ArgumentParser:
    """Add `tenants hash-key` and `tenants check` to the `tinyserve` subparsers."""
    p = subparsers.add_parser("tenants", help="manage the tenants file (API keys, validation)",
                              description="Tools for the tenants file of `tinyserve serve --tenants`.")
    sub = p.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    h = sub.add_parser("hash-key", help="print a new random API key and its SHA-256",
                       description="Print a new random API key and the digest to put in the "
                                   "tenant's api_keys_sha256. With --stdin, hash the key read "
                                   "from standard input instead (one line).")
    h.add_argument("--stdin", action="store_true", help="hash a key given on standard input")
    c = sub.add_parser("check", help="validate a tenants file",
                       description="Validate a tenants file; print its tenants or the error.")
    c.add_argument("path", help="the tenants TOML file")
    p.set_defaults(func=run_tenants)
    return p


def run_tenants(args: argparse.Namespace) -> int:
    """Run `tinyserve tenants ...`; returns the exit code (2 for bad input)."""
    out, err = sys.stdout, sys.stderr
    if args.tenants_command == "hash-key":
        if args.stdin:
            text = sys.stdin.read()
            key = text[:-1] if text.endswith("\n") else text
            key = key[:-1] if key.endswith("\r") else key
            if not key or "\n" in key:
                print("tinyserve tenants hash-key: give exactly one non-empty key on stdin", file=err)
                return 2
            print(hash_key(key), file=out)
            return 0
        key = new_key()
        print(f"key:    {key}", file=out)
        print(f"sha256: {hash_key(key)}", file=out)
        print("Give the key to the tenant (it is not shown again) and add the digest to its "
              "api_keys_sha256 list.", file=err)
        return 0
    if args.tenants_command == "check":
        try:
            config = load_tenants(args.path)
        except TenantConfigError as e:
            print(f"tinyserve tenants check: {e}", file=err)
            return 2
        for t in config:
            print(f"{t.name}: keys={len(t.api_keys_sha256)} weight={t.weight:g} "
                  f"max_concurrent={t.max_concurrent} max_queued={t.max_queued} "
                  f"rpm={t.requests_per_minute or 'unlimited'} tpm={t.tokens_per_minute or 'unlimited'} "
                  f"kv_share={t.kv_share:g} threads={t.threads} models={','.join(t.models)}", file=out)
        return 0
    print(f"tinyserve tenants: unknown command {args.tenants_command!r}", file=err)
    return 2
