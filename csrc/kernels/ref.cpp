// ref.cpp — scalar kernels: the truth every SIMD path is checked against, and the fallback on
// any CPU. Plain C++, no intrinsics. gemm loops vec_dot, so it is bit-identical by construction.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "kernels/kernels.h"

namespace ts {
namespace {

// ---- dot products: one weight row x one activation row ------------------------------------------

void vec_dot_f32_f32(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const float*>(w);
    const auto* y = static_cast<const float*>(a);
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) sum += x[i] * y[i];
    *s = sum;
}

void vec_dot_f16_f32(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const f16_t*>(w);
    const auto* y = static_cast<const float*>(a);
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) sum += fp16_lut(x[i]) * y[i];
    *s = sum;
}

void vec_dot_bf16_f32(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const bf16_t*>(w);
    const auto* y = static_cast<const float*>(a);
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) sum += bf16_to_fp32(x[i]) * y[i];
    *s = sum;
}

void vec_dot_q8_0_q8_0(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_q8_0*>(w);
    const auto* y = static_cast<const block_q8_0*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK8_0; ++b) {
        int sumi = 0;
        for (int j = 0; j < QK8_0; ++j) sumi += x[b].qs[j] * y[b].qs[j];
        sum += static_cast<float>(sumi) * (fp16_lut(x[b].d) * fp16_lut(y[b].d));
    }
    *s = sum;
}

void vec_dot_q8_1_q8_1(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_q8_1*>(w);
    const auto* y = static_cast<const block_q8_1*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK8_1; ++b) {
        int sumi = 0;
        for (int j = 0; j < QK8_1; ++j) sumi += x[b].qs[j] * y[b].qs[j];
        sum += static_cast<float>(sumi) * (fp16_lut(x[b].d) * fp16_lut(y[b].d));
    }
    *s = sum;
}

void vec_dot_q4_0_q8_0(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_q4_0*>(w);
    const auto* y = static_cast<const block_q8_0*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK4_0; ++b) {
        int sumi = 0;
        for (int j = 0; j < QK4_0 / 2; ++j) {
            sumi += ((x[b].qs[j] & 0x0f) - 8) * y[b].qs[j];
            sumi += ((x[b].qs[j] >> 4) - 8) * y[b].qs[j + QK4_0 / 2];
        }
        sum += static_cast<float>(sumi) * (fp16_lut(x[b].d) * fp16_lut(y[b].d));
    }
    *s = sum;
}

// sum_j (d4*q_j + m) * d8*a_j = d4*d8 * sum(q_j*a_j) + m * s8, with s8 = d8 * sum(a_j)
void vec_dot_q4_1_q8_1(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_q4_1*>(w);
    const auto* y = static_cast<const block_q8_1*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK4_1; ++b) {
        int sumi = 0;
        for (int j = 0; j < QK4_1 / 2; ++j) {
            sumi += (x[b].qs[j] & 0x0f) * y[b].qs[j];
            sumi += (x[b].qs[j] >> 4) * y[b].qs[j + QK4_1 / 2];
        }
        sum += static_cast<float>(sumi) * (fp16_lut(x[b].d) * fp16_lut(y[b].d));
        sum += fp16_lut(x[b].m) * fp16_lut(y[b].s);
    }
    *s = sum;
}

// Q5_0 / Q5_1: the 5-bit value of element j of a block, bits as quant.h describes.
inline int q5_value(const uint8_t* qs, uint32_t qh, int j) {
    const int lo = j < 16 ? qs[j] & 0x0f : qs[j - 16] >> 4;
    return lo | static_cast<int>(((qh >> j) & 1) << 4);
}

void vec_dot_q5_0_q8_0(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_q5_0*>(w);
    const auto* y = static_cast<const block_q8_0*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK5_0; ++b) {
        uint32_t qh;
        std::memcpy(&qh, x[b].qh, 4);
        int sumi = 0;
        for (int j = 0; j < QK5_0; ++j) sumi += (q5_value(x[b].qs, qh, j) - 16) * y[b].qs[j];
        sum += static_cast<float>(sumi) * (fp16_lut(x[b].d) * fp16_lut(y[b].d));
    }
    *s = sum;
}

