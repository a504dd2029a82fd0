// blocks.cuh — the per-block arithmetic of the CUDA matmul and activation quantization, as
// __host__ __device__ functions: the kernels (kernels.cu) run them on the GPU, and
// tests/cuda/blocks_selftest.cu runs the very same code on the CPU against the scalar reference
// (csrc/kernels/ref.cpp, csrc/quant.cpp), so the block layouts are checked without a GPU.
#pragma once
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda/kernels.cuh"
#include "quant.h"

#define TS_HD __host__ __device__ __forceinline__

namespace ts::cuda {

// ---- primitives: the device intrinsics, or their exact host equivalents -------------------------

// products and sums rounded one at a time (never contracted into an fma: the CPU reference
// rounds the product first)
TS_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
TS_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
TS_HD float fsub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
TS_HD float add_mul(float acc, float a, float b) { return fadd(acc, fmul(a, b)); }
// c + the dot product of the four signed bytes of a and of b
TS_HD int dp4a(int a, int b, int c) {
#ifdef __CUDA_ARCH__
    return __dp4a(a, b, c);
#else
    for (int k = 0; k < 4; k++) c += (int)(int8_t)(a >> (8 * k)) * (int)(int8_t)(b >> (8 * k));
    return c;
#endif
}
TS_HD int round_even_int(float v) {
#ifdef __CUDA_ARCH__
    return __float2int_rn(v);
#else
    return (int)std::nearbyint(v);
#endif
}
TS_HD float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
// the fp16 at p (little endian) as float
TS_HD float h2f(const uint8_t* p) {
    const unsigned short u = (unsigned short)(p[0] | (p[1] << 8));
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(u));
#else
    return fp16_to_fp32(u);
#endif
}
// f rounded to fp16 (nearest even) and back
TS_HD float h2f_round(float f) {
#ifdef __CUDA_ARCH__
    return __half2float(__float2half_rn(f));
#else
    return fp16_to_fp32(fp32_to_fp16(f));
#endif
}

static __constant__ int8_t c_iq4nl[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
TS_HD int iq4nl(int q) {
#ifdef __CUDA_ARCH__
    return c_iq4nl[q];
#else
    return kIQ4NL[q];
#endif
}

// ---- activation quantization: quant.cpp's quantize_q8_0 / q8_1 / q8_K, one block -------------------

// 32 values -> q[32], d (fp16-rounded), s = fp16(d * sum(q)) when with_sum (Q8_1)
TS_HD void quant_q8_0_block(const float* x, int8_t* q, float* d, float* s, bool with_sum) {
    float amax = 0.f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float dd = amax / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; j++) {
        const int8_t v = (int8_t)(int)roundf(fmul(x[j], id));
        q[j] = v;
        sum += v;
    }
    *d = h2f_round(dd);
    if (with_sum) *s = h2f_round(fmul((float)sum, dd));
}

// 256 values -> q[256], d, bsums[16] (the signed value of largest magnitude maps to -127)
TS_HD void quant_q8_k_block(const float* x, int8_t* q, float* d, int* bsums) {
    float amax = 0.f, mx = 0.f;
    for (int j = 0; j < 256; j++)
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            mx = x[j];
        }
    if (amax == 0.f) {
        for (int j = 0; j < 256; j++) q[j] = 0;
        for (int j = 0; j < 16; j++) bsums[j] = 0;
        *d = 0.f;
        return;
    }
    const float iscale = -127.0f / mx;
    for (int j = 0; j < 256; j++) {
        const int v = round_even_int(fmul(iscale, x[j]));
        q[j] = (int8_t)(v < 127 ? v : 127);
    }
    for (int j = 0; j < 16; j++) {
        int sum = 0;
        for (int k = 0; k < 16; k++) sum += q[16 * j + k];
        bsums[j] = sum;
    }
    *d = 1.0f / iscale;
}

