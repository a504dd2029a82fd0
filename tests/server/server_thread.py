"""ServerThread: a started tinyserve server on port 0, on its own event loop thread, for sync tests
(the `serve` fixture in conftest.py makes them; module-scoped fixtures use it directly)."""

from __future__ import annotations

import asyncio
import threading

import grpc

from tinyserve.api.protos import pb2_grpc
from tinyserve.api.server import create_server
from tinyserve.config import ServerConfig


class ServerThread:
    """A started TinyServeServer on a private event loop in a background thread."""

    def __init__(self, engines, config: ServerConfig):
        self.engines = engines
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self._channels: list[grpc.Channel] = []

        async def start():
            server, port = create_server(config, engines)
            await server.start()
            return server, port

        try:
            self.server, self.port = self.call(start)
        except BaseException:
            self._stop_loop()
            raise
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coro_fn, timeout: float = 30.0):
        """Run coro_fn() on the server loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(timeout)

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address)
        self._channels.append(ch)
        return ch

    def stub(self) -> pb2_grpc.TinyServeServiceStub:
        return pb2_grpc.TinyServeServiceStub(self.channel())

    def close(self) -> None:
        for ch in self._channels:
            ch.close()

        async def stop():
            await self.server.stop(0)

        try:
            self.call(stop)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