void vec_dot_q5_1_q8_1(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_q5_1*>(w);
    const auto* y = static_cast<const block_q8_1*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK5_1; ++b) {
        uint32_t qh;
        std::memcpy(&qh, x[b].qh, 4);
        int sumi = 0;
        for (int j = 0; j < QK5_1; ++j) sumi += q5_value(x[b].qs, qh, j) * y[b].qs[j];
        sum += static_cast<float>(sumi) * (fp16_lut(x[b].d) * fp16_lut(y[b].d));
        sum += fp16_lut(x[b].m) * fp16_lut(y[b].s);
    }
    *s = sum;
}

void vec_dot_iq4_nl_q8_0(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_iq4_nl*>(w);
    const auto* y = static_cast<const block_q8_0*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK4_NL; ++b) {
        int sumi = 0;
        for (int j = 0; j < QK4_NL / 2; ++j) {
            sumi += kIQ4NL[x[b].qs[j] & 0x0f] * y[b].qs[j];
            sumi += kIQ4NL[x[b].qs[j] >> 4] * y[b].qs[j + QK4_NL / 2];
        }
        sum += static_cast<float>(sumi) * (fp16_lut(x[b].d) * fp16_lut(y[b].d));
    }
    *s = sum;
}

// K-quants x Q8_K. Per super-block the integer sums are exact (int32); then one float step:
// sum += float(isum) * (d * d8), and for Q4_K/Q5_K sum -= float(msum) * (dmin * d8), where msum is
// the sub-block mins against the activation's block sums.

template <bool kQ5>
void vec_dot_q45_k_q8_k(int n, float* s, const void* w, const void* a) {
    using B = std::conditional_t<kQ5, block_q5_K, block_q4_K>;
    const auto* x = static_cast<const B*>(w);
    const auto* y = static_cast<const block_q8_K*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; ++b) {
        int isum = 0, msum = 0;
        for (int k = 0; k < 4; ++k) {
            for (int h = 0; h < 2; ++h) {  // sub-block 2k + h: low (h = 0) or high nibbles
                const int j = 2 * k + h;
                int sc, m;
                scale_min_k4(j, x[b].scales, sc, m);
                int sub = 0;
                for (int l = 0; l < 32; ++l) {
                    int q = (x[b].qs[32 * k + l] >> (4 * h)) & 0x0f;
                    if constexpr (kQ5) q |= ((x[b].qh[l] >> j) & 1) << 4;
                    sub += q * y[b].qs[32 * j + l];
                }
                isum += sc * sub;
                msum += m * (y[b].bsums[2 * j] + y[b].bsums[2 * j + 1]);
            }
        }
        sum += static_cast<float>(isum) * (fp16_lut(x[b].d) * y[b].d);
        sum -= static_cast<float>(msum) * (fp16_lut(x[b].dmin) * y[b].d);
    }
    *s = sum;
}

void vec_dot_q6_k_q8_k(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_q6_K*>(w);
    const auto* y = static_cast<const block_q8_K*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; ++b) {
        int isum = 0;
        for (int j = 0; j < QK_K / 16; ++j) {
            int sub = 0;
            for (int e = 16 * j; e < 16 * j + 16; ++e) {
                const int half = e / 128, r = e % 128, l = r % 64, hi = r / 64;
                const int lo4 = (x[b].ql[64 * half + l] >> (4 * hi)) & 0x0f;
                const int top = (x[b].qh[32 * half + l % 32] >> (4 * hi + 2 * (l / 32))) & 3;
                sub += ((lo4 | (top << 4)) - 32) * y[b].qs[e];
            }
            isum += x[b].scales[j] * sub;
        }
        sum += static_cast<float>(isum) * (fp16_lut(x[b].d) * y[b].d);
    }
    *s = sum;
}

void vec_dot_iq4_xs_q8_k(int n, float* s, const void* w, const void* a) {
    const auto* x = static_cast<const block_iq4_xs*>(w);
    const auto* y = static_cast<const block_q8_K*>(a);
    float sum = 0.0f;
    for (int b = 0; b < n / QK_K; ++b) {
        int isum = 0;
        for (int j = 0; j < 8; ++j) {
            const int ls = ((x[b].scales_l[j / 2] >> (4 * (j % 2))) & 0x0f) | (((x[b].scales_h >> (2 * j)) & 3) << 4);
            int sub = 0;
            for (int k = 0; k < 16; ++k) {
                sub += kIQ4NL[x[b].qs[16 * j + k] & 0x0f] * y[b].qs[32 * j + k];
                sub += kIQ4NL[x[b].qs[16 * j + k] >> 4] * y[b].qs[32 * j + 16 + k];
            }
            isum += (ls - 32) * sub;
        }
        sum += static_cast<float>(isum) * (fp16_lut(x[b].d) * y[b].d);
    }
    *s = sum;
}

