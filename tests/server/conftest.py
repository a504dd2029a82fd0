"""In-process tinyserve servers on port 0, each on its own event loop thread, for sync tests.

def test_x(serve):
    srv = serve()                         # one FakeEngine model named "fake"
    stub = srv.stub()                     # sync TinyServe stub on a fresh channel
    srv.call(coro_fn)                     # run `await coro_fn(server)` on the server's loop
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # grpc_fakes.py (tests have no packages)

from grpc_fakes import FakeEngine  # noqa: E402
from server_thread import ServerThread  # noqa: E402

from tinyserve.config import ServerConfig  # noqa: E402


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
