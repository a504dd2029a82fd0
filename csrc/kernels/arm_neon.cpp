// arm_neon.cpp — AArch64 NEON + dotprod kernels: quantized dot products (sdot), register-tiled
// GEMM, GEMM over the x16 packed layout (every packable type), F16/BF16/F32 weights, activation
// quantization (Q8_0, Q8_1, Q8_K) and the layer ops. The new weight types' file layout (Q5_0 ...
// IQ4_XS unpacked) keeps the scalar kernels.
//
// Batch invariance: every (weight row, activation row) pair goes through the same float
// operations whatever tile it lands in: per block one exact integer dot product in 4 int32 lanes,
// then acc = fma(float(sumi), dw*da, acc) (+ fma(m, s, acc) for Q4_1), then vaddvq.
#include <arm_neon.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels/kernels.h"

namespace ts {
namespace {

#include "kernels/driver.h"
#include "kernels/kv8.h"

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
    struct W {
        int8x16_t lo, hi;
        float32x4_t d;
    };
    struct A {
        int8x16_t lo, hi;
        float32x4_t d;
    };
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
    struct W {
        int8x16_t lo, hi;
        float32x4_t d, m;
    };  // m in lane 0, others zero
    struct A {
        int8x16_t lo, hi;
        float32x4_t d, s;
    };
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
    struct W {
        int8x16_t lo, hi;
        float32x4_t d;
    };
    struct A {
        int8x16_t lo, hi;
        float32x4_t d;
    };
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
// lane. Weights are made signed int8 first (Q4_0: nibble - 8; Q5_0: 5-bit value - 16; Q6_K: 6-bit
// value - 32; IQ4_NL, IQ4_XS: the table value; Q8_0: byte ^ 0x80 = q; Q4_1, Q5_1, Q4_K, Q5_K: the
// value itself, below 32), so every integer sum is exact with no correction term: SDOT has no
// intermediate narrowing, a sub-block sum is below 32 * 128 * 127 < 2^19, and with the sub-block
// scales (|sc| <= 128) a super-block sum stays below 2^28.
//
// Float steps per (block, activation row, 4-row quad):
//   32-element types: acc = fma(float(isum), dw*da, acc), then Q4_1/Q5_1: acc = fma(m, s, acc);
//   K-quants, IQ4_XS: isum = sum_j sc_j * isum_j (int32), acc = fma(float(isum), d*da, acc), then
//   Q4_K/Q5_K: acc = fms(float(sum_j m_j * bsum_j), dmin*da, acc).
// A result depends on its weight row and activation row alone: every tile shape runs the very same
// steps for it (batch invariance).

template <DType T>
constexpr size_t x16_bytes() {  // one packed block (one block of each of 16 rows)
    constexpr X16Shape s = x16_shape(T);
    return static_cast<size_t>(s.halves) * 32 + static_cast<size_t>(s.lead_chunks + s.planes + s.chunks) * 64;
}

// Rows 4g..4g+3 of a 32-byte fp16 section, as floats.
inline float32x4_t x16_halves(const uint8_t* p, int g) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p) + 4 * g)));
}
// Rows 4g..4g+3 of a 64-byte section (chunk or bit plane).
inline uint8x16_t x16_quad(const uint8_t* p, int g) { return vld1q_u8(p + 16 * g); }

// nib (bits 4-7 clear) with bit b of each plane byte as its bit 4 (Q5_*), or bits b, b+1 as its
// bits 4, 5 (Q6_K). A negative shift count of USHL shifts right.
inline uint8x16_t with_bit4(uint8x16_t nib, uint8x16_t plane, int b) {
    return vbslq_u8(vdupq_n_u8(0x10), vshlq_u8(plane, vdupq_n_s8(static_cast<int8_t>(4 - b))), nib);
}
inline uint8x16_t with_bits45(uint8x16_t nib, uint8x16_t plane, int b) {
    return vbslq_u8(vdupq_n_u8(0x30), vshlq_u8(plane, vdupq_n_s8(static_cast<int8_t>(4 - b))), nib);
}

// Byte k of each row's 32-bit lane, zero-extended (kLaneByte) or sign-extended (kLaneTop, then an
// arithmetic shift): TBL gives 0 for the indices 255.
alignas(16) constexpr uint8_t kLaneByte[4][16] = {
    {0, 255, 255, 255, 4, 255, 255, 255, 8, 255, 255, 255, 12, 255, 255, 255},
    {1, 255, 255, 255, 5, 255, 255, 255, 9, 255, 255, 255, 13, 255, 255, 255},
    {2, 255, 255, 255, 6, 255, 255, 255, 10, 255, 255, 255, 14, 255, 255, 255},
    {3, 255, 255, 255, 7, 255, 255, 255, 11, 255, 255, 255, 15, 255, 255, 255}};
