#!/usr/bin/env python3
"""`tinyserve serve` with no engine flags against the engine alone, in one run (issue 12).

    python bench/compare_serve.py --rounds 3

Starts `tinyserve serve` on a free port (the default model unless --model), then each round:
  - `tinyserve bench engine` tg128_b1: the engine's own single-sequence decode (the server idles);
  - `tinyserve bench serve --concurrency 1` (128-token prompts, 128 new tokens, greedy): one stream
    through gRPC; its throughput over tg128_b1 is the serving overhead (target >= 0.9);
  - `tinyserve bench serve` at each of --streams (default 32 and 128; --requests-per-stream
    requests per stream slot): throughput, TTFT, errors.
Every round's figures and the medians go into ONE JSON object printed last; a table on stderr.
The client runs on the same machine (and cores) as the server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from _procs import cli_json as cli
from _procs import free_port, serve_command, wait_serving


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF file or catalog name (default: the default model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", default="32,128", help="comma-separated concurrencies (besides 1)")
    p.add_argument(
        "--requests-per-stream", type=int, default=1, help="requests per stream slot at each concurrency (>= 1)"
    )
    p.add_argument("--c1-requests", type=int, default=8, help="requests at concurrency 1")
    args = p.parse_args()
    streams = [int(s) for s in args.streams.split(",") if s]
    model = ["--model", args.model] if args.model else []
    port = free_port()
    server = subprocess.Popen(
        serve_command(port, *model),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rounds = []
    try:
        wait_serving(f"127.0.0.1:{port}", server, 300)
        addr = f"127.0.0.1:{port}"
        common = ["--prompt-tokens", "128", "--max-tokens", "128", "--json"]
        for i in range(args.rounds):
            eng = cli("bench", "engine", *model, "--prompt-sizes", "128", "--batches", "1", "--reps", "3", "--json")
            tg = eng["tg128_b1"]
            row = {"engine_tg128_b1": tg}
            c1 = cli(
                "bench", "serve", "--server", addr, "--concurrency", "1", "--requests", str(args.c1_requests), *common
            )
            row["serve_c1"] = c1
            row["c1_over_engine"] = round(c1["throughput_tps"] / tg, 3)
            for n in streams:
                row[f"serve_c{n}"] = cli(
                    "bench",
                    "serve",
                    "--server",
                    addr,
                    "--concurrency",
                    str(n),
                    "--requests",
                    str(n * args.requests_per_stream),
                    *common,
                )
            rounds.append(row)
            print(
                f"round {i + 1}: engine tg128_b1 {tg:.1f} tok/s, serve c1 {c1['throughput_tps']:.1f} "
                f"({row['c1_over_engine']:.2f}x); "
                + "; ".join(
                    f"c{n} {row[f'serve_c{n}']['throughput_tps']:.1f} tok/s, TTFT p99 "
                    f"{row[f'serve_c{n}']['ttft_p99_ms']:.0f} ms, errors {row[f'serve_c{n}']['errors']}"
                    for n in streams
                ),
                file=sys.stderr,
                flush=True,
            )
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    def med(xs):
        return round(statistics.median(xs), 3)

    out = {
        "bench": "compare_serve",
        "rounds": rounds,
        "median": {
            "engine_tg128_b1": med([r["engine_tg128_b1"] for r in rounds]),
            "serve_c1_tps": med([r["serve_c1"]["throughput_tps"] for r in rounds]),
            "c1_over_engine": med([r["c1_over_engine"] for r in rounds]),
        },
    }
    for n in streams:
        key = f"serve_c{n}"
        out["median"].update(
            {
                f"{key}_tps": med([r[key]["throughput_tps"] for r in rounds]),
                f"{key}_ttft_p50_ms": med([r[key]["ttft_p50_ms"] for r in rounds]),
                f"{key}_ttft_p99_ms": med([r[key]["ttft_p99_ms"] for r in rounds]),
                f"{key}_errors": sum(r[key]["errors"] for r in rounds),
            }
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
