"""End to end with the real default model over gRPC (in-process server on port 0):
64 concurrent streams of mixed prompt and output lengths all complete, and every greedy stream's
text equals the same request run alone; cancelled streams give their KV blocks back."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from tinyserve.api.protos import pb2
from tinyserve.api.server import create_server
from tinyserve.config import ServerConfig
from tinyserve_client import AsyncClient

WORDS = (
    "the cat sat on a mat while rain fell over quiet hills and the old clock kept time "
    "for a town that had long forgotten why it ever needed one"
).split()


def requests(n: int, seed: int = 7) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs: prompts of 3..40 words, 1..16 output tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        n_words = rng.choice([3, 8, 20, 40])
        prompt = f"Story {i}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))
        out.append((prompt, rng.choice([1, 4, 8, 12, 16])))
    return out


async def _with_server(model_path, body, **config):
    cfg = ServerConfig(port=0, models=[str(model_path)], **config)
    server, port = create_server(cfg)
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", timeout=600) as client:
            return await body(server, client)
    finally:
        await server.stop(0)


@pytest.mark.slow
def test_64_concurrent_greedy_streams_match_solo_runs(default_model_path):
    reqs = requests(64)

    async def body(server, client):
        async def one(prompt, n):
            r = await client.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
            return r.text, r.generated_tokens, r.finish_reason

        together = await asyncio.gather(*(one(p, n) for p, n in reqs))
        alone = [await one(p, n) for p, n in reqs]
        stats = server.models[0].engine.engine.stats()
        return together, alone, stats

    together, alone, stats = asyncio.run(_with_server(default_model_path, body, max_num_seqs=64))
    for (p, n), t, a in zip(reqs, together, alone):
        assert t[1] == n and t[2] == "length"  # every stream ran to its full length
        assert t == a, f"batched and solo greedy text differ for {p[:40]!r}"
    assert stats.kv_blocks_used == 0 and stats.num_running == 0


@pytest.mark.slow
def test_cancelled_real_streams_free_their_kv_blocks(default_model_path):
    async def body(server, client):
        engine = server.models[0].engine.engine

        async def start_and_cancel(i):
            call = client.stub.Generate(
                pb2.GenerateRequest(
                    prompt=f"Count to one hundred, number {i}:", stopping={"max_tokens": 200, "ignore_eos": True}
                ),
                timeout=120,
            )
            async for ev in call:
                if ev.HasField("token"):
                    break
            call.cancel()

        await asyncio.gather(*(start_and_cancel(i) for i in range(12)))
        for _ in range(500):
            if engine.stats().kv_blocks_used == 0 and not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        return engine.stats(), server.models[0].engine.num_open

    stats, num_open = asyncio.run(_with_server(default_model_path, body))
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert num_open == 0


@pytest.mark.slow
def test_real_chat_and_deadline(default_model_path):
    async def body(server, client):
        r = await client.chat([{"role": "user", "content": "What is 2 + 2?"}], temperature=0, max_tokens=12)
        with pytest.raises(grpc.RpcError) as e:
            await client.generate("Write a long essay about rivers.", max_tokens=2000, ignore_eos=True, timeout=0.5)
        return r, e.value.code()

    r, code = asyncio.run(_with_server(default_model_path, body))
    assert r.text and r.generated_tokens <= 12 and r.prompt_tokens > 10
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
