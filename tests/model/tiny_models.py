"""Tiny random llama/qwen2 GGUF files for the model tests.

`write_tiny_model(path, TinySpec(...))` writes a complete GGUF (architecture metadata as llama.cpp
writes it, a minimal gpt2 BPE tokenizer, a ChatML template, random weights) that any GGUF reader
loads. The weights are random but scaled so activations stay O(1) through the layers and the
logits are spread out (std ~2-4), so the top-1 token is usually well separated.

Shapes follow GGUF: a matrix mapping `in -> out` is stored with ne = [in, out]; the writer takes a
numpy array of shape (out, in). Norm vectors and biases are F32, as llama.cpp stores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import kquant_encode
import numpy as np

QT = gguf.GGMLQuantizationType

# Weight types the core supports first (ARCHITECTURE.md, "Engine").
WEIGHT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


@dataclasses.dataclass(frozen=True)
class TinySpec:
    arch: str = "llama"  # "llama" (adjacent-pair RoPE) or "qwen2" (NEOX RoPE, q/k/v bias)
    dim: int = 64  # hidden size (multiple of 32 so every matrix can be block-quantized)
    hidden_dim: int = 96  # FFN inner size (multiple of 32)
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # < n_heads: GQA; == n_heads: MHA
    n_vocab: int = 128
    context_length: int = 256
    rope_base: float = 10000.0
    rope_scale: float = 1.0  # != 1: writes rope.scaling.type=linear and rope.scaling.factor
    norm_eps: float = 1e-5
    wtype: str = "F32"  # type of every 2-D weight matrix except the embedding
    embd_type: str | None = None  # type of token_embd (default: wtype)
    out_type: str | None = None  # type of output.weight when untied (default: wtype)
    tied: bool = False  # no output.weight; the head reuses token_embd
    qkv_bias: bool | None = None  # default: True for qwen2, False for llama
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def has_bias(self) -> bool:
        return self.arch == "qwen2" if self.qkv_bias is None else self.qkv_bias


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (byte-level BPE alphabet): the
    printable Latin-1 bytes stand for themselves, the other 68 take U+0100 on, in byte order.
    (Written apart from the server's table in tinyserve.models.tokenizer, which the tests check.)"""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return {b: chr(b if b in printable else next(others)) for b in range(256)}


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """A minimal gpt2-style vocabulary of exactly n_vocab tokens: the special tokens first
    (ids 0, 1, 2 = endoftext/bos/eos, im_start, im_end), then single-byte tokens for space ('Ġ'),
    newline ('Ċ') and printable ASCII, then as many merges of them as fit (a vocabulary under 256
    cannot hold every byte; text outside it is not encodable). Returns (tokens, types, merges)."""
    if n_vocab < len(SPECIAL_TOKENS) + 2:
        raise ValueError(f"n_vocab {n_vocab} too small for a tokenizer")
    b2u = _bytes_to_unicode()
    tokens = list(SPECIAL_TOKENS)
    types = [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    # letters and space first so that merges of common pairs are possible in small vocabularies
    order = (
        [ord(" "), ord("\n")]
        + list(range(ord("a"), ord("z") + 1))
        + [b for b in range(0x21, 0x7F) if not chr(b).islower()]
    )
    for b in order:
        if len(tokens) == n_vocab:
            break
        tokens.append(b2u[b])
        types.append(int(gguf.TokenType.NORMAL))
    merges: list[str] = []
    candidates = [
        "Ġ t",
        "h e",
        "i n",
        "e r",
        "a n",
        "Ġ a",
        "o n",
        "r e",
        "Ġt he",
        "e n",
        "Ġ s",
        "a t",
        "o r",
        "e s",
        "Ġ w",
        "Ġ o",
        "Ġ c",
        "i t",
        "i s",
        "Ġ b",
    ]
    for m in candidates:
        if len(tokens) == n_vocab:
            break
        left, right = m.split(" ")
        if left in tokens and right in tokens and left + right not in tokens:
            tokens.append(left + right)
            types.append(int(gguf.TokenType.NORMAL))
            merges.append(m)
    while len(tokens) < n_vocab:  # pad with unused user-defined tokens
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(int(gguf.TokenType.USER_DEFINED))
    return tokens, types, merges


def _encode(arr: np.ndarray, type_name: str) -> tuple[np.ndarray, QT | None]:
    """(array to hand GGUFWriter.add_tensor, raw_dtype) for a float32 (out, in) matrix."""
    qt = QT[type_name]
    if qt == QT.F32:
        return arr.astype(np.float32), None
    if qt == QT.F16:
        return arr.astype(np.float16), None
    if type_name in kquant_encode.ENCODERS:  # types gguf dequantizes but cannot quantize
        return kquant_encode.encode(arr, type_name), qt
    return gguf.quants.quantize(arr.astype(np.float32), qt), qt


def add_hparams(w: gguf.GGUFWriter, spec) -> None:
    """The name and the hyperparameters every architecture writes, from a TinySpec or hf_arch's
    ArchSpec (the same field names): context, widths, layers, heads, RoPE base, norm epsilon and
    vocabulary size (gguf-py prefixes each key with the writer's architecture)."""
    w.add_name(f"tiny-{spec.arch}-{spec.wtype}-seed{spec.seed}")
    w.add_context_length(spec.context_length)
    w.add_embedding_length(spec.dim)
    w.add_feed_forward_length(spec.hidden_dim)
    w.add_block_count(spec.n_layers)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    w.add_vocab_size(spec.n_vocab)


def write_tiny_model(
    path: str | Path, spec: TinySpec = TinySpec(), chat_template: str | None = CHATML_TEMPLATE
) -> Path:
    """Write a random model described by `spec` to `path` and return the path (chat_template=None:
    the file carries none)."""
    path = Path(path)
    if spec.dim % spec.n_heads or spec.n_heads % spec.n_kv_heads:
        raise ValueError("dim must divide into heads and heads into kv heads")
    rng = np.random.default_rng(spec.seed)
    arch = spec.arch
    hd = spec.head_dim
    q_out, kv_out = spec.n_heads * hd, spec.n_kv_heads * hd

    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, spec)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_rope_dimension_count(hd)
    if spec.rope_scale != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope_scale)

    tokens, types, merges = tiny_vocab(spec.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    def matrix(n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
        # std 1/sqrt(in): a unit-variance input gives unit-variance outputs
        return (rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(spec.dim)).astype(np.float32)

    def add(name: str, arr: np.ndarray, type_name: str) -> None:
        data, raw = _encode(arr, type_name)
        w.add_tensor(name, data, raw_dtype=raw)

    embd = rng.standard_normal((spec.n_vocab, spec.dim)).astype(np.float32) * 0.5
    add("token_embd.weight", embd, spec.embd_type or spec.wtype)
    add("output_norm.weight", norm(), "F32")
    if not spec.tied:
        add("output.weight", matrix(spec.n_vocab, spec.dim, gain=3.0), spec.out_type or spec.wtype)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm(), "F32")
        # gain 2 on q/k: attention scores of O(1), so softmax is neither flat nor one-hot
        add(p + "attn_q.weight", matrix(q_out, spec.dim, gain=2.0), spec.wtype)
        add(p + "attn_k.weight", matrix(kv_out, spec.dim, gain=2.0), spec.wtype)
        add(p + "attn_v.weight", matrix(kv_out, spec.dim), spec.wtype)
        if spec.has_bias:
            add(p + "attn_q.bias", (0.2 * rng.standard_normal(q_out)).astype(np.float32), "F32")
            add(p + "attn_k.bias", (0.2 * rng.standard_normal(kv_out)).astype(np.float32), "F32")
            add(p + "attn_v.bias", (0.2 * rng.standard_normal(kv_out)).astype(np.float32), "F32")
        add(p + "attn_output.weight", matrix(spec.dim, q_out), spec.wtype)
        add(p + "ffn_norm.weight", norm(), "F32")
        add(p + "ffn_gate.weight", matrix(spec.hidden_dim, spec.dim), spec.wtype)
        add(p + "ffn_up.weight", matrix(spec.hidden_dim, spec.dim), spec.wtype)
        add(p + "ffn_down.weight", matrix(spec.dim, spec.hidden_dim), spec.wtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- driving tinyserve._core.Model.forward ------------------------------------------------------
def model_cache(root: Path, write: Callable[[Path, Any], Path]) -> Callable[[Any], Path]:
    """spec -> the path of `write(path, spec)` under `root`, written once per spec (the session
    fixtures of tests/model and tests/cuda, and test_arch's architectures)."""
    made: dict[Any, Path] = {}

    def get(spec) -> Path:
        if spec not in made:
            made[spec] = write(root / f"m{len(made)}.gguf", spec)
        return made[spec]

    return get


def run_greedy(engine, request_id: str, prompt: list[int], max_tokens: int) -> tuple[list[int], int | None]:
    """One greedy request (ignore_eos) stepped through `engine` until it is idle: the tokens, and
    the num_cached_tokens its outputs reported last."""
    from tinyserve.engine import SamplingParams, StoppingParams

    engine.add_request(
        request_id, prompt, SamplingParams(temperature=0.0), StoppingParams(max_tokens=max_tokens, ignore_eos=True)
    )
    toks: list[int] = []
    cached = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            toks += o.new_token_ids
            cached = o.num_cached_tokens
    return toks, cached


def i32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.int32))


