"""Writes the seed corpora of the fuzz harnesses: small valid GGUF files, made here from the test
helpers every time (nothing binary is committed).

    python tests/fuzz/make_seeds.py OUT      # OUT/gguf, OUT/model, OUT/tokenizer

- model:     a tiny random model of every architecture the loader knows (llama with Llama 3 and
             YaRN rope scaling, qwen2 with q/k/v biases, qwen3, gemma3 with sliding-window and
             global layers, phi3 with fused matrices, a sliding window and LongRoPE), tied and
             untied heads, and every weight type the kernels compute with: F32, F16, BF16, Q8_0,
             Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K, IQ4_XS (the 256-block types on
             256-wide rows, with Q8_0 where a row is not a multiple of 256, as llama.cpp's quantizer
             falls back), one mix like a small Q4_K_M file, and two whose activations turn NaN/Inf.
- gguf:      every metadata value type, nested arrays, a custom alignment, 1-4-D tensors, the
             tokenizer-only files, a small model, and a model's header cut off before its data.
- tokenizer: tokenizer-only files: SentencePiece ("llama", scores, byte fallback) with and without
             the space prefix and BOS, and byte-level BPE ("gpt2") under several pre-tokenizers.

`SEED_MODELS` is also what tests/fuzz/test_seeds.py checks: every model seed loads and runs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "model"))  # the model tests' writers (tests have no packages)

import gguf  # noqa: E402
import gguf_craft  # noqa: E402
import kquant_encode  # noqa: E402
import numpy as np  # noqa: E402
import tiny_tokenizer_gguf as ttg  # noqa: E402
from hf_arch import ArchSpec, make_weights, write_gguf  # noqa: E402
from tiny_models import TinySpec, tiny_vocab, write_tiny_model  # noqa: E402

QT = gguf.GGMLQuantizationType
GVT = gguf.GGUFValueType

# the weight types the loader accepts for matrices (README, "Weight types")
WEIGHT_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "IQ4_NL",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_XS",
)
ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


def _encode(arr: np.ndarray, type_name: str) -> tuple[np.ndarray, QT | None]:
    """(data, raw_dtype) for GGUFWriter.add_tensor of a float32 (out, in) matrix."""
    if type_name == "F32":
        return arr.astype(np.float32), None
    if type_name == "F16":
        return arr.astype(np.float16), None
    if type_name in kquant_encode.ENCODERS:  # types the gguf package cannot quantize
        return kquant_encode.encode(arr, type_name), QT[type_name]
    return gguf.quants.quantize(arr.astype(np.float32), QT[type_name]), QT[type_name]


def retype(src: Path, dst: Path, type_for: Callable[[str, int], str]) -> Path:
    """Copy an F32 GGUF, re-encoding every 2-D tensor to type_for(name, row_length); 1-D tensors
    (norms, biases, rope factors) stay F32 as llama.cpp stores them."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        w.add_key_value(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == GVT.ARRAY else None)
    for t in r.tensors:
        arr = np.asarray(t.data, dtype=np.float32)
        if arr.ndim == 2:
            data, raw = _encode(arr, type_for(t.name, arr.shape[1]))
            w.add_tensor(t.name, data, raw_dtype=raw)
        else:
            w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def every(type_name: str) -> Callable[[str, int], str]:
    """type_name for every matrix whose rows hold whole blocks of it, else Q8_0 (else F16)."""
    block = gguf.GGML_QUANT_SIZES[QT[type_name]][0]

    def pick(name: str, n: int) -> str:
        if n % block == 0:
            return type_name
        return "Q8_0" if n % 32 == 0 else "F16"

    return pick


def q4_k_m_like(name: str, n: int) -> str:
    """A small Q4_K_M file's mix: Q6_K embedding and v/down projections, Q4_K elsewhere, Q5_0 and
    Q8_0 where rows are not whole super-blocks."""
    if n % 256:
        return "Q8_0" if "ffn_down" in name or "attn_v" in name else "Q5_0"
    return "Q6_K" if any(s in name for s in ("token_embd", "attn_v", "ffn_down")) else "Q4_K"


