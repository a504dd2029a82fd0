#!/usr/bin/env python3
"""Engine throughput (pp128, pp512, tg128_b1..b64) as one JSON line; same as `tinyserve bench engine`."""

import sys

from tinyserve.benchmarks.engine import main

if __name__ == "__main__":
    sys.exit(main())
