// arm_neon.cpp — AArch64 NEON + dotprod kernels: quantized dot products (sdot), register-tiled
// GEMM, GEMM over the x16 packed layout, F16/BF16/F32 weights, activation quantization and the
// layer ops.
//
// Batch invariance: every (weight row, activation row) pair goes through the same float
// operations whatever tile it lands in: per block one exact integer dot product in 4 int32 lanes,
// then acc = fma(float(sumi), dw*da, acc) (+ fma(m, s, acc) for Q4_1), then vaddvq.
#include <arm_neon.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/kernels.h"

namespace ts {
namespace {

#include "kernels/driver.h"

// 32 4-bit weights of one block -> int8 elements 0-15 (lo) and 16-31 (hi), minus `offset`.
inline void nibbles(const uint8_t* qs, int8_t offset, int8x16_t& lo, int8x16_t& hi) {
    const uint8x16_t q = vld1q_u8(qs);
    const int8x16_t off = vdupq_n_s8(offset);
    lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))), off);
    hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), off);
}

inline int32x4_t dot32(int8x16_t wlo, int8x16_t whi, int8x16_t alo, int8x16_t ahi) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), wlo, alo), whi, ahi);
}

struct Q4_0T {
    using WB = block_q4_0;
    using AB = block_q8_0;
    struct W { int8x16_t lo, hi; float32x4_t d; };
    struct A { int8x16_t lo, hi; float32x4_t d; };
    static inline W w(const WB* b) {
        W x;
        nibbles(b->qs, 8, x.lo, x.hi);
        x.d = vdupq_n_f32(fp16_lut(b->d));
        return x;
    }
    static inline A a(const AB* b) { return {vld1q_s8(b->qs), vld1q_s8(b->qs + 16), vdupq_n_f32(fp16_lut(b->d))}; }
    static inline float32x4_t fix(float32x4_t acc, const W&, const A&) { return acc; }
};

struct Q4_1T {
    using WB = block_q4_1;
    using AB = block_q8_1;
    struct W { int8x16_t lo, hi; float32x4_t d, m; };  // m in lane 0, others zero
    struct A { int8x16_t lo, hi; float32x4_t d, s; };
    static inline W w(const WB* b) {
        W x;
        nibbles(b->qs, 0, x.lo, x.hi);
        x.d = vdupq_n_f32(fp16_lut(b->d));
        x.m = vsetq_lane_f32(fp16_lut(b->m), vdupq_n_f32(0.0f), 0);
        return x;
    }
    static inline A a(const AB* b) {
        return {vld1q_s8(b->qs), vld1q_s8(b->qs + 16), vdupq_n_f32(fp16_lut(b->d)), vdupq_n_f32(fp16_lut(b->s))};
    }
    static inline float32x4_t fix(float32x4_t acc, const W& w, const A& a) { return vfmaq_f32(acc, w.m, a.s); }
};

struct Q8_0T {
    using WB = block_q8_0;
    using AB = block_q8_0;
    struct W { int8x16_t lo, hi; float32x4_t d; };
    struct A { int8x16_t lo, hi; float32x4_t d; };
    static inline W w(const WB* b) { return {vld1q_s8(b->qs), vld1q_s8(b->qs + 16), vdupq_n_f32(fp16_lut(b->d))}; }
    static inline A a(const AB* b) { return {vld1q_s8(b->qs), vld1q_s8(b->qs + 16), vdupq_n_f32(fp16_lut(b->d))}; }
    static inline float32x4_t fix(float32x4_t acc, const W&, const A&) { return acc; }
};

template <class T>
inline float32x4_t step(float32x4_t acc, const typename T::W& w, const typename T::A& a) {
    const int32x4_t s = dot32(w.lo, w.hi, a.lo, a.hi);
    acc = vfmaq_f32(acc, vcvtq_f32_s32(s), vmulq_f32(w.d, a.d));
    return T::fix(acc, w, a);
}

