#!/usr/bin/env python3
"""Stream one completion: python stream.py [HOST:PORT] [PROMPT]"""

import sys

from tinyserve_client import Client

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time"
with Client(target, timeout=120) as client:
    for chunk in client.generate_stream(prompt, max_tokens=64, temperature=0.7, seed=1):
        print(chunk.text, end="", flush=True)
    print()
