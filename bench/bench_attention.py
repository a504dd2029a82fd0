"""Decode attention over a scattered paged f16 KV cache: ms per decode step of 32 sequences.

    python bench/bench_attention.py --shape gemma3 --contexts 128 256 512 --steps 8 --rounds 3

A tiny random model (written to a temporary GGUF with gguf.GGUFWriter) has the attention shape of a
real one (gemma3: Gemma 3 270M, 18 layers, head_dim 256, 4 query heads on 1 KV head; qwen2:
Qwen2.5 0.5B, 24 layers, head_dim 64, 14 query heads on 2 KV heads) and a hidden size of 64, so its
matmuls cost little and a decode step is mostly attention over the cache. Each sequence's blocks sit
at random places in the arena (a shuffled block table), as the block manager leaves them after a
while. Per context: the prompt is prefilled (untimed), then `steps` decode steps are timed; the
median over rounds is reported with every round, the KV bytes a step reads and the GB/s that makes.
`--contexts 16` gives the step's cost without much attention (the floor the other figures sit on).

    python bench/bench_attention.py --model ~/.cache/tinyserve/models/gemma-3-270m-q4_k_m.gguf \
        --contexts 128 --steps 160 --rounds 1 --contiguous

runs the same on a real model instead (every layer and the LM head; --shape ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: no BLAS threads spinning on our cores

import gguf  # noqa: E402
import numpy as np  # noqa: E402

from tinyserve import _core  # noqa: E402

SHAPES = {  # layers, query heads, KV heads, head_dim of the real models
    "gemma3": (18, 4, 1, 256),
    "qwen2": (24, 14, 2, 64),
}
DIM, VOCAB, BLOCK = 64, 64, 16


def write_model(path: Path, shape: str, context: int) -> None:
    n_layers, nh, nkv, hd = SHAPES[shape]
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"attention-bench-{shape}")
    w.add_context_length(context)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(DIM)
    w.add_block_count(n_layers)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    def add(name: str, n_out: int, n_in: int, gain: float = 1.0) -> None:
        m = (rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))).astype(np.float32)
        w.add_tensor(
            name, gguf.quants.quantize(m, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
        )

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(DIM, np.float32))

    add("token_embd.weight", VOCAB, DIM)
    norm("output_norm.weight")
    add("output.weight", VOCAB, DIM)
    for i in range(n_layers):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        add(p + "attn_q.weight", nh * hd, DIM, 2.0)
        add(p + "attn_k.weight", nkv * hd, DIM, 2.0)
        add(p + "attn_v.weight", nkv * hd, DIM)
        add(p + "attn_output.weight", DIM, nh * hd)
        norm(p + "ffn_norm.weight")
        add(p + "ffn_gate.weight", DIM, DIM)
        add(p + "ffn_up.weight", DIM, DIM)
        add(p + "ffn_down.weight", DIM, DIM)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run_context(m, n_seq: int, ctx: int, steps: int, seed: int, scattered: bool) -> float:
    vocab = m.config["n_vocab"]
    """Prefill n_seq prompts of ctx tokens, then time `steps` decode steps; ms per step."""
    per = -(-(ctx + steps) // BLOCK)
    kv = _core.KVCache(m, block_size=BLOCK, num_blocks=per * n_seq)
    rng = np.random.default_rng(seed)
    ids = rng.permutation(per * n_seq) if scattered else np.arange(per * n_seq)
    tables = ids.astype(np.int32).reshape(n_seq, per)
    toks = rng.integers(0, vocab, n_seq * ctx).astype(np.int32)
    m.forward(
        kv,
        toks,
        np.full(n_seq, ctx, np.int32),
        np.zeros(n_seq, np.int32),
        tables,
        (np.arange(n_seq) * ctx + ctx - 1).astype(np.int32),
    )
    last = rng.integers(0, vocab, n_seq).astype(np.int32)
    rows = np.arange(n_seq, dtype=np.int32)
    t = time.perf_counter()
    for i in range(steps):
        lg = m.forward(kv, last, np.ones(n_seq, np.int32), np.full(n_seq, ctx + i, np.int32), tables, rows)
        last = np.argmax(lg, axis=1).astype(np.int32)
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gemma3")
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contiguous", action="store_true", help="each sequence's blocks in order, side by side")
    ap.add_argument("--model", help="a GGUF to run instead of the tiny model of --shape")
    a = ap.parse_args()
    _core.set_num_threads(a.threads)
    if a.model:
        m = _core.Model(a.model)
        cfg = m.config
        n_layers, nh, nkv, hd = cfg["n_layers"], cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    else:
        n_layers, nh, nkv, hd = SHAPES[a.shape]
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "attn.gguf"
            write_model(path, a.shape, max(a.contexts) + a.steps)
            m = _core.Model(str(path))
    rounds: dict[int, list[float]] = {c: [] for c in a.contexts}
    for r in range(a.rounds):
        for c in a.contexts:
            rounds[c].append(round(run_context(m, a.sequences, c, a.steps, r, not a.contiguous), 3))
    out: dict = {
        "model": a.model or f"tiny, {a.shape} shape",
        "layers": n_layers,
        "query_heads": nh,
        "kv_heads": nkv,
        "head_dim": hd,
        "sequences": a.sequences,
        "steps": a.steps,
        "threads": a.threads,
        "isa": _core.isa(),
        "blocks": "contiguous" if a.contiguous else "scattered",
        "contexts": {},
    }
    for c, ms in rounds.items():
        # K and V of every attended position (the mean over the timed steps), f16
        kv_bytes = a.sequences * n_layers * nkv * hd * 2 * 2 * (c + (a.steps + 1) / 2)
        med = statistics.median(ms)
        out["contexts"][str(c)] = {
            "ms_per_step": med,
            "tok_s": round(a.sequences / med * 1e3, 1),
            "rounds": ms,
            "kv_mb_per_step": round(kv_bytes / 1e6, 1),
            "kv_gb_s": round(kv_bytes / (med * 1e-3) / 1e9, 2),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
