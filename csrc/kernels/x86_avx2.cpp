// x86_avx2.cpp — AVX2 + FMA + F16C kernels: quantized dot products (pmaddubsw/pmaddwd),
// register-tiled GEMM, F16/BF16/F32 weights, activation quantization and the layer ops.
// Q5_0, Q5_1, IQ4_NL, Q4_K, Q5_K, Q6_K and IQ4_XS have x16 packed kernels only; on the file's
// layout they use the scalar table's kernels.
//
// Batch invariance: every (weight row, activation row) pair goes through the same float
// operations whatever tile it lands in: per block one exact integer dot product in 8 int32 lanes,
// then acc = fma(float(sumi), dw*da, acc) (+ fma(m, s, acc) for Q4_1), then one fixed horizontal
// reduction. Tiles only share the unpacking of weights and activations, which is exact.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/kernels.h"

namespace ts {
namespace {

#include "kernels/driver.h"
#include "kernels/kv8.h"

inline __m128i load128(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Fixed-order sum of 8 lanes: (lo128 + hi128), then pairs, then the last two.
inline float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

// 32 4-bit weights of one block -> 32 u8 in element order [lo nibbles (0-15) | hi nibbles (16-31)]
inline __m256i nibbles(const uint8_t* qs) {
    const __m128i q = load128(qs);
    const __m256i z = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
    return _mm256_and_si256(z, _mm256_set1_epi8(0x0f));
}

inline __m256i sum_i16_pairs(__m256i x) { return _mm256_madd_epi16(x, _mm256_set1_epi16(1)); }

// ---- quantized types: one block per step (records W/A are the unpacked block) --------------------------------------------------------

// Q4_0 x Q8_0: sum((q-8)*a) = sum(q*a) - sum(8*a), both as pmaddubsw pairs (|.| <= 3810, no
// saturation), subtracted in 16 bits, then widened.
struct Q4_0T {
    using WB = block_q4_0;
    using AB = block_q8_0;
    struct W {
        __m256i q;
        __m256 d;
    };
    struct A {
        __m256i q;
        __m256 d;
        __m256i c16;
    };
    static inline W w(const WB* b) { return {nibbles(b->qs), _mm256_set1_ps(fp16_lut(b->d))}; }
    static inline A a(const AB* b) {
        const __m256i q = load256(b->qs);
        return {q, _mm256_set1_ps(fp16_lut(b->d)), _mm256_maddubs_epi16(_mm256_set1_epi8(8), q)};
    }
    static inline __m256i dot(const W& w, const A& a) {
        return sum_i16_pairs(_mm256_sub_epi16(_mm256_maddubs_epi16(w.q, a.q), a.c16));
    }
    static inline __m256 fix(__m256 acc, const W&, const A&) { return acc; }
};

// Q4_1 x Q8_1: d4*d8*sum(q*a) + m*s; m sits in lane 0 (others zero).
struct Q4_1T {
    using WB = block_q4_1;
    using AB = block_q8_1;
    struct W {
        __m256i q;
        __m256 d, m;
    };
    struct A {
        __m256i q;
        __m256 d, s;
    };
    static inline W w(const WB* b) {
        return {nibbles(b->qs), _mm256_set1_ps(fp16_lut(b->d)), _mm256_castps128_ps256(_mm_set_ss(fp16_lut(b->m)))};
    }
    static inline A a(const AB* b) {
        return {load256(b->qs), _mm256_set1_ps(fp16_lut(b->d)), _mm256_set1_ps(fp16_lut(b->s))};
    }
    static inline __m256i dot(const W& w, const A& a) { return sum_i16_pairs(_mm256_maddubs_epi16(w.q, a.q)); }
    static inline __m256 fix(__m256 acc, const W& w, const A& a) { return _mm256_fmadd_ps(w.m, a.s, acc); }
};

// Q8_0 x Q8_0: pmaddubsw(|w|, a * sign(w)) (|pair| <= 2*127*127, no saturation).
struct Q8_0T {
    using WB = block_q8_0;
    using AB = block_q8_0;
    struct W {
        __m256i q, absq;
        __m256 d;
    };
    struct A {
        __m256i q;
        __m256 d;
    };
    static inline W w(const WB* b) {
        const __m256i q = load256(b->qs);
        return {q, _mm256_sign_epi8(q, q), _mm256_set1_ps(fp16_lut(b->d))};
    }
    static inline A a(const AB* b) { return {load256(b->qs), _mm256_set1_ps(fp16_lut(b->d))}; }
    static inline __m256i dot(const W& w, const A& a) {
        return sum_i16_pairs(_mm256_maddubs_epi16(w.absq, _mm256_sign_epi8(a.q, w.q)));
    }
    static inline __m256 fix(__m256 acc, const W&, const A&) { return acc; }
};

// The one float step every (weight row, activation row) pair goes through, whatever the tile.
template <class T>
inline __m256 step(__m256 acc, const typename T::W& w, const typename T::A& a) {
    const __m256i s = T::dot(w, a);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(w.d, a.d), acc);
    return T::fix(acc, w, a);
}

// ---- quantized drivers --------------------------------------------------------------------------
//
// A gemm call unpacks each activation row once (per-block records) and, when several column
// tiles reuse them, each weight tile once; tiles then only run the pair steps. vec_dot and every
// tile shape run exactly the same per-pair steps in the same order.

template <class T>
struct QScratch {
    std::vector<typename T::A> a;  // [activation row][block]
    std::vector<typename T::W> w;  // [weight row of the current tile][block]
};
template <class T>
QScratch<T>& qscratch() {
    thread_local QScratch<T> s;
    return s;
}

template <class T>
void prep_acts(int nb, const uint8_t* a, size_t as, int nc, typename T::A* out) {
    for (int c = 0; c < nc; ++c) {
        const auto* row = reinterpret_cast<const typename T::AB*>(a + c * as);
        for (int b = 0; b < nb; ++b) out[static_cast<size_t>(c) * nb + b] = T::a(row + b);
    }
}

template <class T>
void prep_weights(int nb, const uint8_t* w, size_t ws, int nr, typename T::W* out) {
    for (int r = 0; r < nr; ++r) {
        const auto* row = reinterpret_cast<const typename T::WB*>(w + r * ws);
        for (int b = 0; b < nb; ++b) out[static_cast<size_t>(r) * nb + b] = T::w(row + b);
    }
}

template <int R, int C>
inline void store_acc(const __m256 (&acc)[R][C], float* out, size_t ldo) {
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) out[c * ldo + r] = hsum(acc[r][c]);
}

// R weight rows x C activation rows, both unpacked ([row][block]).
template <class T, int R, int C>
void tile_pre(int nb, const typename T::W* w, const typename T::A* a, float* out, size_t ldo) {
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b)
        for (int r = 0; r < R; ++r) {
            const typename T::W& wv = w[static_cast<size_t>(r) * nb + b];
            for (int c = 0; c < C; ++c) acc[r][c] = step<T>(acc[r][c], wv, a[static_cast<size_t>(c) * nb + b]);
        }
    store_acc<R, C>(acc, out, ldo);
}

// R weight rows straight from memory (each used once: GEMV) x C unpacked activation rows.
template <class T, int R, int C>
void tile_raw(int nb, const uint8_t* w, size_t ws, const typename T::A* a, float* out, size_t ldo) {
    using WB = typename T::WB;
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b)
        for (int r = 0; r < R; ++r) {
            // weights stream from DRAM (one row at a time streams best): prefetch 2 KB ahead
            _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<const WB*>(w + r * ws) + b) + 2048,
                         _MM_HINT_T0);
            const typename T::W wv = T::w(reinterpret_cast<const WB*>(w + r * ws) + b);
            for (int c = 0; c < C; ++c) acc[r][c] = step<T>(acc[r][c], wv, a[static_cast<size_t>(c) * nb + b]);
        }
    store_acc<R, C>(acc, out, ldo);
}

constexpr int kQR = 4;  // weight rows per tile
constexpr int kQC = 2;  // activation rows per tile (16 ymm registers)

