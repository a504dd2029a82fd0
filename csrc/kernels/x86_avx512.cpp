// x86_avx512.cpp — AVX-512 (F/BW/VL/DQ) + VNNI kernels: quantized dot products with vpdpbusd,
// register-tiled GEMM, F16/BF16/F32 weights, activation quantization and the layer ops.
//
// Batch invariance: every (weight row, activation row) pair is computed by the same sequence of
// float operations whatever tile it lands in: per pair of blocks one exact integer dot product,
// then acc = fma(float(sumi), dw*da, acc) (+ fma(m, s, acc) for Q4_1), then one fixed horizontal
// reduction. Tiles only share the unpacking of weights and activations, which is exact.
#include <immintrin.h>

#include <cmath>

#include "kernels/kernels.h"

namespace ts {
namespace {

inline float h2f(f16_t h) { return fp16_lut(h); }

inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// 16 lanes holding two per-block scalars: lanes selected by `hi` get s1, the others s0.
inline __m512 scale2(float s0, float s1, __mmask16 hi) {
    return _mm512_mask_mov_ps(_mm512_set1_ps(s0), hi, _mm512_set1_ps(s1));
}

// ---- quantized types ----------------------------------------------------------------------------
//
// Each trait unpacks two consecutive blocks (b, b+1) of a weight row or an activation row into one
// zmm; the "1" variants unpack a single last block with the other half zero (its scales are zero).
// Q4 lane layout: [b0 elems 0-15 | b1 elems 0-15 | b0 elems 16-31 | b1 elems 16-31], so the dword
// lanes of a dpbusd hold block b0 in lanes 0-3 and 8-11 and block b1 in 4-7 and 12-15 (mask 0xF0F0).

struct Q4_0T {
    using WB = block_q4_0;
    using AB = block_q8_0;
    static constexpr bool kHasMin = false;
    static constexpr __mmask16 kHi = 0xF0F0;
    struct W { __m512i q; __m512 d; };
    struct A { __m512i q; __m512 d; __m512i corr; };

    static inline __m512i nibbles(__m256i q) {  // [q0|q1] -> [lo0 lo1 hi0 hi1]
        const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
        return _mm512_and_si512(z, _mm512_set1_epi8(0x0f));
    }
    static inline W w2(const WB* b) {
        const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(load128(b[0].qs)), load128(b[1].qs), 1);
        return {nibbles(q), scale2(h2f(b[0].d), h2f(b[1].d), kHi)};
    }
    static inline W w1(const WB* b) {
        const __m256i q = _mm256_zextsi128_si256(load128(b[0].qs));
        return {nibbles(q), scale2(h2f(b[0].d), 0.0f, kHi)};
    }
    static inline __m512i act_q(const int8_t* q0, const int8_t* q1) {
        __m512i z = _mm512_castsi128_si512(load128(q0));
        z = _mm512_inserti32x4(z, load128(q1), 1);
        z = _mm512_inserti32x4(z, load128(q0 + 16), 2);
        return _mm512_inserti32x4(z, load128(q1 + 16), 3);
    }
    static inline __m512i act_q1(const int8_t* q0) {
        __m512i z = _mm512_castsi128_si512(load128(q0));
        return _mm512_inserti32x4(_mm512_maskz_mov_epi32(0x000f, z), load128(q0 + 16), 2);
    }
    // sum((q-8)*a) = dpbusd(q, a) - 8*sum(a): start each lane at -8 * (its 4 activations)
    static inline __m512i corr(__m512i q) {
        const __m512i z = _mm512_setzero_si512();
        return _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, _mm512_set1_epi8(8), q));
    }
    static inline A a2(const AB* b) {
        const __m512i q = act_q(b[0].qs, b[1].qs);
        return {q, scale2(h2f(b[0].d), h2f(b[1].d), kHi), corr(q)};
    }
    static inline A a1(const AB* b) {
        const __m512i q = act_q1(b[0].qs);
        return {q, scale2(h2f(b[0].d), 0.0f, kHi), corr(q)};
    }
    static inline __m512i dot(const W& w, const A& a) { return _mm512_dpbusd_epi32(a.corr, w.q, a.q); }
    static inline __m512 fix(__m512 acc, const W&, const A&) { return acc; }
};

struct Q4_1T {
    using WB = block_q4_1;
    using AB = block_q8_1;
    static constexpr bool kHasMin = true;
    static constexpr __mmask16 kHi = 0xF0F0;
    struct W { __m512i q; __m512 d; __m512 m; };  // m: the block minimum in one lane per block
    struct A { __m512i q; __m512 d; __m512 s; };