def _hf(spec: ArchSpec, type_for: Callable[[str, int], str] | None = None) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        if type_for is None:
            return write_gguf(path, spec, make_weights(spec))
        tmp = path.with_suffix(".f32.tmp")
        write_gguf(tmp, spec, make_weights(spec))
        try:
            return retype(tmp, path, type_for)
        finally:
            tmp.unlink()

    return make


def _nonfinite(spec: ArchSpec, type_for: Callable[[str, int], str]) -> Callable[[Path], Path]:
    """A model whose first RMSNorm weight holds NaN and +-Inf: the activations of every matmul after
    it are non-finite (what the harness must survive; found the undefined conversion in the scalar
    activation quantizers, docs/fuzzing.md)."""

    def make(path: Path) -> Path:
        w = make_weights(spec)
        w["model.layers.0.input_layernorm.weight"][:3] = [np.nan, np.inf, -np.inf]
        tmp = path.with_suffix(".f32.tmp")
        write_gguf(tmp, spec, w)
        try:
            return retype(tmp, path, type_for)
        finally:
            tmp.unlink()

    return make


def _tiny(spec: TinySpec) -> Callable[[Path], Path]:
    return lambda path: write_tiny_model(path, spec)


# Small shapes: legacy types on 64-wide rows; the 256-block types on 256-wide rows, one layer.
_S = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, n_vocab=32, context_length=64)
_K = dict(dim=256, hidden_dim=256, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=64, n_vocab=16, context_length=64)
_KT = dict(dim=256, hidden_dim=256, n_layers=1, n_heads=2, n_kv_heads=1, n_vocab=16, context_length=64)

SEED_MODELS: dict[str, Callable[[Path], Path]] = {
    # architectures (and their RoPE variants)
    "llama-f32": _hf(ArchSpec("llama", **{**_S, "dim": 32, "hidden_dim": 64, "n_heads": 2, "n_kv_heads": 1}, seed=1)),
    "llama3-rope-freqs-q8_0": _hf(
        ArchSpec("llama", **_S, rope_scaling=("llama3", 8.0, 1.0, 4.0, 32), seed=2), every("Q8_0")
    ),
    "llama-yarn-tied-f16": _hf(
        ArchSpec("llama", **_S, rope_scaling=("yarn", 4.0, 32), tied=True, seed=3), every("F16")
    ),
    "llama-linear-q4_0": _hf(ArchSpec("llama", **_S, rope_scaling=("linear", 2.0), seed=4), every("Q4_0")),
    "qwen2-bias-q4_1": _tiny(TinySpec("qwen2", **_S, wtype="Q4_1", seed=5)),
    "qwen2-bias-tied-bf16": _tiny(TinySpec("qwen2", **_S, wtype="BF16", tied=True, seed=6)),
    "qwen3-headdim24-q5_0": _hf(ArchSpec("qwen3", **_S, head_dim=24, seed=7), every("Q5_0")),
    "gemma3-sliding-q5_1": _hf(ArchSpec("gemma3", **{**_S, "n_layers": 7}, sliding_window=3, seed=8), every("Q5_1")),
    "gemma3-tied-iq4_nl": _hf(ArchSpec("gemma3", **_S, tied=True, seed=9), every("IQ4_NL")),
    "phi3-fused-sliding-q8_0": _hf(ArchSpec("phi3", **_S, rope_dim=8, sliding_window=3, seed=10), every("Q8_0")),
    "phi3-longrope-f16": _hf(ArchSpec("phi3", **_S, rope_scaling=("longrope", 32), seed=11), every("F16")),
    # the 256-block types, one architecture each (and qwen2 through the other writer)
    "llama-q4_k": _hf(ArchSpec("llama", **_K, seed=12), every("Q4_K")),
    "qwen3-q5_k": _hf(ArchSpec("qwen3", **_K, seed=13), every("Q5_K")),
    "gemma3-q6_k": _hf(ArchSpec("gemma3", **_K, sliding_window=2, seed=14), every("Q6_K")),
    "phi3-iq4_xs": _hf(ArchSpec("phi3", **_KT, seed=15), every("IQ4_XS")),
    "llama-q4_k_m-mix": _hf(ArchSpec("llama", **_K, seed=16), q4_k_m_like),
    # non-finite activations into every quantized matmul (Q8_0, and Q8_K for the 256-block types)
    "llama-nonfinite-q8_0": _nonfinite(ArchSpec("llama", **_S, seed=18), every("Q8_0")),
    "qwen3-nonfinite-q4_k": _nonfinite(ArchSpec("qwen3", **_K, seed=19), every("Q4_K")),
    "qwen2-q4_k-tied": _tiny(
        TinySpec(
            "qwen2",
            dim=256,
            hidden_dim=256,
            n_layers=1,
            n_heads=4,
            n_kv_heads=2,
            n_vocab=16,
            context_length=64,
            wtype="Q4_K",
            tied=True,
            seed=17,
        )
    ),
}