template <class T, int R, int C>
void tile_q(int nb, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* out, size_t ldo) {
    using WB = typename T::WB;
    using AB = typename T::AB;
    float32x4_t acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; ++b) {
        typename T::A av[C];
        for (int c = 0; c < C; ++c) av[c] = T::a(reinterpret_cast<const AB*>(a + c * as) + b);
        for (int r = 0; r < R; ++r) {
            const typename T::W wv = T::w(reinterpret_cast<const WB*>(w + r * ws) + b);
            for (int c = 0; c < C; ++c) acc[r][c] = step<T>(acc[r][c], wv, av[c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) out[c * ldo + r] = vaddvq_f32(acc[r][c]);
}

// ---- x16 packed weights (layout in quant.h) -----------------------------------------------------
//
// A 64-byte chunk of a packed block holds the same 4 bytes of 16 weight rows: four registers
// (rows 0-3, 4-7, 8-11, 12-15), one 32-bit lane per row. SDOT by element (vdotq_laneq_s32) against
// the 4 activation bytes of the chunk advances 4 rows at once, each row's block sum in its own
// lane. Weights are made signed first (Q4_0: nibble - 8; Q4_1: nibble; Q8_0: byte ^ 0x80 = q), so
// the integer sum is exact with no correction term. Per (block, activation row, 4-row quad): two
// chains of 4 sdot, one add, one conversion, one scale product dw*da and one fma into the quad's
// accumulator (Q4_1: one more fma m*s). A result depends on its weight row and activation row
// alone: every tile shape runs the very same steps for it (batch invariance).

struct Q4_0P {
    using AB = block_q8_0;
    static constexpr int kScales = 1;
    static constexpr bool kNibbles = true, kMin = false;
    static constexpr int8_t kOffset = 8;
};
struct Q4_1P {
    using AB = block_q8_1;
    static constexpr int kScales = 2;
    static constexpr bool kNibbles = true, kMin = true;
    static constexpr int8_t kOffset = 0;
};
struct Q8_0P {
    using AB = block_q8_0;
    static constexpr int kScales = 1;
    static constexpr bool kNibbles = false, kMin = false;
    static constexpr int8_t kOffset = 0;
};

template <class P>
constexpr size_t x16_block_bytes() {  // one block of 16 rows
    return P::kScales * 32 + (P::kNibbles ? 256 : 512);
}

// Block sum of 4 weight rows (v[j]: elements 4j..4j+3 of each row) against one activation block
// (a0: elements 0-15, a1: 16-31).
inline int32x4_t x16_isum(const int8x16_t* v, int8x16_t a0, int8x16_t a1) {
    int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
    s0 = vdotq_laneq_s32(s0, v[0], a0, 0);
    s1 = vdotq_laneq_s32(s1, v[4], a1, 0);
    s0 = vdotq_laneq_s32(s0, v[1], a0, 1);
    s1 = vdotq_laneq_s32(s1, v[5], a1, 1);
    s0 = vdotq_laneq_s32(s0, v[2], a0, 2);
    s1 = vdotq_laneq_s32(s1, v[6], a1, 2);
    s0 = vdotq_laneq_s32(s0, v[3], a0, 3);
    s1 = vdotq_laneq_s32(s1, v[7], a1, 3);
    return vaddq_s32(s0, s1);
}

// 16 weight rows x C activation rows; out[c * ldo + r] for r < 16.
template <class P, int C>
void tile_x16(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
    using AB = typename P::AB;
    constexpr size_t kBB = x16_block_bytes<P>();
    float32x4_t acc[4][C];
    for (int g = 0; g < 4; ++g)
        for (int c = 0; c < C; ++c) acc[g][c] = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        const auto* dp = reinterpret_cast<const f16_t*>(wb);
        const uint8_t* qp = wb + P::kScales * 32;
        int8x16_t a0[C], a1[C];
        float da[C], sa[C];
        for (int c = 0; c < C; ++c) {
            const AB* blk = reinterpret_cast<const AB*>(a + c * as) + b;
            a0[c] = vld1q_s8(blk->qs);
            a1[c] = vld1q_s8(blk->qs + 16);
            da[c] = fp16_lut(blk->d);
            if constexpr (P::kMin) sa[c] = fp16_lut(blk->s);
        }
        for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g+3
            const float32x4_t dw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(dp + 4 * g)));
            float32x4_t mw = vdupq_n_f32(0.0f);
            if constexpr (P::kMin) mw = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(dp + 16 + 4 * g)));
            int8x16_t v[8];
            if constexpr (P::kNibbles) {
                const int8x16_t off = vdupq_n_s8(P::kOffset);
                for (int j = 0; j < 4; ++j) {
                    const uint8x16_t q = vld1q_u8(qp + 64 * j + 16 * g);
                    v[j] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0f))), off);  // elements 4j..
                    v[4 + j] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), off);             // 16+4j..
                }
            } else {
                for (int j = 0; j < 8; ++j)
                    v[j] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(qp + 64 * j + 16 * g), vdupq_n_u8(0x80)));
            }
            for (int c = 0; c < C; ++c) {
                const int32x4_t s = x16_isum(v, a0[c], a1[c]);
                acc[g][c] = vfmaq_f32(acc[g][c], vcvtq_f32_s32(s), vmulq_n_f32(dw, da[c]));
                if constexpr (P::kMin) acc[g][c] = vfmaq_n_f32(acc[g][c], mw, sa[c]);
            }
        }
    }
    for (int c = 0; c < C; ++c)
        for (int g = 0; g < 4; ++g) vst1q_f32(out + c * ldo + 4 * g, acc[g][c]);
}

