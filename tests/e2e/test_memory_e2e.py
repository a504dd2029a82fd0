"""`tinyserve serve` with no engine flags, the default model: its RSS, split by the metric
tinyserve_memory_bytes, stays within the model file + the KV budget + 150 MB (issue 12)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tinyserve.api.protos import pb2 as P
from tinyserve.api.protos import pb2_grpc
from tinyserve.memory import default_kv_budget_mb

pytestmark = pytest.mark.slow

SLACK = 150 * 10**6


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'tinyserve_memory_bytes\{part="(\w+)"\} (\S+)', text)}


def test_serve_rss_is_within_file_plus_kv_budget_plus_150mb(default_model_path, tmp_path):
    port, mport = free_port(), free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tinyserve.cli", "serve", "--port", str(port),
                                 "--metrics-port", str(mport)], stdout=subprocess.DEVNULL, stderr=err)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < end, "server never became healthy"
            time.sleep(0.3)
        stub = pb2_grpc.TinyServeServiceStub(channel)
        evs = list(stub.Generate(P.GenerateRequest(prompt="The capital of France is",
                                                   sampling=P.SamplingParameters(temperature=0),
                                                   stopping=P.StoppingParameters(max_tokens=16)),
                                 timeout=120))
        assert evs[-1].HasField("end")
        mem = scrape(mport)
        budget = default_kv_budget_mb() << 20
        file_size = os.path.getsize(default_model_path)
        assert set(mem) == {"rss", "weights_mapped", "weights_repacked", "kv_arena", "rest"}
        assert budget - (1 << 20) <= mem["kv_arena"] <= budget   # the arena is what fits the budget
        assert mem["rss"] == pytest.approx(mem["weights_mapped"] + mem["weights_repacked"]
                                           + mem["kv_arena"] + mem["rest"], abs=1)
        assert mem["rss"] <= file_size + budget + SLACK, mem
        assert "memory: RSS" in log.read_text()    # the split is logged at start-up too
    finally:
        channel.close()
        proc.terminate()
        proc.wait(30)