template <class T, int R>
void raw_rows(int nb, const uint8_t* w, size_t ws, int nc, const typename T::A* a, float* out, size_t ldo) {
    if (nc == 1)
        tile_raw<T, R, 1>(nb, w, ws, a, out, ldo);
    else
        tile_raw<T, R, 2>(nb, w, ws, a, out, ldo);
}

template <class T, int R>
void pre_cols(int nb, const typename T::W* w, int nc, const typename T::A* a, float* out, size_t ldo) {
    int c = 0;
    for (; c + kQC <= nc; c += kQC) tile_pre<T, R, kQC>(nb, w, a + static_cast<size_t>(c) * nb, out + c * ldo, ldo);
    if (c < nc) tile_pre<T, R, 1>(nb, w, a + static_cast<size_t>(c) * nb, out + c * ldo, ldo);
}

template <class T>
void gemm_q(int n, int nr, int nc, const void* vw, size_t ws, const void* va, size_t as, float* out, size_t ldo) {
    if (nr <= 0 || nc <= 0) return;
    const auto* w = static_cast<const uint8_t*>(vw);
    const int nb = n / 32;
    QScratch<T>& s = qscratch<T>();
    if (s.a.size() < static_cast<size_t>(nc) * nb) s.a.resize(static_cast<size_t>(nc) * nb);
    prep_acts<T>(nb, static_cast<const uint8_t*>(va), as, nc, s.a.data());
    const typename T::A* a = s.a.data();
    if (nc <= kQC) {  // weights are used once: unpack them on the fly, one row at a time
        for (int r = 0; r < nr; ++r) raw_rows<T, 1>(nb, w + r * ws, ws, nc, a, out + r, ldo);
        return;
    }
    if (s.w.size() < static_cast<size_t>(kQR) * nb) s.w.resize(static_cast<size_t>(kQR) * nb);
    typename T::W* wp = s.w.data();
    int r = 0;
    for (; r + kQR <= nr; r += kQR) {
        prep_weights<T>(nb, w + r * ws, ws, kQR, wp);
        pre_cols<T, kQR>(nb, wp, nc, a, out + r, ldo);
    }
    for (; r < nr; ++r) {
        prep_weights<T>(nb, w + r * ws, ws, 1, wp);
        pre_cols<T, 1>(nb, wp, nc, a, out + r, ldo);
    }
}

template <class T>
void vec_dot_q(int n, float* s, const void* w, const void* a) {
    gemm_q<T>(n, 1, 1, w, 0, a, 0, s, 1);
}

// ---- x16 packed weights (layout in quant.h) -----------------------------------------------------
//
// A 64-byte chunk holds the same 4 bytes of 16 weight rows: two registers, rows 0-7 and 8-15.
// Against 4 broadcast activation bytes, pmaddubsw + pmaddwd advance 8 rows per register and each
// row's block sum ends in its own dword lane (no horizontal sums). Per (block, activation row) and
// half: the exact integer dot product, one conversion, one scale product and one fma into a lane
// per weight row (Q4_1/Q5_1: one more fma for m*s; Q4_K/Q5_K: one more for the mins). A result is
// a function of its weight row and activation row alone: every tile shape, GEMV or GEMM, runs the
// very same steps for it, and the integer sums are exact whatever order they are taken in.
//
// pmaddubsw (u8 x s8, pairs summed into int16) saturates: every int16 sum below is bounded by a
// comment. Activations are at most 127 in magnitude (Q8_0/Q8_1/Q8_K quantization); the bounds
// allow 128.
//
// "Element group" k (0..7) of a 32-element block is elements 4k..4k+3: quant chunk j gives groups
// j (low nibbles) and 4+j (high nibbles); Q8_0 chunk k is group k.

constexpr size_t packed_block_bytes(DType t) {  // one packed block of 16 rows
    return static_cast<size_t>(x16_chunks_off(t)) + 64 * static_cast<size_t>(x16_shape(t).chunks);
}

// 32-element block types. kCorr: a constant subtracted from every quant (k * sum(a) joins the
// integer sum); kMin: d*q + m (+ m * s, s = d_a * sum(a) from the Q8_1 block).
struct Q4_0P {  // d * (q - 8)
    static constexpr DType kType = DType::Q4_0;
    using AB = block_q8_0;
    static constexpr int kCorr = -8;
    static constexpr bool kMin = false;
};
struct Q4_1P {  // d * q + m
    static constexpr DType kType = DType::Q4_1;
    using AB = block_q8_1;
    static constexpr int kCorr = 0;
    static constexpr bool kMin = true;
};
struct Q5_0P {  // d * (q - 16), q 5-bit
    static constexpr DType kType = DType::Q5_0;
    using AB = block_q8_0;
    static constexpr int kCorr = -16;
    static constexpr bool kMin = false;
};
struct Q5_1P {  // d * q + m, q 5-bit
    static constexpr DType kType = DType::Q5_1;
    using AB = block_q8_1;
    static constexpr int kCorr = 0;
    static constexpr bool kMin = true;
};
struct IQ4_NLP {  // d * kIQ4NL[q]
    static constexpr DType kType = DType::IQ4_NL;
    using AB = block_q8_0;
    static constexpr int kCorr = 0;
    static constexpr bool kMin = false;
};
struct Q8_0P {  // stored q + 128: (q + 128) * a pairs would saturate pmaddubsw, so undo the xor
    static constexpr DType kType = DType::Q8_0;  // and use |q| * sign(a, q) (|pair| <= 2*128*127)
    using AB = block_q8_0;
    static constexpr int kCorr = 0;
    static constexpr bool kMin = false;
};

// The records of activation rows [c0, ...) of an X16Acts, nb per row.
struct X16View {
    const float* d;
    const float* s;
    const int32_t* corr;
    static X16View of(const X16Acts& x, size_t off) {
        return {x.d.data() + off, x.s.data() + off, x.corr.data() + off};
    }
};

inline int32_t hsum_i32(__m256i v) {
    __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
    x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1));
    return _mm_cvtsi128_si32(x);
}

template <class P>
void x16_prep_acts(int nb, const uint8_t* a, size_t as, int nc, X16Acts& x) {
    using AB = typename P::AB;
    x.resize(static_cast<size_t>(nb) * nc);
    for (int c = 0; c < nc; ++c)
        for (int b = 0; b < nb; ++b) {
            const AB* blk = reinterpret_cast<const AB*>(a + c * as) + b;
            const size_t i = static_cast<size_t>(c) * nb + b;
            x.d[i] = fp16_lut(blk->d);
            if constexpr (P::kMin) x.s[i] = fp16_lut(blk->s);
            if constexpr (P::kCorr != 0) {
                const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), load256(blk->qs));
                x.corr[i] = P::kCorr * hsum_i32(sum_i16_pairs(pairs));
            }
        }
}

inline __m256i bcast4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

// Bits [From, From + width) of every byte moved to [To, To + width), the other bits cleared
// (`mask` = the target bits in every byte). 16-bit shifts never carry a neighbouring byte's bit into
// the target bits.
template <int From, int To>
inline __m256i move_bits(__m256i v, __m256i mask) {
    if constexpr (From <= To)
        return _mm256_and_si256(_mm256_slli_epi16(v, To - From), mask);
    else
        return _mm256_and_si256(_mm256_srli_epi16(v, From - To), mask);
}

// f(std::integral_constant<int, I>{}) for I = 0 .. N-1, in order: loop bodies whose shift counts
// must be immediates.
template <class F, int... I>
inline void unroll_seq(F&& f, std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void unroll(F&& f) {
    unroll_seq(f, std::make_integer_sequence<int, N>{});
}

// Per-lane scale extraction: byte b0 and byte b1 of each dword lane become its two int16 halves,
// zero-extended (kSigned: sign-extended).
template <bool kSigned = false>
inline __m256i dword_bytes_i16(__m256i v, int b0, int b1) {
    const __m256i lane = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4, 4, 8,
                                          8, 8, 8, 12, 12, 12, 12);
    if constexpr (kSigned) {  // byte to the top of each int16, then an arithmetic shift
        const __m256i idx =
            _mm256_add_epi8(_mm256_set1_epi32(static_cast<int>(0x00800080u | (b0 << 8) | (b1 << 24))), lane);
        return _mm256_srai_epi16(_mm256_shuffle_epi8(v, idx), 8);
    } else {
        const __m256i idx = _mm256_add_epi8(_mm256_set1_epi32(static_cast<int>(0x80008000u | b0 | (b1 << 16))), lane);
        return _mm256_shuffle_epi8(v, idx);
    }
}

