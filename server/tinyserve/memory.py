"""Memory: the machine's, the default KV budget sized from it, and where the process's RSS goes.

Default KV budget of `tinyserve serve` (per model; `--kv-budget-mb` overrides it; EngineConfig's
own default, for the library and the one-shot CLI commands, stays 256 MiB): 1/16 of the machine's memory,
at least 256 MiB and at most 2 GiB. The machine's memory is the physical RAM, or the cgroup's
limit when that is lower (a container). So a 24 GiB box gives 1536 MiB (~68k tokens of
SmolLM2-135M's f16 KV), a 7 GiB CI runner 448 MiB, and anything under 4 GiB the 256 MiB floor.

RSS split (`memory_split`, read from /proc/self on Linux): the resident pages of the model
files' mappings (weights read in place), the kernels' repacked copy of the weights, the KV
arenas (allocated and zeroed when the engine starts, so resident), and the rest (the
interpreter, gRPC, tokenizers, buffers). `tinyserve info` prints it; the metric
tinyserve_memory_bytes{part=...} serves it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

MIB = 1 << 20
KV_BUDGET_FRACTION = 16  # the default KV budget is 1/16 of the machine's memory...
KV_BUDGET_MIN_MB = 256  # ...within these bounds (MiB)
KV_BUDGET_MAX_MB = 2048

_CGROUP_LIMITS = (
    "/sys/fs/cgroup/memory.max",  # cgroup v2
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)  # cgroup v1


def machine_memory_bytes() -> int | None:
    """Physical memory, or the cgroup's memory limit when lower; None when neither is known."""
    try:
        phys: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = None
    limits = [phys] if phys and phys > 0 else []
    for path in _CGROUP_LIMITS:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (1 << 60):  # "max" or a huge number: no limit
            limits.append(int(text))
    return min(limits) if limits else None


def default_kv_budget_mb(memory_bytes: int | None = None) -> int:
    """The default KV budget per model, MiB, for a machine with `memory_bytes` (default: this one)."""
    mem = machine_memory_bytes() if memory_bytes is None else memory_bytes
    if not mem:
        return KV_BUDGET_MIN_MB
    return max(KV_BUDGET_MIN_MB, min(KV_BUDGET_MAX_MB, mem // KV_BUDGET_FRACTION // MIB))


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def mapped_rss_bytes(paths: Iterable[str]) -> int:
    """Resident bytes of this process's mappings of the given files (/proc/self/smaps)."""
    wanted = {os.path.realpath(p) for p in paths}
    if not wanted:
        return 0
    total, current = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    parts = line.split(None, 5)
                    current = len(parts) == 6 and parts[5].strip() in wanted
                elif current and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total


@dataclass(frozen=True)
class MemorySplit:
    rss: int
    weights_mapped: int  # resident pages of the model files' mappings
    weights_repacked: int  # the kernels' copy of the weights (heap)
    kv_arena: int  # the KV caches' arenas
    rest: int  # everything else: rss minus the three above (never below 0)

    def as_dict(self) -> dict[str, int]:
        return {
            "rss": self.rss,
            "weights_mapped": self.weights_mapped,
            "weights_repacked": self.weights_repacked,
            "kv_arena": self.kv_arena,
            "rest": self.rest,
        }

    def describe(self) -> str:
        mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
        return (
            f"RSS {mb(self.rss)}: weights {mb(self.weights_mapped)} mapped from the file + "
            f"{mb(self.weights_repacked)} repacked, KV arena {mb(self.kv_arena)}, "
            f"rest {mb(self.rest)}"
        )


def memory_split(model_paths: Iterable[str], repacked_bytes: int, kv_bytes: int) -> MemorySplit:
    """This process's RSS, split (see the module doc)."""
    rss = rss_bytes()
    mapped = mapped_rss_bytes(model_paths)
    return MemorySplit(rss, mapped, repacked_bytes, kv_bytes, max(0, rss - mapped - repacked_bytes - kv_bytes))