    static inline W w2(const WB* b) {
        const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(load128(b[0].qs)), load128(b[1].qs), 1);
        return {Q4_0T::nibbles(q), scale2(h2f(b[0].d), h2f(b[1].d), kHi),
                _mm512_maskz_mov_ps(0x0011, scale2(h2f(b[0].m), h2f(b[1].m), kHi))};
    }
    static inline W w1(const WB* b) {
        const __m256i q = _mm256_zextsi128_si256(load128(b[0].qs));
        return {Q4_0T::nibbles(q), scale2(h2f(b[0].d), 0.0f, kHi),
                _mm512_maskz_mov_ps(0x0001, _mm512_set1_ps(h2f(b[0].m)))};
    }
    static inline A a2(const AB* b) {
        return {Q4_0T::act_q(b[0].qs, b[1].qs), scale2(h2f(b[0].d), h2f(b[1].d), kHi),
                scale2(h2f(b[0].s), h2f(b[1].s), kHi)};
    }
    static inline A a1(const AB* b) {
        return {Q4_0T::act_q1(b[0].qs), scale2(h2f(b[0].d), 0.0f, kHi), scale2(h2f(b[0].s), 0.0f, kHi)};
    }
    static inline __m512i dot(const W& w, const A& a) {
        return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w.q, a.q);
    }
    // + m * s per block (sum_j m * d8 * a_j)
    static inline __m512 fix(__m512 acc, const W& w, const A& a) { return _mm512_fmadd_ps(w.m, a.s, acc); }
};

// Q8_0 x Q8_0: both signed. dpbusd wants one unsigned side: use (a + 128) as u8 (a ^ 0x80) and
// start each lane at -128 * (its 4 weights). Lane layout [b0 (32) | b1 (32)] (mask 0xFF00).
struct Q8_0T {
    using WB = block_q8_0;
    using AB = block_q8_0;
    static constexpr bool kHasMin = false;
    static constexpr __mmask16 kHi = 0xFF00;
    struct W { __m512i q; __m512 d; __m512i corr; };
    struct A { __m512i q; __m512 d; };

    static inline __m512i corr(__m512i q) {
        const __m512i z = _mm512_setzero_si512();
        return _mm512_sub_epi32(z, _mm512_dpbusd_epi32(z, _mm512_set1_epi8(static_cast<char>(0x80)), q));
    }
    static inline W w2(const WB* b) {
        const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(load256(b[0].qs)), load256(b[1].qs), 1);
        return {q, scale2(h2f(b[0].d), h2f(b[1].d), kHi), corr(q)};
    }
    static inline W w1(const WB* b) {
        const __m512i q = _mm512_zextsi256_si512(load256(b[0].qs));
        return {q, scale2(h2f(b[0].d), 0.0f, kHi), corr(q)};
    }
    static inline A a2(const AB* b) {
        const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(load256(b[0].qs)), load256(b[1].qs), 1);
        return {_mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80))),
                scale2(h2f(b[0].d), h2f(b[1].d), kHi)};
    }
    static inline A a1(const AB* b) {
        const __m512i q = _mm512_zextsi256_si512(load256(b[0].qs));
        return {_mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80))), scale2(h2f(b[0].d), 0.0f, kHi)};
    }
    static inline __m512i dot(const W& w, const A& a) { return _mm512_dpbusd_epi32(w.corr, a.q, w.q); }
    static inline __m512 fix(__m512 acc, const W&, const A&) { return acc; }
};

// The one float step every pair goes through, whatever the tile.
template <class T>
inline __m512 step(__m512 acc, const typename T::W& w, const typename T::A& a) {
    const __m512i s = T::dot(w, a);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(w.d, a.d), acc);
    return T::fix(acc, w, a);
}

// R weight rows x C activation rows.
template <class T, int R, int C>
void tile_q(int nb, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* out, size_t ldo) {
    using WB = typename T::WB;
    using AB = typename T::AB;
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        typename T::W wp[R];
        for (int r = 0; r < R; ++r) wp[r] = T::w2(reinterpret_cast<const WB*>(w + r * ws) + b);
        for (int c = 0; c < C; ++c) {
            const typename T::A ap = T::a2(reinterpret_cast<const AB*>(a + c * as) + b);
            for (int r = 0; r < R; ++r) acc[r][c] = step<T>(acc[r][c], wp[r], ap);
        }
    }
    if (b < nb) {
        typename T::W wp[R];
        for (int r = 0; r < R; ++r) wp[r] = T::w1(reinterpret_cast<const WB*>(w + r * ws) + b);
        for (int c = 0; c < C; ++c) {
            const typename T::A ap = T::a1(reinterpret_cast<const AB*>(a + c * as) + b);
            for (int r = 0; r < R; ++r) acc[r][c] = step<T>(acc[r][c], wp[r], ap);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) out[c * ldo + r] = _mm512_reduce_add_ps(acc[r][c]);
}

