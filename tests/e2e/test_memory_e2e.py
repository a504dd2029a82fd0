"""tinyserve.memory: the default KV budget from the machine's memory and the RSS split; and
`tinyserve serve` with no engine flags on the default model: its RSS, split by the metric
tinyserve_memory_bytes, stays within the model file + the KV budget + 150 MB (issue 12)."""

from __future__ import annotations

import mmap
import os
import re
import subprocess
import urllib.request

import grpc
import numpy as np
import pytest

from realservers import free_port, serve_command, wait_serving
from tinyserve import memory
from tinyserve.api.protos import pb2 as P
from tinyserve.api.protos import pb2_grpc
from tinyserve.config import ServerConfig
from tinyserve.engine.params import EngineConfig
from tinyserve.memory import default_kv_budget_mb
from tinyserve.metrics import Metrics

SLACK = 150 * 10**6


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'tinyserve_memory_bytes\{part="(\w+)"\} (\S+)', text)}


@pytest.mark.slow
def test_serve_rss_is_within_file_plus_kv_budget_plus_150mb(default_model_path, tmp_path):
    port, mport = free_port(), free_port()
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            serve_command(port, "--metrics-port", str(mport)),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_serving(f"127.0.0.1:{port}", proc, 180, log=log)
        stub = pb2_grpc.TinyServeServiceStub(channel)
        evs = list(
            stub.Generate(
                P.GenerateRequest(
                    prompt="The capital of France is",
                    sampling=P.SamplingParameters(temperature=0),
                    stopping=P.StoppingParameters(max_tokens=16),
                ),
                timeout=120,
            )
        )
        assert evs[-1].HasField("end")
        mem = scrape(mport)
        budget = default_kv_budget_mb() << 20
        file_size = os.path.getsize(default_model_path)
        assert set(mem) == {"rss", "weights_mapped", "weights_repacked", "kv_arena", "rest"}
        assert budget - (1 << 20) <= mem["kv_arena"] <= budget  # the arena is what fits the budget
        assert mem["rss"] == pytest.approx(
            mem["weights_mapped"] + mem["weights_repacked"] + mem["kv_arena"] + mem["rest"], abs=1
        )
        assert mem["rss"] <= file_size + budget + SLACK, mem
        assert "memory: RSS" in log.read_text()  # the split is logged at start-up too
    finally:
        channel.close()
        proc.terminate()
        proc.wait(30)


GIB = 1 << 30


@pytest.mark.parametrize(
    "mem, mb",
    [
        (24 * GIB, 1536),
        (int(23.5 * GIB), 1504),
        (16 * GIB, 1024),
        (7 * GIB, 448),
        (4 * GIB, 256),
        (1 * GIB, 256),
        (64 * GIB, 2048),
        (0, 256),
    ],
)
def test_default_kv_budget_is_a_sixteenth_of_memory_within_bounds(mem, mb):
    assert memory.default_kv_budget_mb(mem) == mb


def test_the_servers_default_follows_this_machine():
    mb = memory.default_kv_budget_mb()
    assert ServerConfig().kv_budget_mb == mb
    assert ServerConfig().engine_config().kv_budget_bytes == mb << 20
    assert EngineConfig().kv_budget_bytes == 256 << 20  # the library's engine (LLM, the CLI) keeps 256 MiB
    assert ServerConfig(kv_budget_mb=300).engine_config().kv_budget_bytes == 300 << 20  # overridable


def test_a_cgroup_limit_below_the_ram_wins(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit"
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (str(v2), str(v1)))
    phys = memory.machine_memory_bytes()
    assert phys and phys > 512 << 20
    v2.write_text("max\n")  # no limit
    assert memory.machine_memory_bytes() == phys
    v1.write_text(f"{512 << 20}\n")
    assert memory.machine_memory_bytes() == 512 << 20
    v1.write_text(f"{phys * 2}\n")  # a limit above the RAM: the RAM
    assert memory.machine_memory_bytes() == phys


def test_rss_counts_touched_memory():
    before = memory.rss_bytes()
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, every page written
    after = memory.rss_bytes()
    assert before > 0 and after - before >= 60 << 20
    del block


def test_mapped_rss_counts_the_resident_pages_of_one_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * (8 << 20))
    assert memory.mapped_rss_bytes([str(path)]) == 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        assert sum(mm[i] for i in range(0, len(mm), 4096)) == 2048  # touch every page
        assert memory.mapped_rss_bytes([str(path)]) >= 8 << 20
        assert memory.mapped_rss_bytes([str(tmp_path / "other")]) == 0


def test_split_parts_add_up_to_the_rss():
    s = memory.memory_split([], repacked_bytes=10 << 20, kv_bytes=5 << 20)
    assert s.rest == s.rss - (10 << 20) - (5 << 20) > 0
    assert "repacked" in s.describe() and "KV arena" in s.describe()


def test_the_metric_serves_the_split():
    m = Metrics()
    split = memory.MemorySplit(rss=500, weights_mapped=100, weights_repacked=90, kv_arena=256, rest=54)
    m.watch_memory(lambda: split)
    text = m.exposition().decode()
    for part, v in split.as_dict().items():
        assert f'tinyserve_memory_bytes{{part="{part}"}} {float(v)}' in text
    m.watch_memory(lambda: memory.MemorySplit(1, 0, 0, 0, 1))  # a second server: replaced
    assert 'tinyserve_memory_bytes{part="rss"} 1.0' in m.exposition().decode()
