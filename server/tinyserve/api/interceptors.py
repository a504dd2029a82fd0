"""Server interceptors: authentication (metadata -> tenant) around every tinyserve RPC.

The tenant a request runs as is in the context variable TENANT while its handler runs. The
server passes TenantRegistry.authenticate (`authorization: Bearer <key>` -> tenant, or
UNAUTHENTICATED); without a tenants file that registry maps everyone to the open "dev" tenant.
A refused call never reaches its handler: no tokenization, no engine request.
"""
from __future__ import annotations

import contextvars
from typing import Callable, Mapping

import grpc

from tinyserve.api.errors import ServiceError, to_status
from tinyserve.tenancy.errors import TenancyError

DEV_TENANT = "dev"
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tinyserve_tenant", default=DEV_TENANT)

# metadata (lower-case keys) -> tenant name; raises errors.Unauthenticated / PermissionDenied
# (api.errors) or their tenancy.errors counterparts.
Authenticator = Callable[[Mapping[str, str]], str]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Resolves the tenant of every RPC of `services` before its handler runs.

    Health checks and reflection stay open (load balancers and grpcurl must reach them).
    """

    def __init__(self, authenticate: Authenticator, services: tuple[str, ...],
                 on_refused: Callable[[str], None] | None = None):
        self._authenticate = authenticate
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._on_refused = on_refused   # on_refused(status code name), for metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        metadata = {k.lower(): v for k, v in (handler_call_details.invocation_metadata or ())
                    if isinstance(v, str)}
        try:
            tenant = self._authenticate(metadata)
        except (ServiceError, TenancyError) as e:
            st = to_status(e)
            if self._on_refused is not None:
                self._on_refused(st.code.name)
            return _replace_behavior(handler, _refuse(st))
        return _replace_behavior(handler, lambda inner: _as_tenant(inner, tenant, handler))


def _refuse(st: grpc.Status):
    def make(inner):
        async def refuse(request, context):
            await context.abort(st.code, st.details, st.trailing_metadata)
        return refuse
    return make


def _as_tenant(inner, tenant: str, handler):
    if handler.response_streaming:
        async def stream(request, context):
            TENANT.set(tenant)
            async for item in inner(request, context):
                yield item
        return stream

    async def unary(request, context):
        TENANT.set(tenant)
        return await inner(request, context)
    return unary


def _replace_behavior(handler: grpc.RpcMethodHandler, make) -> grpc.RpcMethodHandler:
    """The same handler with its behavior function wrapped by make(inner) (unary requests only)."""
    if handler.request_streaming:
        raise TypeError("tinyserve has no client-streaming RPCs")
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            make(handler.unary_stream), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        make(handler.unary_unary), request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