// ---- float weights (F32/F16/BF16) x F32 activations ---------------------------------------------

struct F32W {
    using E = float;
    static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    static inline __m512 load_tail(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
};
struct F16W {
    using E = f16_t;
    static inline __m512 load(const f16_t* p) { return _mm512_cvtph_ps(load256(p)); }
    static inline __m512 load_tail(const f16_t* p, __mmask16 k) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
    }
};
struct BF16W {
    using E = bf16_t;
    static inline __m512 widen(__m256i v) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    static inline __m512 load(const bf16_t* p) { return widen(load256(p)); }
    static inline __m512 load_tail(const bf16_t* p, __mmask16 k) { return widen(_mm256_maskz_loadu_epi16(k, p)); }
};

template <class T, int R, int C>
void tile_f(int n, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* out, size_t ldo) {
    using E = typename T::E;
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = T::load(reinterpret_cast<const E*>(w + r * ws) + i);
        for (int c = 0; c < C; ++c) {
            const __m512 x = _mm512_loadu_ps(reinterpret_cast<const float*>(a + c * as) + i);
            for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], x, acc[r][c]);
        }
    }
    if (i < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
        __m512 wv[R];
        for (int r = 0; r < R; ++r) wv[r] = T::load_tail(reinterpret_cast<const E*>(w + r * ws) + i, k);
        for (int c = 0; c < C; ++c) {
            const __m512 x = _mm512_maskz_loadu_ps(k, reinterpret_cast<const float*>(a + c * as) + i);
            for (int r = 0; r < R; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], x, acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) out[c * ldo + r] = _mm512_reduce_add_ps(acc[r][c]);
}

// ---- drivers ------------------------------------------------------------------------------------

// Tile kernels take the element count `len`: blocks for quantized types, elements for float ones.
using tile_fn = void (*)(int, const uint8_t*, size_t, const uint8_t*, size_t, float*, size_t);

template <class T, int R, int C>
struct QTile { static void run(int len, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* o, size_t l) { tile_q<T, R, C>(len, w, ws, a, as, o, l); } };
template <class T, int R, int C>
struct FTile { static void run(int len, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* o, size_t l) { tile_f<T, R, C>(len, w, ws, a, as, o, l); } };

template <template <class, int, int> class K, class T, int R>
constexpr tile_fn pick(int c) {
    return c == 1 ? &K<T, R, 1>::run : c == 2 ? &K<T, R, 2>::run : c == 3 ? &K<T, R, 3>::run : &K<T, R, 4>::run;
}

constexpr int kRT = 4;  // weight rows per tile
constexpr int kCT = 4;  // activation rows per tile

template <template <class, int, int> class K, class T>
void gemm_tiled(int len, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out,
                size_t ldo) {
    const auto* wb = static_cast<const uint8_t*>(w);
    const auto* ab = static_cast<const uint8_t*>(a);
    int r = 0;
    for (; r + kRT <= nr; r += kRT) {
        int c = 0;
        for (; c + kCT <= nc; c += kCT)
            K<T, kRT, kCT>::run(len, wb + r * ws, ws, ab + c * as, as, out + c * ldo + r, ldo);
        if (c < nc) pick<K, T, kRT>(nc - c)(len, wb + r * ws, ws, ab + c * as, as, out + c * ldo + r, ldo);
    }
    for (; r < nr; ++r) {
        int c = 0;
        for (; c + kCT <= nc; c += kCT)
            K<T, 1, kCT>::run(len, wb + r * ws, ws, ab + c * as, as, out + c * ldo + r, ldo);
        if (c < nc) pick<K, T, 1>(nc - c)(len, wb + r * ws, ws, ab + c * as, as, out + c * ldo + r, ldo);
    }
}

template <class T>
void gemm_q(int n, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out, size_t ldo) {
    gemm_tiled<QTile, T>(n / 32, nr, nc, w, ws, a, as, out, ldo);
}
template <class T>
void vec_dot_q(int n, float* s, const void* w, const void* a) {
    tile_q<T, 1, 1>(n / 32, static_cast<const uint8_t*>(w), 0, static_cast<const uint8_t*>(a), 0, s, 0);
}
template <class T>
void gemm_f(int n, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out, size_t ldo) {
    gemm_tiled<FTile, T>(n, nr, nc, w, ws, a, as, out, ldo);
}
template <class T>
void vec_dot_f(int n, float* s, const void* w, const void* a) {
    tile_f<T, 1, 1>(n, static_cast<const uint8_t*>(w), 0, static_cast<const uint8_t*>(a), 0, s, 0);
}

// ---- activation quantization (bit-identical to quantize_row_ref) --------------------------------

// roundf: half away from zero. v - trunc(v) is exact, so this matches std::roundf everywhere.
inline __m512i round_away(__m512 v) {
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(v, t);
    const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(f), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 one = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(_mm512_set1_ps(1.0f)),
        _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, one));
}

