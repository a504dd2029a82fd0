"""Chat template rendering: latency of the real templates and what the hostile corpus costs.

    python bench/bench_templates.py [--rounds 300] [--no-minijinja]      # prints one JSON object

- "latency_us": median and minimum microseconds per render of SmolLM2's, Qwen2.5's (with and without tools)
  and the Gemma-style template on a 4-message and a 17-message conversation: `inline` (the bounded
  sandbox in this process), `worker` (the same in a worker process: what the server does), and
  `minijinja` (PyPI minijinja with HF-style settings, if installed) with whether its text is
  byte-identical to Jinja's.
- "hostile": per hostile template, rendered the server's way (worker): milliseconds to the error,
  the limit that stopped it, the worker's peak RSS, and the longest stall of a thread in this
  process that ticks every 1 ms (the server's event loop stands in for it).
- "gil": the issue's `((10**10)**1000)**1000` with the integer bound lifted, so only the isolation
  protects: the ticking thread's longest stall when it renders inline vs in a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "model"))

from template_corpus import CONVERSATIONS, HARD_RUNAWAYS, HOSTILE, TOOLS, real_templates  # noqa: E402

from tinyserve.models.chat_template import ChatTemplate, ChatTemplateError  # noqa: E402

try:
    from tinyserve.models.chat_template import TemplateLimits
    from tinyserve.models.template_workers import default_pool
except ImportError:  # the renderer before issue 13 (for a "before" figure): inline only
    TemplateLimits = default_pool = None


class Ticker:
    """A thread that wakes every 1 ms; its longest gap is how long the GIL was held against it."""

    def __init__(self):
        self.max_gap = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        last = time.perf_counter()
        while not self._stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            last = now

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _median_us(fn, rounds: int) -> dict:
    """Median and minimum microseconds per call (the minimum is the cost on an idle machine)."""
    fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"p50": round(statistics.median(ts) * 1e6, 1), "min": round(min(ts) * 1e6, 1)}


def _minijinja(source: str, bos: str, eos: str):
    try:
        import minijinja
    except ImportError:
        return None

    def raise_exception(msg):
        raise ValueError(msg)

    env = minijinja.Environment(templates={"t": source})
    env.trim_blocks = True
    env.lstrip_blocks = True
    env.add_function("raise_exception", raise_exception)
    return lambda msgs, **kw: env.render_template(
        "t", messages=msgs, add_generation_prompt=True, bos_token=bos, eos_token=eos, **kw
    )


def latency(rounds: int, use_minijinja: bool) -> dict:
    from tinyserve.models.default import default_model_path

    out = {}
    for name, (source, bos, eos) in real_templates(default_model_path()).items():
        variants = [(name, {})] + ([(f"{name}+tools", {"tools": TOOLS})] if name == "qwen2.5" else [])
        for label, extra in variants:
            for conv in ("system_turns", "long"):
                msgs = CONVERSATIONS[conv]
                row = {}
                try:
                    inline = ChatTemplate(source, bos, eos, isolated=False)
                except TypeError:
                    inline = ChatTemplate(source, bos, eos)
                row["inline"] = _median_us(lambda: inline.render(msgs, **extra), rounds)
                if default_pool is not None:
                    worker = ChatTemplate(source, bos, eos)
                    row["worker"] = _median_us(lambda: worker.render(msgs, **extra), rounds)
                mj = _minijinja(source, bos, eos) if use_minijinja else None
                if mj is not None:
                    row["minijinja"] = _median_us(lambda: mj(msgs, **extra), rounds)
                    row["minijinja_identical"] = mj(msgs, **extra) == inline.render(msgs, **extra)
                out[f"{label}/{conv}"] = row
    return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def hostile() -> dict:
    pool = default_pool()
    ChatTemplate.chatml().render([{"role": "user", "content": "warm up"}])
    out = {}
    for name, source, _ in HOSTILE + [(n, s, "time_s") for n, s in HARD_RUNAWAYS]:
        peak = [0.0]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], sum(_rss_mb(p) for p in pool.pids()))
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        with Ticker() as tick:
            sampler.start()
            t0 = time.perf_counter()
            try:
                ChatTemplate(source).render([{"role": "user", "content": "hi"}])
                limit = None
            except ChatTemplateError as e:
                limit = getattr(e, "limit", None) or type(e).__name__
            ms = (time.perf_counter() - t0) * 1e3
            stop.set()
            sampler.join()
        out[name] = {
            "ms": round(ms, 1),
            "limit": limit,
            "worker_peak_rss_mb": peak[0],
            "max_stall_ms": round(tick.max_gap * 1e3, 1),
        }
    return out


def gil() -> dict:
    boom = "{{ ((10**10)**1000)**1000 }}"
    limits = TemplateLimits(max_int_bits=1 << 40, time_s=2.0)
    out = {}
    for mode, isolated in (("worker", True), ("inline", False)):
        with Ticker() as tick:
            t0 = time.perf_counter()
            try:
                ChatTemplate(boom, limits=limits, isolated=isolated).render([{"role": "user", "content": "x"}])
            except ChatTemplateError as e:
                end = getattr(e, "limit", None) or type(e).__name__
            out[mode] = {
                "ms": round((time.perf_counter() - t0) * 1e3, 1),
                "ended_by": end,
                "max_stall_ms": round(tick.max_gap * 1e3, 1),
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--no-minijinja", action="store_true")
    p.add_argument("--latency-only", action="store_true")
    a = p.parse_args()
    result = {"pid": os.getpid(), "latency_us": latency(a.rounds, not a.no_minijinja)}
    if not a.latency_only and default_pool is not None:
        result["hostile"] = hostile()
        result["gil"] = gil()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
