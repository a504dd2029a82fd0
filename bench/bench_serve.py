#!/usr/bin/env python3
"""Serving benchmark against a running server (TTFT, ITL, tokens/s) as one JSON line; same as
`tinyserve bench serve --server HOST:PORT --concurrency N --requests R --prompt-tokens P --max-tokens T`."""

import sys

from tinyserve.benchmarks.serve import main

if __name__ == "__main__":
    sys.exit(main())