alignas(16) constexpr uint8_t kLaneTop[4][16] = {
    {255, 255, 255, 0, 255, 255, 255, 4, 255, 255, 255, 8, 255, 255, 255, 12},
    {255, 255, 255, 1, 255, 255, 255, 5, 255, 255, 255, 9, 255, 255, 255, 13},
    {255, 255, 255, 2, 255, 255, 255, 6, 255, 255, 255, 10, 255, 255, 255, 14},
    {255, 255, 255, 3, 255, 255, 255, 7, 255, 255, 255, 11, 255, 255, 255, 15}};
inline int32x4_t lane_byte_u(uint8x16_t x, int k) {
    return vreinterpretq_s32_u8(vqtbl1q_u8(x, vld1q_u8(kLaneByte[k])));
}
inline int32x4_t lane_byte_s(uint8x16_t x, int k) {
    return vshrq_n_s32(vreinterpretq_s32_u8(vqtbl1q_u8(x, vld1q_u8(kLaneTop[k]))), 24);
}

// Block sum of 4 weight rows (v[j]: elements 4j..4j+3 of each row) against 32 activations
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
// The same over 16 activations a (v[j]: elements 4j..4j+3, j < 4).
inline int32x4_t x16_isum16(const int8x16_t* v, int8x16_t a) {
    int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
    s0 = vdotq_laneq_s32(s0, v[0], a, 0);
    s1 = vdotq_laneq_s32(s1, v[1], a, 1);
    s0 = vdotq_laneq_s32(s0, v[2], a, 2);
    s1 = vdotq_laneq_s32(s1, v[3], a, 3);
    return vaddq_s32(s0, s1);
}

// ---- 32-element blocks: Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, IQ4_NL ----
//
// A decoder D fills v[8] with quad g's signed weights of one packed block: v[j] elements 4j..4j+3
// (chunk j's low nibbles), v[4 + j] elements 16 + 4j.. (chunk j's high nibbles; Q8_0: chunk 4+j).

// The 4 quant chunks' nibbles of quad g through f(nibbles, index into v).
template <class F>
inline void x16_nibbles(const uint8_t* chunks, int g, int8x16_t* v, F f) {
    for (int j = 0; j < 4; ++j) {
        const uint8x16_t q = x16_quad(chunks + 64 * j, g);
        v[j] = f(vandq_u8(q, vdupq_n_u8(0x0f)), j);
        v[4 + j] = f(vshrq_n_u8(q, 4), 4 + j);
    }
}

template <DType T, class A, bool kMinTerm>
struct Dec32 {
    static constexpr DType kType = T;
    using AB = A;
    static constexpr bool kMin = kMinTerm;  // d * q + m: one more fma m * s per block
    static const uint8_t* chunks(const uint8_t* wb) { return wb + x16_chunks_off(T); }
};
struct Q4_0P : Dec32<DType::Q4_0, block_q8_0, false> {
    static void quad(const uint8_t* wb, int g, int8x16_t* v) {
        x16_nibbles(chunks(wb), g, v,
                    [](uint8x16_t n, int) { return vsubq_s8(vreinterpretq_s8_u8(n), vdupq_n_s8(8)); });
    }
};
struct Q4_1P : Dec32<DType::Q4_1, block_q8_1, true> {
    static void quad(const uint8_t* wb, int g, int8x16_t* v) {
        x16_nibbles(chunks(wb), g, v, [](uint8x16_t n, int) { return vreinterpretq_s8_u8(n); });
    }
};
struct Q8_0P : Dec32<DType::Q8_0, block_q8_0, false> {
    static void quad(const uint8_t* wb, int g, int8x16_t* v) {
        for (int j = 0; j < 8; ++j)
            v[j] = vreinterpretq_s8_u8(veorq_u8(x16_quad(chunks(wb) + 64 * j, g), vdupq_n_u8(0x80)));
    }
};
// Q5_0/Q5_1: bit t of the one bit plane is the fifth bit of v[t]'s elements.
struct Q5_0P : Dec32<DType::Q5_0, block_q8_0, false> {
    static void quad(const uint8_t* wb, int g, int8x16_t* v) {
        const uint8x16_t p = x16_quad(wb + x16_planes_off(kType), g);
        x16_nibbles(chunks(wb), g, v, [p](uint8x16_t n, int t) {
            return vsubq_s8(vreinterpretq_s8_u8(with_bit4(n, p, t)), vdupq_n_s8(16));
        });
    }
};
struct Q5_1P : Dec32<DType::Q5_1, block_q8_1, true> {
    static void quad(const uint8_t* wb, int g, int8x16_t* v) {
        const uint8x16_t p = x16_quad(wb + x16_planes_off(kType), g);
        x16_nibbles(chunks(wb), g, v, [p](uint8x16_t n, int t) { return vreinterpretq_s8_u8(with_bit4(n, p, t)); });
    }
};
struct IQ4_NLP : Dec32<DType::IQ4_NL, block_q8_0, false> {
    static void quad(const uint8_t* wb, int g, int8x16_t* v) {
        const int8x16_t tab = vld1q_s8(kIQ4NL);
        x16_nibbles(chunks(wb), g, v, [tab](uint8x16_t n, int) { return vqtbl1q_s8(tab, n); });
    }
};