// The IQ4 table in both 128-bit lanes (vpshufb looks up within a lane).
inline __m256i iq4_table() { return _mm256_broadcastsi128_si256(load128(kIQ4NL)); }

// Signed weights w (|w| <= 127) times activations: pmaddubsw(|w|, sign(a, w)), one pair <= 2*127*128
// (no room to add a second pair in 16 bits), widened with pmaddwd against m (ones, or scales).
inline __m256i dot_signed(__m256i absw, __m256i w, __m256i a, __m256i m) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(absw, _mm256_sign_epi8(a, w)), m);
}

// A tile of fewer than kGemvCols activation rows is a GEMV, bound by its weight stream: each block
// asks for the one gemv_ahead<kBB>() on (driver.h), as the AVX-512 tile does.
constexpr int kGemvCols = 4;

// 16 weight rows x C activation rows of a 32-element type; out[c * ldo + r] for r < 16.
template <class P, int C>
void tile_x16(int nb, const uint8_t* w, const uint8_t* a, size_t as, X16View x, float* out, size_t ldo) {
    constexpr DType T = P::kType;
    using AB = typename P::AB;
    constexpr size_t kBB = packed_block_bytes(T);
    constexpr bool kQ8 = x16_shape(T).chunks == 8, kPlane = x16_shape(T).planes == 1, kTable = T == DType::IQ4_NL;
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0f);
    __m256 acc[C][2];
    for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    const bool gemv_pf = C < kGemvCols && gemv_prefetch();
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        if (gemv_pf) prefetch_share<kBB, gemv_ahead<kBB>(), 1>(wb, 0);
        const uint8_t* qp = wb + x16_chunks_off(T);
        const int8_t* q[C];
        for (int c = 0; c < C; ++c) q[c] = reinterpret_cast<const AB*>(a + c * as)[b].qs;
        __m256i s[C][2];
        for (int c = 0; c < C; ++c) s[c][0] = s[c][1] = _mm256_setzero_si256();
        if constexpr (kQ8) {
            const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
            for (int k = 0; k < 8; ++k) {
                __m256i sq[2], aq[2];
                for (int h = 0; h < 2; ++h) {
                    sq[h] = _mm256_xor_si256(load256(qp + 64 * k + 32 * h), flip);  // q, signed
                    aq[h] = _mm256_abs_epi8(sq[h]);                                 // |-128| = 128 read as unsigned
                }
                for (int c = 0; c < C; ++c) {
                    const __m256i av = bcast4(q[c] + 4 * k);
                    for (int h = 0; h < 2; ++h) s[c][h] = _mm256_add_epi32(s[c][h], dot_signed(aq[h], sq[h], av, ones));
                }
            }
        } else if constexpr (kTable) {  // IQ4_NL: the table's values are signed, |v| <= 127
            const __m256i tab = iq4_table();
            for (int j = 0; j < 4; ++j) {
                __m256i lo[2], hi[2], alo[2], ahi[2];
                for (int h = 0; h < 2; ++h) {
                    const __m256i v = load256(qp + 64 * j + 32 * h);
                    lo[h] = _mm256_shuffle_epi8(tab, _mm256_and_si256(v, m4));                        // group j
                    hi[h] = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));  // group 4 + j
                    alo[h] = _mm256_abs_epi8(lo[h]);
                    ahi[h] = _mm256_abs_epi8(hi[h]);
                }
                for (int c = 0; c < C; ++c) {
                    const __m256i al = bcast4(q[c] + 4 * j), ah = bcast4(q[c] + 16 + 4 * j);
                    for (int h = 0; h < 2; ++h)
                        s[c][h] = _mm256_add_epi32(s[c][h], _mm256_add_epi32(dot_signed(alo[h], lo[h], al, ones),
                                                                             dot_signed(ahi[h], hi[h], ah, ones)));
                }
            }
        } else {  // unsigned 4- or 5-bit quants, pairs summed in 16 bits over a run of chunks:
            // Q4: 4 chunks, 8 pairs of at most 2*15*128 (<= 30720); Q5: 2 chunks, 4 pairs of at
            // most 2*31*128 (<= 31744).
            constexpr int kRun = kPlane ? 2 : 4;
            __m256i plane[2];
            if constexpr (kPlane)
                for (int h = 0; h < 2; ++h) plane[h] = load256(wb + x16_planes_off(T) + 32 * h);
            const __m256i m10 = _mm256_set1_epi8(0x10);
            unroll<4 / kRun>([&](auto run) {
                __m256i s16[C][2];
                for (int c = 0; c < C; ++c) s16[c][0] = s16[c][1] = _mm256_setzero_si256();
                unroll<kRun>([&](auto i) {
                    constexpr int j = kRun * run + i;
                    __m256i lo[2], hi[2];
                    for (int h = 0; h < 2; ++h) {
                        const __m256i v = load256(qp + 64 * j + 32 * h);
                        lo[h] = _mm256_and_si256(v, m4);                        // group j
                        hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);  // group 4 + j
                        if constexpr (kPlane) {  // fifth bits: plane bit j (group j), 4 + j (group 4 + j)
                            lo[h] = _mm256_or_si256(lo[h], move_bits<j, 4>(plane[h], m10));
                            hi[h] = _mm256_or_si256(hi[h], move_bits<4 + j, 4>(plane[h], m10));
                        }
                    }
                    for (int c = 0; c < C; ++c) {
                        const __m256i al = bcast4(q[c] + 4 * j), ah = bcast4(q[c] + 16 + 4 * j);
                        for (int h = 0; h < 2; ++h)
                            s16[c][h] = _mm256_add_epi16(s16[c][h], _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], al),
                                                                                     _mm256_maddubs_epi16(hi[h], ah)));
                    }
                });
                for (int c = 0; c < C; ++c)
                    for (int h = 0; h < 2; ++h) s[c][h] = _mm256_add_epi32(s[c][h], _mm256_madd_epi16(s16[c][h], ones));
            });
        }
        for (int h = 0; h < 2; ++h) {
            const __m256 dw = _mm256_cvtph_ps(load128(wb + 16 * h));
            __m256 mw = _mm256_setzero_ps();
            if constexpr (P::kMin) mw = _mm256_cvtph_ps(load128(wb + 32 + 16 * h));
            for (int c = 0; c < C; ++c) {
                const size_t i = static_cast<size_t>(c) * nb + b;
                __m256i si = s[c][h];
                if constexpr (P::kCorr != 0) si = _mm256_add_epi32(si, _mm256_set1_epi32(x.corr[i]));
                const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(x.d[i]));
                acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), sc, acc[c][h]);
                if constexpr (P::kMin) acc[c][h] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s[i]), acc[c][h]);
            }
        }
    }
    for (int c = 0; c < C; ++c)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + c * ldo + 8 * h, acc[c][h]);
}

// The x16 kernel of a 32-element type P for the shared driver (driver.h).
template <class P>
struct X16 {
    static constexpr int kBlock = 32;
    static constexpr int kCols = 4;  // activation rows per tile (measured: 4 > 3 > 2 > 1, spills and all)
    static constexpr bool kStreams = false;
    using Acts = X16Acts;
    static void prep(int nb, const uint8_t* a, size_t as, int nc, Acts& x) { x16_prep_acts<P>(nb, a, as, nc, x); }
    template <int C>
    static void tile(int nb, const uint8_t* w, const uint8_t* a, size_t as, const Acts& x, int c0, float* out,
                     size_t ldo) {
        tile_x16<P, C>(nb, w, a, as, X16View::of(x, static_cast<size_t>(c0) * nb), out, ldo);
    }
};

// ---- x16: the 256-element super-block types against Q8_K ---------------------------------------
//
// Per super-block and (activation row, half): the exact integer sum of sc_j * (sub-block j's dot
// product) in each row's lane: sub-block products are pairs summed in 16 bits over a run of
// chunks, then one pmaddwd against that row's scale (an int16 pair per lane) widens and scales
// them at once. Then the reference's float steps: acc += float(isum) * (d * d8), and for
// Q4_K/Q5_K acc -= float(msum) * (dmin * d8), msum = the mins against the activation's 32-element
// sums. The kernels read the activation blocks directly (Q8_K carries its float d and its sums).