template <bool kSum>
inline void quantize_block8(const float* x, f16_t* dst_d, f16_t* dst_s, int8_t* qs) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i q0 = round_away(_mm512_mul_ps(x0, vid));
    const __m512i q1 = round_away(_mm512_mul_ps(x1, vid));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + 16), _mm512_cvtepi32_epi8(q1));
    *dst_d = fp32_to_fp16(d);
    if (kSum) *dst_s = fp32_to_fp16(static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1))) * d);
}

void from_float_q8_0(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<block_q8_0*>(vy);
    for (int64_t i = 0; i < n / QK8_0; ++i) quantize_block8<false>(x + i * QK8_0, &y[i].d, nullptr, y[i].qs);
}
void from_float_q8_1(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<block_q8_1*>(vy);
    for (int64_t i = 0; i < n / QK8_1; ++i) quantize_block8<true>(x + i * QK8_1, &y[i].d, &y[i].s, y[i].qs);
}

void f32_to_f16(const float* x, f16_t* y, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (i < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(y + i, k, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(k, x + i),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}
void from_float_f16(const float* x, void* y, int64_t n) { f32_to_f16(x, static_cast<f16_t*>(y), static_cast<int>(n)); }

// ---- ops ----------------------------------------------------------------------------------------

inline __mmask16 tail_mask(int left) { return static_cast<__mmask16>((1u << left) - 1); }

float dot_f16_f32(int n, const f16_t* x, const float* y) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(F16W::load(x + i), _mm512_loadu_ps(y + i), acc);
    if (i < n) {
        const __mmask16 k = tail_mask(n - i);
        acc = _mm512_fmadd_ps(F16W::load_tail(x + i, k), _mm512_maskz_loadu_ps(k, y + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

void axpy_f16(int n, float a, const f16_t* x, float* y) {
    const __m512 va = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, F16W::load(x + i), _mm512_loadu_ps(y + i)));
    if (i < n) {
        const __mmask16 k = tail_mask(n - i);
        _mm512_mask_storeu_ps(y + i, k, _mm512_fmadd_ps(va, F16W::load_tail(x + i, k), _mm512_maskz_loadu_ps(k, y + i)));
    }
}

float dot_f32(int n, const float* x, const float* y) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(y + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, y + i), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

void rmsnorm(int n, const float* x, const float* w, float eps, float* y) {
    const float ss = dot_f32(n, x, x);
    const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(ss / static_cast<float>(n) + eps));
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), scale), _mm512_maskz_loadu_ps(k, w + i));
        _mm512_mask_storeu_ps(y + i, k, v);
    }
}

// exp(x) = 2^k * exp(r), r = x - k*ln2 in [-ln2/2, ln2/2]; degree-6 Taylor (~1 ulp), scalef
// handles overflow to inf and underflow to 0.
inline __m512 exp_ps(__m512 x) {
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

void swiglu(int n, const float* g, const float* u, float* y) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(k, u + i)));
    }
}

// ---- the table ----------------------------------------------------------------------------------

IsaTable make_table() {
    const IsaTable& ref = *isa_table_scalar();
    IsaTable t = ref;
    t.isa = Isa::AVX512;
    auto with = [&](DType type, quantize_row_fn from, vec_dot_fn dot, gemm_fn gemm) {
        static TypeKernels store[kMaxDTypeId];
        TypeKernels& k = store[static_cast<int>(type)];
        k = *ref.types[static_cast<int>(type)];
        if (from) k.from_float = from;
        if (dot) k.vec_dot = dot;
        if (gemm) k.gemm = gemm;
        t.types[static_cast<int>(type)] = &k;
    };
    with(DType::Q4_0, nullptr, vec_dot_q<Q4_0T>, gemm_q<Q4_0T>);
    with(DType::Q4_1, nullptr, vec_dot_q<Q4_1T>, gemm_q<Q4_1T>);
    with(DType::Q8_0, from_float_q8_0, vec_dot_q<Q8_0T>, gemm_q<Q8_0T>);
    with(DType::Q8_1, from_float_q8_1, nullptr, nullptr);
    with(DType::F32, nullptr, vec_dot_f<F32W>, gemm_f<F32W>);
    with(DType::F16, from_float_f16, vec_dot_f<F16W>, gemm_f<F16W>);
    with(DType::BF16, nullptr, vec_dot_f<BF16W>, gemm_f<BF16W>);
    t.ops = OpsKernels{dot_f16_f32, axpy_f16, f32_to_f16, dot_f32, rmsnorm, swiglu};
    return t;
}

}  // namespace

const IsaTable* isa_table_avx512() {
    static const IsaTable table = make_table();
    return &table;
}

}  // namespace ts
