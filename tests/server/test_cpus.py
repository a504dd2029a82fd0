"""`--threads 0` under fake cgroup files: the CPU quota caps the thread count."""

from __future__ import annotations

import os

import pytest

from tinyserve.cpus import cgroup_cpu_limit, default_threads

CORES = len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("TINYSERVE_THREADS", raising=False)


def cgroup(tmp_path, files: dict[str, str], own: str = "kubepods/pod1/c1"):
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(f"0::/{own}\n")
    return root, proc


def test_v2_quota_of_the_own_cgroup_and_of_its_parents(tmp_path):
    root, proc = cgroup(tmp_path, {"kubepods/pod1/c1/cpu.max": "150000 100000\n", "kubepods/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert default_threads(root, proc) == min(CORES, 2)  # rounded up
    root, proc = cgroup(
        tmp_path / "b", {"kubepods/pod1/c1/cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "50000 100000\n"}
    )
    assert cgroup_cpu_limit(root, proc) == 0.5  # a parent's limit binds too
    assert default_threads(root, proc) == 1


def test_no_limit_means_the_affinity_mask(tmp_path):
    root, proc = cgroup(tmp_path, {"kubepods/pod1/c1/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root, proc) is None
    assert default_threads(root, proc) == CORES
    assert default_threads(tmp_path / "nothing", tmp_path / "none") == CORES


def test_v1_and_a_limit_above_the_cores_and_the_env_override(tmp_path, monkeypatch):
    root, proc = cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) == 3.0
    root, proc = cgroup(tmp_path / "big", {"kubepods/pod1/c1/cpu.max": f"{(CORES + 8) * 100000} 100000"})
    assert default_threads(root, proc) == CORES  # a quota never adds cores
    monkeypatch.setenv("TINYSERVE_THREADS", "5")
    assert default_threads(root, proc) == 5