// 16 weight rows x C activation rows; out[c * ldo + r] for r < 16.
template <class D, int C>
void tile_x16_32(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
    using AB = typename D::AB;
    constexpr size_t kBB = x16_bytes<D::kType>();
    float32x4_t acc[4][C];
    for (int g = 0; g < 4; ++g)
        for (int c = 0; c < C; ++c) acc[g][c] = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        int8x16_t a0[C], a1[C];
        float da[C], sa[C];
        for (int c = 0; c < C; ++c) {
            const AB* blk = reinterpret_cast<const AB*>(a + c * as) + b;
            a0[c] = vld1q_s8(blk->qs);
            a1[c] = vld1q_s8(blk->qs + 16);
            da[c] = fp16_lut(blk->d);
            if constexpr (D::kMin) sa[c] = fp16_lut(blk->s);
        }
        for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g+3
            const float32x4_t dw = x16_halves(wb, g);
            float32x4_t mw = vdupq_n_f32(0.0f);
            if constexpr (D::kMin) mw = x16_halves(wb + 32, g);
            int8x16_t v[8];
            D::quad(wb, g, v);
            for (int c = 0; c < C; ++c) {
                const int32x4_t s = x16_isum(v, a0[c], a1[c]);
                acc[g][c] = vfmaq_f32(acc[g][c], vcvtq_f32_s32(s), vmulq_n_f32(dw, da[c]));
                if constexpr (D::kMin) acc[g][c] = vfmaq_n_f32(acc[g][c], mw, sa[c]);
            }
        }
    }
    for (int c = 0; c < C; ++c)
        for (int g = 0; g < 4; ++g) vst1q_f32(out + c * ldo + 4 * g, acc[g][c]);
}

template <class D>
struct Block32 {
    static constexpr int kBlock = 32;
    template <int C>
    static void run(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
        tile_x16_32<D, C>(nb, w, a, as, out, ldo);
    }
};

// ---- 256-element super-blocks against Q8_K: Q4_K, Q5_K, Q6_K, IQ4_XS ----

inline const block_q8_K* q8k(const uint8_t* a, size_t as, int c, int b) {
    return reinterpret_cast<const block_q8_K*>(a + c * as) + b;
}

// Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scales and mins (quant.h). Quant chunks 8k..8k+7 hold
// sub-block 2k in their low nibbles and 2k+1 in their high nibbles (elements 64k + 4i.. and
// 64k + 32 + 4i.. for chunk 8k + i); Q5_K's bit plane 2k + i/4 has their fifth bits at 2(i%4)
// (low) and 2(i%4) + 1 (high).
template <bool kQ5>
struct Q45_KP {
    static constexpr DType kType = kQ5 ? DType::Q5_K : DType::Q4_K;
    static constexpr int kBlock = QK_K;
    template <int C>
    static void run(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
        constexpr size_t kBB = x16_bytes<kType>();
        const uint8x16_t m0f = vdupq_n_u8(0x0f), m3f = vdupq_n_u8(0x3f), m30 = vdupq_n_u8(0x30);
        float32x4_t acc[4][C];
        for (int g = 0; g < 4; ++g)
            for (int c = 0; c < C; ++c) acc[g][c] = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
            const uint8_t* lead = wb + x16_lead_off(kType);
            const uint8_t* planes = wb + x16_planes_off(kType);
            const uint8_t* chunks = wb + x16_chunks_off(kType);
            const block_q8_K* ab[C];
            int32x4_t bs[C][2];  // activation sums per sub-block of 32: j = 0..3, 4..7
            for (int c = 0; c < C; ++c) {
                ab[c] = q8k(a, as, c, b);
                const int16x8_t s = vpaddq_s16(vld1q_s16(ab[c]->bsums), vld1q_s16(ab[c]->bsums + 8));
                bs[c][0] = vmovl_s16(vget_low_s16(s));
                bs[c][1] = vmovl_high_s16(s);
            }
            for (int g = 0; g < 4; ++g) {
                const float32x4_t d = x16_halves(wb, g), dmin = x16_halves(wb + 32, g);
                // scales[0..3], [4..7], [8..11] of each row -> sc_j, m_j (j < 4: bytes j of s0, s1;
                // j >= 4: low / high nibble of s2 byte j-4, top 2 bits from s0 / s1 byte j-4)
                const uint8x16_t s0 = x16_quad(lead, g), s1 = x16_quad(lead + 64, g), s2 = x16_quad(lead + 128, g);
                const uint8x16_t sc_lo = vandq_u8(s0, m3f), mn_lo = vandq_u8(s1, m3f);
                const uint8x16_t sc_hi = vorrq_u8(vandq_u8(s2, m0f), vandq_u8(vshrq_n_u8(s0, 2), m30));
                const uint8x16_t mn_hi = vorrq_u8(vshrq_n_u8(s2, 4), vandq_u8(vshrq_n_u8(s1, 2), m30));
                int32x4_t sc[8], mn[8];
                for (int k = 0; k < 4; ++k) {
                    sc[k] = lane_byte_u(sc_lo, k);
                    sc[4 + k] = lane_byte_u(sc_hi, k);
                    mn[k] = lane_byte_u(mn_lo, k);
                    mn[4 + k] = lane_byte_u(mn_hi, k);
                }
                int32x4_t isum[C], msum[C];
                for (int c = 0; c < C; ++c) {
                    msum[c] = vmulq_laneq_s32(mn[0], bs[c][0], 0);
                    msum[c] = vmlaq_laneq_s32(msum[c], mn[1], bs[c][0], 1);
                    msum[c] = vmlaq_laneq_s32(msum[c], mn[2], bs[c][0], 2);
                    msum[c] = vmlaq_laneq_s32(msum[c], mn[3], bs[c][0], 3);
                    msum[c] = vmlaq_laneq_s32(msum[c], mn[4], bs[c][1], 0);
                    msum[c] = vmlaq_laneq_s32(msum[c], mn[5], bs[c][1], 1);
                    msum[c] = vmlaq_laneq_s32(msum[c], mn[6], bs[c][1], 2);
                    msum[c] = vmlaq_laneq_s32(msum[c], mn[7], bs[c][1], 3);
                    isum[c] = vdupq_n_s32(0);
                }
                for (int k = 0; k < 4; ++k) {
                    int8x16_t lo[8], hi[8];
                    uint8x16_t p[2] = {vdupq_n_u8(0), vdupq_n_u8(0)};
                    if constexpr (kQ5)
                        p[0] = x16_quad(planes + 64 * (2 * k), g), p[1] = x16_quad(planes + 64 * (2 * k + 1), g);
                    for (int i = 0; i < 8; ++i) {
                        const uint8x16_t q = x16_quad(chunks + 64 * (8 * k + i), g);
                        uint8x16_t l = vandq_u8(q, m0f), h = vshrq_n_u8(q, 4);
                        if constexpr (kQ5) {
                            l = with_bit4(l, p[i / 4], 2 * (i % 4));
                            h = with_bit4(h, p[i / 4], 2 * (i % 4) + 1);
                        }
                        lo[i] = vreinterpretq_s8_u8(l);
                        hi[i] = vreinterpretq_s8_u8(h);
                    }
                    for (int c = 0; c < C; ++c) {
                        const int8_t* q8 = ab[c]->qs + 64 * k;
                        const int32x4_t sl = x16_isum(lo, vld1q_s8(q8), vld1q_s8(q8 + 16));
                        const int32x4_t sh = x16_isum(hi, vld1q_s8(q8 + 32), vld1q_s8(q8 + 48));
                        isum[c] = vmlaq_s32(vmlaq_s32(isum[c], sl, sc[2 * k]), sh, sc[2 * k + 1]);
                    }
                }
                for (int c = 0; c < C; ++c) {
                    acc[g][c] = vfmaq_f32(acc[g][c], vcvtq_f32_s32(isum[c]), vmulq_n_f32(d, ab[c]->d));
                    acc[g][c] = vfmsq_f32(acc[g][c], vcvtq_f32_s32(msum[c]), vmulq_n_f32(dmin, ab[c]->d));
                }
            }
        }
        for (int c = 0; c < C; ++c)
            for (int g = 0; g < 4; ++g) vst1q_f32(out + c * ldo + 4 * g, acc[g][c]);
    }
};

