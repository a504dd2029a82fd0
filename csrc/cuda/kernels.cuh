// kernels.cuh — the CUDA kernels of one layer step, as launchers on a stream (kernels.cu). Each
// mirrors the CPU scalar reference (csrc/kernels/ref.cpp, csrc/quant.cpp, csrc/model.cpp): the
// same block layouts, the same activation quantization, the same exact integer sums per block;
// only the order in which float partial sums are added differs (a warp's tree), so results
// agree with the CPU within a rounding tolerance, not bit for bit.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "quant.h"

namespace ts::cuda {

// Quantized activations on the device, struct-of-arrays (aligned for 4-byte int8 loads):
//   q      [m][n] int8 quants
//   d      Q8_0/Q8_1: [m][n/32] block scales (the fp16-rounded value, as float); Q8_K: [m][n/256]
//   s      Q8_1: [m][n/32] d * sum(q) (fp16-rounded, as float)
//   bsums  Q8_K: [m][n/16] sums of each 16 quants
// F32 activations use x itself.
struct Acts {
    DType type = DType::F32;
    const float* x = nullptr;  // F32
    const int8_t* q = nullptr;
    const float* d = nullptr;
    const float* s = nullptr;
    const int* bsums = nullptr;
    int m = 0, n = 0;
};

// The activation type a weight type's dot product wants (as the CPU tables name it).
DType act_type(DType w);
// Can the CUDA matmul compute with weights of this type.
bool matmul_supported(DType w);

// Quantize X [m][n] to `type` into the buffers of `out` (which the caller sized), on `st`.
void quantize_acts(DType type, const float* X, int m, int n, int8_t* q, float* d, float* s, int* bsums,
                   cudaStream_t st);

// Y[c * ldy + r] = dot(W row r, activation row c) for r < rows, c < a.m. W: rows of row_bytes in
// the file's layout. Each element is computed the same way whatever a.m is (batch invariance).
void matmul(DType wtype, const uint8_t* W, size_t row_bytes, int rows, const Acts& a, float* Y, size_t ldy,
            cudaStream_t st);

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, m rows of n (y may be x)
void rmsnorm(const float* x, const float* w, float eps, int m, int n, float* y, cudaStream_t st);
// x[r][i] += b[i]
void add_bias(float* x, const float* b, int m, int n, cudaStream_t st);
// x[i] += y[i]
void add(float* x, const float* y, size_t n, cudaStream_t st);
// x[i] *= a
void scale(float* x, float a, size_t n, cudaStream_t st);
// x[i] = cap * tanh(x[i] / cap)
void softcap(float* x, float cap, size_t n, cudaStream_t st);
// g = silu(g) * u (gelu: gelu_tanh(g) * u), n elements
void glu(bool gelu, float* g, const float* u, size_t n, cudaStream_t st);
// Rotate the first rope_dim dims of each of n_heads heads (stride hd) of T rows (row stride ld)
// with the table's cos/sin [T][rope_dim / 2].
void rope(float* x, int T, int n_heads, int hd, size_t ld, int rope_dim, bool neox, const float* cos, const float* sin,
          cudaStream_t st);
// dst[i] = src[rows[i]] for R rows of n
void gather_rows(const float* src, const int* rows, int R, int n, float* dst, cudaStream_t st);

// The paged f16 KV cache (KVCache's layout: block = [layer][k|v][kv head][slot][head_dim]).
struct KVLayout {
    uint8_t* arena;
    size_t bytes_per_block;
    int block_size, n_kv_heads, head_dim;
};
// Store row t's k and v (all KV heads) at slot row_slot[t] of block row_block[t], as f16.
void store_kv(const KVLayout& kv, int layer, const float* k, const float* v, int T, const int* row_block,
              const int* row_slot, cudaStream_t st);
// Causal attention of every row over its sequence's cache: positions
// [max(0, pos + 1 - window), pos] (window 0: all), block b of row t at blocks[row_bt[t] + b].
// q [T][n_heads * hd] -> out [T][n_heads * hd]. hd <= kMaxHeadDim.
constexpr int kMaxHeadDim = 256;
void attention(const KVLayout& kv, int layer, const float* q, int T, int n_heads, float scale, int window,
               const int* row_pos, const int* row_bt, const int* blocks, float* out, cudaStream_t st);

}  // namespace ts::cuda
