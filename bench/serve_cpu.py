#!/usr/bin/env python3
"""CPU time of `tinyserve serve`, thread by thread, per generated token at concurrency 1 (issue 12).

    python bench/serve_cpu.py --requests 8

Starts `tinyserve serve` with no flags, warms it, then reads every thread's user + system time
(/proc/PID/task/TID/stat) before and after `tinyserve bench serve --concurrency 1` (128-token
prompts, 128 new tokens, greedy). Threads are named by `py-spy dump` when py-spy is installed
(engine[...], MainThread = the event loop, the tenant pools, grpc's poller), else by their OS name.
The compute pool's worker spins between parallel regions, so the engine thread plus it account for
about two cores while a forward runs; every other thread's CPU is taken from that forward (the box
has as many cores as compute threads). Clock ticks are 10 ms: run enough requests (8 = 1024
tokens: 10 us a token). ONE JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

from _procs import cli_json, free_port, serve_command, stop, wait_serving

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def thread_times(pid: int) -> dict[str, tuple[str, int, int]]:
    """tid -> (OS name, user ticks, system ticks)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:  # the thread exited meanwhile
            continue
        fields = s[s.rindex(")") + 2 :].split()
        out[tid] = (s[s.index("(") + 1 : s.rindex(")")], int(fields[11]), int(fields[12]))
    return out


def python_names(pid: int) -> dict[str, str]:
    """tid -> Python thread name (py-spy dump), {} without py-spy."""
    if shutil.which("py-spy") is None:
        return {}
    dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r'Thread (\d+) \(\w+\): "([^"]*)"', dump)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8, help="requests at concurrency 1 (128 tokens each)")
    args = p.parse_args()
    port = free_port()
    server = subprocess.Popen(serve_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        addr = f"127.0.0.1:{port}"
        wait_serving(addr, server, 300)
        common = ["--server", addr, "--concurrency", "1", "--prompt-tokens", "128", "--max-tokens", "128", "--json"]
        cli_json("bench", "serve", "--requests", "2", *common)  # warm: pools and threads exist
        names = python_names(server.pid)
        before = thread_times(server.pid)
        run = cli_json("bench", "serve", "--requests", str(args.requests), *common)
        after = thread_times(server.pid)
    finally:
        stop(server)
    tokens = run["generated_tokens"]
    threads: dict[str, dict[str, float]] = {}
    for tid, (os_name, user, system) in after.items():
        _, user0, system0 = before.get(tid, (os_name, 0, 0))
        if user == user0 and system == system0:
            continue
        key = names.get(tid, f"{os_name} ({tid})")
        t = threads.setdefault(key, {"user_us_per_token": 0.0, "system_us_per_token": 0.0})
        t["user_us_per_token"] += (user - user0) * TICK_S * 1e6 / tokens
        t["system_us_per_token"] += (system - system0) * TICK_S * 1e6 / tokens
    for t in threads.values():
        t["us_per_token"] = t["user_us_per_token"] + t["system_us_per_token"]
        for k in t:
            t[k] = round(t[k], 1)
    ordered = dict(sorted(threads.items(), key=lambda kv: -kv[1]["us_per_token"]))
    total = sum(t["us_per_token"] for t in ordered.values())
    for name, t in ordered.items():
        print(f"{name:40s} {t['us_per_token']:8.0f} us/token", file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "serve_cpu",
                "throughput_tps": run["throughput_tps"],
                "generated_tokens": tokens,
                "server_us_per_token": round(total, 1),
                "threads": ordered,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
