"""tinyserve_client.AsyncClient against a scripted server."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from tinyserve_client import AsyncClient, pb2


def test_async_generate_chat_and_unary(fake):
    async def main():
        async with AsyncClient(fake.address, timeout=10, api_key="k") as c:
            parts = [ch.text async for ch in c.generate_stream("hey")]
            chat = await c.chat([{"role": "user", "content": "q?"}], max_tokens=1)
            streamed = [ch.text async for ch in c.chat_stream([{"role": "user", "content": "ab"}])]
            many = await asyncio.gather(*(c.generate(f"n{i}") for i in range(8)))
            unary = (
                await c.tokenize("xy"),
                await c.detokenize([111, 107]),
                (await c.list_models()).default_model,
                (await c.get_model()).name,
                (await c.get_usage()).tenant,
            )
            return parts, chat, streamed, many, unary

    parts, chat, streamed, many, unary = asyncio.run(main())
    assert parts == ["h", "e", "y"] and streamed == ["a", "b"]
    assert chat.text == "q" and chat.finish_reason == "length" and chat.time_to_first_token_ms == 250
    assert [r.text for r in many] == [f"n{i}" for i in range(8)]
    assert unary == ([120, 121], "ok", "fake", "fake", "dev")
    assert all(md["authorization"] == "Bearer k" for _, _, md in fake.servicer.calls)
    assert isinstance(fake.servicer.calls[1][1], pb2.ChatRequest)


def test_async_retry_on_unavailable_then_success(fake):
    fake.servicer.fail = [lambda ctx: ctx.abort(grpc.StatusCode.UNAVAILABLE, "starting")] * 2

    async def main():
        async with AsyncClient(fake.address, timeout=10, retries=3, backoff_s=0.01) as c:
            return await c.generate("ok")

    assert asyncio.run(main()).text == "ok"
    assert fake.methods() == ["Generate"] * 3


def test_async_errors_are_not_retried_except_unavailable(fake):
    fake.servicer.fail = [lambda ctx: ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad")]

    async def main():
        async with AsyncClient(fake.address, timeout=10, retries=3, backoff_s=0.01) as c:
            return await c.tokenize("x")

    with pytest.raises(grpc.RpcError) as e:
        asyncio.run(main())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fake.methods() == ["Tokenize"]


def test_async_break_cancels_the_stream(fake):
    fake.servicer.token_delay = 0.05

    async def main():
        async with AsyncClient(fake.address, timeout=30) as c:
            i = 0
            async for _ in c.generate_stream("y" * 200):
                i += 1
                if i == 3:
                    break

    asyncio.run(main())
    assert fake.servicer.cancelled.wait(10)