inline const block_q8_K* q8k_block(const uint8_t* a, size_t as, int c, int b) {
    return reinterpret_cast<const block_q8_K*>(a + c * as) + b;
}

// Software prefetch for the types whose packed block is read in two streams at once (bit planes
// and quant chunks), which the hardware prefetchers follow badly: 2 lines per quant chunk, so the
// block 2 blocks ahead is requested spread over this block's 32 chunks. Measured (GEMV, one row):
// Q5_K ~8 -> ~22 GB/s, Q6_K ~6 -> ~24 GB/s; prefetching the sequential types only slowed them.
template <size_t kBB>
inline void prefetch_for_chunk(const uint8_t* wb, int j) {
    constexpr size_t kAhead = 2;
    const char* p = reinterpret_cast<const char*>(wb + kAhead * kBB + 128 * j);
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + 64, _MM_HINT_T0);
}

// Q4_K / Q5_K. Quant chunk j = 8k + i holds elements 64k + 4i.. (low nibbles, sub-block 2k) and
// 64k + 32 + 4i.. (high nibbles, sub-block 2k + 1).
template <bool kQ5, int C>
void tile_q45k(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
    constexpr DType T = kQ5 ? DType::Q5_K : DType::Q4_K;
    constexpr size_t kBB = packed_block_bytes(T);
    // Q4: 8 chunks, 8 pairs of at most 2*15*128 (<= 30720); Q5: 4 chunks, 4 pairs of at most
    // 2*31*128 (<= 31744).
    constexpr int kRun = kQ5 ? 4 : 8;
    const __m256i m4 = _mm256_set1_epi8(0x0f), m10 = _mm256_set1_epi8(0x10), m30 = _mm256_set1_epi8(0x30),
                  m3f = _mm256_set1_epi8(0x3f), ones = _mm256_set1_epi16(1);
    __m256 acc[C][2];
    for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        const uint8_t* lead = wb + x16_lead_off(T);
        const uint8_t* qp = wb + x16_chunks_off(T);
        // The 6-bit scales and mins of each row (quant.h), sc[g][h] byte i = sc_{4g+i}, mn alike.
        __m256i sc[2][2], mn[2][2];
        for (int h = 0; h < 2; ++h) {
            const __m256i c0 = load256(lead + 32 * h), c1 = load256(lead + 64 + 32 * h),
                          c2 = load256(lead + 128 + 32 * h);
            sc[0][h] = _mm256_and_si256(c0, m3f);
            mn[0][h] = _mm256_and_si256(c1, m3f);
            sc[1][h] = _mm256_or_si256(_mm256_and_si256(c2, m4), move_bits<6, 4>(c0, m30));
            mn[1][h] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c2, 4), m4), move_bits<6, 4>(c1, m30));
        }
        const int8_t* q[C];
        for (int c = 0; c < C; ++c) q[c] = q8k_block(a, as, c, b)->qs;
        __m256i isum[C][2], msum[C][2];
        // mins: msum = sum_j m_j * (bsums[2j] + bsums[2j + 1]), as int16 pairs (|sum of 32| <= 4096)
        for (int c = 0; c < C; ++c) {
            const __m256i s32 = _mm256_madd_epi16(load256(q8k_block(a, as, c, b)->bsums), ones);
            alignas(16) int32_t bsp[4];  // int16 pairs (sum of sub-block 2p, sum of 2p + 1)
            _mm_store_si128(reinterpret_cast<__m128i*>(bsp),
                            _mm_packs_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1)));
            for (int h = 0; h < 2; ++h) isum[c][h] = msum[c][h] = _mm256_setzero_si256();
            for (int p = 0; p < 4; ++p) {
                const __m256i bs = _mm256_set1_epi32(bsp[p]);
                for (int h = 0; h < 2; ++h)
                    msum[c][h] = _mm256_add_epi32(
                        msum[c][h], _mm256_madd_epi16(dword_bytes_i16(mn[p / 2][h], 2 * (p % 2), 2 * (p % 2) + 1), bs));
            }
        }
        for (int k = 0; k < 4; ++k) {
            __m256i slo[2], shi[2];  // the scales of sub-blocks 2k and 2k + 1
            for (int h = 0; h < 2; ++h) {
                slo[h] = dword_bytes_i16(sc[k / 2][h], (2 * k) % 4, (2 * k) % 4);
                shi[h] = dword_bytes_i16(sc[k / 2][h], (2 * k + 1) % 4, (2 * k + 1) % 4);
            }
            for (int i0 = 0; i0 < 8; i0 += kRun) {
                __m256i s16lo[C][2], s16hi[C][2];
                for (int c = 0; c < C; ++c)
                    for (int h = 0; h < 2; ++h) s16lo[c][h] = s16hi[c][h] = _mm256_setzero_si256();
                unroll<kRun>([&](auto ii) {  // kRun divides 8: chunk j = 8k + i0 + ii has j % 4 = ii % 4
                    const int i = i0 + ii, j = 8 * k + i;
                    __m256i lo[2], hi[2];
                    if constexpr (kQ5) prefetch_for_chunk<kBB>(wb, j);
                    for (int h = 0; h < 2; ++h) {
                        const __m256i v = load256(qp + 64 * j + 32 * h);
                        lo[h] = _mm256_and_si256(v, m4);
                        hi[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                        if constexpr (kQ5) {  // plane j / 4: bit 2(j % 4) (low nibble), + 1 (high)
                            const __m256i pl = load256(wb + x16_planes_off(T) + 64 * (j / 4) + 32 * h);
                            lo[h] = _mm256_or_si256(lo[h], move_bits<2 * (ii % 4), 4>(pl, m10));
                            hi[h] = _mm256_or_si256(hi[h], move_bits<2 * (ii % 4) + 1, 4>(pl, m10));
                        }
                    }
                    for (int c = 0; c < C; ++c) {
                        const __m256i al = bcast4(q[c] + 64 * k + 4 * i), ah = bcast4(q[c] + 64 * k + 32 + 4 * i);
                        for (int h = 0; h < 2; ++h) {
                            s16lo[c][h] = _mm256_add_epi16(s16lo[c][h], _mm256_maddubs_epi16(lo[h], al));
                            s16hi[c][h] = _mm256_add_epi16(s16hi[c][h], _mm256_maddubs_epi16(hi[h], ah));
                        }
                    }
                });
                for (int c = 0; c < C; ++c)
                    for (int h = 0; h < 2; ++h)
                        isum[c][h] =
                            _mm256_add_epi32(isum[c][h], _mm256_add_epi32(_mm256_madd_epi16(s16lo[c][h], slo[h]),
                                                                          _mm256_madd_epi16(s16hi[c][h], shi[h])));
            }
        }
        for (int h = 0; h < 2; ++h) {
            const __m256 dw = _mm256_cvtph_ps(load128(wb + 16 * h)), mw = _mm256_cvtph_ps(load128(wb + 32 + 16 * h));
            for (int c = 0; c < C; ++c) {
                const __m256 d8 = _mm256_set1_ps(q8k_block(a, as, c, b)->d);
                acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c][h]), _mm256_mul_ps(dw, d8), acc[c][h]);
                acc[c][h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum[c][h]), _mm256_mul_ps(mw, d8), acc[c][h]);
            }
        }
    }
    for (int c = 0; c < C; ++c)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + c * ldo + 8 * h, acc[c][h]);
}

