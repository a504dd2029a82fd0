"""The ONE mapping from exceptions to gRPC statuses (with google.rpc rich error details).

Handlers raise (or let through) exceptions; `to_status` turns any of them into a grpc.Status and
`abort` ends the RPC with it. Unknown exceptions become INTERNAL with the request id (and an
ErrorInfo carrying it); their traceback goes to the server log, never to the client.

Nothing unbounded is echoed: a status message, every field path and description, and the field
violations as a whole are clipped to byte budgets (MAX_MESSAGE_BYTES, MAX_DETAIL_BYTES,
MAX_VIOLATIONS_BYTES), so a status always fits gRPC's default 8 KiB metadata limit, percent- and
base64-encoded (a client gets the real code, never RESOURCE_EXHAUSTED from its own metadata limit).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger("tinyserve.api")

DOMAIN = "tinyserve.dev"
REQUEST_ID_KEY = "x-request-id"

MAX_MESSAGE_BYTES = 512  # a status message (UTF-8)
MAX_DETAIL_BYTES = 256  # one field path, description, quota subject or resource name
MAX_VIOLATIONS = 16  # field violations in one BadRequest (the rest are counted) ...
MAX_VIOLATIONS_BYTES = 3072  # ... and their paths and descriptions together
# grpc core's deadline timer fires a few ms before time_remaining() reads 0 (measured <= 6 ms);
# a cancellation this close to the deadline is the deadline.
DEADLINE_SLACK_S = 0.05


def clip(text: str, limit: int = MAX_DETAIL_BYTES) -> str:
    """`text`, cut to at most `limit` UTF-8 bytes (marked with "...")."""
    if len(text) * 4 <= limit:
        return text
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return text
    return raw[: max(0, limit - 3)].decode("utf-8", "ignore") + "..."


class ServiceError(Exception):
    """An error with a definite gRPC status; `details` are google.rpc detail messages."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, details: list | None = None):
        message = clip(message, MAX_MESSAGE_BYTES)
        super().__init__(message)
        self.message = message
        self.details = list(details or [])


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: `field` is a path like "sampling.top_p" or "messages[2].role"."""

    field: str
    description: str


class InvalidArgument(ServiceError):
    """INVALID_ARGUMENT with a BadRequest listing every bad field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation] | FieldViolation):
        if isinstance(violations, FieldViolation):
            violations = [violations]
        kept: list[FieldViolation] = []
        budget = MAX_VIOLATIONS_BYTES - 64  # room for the "and N more" line
        for i, v in enumerate(violations):
            v = FieldViolation(clip(v.field), clip(v.description))
            size = len(v.field.encode()) + len(v.description.encode()) + 8
            if len(kept) == MAX_VIOLATIONS - 1 and i < len(violations) - 1 or size > budget:
                kept.append(FieldViolation("", f"and {len(violations) - i} more invalid fields"))
                break
            kept.append(v)
            budget -= size
        self.violations = kept
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        msg = "; ".join(f"{v.field}: {v.description}" if v.field else v.description for v in self.violations)
        super().__init__(f"invalid request: {msg}", [bad])


