// kernels.h — the kernel tables. One table per weight type names its activation type and its
// kernels; one table per ISA, filled once at start-up (dispatch.cpp). Intrinsics never leave the
// ISA files (ref.cpp, x86_avx2.cpp, x86_avx512.cpp, arm_neon.cpp).
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include "quant.h"

namespace ts {

enum class Isa : int { Scalar = 0, AVX2 = 1, AVX512 = 2, NEON = 3 };
const char* isa_name(Isa isa);

// s = dot(w[0..n), a[0..n)); w is one weight row of the table's type, a one activation row of
// its vec_dot_type. n is a multiple of the block size.
using vec_dot_fn = void (*)(int n, float* s, const void* w, const void* a);

// Tile product: for weight rows r in [0, nr) and activation rows c in [0, nc):
//   out[c * ldo + r] = dot(w + r * w_stride, a + c * a_stride)
// Must give results bit-identical to vec_dot for every (r, c): batch invariance depends on it.
using gemm_fn = void (*)(int n, int nr, int nc, const void* w, size_t w_stride, const void* a, size_t a_stride,
                         float* out, size_t ldo);

using quantize_row_fn = void (*)(const float* x, void* y, int64_t n);
using dequantize_row_fn = void (*)(const void* x, float* y, int64_t n);

struct TypeKernels {
    DType type;
    DType vec_dot_type;          // activation type the dot product wants (F32, Q8_0 or Q8_1)
    quantize_row_fn from_float;  // quantize a row to `type` (used to quantize activations)
    dequantize_row_fn to_float;  // dequantize a row of `type`
    vec_dot_fn vec_dot;
    gemm_fn gemm;  // may be null: callers fall back to vec_dot
    // Optional: the same product over weights in the x16 packed layout (quant.h). w points at a
    // group of 16 rows, w_stride is the bytes of one group (16 * row_bytes), nr is a multiple of
    // 16. Each (row, activation row) result is bit-identical whatever nr, nc and the tiling, but
    // not to vec_dot/gemm on the unpacked layout: a model uses one or the other for a tensor.
    gemm_fn gemm_x16 = nullptr;
};

// ---- the int8 KV cache (q8_0) -------------------------------------------------------------------
// K and V of one position and KV head are int8 with one fp16 scale per group of 32 elements (the
// last group of a head may be shorter), rounded as Q8_0 is: d = max|x| / 127, q = round(x / d).
// One block's run of bs positions for one (layer, k|v, KV head), every part padded to 64 bytes:
//   K: ceil(bs / 16) tiles of 16 positions. A tile is ceil(hd / 4) chunks of 64 bytes, chunk c
//      holding elements 4c..4c+3 of its 16 positions (position p at bytes 4p..4p+3, zero past hd),
//      then the scales as fp16 [group][16 positions]. So one 64-byte load feeds the dot products
//      of 16 positions at once (vpdpbusd / pmaddubsw / sdot by lane), with no horizontal sums.
//   V: bs rows of hd int8, padded to 64 bytes, then the scales as fp16 [position][group].
// The forward stores K and V rotated by the orthonormal 64 x 64 Walsh-Hadamard matrix when head_dim
// is a multiple of 64, and rotates the query the same way (model.cpp, hadamard64): the kernels
// here see only vectors. A query head is quantized once per row to a record (query_bytes()):
// int8 q, per 32 elements with a float scale (d = max|x| / 127, q = round(x / d)), zero-padded to
// whole chunks; then the scales (float [groups]); then the sum of each group's q (int32 [groups]).
constexpr int kKV8Group = 32;  // elements per scale
constexpr int kKV8Tile = 16;   // K positions per tile

struct KV8Layout {
    int hd, bs;
    static size_t pad64(size_t n) { return (n + 63) / 64 * 64; }
    int groups() const { return (hd + kKV8Group - 1) / kKV8Group; }
    int chunks() const { return (hd + 3) / 4; }
    size_t k_scales_offset() const { return (size_t)chunks() * 64; }  // within a tile
    size_t k_tile_bytes() const { return pad64(k_scales_offset() + (size_t)groups() * kKV8Tile * 2); }
    size_t k_run_bytes() const { return (size_t)(bs + kKV8Tile - 1) / kKV8Tile * k_tile_bytes(); }
    size_t v_scales_offset() const { return pad64((size_t)bs * hd); }
    size_t v_run_bytes() const { return pad64(v_scales_offset() + (size_t)bs * groups() * 2); }
    size_t query_bytes() const { return (size_t)chunks() * 4 + (size_t)groups() * 8; }
};

// Write one position's K (kv = 0) or V (kv = 1) of one KV head into its slot of a run (scalar: the
// format's one definition, shared by every ISA).
void kv8_store(const KV8Layout& L, int kv, int slot, const float* x, uint8_t* run);
// Quantize one query head of hd floats into a record of L.query_bytes() bytes.
void kv8_quantize_query(const KV8Layout& L, const float* x, uint8_t* rec);
// The value the cache holds for element i of position `slot` of a K (kv = 0) or V run (tests).
float kv8_load(const KV8Layout& L, int kv, int slot, int i, const uint8_t* run);

// Non-matmul hot loops of the layer, per ISA.
struct OpsKernels {
    float (*dot_f16_f32)(int n, const f16_t* x, const float* y);  // attention q.k
    void (*axpy_f16)(int n, float a, const f16_t* x, float* y);   // y += a * x (attention v)
    void (*f32_to_f16)(const float* x, f16_t* y, int n);          // KV cache store
    float (*dot_f32)(int n, const float* x, const float* y);
    void (*rmsnorm)(int n, const float* x, const float* w, float eps, float* y);
    void (*swiglu)(int n, const float* gate, const float* up, float* y);  // y = silu(g) * u