def _every_value_type(path: Path) -> Path:
    """gguf-py writes every scalar and array type, a custom alignment and tensors of 1-4 dims."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    gguf_craft.add_every_integer(w)
    w.add_float32("t.f32", float("nan"))
    w.add_float64("t.f64", float("-inf"))
    w.add_bool("t.bool", True)
    w.add_string("t.str", "ChatML {{ x }} \u2713")
    w.add_array("t.strs", ["<s>", "", "\u0120hello"])
    w.add_array("t.ints", [3, -1, 2**20])
    w.add_array("t.floats", [0.5, -2.0])
    w.add_array("t.bools", [True, False])
    w.add_tensor("f32.4d", rng.standard_normal((2, 1, 3, 4)).astype(np.float32))
    w.add_tensor("f16.1d", rng.standard_normal(8).astype(np.float16))
    for name in ("Q8_0", "Q4_K", "IQ4_XS"):
        data, raw = _encode(rng.standard_normal((2, 256)).astype(np.float32), name)
        w.add_tensor(name.lower(), data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bpe_tokenizer(path: Path, pre: str, n_vocab: int = 128) -> Path:
    tokens, types, merges = tiny_vocab(n_vocab)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SEED_TOKENIZERS: dict[str, Callable[[Path], Path]] = {
    "spm": lambda p: ttg.write_spm_tokenizer_gguf(p),
    "spm-no-prefix-bos": lambda p: ttg.write_spm_tokenizer_gguf(p, add_space_prefix=False, add_bos=True),
    "bpe-gpt2": lambda p: ttg.write_bpe_tokenizer_gguf(p),
    "bpe-no-pre": lambda p: ttg.write_bpe_tokenizer_gguf(p, pre=None),
    "bpe-smollm": lambda p: _bpe_tokenizer(p, "smollm"),
    "bpe-llama3": lambda p: _bpe_tokenizer(p, "llama3"),
    "bpe-qwen2": lambda p: _bpe_tokenizer(p, "qwen2"),
}


def write_seeds(out: Path) -> dict[str, list[Path]]:
    """Writes all three corpora under `out`; returns {corpus: [files]}."""
    dirs = {name: out / name for name in ("gguf", "model", "tokenizer")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[Path]] = {name: [] for name in dirs}
    for name, make in SEED_MODELS.items():
        made["model"].append(make(dirs["model"] / f"{name}.gguf"))
    for name, make in SEED_TOKENIZERS.items():
        made["tokenizer"].append(make(dirs["tokenizer"] / f"{name}.gguf"))

    g = dirs["gguf"]
    (g / "craft-small-valid.gguf").write_bytes(gguf_craft.small_valid())
    made["gguf"].append(g / "craft-small-valid.gguf")
    made["gguf"].append(_every_value_type(g / "every-value-type.gguf"))
    for src in made["tokenizer"][:3]:
        made["gguf"].append(_copy(src, g / f"tokenizer-{src.name}"))
    small = dirs["model"] / "phi3-fused-sliding-q8_0.gguf"
    made["gguf"].append(_copy(small, g / f"model-{small.name}"))
    head = g / "model-header-only.gguf"  # every tensor info, no data: the reader's longest path
    head.write_bytes(small.read_bytes()[: gguf.GGUFReader(str(small)).data_offset])
    made["gguf"].append(head)
    return made


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    made = write_seeds(Path(argv[1]))
    for name, files in made.items():
        size = sum(f.stat().st_size for f in files)
        print(
            f"{name}: {len(files)} seeds, {size / 1024:.0f} KiB, largest {max(f.stat().st_size for f in files)} bytes"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