def forward_batch(model, kv, seqs, logit_rows=None) -> np.ndarray:
    """seqs: list of (tokens, start_pos, block_ids). Runs ONE forward over the ragged batch and
    returns the logits of `logit_rows` (default: every row)."""
    tokens = np.concatenate([i32(t) for t, _, _ in seqs])
    width = max(len(b) for _, _, b in seqs)
    tables = np.full((len(seqs), width), -1, dtype=np.int32)
    for s, (_, _, blocks) in enumerate(seqs):
        tables[s, : len(blocks)] = blocks
    rows = np.arange(len(tokens), dtype=np.int32) if logit_rows is None else i32(logit_rows)
    return model.forward(kv, tokens, i32([len(t) for t, _, _ in seqs]), i32([p for _, p, _ in seqs]), tables, rows)


def forward_seq(model, kv, tokens, start_pos, blocks) -> np.ndarray:
    """One sequence alone; logits of every new token."""
    return forward_batch(model, kv, [(tokens, start_pos, blocks)])


def forward_chunks(model, tokens, chunks: list[int], block_size: int, kv_dtype: str) -> np.ndarray:
    """`tokens` fed as one sequence, in chunks of the given sizes (they must add up to all of it),
    through a fresh KV cache of just enough blocks: every position's logits, in order."""
    from tinyserve import _core

    assert sum(chunks) == len(tokens), (chunks, len(tokens))
    blocks = list(range(blocks_needed(len(tokens), block_size)))
    kv = _core.KVCache(model, block_size=block_size, num_blocks=len(blocks), dtype=kv_dtype)
    out, pos = [], 0
    for n in chunks:
        out.append(forward_seq(model, kv, tokens[pos : pos + n], pos, blocks))
        pos += n
    return np.concatenate(out)


