#!/usr/bin/env python3
"""Eight concurrent chats over one connection: python async_many.py [HOST:PORT]"""

import asyncio
import sys


async def main(target: str) -> None:
    from tinyserve_client import AsyncClient

    async with AsyncClient(target, timeout=300) as client:
        questions = [f"Give me one fun fact about the number {i}." for i in range(8)]
        answers = await asyncio.gather(
            *(client.chat([{"role": "user", "content": q}], max_tokens=48, temperature=0) for q in questions)
        )
        for q, a in zip(questions, answers):
            print(f"{q}\n  -> {a.text.strip()}  [{a.generated_tokens} tokens, ttft {a.time_to_first_token_ms:.0f} ms]")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"))
