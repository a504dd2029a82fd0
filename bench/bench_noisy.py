#!/usr/bin/env python3
"""Noisy neighbour: tenant B's time to first token alone, under tenant A's flood with fair share,
and with FIFO, as one JSON line; same as `tinyserve bench noisy` (see tinyserve.benchmarks.noisy)."""

import sys

from tinyserve.benchmarks.noisy import main

if __name__ == "__main__":
    sys.exit(main())
