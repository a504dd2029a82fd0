"""`tinyserve bench noisy`: the noisy-neighbour benchmark. Does a flooding tenant delay a light one?

Tenant A keeps --a-streams long requests in flight (--a-prompt-tokens random prompt tokens,
--a-output-tokens generated; a new one as soon as one finishes). Tenant B sends one short request
at a time (--b-prompt-tokens, --b-output-tokens), the next one a random think time after the last
finished. We report B's time to first token (wall clock, from its arrival to the end of the step
that sampled its first token) and the time between its next tokens, in three phases of one run,
each on a fresh engine over the same model: B alone; B under A's flood with fair share; B under
A's flood with FIFO.

The engine runs in-process in a step loop (no gRPC: this measures scheduling, not the network).
Arrivals are virtual: a request whose arrival time falls inside a step is added when that step
ends, as the server's engine thread would find it in its inbox, and its TTFT counts from its
arrival time, so it includes the rest of the step it arrived in.

The engine runs with its defaults unless a flag sets one: the per-step budget follows who is
there (scheduler.py, "Budget"). While B has been around in the last few hundred steps, steps are
short (contended_step_tokens); under the flood B waits for the rest of the step in flight, then
its prompt runs alone in the next one (a fresh tenant's step: none of A's decodes). So B's TTFT
under flood is the rest of one short step plus its own, against its own step alone. Short steps
and B's own steps cost A some throughput; the a-alone phase (A's flood with no B, long steps)
measures how much, over the same window as the fair phase (from the flood's start, as long as the
fair phase flooded). A's throughput is given twice: its output tokens per second, and the tokens
the engine ran for it (prompt + output) per second. Over a window of a few dozen seconds the
first swings with where the flood's prompts and decodes fall (32 streams of 448 + 64 tokens: a
stream takes ~15 s), the second does not, so the target is checked on the second. Under FIFO, B
waits for every A prompt queued before it.

The last stdout line is one JSON object (`tinyserve bench noisy`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import numpy as np

# the two loads' sizes (A floods, B is the victim): checked >= 1, and reported in the settings
_LOADS = ("a_streams", "a_prompt_tokens", "a_output_tokens", "b_requests", "b_prompt_tokens", "b_output_tokens")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file or catalog model name (default: the default model)")
    p.add_argument("--threads", type=int, default=0, help="compute threads (0 = all cores)")
    p.add_argument("--a-streams", type=int, default=32, help="tenant A's requests in flight")
    p.add_argument("--a-prompt-tokens", type=int, default=448)
    p.add_argument("--a-output-tokens", type=int, default=64)
    p.add_argument("--b-requests", type=int, default=40, help="B's requests per phase (at most)")
    p.add_argument("--b-prompt-tokens", type=int, default=32)
    p.add_argument("--b-output-tokens", type=int, default=8)
    p.add_argument(
        "--b-think-ms",
        type=float,
        default=100.0,
        help="B waits uniform(0, this) after a request finishes before the next",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds per flood phase after which B starts no new request (the one in flight is still measured)",
    )
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of A's flood before B starts")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="per-step token budget while one tenant is alone (default: the engine's)",
    )
    p.add_argument(
        "--contended-step-tokens",
        type=int,
        default=None,
        help="per-step token budget while both tenants have work (default: the engine's)",
    )
    p.add_argument(
        "--idle-step-tokens",
        type=int,
        default=None,
        help="per-step budget while B is between requests, A flooding (default: the engine's)",
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    p.add_argument(
        "--kv-mb",
        type=int,
        default=None,
        help="KV cache budget in MiB (default: the server's, from this machine's memory)",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--phases",
        default="alone,a-alone,fair,fifo",
        help="comma-separated subset of alone (B alone), a-alone (A's flood alone, for "
        "A's throughput, as long as fair's flood when fair runs), fair, fifo (B under A's flood)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON line on stdout")


def _ms(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1e3, 1) if xs else None


class _Phase:
    """One phase: a fresh engine, A's flood (or not), B's requests one at a time."""

    def __init__(
        self,
        model,
        args: argparse.Namespace,
        scheduling: str,
        flood: bool,
        b_requests: int,
        seed: int,
        duration: float,
    ) -> None:
        from tinyserve.engine import LLMEngine, SamplingParams, StoppingParams

        self.args, self.flood, self.b_requests, self.duration = args, flood, b_requests, duration
        self.engine = LLMEngine(
            model,
            dataclasses.replace(
                _engine_defaults(args),
                block_size=args.block_size,
                scheduling=scheduling,
                max_waiting=max(256, args.a_streams + 16),
            ),
        )
        self.greedy = SamplingParams(temperature=0.0)
        self.stop_a = StoppingParams(max_tokens=args.a_output_tokens, ignore_eos=True)
        self.stop_b = StoppingParams(max_tokens=args.b_output_tokens, ignore_eos=True)
        self.rng = np.random.default_rng(seed)
        self.vocab = self.engine.vocab_size
        self.n = 0

    def _add(self, tenant: str, num_tokens: int, stopping, arrival: float | None = None) -> str:
        rid = f"{tenant}{self.n}"
        self.n += 1
        prompt = self.rng.integers(0, self.vocab, num_tokens).tolist()  # random: no cache hits
        self.engine.add_request(rid, prompt, self.greedy, stopping, tenant=tenant, arrival_time=arrival)
        return rid

    def run(self) -> dict:
        a, engine = self.args, self.engine
        t0 = time.monotonic()
        a_live: set[str] = set()
        b_start = t0 + (a.warmup if self.flood else 0.0)
        b_next = b_start  # B's next arrival
        b_rid: str | None = None  # B's request in flight
        b_arrival = 0.0
        b_first: dict[str, float] = {}
        ttft: list[float] = []
        ttft_steps: list[int] = []  # steps B's request waited for its first token (1 = the next)
        itl: list[float] = []  # B's inter-token latencies (end of one token's step to the next's)
        b_last = 0.0
        step_ms: list[float] = []
        steps = step_tokens = a_tokens = a_served = b_added_step = 0
        while True:
            now = time.monotonic()
            if self.flood:
                while len(a_live) < a.a_streams:
                    a_live.add(self._add("A", a.a_prompt_tokens, self.stop_a))
            b_open = len(ttft) + (b_rid is not None) < self.b_requests and now - b_start < self.duration
            if b_rid is None and not b_open and (self.b_requests or now - b_start >= self.duration):
                break  # (A alone: its flood runs for the whole duration)
            if not self.b_requests:
                b_next = math.inf
            if b_rid is None and now >= b_next:
                b_arrival = b_next
                b_rid = self._add("B", a.b_prompt_tokens, self.stop_b, arrival=b_arrival)
                b_added_step = steps
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, b_next - now))  # idle until B's next arrival
                continue
            ts = time.monotonic()
            outs = engine.step()
            end = time.monotonic()
            steps += 1
            step_ms.append((end - ts) * 1e3)
            stats = engine.stats()
            step_tokens += stats.last_prefill_tokens + stats.last_decode_tokens
            b_served = 0  # B's tokens in this step (its whole prompt counted with its first token)
            for o in outs:
                if o.request_id == b_rid:
                    b_served += len(o.new_token_ids)
                    if o.new_token_ids and b_rid in b_first:
                        itl.append(end - b_last)
                    if o.new_token_ids:
                        b_last = end
                    if o.new_token_ids and b_rid not in b_first:
                        b_first[b_rid] = end
                        ttft.append(end - b_arrival)
                        ttft_steps.append(steps - b_added_step)
                        b_served += a.b_prompt_tokens - 1
                    if o.finished:
                        b_rid = None
                        b_next = end + self.rng.uniform(0.0, a.b_think_ms / 1e3)
                elif o.request_id in a_live:
                    if now >= b_start:
                        a_tokens += len(o.new_token_ids)
                    if o.finished:
                        a_live.discard(o.request_id)
            if now >= b_start:
                a_served += stats.last_prefill_tokens + stats.last_decode_tokens - b_served
        elapsed = time.monotonic() - t0
        for rid in a_live:
            engine.abort_request(rid)
        engine.step()  # (drops them)
        return {
            "ttft": ttft,
            "ttft_steps": ttft_steps,
            "itl": itl,
            "step_ms": step_ms,
            "step_tokens": step_tokens,
            "a_tokens": a_tokens,
            "a_served": a_served,
            "preemptions": engine.num_preemptions,
            "seconds": elapsed,
            "flood_seconds": elapsed - a.warmup if self.flood else 0.0,
        }


def _engine_defaults(args: argparse.Namespace):
    """The EngineConfig the phases run with (the engine's defaults unless a flag sets one)."""
    from tinyserve.engine import EngineConfig
    from tinyserve.memory import default_kv_budget_mb

    given = {
        k: getattr(args, k)
        for k in ("max_num_seqs", "max_num_batched_tokens", "contended_step_tokens", "idle_step_tokens")
        if getattr(args, k)
    }
    given["kv_budget_bytes"] = (args.kv_mb or default_kv_budget_mb()) << 20  # the server's default
    return EngineConfig(**given)


def _summary(runs: list[dict], flood: bool) -> dict:
    """One phase's figures from its runs (the alone phase runs twice: before and after the floods,
    so a change in the machine's load during the run weighs on both sides of the ratio)."""
    ttft = [x for r in runs for x in r["ttft"]]
    step_ms = [x for r in runs for x in r["step_ms"]]
    out = {
        "b_requests": len(ttft),
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p90_ms": _ms(ttft, 90),
        "ttft_p99_ms": _ms(ttft, 99),
        "ttft_max_ms": _ms(ttft, 100),
        "ttft_steps_max": max((x for r in runs for x in r["ttft_steps"]), default=None),
        "itl_p50_ms": _ms([x for r in runs for x in r["itl"]], 50),  # B's, between its tokens
        "itl_p90_ms": _ms([x for r in runs for x in r["itl"]], 90),
        "steps": len(step_ms),
        "step_ms_p50": round(float(np.median(step_ms)), 1) if step_ms else None,
        "step_ms_p99": round(float(np.percentile(step_ms, 99)), 1) if step_ms else None,
        "tokens_per_step_mean": round(sum(r["step_tokens"] for r in runs) / max(1, len(step_ms)), 1),
        "preemptions": sum(r["preemptions"] for r in runs),
        "seconds": round(sum(r["seconds"] for r in runs), 1),
    }
    if flood:
        seconds = max(1e-9, sum(r["flood_seconds"] for r in runs))
        out["a_output_tokens_per_s"] = round(sum(r["a_tokens"] for r in runs) / seconds, 1)
        out["a_tokens_per_s"] = round(sum(r["a_served"] for r in runs) / seconds, 1)  # prompt + output
    return out


def run(args: argparse.Namespace) -> dict:
    from tinyserve import _core
    from tinyserve.models.catalog import resolve_model
    from tinyserve.models.default import default_model_path
    from tinyserve.models.loader import load_model

    phases = [p for p in args.phases.split(",") if p]
    bad = [p for p in phases if p not in ("alone", "a-alone", "fair", "fifo")]
    if bad or not phases:
        raise SystemExit(f"--phases: unknown phase {bad[0] if bad else ''!r} (use alone, a-alone, fair, fifo)")
    for name in (
        *_LOADS,
        "max_num_batched_tokens",
        "contended_step_tokens",
        "idle_step_tokens",
        "max_num_seqs",
        "kv_mb",
        "block_size",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("b_think_ms", "duration", "warmup"):
        if not getattr(args, name) >= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_num_batched_tokens and args.max_num_batched_tokens < args.b_prompt_tokens:
        print(
            f"note: B's prompt ({args.b_prompt_tokens}) is larger than the per-step budget "
            f"({args.max_num_batched_tokens}): it needs several steps",
            file=sys.stderr,
        )
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    _core.set_num_threads(args.threads)  # size the compute pool before the first forward
    path = str(resolve_model(args.model)[1]) if args.model else str(default_model_path())
    model = load_model(path)
    floods = [p for p in ("fair", "fifo") if p in phases]
    plan: list[tuple[str, int]] = [(p, args.b_requests) for p in floods]
    if "a-alone" in phases:  # right after fair, over the same window (see _Phase.run's caller)
        plan.insert(1 if "fair" in phases else 0, ("a-alone", 0))
    if "alone" in phases:  # bracket the floods: half of B's requests alone before, half after
        first = (args.b_requests + 1) // 2 if floods else args.b_requests
        plan = [("alone", first), *plan] + ([("alone", args.b_requests - first)] if floods else [])
    runs: dict[str, list[dict]] = {}
    for i, (name, n) in enumerate(plan):
        if n == 0 and name != "a-alone":
            continue
        log(f"phase {name} ({n} B requests) ...")
        # A alone floods for as long as A flooded beside B in the fair phase (which ends after B's
        # requests): A's throughput is compared over the same window from the flood's start, as
        # the flood's first prompts, then its first decodes, weigh differently on each second.
        fair_s = runs["fair"][0]["flood_seconds"] if "fair" in runs else None
        raw = _Phase(
            model,
            args,
            scheduling="fifo" if name == "fifo" else "fair",
            flood=name != "alone",
            b_requests=n,
            seed=args.seed + i,
            duration=fair_s if name == "a-alone" and fair_s is not None else args.duration,
        ).run()
        if name == "a-alone":
            raw["ttft"] = raw["ttft_steps"] = raw["itl"] = []
        runs.setdefault(name, []).append(raw)
        log(f"phase {name}: {json.dumps(_summary([raw], name != 'alone'))}")
    results = {name: _summary(r, name != "alone") for name, r in runs.items()}
    out: dict = {}
    for name, res in results.items():
        if name == "a-alone":
            continue
        for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms"):
            out[f"b_{name}_{k}"] = res[k]

    def ratio(x, y):
        return round(x / y, 2) if x is not None and y else None

    p99 = {n: results[n]["ttft_p99_ms"] if n in results else None for n in ("alone", "fair", "fifo")}
    p90 = {n: results[n]["ttft_p90_ms"] if n in results else None for n in ("alone", "fair")}
    a_tps = {n: results[n].get("a_output_tokens_per_s") if n in results else None for n in ("a-alone", "fair")}
    a_work = {n: results[n].get("a_tokens_per_s") if n in results else None for n in ("a-alone", "fair")}
    out["fair_over_alone_p90"] = ratio(p90["fair"], p90["alone"])
    out["fair_over_alone_p99"] = ratio(p99["fair"], p99["alone"])
    out["fifo_over_fair_p99"] = ratio(p99["fifo"], p99["fair"])
    out["a_fair_over_a_alone_tps"] = ratio(a_tps["fair"], a_tps["a-alone"])
    out["a_fair_over_a_alone_tokens"] = ratio(a_work["fair"], a_work["a-alone"])
    out["targets"] = {
        "fair_over_alone_p90_max": 3.0,
        "fair_over_alone_p99_max": 5.0,
        "fifo_over_fair_p99_min": 10.0,
        "a_fair_over_a_alone_tokens_min": 0.85,
    }
    checks = [
        (out["fair_over_alone_p90"], lambda v: v <= 3.0),
        (out["fair_over_alone_p99"], lambda v: v <= 5.0),
        (out["fifo_over_fair_p99"], lambda v: v >= 10.0),
        (out["a_fair_over_a_alone_tokens"], lambda v: v >= 0.85),
    ]
    measured = [(v, ok) for v, ok in checks if v is not None]  # the phases run
    out["targets_met"] = bool(measured) and all(ok(v) for v, ok in measured)
    out["phases"] = results
    out["settings"] = {
        "model": path.rsplit("/", 1)[-1],
        "isa": _core.isa(),
        "threads": _core.get_num_threads(),
        **{
            k: getattr(args, k)
            for k in (
                *_LOADS,
                "b_think_ms",
                "duration",
                "warmup",
                "block_size",
                "seed",
            )
        },
        "engine": {
            k: getattr(_engine_defaults(args), k)
            for k in (
                "max_num_batched_tokens",
                "contended_step_tokens",
                "idle_step_tokens",
                "max_num_seqs",
                "kv_budget_bytes",
            )
        },
    }
    return out
