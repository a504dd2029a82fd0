"""How many compute threads `--threads 0` means: the CPUs this process may use, which in a
container is its CPU limit, not the node's cores.

    default_threads()   # min(CPUs in the affinity mask, ceil(cgroup CPU quota)); $TINYSERVE_THREADS wins

The quota is cgroup v2's `cpu.max` ("200000 100000" = 2 CPUs; "max ..." = none) of this process's
cgroup and of every cgroup above it (the smallest wins), or cgroup v1's cpu.cfs_quota_us /
cpu.cfs_period_us. Kubernetes writes a container's `resources.limits.cpu` there.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup v2 directory and its parents up to the root (deepest first)."""
    rel = ""
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
    here = root / rel if rel else root
    out = [here]
    while here != root and root in here.parents:
        here = here.parent
        out.append(here)
    return out


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota in CPUs (e.g. 1.5), or None when there is none (or no cgroup to read)."""
    limits: list[float] = []
    for d in _v2_dirs(root, proc_cgroup):
        text = _read(d / "cpu.max")
        if text:
            quota, _, period = text.partition(" ")
            if quota != "max" and period:
                try:
                    if int(quota) > 0 and int(period) > 0:
                        limits.append(int(quota) / int(period))
                except ValueError:
                    pass
    if not limits:  # cgroup v1
        for d in (root / "cpu", root / "cpu,cpuacct"):
            v1_quota, v1_period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            try:
                if v1_quota and v1_period and int(v1_quota) > 0 and int(v1_period) > 0:
                    limits.append(int(v1_quota) / int(v1_period))
            except ValueError:
                pass
    return min(limits) if limits else None


def default_threads(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Threads for `--threads 0`: $TINYSERVE_THREADS if set (> 0), else the CPUs of the affinity
    mask, capped by the cgroup CPU quota rounded up (a 1.5-CPU limit: 2 threads); at least 1."""
    env = os.environ.get("TINYSERVE_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)