// The x16 kernel of type P for the shared driver (driver.h). SDOT is signed x signed, so the
// kernel needs no per-call activation records.
template <class P>
struct X16 {
    static constexpr int kBlock = 32;
    static constexpr int kCols = 4;  // activation rows per tile
    using Acts = X16NoActs;
    static void prep(int, const uint8_t*, size_t, int, Acts&) {}
    template <int C>
    static void tile(int nb, const uint8_t* w, const uint8_t* a, size_t as, const Acts&, int, float* out, size_t ldo) {
        tile_x16<P, C>(nb, w, a, as, out, ldo);
    }
};

// ---- float weights ------------------------------------------------------------------------------

struct F32W {
    using E = float;
    static inline float32x4_t load(const float* p) { return vld1q_f32(p); }
};
struct F16W {
    using E = f16_t;
    static inline float32x4_t load(const f16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
};
struct BF16W {
    using E = bf16_t;
    static inline float32x4_t load(const bf16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
};

template <class T, int R, int C>
void tile_f(int n, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* out, size_t ldo) {
    using E = typename T::E;
    float32x4_t acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = vdupq_n_f32(0.0f);
    auto chunk = [&](const E* const* wp, const float* const* xp) {
        float32x4_t xv[C];
        for (int c = 0; c < C; ++c) xv[c] = vld1q_f32(xp[c]);
        for (int r = 0; r < R; ++r) {
            const float32x4_t wv = T::load(wp[r]);
            for (int c = 0; c < C; ++c) acc[r][c] = vfmaq_f32(acc[r][c], wv, xv[c]);
        }
    };
    const E* wp[R];
    const float* xp[C];
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int r = 0; r < R; ++r) wp[r] = reinterpret_cast<const E*>(w + r * ws) + i;
        for (int c = 0; c < C; ++c) xp[c] = reinterpret_cast<const float*>(a + c * as) + i;
        chunk(wp, xp);
    }
    if (i < n) {
        E wt[R][4] = {};
        float xt[C][4] = {};
        for (int r = 0; r < R; ++r) {
            std::memcpy(wt[r], reinterpret_cast<const E*>(w + r * ws) + i, (n - i) * sizeof(E));
            wp[r] = wt[r];
        }
        for (int c = 0; c < C; ++c) {
            std::memcpy(xt[c], reinterpret_cast<const float*>(a + c * as) + i, (n - i) * sizeof(float));
            xp[c] = xt[c];
        }
        chunk(wp, xp);
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) out[c * ldo + r] = vaddvq_f32(acc[r][c]);
}

// ---- drivers ------------------------------------------------------------------------------------

template <class T, int R, int C>
struct QTile {
    static void run(int len, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* o, size_t l) {
        tile_q<T, R, C>(len, w, ws, a, as, o, l);
    }
};
template <class T, int R, int C>
struct FTile {
    static void run(int len, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* o, size_t l) {
        tile_f<T, R, C>(len, w, ws, a, as, o, l);
    }
};

template <class T>
void gemm_q(int n, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out, size_t ldo) {
    gemm_tiled<QTile, T, 4, 2>(n / 32, nr, nc, w, ws, a, as, out, ldo);
}
template <class T>
void vec_dot_q(int n, float* s, const void* w, const void* a) {
    tile_q<T, 1, 1>(n / 32, static_cast<const uint8_t*>(w), 0, static_cast<const uint8_t*>(a), 0, s, 0);
}
template <class T>
void gemm_f(int n, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out, size_t ldo) {
    gemm_tiled<FTile, T, 4, 2>(n, nr, nc, w, ws, a, as, out, ldo);
}
template <class T>
void vec_dot_f(int n, float* s, const void* w, const void* a) {
    tile_f<T, 1, 1>(n, static_cast<const uint8_t*>(w), 0, static_cast<const uint8_t*>(a), 0, s, 0);
}

