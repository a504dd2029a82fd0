// ref.cpp — scalar kernels: the truth every SIMD path is checked against, and the fallback on
// any CPU. Plain C++, no intrinsics. gemm loops vec_dot, so it is bit-identical by construction.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>

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

// gemm = vec_dot for every pair, so it is bit-identical by construction.
template <vec_dot_fn F>
void gemm_loop(int n, int nr, int nc, const void* w, size_t w_stride, const void* a,
               size_t a_stride, float* out, size_t ldo) {
    const auto* wb = static_cast<const uint8_t*>(w);
    const auto* ab = static_cast<const uint8_t*>(a);
    for (int c = 0; c < nc; ++c)
        for (int r = 0; r < nr; ++r) F(n, out + c * ldo + r, wb + r * w_stride, ab + c * a_stride);
}

// ---- row conversions ----------------------------------------------------------------------------

template <DType T>
void from_float_ref(const float* x, void* y, int64_t n) { quantize_row_ref(T, x, y, n); }
template <DType T>
void to_float_ref(const void* x, float* y, int64_t n) { dequantize_row_ref(T, x, y, n); }

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

void attn_scores_f16(int hd, int nq, const float* q, const f16_t* k, size_t k_stride, int n, float scale,
                     float* scores, size_t ld) {
    for (int h = 0; h < nq; ++h)
        for (int j = 0; j < n; ++j) scores[h * ld + j] = scale * dot_f16_f32(hd, k + j * k_stride, q + h * hd);
}

void attn_accum_f16(int hd, int nq, const float* p, size_t ld, const f16_t* v, size_t v_stride, int n,
                    float* out) {
    for (int h = 0; h < nq; ++h)
        for (int j = 0; j < n; ++j) axpy_f16(hd, p[h * ld + j], v + j * v_stride, out + h * hd);
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
    for (const TypeKernels* k : {&kF32, &kF16, &kBF16, &kQ8_0, &kQ8_1, &kQ4_0, &kQ4_1})
        t.types[static_cast<int>(k->type)] = k;
    t.ops = OpsKernels{dot_f16_f32, axpy_f16, f32_to_f16, dot_f32, rmsnorm, swiglu,
                       attn_scores_f16, attn_accum_f16, softmax, geglu_tanh};
    return t;
}

}  // namespace

const IsaTable* isa_table_scalar() {
    static const IsaTable table = make_table();
    return &table;
}

}  // namespace ts