def blocks_needed(n_positions: int, block_size: int) -> int:
    return -(-n_positions // block_size)


# --- one forward on a forced ISA / layout, in a child process ---------------------------------------
# The ISA is chosen once per process (TINYSERVE_ISA forces a lower one) and TINYSERVE_PACK=0 keeps
# matrices in the file's layout, so each combination runs in its own process.
_ISA_SCRIPT = """
import sys
import numpy as np
from tinyserve import _core
sys.path.insert(0, sys.argv[1])
from tiny_models import forward_seq
assert _core.isa() == sys.argv[3], (_core.isa(), sys.argv[3])
model = _core.Model(sys.argv[2])
kv = _core.KVCache(model, block_size=4, num_blocks=8, dtype=sys.argv[6])
prompt = [int(t) for t in sys.argv[5].split(",")]
np.save(sys.argv[4], np.concatenate([forward_seq(model, kv, prompt[:9], 0, [5, 0, 2, 7]),
                                     forward_seq(model, kv, prompt[9:], 9, [5, 0, 2, 7])]))
print(model.config["repacked_bytes"])
"""


def logits_on_isa(path, isa: str, pack: str, prompt, out_npy, kv_dtype: str = "f16") -> tuple[np.ndarray, int]:
    """(logits of `prompt` in two prefill chunks over scattered KV blocks (a kv_dtype cache), bytes
    repacked) with TINYSERVE_ISA=isa and TINYSERVE_PACK=pack, computed in a child process."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TINYSERVE_ISA=isa, TINYSERVE_PACK=pack)
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            _ISA_SCRIPT,
            str(Path(__file__).parent),
            str(path),
            isa,
            str(out_npy),
            ",".join(map(str, prompt)),
            kv_dtype,
        ],
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    return np.load(out_npy), int(p.stdout.split()[-1])