// gemm = vec_dot for every pair, so it is bit-identical by construction.
template <vec_dot_fn F>
void gemm_loop(int n, int nr, int nc, const void* w, size_t w_stride, const void* a, size_t a_stride, float* out,
               size_t ldo) {
    const auto* wb = static_cast<const uint8_t*>(w);
    const auto* ab = static_cast<const uint8_t*>(a);
    for (int c = 0; c < nc; ++c)
        for (int r = 0; r < nr; ++r) F(n, out + c * ldo + r, wb + r * w_stride, ab + c * a_stride);
}

// ---- row conversions ----------------------------------------------------------------------------

template <DType T>
void from_float_ref(const float* x, void* y, int64_t n) {
    quantize_row_ref(T, x, y, n);
}
template <DType T>
void to_float_ref(const void* x, float* y, int64_t n) {
    dequantize_row_ref(T, x, y, n);
}

template <DType T, DType A, vec_dot_fn F>
constexpr TypeKernels make_type() {
    return TypeKernels{T, A, &from_float_ref<T>, &to_float_ref<T>, F, &gemm_loop<F>};
}

const TypeKernels kF32 = make_type<DType::F32, DType::F32, vec_dot_f32_f32>();
const TypeKernels kF16 = make_type<DType::F16, DType::F32, vec_dot_f16_f32>();
const TypeKernels kBF16 = make_type<DType::BF16, DType::F32, vec_dot_bf16_f32>();
const TypeKernels kQ8_0 = make_type<DType::Q8_0, DType::Q8_0, vec_dot_q8_0_q8_0>();
const TypeKernels kQ8_1 = make_type<DType::Q8_1, DType::Q8_1, vec_dot_q8_1_q8_1>();
const TypeKernels kQ4_0 = make_type<DType::Q4_0, DType::Q8_0, vec_dot_q4_0_q8_0>();
const TypeKernels kQ4_1 = make_type<DType::Q4_1, DType::Q8_1, vec_dot_q4_1_q8_1>();
const TypeKernels kQ5_0 = make_type<DType::Q5_0, DType::Q8_0, vec_dot_q5_0_q8_0>();
const TypeKernels kQ5_1 = make_type<DType::Q5_1, DType::Q8_1, vec_dot_q5_1_q8_1>();
const TypeKernels kIQ4_NL = make_type<DType::IQ4_NL, DType::Q8_0, vec_dot_iq4_nl_q8_0>();
const TypeKernels kQ4_K = make_type<DType::Q4_K, DType::Q8_K, vec_dot_q45_k_q8_k<false>>();
const TypeKernels kQ5_K = make_type<DType::Q5_K, DType::Q8_K, vec_dot_q45_k_q8_k<true>>();
const TypeKernels kQ6_K = make_type<DType::Q6_K, DType::Q8_K, vec_dot_q6_k_q8_k>();
const TypeKernels kIQ4_XS = make_type<DType::IQ4_XS, DType::Q8_K, vec_dot_iq4_xs_q8_k>();
// Q8_K is an activation type only: quantize (and dequantize, for tests); no dot product of its own.
const TypeKernels kQ8_K{DType::Q8_K, DType::Q8_K, &from_float_ref<DType::Q8_K>, &to_float_ref<DType::Q8_K>,
                        nullptr,     nullptr};

// ---- ops ----------------------------------------------------------------------------------------

float dot_f16_f32(int n, const f16_t* x, const float* y) {
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) sum += fp16_lut(x[i]) * y[i];
    return sum;
}

void axpy_f16(int n, float a, const f16_t* x, float* y) {
    for (int i = 0; i < n; ++i) y[i] += a * fp16_lut(x[i]);
}

void f32_to_f16(const float* x, f16_t* y, int n) {
    for (int i = 0; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

float dot_f32(int n, const float* x, const float* y) {
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) sum += x[i] * y[i];
    return sum;
}

// y = x / sqrt(mean(x^2) + eps) * w
void rmsnorm(int n, const float* x, const float* w, float eps, float* y) {
    float ss = 0.0f;
    for (int i = 0; i < n; ++i) ss += x[i] * x[i];
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int i = 0; i < n; ++i) y[i] = (x[i] * scale) * w[i];
}