class NotFound(ServiceError):
    """NOT_FOUND for a resource (a model) the server does not have."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, resource_type: str, name: str, description: str):
        name, description = clip(name), clip(description, MAX_MESSAGE_BYTES // 2)
        info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name, description=description)
        super().__init__(f"{resource_type} {name!r} not found: {description}", [info])


# ErrorInfo reasons (google.rpc.ErrorInfo.reason, domain DOMAIN): stable, UPPER_SNAKE_CASE, and
# listed in the proto's header comment. A client branches on these, never on message text.
QUOTA_REASONS = {  # tenancy.QuotaExceeded.kind -> reason
    "concurrency": "CONCURRENCY_LIMIT",  # max_concurrent streams running, no queue
    "max_queued": "QUEUE_FULL",  # max_concurrent running and max_queued waiting
    "requests_per_minute": "REQUESTS_PER_MINUTE",
    "tokens_per_minute": "TOKENS_PER_MINUTE",
    "max_prompt_tokens": "MAX_PROMPT_TOKENS",  # retrying cannot help
    "max_output_tokens": "MAX_OUTPUT_TOKENS",  # retrying cannot help
}
REASON_SERVER_QUEUE_FULL = "SERVER_QUEUE_FULL"  # a model's wait queue (all tenants)
REASON_UNREAD_OUTPUT = "UNREAD_OUTPUT_STALLED"  # a paused stream's client read nothing
REASON_MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"  # PERMISSION_DENIED: the tenant's models
REASON_DRAINING = "DRAINING"  # UNAVAILABLE: this replica is shutting down
REASON_QUOTA_STORE = "QUOTA_STORE_UNAVAILABLE"  # UNAVAILABLE: shared quotas cannot be checked


def error_info(reason: str, **metadata: object) -> error_details_pb2.ErrorInfo:
    """google.rpc.ErrorInfo in our domain; metadata values become (clipped) strings, None dropped."""
    return error_details_pb2.ErrorInfo(
        reason=reason, domain=DOMAIN, metadata={k: clip(str(v)) for k, v in metadata.items() if v is not None}
    )


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    d = duration_pb2.Duration()
    d.FromMilliseconds(max(1, math.ceil(seconds * 1000)))  # rounded up: never "retry now" too early
    return error_details_pb2.RetryInfo(retry_delay=d)


class ResourceExhausted(ServiceError):
    """RESOURCE_EXHAUSTED with a QuotaFailure (what ran out), an ErrorInfo (`reason`, one of the
    REASON_*/QUOTA_REASONS names, and `metadata`) and a RetryInfo (when to come back).

    retry_after_s=None omits RetryInfo: no retry of the same request can succeed (a prompt over
    the tenant's max_prompt_tokens, say)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        subject: str,
        description: str,
        retry_after_s: float | None = 1.0,
        reason: str = "RESOURCE_EXHAUSTED",
        metadata: dict[str, object] | None = None,
    ):
        subject, description = clip(subject), clip(description)
        quota = error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=description)]
        )
        details = [quota, error_info(reason, **(metadata or {}))]
        if retry_after_s is not None and math.isfinite(retry_after_s):
            details.append(_retry_info(retry_after_s))
        super().__init__(f"{subject}: {description}", details)


class Unavailable(ServiceError):
    """UNAVAILABLE (draining, shutting down, quota store down); safe to retry elsewhere. Carries a
    RetryInfo and, given a reason, an ErrorInfo."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, retry_after_s: float = 1.0, reason: str | None = None):
        details: list = [_retry_info(retry_after_s)]
        if reason is not None:
            details.append(error_info(reason))
        super().__init__(message, details)


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """PERMISSION_DENIED with an ErrorInfo (reason, metadata such as the tenant and model)."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, reason: str = REASON_MODEL_NOT_ALLOWED, metadata: dict[str, object] | None = None):
        super().__init__(message, [error_info(reason, **(metadata or {}))])


def _internal(message: str, request_id: str | None, reason: str = "INTERNAL") -> ServiceError:
    """INTERNAL with the request id in the message and in an ErrorInfo."""
    msg = f"{message} (request id {request_id})" if request_id else message
    return ServiceError(
        msg, [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"request_id": request_id or ""})]
    )


def _from_template(exc: BaseException, request_id: str | None) -> ServiceError:
    """A chat template error: the client's (its conversation was refused) or the server's (the
    template it accepted at load failed or broke a limit on this conversation)."""
    from tinyserve.models import chat_template as ct

    if isinstance(exc, ct.TemplateRefused):
        return InvalidArgument(FieldViolation("messages", f"chat template: {exc}"))
    if isinstance(exc, ct.TemplateDeadlineExceeded):
        return DeadlineExceeded(str(exc))
    if isinstance(exc, ct.TemplateUnavailable):
        return Unavailable(f"the server cannot render chat templates right now: {exc}")
    what = f"broke its {exc.limit} limit" if isinstance(exc, ct.TemplateLimitExceeded) else "failed"
    return _internal(
        f"the model's chat template {what} on this conversation; this is a server-side fault",
        request_id,
        reason="CHAT_TEMPLATE_FAILED",
    )


