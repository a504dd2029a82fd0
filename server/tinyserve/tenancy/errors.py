"""Refusals raised by the tenancy package. No gRPC here: api/errors.py maps them to statuses.

Unauthenticated   -> UNAUTHENTICATED     (no key, unknown key, tenant removed by a reload)
PermissionDenied  -> PERMISSION_DENIED   (a model the tenant may not use)
QuotaExceeded     -> RESOURCE_EXHAUSTED  (QuotaFailure{subject, description}; RetryInfo only
                                          when `retry_after` is not None; ErrorInfo{reason})
QuotaStoreUnavailable -> UNAVAILABLE     (the shared quota store is down, policy "closed")
"""

from __future__ import annotations


class TenancyError(Exception):
    """Base of every refusal; `message` is safe to show to the client."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Unauthenticated(TenancyError):
    """Missing or unknown API key, or the key's tenant no longer exists."""


class PermissionDenied(TenancyError):
    """The tenant is known but may not use this model."""

    def __init__(self, tenant: str, model: str):
        super().__init__(f"tenant {tenant!r} may not use model {model!r}")
        self.tenant = tenant
        self.model = model


class QuotaExceeded(TenancyError):
    """A tenant limit refused the request.

    kind:        what ran out: "concurrency", "max_queued", "requests_per_minute",
                 "tokens_per_minute", "max_prompt_tokens", "max_output_tokens"
                 (also the rejection reason in usage counters and metrics).
    limit:       the tenants-file field that set the limit (e.g. "max_concurrent").
    description: one sentence for the client (QuotaFailure.Violation.description).
    retry_after: seconds after which the same request can succeed (RetryInfo), or None when
                 waiting cannot help (the prompt is longer than the tenant may ever send).
    limit_value: the configured value of that limit (ErrorInfo metadata), when known.
    """

    def __init__(
        self,
        tenant: str,
        kind: str,
        limit: str,
        description: str,
        retry_after: float | None,
        limit_value: int | None = None,
    ):
        super().__init__(f"tenant {tenant!r}: {description}")
        self.tenant = tenant
        self.kind = kind
        self.limit = limit
        self.limit_value = limit_value
        self.description = description
        self.retry_after = retry_after

    @property
    def subject(self) -> str:
        """QuotaFailure.Violation.subject."""
        return f"tenant:{self.tenant}"


class QuotaStoreUnavailable(TenancyError):
    """The shared quota store (Redis) cannot be reached and the policy is to refuse."""

    def __init__(self, cause: str):
        super().__init__(f"tenant limits cannot be checked right now ({cause}); retry shortly")