// Q6_K: 16 sub-blocks of 16 with int8 scales (lead chunk i: scales[4i..4i+3]). In half h of the
// block, quant chunks 16h + 4s + i (i < 4) hold sub-block 8h + s in their low nibbles (elements
// 128h + 16s + 4i..) and 8h + 4 + s in their high nibbles (64 elements further); bit plane
// 8h + 2s + i/2 has their top 2 bits at 4(i%2) (low) and 4(i%2) + 2 (high).
struct Q6_KP {
    static constexpr DType kType = DType::Q6_K;
    static constexpr int kBlock = QK_K;
    template <int C>
    static void run(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
        constexpr size_t kBB = x16_bytes<kType>();
        const uint8x16_t m0f = vdupq_n_u8(0x0f);
        const int8x16_t k32 = vdupq_n_s8(32);
        float32x4_t acc[4][C];
        for (int g = 0; g < 4; ++g)
            for (int c = 0; c < C; ++c) acc[g][c] = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
            const uint8_t* lead = wb + x16_lead_off(kType);
            const uint8_t* planes = wb + x16_planes_off(kType);
            const uint8_t* chunks = wb + x16_chunks_off(kType);
            const block_q8_K* ab[C];
            for (int c = 0; c < C; ++c) ab[c] = q8k(a, as, c, b);
            for (int g = 0; g < 4; ++g) {
                const float32x4_t d = x16_halves(wb, g);
                int32x4_t sc[16];
                for (int i = 0; i < 4; ++i) {
                    const uint8x16_t s = x16_quad(lead + 64 * i, g);
                    for (int k = 0; k < 4; ++k) sc[4 * i + k] = lane_byte_s(s, k);
                }
                int32x4_t isum[C];
                for (int c = 0; c < C; ++c) isum[c] = vdupq_n_s32(0);
                for (int h = 0; h < 2; ++h)
                    for (int s = 0; s < 4; ++s) {
                        const uint8x16_t p[2] = {x16_quad(planes + 64 * (8 * h + 2 * s), g),
                                                 x16_quad(planes + 64 * (8 * h + 2 * s + 1), g)};
                        int8x16_t lo[4], hi[4];
                        for (int i = 0; i < 4; ++i) {
                            const uint8x16_t q = x16_quad(chunks + 64 * (16 * h + 4 * s + i), g);
                            const int t = 4 * (i % 2);
                            lo[i] = vsubq_s8(vreinterpretq_s8_u8(with_bits45(vandq_u8(q, m0f), p[i / 2], t)), k32);
                            hi[i] = vsubq_s8(vreinterpretq_s8_u8(with_bits45(vshrq_n_u8(q, 4), p[i / 2], t + 2)), k32);
                        }
                        for (int c = 0; c < C; ++c) {
                            const int8_t* q8 = ab[c]->qs + 128 * h + 16 * s;
                            const int32x4_t sl = x16_isum16(lo, vld1q_s8(q8));
                            const int32x4_t sh = x16_isum16(hi, vld1q_s8(q8 + 64));
                            isum[c] = vmlaq_s32(vmlaq_s32(isum[c], sl, sc[8 * h + s]), sh, sc[8 * h + 4 + s]);
                        }
                    }
                for (int c = 0; c < C; ++c)
                    acc[g][c] = vfmaq_f32(acc[g][c], vcvtq_f32_s32(isum[c]), vmulq_n_f32(d, ab[c]->d));
            }
        }
        for (int c = 0; c < C; ++c)
            for (int g = 0; g < 4; ++g) vst1q_f32(out + c * ldo + 4 * g, acc[g][c]);
    }
};

// IQ4_XS: 8 sub-blocks of 32, scale ls_j - 32 (low 4 bits: nibble j of scales_l, the lead chunk;
// high 2 bits: bits 2j of scales_h, the second fp16 section). Quant chunks 4j..4j+3 hold sub-block
// j as IQ4_NL's chunks hold a block.
struct IQ4_XSP {
    static constexpr DType kType = DType::IQ4_XS;
    static constexpr int kBlock = QK_K;
    template <int C>
    static void run(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
        constexpr size_t kBB = x16_bytes<kType>();
        const uint8x16_t m0f = vdupq_n_u8(0x0f);
        const int8x16_t tab = vld1q_s8(kIQ4NL);
        float32x4_t acc[4][C];
        for (int g = 0; g < 4; ++g)
            for (int c = 0; c < C; ++c) acc[g][c] = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
            const uint8_t* chunks = wb + x16_chunks_off(kType);
            const block_q8_K* ab[C];
            for (int c = 0; c < C; ++c) ab[c] = q8k(a, as, c, b);
            for (int g = 0; g < 4; ++g) {
                const float32x4_t d = x16_halves(wb, g);
                const uint32x4_t sh = vmovl_u16(vld1_u16(reinterpret_cast<const uint16_t*>(wb + 32) + 4 * g));
                const uint32x4_t sl = vreinterpretq_u32_u8(x16_quad(wb + x16_lead_off(kType), g));
                int32x4_t ls[8];
                for (int j = 0; j < 8; ++j) {
                    const uint32x4_t lo = vandq_u32(vshlq_u32(sl, vdupq_n_s32(-4 * j)), vdupq_n_u32(0x0f));
                    const uint32x4_t hi = vandq_u32(vshlq_u32(sh, vdupq_n_s32(4 - 2 * j)), vdupq_n_u32(0x30));
                    ls[j] = vsubq_s32(vreinterpretq_s32_u32(vorrq_u32(lo, hi)), vdupq_n_s32(32));
                }
                int32x4_t isum[C];
                for (int c = 0; c < C; ++c) isum[c] = vdupq_n_s32(0);
                for (int j = 0; j < 8; ++j) {
                    int8x16_t v[8];
                    for (int i = 0; i < 4; ++i) {
                        const uint8x16_t q = x16_quad(chunks + 64 * (4 * j + i), g);
                        v[i] = vqtbl1q_s8(tab, vandq_u8(q, m0f));
                        v[4 + i] = vqtbl1q_s8(tab, vshrq_n_u8(q, 4));
                    }
                    for (int c = 0; c < C; ++c) {
                        const int8_t* q8 = ab[c]->qs + 32 * j;
                        isum[c] = vmlaq_s32(isum[c], x16_isum(v, vld1q_s8(q8), vld1q_s8(q8 + 16)), ls[j]);
                    }
                }
                for (int c = 0; c < C; ++c)
                    acc[g][c] = vfmaq_f32(acc[g][c], vcvtq_f32_s32(isum[c]), vmulq_n_f32(d, ab[c]->d));
            }
        }
        for (int c = 0; c < C; ++c)
            for (int g = 0; g < 4; ++g) vst1q_f32(out + c * ldo + 4 * g, acc[g][c]);
    }
};

