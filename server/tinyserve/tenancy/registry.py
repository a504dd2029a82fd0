"""TenantRegistry: the server's one handle on tenancy. It holds the current config, the key ring,
quotas, usage counters and per-tenant pools, and reloads them from the tenants file (SIGHUP).

A reload swaps config and keys atomically (one reference each, read without locks by other
threads); tenants that still exist keep their in-flight streams, queue, rate buckets and usage;
removed tenants admit nothing new while their in-flight streams run to the end. A bad file never
raises into the caller: the error (file, line, field) is logged, the old config stays, and
reload() returns False.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .config import TenantConfig, TenantConfigError, TenantsConfig, load_tenants, open_dev_tenant
from .errors import Unauthenticated
from .executors import TenantExecutors
from .keys import KeyRing, bearer_key
from .quotas import LEASE_S, Quotas
from .store import InProcessStore, QuotaStore
from .usage import Observer, Usage

log = logging.getLogger("tinyserve.tenancy")


class TenantRegistry:
    def __init__(
        self,
        config: TenantsConfig,
        *,
        clock: Callable[[], float] | None = None,
        usage_observer: Observer | None = None,
        store: QuotaStore | None = None,
        store_policy: str = "open",
        lease_seconds: float = LEASE_S,
        on_store_error: Callable[[str], None] | None = None,
    ):
        """`store` holds quotas and usage (default: in this process). A shared store (Redis)
        gets the wall clock (Quotas' default for it) and a maintenance thread; close() stops it."""
        self._current = (config, KeyRing(config))  # swapped as one reference on reload
        self._reload_lock = threading.Lock()
        self._listeners: list[Callable[[TenantsConfig], None]] = []
        store = store or InProcessStore()
        self.usage = Usage(usage_observer, store=store)
        self.quotas = Quotas(
            config,
            clock=clock,
            usage=self.usage,
            store=store,
            lease_seconds=lease_seconds,
            store_policy=store_policy,
            on_store_error=on_store_error,
        )
        if store.shared:
            self.quotas.start_maintenance()
        self.executors = TenantExecutors(config)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> TenantRegistry:
        """At start-up: raises TenantConfigError (file, line, field) for an invalid file."""
        return cls(load_tenants(path), **kwargs)

    @classmethod
    def open_dev(cls, **kwargs: Any) -> TenantRegistry:
        """No tenants file: the one open development tenant."""
        return cls(open_dev_tenant(), **kwargs)

    # -- reading the current config (any thread) ---------------------------------------------------
    @property
    def config(self) -> TenantsConfig:
        return self._current[0]

    @property
    def is_open(self) -> bool:
        return self._current[0].open

    def tenant(self, name: str) -> TenantConfig | None:
        return self._current[0].get(name)

    def weight(self, name: str) -> float:
        """Fair-share weight (1.0 for a tenant no longer configured): pass `registry.weight` to
        the engine's fair share (EngineConfig.tenant_weight) so weights follow reloads."""
        t = self._current[0].get(name)
        return t.weight if t is not None else 1.0

    def kv_share(self, name: str) -> float:
        t = self._current[0].get(name)
        return t.kv_share if t is not None else 1.0

    # -- authentication ----------------------------------------------------------------------------
    def lookup(self, key: str | None) -> str | None:
        return self._current[1].lookup(key)

    def authenticate(self, metadata: Mapping[str, str]) -> str:
        """gRPC metadata (lower-case keys) -> tenant name, or Unauthenticated."""
        key = bearer_key(metadata)
        tenant = self._current[1].lookup(key)
        if tenant is None:
            if key is None:
                raise Unauthenticated("missing API key: send metadata 'authorization: Bearer <key>'")
            raise Unauthenticated("unknown API key")
        return tenant

    # -- reload ------------------------------------------------------------------------------------
    def add_listener(self, callback: Callable[[TenantsConfig], None]) -> None:
        """`callback(new_config)` after every successful reload (on the reloading thread)."""
        self._listeners.append(callback)

    def reload(self, path: str | Path | None = None) -> bool:
        """Re-read the tenants file (default: the one loaded before). True if applied; on any
        error logs it and keeps the current config. Never raises."""
        with self._reload_lock:
            path = str(path) if path is not None else self._current[0].path
            if path is None:
                log.error("tenants reload: no tenants file (serving the open development tenant)")
                return False
            try:
                new = load_tenants(path)
            except TenantConfigError as e:
                log.error("tenants reload failed, keeping the current tenants: %s", e)
                return False
            except Exception:  # a bug, not a bad file: still keep serving
                log.exception("tenants reload failed, keeping the current tenants")
                return False
            old = self._current[0]
            try:
                self.quotas.update(new)
                self.executors.update(new)
                self._current = (new, KeyRing(new))  # after quotas know the new tenants
            except Exception:
                log.exception("tenants reload could not be applied, keeping the current tenants")
                self.quotas.update(old)
                self.executors.update(old)
                return False
            added = sorted(set(new.tenants) - set(old.tenants))
            removed = sorted(set(old.tenants) - set(new.tenants))
            log.info(
                "tenants reloaded from %s: %d tenants (added: %s; removed: %s)",
                path,
                len(new),
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
            )
            for cb in list(self._listeners):
                try:
                    cb(new)
                except Exception:
                    log.exception("tenants reload listener failed")
            return True

    def close(self, wait: bool = True) -> None:
        self.executors.shutdown(wait=wait)
        self.quotas.close()