// ---- activation quantization (bit-identical to quantize_row_ref: vcvta rounds like roundf) -------

template <bool kSum>
inline void quantize_block8(const float* x, f16_t* dst_d, f16_t* dst_s, int8_t* qs) {
    float32x4_t v[8];
    float32x4_t m = vdupq_n_f32(0.0f);
    for (int j = 0; j < 8; ++j) {
        v[j] = vld1q_f32(x + 4 * j);
        m = vmaxq_f32(m, vabsq_f32(v[j]));
    }
    const float amax = vmaxvq_f32(m);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32x4_t sum = vdupq_n_s32(0);
    for (int j = 0; j < 8; j += 2) {
        const int32x4_t q0 = vcvtaq_s32_f32(vmulq_n_f32(v[j], id));
        const int32x4_t q1 = vcvtaq_s32_f32(vmulq_n_f32(v[j + 1], id));
        sum = vaddq_s32(sum, vaddq_s32(q0, q1));
        const int16x8_t h = vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1));
        vst1_s8(qs + 4 * j, vqmovn_s16(h));
    }
    *dst_d = fp32_to_fp16(d);
    if (kSum) *dst_s = fp32_to_fp16(static_cast<float>(vaddvq_s32(sum)) * d);
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
    for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
    for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}
void from_float_f16(const float* x, void* y, int64_t n) { f32_to_f16(x, static_cast<f16_t*>(y), static_cast<int>(n)); }

// ---- ops ----------------------------------------------------------------------------------------

float dot_f16_f32(int n, const f16_t* x, const float* y) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 4 <= n; i += 4) acc = vfmaq_f32(acc, F16W::load(x + i), vld1q_f32(y + i));
    float s = vaddvq_f32(acc);
    for (; i < n; ++i) s += fp16_lut(x[i]) * y[i];
    return s;
}

void axpy_f16(int n, float a, const f16_t* x, float* y) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), F16W::load(x + i), a));
    for (; i < n; ++i) y[i] += a * fp16_lut(x[i]);
}

float dot_f32(int n, const float* x, const float* y) {
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        acc0 = vfmaq_f32(acc0, vld1q_f32(x + i), vld1q_f32(y + i));
        acc1 = vfmaq_f32(acc1, vld1q_f32(x + i + 4), vld1q_f32(y + i + 4));
    }
    for (; i + 4 <= n; i += 4) acc0 = vfmaq_f32(acc0, vld1q_f32(x + i), vld1q_f32(y + i));
    float s = vaddvq_f32(vaddq_f32(acc0, acc1));
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

void rmsnorm(int n, const float* x, const float* w, float eps, float* y) {
    const float ss = dot_f32(n, x, x);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_f32(vmulq_n_f32(vld1q_f32(x + i), scale), vld1q_f32(w + i)));
    for (; i < n; ++i) y[i] = (x[i] * scale) * w[i];
}

// exp(x) = 2^k * exp(r), degree-6 Taylor; x clamped to [-87, 88.3] so 2^k stays normal.
inline float32x4_t exp_ps(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.3f));
    const float32x4_t k = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_n_f32(x, k, 0.693145751953125f);
    r = vfmsq_n_f32(r, k, 1.428606765330187e-06f);
    float32x4_t p = vdupq_n_f32(1.0f / 720);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(k), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