// y = silu(g) * u, silu(g) = g / (1 + exp(-g))
void swiglu(int n, const float* g, const float* u, float* y) {
    for (int i = 0; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// y = gelu_tanh(g) * u, with the tanh form itself (the SIMD paths use 0.5 (1 + tanh(a)) = sigmoid(2a))
void geglu_tanh(int n, const float* g, const float* u, float* y) {
    constexpr float kSqrt2OverPi = 0.7978845608028654f;
    for (int i = 0; i < n; ++i) {
        const float x = g[i];
        y[i] = 0.5f * x * (1.0f + std::tanh(kSqrt2OverPi * (x + 0.044715f * x * x * x))) * u[i];
    }
}

void attn_scores_f16(int hd, int nq, const float* q, const f16_t* k, size_t k_stride, int n, float scale, float* scores,
                     size_t ld) {
    for (int h = 0; h < nq; ++h)
        for (int j = 0; j < n; ++j) scores[h * ld + j] = scale * dot_f16_f32(hd, k + j * k_stride, q + h * hd);
}

void attn_accum_f16(int hd, int nq, const float* p, size_t ld, const f16_t* v, size_t v_stride, int n, float* out) {
    for (int h = 0; h < nq; ++h)
        for (int j = 0; j < n; ++j) axpy_f16(hd, p[h * ld + j], v + j * v_stride, out + h * hd);
}

// ---- attention over one block of the int8 KV cache (layout in kernels.h) -------------------------

// Element i of the K position in slot p of a tile: chunk i / 4, byte 4p + i % 4.
inline size_t k_byte(int p, int i) { return (size_t)(i / 4) * 64 + 4 * p + i % 4; }

void attn_scores_q8(const KV8Layout& L, int nq, const uint8_t* q, const uint8_t* k_run, int j0, int n, float scale,
                    float* scores, size_t ld) {
    const int G = L.groups();
    const size_t qb = L.query_bytes();
    for (int h = 0; h < nq; ++h) {
        const auto* qs = reinterpret_cast<const int8_t*>(q + h * qb);
        const auto* dq = reinterpret_cast<const float*>(q + h * qb + L.chunks() * 4);
        for (int j = j0; j < j0 + n; ++j) {
            const uint8_t* tile = k_run + (size_t)(j / kKV8Tile) * L.k_tile_bytes();
            const auto* dk = reinterpret_cast<const f16_t*>(tile + L.k_scales_offset());
            const int p = j % kKV8Tile;
            float s = 0.0f;
            for (int g = 0; g < G; ++g) {
                int isum = 0;
                for (int i = g * kKV8Group; i < std::min(L.hd, (g + 1) * kKV8Group); ++i)
                    isum += qs[i] * static_cast<int8_t>(tile[k_byte(p, i)]);
                s = std::fma(static_cast<float>(isum), dq[g] * fp16_lut(dk[g * kKV8Tile + p]), s);
            }
            scores[h * ld + (j - j0)] = s * scale;
        }
    }
}

void attn_accum_q8(const KV8Layout& L, int nq, const float* p, size_t ld, const uint8_t* v_run, int j0, int n,
                   float* out) {
    const int G = L.groups(), hd = L.hd;
    const auto* dv = reinterpret_cast<const f16_t*>(v_run + L.v_scales_offset());
    for (int h = 0; h < nq; ++h)
        for (int j = j0; j < j0 + n; ++j) {
            const auto* v = reinterpret_cast<const int8_t*>(v_run + (size_t)j * hd);
            for (int g = 0; g < G; ++g) {
                const float w = p[h * ld + (j - j0)] * fp16_lut(dv[(size_t)j * G + g]);
                for (int i = g * kKV8Group; i < std::min(hd, (g + 1) * kKV8Group); ++i)
                    out[h * hd + i] = std::fma(w, static_cast<float>(v[i]), out[h * hd + i]);
            }
        }
}

void softmax(int n, float* x) {
    float mx = -INFINITY;
    for (int i = 0; i < n; ++i) mx = std::max(mx, x[i]);
    float sum = 0.0f;
    for (int i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - mx);
        sum += x[i];
    }
    const float inv = 1.0f / sum;
    for (int i = 0; i < n; ++i) x[i] *= inv;
}

IsaTable make_table() {
    IsaTable t{};
    t.isa = Isa::Scalar;
    for (const TypeKernels* k : {&kF32, &kF16, &kBF16, &kQ8_0, &kQ8_1, &kQ4_0, &kQ4_1, &kQ5_0, &kQ5_1, &kIQ4_NL, &kQ4_K,
                                 &kQ5_K, &kQ6_K, &kIQ4_XS, &kQ8_K})
        t.types[static_cast<int>(k->type)] = k;
    t.ops =
        OpsKernels{dot_f16_f32,    axpy_f16, f32_to_f16, dot_f32,        rmsnorm,       swiglu,    attn_scores_f16,
                   attn_accum_f16, softmax,  geglu_tanh, attn_scores_q8, attn_accum_q8, kv8_store, kv8_quantize_query};
    return t;
}

// A rounded value in [-127, 127] as int8; NaN (an inf or NaN among the inputs) gives 0, where the
// plain cast would be undefined. Finite inputs never reach the other branch.
inline int8_t q8_value(float v) { return v >= -128.0f && v <= 127.0f ? static_cast<int8_t>(v) : 0; }

// Q8_0's rounding of n values: returns d, writes q (n <= 32).
float q8_group(const float* x, int n, int8_t* q) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int i = 0; i < n; ++i) q[i] = q8_value(std::roundf(x[i] * id));
    return d;
}

}  // namespace

