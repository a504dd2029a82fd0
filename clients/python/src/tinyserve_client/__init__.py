"""tinyserve-client: sync and asyncio Python clients for a tinyserve server (tinyserve.v1).

    from tinyserve_client import Client
    with Client("127.0.0.1:50051") as c:
        for chunk in c.generate_stream("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)

Needs only grpcio, grpcio-status and protobuf; the stubs (`tinyserve_client.pb2`, `.pb2_grpc`)
are generated from proto/tinyserve/v1 when the wheel is built.
"""

from tinyserve_client.client import AsyncClient, Client, Completion, TextChunk, ToolCall, build_request, error_details
from tinyserve_client.stubs import SERVICE_NAME, pb2, pb2_grpc

__version__ = "0.1.0"
__all__ = [
    "AsyncClient",
    "Client",
    "Completion",
    "SERVICE_NAME",
    "TextChunk",
    "ToolCall",
    "build_request",
    "error_details",
    "pb2",
    "pb2_grpc",
]
