"""`tinyserve bench serve` against the fake engine: the JSON line and its counts (no timings)."""

from __future__ import annotations

import json

from grpc_fakes import FakeEngine

from tinyserve.benchmarks.serve import percentile
from tinyserve.cli import main as cli_main


def main(argv: list[str]) -> int:
    """`tinyserve bench serve ARGV`: its exit code."""
    return cli_main(["bench", "serve", *argv])


def test_percentile():
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == 9.9


def test_bench_serve_prints_one_json_object_last(serve, capsys):
    srv = serve([FakeEngine()])
    rc = main(f"--server {srv.address} --concurrency 3 --requests 7 --prompt-tokens 20 --max-tokens 5 --json".split())
    out = capsys.readouterr()
    assert rc == 0
    lines = out.out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[-1])
    assert res["completed"] == 7 and res["errors"] == 0
    assert res["generated_tokens"] == 35 and res["prompt_tokens"] == 20
    for key in ("throughput_tps", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
        assert res[key] > 0, key
    assert "7/7" in out.err  # the progress bar


def test_bench_serve_counts_errors(serve, capsys):
    srv = serve([FakeEngine()])
    # 300-token prompts do not fit the fake model's 256-token context: every request fails
    rc = main(
        f"--server {srv.address} --concurrency 2 --requests 3 --prompt-tokens 300 --max-tokens 5 --warmup 0".split()
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and res["errors"] == 3 and res["error_codes"] == {"INVALID_ARGUMENT": 3}


def test_bench_serve_without_a_server_fails_cleanly(capsys):
    from realservers import free_port

    rc = main(["--server", f"127.0.0.1:{free_port()}", "--requests", "1"])
    assert rc == 1 and "UNAVAILABLE" in capsys.readouterr().err


def test_bench_serve_temperature_reaches_every_request(serve, capsys):
    seen: list[float] = []

    class Recording(FakeEngine):
        def add_request(self, request_id, prompt_token_ids, sampling, stopping, **kw):
            seen.append(sampling.temperature)
            return super().add_request(request_id, prompt_token_ids, sampling, stopping, **kw)

    srv = serve([Recording()])
    rc = main(
        f"--server {srv.address} --concurrency 2 --requests 3 --prompt-tokens 10 --max-tokens 3 --temperature 0.75 --json".split()
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and res["temperature"] == 0.75
    assert len(seen) == 4 and set(seen) == {0.75}  # the warm-up request and the 3 timed ones
    assert main(["--server", srv.address, "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