void kv8_store(const KV8Layout& L, int kv, int slot, const float* x, uint8_t* run) {
    const int G = L.groups();
    int8_t q[kKV8Group];
    if (kv == 0) {
        uint8_t* tile = run + (size_t)(slot / kKV8Tile) * L.k_tile_bytes();
        auto* dk = reinterpret_cast<f16_t*>(tile + L.k_scales_offset());
        const int p = slot % kKV8Tile;
        for (int g = 0; g < G; ++g) {
            const int i0 = g * kKV8Group, m = std::min(L.hd - i0, kKV8Group);
            dk[g * kKV8Tile + p] = fp32_to_fp16(q8_group(x + i0, m, q));
            for (int i = 0; i < m; ++i) tile[k_byte(p, i0 + i)] = static_cast<uint8_t>(q[i]);
        }
        for (int i = L.hd; i < L.chunks() * 4; ++i) tile[k_byte(p, i)] = 0;  // pad of the last chunk
    } else {
        auto* v = reinterpret_cast<int8_t*>(run + (size_t)slot * L.hd);
        auto* dv = reinterpret_cast<f16_t*>(run + L.v_scales_offset()) + (size_t)slot * G;
        for (int g = 0; g < G; ++g) {
            const int i0 = g * kKV8Group;
            dv[g] = fp32_to_fp16(q8_group(x + i0, std::min(L.hd - i0, kKV8Group), v + i0));
        }
    }
}

void kv8_quantize_query(const KV8Layout& L, const float* x, uint8_t* rec) {
    const int G = L.groups();
    auto* qs = reinterpret_cast<int8_t*>(rec);
    auto* d = reinterpret_cast<float*>(rec + L.chunks() * 4);
    auto* sum = reinterpret_cast<int32_t*>(rec + L.chunks() * 4 + G * 4);
    for (int g = 0; g < G; ++g) {
        const int i0 = g * kKV8Group, m = std::min(L.hd - i0, kKV8Group);
        d[g] = q8_group(x + i0, m, qs + i0);
        sum[g] = 0;
        for (int i = 0; i < m; ++i) sum[g] += qs[i0 + i];
    }
    for (int i = L.hd; i < L.chunks() * 4; ++i) qs[i] = 0;
}

float kv8_load(const KV8Layout& L, int kv, int slot, int i, const uint8_t* run) {
    const int g = i / kKV8Group;
    if (kv == 0) {
        const uint8_t* tile = run + (size_t)(slot / kKV8Tile) * L.k_tile_bytes();
        const int p = slot % kKV8Tile;
        const auto* dk = reinterpret_cast<const f16_t*>(tile + L.k_scales_offset());
        return fp16_lut(dk[g * kKV8Tile + p]) * static_cast<float>(static_cast<int8_t>(tile[k_byte(p, i)]));
    }
    const auto* dv = reinterpret_cast<const f16_t*>(run + L.v_scales_offset());
    return fp16_lut(dv[(size_t)slot * L.groups() + g]) *
           static_cast<float>(reinterpret_cast<const int8_t*>(run)[(size_t)slot * L.hd + i]);
}

const IsaTable* isa_table_scalar() {
    static const IsaTable table = make_table();
    return &table;
}

}  // namespace ts
