"""Server interceptors: authentication (metadata -> tenant) and the request's context around every
tinyserve RPC.

The tenant a request runs as is in the context variable TENANT, and its request id (the one in
`x-request-id`, logs and INTERNAL errors) in REQUEST_ID, while its handler runs. The server
passes TenantRegistry.authenticate (`authorization: Bearer <key>` -> tenant, or
UNAUTHENTICATED); without a tenants file that registry maps everyone to the open DEV_TENANT.
More than one `authorization` header is UNAUTHENTICATED before any authenticator runs (which
key would count is not the client's to leave open). A refused call never reaches its handler:
no tokenization, no engine request.

Last line of defence: an exception that escapes a handler (or the authenticator) becomes
INTERNAL with the request id through api.errors, never grpc's UNKNOWN carrying the exception's
text.
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Callable, Mapping

import grpc

from tinyserve.api import errors
from tinyserve.api.errors import Unauthenticated
from tinyserve.tenancy.config import DEV_TENANT

TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tinyserve_tenant", default=DEV_TENANT)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("tinyserve_request_id", default=None)

# metadata (lower-case keys) -> tenant name; raises errors.Unauthenticated / PermissionDenied
# (api.errors) or their tenancy.errors counterparts.
Authenticator = Callable[[Mapping[str, str]], str]


def new_request_id() -> str:
    return uuid.uuid4().hex[:20]


def request_id() -> str:
    """The current RPC's request id (a fresh one outside an intercepted RPC)."""
    return REQUEST_ID.get() or new_request_id()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Resolves the tenant of every RPC of `services` before its handler runs, gives the RPC its
    request id and turns what escapes its handler into a status.

    Health checks and reflection stay open (load balancers and grpcurl must reach them).
    """

    def __init__(
        self, authenticate: Authenticator, services: tuple[str, ...], on_refused: Callable[[str], None] | None = None
    ):
        self._authenticate = authenticate
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._on_refused = on_refused  # on_refused(status code name), for metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        rid = new_request_id()
        try:
            tenant = self._authenticate(_metadata(handler_call_details.invocation_metadata))
        except Exception as e:  # noqa: BLE001 - refusals, and an authenticator's bug (INTERNAL)
            if self._on_refused is not None:
                self._on_refused(errors.status_name(e))
            return _replace_behavior(handler, _refuse(e, rid))
        return _replace_behavior(handler, lambda inner: _in_context(inner, tenant, rid, handler))


def _metadata(pairs) -> dict[str, str]:
    """Text metadata with lower-case keys; raises Unauthenticated for a repeated authorization."""
    out: dict[str, str] = {}
    for k, v in pairs or ():
        if not isinstance(v, str):
            continue
        k = k.lower()
        if k == "authorization" and k in out:
            raise Unauthenticated("more than one 'authorization' header: send exactly one")
        out[k] = v
    return out


def _refuse(exc: Exception, rid: str):
    def make(inner):
        async def refuse(request, context):
            await errors.abort(context, exc, rid)

        return refuse

    return make


def _in_context(inner, tenant: str, rid: str, handler):
    if handler.response_streaming:

        async def stream(request, context):
            async with _as_status(context, tenant, rid):
                # aclosing: a stream grpc stops reading (client gone) is closed now, all the
                # way down to the servicer, which then counts and logs it as CANCELLED
                async with contextlib.aclosing(inner(request, context)) as events:
                    async for item in events:
                        yield item

        return stream

    async def unary(request, context):
        async with _as_status(context, tenant, rid):
            return await inner(request, context)

    return unary


@contextlib.asynccontextmanager
async def _as_status(context, tenant: str, rid: str):
    """Run a handler as `tenant` with request id `rid`; an exception that escapes it becomes
    its status (INTERNAL for one api.errors does not know), unless the RPC is already over."""
    TENANT.set(tenant)
    REQUEST_ID.set(rid)
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as e:  # noqa: BLE001
        if context.done():
            raise
        await errors.abort(context, e, rid)


def _replace_behavior(handler: grpc.RpcMethodHandler, make) -> grpc.RpcMethodHandler:
    """The same handler with its behavior function wrapped by make(inner) (unary requests only)."""
    if handler.request_streaming:
        raise TypeError("tinyserve has no client-streaming RPCs")
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            make(handler.unary_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        make(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