// Q6_K: q 6-bit (low 4 in the quant chunks, top 2 in the planes), y = d * sc_j * (q - 32) with 16
// signed 8-bit scales per super-block. Quant chunk j = 16n + 4s + t holds elements 128n + 16s + 4t..
// (low nibbles, sub-block 8n + s) and 128n + 64 + 16s + 4t.. (high nibbles, sub-block 8n + 4 + s).
// isum = sum_j sc_j * sum(q * a) - 32 * sum_j sc_j * bsums[j].
template <int C>
void tile_q6k(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
    constexpr DType T = DType::Q6_K;
    constexpr size_t kBB = packed_block_bytes(T);
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    __m256 acc[C][2];
    for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        const uint8_t* lead = wb + x16_lead_off(T);  // chunk g: scales[4g .. 4g + 3] of each row
        const uint8_t* planes = wb + x16_planes_off(T);
        const uint8_t* qp = wb + x16_chunks_off(T);
        const int8_t* q[C];
        for (int c = 0; c < C; ++c) q[c] = q8k_block(a, as, c, b)->qs;
        __m256i isum[C][2], corr[C][2];
        for (int c = 0; c < C; ++c)
            for (int h = 0; h < 2; ++h) isum[c][h] = corr[c][h] = _mm256_setzero_si256();
        for (int p = 0; p < 8; ++p) {  // corr = sum_j sc_j * bsums[j], sub-blocks 2p and 2p + 1 at once
            __m256i sp[2];
            for (int h = 0; h < 2; ++h)
                sp[h] = dword_bytes_i16<true>(load256(lead + 64 * (p / 2) + 32 * h), 2 * (p % 2), 2 * (p % 2) + 1);
            for (int c = 0; c < C; ++c) {
                int32_t pair;  // bsums[2p], bsums[2p + 1]
                std::memcpy(&pair, q8k_block(a, as, c, b)->bsums + 2 * p, 4);
                const __m256i bs = _mm256_set1_epi32(pair);
                for (int h = 0; h < 2; ++h) corr[c][h] = _mm256_add_epi32(corr[c][h], _mm256_madd_epi16(sp[h], bs));
            }
        }
        for (int n = 0; n < 2; ++n)
            for (int s = 0; s < 4; ++s) {
                const int jlo = 8 * n + s, jhi = 8 * n + 4 + s;  // sub-blocks
                __m256i slo[2], shi[2];
                for (int h = 0; h < 2; ++h) {
                    slo[h] = dword_bytes_i16<true>(load256(lead + 64 * (jlo / 4) + 32 * h), jlo % 4, jlo % 4);
                    shi[h] = dword_bytes_i16<true>(load256(lead + 64 * (jhi / 4) + 32 * h), jhi % 4, jhi % 4);
                }
                // runs of 2 chunks (one plane): 4 pairs of at most 2*63*128 (<= 32256) in 16 bits
                for (int t0 = 0; t0 < 4; t0 += 2) {
                    const int v = (16 * n + 4 * s + t0) / 2;  // the plane of chunks 2v, 2v + 1
                    __m256i s16lo[C][2], s16hi[C][2];
                    for (int c = 0; c < C; ++c)
                        for (int h = 0; h < 2; ++h) s16lo[c][h] = s16hi[c][h] = _mm256_setzero_si256();
                    unroll<2>([&](auto i) {
                        const int t = t0 + i, j = 16 * n + 4 * s + t;
                        __m256i lo[2], hi[2];
                        prefetch_for_chunk<kBB>(wb, j);
                        for (int h = 0; h < 2; ++h) {
                            const __m256i x = load256(qp + 64 * j + 32 * h), pl = load256(planes + 64 * v + 32 * h);
                            lo[h] = _mm256_or_si256(_mm256_and_si256(x, m4), move_bits<4 * i, 4>(pl, m30));
                            hi[h] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(x, 4), m4),
                                                    move_bits<4 * i + 2, 4>(pl, m30));
                        }
                        for (int c = 0; c < C; ++c) {
                            const __m256i al = bcast4(q[c] + 128 * n + 16 * s + 4 * t);
                            const __m256i ah = bcast4(q[c] + 128 * n + 64 + 16 * s + 4 * t);
                            for (int h = 0; h < 2; ++h) {
                                s16lo[c][h] = _mm256_add_epi16(s16lo[c][h], _mm256_maddubs_epi16(lo[h], al));
                                s16hi[c][h] = _mm256_add_epi16(s16hi[c][h], _mm256_maddubs_epi16(hi[h], ah));
                            }
                        }
                    });
                    for (int c = 0; c < C; ++c)
                        for (int h = 0; h < 2; ++h)
                            isum[c][h] =
                                _mm256_add_epi32(isum[c][h], _mm256_add_epi32(_mm256_madd_epi16(s16lo[c][h], slo[h]),
                                                                              _mm256_madd_epi16(s16hi[c][h], shi[h])));
                }
            }
        for (int h = 0; h < 2; ++h) {
            const __m256 dw = _mm256_cvtph_ps(load128(wb + 16 * h));
            for (int c = 0; c < C; ++c) {
                const __m256i si = _mm256_sub_epi32(isum[c][h], _mm256_slli_epi32(corr[c][h], 5));
                const __m256 d8 = _mm256_set1_ps(q8k_block(a, as, c, b)->d);
                acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(dw, d8), acc[c][h]);
            }
        }
    }
    for (int c = 0; c < C; ++c)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + c * ldo + 8 * h, acc[c][h]);
}

// IQ4_XS: y = d * (ls_j - 32) * kIQ4NL[q] over 8 sub-blocks of 32; quant chunk j = 4g + t holds
// elements 32g + 4t.. (low nibbles) and 32g + 16 + 4t.. (high nibbles), both of sub-block g.
template <int C>
void tile_iq4xs(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
    constexpr DType T = DType::IQ4_XS;
    constexpr size_t kBB = packed_block_bytes(T);
    const __m256i m4 = _mm256_set1_epi8(0x0f), tab = iq4_table();
    __m256 acc[C][2];
    for (int c = 0; c < C; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        const uint8_t* qp = wb + x16_chunks_off(T);
        __m256i sh[2], sl[2];  // each row's scales_h (16 bits) and scales_l (4 bytes) in its lane
        for (int h = 0; h < 2; ++h) {
            sh[h] = _mm256_cvtepu16_epi32(load128(wb + 32 + 16 * h));
            sl[h] = load256(wb + x16_lead_off(T) + 32 * h);
        }
        const int8_t* q[C];
        for (int c = 0; c < C; ++c) q[c] = q8k_block(a, as, c, b)->qs;
        __m256i isum[C][2];
        for (int c = 0; c < C; ++c) isum[c][0] = isum[c][1] = _mm256_setzero_si256();
        for (int g = 0; g < 8; ++g) {
            __m256i ls[2];  // ls_g - 32 in both int16 halves of each lane: scales_l nibble g, scales_h bits 2g, 2g + 1
            for (int h = 0; h < 2; ++h) {
                const __m256i lo4 = _mm256_and_si256(_mm256_srli_epi32(sl[h], 4 * g), _mm256_set1_epi32(0x0f));
                const __m256i hi2 = _mm256_and_si256(_mm256_srli_epi32(sh[h], 2 * g), _mm256_set1_epi32(3));
                const __m256i v =
                    _mm256_sub_epi32(_mm256_or_si256(lo4, _mm256_slli_epi32(hi2, 4)), _mm256_set1_epi32(32));
                ls[h] = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(v, 16));
            }
            for (int t = 0; t < 4; ++t) {
                const int j = 4 * g + t;
                __m256i lo[2], hi[2], alo[2], ahi[2];
                for (int h = 0; h < 2; ++h) {
                    const __m256i v = load256(qp + 64 * j + 32 * h);
                    lo[h] = _mm256_shuffle_epi8(tab, _mm256_and_si256(v, m4));
                    hi[h] = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
                    alo[h] = _mm256_abs_epi8(lo[h]);
                    ahi[h] = _mm256_abs_epi8(hi[h]);
                }
                for (int c = 0; c < C; ++c) {
                    const __m256i al = bcast4(q[c] + 32 * g + 4 * t), ah = bcast4(q[c] + 32 * g + 16 + 4 * t);
                    for (int h = 0; h < 2; ++h)
                        isum[c][h] =
                            _mm256_add_epi32(isum[c][h], _mm256_add_epi32(dot_signed(alo[h], lo[h], al, ls[h]),
                                                                          dot_signed(ahi[h], hi[h], ah, ls[h])));
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            const __m256 dw = _mm256_cvtph_ps(load128(wb + 16 * h));
            for (int c = 0; c < C; ++c) {
                const __m256 d8 = _mm256_set1_ps(q8k_block(a, as, c, b)->d);
                acc[c][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[c][h]), _mm256_mul_ps(dw, d8), acc[c][h]);
            }
        }
    }
    for (int c = 0; c < C; ++c)
        for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + c * ldo + 8 * h, acc[c][h]);
}