void swiglu(int n, const float* g, const float* u, float* y) {
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t gv = vld1q_f32(g + i);
        const float32x4_t e = exp_ps(vnegq_f32(gv));
        vst1q_f32(y + i, vmulq_f32(vdivq_f32(gv, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(u + i)));
    }
    for (; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// y = gelu_tanh(g) * u as g * sigmoid(2a) * u, a = sqrt(2/pi) (g + 0.044715 g^3)
void geglu_tanh(int n, const float* g, const float* u, float* y) {
    constexpr float c1 = -2.0f * 0.7978845608028654f, c3 = c1 * 0.044715f;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t gv = vld1q_f32(g + i);
        const float32x4_t e = exp_ps(vmulq_f32(gv, vfmaq_f32(vdupq_n_f32(c1), vmulq_f32(gv, gv), vdupq_n_f32(c3))));
        vst1q_f32(y + i, vmulq_f32(vdivq_f32(gv, vaddq_f32(vdupq_n_f32(1.0f), e)), vld1q_f32(u + i)));
    }
    for (; i < n; ++i) {
        const float x = g[i];
        y[i] = x / (1.0f + std::exp(x * (c1 + c3 * x * x))) * u[i];
    }
}

// ---- attention over one block of the f16 KV cache -------------------------------------------------
// head_dim 64: one head's q (scores) or output (accum) stays in 16 registers across the positions;
// a score is four 4-lane FMA chains (chunks c, c+4, c+8, c+12), summed (0+1)+(2+3), then across
// lanes. Other head dims use dot_f16_f32/axpy_f16 per (head, position). Either way a result never
// depends on n or nq, and accumulation runs j = 0..n-1 in order.

void attn_scores_f16(int hd, int nq, const float* q, const f16_t* k, size_t ks, int n, float scale, float* scores,
                     size_t ld) {
    if (hd != 64) {
        for (int h = 0; h < nq; ++h)
            for (int j = 0; j < n; ++j)
                scores[h * ld + j] = scale * dot_f16_f32(hd, k + (size_t)j * ks, q + (size_t)h * hd);
        return;
    }
    for (int h = 0; h < nq; ++h) {
        float32x4_t qv[16];
        for (int c = 0; c < 16; ++c) qv[c] = vld1q_f32(q + h * 64 + c * 4);
        for (int j = 0; j < n; ++j) {
            const f16_t* kp = k + (size_t)j * ks;
            float32x4_t a[4];
            for (int c = 0; c < 4; ++c) a[c] = vmulq_f32(F16W::load(kp + c * 4), qv[c]);
            for (int c = 4; c < 16; ++c) a[c % 4] = vfmaq_f32(a[c % 4], F16W::load(kp + c * 4), qv[c]);
            scores[h * ld + j] = scale * vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])));
        }
    }
}

void attn_accum_f16(int hd, int nq, const float* p, size_t ld, const f16_t* v, size_t vs, int n, float* out) {
    if (hd != 64) {
        for (int h = 0; h < nq; ++h)
            for (int j = 0; j < n; ++j) axpy_f16(hd, p[h * ld + j], v + (size_t)j * vs, out + (size_t)h * hd);
        return;
    }
    for (int h = 0; h < nq; ++h) {
        float* o = out + h * 64;
        float32x4_t acc[16];
        for (int c = 0; c < 16; ++c) acc[c] = vld1q_f32(o + c * 4);
        for (int j = 0; j < n; ++j) {
            const float w = p[h * ld + j];
            const f16_t* vp = v + (size_t)j * vs;
            for (int c = 0; c < 16; ++c) acc[c] = vfmaq_n_f32(acc[c], F16W::load(vp + c * 4), w);
        }
        for (int c = 0; c < 16; ++c) vst1q_f32(o + c * 4, acc[c]);
    }
}

// ---- the table ----------------------------------------------------------------------------------

}  // namespace

const IsaTable* isa_table_neon() {
    static TypeKernels store[kMaxDTypeId];
    static const IsaTable table = make_isa_table(Isa::NEON, store, {
        {DType::Q4_0, nullptr, vec_dot_q<Q4_0T>, gemm_q<Q4_0T>, gemm_x16<X16<Q4_0P>>},
        {DType::Q4_1, nullptr, vec_dot_q<Q4_1T>, gemm_q<Q4_1T>, gemm_x16<X16<Q4_1P>>},
        {DType::Q8_0, from_float_q8_0, vec_dot_q<Q8_0T>, gemm_q<Q8_0T>, gemm_x16<X16<Q8_0P>>},
        {DType::Q8_1, from_float_q8_1},
        {DType::F32, nullptr, vec_dot_f<F32W>, gemm_f<F32W>},
        {DType::F16, from_float_f16, vec_dot_f<F16W>, gemm_f<F16W>},
        {DType::BF16, nullptr, vec_dot_f<BF16W>, gemm_f<BF16W>},
    }, OpsKernels{dot_f16_f32, axpy_f16, f32_to_f16, dot_f32, rmsnorm, swiglu, attn_scores_f16, attn_accum_f16, nullptr,
                  geglu_tanh});
    return &table;
}

}  // namespace ts