// 4 int8 values (low byte first) as one word for dp4a
TS_HD int pack4(int a, int b, int c, int d) {
    return (a & 0xff) | ((b & 0xff) << 8) | ((c & 0xff) << 16) | ((int)((unsigned)(d & 0xff) << 24));
}
TS_HD uint32_t ld_u32(const uint8_t* p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

// ---- weight blocks: decode 32 elements into 8 words of int8 (element 4i + k at byte k of word i) ----

// Low nibble of qs[j] is element j, high nibble element j + 16 (Q4_0, Q4_1, Q5_*, IQ4_NL).
template <class F>
TS_HD void nibbles32(const uint8_t* qs, F value, int (&w)[8]) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const uint32_t b = ld_u32(qs + 4 * i);
        int lo[4], hi[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int byte = (b >> (8 * k)) & 0xff;
            lo[k] = value(byte & 0x0f, 4 * i + k);
            hi[k] = value(byte >> 4, 16 + 4 * i + k);
        }
        w[i] = pack4(lo[0], lo[1], lo[2], lo[3]);
        w[4 + i] = pack4(hi[0], hi[1], hi[2], hi[3]);
    }
}

TS_HD int dot8(const int (&w)[8], const int8_t* a) {
    const int* aw = reinterpret_cast<const int*>(a);  // 32 quants, 4-byte aligned
    int s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) s = dp4a(w[i], aw[i], s);
    return s;
}
TS_HD int dot4(const int* w, const int8_t* a) {
    const int* aw = reinterpret_cast<const int*>(a);
    int s = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) s = dp4a(w[i], aw[i], s);
    return s;
}

// One weight type: QK elements and BYTES bytes per block; accumulate(block, b, acts, c0, nc, acc)
// adds block b's products with activation rows c0 .. c0 + nc - 1 to acc[0 .. nc).
template <DType T>
struct W32;  // the 32-element types

template <>
struct W32<DType::Q4_0> {
    static constexpr int BYTES = 18;
    static constexpr bool MIN = false;
    TS_HD static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p);
        m = 0.f;
        nibbles32(p + 2, [](int q, int) { return q - 8; }, w);
    }
};
template <>
struct W32<DType::Q4_1> {
    static constexpr int BYTES = 20;
    static constexpr bool MIN = true;
    TS_HD static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p);
        m = h2f(p + 2);
        nibbles32(p + 4, [](int q, int) { return q; }, w);
    }
};
template <>
struct W32<DType::Q5_0> {
    static constexpr int BYTES = 22;
    static constexpr bool MIN = false;
    TS_HD static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p);
        m = 0.f;
        const uint32_t qh = ld_u32(p + 2);
        nibbles32(p + 6, [qh](int q, int j) { return (q | (int)(((qh >> j) & 1) << 4)) - 16; }, w);
    }
};
template <>
struct W32<DType::Q5_1> {
    static constexpr int BYTES = 24;
    static constexpr bool MIN = true;
    TS_HD static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p);
        m = h2f(p + 2);
        const uint32_t qh = ld_u32(p + 4);
        nibbles32(p + 8, [qh](int q, int j) { return q | (int)(((qh >> j) & 1) << 4); }, w);
    }
};
template <>
struct W32<DType::IQ4_NL> {
    static constexpr int BYTES = 18;
    static constexpr bool MIN = false;
    TS_HD static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p);
        m = 0.f;
        nibbles32(p + 2, [](int q, int) { return (int)iq4nl(q); }, w);
    }
};
template <>
struct W32<DType::Q8_0> {
    static constexpr int BYTES = 34;
    static constexpr bool MIN = false;
    TS_HD static void decode(const uint8_t* p, int (&w)[8], float& d, float& m) {
        d = h2f(p);
        m = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) w[i] = (int)ld_u32(p + 2 + 4 * i);  // already int8
    }
};

