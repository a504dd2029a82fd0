"""The tinyserve.v1 protobuf and gRPC modules, from the client package (never written by hand).

The server has no stubs of its own: tinyserve-client (clients/python) generates them from
proto/tinyserve/v1/*.proto when its wheel is built, or, in a source checkout, on first import
(tinyserve_client/stubs.py). Server and clients therefore share one set of message classes.
"""

from __future__ import annotations

from tinyserve_client.stubs import SERVICE_NAME, pb2, pb2_grpc

__all__ = ["SERVICE_NAME", "pb2", "pb2_grpc"]