def _from_engine(exc: BaseException, request_id: str | None = None) -> ServiceError | None:
    """Tenancy, engine and model exceptions with a meaning for the client (imported lazily)."""
    from tinyserve.engine.engine import QueueFullError
    from tinyserve.engine.params import ParamError
    from tinyserve.tenancy import errors as tenancy

    if isinstance(exc, tenancy.Unauthenticated):
        return Unauthenticated(exc.message)
    if isinstance(exc, tenancy.PermissionDenied):
        return PermissionDenied(exc.message, metadata={"tenant": exc.tenant, "model": exc.model})
    if isinstance(exc, tenancy.QuotaExceeded):
        return ResourceExhausted(
            exc.subject,
            exc.description,
            exc.retry_after,
            reason=QUOTA_REASONS.get(exc.kind, "RESOURCE_EXHAUSTED"),
            metadata={"tenant": exc.tenant, "limit": exc.limit, "limit_value": exc.limit_value},
        )
    if isinstance(exc, tenancy.QuotaStoreUnavailable):
        return Unavailable(exc.message, reason=REASON_QUOTA_STORE)
    if isinstance(exc, ParamError):  # .field is already a request path ("sampling.top_p", "prompt")
        return InvalidArgument(FieldViolation(exc.field, exc.message))
    if isinstance(exc, QueueFullError):
        return ResourceExhausted(
            "wait queue", str(exc) or "the model's wait queue is full", reason=REASON_SERVER_QUEUE_FULL
        )
    from tinyserve.models.chat_template import ChatTemplateError

    if isinstance(exc, ChatTemplateError):
        return _from_template(exc, request_id)
    return None


def to_status(exc: BaseException, request_id: str | None = None) -> grpc.Status:
    """The gRPC status (code, message, rich details, x-request-id) for any exception."""
    err = exc if isinstance(exc, ServiceError) else _from_engine(exc, request_id)
    if err is None:
        log.error("internal error in request %s", request_id or "-", exc_info=exc)
        err = _internal("internal error", request_id)
    elif err.code == grpc.StatusCode.INTERNAL and not isinstance(exc, ServiceError):
        log.warning("request %s: %s", request_id or "-", exc)  # a known fault: its cause, no traceback
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    for d in err.details:
        status.details.add().Pack(d)
    trailing = [(rpc_status.GRPC_DETAILS_METADATA_KEY, status.SerializeToString())]
    if request_id:
        trailing.append((REQUEST_ID_KEY, request_id))
    return _Status(err.code, err.message, tuple(trailing))


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """grpc.Status: code, message ("details" in grpc's naming) and trailing metadata."""


def deadline_passed(context: grpc.aio.ServicerContext, slack_s: float = 0.0) -> bool:
    """True when the call has a deadline and at most `slack_s` seconds of it are left."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= slack_s


async def abort(context: grpc.aio.ServicerContext, exc: BaseException, request_id: str | None = None):
    """End the RPC with the status for `exc` (raises, as context.abort does).

    A call whose deadline has passed is ended by grpc core itself (the client sees
    DEADLINE_EXCEEDED); a status sent then fails inside grpc ("ExecuteBatchError", logged with a
    traceback). So past the deadline, or when sending fails because the call ended meanwhile, we
    raise CancelledError: the quiet path grpc takes for a call that core has already ended."""
    st = to_status(exc, request_id)
    if deadline_passed(context):
        raise asyncio.CancelledError("the call's deadline passed before its status was sent")
    try:
        await context.abort(st.code, st.details, st.trailing_metadata)
    except grpc.aio.InternalError:  # ExecuteBatchError: the call ended while the status was sent
        raise asyncio.CancelledError("the call ended before its status was sent") from None


def status_name(exc: BaseException | None) -> str:
    """The status code name an exception maps to ("OK" for None), for metrics and logs."""
    if exc is None:
        return "OK"
    err = exc if isinstance(exc, ServiceError) else _from_engine(exc)
    return (err.code if err else grpc.StatusCode.INTERNAL).name