// The x16 kernels of the super-block types for the shared driver (driver.h).
enum class Super { Q4_K, Q5_K, Q6_K, IQ4_XS };
template <Super S, int C>
inline void super_tile(int nb, const uint8_t* w, const uint8_t* a, size_t as, float* out, size_t ldo) {
    if constexpr (S == Super::Q4_K)
        tile_q45k<false, C>(nb, w, a, as, out, ldo);
    else if constexpr (S == Super::Q5_K)
        tile_q45k<true, C>(nb, w, a, as, out, ldo);
    else if constexpr (S == Super::Q6_K)
        tile_q6k<C>(nb, w, a, as, out, ldo);
    else
        tile_iq4xs<C>(nb, w, a, as, out, ldo);
}

template <Super S>
struct X16Super {
    static constexpr int kBlock = QK_K;
    static constexpr int kCols = 4;
    static constexpr bool kStreams = false;
    using Acts = X16NoActs;
    static void prep(int, const uint8_t*, size_t, int, Acts&) {}
    template <int C>
    static void tile(int nb, const uint8_t* w, const uint8_t* a, size_t as, const Acts&, int, float* out, size_t ldo) {
        super_tile<S, C>(nb, w, a, as, out, ldo);
    }
};

// ---- float weights (F32/F16/BF16) x F32 activations ---------------------------------------------

struct F32W {
    using E = float;
    static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
};
struct F16W {
    using E = f16_t;
    static inline __m256 load(const f16_t* p) { return _mm256_cvtph_ps(load128(p)); }
};
struct BF16W {
    using E = bf16_t;
    static inline __m256 load(const bf16_t* p) {
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(p)), 16));
    }
};

template <class T, int R, int C>
void tile_f(int n, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* out, size_t ldo) {
    using E = typename T::E;
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    auto chunk = [&](const E* const* wp, const float* const* xp) {
        __m256 xv[C];
        for (int c = 0; c < C; ++c) xv[c] = _mm256_loadu_ps(xp[c]);
        for (int r = 0; r < R; ++r) {
            const __m256 wv = T::load(wp[r]);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
        }
    };
    const E* wp[R];
    const float* xp[C];
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int r = 0; r < R; ++r) wp[r] = reinterpret_cast<const E*>(w + r * ws) + i;
        for (int c = 0; c < C; ++c) xp[c] = reinterpret_cast<const float*>(a + c * as) + i;
        chunk(wp, xp);
    }
    if (i < n) {  // zero-padded copies of the last elements
        E wt[R][8] = {};
        float xt[C][8] = {};
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
        for (int c = 0; c < C; ++c) out[c * ldo + r] = hsum(acc[r][c]);
}

// ---- drivers ------------------------------------------------------------------------------------

template <class T, int R, int C>
struct FTile {
    static void run(int len, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* o, size_t l) {
        tile_f<T, R, C>(len, w, ws, a, as, o, l);
    }
};

template <class T>
void gemm_f(int n, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out, size_t ldo) {
    gemm_tiled<FTile, T, 4, 2>(n, nr, nc, w, ws, a, as, out, ldo);  // 4 x 2 tiles: 16 ymm registers
}
template <class T>
void vec_dot_f(int n, float* s, const void* w, const void* a) {
    tile_f<T, 1, 1>(n, static_cast<const uint8_t*>(w), 0, static_cast<const uint8_t*>(a), 0, s, 0);
}

// ---- activation quantization (bit-identical to quantize_row_ref) --------------------------------

// roundf (half away from zero): v - trunc(v) is exact, so this matches std::roundf everywhere.
inline __m256i round_away(__m256 v) {
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256 f = _mm256_andnot_ps(signbit, _mm256_sub_ps(v, t));
    const __m256 up = _mm256_cmp_ps(f, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
    const __m256 one = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(v, signbit));
    return _mm256_cvttps_epi32(_mm256_add_ps(t, _mm256_and_ps(up, one)));
}

template <bool kSum>
inline void quantize_block8(const float* x, f16_t* dst_d, f16_t* dst_s, int8_t* qs) {
    __m256 v[4];
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        m = _mm256_max_ps(m, _mm256_andnot_ps(signbit, v[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = round_away(_mm256_mul_ps(v[j], vid));
    const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i b =
        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), b);
    *dst_d = fp32_to_fp16(d);
    if (kSum) {
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        *dst_s = fp32_to_fp16(static_cast<float>(_mm_cvtsi128_si32(s4)) * d);
    }
}

void from_float_q8_0(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<block_q8_0*>(vy);
    for (int64_t i = 0; i < n / QK8_0; ++i) quantize_block8<false>(x + i * QK8_0, &y[i].d, nullptr, y[i].qs);
}
void from_float_q8_1(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<block_q8_1*>(vy);
    for (int64_t i = 0; i < n / QK8_1; ++i) quantize_block8<true>(x + i * QK8_1, &y[i].d, &y[i].s, y[i].qs);
}

// Q8_K as quantize_row_ref: iscale = -127 / (the FIRST element of largest magnitude), q =
// round-half-even(iscale * x) (cvtps under the default rounding mode, as nearbyint) capped at 127
// and cast to int8, d = 1 / iscale, and the sums of each 16 quants. The cast keeps the low byte, as
// the reference's does on x86 when iscale * x is not finite (NaN inputs, a subnormal max).
void from_float_q8_k(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<block_q8_K*>(vy);
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < n / QK_K; ++i) {
        const float* xb = x + i * QK_K;
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK_K; j += 8) m = _mm256_max_ps(_mm256_andnot_ps(signbit, _mm256_loadu_ps(xb + j)), m);
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        block_q8_K& o = y[i];
        if (amax == 0.0f) {
            std::memset(&o, 0, sizeof(o));
            continue;
        }
        const __m256 va = _mm256_set1_ps(amax);
        int first = 0;
        for (int j = 0; j < QK_K; j += 8) {
            const int hit =
                _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(signbit, _mm256_loadu_ps(xb + j)), va, _CMP_EQ_OQ));
            if (hit) {
                first = j + __builtin_ctz(static_cast<unsigned>(hit));
                break;
            }
        }
        const float iscale = -127.0f / xb[first];
        const __m256 vs = _mm256_set1_ps(iscale);
        const __m256i cap = _mm256_set1_epi32(127);
        for (int j = 0; j < QK_K; j += 32) {
            __m256i q[4];
            for (int k = 0; k < 4; ++k) {
                q[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * k), vs)), cap);
                q[k] = _mm256_srai_epi32(_mm256_slli_epi32(q[k], 24), 24);  // the reference's int8 cast
            }
            o.bsums[j / 16] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(q[0], q[1])));
            o.bsums[j / 16 + 1] = static_cast<int16_t>(hsum_i32(_mm256_add_epi32(q[2], q[3])));
            const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
            const __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
            const __m256i bytes =
                _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.qs + j), bytes);
        }
        o.d = 1.0f / iscale;
    }
}

void f32_to_f16(const float* x, f16_t* y, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}
void from_float_f16(const float* x, void* y, int64_t n) { f32_to_f16(x, static_cast<f16_t*>(y), static_cast<int>(n)); }

// ---- ops ----------------------------------------------------------------------------------------

float dot_f16_f32(int n, const f16_t* x, const float* y) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(F16W::load(x + i), _mm256_loadu_ps(y + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += fp16_lut(x[i]) * y[i];
    return s;
}

void axpy_f16(int n, float a, const f16_t* x, float* y) {
    const __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, F16W::load(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * fp16_lut(x[i]);
}

float dot_f32(int n, const float* x, const float* y) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; ++i) s += x[i] * y[i];
    return s;
}

void rmsnorm(int n, const float* x, const float* w, float eps, float* y) {
    const float ss = dot_f32(n, x, x);
    const float scale = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    const __m256 vs = _mm256_set1_ps(scale);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs), _mm256_loadu_ps(w + i)));
    for (; i < n; ++i) y[i] = (x[i] * scale) * w[i];
}

