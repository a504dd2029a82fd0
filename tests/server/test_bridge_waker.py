"""The bridge's waker thread (api/async_engine.py): the event loop is woken, and the step's metrics
are fed, from the waker thread, never from the engine thread; outputs arrive in order, each
step's metrics before its outputs; and what stop() fails is still delivered."""

from __future__ import annotations

import asyncio
import threading

import pytest
from test_slow_readers import ids_of, paged_engine, reference_tokens

from tinyserve.api import async_engine
from tinyserve.api.async_engine import AsyncEngine, Tokens
from tinyserve.api.errors import Unavailable
from tinyserve.engine.params import SamplingParams, StoppingParams


class Recorder:
    """ModelMetrics' part the bridge uses: observe_step (recorded with its thread) and itl."""

    def __init__(self, delivered: list):
        self.delivered = delivered
        self.steps: list[tuple[str, int]] = []  # (thread name, tokens delivered to the loop so far)
        self.itl = self

    def observe_step(self, stats, step_s):
        self.steps.append((threading.current_thread().name, len(self.delivered)))

    def observe(self, value):  # itl.observe
        pass


def run_bridge(max_tokens: int, body):
    engine = paged_engine(num_blocks=64)
    delivered: list[int] = []  # tokens as the loop receives them (before the consumer reads)
    metrics = Recorder(delivered)
    bridge = AsyncEngine(engine, "fake", metrics=metrics)
    wakers: list[str] = []

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def spy(cb, *args):
            if cb is async_engine._put_all:  # the bridge's hand-offs (not to_thread's, say)
                wakers.append(threading.current_thread().name)
            return real(cb, *args)

        loop.call_soon_threadsafe = spy
        bridge.start()
        try:
            greedy = SamplingParams(temperature=0.0)
            h = bridge.submit("r", ids_of("abc"), greedy, StoppingParams(max_tokens=max_tokens, ignore_eos=True))
            put = h._put

            def counting_put(item):
                if type(item) is tuple:
                    delivered.extend(item[0].new_token_ids)
                put(item)

            h._put = counting_put
            return await body(bridge, h)
        finally:
            await asyncio.to_thread(bridge.stop)

    return metrics, wakers, asyncio.run(main())


def test_the_loop_is_woken_and_metrics_fed_by_the_waker_in_order():
    async def body(bridge, h):
        got = []
        async for ev in h:
            if isinstance(ev, Tokens):
                got += ev.token_ids
        return got

    metrics, wakers, got = run_bridge(40, body)
    assert got == reference_tokens({"r": (ids_of("abc"), 40)})["r"]
    assert wakers and set(wakers) == {"waker[fake]"}
    assert len(metrics.steps) >= 40 and {t for t, _ in metrics.steps} == {"waker[fake]"}
    # a step's metrics come before its outputs: when the i-th step is observed, at most the
    # tokens of the steps before it (one each here, after the prompt's) have reached the loop
    assert all(n <= i for i, (_, n) in enumerate(metrics.steps))


def test_what_stop_fails_still_reaches_the_stream():
    async def body(bridge, h):
        got = []
        with pytest.raises(Unavailable):
            async for ev in h:
                if isinstance(ev, Tokens):
                    got += ev.token_ids
                if len(got) == 5:
                    await asyncio.to_thread(bridge.stop)  # the request is still open
        return got

    _, _, got = run_bridge(100_000, body)
    assert 5 <= len(got) < 100_000