// vec_dot_*_q8_0 / _q8_1: sum += float(sumi) * (d * d8) [+ m * s8]
template <DType T, int NC>
TS_HD void accumulate32(const uint8_t* blk, int b, const Acts& a, int c0, int nc, float (&acc)[NC]) {
    int w[8];
    float d, m;
    W32<T>::decode(blk, w, d, m);
    const int nb = a.n / 32;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        if (c >= nc) break;
        const int row = c0 + c;
        const int sumi = dot8(w, a.q + (size_t)row * a.n + b * 32);
        acc[c] = add_mul(acc[c], (float)sumi, fmul(d, a.d[(size_t)row * nb + b]));
        if constexpr (W32<T>::MIN) acc[c] = add_mul(acc[c], m, a.s[(size_t)row * nb + b]);
    }
}

// The K-quants and IQ4_XS: super-blocks of 256 in 8 chunks of 32. decode_chunk gives chunk j's
// 8 words and the integer scales of its two halves of 16 (sc_lo, sc_hi) and its min (mn).
template <DType T>
struct W256;

TS_HD void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

template <bool kQ5>
struct W256Q45 {
    static constexpr int BYTES = kQ5 ? 176 : 144;
    static constexpr bool MIN = true;
    TS_HD static void header(const uint8_t* p, float& d, float& dmin) {
        d = h2f(p);
        dmin = h2f(p + 2);
    }
    TS_HD static void decode_chunk(const uint8_t* p, int j, int (&w)[8], int& sc_lo, int& sc_hi, int& mn) {
        const uint8_t* scales = p + 4;
        const uint8_t* qh = p + 16;
        const uint8_t* qs = p + (kQ5 ? 48 : 16);
        int sc;
        scale_min_k4(j, scales, sc, mn);
        sc_lo = sc_hi = sc;
        const int k = j / 2, h = j % 2;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int v[4];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int l = 4 * i + e;
                int q = (qs[32 * k + l] >> (4 * h)) & 0x0f;
                if constexpr (kQ5) q |= ((qh[l] >> j) & 1) << 4;
                v[e] = q;
            }
            w[i] = pack4(v[0], v[1], v[2], v[3]);
        }
    }
};
template <>
struct W256<DType::Q4_K> : W256Q45<false> {};
template <>
struct W256<DType::Q5_K> : W256Q45<true> {};

template <>
struct W256<DType::Q6_K> {
    static constexpr int BYTES = 210;
    static constexpr bool MIN = false;
    TS_HD static void header(const uint8_t* p, float& d, float& dmin) {
        d = h2f(p + 208);
        dmin = 0.f;
    }
    TS_HD static void decode_chunk(const uint8_t* p, int j, int (&w)[8], int& sc_lo, int& sc_hi, int& mn) {
        const uint8_t* ql = p;
        const uint8_t* qh = p + 128;
        const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
        sc_lo = scales[2 * j];
        sc_hi = scales[2 * j + 1];
        mn = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int v[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const int e = 32 * j + 4 * i + k;
                const int half = e / 128, r = e % 128, l = r % 64, hi = r / 64;
                const int lo4 = (ql[64 * half + l] >> (4 * hi)) & 0x0f;
                const int top = (qh[32 * half + l % 32] >> (4 * hi + 2 * (l / 32))) & 3;
                v[k] = (lo4 | (top << 4)) - 32;
            }
            w[i] = pack4(v[0], v[1], v[2], v[3]);
        }
    }
};

template <>
struct W256<DType::IQ4_XS> {
    static constexpr int BYTES = 136;
    static constexpr bool MIN = false;
    TS_HD static void header(const uint8_t* p, float& d, float& dmin) {
        d = h2f(p);
        dmin = 0.f;
    }
    TS_HD static void decode_chunk(const uint8_t* p, int j, int (&w)[8], int& sc_lo, int& sc_hi, int& mn) {
        const int scales_h = p[2] | (p[3] << 8);
        const uint8_t* scales_l = p + 4;
        const int ls = ((scales_l[j / 2] >> (4 * (j % 2))) & 0x0f) | (((scales_h >> (2 * j)) & 3) << 4);
        sc_lo = sc_hi = ls - 32;
        mn = 0;
        nibbles32(p + 8 + 16 * j, [](int q, int) { return (int)iq4nl(q); }, w);
    }
};

