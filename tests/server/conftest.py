"""In-process tinyserve servers on port 0, each on its own event loop thread, for sync tests.

    def test_x(serve):
        srv = serve()                         # one FakeEngine model named "fake"
        stub = srv.stub()                     # sync TinyServe stub on a fresh channel
        srv.call(coro_fn)                     # run `await coro_fn(server)` on the server's loop
"""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # grpc_fakes.py (tests have no packages)

from grpc_fakes import FakeEngine  # noqa: E402

from tinyserve.api.protos import pb2_grpc  # noqa: E402
from tinyserve.api.server import create_server  # noqa: E402
from tinyserve.config import ServerConfig  # noqa: E402


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

    def stub(self) -> pb2_grpc.TinyServeStub:
        return pb2_grpc.TinyServeStub(self.channel())

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


@pytest.fixture
def serve():
    """serve(engines=None, **config) -> ServerThread; every server is stopped after the test."""
    started: list[ServerThread] = []

    def make(engines=None, **config) -> ServerThread:
        cfg = ServerConfig(**({"port": 0} | config))
        srv = ServerThread(engines if engines is not None else [FakeEngine()], cfg)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.close()