    // Attention over one block of the paged f16 KV cache, for nq query heads that share one KV
    // head (GQA). Strides are in elements. An ISA may leave these null: callers then use the
    // scalar table's.
    //   scores[h * ld + j] = scale * dot(q + h * hd, k + j * k_stride)     h < nq, j < n
    // Each score is computed the same way whatever n and nq are (batch invariance).
    void (*attn_scores_f16)(int hd, int nq, const float* q, const f16_t* k, size_t k_stride, int n, float scale,
                            float* scores, size_t ld);
    //   out[h * hd + d] += sum_j p[h * ld + j] * v[j * v_stride + d]       h < nq, j < n
    // Positions are added strictly in order j = 0..n-1, one multiply-add per element, so
    // splitting a range of positions over consecutive calls gives the same bits.
    void (*attn_accum_f16)(int hd, int nq, const float* p, size_t ld, const f16_t* v, size_t v_stride, int n,
                           float* out);
    // In place: x[i] = exp(x[i] - max(x)) / sum_j exp(x[j] - max(x)), a function of the row alone
    // (n and values; never of where the row sits in a batch). May be null on an ISA: callers then
    // use the scalar table's.
    void (*softmax)(int n, float* x);
    // y = gelu_tanh(g) * u, gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) (GeGLU,
    // gemma3). y may be g. May be null on an ISA: callers then use the scalar table's.
    void (*geglu_tanh)(int n, const float* gate, const float* up, float* y);

