"""Type stub for the C++ core (csrc/bindings.cpp, csrc/bindings_kernels.cpp).

This is the contract between the C++ core and the Python package.
"""

import os
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

class GGUFError(ValueError):
    """A model file is malformed, hostile or unsupported. The message names the problem."""

class DeviceError(RuntimeError):
    """The device asked for cannot be used here (not built with CUDA, no driver, no device, no
    kernels for this GPU). The message says which."""

class Model:
    """A llama/qwen2/qwen3/gemma3/phi3 GGUF model, mmap'd (zero copy).

    Raises GGUFError (a ValueError) for any malformed or unsupported file; OSError if the file
    cannot be opened.
    """

    def __init__(self, path: str, device: str = "cpu") -> None:
        """device "cuda": the weights are uploaded to the GPU once and forward runs there
        (DeviceError when it cannot be used); "cpu": the ISA kernels."""
    path: str
    device: str  # "cpu" or "cuda"
    device_description: str  # e.g. "cpu (avx2)", "cuda:0 NVIDIA H200 (sm_90, 140 GiB)"
    # Architecture facts (docs/architectures.md): arch ("llama"|"qwen2"|"qwen3"|"gemma3"|"phi3"),
    # n_vocab, dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, context_length, rope_dim,
    # rope_base, rope_scale, rope_type ("norm"|"neox"), rope_freq_factors (bool), rope_yarn (bool),
    # rope_attn_factor, rope_base_local, norm_eps, embd_scale, attn_scale, logit_softcap,
    # sliding_window (0: none), sliding_layers (list[bool] per layer), ffn_act ("silu"|"gelu_tanh"),
    # tied_output, qkv_bias, qk_norm, post_norms, fused_qkv, fused_gate_up (bools), file_size,
    # weight_bytes, repacked_bytes.
    config: dict[str, Any]
    def metadata(self) -> dict[str, Any]:
        """All GGUF metadata. Arrays become lists; strings that are not UTF-8 become bytes."""
    def tensors(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, type name, shape in ggml order) for every tensor."""
    def forward(
        self,
        kv: KVCache,
        tokens: npt.NDArray[np.int32],  # [T] new tokens of all sequences, concatenated
        seq_lens: npt.NDArray[np.int32],  # [S] how many of `tokens` belong to each sequence
        start_pos: npt.NDArray[np.int32],  # [S] position of each sequence's first new token
        block_tables: npt.NDArray[np.int32],  # [S, B] KV block ids per sequence; -1 pads
        logit_rows: npt.NDArray[np.int32],  # [R] rows of `tokens` (0..T-1) that need logits
        out: npt.NDArray[np.float32] | None = None,  # [R, n_vocab] C-contiguous buffer to write into
    ) -> npt.NDArray[np.float32]:  # [R, n_vocab] (`out` itself when given)
        """One forward over a ragged batch. The GIL is released for the whole call.

        Sequence s attends to its positions [0, start_pos[s] + seq_lens[s]); the keys/values of
        [0, start_pos[s]) must already be in its blocks (written by earlier calls). Block
        block_tables[s][p // block_size] holds position p. Raises ValueError for bad shapes,
        token ids out of range, positions past the context, or too few / invalid blocks.
        """
    def embed(self, tokens: npt.NDArray[np.int32]) -> npt.NDArray[np.float32]:
        """Token embedding rows [T, dim] (dequantized)."""

class KVCache:
    """Paged KV cache: `num_blocks` blocks of `block_size` positions from one arena.

    Blocks are handed out and returned by the caller (the Python block manager); the cache only
    stores. Size it by `budget_bytes` (the number of blocks that fit) or `num_blocks`.
    """

    def __init__(
        self, model: Model, block_size: int = 16, budget_bytes: int = 0, num_blocks: int = 0, dtype: str = "f16"
    ) -> None: ...
    num_blocks: int
    block_size: int
    bytes_per_block: int
    total_bytes: int
    dtype: str
    device: str  # the model's device: a CUDA model's cache is GPU memory (f16 only)
    def copy_block(self, src: int, dst: int) -> None: ...
    @staticmethod
    def block_bytes(n_layers: int, n_kv_heads: int, head_dim: int, block_size: int, dtype: str) -> int:
        """The bytes one block takes for a model of this shape and a KV dtype."""

def read_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's header: version, alignment, data_offset, metadata (dict), tensors (list).
    Raises GGUFError naming the file and the problem."""

def set_num_threads(n: int) -> None:
    """Size of the compute pool (0 = all cores)."""

def get_num_threads() -> int: ...
def cuda_compiled() -> bool:
    """Was this extension built with TINYSERVE_CUDA."""

def cuda_status() -> str:
    """ "" when a usable CUDA device is there, else why not (one line)."""

def cuda_device() -> str:
    """The CUDA device Model(path, device="cuda") would use ("" if none)."""

def isa() -> str:
    """Kernel path in use: 'scalar', 'avx2', 'avx512' or 'neon' (TINYSERVE_ISA forces a lower one)."""

def available_isas() -> list[str]: ...
def gemv_prefetch() -> bool:
    """Do the x16 GEMV tiles prefetch their weights? TINYSERVE_GEMV_PREFETCH=1|0, else Intel CPUs only."""

def sample_batch(
    logits: npt.NDArray[np.float32],
    temperature: npt.NDArray[np.float64],
    top_k: npt.NDArray[np.int32],
    top_p: npt.NDArray[np.float64],
    min_p: npt.NDArray[np.float64],
    u: npt.NDArray[np.float64],
) -> npt.NDArray[np.int32]:
    """One token per row of logits [rows, vocab]: greedy at temperature 0, else top-k, softmax,
    top-p, min-p and the inverse CDF at u (tinyserve.engine.sampling's semantics). ValueError
    for shapes or values out of range."""

def cpu_features() -> dict[str, bool]: ...

class kernels:  # submodule, for tests and micro-benchmarks
    @staticmethod
    def type_names() -> list[str]: ...
    @staticmethod
    def block_size(type: str) -> int: ...
    @staticmethod
    def vec_dot_type(type: str) -> str: ...
    @staticmethod
    def quantize(type: str, x: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
        """Reference quantization of rows: x [m, n] -> bytes [m, row_bytes]."""
    @staticmethod
    def dequantize(type: str, q: npt.NDArray[np.uint8], n: int) -> npt.NDArray[np.float32]:
        """Reference dequantization of rows: [m, row_bytes] -> [m, n]."""
    @staticmethod
    def matmul(
        type: str, w: npt.NDArray[np.uint8], x: npt.NDArray[np.float32], n: int, isa: str = "", use_gemm: bool = True
    ) -> npt.NDArray[np.float32]:
        """y[c, r] = dot(W row r, x row c) with x quantized to the type's activation type.

        w: [rows, row_bytes] of `type`; x: [m, n]; isa "" = active. use_gemm=False uses vec_dot
        for every pair (for bit-exactness checks against the tiled path).
        """
    @staticmethod
    def type_size(type: str) -> int:
        """Bytes per block."""
    @staticmethod
    def read_bandwidth(buf: npt.NDArray[np.uint8], reps: int = 5) -> tuple[float, int]:
        """(GB/s, checksum): the compute pool reads buf's whole 64-bit words once per rep (best rep)."""
    @staticmethod
    def pool_counts(n_tasks: int, regions: int = 1) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """(runs per task, tasks per pool thread) of `regions` parallel_for(n_tasks) regions (tests)."""
    @staticmethod
    def from_float(type: str, x: npt.NDArray[np.float32], isa: str = "") -> npt.NDArray[np.uint8]:
        """Quantize rows with one ISA's from_float (activation quantization)."""
    @staticmethod
    def time_matmul(
        type: str,
        w: npt.NDArray[np.uint8],
        x: npt.NDArray[np.float32],
        n: int,
        rows: int,
        isa: str = "",
        use_gemm: bool = True,
        iters: int = 10,
        chunk: int = 0,
    ) -> tuple[float, float]:
        """(wall seconds, thread CPU seconds) per matmul, for bench/bench_kernels.py."""
    @staticmethod
    def ops(name: str, isa: str, *args: Any) -> Any:
        """Run one OpsKernels entry on numpy arrays (tests)."""
    @staticmethod
    def kv8_layout(hd: int, bs: int) -> dict[str, int]:
        """Sizes and offsets of the q8_0 KV layout (csrc/kernels/kernels.h)."""
    @staticmethod
    def kv8_run(kv: int, x: npt.NDArray[np.float32], bs: int, isa: str = "scalar") -> npt.NDArray[np.uint8]:
        """A K (kv=0) or V (kv=1) run with rows x[m, hd] in slots 0..m-1, by `isa`'s kv8_store
        ("scalar": the reference, "": the active ISA)."""
    @staticmethod
    def kv8_values(kv: int, run: npt.NDArray[np.uint8], hd: int, bs: int, m: int) -> npt.NDArray[np.float32]:
        """The values (scale * q) a run holds for slots 0..m-1: [m, hd]."""
    @staticmethod
    def kv8_query(x: npt.NDArray[np.float32], hd: int, isa: str = "scalar") -> npt.NDArray[np.uint8]:
        """Query records of consecutive heads of hd floats, by `isa`'s kv8_quantize_query."""
