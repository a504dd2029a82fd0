"""Multi-tenancy: tenants file, API keys, admission quotas, per-tenant thread pools and usage
counters. No grpc or asyncio-server code: api/ maps the errors here (tenancy.errors) to gRPC
statuses. Weighted fair share between tenants is scheduling: tinyserve.engine.fair."""

from .config import (
    DEV_TENANT,
    TenantConfig,
    TenantConfigError,
    TenantsConfig,
    load_tenants,
    open_dev_tenant,
    parse_tenants,
)
from .errors import PermissionDenied, QuotaExceeded, TenancyError, Unauthenticated
from .keys import KeyRing, bearer_key, hash_key, new_key
from .quotas import Lease, Quotas
from .registry import TenantRegistry
from .usage import Usage, UsageSnapshot

__all__ = [
    "DEV_TENANT",
    "TenantConfig",
    "TenantConfigError",
    "TenantsConfig",
    "load_tenants",
    "open_dev_tenant",
    "parse_tenants",
    "PermissionDenied",
    "QuotaExceeded",
    "TenancyError",
    "Unauthenticated",
    "KeyRing",
    "bearer_key",
    "hash_key",
    "new_key",
    "Lease",
    "Quotas",
    "TenantRegistry",
    "Usage",
    "UsageSnapshot",
]