// The x16 kernel of P (Block32<decoder> or a super-block kernel) for the shared driver
// (driver.h). SDOT is signed x signed, so the kernel needs no per-call activation records.
template <class P>
struct X16 {
    static constexpr int kBlock = P::kBlock;
    static constexpr int kCols = 4;  // activation rows per tile
    static constexpr bool kStreams = false;
    using Acts = X16NoActs;
    static void prep(int, const uint8_t*, size_t, int, Acts&) {}
    template <int C>
    static void tile(int nb, const uint8_t* w, const uint8_t* a, size_t as, const Acts&, int, float* out, size_t ldo) {
        P::template run<C>(nb, w, a, as, out, ldo);
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

// Q8_K (as quantize_row_ref): per 256 elements, iscale = -127 / (the first element of largest
// magnitude), q = round-half-even(iscale * x) capped at 127 (vcvtn rounds so), d = 1 / iscale, and
// the sums of each 16 quants. FMAXNM skips NaNs as the reference's comparison does.
void from_float_q8_K(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<block_q8_K*>(vy);
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
        float32x4_t m = vdupq_n_f32(0.0f);
        for (int j = 0; j < QK_K; j += 4) m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(x + j)));
        const float amax = vmaxnmvq_f32(m);
        block_q8_K& b = y[i];
        if (amax == 0.0f) {
            std::memset(&b, 0, sizeof(b));
            continue;
        }
        int first = 0;
        while (first < QK_K - 1 && std::fabs(x[first]) != amax) ++first;
        const float iscale = -127.0f / x[first];
        const int32x4_t cap = vdupq_n_s32(127);
        for (int j = 0; j < QK_K; j += 16) {
            int32x4_t q[4];
            for (int t = 0; t < 4; ++t)
                q[t] = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(x + j + 4 * t), iscale)), cap);
            const int8x16_t q8 = vcombine_s8(vqmovn_s16(vcombine_s16(vqmovn_s32(q[0]), vqmovn_s32(q[1]))),
                                             vqmovn_s16(vcombine_s16(vqmovn_s32(q[2]), vqmovn_s32(q[3]))));
            vst1q_s8(b.qs + j, q8);
            b.bsums[j / 16] = vaddlvq_s8(q8);
        }
        b.d = 1.0f / iscale;
    }
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

// ---- attention over one block of the int8 KV cache (layout in kernels.h) -------------------------
// Scores: a K chunk is 4 registers of 4 positions x 4 elements; sdot by lane against the chunk's 4
// query bytes advances each position's int32 sum (exact). Then the reference's float steps, 4
// positions per instruction; heads go up to 2 at a time over one pass of the tile.

// The 16 query bytes of chunks 4u..4u+3 (zero past the record's chunks).
inline int8x16_t q_quad(const uint8_t* qs, int u, int C) {
    if (4 * u + 4 <= C) return vld1q_s8(reinterpret_cast<const int8_t*>(qs) + 16 * u);
    int8_t t[16] = {};
    std::memcpy(t, qs + 16 * u, (size_t)(C - 4 * u) * 4);
    return vld1q_s8(t);
}