    // Attention over one block of the int8 KV cache (layout above), positions [j0, j0 + n) of a
    // run, for nq query heads that share one KV head; q holds nq query records back to back. Every
    // ISA gives the scalar reference's bits exactly (integer sums are exact; the float steps are
    // the same operations in the same order), so a result never depends on the ISA, n, j0 or nq.
    //   isum_g = sum over group g of q[i] * k[j][i] (int32, exact)
    //   s = 0; for each group g in order: s = fma(float(isum_g), d_q[g] * d_k[j][g], s)
    //   scores[h * ld + j - j0] = s * scale
    void (*attn_scores_q8)(const KV8Layout& L, int nq, const uint8_t* q, const uint8_t* k_run, int j0, int n,
                           float scale, float* scores, size_t ld);
    //   for j = j0 .. j0 + n - 1 in order, for each element i (group g):
    //     out[h * hd + i] = fma(p[h * ld + j - j0] * d_v[j][g], float(v[j][i]), out[h * hd + i])
    // so splitting a range of positions over consecutive calls gives the same bits.
    void (*attn_accum_q8)(const KV8Layout& L, int nq, const float* p, size_t ld, const uint8_t* v_run, int j0, int n,
                          float* out);
    // kv8_store and kv8_quantize_query (above) per ISA: every ISA writes the scalar functions'
    // bytes exactly (the same amax, d and id in float, roundf's ties away from zero, a NaN or a
    // value outside [-128, 127] stored as 0). May be null on an ISA: callers then use the scalar
    // table's (which holds the two functions above).
    void (*kv8_store)(const KV8Layout& L, int kv, int slot, const float* x, uint8_t* run);
    void (*kv8_quantize_query)(const KV8Layout& L, const float* x, uint8_t* rec);
    // attn_scores_f16 for nr rows at once (prefill: consecutive rows of one sequence against the
    // same K block), each K chunk widened once for every row and head:
    //   scores[r * ldr + h * ld + j] = scale * dot(q + r * q_stride + h * hd, k + j * k_stride)
    // for r < nr, h < nq, j < n, with the very bits attn_scores_f16 gives row by row on the same
    // ISA. May be null (callers then run attn_scores_f16 per row); nr * nq <= 16.
    void (*attn_scores_f16_rows)(int hd, int nr, int nq, const float* q, size_t q_stride, const f16_t* k,
                                 size_t k_stride, int n, float scale, float* scores, size_t ldr, size_t ld);
};

struct IsaTable {
    Isa isa;
    const TypeKernels* types[kMaxDTypeId];  // null where the type is unsupported on this ISA
    OpsKernels ops;
};

// Per-ISA table constructors; each lives in its own ISA file. Return nullptr when not compiled in.
const IsaTable* isa_table_scalar();
const IsaTable* isa_table_avx2();
const IsaTable* isa_table_avx512();
const IsaTable* isa_table_neon();

// One type's kernels on an ISA; null members keep the scalar table's.
struct TypeEntry {
    DType type;
    quantize_row_fn from_float = nullptr;
    vec_dot_fn vec_dot = nullptr;
    gemm_fn gemm = nullptr;
    gemm_fn gemm_x16 = nullptr;
};

// An ISA's table: the scalar table with each entry's non-null kernels in place of the scalar ones
// (kept in `store`, the ISA file's own array of kMaxDTypeId entries), and `ops` (null members: the
// scalar ones). Every ISA file builds its table with this; it lives in dispatch.cpp, compiled with
// baseline flags.
IsaTable make_isa_table(Isa isa, TypeKernels* store, std::initializer_list<TypeEntry> entries, OpsKernels ops);

// CPU feature detection and the active table.
struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
    bool avx512vnni = false, avx512bf16 = false;
    bool neon = false, neon_dotprod = false;
    bool intel = false;  // cpuid's vendor is GenuineIntel
};
const CpuFeatures& cpu_features();
// Whether the x16 GEMV tiles (too few activation rows to stream their own weights) prefetch their
// weights gemv_ahead<kBB>() on (driver.h). Read once: TINYSERVE_GEMV_PREFETCH=1|0, else on for
// Intel CPUs only (a Xeon's one-sequence decode gained 10-25% from it, a Zen 4's lost 0-10%).
extern const bool g_gemv_prefetch;  // set when the library loads
inline bool gemv_prefetch() { return g_gemv_prefetch; }
bool isa_available(Isa isa);  // compiled in AND supported by this CPU
Isa best_isa();
// The table in use. Chosen once: best_isa(), or TINYSERVE_ISA=scalar|avx2|avx512|neon (an
// unavailable choice throws std::runtime_error naming it).
const IsaTable& active_table();
const IsaTable& table_for(Isa isa);  // throws if unavailable
Isa parse_isa(const char* name);     // throws std::invalid_argument on unknown names

}  // namespace ts
