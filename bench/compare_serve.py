#!/usr/bin/env python3
"""`tinyserve serve` with no engine flags against the engine alone, in one run (issue 12).

    python bench/compare_serve.py --rounds 3
    python bench/compare_serve.py --rounds 3 --streams ''    # only tg128_b1 and concurrency 1

Starts `tinyserve serve` on a free port (the default model unless --model), then each round:
  - `tinyserve bench engine` tg128_b1: the engine's own single-sequence decode (the server idles);
  - `tinyserve bench serve --concurrency 1` (128-token prompts, 128 new tokens, greedy): one stream
    through gRPC; its throughput over tg128_b1 is the serving overhead (target >= 0.9);
  - `tinyserve bench serve` at each of --streams (default 32 and 128; --requests-per-stream
    requests per stream slot): throughput, TTFT, errors;
  - beside the 32 streams, the same load on `llama-server -np 32` (bench/llama_server.py: the same
    prompt, 128 new tokens, greedy, no prompt cache), in alternating order from round to round; the
    JSON gives tinyserve's throughput and TTFT p99 over llama-server's (targets: >= 6 and <= 1/20).
    --llama-server PATH names the binary (default: build/llamacpp/bin/llama-server, skipped when
    it is not there: build it with bench/build_llamacpp.sh).
Every round's figures and the medians go into ONE JSON object printed last; a table on stderr.
The client runs on the same machine (and cores) as the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _procs import cli_json as cli
from _procs import free_port, run_json, serve_command, stop, wait_serving
from llama_server import DEFAULT_BINARY, LlamaServerProcess

PROMPT_TOKENS, MAX_TOKENS = 128, 128
BASELINE_STREAMS = 32  # llama-server -np 32 beside tinyserve's 32 streams (issue 12)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="GGUF file or catalog name (default: the default model)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--streams",
        default="32,128",
        help="comma-separated concurrencies (besides 1); '' runs only the engine's tg128_b1 and concurrency 1",
    )
    p.add_argument(
        "--requests-per-stream", type=int, default=1, help="requests per stream slot at each concurrency (>= 1)"
    )
    p.add_argument("--c1-requests", type=int, default=8, help="requests at concurrency 1")
    p.add_argument(
        "--llama-server",
        default=str(DEFAULT_BINARY) if DEFAULT_BINARY.exists() else None,
        help="llama-server binary for the 32-stream baseline (default: build/llamacpp/bin/llama-server if built)",
    )
    args = p.parse_args()
    if args.llama_server and not Path(args.llama_server).exists():
        raise SystemExit(f"no {args.llama_server}: run bench/build_llamacpp.sh first")
    streams = [int(s) for s in args.streams.split(",") if s]
    model = ["--model", args.model] if args.model else []
    port = free_port()
    server = subprocess.Popen(
        serve_command(port, *model),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rounds = []
    baseline = args.llama_server and BASELINE_STREAMS in streams
    argv: list[str] = []
    try:
        with contextlib.ExitStack() as stack:
            wait_serving(f"127.0.0.1:{port}", server, 300)
            if baseline:
                from tinyserve.models.catalog import DEFAULT_MODEL, resolve_model

                gguf = str(resolve_model(args.model or DEFAULT_MODEL)[1])
                slot = PROMPT_TOKENS + MAX_TOKENS + 16
                llama = stack.enter_context(
                    LlamaServerProcess(args.llama_server, gguf, BASELINE_STREAMS, threads=2, slot_tokens=slot)
                )
                argv = llama.argv[1:]
            addr = f"127.0.0.1:{port}"
            common = ["--prompt-tokens", str(PROMPT_TOKENS), "--max-tokens", str(MAX_TOKENS), "--json"]
            for i in range(args.rounds):
                eng = cli("bench", "engine", *model, "--prompt-sizes", "128", "--batches", "1", "--reps", "3", "--json")
                tg = eng["tg128_b1"]
                row = {"engine_tg128_b1": tg}
                c1 = cli(
                    "bench",
                    "serve",
                    "--server",
                    addr,
                    "--concurrency",
                    "1",
                    "--requests",
                    str(args.c1_requests),
                    *common,
                )
                row["serve_c1"] = c1
                row["c1_over_engine"] = round(c1["throughput_tps"] / tg, 3)
                for n in streams:
                    load = ["--concurrency", str(n), "--requests", str(n * args.requests_per_stream), *common]
                    runs = {f"serve_c{n}": lambda: cli("bench", "serve", "--server", addr, *load)}
                    if baseline and n == BASELINE_STREAMS:
                        script = str(Path(__file__).with_name("llama_server.py"))
                        runs[f"llama_server_c{n}"] = lambda: run_json([script, "--url", llama.url, *load])
                    order = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate who goes first
                    for key in order:
                        row[key] = runs[key]()
                    if len(runs) == 2:
                        row[f"c{n}_over_llama_server"] = ratios(row[f"serve_c{n}"], row[f"llama_server_c{n}"])
                rounds.append(row)
                print(f"round {i + 1}: " + round_line(row, tg, streams), file=sys.stderr, flush=True)
    finally:
        stop(server)

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
    keys = [f"serve_c{n}" for n in streams] + ([f"llama_server_c{BASELINE_STREAMS}"] if baseline else [])
    for key in keys:
        out["median"].update(
            {
                f"{key}_tps": med([r[key]["throughput_tps"] for r in rounds]),
                f"{key}_ttft_p50_ms": med([r[key]["ttft_p50_ms"] for r in rounds]),
                f"{key}_ttft_p99_ms": med([r[key]["ttft_p99_ms"] for r in rounds]),
                f"{key}_errors": sum(r[key]["errors"] for r in rounds),
            }
        )
    if baseline:
        n, m = BASELINE_STREAMS, out["median"]
        ts, ls = f"serve_c{n}", f"llama_server_c{n}"
        out["llama_server"] = {
            "argv": argv,
            # medians over medians, and the worst round; targets: throughput >= 6x, TTFT p99 <= 1/20
            f"c{n}_throughput_ratio": round(m[f"{ts}_tps"] / m[f"{ls}_tps"], 3) if m[f"{ls}_tps"] else None,
            f"c{n}_ttft_p99_ratio": round(m[f"{ts}_ttft_p99_ms"] / m[f"{ls}_ttft_p99_ms"], 4)
            if m[f"{ls}_ttft_p99_ms"]
            else None,
            f"c{n}_throughput_ratio_min": worst(min, [r[f"c{n}_over_llama_server"]["throughput"] for r in rounds]),
            f"c{n}_ttft_p99_ratio_max": worst(max, [r[f"c{n}_over_llama_server"]["ttft_p99"] for r in rounds]),
        }
    else:
        out["llama_server"] = None
    print(json.dumps(out))
    return 0


def ratios(ts: dict, ls: dict) -> dict:
    """tinyserve's figures over llama-server's for one round (None where llama-server's is 0)."""
    return {
        "throughput": round(ts["throughput_tps"] / ls["throughput_tps"], 3) if ls["throughput_tps"] else None,
        "ttft_p99": round(ts["ttft_p99_ms"] / ls["ttft_p99_ms"], 4) if ls["ttft_p99_ms"] else None,
    }


def worst(pick, xs: list) -> float | None:
    """min or max of the rounds' ratios that exist (None where llama-server's figure was 0)."""
    return pick((x for x in xs if x is not None), default=None)


def round_line(row: dict, tg: float, streams: list[int]) -> str:
    parts = [
        f"engine tg128_b1 {tg:.1f} tok/s, serve c1 {row['serve_c1']['throughput_tps']:.1f} ({row['c1_over_engine']:.2f}x)"
    ]
    for key in [f"serve_c{n}" for n in streams] + [f"llama_server_c{n}" for n in streams]:
        if key in row:
            r = row[key]
            parts.append(
                f"{key} {r['throughput_tps']:.1f} tok/s, TTFT p99 {r['ttft_p99_ms']:.0f} ms, errors {r['errors']}"
            )
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