template <int NQ>
inline void q8_tile(const KV8Layout& L, const uint8_t* q, size_t qb, const uint8_t* tile, float32x4_t (&s)[NQ][4]) {
    const int G = L.groups(), C = L.chunks();
    const auto* dk = reinterpret_cast<const f16_t*>(tile + L.k_scales_offset());
    for (int h = 0; h < NQ; ++h)
        for (int r = 0; r < 4; ++r) s[h][r] = vdupq_n_f32(0.0f);
    for (int g = 0; g < G; ++g) {
        int32x4_t acc[NQ][4];
        for (int h = 0; h < NQ; ++h)
            for (int r = 0; r < 4; ++r) acc[h][r] = vdupq_n_s32(0);
        const int c1 = std::min(C, 8 * (g + 1));
        for (int c0 = 8 * g; c0 < c1; c0 += 4) {  // four chunks share one query load
            int8x16_t qv[NQ];
            for (int h = 0; h < NQ; ++h) qv[h] = q_quad(q + h * qb, c0 / 4, C);
            auto chunk = [&](auto lane) {
                const int c = c0 + decltype(lane)::value;
                if (c >= c1) return;
                const int8_t* kp = reinterpret_cast<const int8_t*>(tile + 64 * c);
                const int8x16_t k0 = vld1q_s8(kp), k1 = vld1q_s8(kp + 16), k2 = vld1q_s8(kp + 32),
                                k3 = vld1q_s8(kp + 48);
                for (int h = 0; h < NQ; ++h) {
                    acc[h][0] = vdotq_laneq_s32(acc[h][0], k0, qv[h], decltype(lane)::value);
                    acc[h][1] = vdotq_laneq_s32(acc[h][1], k1, qv[h], decltype(lane)::value);
                    acc[h][2] = vdotq_laneq_s32(acc[h][2], k2, qv[h], decltype(lane)::value);
                    acc[h][3] = vdotq_laneq_s32(acc[h][3], k3, qv[h], decltype(lane)::value);
                }
            };
            chunk(std::integral_constant<int, 0>{});
            chunk(std::integral_constant<int, 1>{});
            chunk(std::integral_constant<int, 2>{});
            chunk(std::integral_constant<int, 3>{});
        }
        for (int h = 0; h < NQ; ++h) {
            float dq;
            std::memcpy(&dq, q + h * qb + 4 * C + 4 * g, 4);
            for (int r = 0; r < 4; ++r)
                s[h][r] = vfmaq_f32(s[h][r], vcvtq_f32_s32(acc[h][r]),
                                    vmulq_n_f32(F16W::load(dk + kKV8Tile * g + 4 * r), dq));
        }
    }
}

template <int NQ>
void scores_q8(const KV8Layout& L, const uint8_t* q, const uint8_t* k_run, int j0, int n, float scale, float* scores,
               size_t ld) {
    const size_t qb = L.query_bytes(), tb = L.k_tile_bytes();
    for (int t0 = j0 / kKV8Tile * kKV8Tile; t0 < j0 + n; t0 += kKV8Tile) {
        const int a = std::max(j0, t0), b = std::min(j0 + n, t0 + kKV8Tile);
        float32x4_t sv[NQ][4];
        q8_tile<NQ>(L, q, qb, k_run + (size_t)(t0 / kKV8Tile) * tb, sv);
        for (int h = 0; h < NQ; ++h) {
            float t[16];
            for (int r = 0; r < 4; ++r) vst1q_f32(t + 4 * r, vmulq_n_f32(sv[h][r], scale));
            for (int j = a; j < b; ++j) scores[h * ld + (j - j0)] = t[j - t0];
        }
    }
}

void attn_scores_q8(const KV8Layout& L, int nq, const uint8_t* q, const uint8_t* k_run, int j0, int n, float scale,
                    float* scores, size_t ld) {
    const size_t qb = L.query_bytes();
    int h = 0;
    for (; h + 2 <= nq; h += 2) scores_q8<2>(L, q + h * qb, k_run, j0, n, scale, scores + h * ld, ld);
    if (h < nq) scores_q8<1>(L, q + h * qb, k_run, j0, n, scale, scores + h * ld, ld);
}

// 16 int8 as four float32x4_t.
inline void v16(const int8_t* p, float32x4_t (&f)[4]) {
    const int8x16_t b = vld1q_s8(p);
    const int16x8_t lo = vmovl_s8(vget_low_s8(b)), hi = vmovl_s8(vget_high_s8(b));
    f[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
    f[1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(lo)));
    f[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
    f[3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(hi)));
}

// out += (p_j * d_v[j][g]) * v_j for j = j0.. in order, one FMA per element (std::fma in the tail).
void attn_accum_q8(const KV8Layout& L, int nq, const float* p, size_t ld, const uint8_t* v_run, int j0, int n,
                   float* out) {
    const int hd = L.hd, G = L.groups();
    const auto* dv = reinterpret_cast<const f16_t*>(v_run + L.v_scales_offset());
    for (int h = 0; h < nq; ++h) {
        float* o = out + (size_t)h * hd;
        int i = 0;
        for (; i + 16 <= hd; i += 16) {  // 16 elements never straddle a group of 32
            const int g = i / kKV8Group;
            float32x4_t acc[4];
            for (int r = 0; r < 4; ++r) acc[r] = vld1q_f32(o + i + 4 * r);
            for (int j = j0; j < j0 + n; ++j) {
                const float w = p[h * ld + (j - j0)] * fp16_lut(dv[(size_t)j * G + g]);
                float32x4_t f[4];
                v16(reinterpret_cast<const int8_t*>(v_run + (size_t)j * hd + i), f);
                for (int r = 0; r < 4; ++r) acc[r] = vfmaq_n_f32(acc[r], f[r], w);
            }
            for (int r = 0; r < 4; ++r) vst1q_f32(o + i + 4 * r, acc[r]);
        }
        for (; i < hd; ++i) {
            const int g = i / kKV8Group;
            for (int j = j0; j < j0 + n; ++j) {
                const float w = p[h * ld + (j - j0)] * fp16_lut(dv[(size_t)j * G + g]);
                o[i] =
                    std::fma(w, static_cast<float>(reinterpret_cast<const int8_t*>(v_run)[(size_t)j * hd + i]), o[i]);
            }
        }
    }
}