// exp(x) = 2^k * exp(r), r = x - k*ln2; degree-6 Taylor (~1 ulp). x is clamped to
// [-87, 88.3] so 2^k stays a normal float (exp(-87) ~ 1.6e-38 stands in for anything smaller).
inline __m256 exp_ps(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void swiglu(int n, const float* g, const float* u, float* y) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// y = gelu_tanh(g) * u as g * sigmoid(2a) * u, a = sqrt(2/pi) (g + 0.044715 g^3)
void geglu_tanh(int n, const float* g, const float* u, float* y) {
    const __m256 one = _mm256_set1_ps(1.0f), c1 = _mm256_set1_ps(-2.0f * 0.7978845608028654f),
                 c3 = _mm256_set1_ps(-2.0f * 0.7978845608028654f * 0.044715f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 m2a = _mm256_mul_ps(gv, _mm256_fmadd_ps(_mm256_mul_ps(gv, gv), c3, c1));  // -2a
        const __m256 e = exp_ps(m2a);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; ++i) {
        const float x = g[i];
        y[i] = x / (1.0f + std::exp(-2.0f * 0.7978845608028654f * (x + 0.044715f * x * x * x))) * u[i];
    }
}

// Max, exp and sum in 8-lane chunks, the tail lanes padded (-inf for the max, 0 for the sum) so the
// lane-sum tree is fixed: depends on the row only.
void softmax(int n, float* x) {
    if (n <= 0) return;
    float mxs = -INFINITY;
    {
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        int i = 0;
        for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
        alignas(32) float t[8];
        _mm256_store_ps(t, vmax);
        for (int j = 0; j < 8; ++j) mxs = std::max(mxs, t[j]);
        for (; i < n; ++i) mxs = std::max(mxs, x[i]);
    }
    const __m256 mx = _mm256_set1_ps(mxs);
    __m256 sum = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), mx));
        _mm256_storeu_ps(x + i, e);
        sum = _mm256_add_ps(sum, e);
    }
    if (i < n) {
        alignas(32) float t[8];
        for (int j = 0; j < 8; ++j) t[j] = i + j < n ? x[i + j] - mxs : -INFINITY;
        _mm256_store_ps(t, exp_ps(_mm256_load_ps(t)));
        for (int j = 0; j < 8; ++j) {
            if (i + j >= n)
                t[j] = 0.0f;
            else
                x[i + j] = t[j];
        }
        sum = _mm256_add_ps(sum, _mm256_load_ps(t));
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
    for (; i < n; ++i) x[i] *= _mm256_cvtss_f32(inv);
}

// ---- attention over one block of the f16 KV cache -------------------------------------------------
// A score is the 8-lane FMA chain over the head's chunks in order (the first a multiply), hsum'd,
// plus a scalar tail when head_dim is not a multiple of 8, times scale: the same whatever n and nq.
// head_dim 64 keeps one head's q (scores) in registers across the positions; other multiples of 8
// widen each K chunk once for up to 4 heads of the GQA group.

inline float dot_k(int hd, const f16_t* k, const float* q) {
    __m256 acc = _mm256_mul_ps(F16W::load(k), _mm256_loadu_ps(q));
    int i = 8;
    for (; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(F16W::load(k + i), _mm256_loadu_ps(q + i), acc);
    float s = hsum(acc);
    for (; i < hd; ++i) s += fp16_lut(k[i]) * q[i];
    return s;
}

void attn_scores_f16(int hd, int nq, const float* q, const f16_t* k, size_t ks, int n, float scale, float* scores,
                     size_t ld) {
    if (hd < 8) {
        for (int h = 0; h < nq; ++h)
            for (int j = 0; j < n; ++j) {
                float s = 0.0f;
                for (int i = 0; i < hd; ++i) s += fp16_lut(k[(size_t)j * ks + i]) * q[h * hd + i];
                scores[h * ld + j] = scale * s;
            }
        return;
    }
    if (hd != 64 && hd % 8 == 0) {  // up to 4 heads of the GQA group share each widened K chunk
        for (int h0 = 0; h0 < nq; h0 += 4) {
            const int m = nq - h0 < 4 ? nq - h0 : 4;
            const float* qh = q + (size_t)h0 * hd;
            for (int j = 0; j < n; ++j) {
                const f16_t* kp = k + (size_t)j * ks;
                __m256 acc[4];
                const __m256 k0 = F16W::load(kp);
                for (int h = 0; h < 4; ++h) acc[h] = h < m ? _mm256_mul_ps(k0, _mm256_loadu_ps(qh + h * hd)) : k0;
                for (int i = 8; i < hd; i += 8) {
                    const __m256 kv = F16W::load(kp + i);
                    for (int h = 0; h < 4; ++h)
                        if (h < m) acc[h] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(qh + h * hd + i), acc[h]);
                }
                for (int h = 0; h < m; ++h) scores[(h0 + h) * ld + j] = scale * hsum(acc[h]);
            }
        }
        return;
    }
    if (hd != 64) {
        for (int h = 0; h < nq; ++h)
            for (int j = 0; j < n; ++j) scores[h * ld + j] = scale * dot_k(hd, k + (size_t)j * ks, q + (size_t)h * hd);
        return;
    }
    for (int h = 0; h < nq; ++h) {
        __m256 qv[8];
        for (int c = 0; c < 8; ++c) qv[c] = _mm256_loadu_ps(q + h * 64 + c * 8);
        for (int j = 0; j < n; ++j) {
            const f16_t* kp = k + (size_t)j * ks;
            __m256 acc = _mm256_mul_ps(F16W::load(kp), qv[0]);
            for (int c = 1; c < 8; ++c) acc = _mm256_fmadd_ps(F16W::load(kp + c * 8), qv[c], acc);
            scores[h * ld + j] = scale * hsum(acc);
        }
    }
}

// out += p_j * v_j for j = 0..n-1 in order, one FMA per element (a scalar a*x+y in the tail).
// head_dim a multiple of 64 (64, 128, 256): 64 output columns of a head stay in registers across
// the positions, the same FMA per element as axpy_f16.
void attn_accum_f16(int hd, int nq, const float* p, size_t ld, const f16_t* v, size_t vs, int n, float* out) {
    if (hd % 64 == 0) {
        for (int h = 0; h < nq; ++h)
            for (int c0 = 0; c0 < hd; c0 += 64) {
                float* o = out + (size_t)h * hd + c0;
                __m256 acc[8];
                for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(o + c * 8);
                for (int j = 0; j < n; ++j) {
                    const __m256 w = _mm256_set1_ps(p[h * ld + j]);
                    const f16_t* vp = v + (size_t)j * vs + c0;
                    for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w, F16W::load(vp + c * 8), acc[c]);
                }
                for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + c * 8, acc[c]);
            }
        return;
    }
    for (int h = 0; h < nq; ++h)
        for (int j = 0; j < n; ++j) axpy_f16(hd, p[h * ld + j], v + (size_t)j * vs, out + (size_t)h * hd);
}

// ---- attention over one block of the int8 KV cache (layout in kernels.h) -------------------------
// Scores: half a K chunk is 4 elements of 8 positions. pmaddubsw(|q|, sign(k, q)) with 4 broadcast
// query bytes gives pairs of products (|q|, |k| <= 127: no saturation), pmaddwd sums each
// position's 4 into its int32 lane: exact. Then the reference's float steps, 8 positions per
// instruction; heads go up to 4 at a time over each half tile.

