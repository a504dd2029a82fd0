"""API keys: hashing and constant-time lookup (`tinyserve tenants hash-key` prints new ones).

Keys are never stored: the tenants file holds their SHA-256 digests, and so does the KeyRing.
A presented key is hashed once and compared with EVERY known digest using hmac.compare_digest,
with no early exit, so the time taken does not depend on which tenant (if any) the key belongs
to, nor on how many leading bytes match. (Even a leak would only concern digests, which reveal
nothing usable about keys: SHA-256 is preimage resistant and keys carry 256 random bits.)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from .config import TenantsConfig

KEY_PREFIX = "ts_"
KEY_BYTES = 32  # 256 random bits per key
MAX_KEY_CHARS = 4096  # longer "keys" are refused without hashing


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
        for known, tenant in self._entries:  # all of them, always: no early exit
            match = hmac.compare_digest(digest, known)
            found = tenant if match else found
        return found