// ---- the int8 KV cache's quantizers (kv8.h; bit-identical to kv8_store / kv8_quantize_query) ------
// One group of 32 as q8_group: max|x| by FMAXNM (a NaN element is skipped as std::fmax skips it),
// d = amax / 127 and id = 1 / d in float, q = roundf(x * id) (vcvta: ties away from zero), and a q
// outside [-128, 127] stored as 0 (vcvta saturates an overflow and gives 0 for a NaN).
float kv8_group(const float* x, int8_t* qs, int32_t* sum) {
    float32x4_t v[8];
    float32x4_t m = vdupq_n_f32(0.0f);
    for (int j = 0; j < 8; ++j) {
        v[j] = vld1q_f32(x + 4 * j);
        m = vmaxnmq_f32(m, vabsq_f32(v[j]));
    }
    const float d = vmaxnmvq_f32(m) / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int32x4_t s = vdupq_n_s32(0);
    for (int j = 0; j < 8; j += 2) {
        int32x4_t q[2];
        for (int h = 0; h < 2; ++h) {
            q[h] = vcvtaq_s32_f32(vmulq_n_f32(v[j + h], id));
            const uint32x4_t ok = vandq_u32(vcgeq_s32(q[h], vdupq_n_s32(-128)), vcleq_s32(q[h], vdupq_n_s32(127)));
            q[h] = vandq_s32(q[h], vreinterpretq_s32_u32(ok));
        }
        s = vaddq_s32(s, vaddq_s32(q[0], q[1]));
        vst1_s8(qs + 4 * j, vmovn_s16(vcombine_s16(vmovn_s32(q[0]), vmovn_s32(q[1]))));
    }
    *sum = vaddvq_s32(s);
    return d;
}

// ---- the table ----------------------------------------------------------------------------------

}  // namespace

const IsaTable* isa_table_neon() {
    static TypeKernels store[kMaxDTypeId];
    static const IsaTable table = make_isa_table(
        Isa::NEON, store,
        {
            {DType::Q4_0, nullptr, vec_dot_q<Q4_0T>, gemm_q<Q4_0T>, gemm_x16<X16<Block32<Q4_0P>>>},
            {DType::Q4_1, nullptr, vec_dot_q<Q4_1T>, gemm_q<Q4_1T>, gemm_x16<X16<Block32<Q4_1P>>>},
            {DType::Q8_0, from_float_q8_0, vec_dot_q<Q8_0T>, gemm_q<Q8_0T>, gemm_x16<X16<Block32<Q8_0P>>>},
            {DType::Q8_1, from_float_q8_1},
            {DType::Q5_0, nullptr, nullptr, nullptr, gemm_x16<X16<Block32<Q5_0P>>>},
            {DType::Q5_1, nullptr, nullptr, nullptr, gemm_x16<X16<Block32<Q5_1P>>>},
            {DType::IQ4_NL, nullptr, nullptr, nullptr, gemm_x16<X16<Block32<IQ4_NLP>>>},
            {DType::Q4_K, nullptr, nullptr, nullptr, gemm_x16<X16<Q45_KP<false>>>},
            {DType::Q5_K, nullptr, nullptr, nullptr, gemm_x16<X16<Q45_KP<true>>>},
            {DType::Q6_K, nullptr, nullptr, nullptr, gemm_x16<X16<Q6_KP>>},
            {DType::IQ4_XS, nullptr, nullptr, nullptr, gemm_x16<X16<IQ4_XSP>>},
            {DType::Q8_K, from_float_q8_K},
            {DType::F32, nullptr, vec_dot_f<F32W>, gemm_f<F32W>},
            {DType::F16, from_float_f16, vec_dot_f<F16W>, gemm_f<F16W>},
            {DType::BF16, nullptr, vec_dot_f<BF16W>, gemm_f<BF16W>},
        },
        OpsKernels{dot_f16_f32, axpy_f16, f32_to_f16, dot_f32, rmsnorm, swiglu, attn_scores_f16, attn_accum_f16,
                   nullptr, geglu_tanh, attn_scores_q8, attn_accum_q8, kv8_store_with<kv8_group>,
                   kv8_quantize_query_with<kv8_group>});
    return &table;
}

}  // namespace ts