template <int NQ>
inline void q8_half(const KV8Layout& L, const uint8_t* q, size_t qb, const uint8_t* tile, int half, __m256 (&s)[NQ]) {
    const int G = L.groups(), C = L.chunks();
    const __m256i ones = _mm256_set1_epi16(1);
    const auto* dk = reinterpret_cast<const f16_t*>(tile + L.k_scales_offset());
    for (int h = 0; h < NQ; ++h) s[h] = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
        __m256i acc[NQ];
        for (int h = 0; h < NQ; ++h) acc[h] = _mm256_setzero_si256();
        const int c1 = std::min(C, 8 * (g + 1));
        for (int c = 8 * g; c < c1; ++c) {
            const __m256i k = load256(tile + 64 * c + 32 * half);
            for (int h = 0; h < NQ; ++h) {
                int32_t q4;
                std::memcpy(&q4, q + h * qb + 4 * c, 4);
                const __m256i qv = _mm256_set1_epi32(q4);
                const __m256i pr = _mm256_maddubs_epi16(_mm256_abs_epi8(qv), _mm256_sign_epi8(k, qv));
                acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(pr, ones));
            }
        }
        const __m256 dkg = _mm256_cvtph_ps(load128(dk + kKV8Tile * g + 8 * half));
        for (int h = 0; h < NQ; ++h) {
            float dq;
            std::memcpy(&dq, q + h * qb + 4 * C + 4 * g, 4);
            s[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h]), _mm256_mul_ps(_mm256_set1_ps(dq), dkg), s[h]);
        }
    }
}

template <int NQ>
void scores_q8(const KV8Layout& L, const uint8_t* q, const uint8_t* k_run, int j0, int n, float scale, float* scores,
               size_t ld) {
    const size_t qb = L.query_bytes(), tb = L.k_tile_bytes();
    const __m256 vs = _mm256_set1_ps(scale);
    for (int t0 = j0 / 8 * 8; t0 < j0 + n; t0 += 8) {  // halves of tiles
        const int a = std::max(j0, t0), b = std::min(j0 + n, t0 + 8);
        __m256 sv[NQ];
        q8_half<NQ>(L, q, qb, k_run + (size_t)(t0 / kKV8Tile) * tb, (t0 / 8) % 2, sv);
        for (int h = 0; h < NQ; ++h) {
            alignas(32) float t[8];
            _mm256_store_ps(t, _mm256_mul_ps(sv[h], vs));
            for (int j = a; j < b; ++j) scores[h * ld + (j - j0)] = t[j - t0];
        }
    }
}

void attn_scores_q8(const KV8Layout& L, int nq, const uint8_t* q, const uint8_t* k_run, int j0, int n, float scale,
                    float* scores, size_t ld) {
    const size_t qb = L.query_bytes();
    int h = 0;
    for (; h + 4 <= nq; h += 4) scores_q8<4>(L, q + h * qb, k_run, j0, n, scale, scores + h * ld, ld);
    switch (nq - h) {
        case 3:
            scores_q8<3>(L, q + h * qb, k_run, j0, n, scale, scores + h * ld, ld);
            break;
        case 2:
            scores_q8<2>(L, q + h * qb, k_run, j0, n, scale, scores + h * ld, ld);
            break;
        case 1:
            scores_q8<1>(L, q + h * qb, k_run, j0, n, scale, scores + h * ld, ld);
            break;
        default:
            break;
    }
}

// 8 int8 as floats.
inline __m256 v8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// out += (p_j * d_v[j][g]) * v_j for j = j0.. in order, one FMA per element (std::fma in the tail).
void attn_accum_q8(const KV8Layout& L, int nq, const float* p, size_t ld, const uint8_t* v_run, int j0, int n,
                   float* out) {
    const int hd = L.hd, G = L.groups();
    const auto* dv = reinterpret_cast<const f16_t*>(v_run + L.v_scales_offset());
    if (hd == 64) {
        for (int h = 0; h < nq; ++h) {
            float* o = out + h * 64;
            __m256 acc[8];
            for (int c = 0; c < 8; ++c) acc[c] = _mm256_loadu_ps(o + c * 8);
            for (int j = j0; j < j0 + n; ++j) {
                const auto* vr = reinterpret_cast<const int8_t*>(v_run + (size_t)j * 64);
                const float pj = p[h * ld + (j - j0)];
                const __m256 w0 = _mm256_set1_ps(pj * fp16_lut(dv[2 * j])),
                             w1 = _mm256_set1_ps(pj * fp16_lut(dv[2 * j + 1]));
                for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(w0, v8(vr + 8 * c), acc[c]);
                for (int c = 4; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w1, v8(vr + 8 * c), acc[c]);
            }
            for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + c * 8, acc[c]);
        }
        return;
    }
    for (int h = 0; h < nq; ++h) {
        float* o = out + (size_t)h * hd;
        int i = 0;
        for (; i + 8 <= hd; i += 8) {  // 8 elements never straddle a group of 32
            const int g = i / kKV8Group;
            __m256 acc = _mm256_loadu_ps(o + i);
            for (int j = j0; j < j0 + n; ++j) {
                const float w = p[h * ld + (j - j0)] * fp16_lut(dv[(size_t)j * G + g]);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(w),
                                      v8(reinterpret_cast<const int8_t*>(v_run + (size_t)j * hd + i)), acc);
            }
            _mm256_storeu_ps(o + i, acc);
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
// One group of 32 as q8_group: max|x| with max_ps's NaN rule (it returns the second operand, so a
// NaN element is skipped as std::fmax skips it), d = amax / 127 and id = 1 / d in float, q =
// roundf(x * id) (round_away), and a q outside [-128, 127] (a NaN, an overflow) stored as 0.
float kv8_group(const float* x, int8_t* qs, int32_t* sum) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        m = _mm256_max_ps(_mm256_andnot_ps(signbit, v[j]), m);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 vid = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
        q[j] = round_away(_mm256_mul_ps(v[j], vid));
        const __m256i ok = _mm256_and_si256(_mm256_cmpgt_epi32(q[j], _mm256_set1_epi32(-129)),
                                            _mm256_cmpgt_epi32(_mm256_set1_epi32(128), q[j]));
        q[j] = _mm256_and_si256(q[j], ok);
    }
    const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);  // in range: the saturation never acts
    const __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i b =
        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), b);
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *sum = _mm_cvtsi128_si32(s4);
    return d;
}

// ---- the table ----------------------------------------------------------------------------------

}  // namespace

const IsaTable* isa_table_avx2() {
    static TypeKernels store[kMaxDTypeId];
    static const IsaTable table =
        make_isa_table(Isa::AVX2, store,
                       {
                           {DType::Q4_0, nullptr, vec_dot_q<Q4_0T>, gemm_q<Q4_0T>, gemm_x16<X16<Q4_0P>>},
                           {DType::Q4_1, nullptr, vec_dot_q<Q4_1T>, gemm_q<Q4_1T>, gemm_x16<X16<Q4_1P>>},
                           {DType::Q8_0, from_float_q8_0, vec_dot_q<Q8_0T>, gemm_q<Q8_0T>, gemm_x16<X16<Q8_0P>>},
                           {DType::Q8_1, from_float_q8_1},
                           {DType::Q8_K, from_float_q8_k},
                           {DType::Q5_0, nullptr, nullptr, nullptr, gemm_x16<X16<Q5_0P>>},
                           {DType::Q5_1, nullptr, nullptr, nullptr, gemm_x16<X16<Q5_1P>>},
                           {DType::IQ4_NL, nullptr, nullptr, nullptr, gemm_x16<X16<IQ4_NLP>>},
                           {DType::Q4_K, nullptr, nullptr, nullptr, gemm_x16<X16Super<Super::Q4_K>>},
                           {DType::Q5_K, nullptr, nullptr, nullptr, gemm_x16<X16Super<Super::Q5_K>>},
                           {DType::Q6_K, nullptr, nullptr, nullptr, gemm_x16<X16Super<Super::Q6_K>>},
                           {DType::IQ4_XS, nullptr, nullptr, nullptr, gemm_x16<X16Super<Super::IQ4_XS>>},
                           {DType::F32, nullptr, vec_dot_f<F32W>, gemm_f<F32W>},
                           {DType::F16, from_float_f16, vec_dot_f<F16W>, gemm_f<F16W>},
                           {DType::BF16, nullptr, vec_dot_f<BF16W>, gemm_f<BF16W>},
                       },
                       OpsKernels{dot_f16_f32, axpy_f16, f32_to_f16, dot_f32, rmsnorm, swiglu, attn_scores_f16,
                                  attn_accum_f16, softmax, geglu_tanh, attn_scores_q8, attn_accum_q8,
                                  kv8_store_with<kv8_group>, kv8_quantize_query_with<kv8_group>});
    return &table;
}

}  // namespace ts