// vec_dot_*_q8_k: per super-block exact isum (and msum of the mins against the block sums), then
// sum += float(isum) * (d * d8); sum -= float(msum) * (dmin * d8)
template <DType T, int NC>
TS_HD void accumulate256(const uint8_t* blk, int b, const Acts& a, int c0, int nc, float (&acc)[NC]) {
    int isum[NC], msum[NC];
#pragma unroll
    for (int c = 0; c < NC; c++) isum[c] = msum[c] = 0;
    for (int j = 0; j < 8; j++) {
        int w[8], sc_lo, sc_hi, mn;
        W256<T>::decode_chunk(blk, j, w, sc_lo, sc_hi, mn);
#pragma unroll
        for (int c = 0; c < NC; c++) {
            if (c >= nc) break;
            const int row = c0 + c;
            const int8_t* aq = a.q + (size_t)row * a.n + b * 256 + 32 * j;
            isum[c] += sc_lo * dot4(w, aq) + sc_hi * dot4(w + 4, aq + 16);
            if constexpr (W256<T>::MIN) {
                const int* bs = a.bsums + (size_t)row * (a.n / 16) + b * 16;
                msum[c] += mn * (bs[2 * j] + bs[2 * j + 1]);
            }
        }
    }
    float d, dmin;
    W256<T>::header(blk, d, dmin);
    const int nb = a.n / 256;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        if (c >= nc) break;
        const float d8 = a.d[(size_t)(c0 + c) * nb + b];
        acc[c] = add_mul(acc[c], (float)isum[c], fmul(d, d8));
        if constexpr (W256<T>::MIN) acc[c] = fsub(acc[c], fmul((float)msum[c], fmul(dmin, d8)));
    }
}

// Float weights (F32, F16, BF16) against F32 activations, blocks of 32.
template <DType T>
struct WF;
template <>
struct WF<DType::F32> {
    static constexpr int BYTES = 128;
    TS_HD static float at(const uint8_t* p, int i) { return reinterpret_cast<const float*>(p)[i]; }
};
template <>
struct WF<DType::F16> {
    static constexpr int BYTES = 64;
    TS_HD static float at(const uint8_t* p, int i) { return h2f(p + 2 * i); }
};
template <>
struct WF<DType::BF16> {
    static constexpr int BYTES = 64;
    TS_HD static float at(const uint8_t* p, int i) {
        return bits_f32((uint32_t)(p[2 * i] | (p[2 * i + 1] << 8)) << 16);
    }
};
template <DType T, int NC>
TS_HD void accumulate_f(const uint8_t* blk, int b, const Acts& a, int c0, int nc, float (&acc)[NC]) {
    float w[32];
#pragma unroll
    for (int i = 0; i < 32; i++) w[i] = WF<T>::at(blk, i);
#pragma unroll
    for (int c = 0; c < NC; c++) {
        if (c >= nc) break;
        const float* x = a.x + (size_t)(c0 + c) * a.n + b * 32;
#pragma unroll
        for (int i = 0; i < 32; i++) acc[c] = add_mul(acc[c], w[i], x[i]);
    }
}

enum class Kind { F, B32, B256 };
template <DType T>
constexpr Kind kind() {
    if constexpr (T == DType::F32 || T == DType::F16 || T == DType::BF16)
        return Kind::F;
    else if constexpr (T == DType::Q4_K || T == DType::Q5_K || T == DType::Q6_K || T == DType::IQ4_XS)
        return Kind::B256;
    else
        return Kind::B32;
}
template <DType T>
constexpr int block_elems() {
    return kind<T>() == Kind::B256 ? 256 : 32;
}
template <DType T>
constexpr int block_bytes() {
    if constexpr (kind<T>() == Kind::F)
        return WF<T>::BYTES;
    else if constexpr (kind<T>() == Kind::B256)
        return W256<T>::BYTES;
    else
        return W32<T>::BYTES;
}

}  // namespace ts::cuda
