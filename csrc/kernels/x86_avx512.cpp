// x86_avx512.cpp — AVX-512 (F/BW/VL/DQ) + VNNI kernels: quantized dot products with vpdpbusd,
// register-tiled GEMM, F16/BF16/F32 weights, activation quantization and the layer ops.
//
// Batch invariance: every (weight row, activation row) pair is computed by the same sequence of
// float operations whatever tile it lands in: per group of 4 blocks one exact integer dot product,
// then acc = fma(float(sumi), dw*da, acc); for Q4_1 after every 4 groups acc = fma(m, s, acc)
// over those 16 blocks; then one fixed horizontal reduction. Tiles only share the unpacking of
// weights and activations, which is exact.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
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

// ---- quantized types ----------------------------------------------------------------------------
//
// Work goes in groups of 4 consecutive blocks. Each block's 32 int8 are split into halves:
// lo = [blk0 elems 0-15 | blk1 0-15 | blk2 0-15 | blk3 0-15], hi = the same for elems 16-31.
// Two chained dpbusd (lo then hi) leave block j's integer dot product spread over dword lanes
// 4j..4j+3, and one float step per group scales them: acc = fma(float(sumi), dw*da, acc).
// A partial last group loads only its blocks; the missing ones read as zero (zero scales add
// exact zeros).

// A group: 4 blocks, or the k < 4 blocks left at the end of a row (missing blocks read as zero).
struct Part {
    int k;
};
struct Full {};
inline int blocks(Full) { return 4; }
inline int blocks(Part p) { return p.k; }

// 16 bytes at p + j*stride for j = 0..3, one per 128-bit lane
inline __m512i load4x16(const uint8_t* p, int stride, Full) {
    __m512i z = _mm512_castsi128_si512(load128(p));
    z = _mm512_inserti32x4(z, load128(p + stride), 1);
    z = _mm512_inserti32x4(z, load128(p + 2 * stride), 2);
    return _mm512_inserti32x4(z, load128(p + 3 * stride), 3);
}
inline __m512i load4x16(const uint8_t* p, int stride, Part part) {
    __m512i z = _mm512_zextsi128_si512(load128(p));
    if (part.k > 1) z = _mm512_inserti32x4(z, load128(p + stride), 1);
    if (part.k > 2) z = _mm512_inserti32x4(z, load128(p + 2 * stride), 2);
    return z;
}

// Masked byte loads of [p, p + len) clipped to the 64 bytes at p.
inline __m512i load64_upto(const uint8_t* p, int len) {
    if (len <= 0) return _mm512_setzero_si512();
    const __mmask64 m = len >= 64 ? ~__mmask64{0} : ((__mmask64{1} << len) - 1);
    return _mm512_maskz_loadu_epi8(m, p);
}

// Word indices picking the fp16 at byte offset OFF of blocks 0..3 (block size STRIDE), each 4 times.
template <int STRIDE, int OFF>
struct HalfIdx {
    struct V {
        alignas(64) uint16_t v[32];
    };
    static constexpr V make() {
        V x{};
        for (int i = 0; i < 32; ++i) x.v[i] = static_cast<uint16_t>(i < 16 ? (OFF + (i / 4) * STRIDE) / 2 : 0);
        return x;
    }
    static constexpr V value = make();
};

// [h0 x4, h1 x4, h2 x4, h3 x4] as floats, h_j the fp16 at p + j*STRIDE + OFF (4 full blocks at p).
template <int STRIDE, int OFF, class G>
inline __m512 group_scale(const uint8_t* p, G g) {
    const __m512i idx = _mm512_load_si512(HalfIdx<STRIDE, OFF>::value.v);
    constexpr bool kOneLoad = 3 * STRIDE + OFF + 2 <= 64 && 4 * STRIDE >= 64;
    static_assert(kOneLoad || (4 * STRIDE >= 128 && 3 * STRIDE + OFF + 2 <= 128), "group layout");
    __m512i h;
    if constexpr (std::is_same<G, Full>::value) {
        if constexpr (kOneLoad)
            h = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(p));
        else
            h = _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64));
    } else {
        const int len = blocks(g) * STRIDE;  // never read past the last block
        if constexpr (kOneLoad)
            h = _mm512_permutexvar_epi16(idx, load64_upto(p, len));
        else
            h = _mm512_permutex2var_epi16(load64_upto(p, len), idx, load64_upto(p + 64, len - 64));
    }
    return _mm512_cvtph_ps(_mm512_castsi512_si256(h));
}

// Q8 activations (Q8_0 or Q8_1) of one group, split into halves.
template <class AB, class G>
inline void load_act(const uint8_t* p, __m512i& lo, __m512i& hi, G g) {
    constexpr int kOff = static_cast<int>(offsetof(AB, qs));
    lo = load4x16(p + kOff, sizeof(AB), g);
    hi = load4x16(p + kOff + 16, sizeof(AB), g);
}

// 4-bit weights of one group: nibbles -> lo (elements 0-15) and hi (16-31), as u8 in [0, 15].
template <class WB, class G>
inline void load_nibbles(const uint8_t* p, __m512i& lo, __m512i& hi, G g) {
    const __m512i q = load4x16(p + offsetof(WB, qs), sizeof(WB), g);
    const __m512i m = _mm512_set1_epi8(0x0f);
    lo = _mm512_and_si512(q, m);
    hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m);
}

// -k * (sum of each lane's 4 int8 of lo and hi): the correction that turns an unsigned-offset
// product back into the signed one.
inline __m512i neg_sum4(__m512i lo, __m512i hi, char k) {
    const __m512i z = _mm512_setzero_si512(), kk = _mm512_set1_epi8(k);
    return _mm512_sub_epi32(z, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, kk, lo), kk, hi));
}

// Q4_0 x Q8_0: sum((q-8)*a) = dpbusd(q, a) - 8*sum(a); the activation carries -8*sum(a).
struct Q4_0T {
    static constexpr bool kMin = false;
    using WB = block_q4_0;
    using AB = block_q8_0;
    struct W {
        __m512i lo, hi;
        __m512 d;
    };
    struct A {
        __m512i lo, hi;
        __m512 d;
        __m512i corr;
    };
    template <class G>
    static inline W w(const uint8_t* p, G g) {
        W x;
        load_nibbles<WB>(p, x.lo, x.hi, g);
        x.d = group_scale<sizeof(WB), 0>(p, g);
        return x;
    }
    template <class G>
    static inline A a(const uint8_t* p, G g) {
        A x;
        load_act<AB>(p, x.lo, x.hi, g);
        x.d = group_scale<sizeof(AB), 0>(p, g);
        x.corr = neg_sum4(x.lo, x.hi, 8);
        return x;
    }
    static inline __m512i dot(const W& w, const A& a) {
        return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a.corr, w.lo, a.lo), w.hi, a.hi);
    }
};

// Q4_1 x Q8_1: d4*d8*sum(q*a) + m*s per block; m and s hold block j's value in lanes 4j..4j+3.
struct Q4_1T {
    static constexpr bool kMin = true;  // + m * s per block (see sb_min)
    using WB = block_q4_1;
    using AB = block_q8_1;
    struct W {
        __m512i lo, hi;
        __m512 d, m;
    };
    struct A {
        __m512i lo, hi;
        __m512 d, s;
    };
    template <class G>
    static inline W w(const uint8_t* p, G g) {
        W x;
        load_nibbles<WB>(p, x.lo, x.hi, g);
        x.d = group_scale<sizeof(WB), 0>(p, g);
        x.m = group_scale<sizeof(WB), 2>(p, g);
        return x;
    }
    template <class G>
    static inline A a(const uint8_t* p, G g) {
        A x;
        load_act<AB>(p, x.lo, x.hi, g);
        x.d = group_scale<sizeof(AB), 0>(p, g);
        x.s = group_scale<sizeof(AB), 2>(p, g);
        return x;
    }
    static inline __m512i dot(const W& w, const A& a) {
        return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w.lo, a.lo), w.hi, a.hi);
    }
};

// Q8_0 x Q8_0: both signed; dpbusd wants one unsigned side: use (a + 128) = a ^ 0x80 as u8 and
// start each lane at -128 * (its weights).
struct Q8_0T {
    static constexpr bool kMin = false;
    using WB = block_q8_0;
    using AB = block_q8_0;
    struct W {
        __m512i lo, hi;
        __m512 d;
        __m512i corr;
    };
    struct A {
        __m512i lo, hi;
        __m512 d;
    };
    template <class G>
    static inline W w(const uint8_t* p, G g) {
        W x;
        load_act<WB>(p, x.lo, x.hi, g);
        x.d = group_scale<sizeof(WB), 0>(p, g);
        x.corr = neg_sum4(x.lo, x.hi, static_cast<char>(0x80));
        return x;
    }
    template <class G>
    static inline A a(const uint8_t* p, G g) {
        A x;
        load_act<AB>(p, x.lo, x.hi, g);
        const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
        x.lo = _mm512_xor_si512(x.lo, sign);
        x.hi = _mm512_xor_si512(x.hi, sign);
        x.d = group_scale<sizeof(AB), 0>(p, g);
        return x;
    }
    static inline __m512i dot(const W& w, const A& a) {
        return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(w.corr, a.lo, w.lo), a.hi, w.hi);
    }
};

// The one float step every (weight row, activation row) pair goes through, whatever the tile.
template <class T>
inline __m512 step(__m512 acc, const typename T::W& w, const typename T::A& a) {
    const __m512i s = T::dot(w, a);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(w.d, a.d), acc);
}

// Q4_1's m*s terms go in once per 4 groups: lane 4j+g of the packed vector takes block j of
// group g, so one fma adds 16 blocks' m*s (a chained fma per group would stall the tile).
// Groups past the row's end (k < 4) are zero.
inline __m512 pack_groups(const __m512 (&v)[4], int k) {
    __m512 x = _mm512_maskz_mov_ps(0x1111, v[0]);
    if (k > 1) x = _mm512_mask_mov_ps(x, 0x2222, v[1]);
    if (k > 2) x = _mm512_mask_mov_ps(x, 0x4444, v[2]);
    if (k > 3) x = _mm512_mask_mov_ps(x, 0x8888, v[3]);
    return x;
}
template <class T>
inline __m512 packed_s(const typename T::A* a, int k) {
    __m512 v[4];
    for (int g = 0; g < k; ++g) v[g] = a[g].s;
    return pack_groups(v, k);
}
template <class T>
inline __m512 packed_m(const typename T::W* w, int k) {
    __m512 v[4];
    for (int g = 0; g < k; ++g) v[g] = w[g].m;
    return pack_groups(v, k);
}

// ---- quantized drivers --------------------------------------------------------------------------
//
// A gemm call unpacks each activation row once (per-group records), and, when several column
// tiles will reuse them, each weight tile once; tiles then only run the pair steps. vec_dot and
// every tile shape run exactly the same per-pair steps in the same order.

template <class T>
struct QScratch {
    std::vector<typename T::A> a;  // [activation row][group]
    std::vector<typename T::W> w;  // [weight row of the current tile][group]
    std::vector<__m512> sp;        // Q4_1: packed s per [activation row][4 groups]
};
template <class T>
QScratch<T>& qscratch() {
    thread_local QScratch<T> s;
    return s;
}

// Each of n rows (stride bytes apart) of nb blocks of type B, as records of groups of 4 blocks
// (the last group partial): make(p, Full{} | Part{k}) reads the group at p.
template <class B, class Rec, class Make>
void prep_groups(int nb, const uint8_t* rows, size_t stride, int n, Rec* out, Make make) {
    const int full = nb / 4, ng = (nb + 3) / 4;
    for (int r = 0; r < n; ++r) {
        const uint8_t* row = rows + r * stride;
        Rec* o = out + static_cast<size_t>(r) * ng;
        for (int g = 0; g < full; ++g) o[g] = make(row + static_cast<size_t>(g) * 4 * sizeof(B), Full{});
        if (full < ng) o[full] = make(row + static_cast<size_t>(full) * 4 * sizeof(B), Part{nb - 4 * full});
    }
}

template <class T>
void prep_acts(int nb, const uint8_t* a, size_t as, int nc, typename T::A* out) {
    prep_groups<typename T::AB>(nb, a, as, nc, out, [](const uint8_t* p, auto g) { return T::a(p, g); });
}

template <class T>
void prep_weights(int nb, const uint8_t* w, size_t ws, int nr, typename T::W* out) {
    prep_groups<typename T::WB>(nb, w, ws, nr, out, [](const uint8_t* p, auto g) { return T::w(p, g); });
}

// Sum of 16 lanes by one fixed tree: a_i = v_i + v_(i+8); b_i = a_i + a_(i+4); c_i = b_i + b_(i+2);
// c_0 + c_1. hsum4 runs the very same additions for four vectors at once (float addition is
// commutative bit for bit, only the pairing matters), so a result never depends on the tile.
inline float hsum1(__m512 v) {
    const __m256 a =
        _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}
inline __m128 hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    const __m512 a01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xee));
    const __m512 a23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xee));
    const __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(a01, a23, 0x88), _mm512_shuffle_f32x4(a01, a23, 0xdd));
    const __m512 c = _mm512_add_ps(b, _mm512_permute_ps(b, 0x4e));
    const __m512 d = _mm512_add_ps(c, _mm512_permute_ps(c, 0xb1));
    return _mm512_castps512_ps128(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), d));
}

template <int R, int C>
inline void store_acc(const __m512 (&acc)[R][C], float* out, size_t ldo) {
    if constexpr (R == 4) {
        for (int c = 0; c < C; ++c) _mm_storeu_ps(out + c * ldo, hsum4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
    } else {
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < C; ++c) out[c * ldo + r] = hsum1(acc[r][c]);
    }
}

// R weight rows x C activation rows, both unpacked ([row][group], ng groups per row).
template <class T, int R, int C>
void tile_pre(int ng, const typename T::W* w, const typename T::A* a, const __m512* spk, float* out, size_t ldo) {
    const int nsb = (ng + 3) / 4;
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < ng; g0 += 4) {
        const int k = ng - g0 < 4 ? ng - g0 : 4;
        for (int g = g0; g < g0 + k; ++g)
            for (int r = 0; r < R; ++r) {
                const typename T::W& wv = w[static_cast<size_t>(r) * ng + g];
                for (int c = 0; c < C; ++c) acc[r][c] = step<T>(acc[r][c], wv, a[static_cast<size_t>(c) * ng + g]);
            }
        if constexpr (T::kMin) {
            for (int r = 0; r < R; ++r) {
                const __m512 mp = packed_m<T>(w + static_cast<size_t>(r) * ng + g0, k);
                for (int c = 0; c < C; ++c)
                    acc[r][c] = _mm512_fmadd_ps(mp, spk[static_cast<size_t>(c) * nsb + g0 / 4], acc[r][c]);
            }
        }
    }
    store_acc<R, C>(acc, out, ldo);
}

// R weight rows straight from memory (each used once: GEMV) x C unpacked activation rows.
template <class T, int R, int C>
void tile_raw(int nb, const uint8_t* w, size_t ws, const typename T::A* a, const __m512* spk, float* out, size_t ldo) {
    using WB = typename T::WB;
    const int full = nb / 4, ng = (nb + 3) / 4, nsb = (ng + 3) / 4;
    __m512 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < ng; g0 += 4) {
        const int k = ng - g0 < 4 ? ng - g0 : 4;
        for (int r = 0; r < R; ++r) {
            __m512 mv[4];
            for (int g = g0; g < g0 + k; ++g) {
                const uint8_t* p = w + r * ws + static_cast<size_t>(g) * 4 * sizeof(WB);
                // weights stream from DRAM: prefetch 2 KB ahead
                for (size_t o = 0; o < 4 * sizeof(WB); o += 64)
                    _mm_prefetch(reinterpret_cast<const char*>(p + 2048 + o), _MM_HINT_T0);
                const typename T::W wv = g < full ? T::w(p, Full{}) : T::w(p, Part{nb - 4 * full});
                if constexpr (T::kMin) mv[g - g0] = wv.m;
                for (int c = 0; c < C; ++c) acc[r][c] = step<T>(acc[r][c], wv, a[static_cast<size_t>(c) * ng + g]);
            }
            if constexpr (T::kMin) {
                const __m512 mp = pack_groups(mv, k);
                for (int c = 0; c < C; ++c)
                    acc[r][c] = _mm512_fmadd_ps(mp, spk[static_cast<size_t>(c) * nsb + g0 / 4], acc[r][c]);
            }
        }
    }
    store_acc<R, C>(acc, out, ldo);
}

constexpr int kQR = 4;   // weight rows per GEMM tile
constexpr int kQC = 4;   // activation rows per GEMM tile
constexpr int kQRV = 1;  // weight rows per GEMV tile: one row at a time streams best from DRAM

template <class T, int R>
void raw_rows(int nb, const uint8_t* w, size_t ws, int nc, const typename T::A* a, const __m512* spk, float* out,
              size_t ldo) {
    switch (nc) {
        case 1:
            tile_raw<T, R, 1>(nb, w, ws, a, spk, out, ldo);
            break;
        case 2:
            tile_raw<T, R, 2>(nb, w, ws, a, spk, out, ldo);
            break;
        case 3:
            tile_raw<T, R, 3>(nb, w, ws, a, spk, out, ldo);
            break;
        default:
            tile_raw<T, R, 4>(nb, w, ws, a, spk, out, ldo);
            break;
    }
}

// tile_pre<T, R, left> for a run-time left in [1, C]
template <class T, int R, int C>
inline void pre_tail(int left, int ng, const typename T::W* w, const typename T::A* a, const __m512* spk, float* out,
                     size_t ldo) {
    if constexpr (C >= 1) {
        if (left == C)
            tile_pre<T, R, C>(ng, w, a, spk, out, ldo);
        else
            pre_tail<T, R, C - 1>(left, ng, w, a, spk, out, ldo);
    }
}

template <class T, int R>
void pre_cols(int ng, const typename T::W* w, int nc, const typename T::A* a, const __m512* spk, float* out,
              size_t ldo) {
    const int nsb = (ng + 3) / 4;
    int c = 0;
    for (; c + kQC <= nc; c += kQC)
        tile_pre<T, R, kQC>(ng, w, a + static_cast<size_t>(c) * ng, spk + static_cast<size_t>(c) * nsb, out + c * ldo,
                            ldo);
    if (c < nc)
        pre_tail<T, R, kQC - 1>(nc - c, ng, w, a + static_cast<size_t>(c) * ng, spk + static_cast<size_t>(c) * nsb,
                                out + c * ldo, ldo);
}

constexpr int kQCB = 64;  // activation rows unpacked at a time (their records stay in L2)

template <class T>
void gemm_q(int n, int nr, int nc, const void* vw, size_t ws, const void* va, size_t as, float* out, size_t ldo) {
    if (nr <= 0 || nc <= 0) return;
    const auto* w = static_cast<const uint8_t*>(vw);
    const int nb = n / 32, ng = (nb + 3) / 4, nsb = (ng + 3) / 4;
    QScratch<T>& s = qscratch<T>();
    // Column blocks of kQCB activation rows: unpack them once, then run every weight tile over
    // them. Blocking never changes a pair's arithmetic (tile_pre/tile_raw run the same steps).
    for (int c0 = 0; c0 < nc; c0 += kQCB) {
        const int cb = nc - c0 < kQCB ? nc - c0 : kQCB;
        if (s.a.size() < static_cast<size_t>(cb) * ng) s.a.resize(static_cast<size_t>(cb) * ng);
        prep_acts<T>(nb, static_cast<const uint8_t*>(va) + c0 * as, as, cb, s.a.data());
        const typename T::A* a = s.a.data();
        const __m512* spk = nullptr;
        if constexpr (T::kMin) {  // packed s of every 4 groups, once per column block
            if (s.sp.size() < static_cast<size_t>(cb) * nsb) s.sp.resize(static_cast<size_t>(cb) * nsb);
            for (int c = 0; c < cb; ++c)
                for (int g0 = 0; g0 < ng; g0 += 4)
                    s.sp[static_cast<size_t>(c) * nsb + g0 / 4] =
                        packed_s<T>(a + static_cast<size_t>(c) * ng + g0, ng - g0 < 4 ? ng - g0 : 4);
            spk = s.sp.data();
        }
        float* o = out + c0 * ldo;
        if (cb <= kQC) {  // weights are used once: unpack them on the fly
            int r = 0;
            for (; r + kQRV <= nr; r += kQRV) raw_rows<T, kQRV>(nb, w + r * ws, ws, cb, a, spk, o + r, ldo);
            for (; r < nr; ++r) raw_rows<T, 1>(nb, w + r * ws, ws, cb, a, spk, o + r, ldo);
            continue;
        }
        if (s.w.size() < static_cast<size_t>(kQR) * ng) s.w.resize(static_cast<size_t>(kQR) * ng);
        typename T::W* wp = s.w.data();
        int r = 0;
        for (; r + kQR <= nr; r += kQR) {
            prep_weights<T>(nb, w + r * ws, ws, kQR, wp);
            pre_cols<T, kQR>(ng, wp, cb, a, spk, o + r, ldo);
        }
        for (; r < nr; ++r) {
            prep_weights<T>(nb, w + r * ws, ws, 1, wp);
            pre_cols<T, 1>(ng, wp, cb, a, spk, o + r, ldo);
        }
    }
}

template <class T>
void vec_dot_q(int n, float* s, const void* w, const void* a) {
    gemm_q<T>(n, 1, 1, w, 0, a, 0, s, 1);
}

// ---- x16 packed weights (layout in quant.h) -----------------------------------------------------
//
// One register holds the same 4 bytes of 16 weight rows, so one dpbusd against 4 broadcast
// activation bytes advances all 16 rows, and each row's block sum ends in its own dword lane.
// Per (block, activation row): two chains of 4 dpbusd (the integer dot product, exact), one
// conversion, one scale product and one fma into a lane per weight row (Q4_1: one more fma for
// m*s). No horizontal sums, and no software prefetch: packed rows are one contiguous stream that
// the hardware prefetcher follows (measured: prefetching ahead was slower). A result is a function
// of its weight row and activation row alone:
// every tile shape, GEMV or GEMM, runs the very same steps for it (batch invariance).

// How a type's quant chunks become unsigned bytes for dpbusd.
enum class Vals {
    Nibbles,  // Q4_0, Q4_1: the nibbles
    Five,     // Q5_0, Q5_1: the nibbles plus a fifth bit from the bit plane
    Lut,      // IQ4_NL: the nibbles index the table kIQ4NL + 128
    Bytes,    // Q8_0: stored q + 128
};

// 32-element block types. Signed values become unsigned bytes (q + k); the correction -k * sum(a)
// rides in the integer chain (kCorr), or, for the types with a min, + m * s per block.
struct Q4_0P {  // (q - 8) * a = q * a - 8 * sum(a)
    static constexpr DType kType = DType::Q4_0;
    using AB = block_q8_0;
    static constexpr int kCorr = -8;
    static constexpr bool kMin = false;
    static constexpr Vals kVals = Vals::Nibbles;
};
struct Q4_1P {  // d*q + m: + m * s, s = d_a * sum(a) from the Q8_1 block
    static constexpr DType kType = DType::Q4_1;
    using AB = block_q8_1;
    static constexpr int kCorr = 0;
    static constexpr bool kMin = true;
    static constexpr Vals kVals = Vals::Nibbles;
};
struct Q8_0P {  // stored q + 128 (unsigned): q * a = (q + 128) * a - 128 * sum(a)
    static constexpr DType kType = DType::Q8_0;
    using AB = block_q8_0;
    static constexpr int kCorr = -128;
    static constexpr bool kMin = false;
    static constexpr Vals kVals = Vals::Bytes;
};
struct Q5_0P {  // (q - 16) * a = q * a - 16 * sum(a)
    static constexpr DType kType = DType::Q5_0;
    using AB = block_q8_0;
    static constexpr int kCorr = -16;
    static constexpr bool kMin = false;
    static constexpr Vals kVals = Vals::Five;
};
struct Q5_1P {  // d*q + m, as Q4_1
    static constexpr DType kType = DType::Q5_1;
    using AB = block_q8_1;
    static constexpr int kCorr = 0;
    static constexpr bool kMin = true;
    static constexpr Vals kVals = Vals::Five;
};
struct IQ4_NLP {  // table value v: (v + 128) * a - 128 * sum(a)
    static constexpr DType kType = DType::IQ4_NL;
    using AB = block_q8_0;
    static constexpr int kCorr = -128;
    static constexpr bool kMin = false;
    static constexpr Vals kVals = Vals::Lut;
};

template <class P>
constexpr size_t x16_block_bytes() {  // one block of 16 rows
    return static_cast<size_t>(x16_block_bytes(P::kType));
}

// Compile-time loops: f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>), so
// shift counts and offsets derived from the index are immediates.
template <class F, int... I>
inline void unroll_seq(F&& f, std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void unroll(F&& f) {
    unroll_seq(f, std::make_integer_sequence<int, N>{});
}

// v | (bits B, B+1, ... of every byte of `planes` moved to bit 4 upward, as `mask` selects): the
// high bits of a quant chunk joined to its nibbles. epi16 shifts are exact here: a left shift of
// at most 4 only moves low-byte bits into the high byte's bits below 4, and a right shift of at
// most 3 only moves high-byte bits into the low byte's bits above 5, both outside `mask`.
template <int B>
inline __m512i join_high(__m512i v, __m512i planes, __m512i mask) {
    static_assert(B >= 0 && B <= 7, "bit index");
    __m512i s;
    if constexpr (B < 4)
        s = _mm512_slli_epi16(planes, 4 - B);
    else if constexpr (B == 4)
        s = planes;
    else
        s = _mm512_srli_epi16(planes, B - 4);
    // v | (s & mask) as two ops: on Zen 4 vpternlogd issues on the pipes vpdpbusd needs, vpandd and
    // vpord do not (A/B in bench_kernels.py: the Q5_0 tile ~10% faster)
    return _mm512_or_si512(v, _mm512_and_si512(s, mask));
}

// The 16 table values of IQ4_NL / IQ4_XS plus 128, in every 128-bit lane (vpshufb's table).
inline __m512i iq4_lut() {
    alignas(16) static const uint8_t t[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};
    return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

// The records of activation rows [c0, ...) of an X16Acts, nb per row.
struct X16View {
    const float* d;
    const float* s;
    const int32_t* corr;
    static X16View of(const X16Acts& x, size_t off) {
        return {x.d.data() + off, x.s.data() + off, x.corr.data() + off};
    }
};

template <class P>
void x16_prep_acts(int nb, const uint8_t* a, size_t as, int nc, X16Acts& x) {
    using AB = typename P::AB;
    x.resize(static_cast<size_t>(nb) * nc);
    for (int c = 0; c < nc; ++c)
        for (int b = 0; b < nb; ++b) {
            const AB* blk = reinterpret_cast<const AB*>(a + c * as) + b;
            const size_t i = static_cast<size_t>(c) * nb + b;
            x.d[i] = fp16_lut(blk->d);
            if constexpr (P::kMin) {
                x.s[i] = fp16_lut(blk->s);
            } else {
                const __m512i q = _mm512_cvtepi8_epi16(load256(blk->qs));
                x.corr[i] = P::kCorr * _mm512_reduce_add_epi32(_mm512_madd_epi16(q, _mm512_set1_epi16(1)));
            }
        }
}

// acc += dpbusd(w, the 4 bytes at p broadcast to every lane). The broadcast rides in the
// instruction as a {1to16} memory operand; written with intrinsics, GCC emits a separate
// vpbroadcastd per dpbusd (8 extra instructions per block and activation row in tile_x16).
inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t* p) {
#if defined(__GNUC__)
    __asm__("vpdpbusd %[m]%{1to16%}, %[w], %[acc]"
            : [acc] "+v"(acc)
            : [w] "v"(w), [m] "m"(*reinterpret_cast<const int32_t*>(p)));
    return acc;
#else
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(v));
#endif
}

// Why the tiles prefetch (prefetch_share, driver.h): the weights of a GEMV are read once, and these
// kernels spend enough instructions per byte that the out-of-order window alone keeps too few loads
// in flight. The types with bit planes read two streams per block, which the hardware prefetcher
// follows badly (A/B, one core: Q6_K's GEMV 7.4-7.6 GB/s without, 9.9-12.4 with; Q5_K 10.3-11.2
// without, 11.3-14.8 with); for the single-stream IQ4_XS it was slower, for Q4_K even (so Q4_K's
// tile prefetches only from kStreamCols rows up, where it paid).

// How a tile_x16 streams its weights. With kStreamCols or more activation rows each block asks for
// the block kStreamAhead on (groups are contiguous, so the last blocks of a group ask for the next
// group's first), and a block's work hides the fetch. A/B in bench_kernels.py, one core, weights
// streamed from memory (--stream-mb 64), Gemma 3's shapes, against the driver's prefetch of the
// next group at each tile's start: M = 32 Q8_0 ~205-225 -> ~290-320 GOP/s, Q5_0 ~230-250 ->
// ~295-325; M = 16 Q8_0 ~165-170 -> ~245-275; M = 8 up, M = 512 even.
// With fewer rows the GEMV is bound by the memory stream; where gemv_prefetch() (kernels.h) says
// so, a block asks for the one gemv_ahead<kBB>() on (driver.h): a memory latency's worth of one
// core's stream. A forward's GEMVs are short (a task is a few groups of a small matrix, its stream
// starts cold). On an Intel Xeon (KVM guest), raw forward, one sequence, against no prefetch below
// 8 rows, paired: SmolLM2 (Q4_1) 247-323 -> 307-381 tok/s, Gemma 3 96-106 -> 110-118, Qwen2.5
// 57-60 -> 65-67; four sequences, SmolLM2 549-612 -> 747-893 (AVX2's tile, the same change:
// SmolLM2 169-191 -> 278-331). On a Zen 4 (KVM guest) it lost in 22 of 24 pairs of `bench engine`
// tg128_b1 (12 against a build without it, 12 with TINYSERVE_GEMV_PREFETCH=1 against 0): medians
// of the second set SmolLM2 181 against 186 tok/s without, Gemma 3 85 against 94, Qwen2.5 55
// against 55; its hardware prefetcher keeps up alone.
constexpr int kStreamCols = 8, kStreamAhead = 4;

// 16 weight rows x C activation rows; out[c * ldo + r] for r < 16.
template <class P, int C>
void tile_x16(int nb, const uint8_t* w, const uint8_t* a, size_t as, X16View x, float* out, size_t ldo) {
    using AB = typename P::AB;
    constexpr size_t kBB = x16_block_bytes<P>();
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    const bool gemv_pf = gemv_prefetch();  // read only where C < kStreamCols (below)
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        if constexpr (C >= kStreamCols)
            prefetch_share<kBB, kStreamAhead * kBB, 1>(wb, 0);
        else if (gemv_pf)
            prefetch_share<kBB, gemv_ahead<kBB>(), 1>(wb, 0);
        const __m512 dw = _mm512_cvtph_ps(load256(wb));
        __m512 mw = _mm512_setzero_ps();
        if constexpr (P::kMin) mw = _mm512_cvtph_ps(load256(wb + 32));
        const uint8_t* qp = wb + x16_chunks_off(P::kType);
        __m512i v[8];
        if constexpr (P::kVals == Vals::Bytes) {
            for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_si512(qp + 64 * j);
        } else {
            const __m512i m4 = _mm512_set1_epi8(0x0f);
            for (int j = 0; j < 4; ++j) {
                const __m512i q = _mm512_loadu_si512(qp + 64 * j);
                v[j] = _mm512_and_si512(q, m4);                            // elements 4j..4j+3
                v[4 + j] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);  // elements 16+4j..
            }
            if constexpr (P::kVals == Vals::Five) {  // bit t of the plane is the fifth bit of v[t]
                const __m512i hb = _mm512_loadu_si512(wb + x16_planes_off(P::kType));
                const __m512i m10 = _mm512_set1_epi8(0x10);
                unroll<8>([&](auto t) { v[t] = join_high<t>(v[t], hb, m10); });
            } else if constexpr (P::kVals == Vals::Lut) {
                const __m512i lut = iq4_lut();
                for (int j = 0; j < 8; ++j) v[j] = _mm512_shuffle_epi8(lut, v[j]);
            }
        }
        for (int c = 0; c < C; ++c) {
            const int8_t* q = reinterpret_cast<const AB*>(a + c * as)[b].qs;
            const size_t i = static_cast<size_t>(c) * nb + b;
            // one chain per activation row (integer sums are exact in any order; the C rows'
            // chains run side by side)
            __m512i s = P::kCorr ? _mm512_set1_epi32(x.corr[i]) : _mm512_setzero_si512();
            for (int j = 0; j < 8; ++j) s = dpbusd_bcast(s, v[j], q + 4 * j);
            const __m512 sc = _mm512_mul_ps(dw, _mm512_set1_ps(x.d[i]));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[c]);
            if constexpr (P::kMin) acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.s[i]), acc[c]);
        }
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + c * ldo, acc[c]);
}

// The x16 kernel of type P for the shared driver (driver.h).
template <class P>
struct X16 {
    static constexpr int kBlock = 32;
    // Activation rows per tile: each block's unpacked weights (the bit-plane join for Q5_0/Q5_1)
    // serve 16 rows. bench_kernels.py, one core, M = 512 (Qwen2.5's shapes): Q5_0 230-250 GOP/s
    // with 8 rows, 280-300 with 16; Q4_1 at M = 32 ~210-240 with 4, ~240-270 with 16.
    static constexpr int kCols = 16;
    static constexpr bool kStreams = true;  // tile_x16 prefetches its own weights ahead
    using Acts = X16Acts;
    static void prep(int nb, const uint8_t* a, size_t as, int nc, Acts& x) { x16_prep_acts<P>(nb, a, as, nc, x); }
    template <int C>
    static void tile(int nb, const uint8_t* w, const uint8_t* a, size_t as, const Acts& x, int c0, float* out,
                     size_t ldo) {
        tile_x16<P, C>(nb, w, a, as, X16View::of(x, static_cast<size_t>(c0) * nb), out, ldo);
    }
};

// ---- x16 packed K-quants and IQ4_XS (super-blocks of 256, Q8_K activations) --------------------
//
// Per super-block and activation row, each sub-block's integer sum is one chain of dpbusd over its
// chunks (exact), scaled by the sub-block's integer scale per weight row (vpmulld, exact: every
// sum stays below 2^31), and summed over the sub-blocks in order: isum, exact. Then one float
// step: acc = fma(float(isum), d_w * d_a, acc); Q4_K/Q5_K add acc = fnmadd(float(msum), dmin_w *
// d_a, acc), msum = sum_j m_j * (the activation's sums of sub-block j), by vpdpwssd. The same
// steps for every pair whatever the tile: batch invariant.

// Per activation row and super-block: d, and integer terms read by every weight group.
struct KActs {
    std::vector<float> d;
    std::vector<int32_t> v;  // kPer per (row, super-block)
};

// Byte k of every dword, zero-extended (vpshufb index, the same in every 128-bit lane).
template <int K>
inline __m512i byte_of_dword(__m512i x) {
    static_assert(K >= 0 && K < 4, "byte");
    const __m512i idx = _mm512_set4_epi32(0x80808000 + 12 + K, 0x80808000 + 8 + K, 0x80808000 + 4 + K, 0x80808000 + K);
    return _mm512_shuffle_epi8(x, idx);
}
// Bytes 2i and 2i+1 of every dword as two zero-extended int16 (vpshufb).
template <int I>
inline __m512i byte_pair_of_dword(__m512i x) {
    auto e = [](int p) {
        return static_cast<int>(0x80008000u | static_cast<uint32_t>(p + 2 * I) |
                                (static_cast<uint32_t>(p + 2 * I + 1) << 16));
    };
    return _mm512_shuffle_epi8(x, _mm512_set4_epi32(e(12), e(8), e(4), e(0)));
}
// Byte k of every dword, sign-extended.
template <int K>
inline __m512i sbyte_of_dword(__m512i x) {
    return _mm512_srai_epi32(_mm512_slli_epi32(x, 24 - 8 * K), 24);
}

template <DType T>
struct KTraits;
template <>
struct KTraits<DType::Q4_K> {
    static constexpr int kPer = 4;
};  // bsum pairs (int16 x 2)
template <>
struct KTraits<DType::Q5_K> {
    static constexpr int kPer = 4;
};
template <>
struct KTraits<DType::Q6_K> {
    static constexpr int kPer = 16;
};  // -32 * bsums[j]
template <>
struct KTraits<DType::IQ4_XS> {
    static constexpr int kPer = 8;
};  // -128 * sum of sub-block j

template <DType T>
void k_prep_acts(int nb, const uint8_t* a, size_t as, int nc, KActs& x) {
    constexpr int kPer = KTraits<T>::kPer;
    const size_t need = static_cast<size_t>(nb) * nc;
    if (x.d.size() < need) x.d.resize(need), x.v.resize(need * kPer);
    for (int c = 0; c < nc; ++c)
        for (int b = 0; b < nb; ++b) {
            const block_q8_K& q = reinterpret_cast<const block_q8_K*>(a + c * as)[b];
            const size_t i = static_cast<size_t>(c) * nb + b;
            x.d[i] = q.d;
            int32_t* v = x.v.data() + i * kPer;
            if constexpr (T == DType::Q6_K) {
                for (int j = 0; j < 16; ++j) v[j] = -32 * q.bsums[j];
            } else if constexpr (T == DType::IQ4_XS) {
                for (int j = 0; j < 8; ++j) v[j] = -128 * (q.bsums[2 * j] + q.bsums[2 * j + 1]);
            } else {  // (sum of sub-block 2p, sum of sub-block 2p + 1) as int16s; |sum| <= 32 * 127
                for (int p = 0; p < 4; ++p) {
                    const int s0 = q.bsums[4 * p] + q.bsums[4 * p + 1], s1 = q.bsums[4 * p + 2] + q.bsums[4 * p + 3];
                    v[p] =
                        static_cast<int32_t>((static_cast<uint32_t>(s0) & 0xffffu) | (static_cast<uint32_t>(s1) << 16));
                }
            }
        }
}

template <int C>
inline void k_finish(__m512 (&acc)[C], const __m512i (&isum)[C], __m512 dw, const KActs& x, size_t i0, size_t nb) {
    for (int c = 0; c < C; ++c)
        acc[c] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), _mm512_mul_ps(dw, _mm512_set1_ps(x.d[i0 + c * nb])), acc[c]);
}

// Q4_K / Q5_K: 8 sub-blocks of 32; chunk c holds sub-block 2(c/8) in its low nibbles and 2(c/8)+1
// in its high nibbles, elements 64(c/8) + 4(c%8) (+ 32 for the high nibbles).
template <bool kQ5, int C>
void tile_q45k(int nb, const uint8_t* w, const uint8_t* a, size_t as, const KActs& x, int c0, float* out, size_t ldo) {
    constexpr DType T = kQ5 ? DType::Q5_K : DType::Q4_K;
    constexpr size_t kBB = x16_block_bytes(T);
    constexpr int kLead = x16_lead_off(T), kPlanes = x16_planes_off(T), kChunks = x16_chunks_off(T);
    const __m512i m4 = _mm512_set1_epi8(0x0f), m6 = _mm512_set1_epi8(0x3f), m30 = _mm512_set1_epi8(0x30);
    const __m512i m10 = _mm512_set1_epi8(0x10);
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        const __m512 dw = _mm512_cvtph_ps(load256(wb)), mw = _mm512_cvtph_ps(load256(wb + 32));
        // 6-bit scales and mins: bytes 0..3 of sc_lo/m_lo are sub-blocks 0..3, of sc_hi/m_hi 4..7
        const __m512i A = _mm512_loadu_si512(wb + kLead), B = _mm512_loadu_si512(wb + kLead + 64);
        const __m512i Cs = _mm512_loadu_si512(wb + kLead + 128);
        const __m512i sc_lo = _mm512_and_si512(A, m6), m_lo = _mm512_and_si512(B, m6);
        const __m512i sc_hi =
            _mm512_ternarylogic_epi32(Cs, _mm512_srli_epi32(A, 2), m30, 0xD8);  // m30 ? (A >> 2) : Cs, bit by bit
        const __m512i m_hi = _mm512_ternarylogic_epi32(_mm512_srli_epi32(Cs, 4), _mm512_srli_epi32(B, 2), m30, 0xD8);
        const __m512i sc_hi6 = _mm512_and_si512(sc_hi, m6), m_hi6 = _mm512_and_si512(m_hi, m6);
        const int8_t* q[C];
        for (int c = 0; c < C; ++c) q[c] = reinterpret_cast<const block_q8_K*>(a + c * as)[b].qs;
        __m512i isum[C];
        for (int c = 0; c < C; ++c) isum[c] = _mm512_setzero_si512();
        unroll<4>([&](auto kk) {  // sub-blocks 2kk (low nibbles) and 2kk + 1 (high nibbles)
            constexpr int j0 = 2 * kk, j1 = 2 * kk + 1;
            const __m512i sc0 = byte_of_dword<j0 % 4>(j0 < 4 ? sc_lo : sc_hi6);
            const __m512i sc1 = byte_of_dword<j1 % 4>(j1 < 4 ? sc_lo : sc_hi6);
            __m512i s0[C], s1[C];
            for (int c = 0; c < C; ++c) s0[c] = s1[c] = _mm512_setzero_si512();
            __m512i hb = _mm512_setzero_si512();
            unroll<8>([&](auto i) {
                constexpr int ch = 8 * kk + i;
                if constexpr (kQ5 || C >= kStreamCols) prefetch_share<kBB, 2 * kBB, 32>(wb, ch);
                const __m512i qv = _mm512_loadu_si512(wb + kChunks + 64 * ch);
                __m512i lo = _mm512_and_si512(qv, m4), hi = _mm512_and_si512(_mm512_srli_epi16(qv, 4), m4);
                if constexpr (kQ5) {  // plane ch/4, bits 2(ch%4) (low nibble) and 2(ch%4)+1 (high)
                    if constexpr (ch % 4 == 0) hb = _mm512_loadu_si512(wb + kPlanes + 64 * (ch / 4));
                    lo = join_high<2 * (ch % 4)>(lo, hb, m10);
                    hi = join_high<2 * (ch % 4) + 1>(hi, hb, m10);
                }
                for (int c = 0; c < C; ++c) {
                    s0[c] = dpbusd_bcast(s0[c], lo, q[c] + 64 * kk + 4 * i);
                    s1[c] = dpbusd_bcast(s1[c], hi, q[c] + 64 * kk + 32 + 4 * i);
                }
            });
            for (int c = 0; c < C; ++c)
                isum[c] = _mm512_add_epi32(
                    isum[c], _mm512_add_epi32(_mm512_mullo_epi32(s0[c], sc0), _mm512_mullo_epi32(s1[c], sc1)));
        });
        const __m512i mp[4] = {byte_pair_of_dword<0>(m_lo), byte_pair_of_dword<1>(m_lo), byte_pair_of_dword<0>(m_hi6),
                               byte_pair_of_dword<1>(m_hi6)};
        const size_t i0 = static_cast<size_t>(c0) * nb + b;
        for (int c = 0; c < C; ++c) {
            const int32_t* pv = x.v.data() + (i0 + static_cast<size_t>(c) * nb) * 4;
            __m512i msum = _mm512_setzero_si512();
            for (int p = 0; p < 4; ++p) msum = _mm512_dpwssd_epi32(msum, mp[p], _mm512_set1_epi32(pv[p]));
            const __m512 da = _mm512_set1_ps(x.d[i0 + static_cast<size_t>(c) * nb]);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[c]), _mm512_mul_ps(dw, da), acc[c]);
            acc[c] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(mw, da), acc[c]);
        }
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + c * ldo, acc[c]);
}

// Q6_K: 16 sub-blocks of 16. In half n, chunk c = 16n + 4q + i holds elements 128n + 16q + 4i
// (low nibbles, sub-block 8n + q) and + 64 (high nibbles, sub-block 8n + 4 + q); plane c/2 holds
// their top two bits at 4(c%2) and 4(c%2) + 2. Values q6 in [0, 63]; - 32 * sum(a) per sub-block
// starts each chain.
template <int C>
void tile_q6k(int nb, const uint8_t* w, const uint8_t* a, size_t as, const KActs& x, int c0, float* out, size_t ldo) {
    constexpr DType T = DType::Q6_K;
    constexpr size_t kBB = x16_block_bytes(T);
    // The weights 2 blocks on; 3 in a GEMV, where one core's stream needs more bytes in flight
    // (Zen 4, one core, Qwen2.5's ffn_down at M = 1, six paired runs of bench_kernels.py: 11.4-12.5
    // GB/s with 2, 13.2-14.8 with 3; 6 or 8 blocks were slower than 3, none at all ~8 GB/s).
    constexpr size_t kAhead = (C < kStreamCols ? 3 : 2) * kBB;
    constexpr int kLead = x16_lead_off(T), kPlanes = x16_planes_off(T), kChunks = x16_chunks_off(T);
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        const __m512 dw = _mm512_cvtph_ps(load256(wb));
        const int8_t* q[C];
        const int32_t* corr[C];
        const size_t i0 = static_cast<size_t>(c0) * nb + b;
        for (int c = 0; c < C; ++c) {
            q[c] = reinterpret_cast<const block_q8_K*>(a + c * as)[b].qs;
            corr[c] = x.v.data() + (i0 + static_cast<size_t>(c) * nb) * 16;
        }
        __m512i isum[C];
        for (int c = 0; c < C; ++c) isum[c] = _mm512_setzero_si512();
        unroll<8>([&](auto nq) {  // (half n, quad q) -> sub-blocks jl = 8n + q and jh = jl + 4
            constexpr int n = nq / 4, qd = nq % 4, jl = 8 * n + qd, jh = jl + 4;
            const __m512i scl = sbyte_of_dword<jl % 4>(_mm512_loadu_si512(wb + kLead + 64 * (jl / 4)));
            const __m512i sch = sbyte_of_dword<jh % 4>(_mm512_loadu_si512(wb + kLead + 64 * (jh / 4)));
            __m512i s0[C], s1[C];
            for (int c = 0; c < C; ++c) {
                s0[c] = _mm512_set1_epi32(corr[c][jl]);
                s1[c] = _mm512_set1_epi32(corr[c][jh]);
            }
            __m512i hb = _mm512_setzero_si512();
            unroll<4>([&](auto i) {
                constexpr int ch = 16 * n + 4 * qd + i;
                prefetch_share<kBB, kAhead, 32>(wb, 4 * nq + i);
                if constexpr (ch % 2 == 0) hb = _mm512_loadu_si512(wb + kPlanes + 64 * (ch / 2));
                const __m512i qv = _mm512_loadu_si512(wb + kChunks + 64 * ch);
                const __m512i lo = join_high<4 * (ch % 2)>(_mm512_and_si512(qv, m4), hb, m30);
                const __m512i hi = join_high<4 * (ch % 2) + 2>(_mm512_and_si512(_mm512_srli_epi16(qv, 4), m4), hb, m30);
                for (int c = 0; c < C; ++c) {
                    s0[c] = dpbusd_bcast(s0[c], lo, q[c] + 128 * n + 16 * qd + 4 * i);
                    s1[c] = dpbusd_bcast(s1[c], hi, q[c] + 128 * n + 64 + 16 * qd + 4 * i);
                }
            });
            for (int c = 0; c < C; ++c)
                isum[c] = _mm512_add_epi32(
                    isum[c], _mm512_add_epi32(_mm512_mullo_epi32(s0[c], scl), _mm512_mullo_epi32(s1[c], sch)));
        });
        k_finish<C>(acc, isum, dw, x, i0, nb);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + c * ldo, acc[c]);
}

// IQ4_XS: 8 sub-blocks of 32; chunk c = 4j + i holds elements 32j + 4i (low nibbles) and + 16
// (high nibbles), both of sub-block j; values from the table + 128, - 128 * sum(a) per sub-block;
// scale ls_j - 32 (6 bits: low 4 in scales_l, high 2 in scales_h).
template <int C>
void tile_iq4xs(int nb, const uint8_t* w, const uint8_t* a, size_t as, const KActs& x, int c0, float* out, size_t ldo) {
    constexpr DType T = DType::IQ4_XS;
    constexpr size_t kBB = x16_block_bytes(T);
    constexpr int kLead = x16_lead_off(T), kChunks = x16_chunks_off(T);
    const __m512i m4 = _mm512_set1_epi8(0x0f), lut = iq4_lut();
    const __m512i low4 = _mm512_set1_epi32(0x0f), bits45 = _mm512_set1_epi32(0x30), k32 = _mm512_set1_epi32(32);
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        const uint8_t* wb = w + static_cast<size_t>(b) * kBB;
        const __m512 dw = _mm512_cvtph_ps(load256(wb));
        const __m512i sh = _mm512_cvtepu16_epi32(load256(wb + 32)), sl = _mm512_loadu_si512(wb + kLead);
        const int8_t* q[C];
        const int32_t* corr[C];
        const size_t i0 = static_cast<size_t>(c0) * nb + b;
        for (int c = 0; c < C; ++c) {
            q[c] = reinterpret_cast<const block_q8_K*>(a + c * as)[b].qs;
            corr[c] = x.v.data() + (i0 + static_cast<size_t>(c) * nb) * 8;
        }
        __m512i isum[C];
        for (int c = 0; c < C; ++c) isum[c] = _mm512_setzero_si512();
        unroll<8>([&](auto j) {
            __m512i hi2;  // bits 2j, 2j + 1 of scales_h moved to bits 4, 5
            if constexpr (j < 2)
                hi2 = _mm512_slli_epi32(sh, 4 - 2 * j);
            else
                hi2 = _mm512_srli_epi32(sh, 2 * j - 4);
            const __m512i ls = _mm512_sub_epi32(
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(sl, 4 * j), low4), _mm512_and_si512(hi2, bits45)),
                k32);
            __m512i s0[C], s1[C];
            for (int c = 0; c < C; ++c) {
                s0[c] = _mm512_set1_epi32(corr[c][j]);
                s1[c] = _mm512_setzero_si512();
            }
            unroll<4>([&](auto i) {
                const __m512i qv = _mm512_loadu_si512(wb + kChunks + 64 * (4 * j + i));
                const __m512i lo = _mm512_shuffle_epi8(lut, _mm512_and_si512(qv, m4));
                const __m512i hi = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(qv, 4), m4));
                for (int c = 0; c < C; ++c) {
                    s0[c] = dpbusd_bcast(s0[c], lo, q[c] + 32 * j + 4 * i);
                    s1[c] = dpbusd_bcast(s1[c], hi, q[c] + 32 * j + 16 + 4 * i);
                }
            });
            for (int c = 0; c < C; ++c)
                isum[c] = _mm512_add_epi32(isum[c], _mm512_mullo_epi32(_mm512_add_epi32(s0[c], s1[c]), ls));
        });
        k_finish<C>(acc, isum, dw, x, i0, nb);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + c * ldo, acc[c]);
}

// The x16 kernel of a super-block type for the shared driver (driver.h).
template <DType T>
struct X16K {
    static constexpr int kBlock = QK_K;
    static constexpr int kCols = 8;  // activation rows per tile (Q6_K at M = 512: ~190-205 GOP/s with 4, ~220-240)
    // The Q4_K/Q5_K/Q6_K tiles prefetch the block 2 on (Q4_K from 8 rows up); instead of the
    // driver's prefetch of the next group, A/B as for tile_x16 at M = 8 and 32: Q4_K ~+7%, Q5_K and
    // Q6_K even. IQ4_XS was slower with its own prefetch, so it keeps the driver's.
    static constexpr bool kStreams = T != DType::IQ4_XS;
    using Acts = KActs;
    static void prep(int nb, const uint8_t* a, size_t as, int nc, Acts& x) { k_prep_acts<T>(nb, a, as, nc, x); }
    template <int C>
    static void tile(int nb, const uint8_t* w, const uint8_t* a, size_t as, const Acts& x, int c0, float* out,
                     size_t ldo) {
        if constexpr (T == DType::Q4_K)
            tile_q45k<false, C>(nb, w, a, as, x, c0, out, ldo);
        else if constexpr (T == DType::Q5_K)
            tile_q45k<true, C>(nb, w, a, as, x, c0, out, ldo);
        else if constexpr (T == DType::Q6_K)
            tile_q6k<C>(nb, w, a, as, x, c0, out, ldo);
        else
            tile_iq4xs<C>(nb, w, a, as, x, c0, out, ldo);
    }
};

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
template <class T, int R, int C>
struct FTile {
    static void run(int len, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* o, size_t l) {
        tile_f<T, R, C>(len, w, ws, a, as, o, l);
    }
};

template <class T>
void gemm_f(int n, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out, size_t ldo) {
    gemm_tiled<FTile, T, 4, 4>(n, nr, nc, w, ws, a, as, out, ldo);  // 4 x 4 tiles
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
    const __m512 one = _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_castps_si512(_mm512_set1_ps(1.0f)),
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
    // F16C rounds to nearest even like fp32_to_fp16 (and d, s are never nan for finite input)
    *dst_d = static_cast<f16_t>(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (kSum) {
        const float sum = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1))) * d;
        *dst_s = static_cast<f16_t>(_cvtss_sh(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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

// Q8_K (bit-identical to quantize_row_ref): the scale comes from the FIRST element of largest
// magnitude (its sign included); quants round half to even (vcvtps2dq in the default rounding
// mode, as nearbyint), capped at 127; bsums are the sums of each 16 quants (one register each).
void from_float_q8_k(const float* x, void* vy, int64_t n) {
    auto* y = static_cast<block_q8_K*>(vy);
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < n / QK_K; ++i, x += QK_K) {
        __m512 vmax = _mm512_setzero_ps();
        for (int j = 0; j < QK_K; j += 16) vmax = _mm512_max_ps(vmax, _mm512_and_ps(_mm512_loadu_ps(x + j), absmask));
        const float amax = _mm512_reduce_max_ps(vmax);
        if (amax == 0.0f) {
            std::memset(&y[i], 0, sizeof(block_q8_K));
            continue;
        }
        float max = 0.0f;
        for (int j = 0; j < QK_K; j += 16) {
            const __mmask16 hit =
                _mm512_cmp_ps_mask(_mm512_and_ps(_mm512_loadu_ps(x + j), absmask), _mm512_set1_ps(amax), _CMP_EQ_OQ);
            if (hit) {
                max = x[j + __builtin_ctz(hit)];
                break;
            }
        }
        const float iscale = -127.0f / max;
        const __m512 vs = _mm512_set1_ps(iscale);
        for (int j = 0; j < QK_K; j += 16) {
            const __m512i q =
                _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vs)), _mm512_set1_epi32(127));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(y[i].qs + j), _mm512_cvtepi32_epi8(q));
            y[i].bsums[j / 16] = static_cast<int16_t>(_mm512_reduce_add_epi32(q));
        }
        y[i].d = 1.0f / iscale;
    }
}

void f32_to_f16(const float* x, f16_t* y, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    if (i < n) {
        const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
        _mm256_mask_storeu_epi16(
            y + i, k, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(k, x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
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
        _mm512_mask_storeu_ps(y + i, k,
                              _mm512_fmadd_ps(va, F16W::load_tail(x + i, k), _mm512_maskz_loadu_ps(k, y + i)));
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
        const __m512 v =
            _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), scale), _mm512_maskz_loadu_ps(k, w + i));
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

// y = gelu_tanh(g) * u as g * sigmoid(2a) * u, a = sqrt(2/pi) (g + 0.044715 g^3)
void geglu_tanh(int n, const float* g, const float* u, float* y) {
    const __m512 one = _mm512_set1_ps(1.0f), c1 = _mm512_set1_ps(-2.0f * 0.7978845608028654f),
                 c3 = _mm512_set1_ps(-2.0f * 0.7978845608028654f * 0.044715f);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 e = exp_ps(_mm512_mul_ps(gv, _mm512_fmadd_ps(_mm512_mul_ps(gv, gv), c3, c1)));  // exp(-2a)
        const __m512 gelu = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(gelu, _mm512_maskz_loadu_ps(k, u + i)));
    }
}

// Max, exp and sum in 16-lane chunks (masked tail), one fixed lane-sum tree: depends on the row only.
void softmax(int n, float* x) {
    if (n <= 0) return;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + i));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    const __m512 lo = _mm512_set1_ps(-104.0f);  // exp underflows to 0 below; keeps -inf out of exp_ps
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        const __m512 e = exp_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mx), lo));
        _mm512_mask_storeu_ps(x + i, k, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / hsum1(sum));
    for (int i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - i);
        _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv));
    }
}

// ---- attention over one block of the f16 KV cache -------------------------------------------------
// Scores: each position's 64-or-more-lane product is folded into 16 lanes by one FMA chain over the
// head's 16-lane chunks (in order), then summed by hsum4's fixed tree, four positions at a time
// (missing positions are zero vectors), so a score never depends on n, nq or the position's slot
// in its group of four. head_dim 64 keeps up to 3 heads' q in registers across the positions.

template <int NQ>
void scores64(const float* q, const f16_t* k, size_t ks, int n, float scale, float* scores, size_t ld) {
    __m512 qv[NQ][4];
    for (int h = 0; h < NQ; ++h)
        for (int c = 0; c < 4; ++c) qv[h][c] = _mm512_loadu_ps(q + h * 64 + c * 16);
    const __m512 vs = _mm512_set1_ps(scale);
    for (int j = 0; j < n; j += 4) {
        const int m = n - j < 4 ? n - j : 4;
        __m512 acc[NQ][4];
        for (int p = 0; p < 4; ++p) {
            if (p < m) {
                const f16_t* kp = k + (size_t)(j + p) * ks;
                const __m512 k0 = F16W::load(kp), k1 = F16W::load(kp + 16);
                const __m512 k2 = F16W::load(kp + 32), k3 = F16W::load(kp + 48);
                for (int h = 0; h < NQ; ++h) {
                    __m512 a = _mm512_mul_ps(k0, qv[h][0]);
                    a = _mm512_fmadd_ps(k1, qv[h][1], a);
                    a = _mm512_fmadd_ps(k2, qv[h][2], a);
                    acc[h][p] = _mm512_fmadd_ps(k3, qv[h][3], a);
                }
            } else {
                for (int h = 0; h < NQ; ++h) acc[h][p] = _mm512_setzero_ps();
            }
        }
        for (int h = 0; h < NQ; ++h) {
            const __m128 s = _mm_mul_ps(hsum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]), _mm512_castps512_ps128(vs));
            float* o = scores + h * ld + j;
            if (m == 4)
                _mm_storeu_ps(o, s);
            else
                _mm_mask_storeu_ps(o, static_cast<__mmask8>((1u << m) - 1), s);
        }
    }
}

// Any head_dim: the same scheme with q read from memory and a masked last chunk, for NQ <= 4
// heads at once, so each K chunk is loaded and widened once for the whole GQA group (Gemma 3:
// head_dim 256, 4 query heads per KV head). Each score runs the very same operations whatever NQ:
// mul then FMAs over the chunks in order, hsum4 of its 4-position group, times scale.
// One group of four positions (m of them real) for NQ heads of one row: kv(i, p) gives position p's
// chunk at element i (zeros past m or hd). Shared by scores_any and scores_rows, so a score has the
// same steps whichever computes it.
template <int NQ, class KV>
[[gnu::always_inline]] inline void score_group(int hd, const float* q, int m, __m128 vs, float* o, size_t ld,
                                               KV&& kv_at) {
    __m512 acc[NQ][4];
    for (int h = 0; h < NQ; ++h)
        for (int p = 0; p < 4; ++p) acc[h][p] = _mm512_setzero_ps();
    for (int i = 0; i < hd; i += 16) {
        const __mmask16 mk = hd - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(hd - i);
        __m512 kv[4];
        for (int p = 0; p < 4; ++p) kv[p] = kv_at(i, p, mk);
        for (int h = 0; h < NQ; ++h) {
            const __m512 qv = _mm512_maskz_loadu_ps(mk, q + (size_t)h * hd + i);
            for (int p = 0; p < 4; ++p)
                acc[h][p] = i == 0 ? _mm512_mul_ps(kv[p], qv) : _mm512_fmadd_ps(kv[p], qv, acc[h][p]);
        }
    }
    for (int h = 0; h < NQ; ++h) {
        const __m128 s = _mm_mul_ps(hsum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3]), vs);
        if (m == 4)
            _mm_storeu_ps(o + (size_t)h * ld, s);
        else
            _mm_mask_storeu_ps(o + (size_t)h * ld, static_cast<__mmask8>((1u << m) - 1), s);
    }
}

template <int NQ>
void scores_any(int hd, const float* q, const f16_t* k, size_t ks, int n, float scale, float* scores, size_t ld) {
    const __m128 vs = _mm_set1_ps(scale);
    for (int j = 0; j < n; j += 4) {
        const int m = n - j < 4 ? n - j : 4;
        score_group<NQ>(hd, q, m, vs, scores + j, ld, [=](int i, int p, __mmask16 mk) [[gnu::always_inline]] {
            return p < m ? F16W::load_tail(k + (size_t)(j + p) * ks + i, mk) : _mm512_setzero_ps();
        });
    }
}

void attn_scores_f16(int hd, int nq, const float* q, const f16_t* k, size_t ks, int n, float scale, float* scores,
                     size_t ld) {
    if (hd != 64) {
        int h = 0;
        for (; h + 4 <= nq; h += 4) scores_any<4>(hd, q + (size_t)h * hd, k, ks, n, scale, scores + h * ld, ld);
        if (nq - h == 3)
            scores_any<3>(hd, q + (size_t)h * hd, k, ks, n, scale, scores + h * ld, ld);
        else if (nq - h == 2)
            scores_any<2>(hd, q + (size_t)h * hd, k, ks, n, scale, scores + h * ld, ld);
        else if (nq - h == 1)
            scores_any<1>(hd, q + (size_t)h * hd, k, ks, n, scale, scores + h * ld, ld);
        return;
    }
    int h = 0;
    for (; h + 3 <= nq; h += 3) scores64<3>(q + h * 64, k, ks, n, scale, scores + h * ld, ld);
    if (nq - h == 2)
        scores64<2>(q + h * 64, k, ks, n, scale, scores + h * ld, ld);
    else if (nq - h == 1)
        scores64<1>(q + h * 64, k, ks, n, scale, scores + h * ld, ld);
}

// nr rows x NQ heads against the same positions: each group of four positions is widened to f32
// once (exact) into kf, then every row runs scores_any's steps over it: per 16-lane chunk, mul then
// FMAs in order (masked past hd), hsum4 of the group, times scale. So each score has the bits
// attn_scores_f16 gives that row alone, and a K chunk costs one conversion for all the rows.
template <int NQ, int NR>
void scores_rows(int hd, const float* q, size_t qs, const f16_t* k, size_t ks, int n, float scale, float* scores,
                 size_t ldr, size_t ld) {
    constexpr int kMaxHd = 512;
    if (hd > kMaxHd) {
        for (int r = 0; r < NR; ++r) attn_scores_f16(hd, NQ, q + r * qs, k, ks, n, scale, scores + r * ldr, ld);
        return;
    }
    const __m128 vs = _mm_set1_ps(scale);
    alignas(64) float kf[4][kMaxHd];
    for (int j = 0; j < n; j += 4) {
        const int m = n - j < 4 ? n - j : 4;
        for (int i = 0; i < hd; i += 16) {
            const __mmask16 mk = hd - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(hd - i);
            for (int p = 0; p < 4; ++p)
                _mm512_store_ps(kf[p] + i,
                                p < m ? F16W::load_tail(k + (size_t)(j + p) * ks + i, mk) : _mm512_setzero_ps());
        }
        for (int r = 0; r < NR; ++r)
            score_group<NQ>(hd, q + r * qs, m, vs, scores + r * ldr + j, ld,
                            [&](int i, int p, __mmask16) [[gnu::always_inline]] { return _mm512_load_ps(kf[p] + i); });
    }
}

template <int NQ, int NR = 16 / NQ>
void scores_rows_n(int hd, int nr, const float* q, size_t qs, const f16_t* k, size_t ks, int n, float scale,
                   float* scores, size_t ldr, size_t ld) {  // scores_rows<NQ, nr> for a run-time nr <= NR
    if constexpr (NR >= 1) {
        if (nr == NR)
            scores_rows<NQ, NR>(hd, q, qs, k, ks, n, scale, scores, ldr, ld);
        else
            scores_rows_n<NQ, NR - 1>(hd, nr, q, qs, k, ks, n, scale, scores, ldr, ld);
    }
}

void attn_scores_f16_rows(int hd, int nr, int nq, const float* q, size_t qs, const f16_t* k, size_t ks, int n,
                          float scale, float* scores, size_t ldr, size_t ld) {
    switch (nq) {
        case 1:
            return scores_rows_n<1>(hd, nr, q, qs, k, ks, n, scale, scores, ldr, ld);
        case 2:
            return scores_rows_n<2>(hd, nr, q, qs, k, ks, n, scale, scores, ldr, ld);
        case 3:
            return scores_rows_n<3>(hd, nr, q, qs, k, ks, n, scale, scores, ldr, ld);
        case 4:
            return scores_rows_n<4>(hd, nr, q, qs, k, ks, n, scale, scores, ldr, ld);
        default:  // wider groups: row by row
            for (int r = 0; r < nr; ++r) attn_scores_f16(hd, nq, q + r * qs, k, ks, n, scale, scores + r * ldr, ld);
    }
}

// Accumulation, out += p_j * v_j for j = 0..n-1 in order, one FMA per element, for any head_dim:
// 64 columns of NQ <= 4 heads stay in registers across the positions (then 16 at a time), each V
// chunk widened once for the group.
template <int NQ>
void accum_any(int hd, const float* p, size_t ld, const f16_t* v, size_t vs, int n, float* out) {
    int c0 = 0;
    for (; c0 + 64 <= hd; c0 += 64) {  // whole 64-column chunks: no masks, all in registers
        __m512 acc[NQ][4];
        for (int h = 0; h < NQ; ++h)
            for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_loadu_ps(out + (size_t)h * hd + c0 + 16 * c);
        for (int j = 0; j < n; ++j) {
            const f16_t* vp = v + (size_t)j * vs + c0;
            const __m512 v0 = F16W::load(vp), v1 = F16W::load(vp + 16), v2 = F16W::load(vp + 32),
                         v3 = F16W::load(vp + 48);
            for (int h = 0; h < NQ; ++h) {
                const __m512 w = _mm512_set1_ps(p[h * ld + j]);
                acc[h][0] = _mm512_fmadd_ps(w, v0, acc[h][0]);
                acc[h][1] = _mm512_fmadd_ps(w, v1, acc[h][1]);
                acc[h][2] = _mm512_fmadd_ps(w, v2, acc[h][2]);
                acc[h][3] = _mm512_fmadd_ps(w, v3, acc[h][3]);
            }
        }
        for (int h = 0; h < NQ; ++h)
            for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + (size_t)h * hd + c0 + 16 * c, acc[h][c]);
    }
    for (; c0 < hd; c0 += 16) {  // the rest, 16 columns at a time, the last one masked
        const __mmask16 mk = hd - c0 >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(hd - c0);
        __m512 acc[NQ];
        for (int h = 0; h < NQ; ++h) acc[h] = _mm512_maskz_loadu_ps(mk, out + (size_t)h * hd + c0);
        for (int j = 0; j < n; ++j) {
            const __m512 vv = F16W::load_tail(v + (size_t)j * vs + c0, mk);
            for (int h = 0; h < NQ; ++h) acc[h] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * ld + j]), vv, acc[h]);
        }
        for (int h = 0; h < NQ; ++h) _mm512_mask_storeu_ps(out + (size_t)h * hd + c0, mk, acc[h]);
    }
}

void attn_accum_f16(int hd, int nq, const float* p, size_t ld, const f16_t* v, size_t vs, int n, float* out) {
    int h = 0;
    for (; h + 4 <= nq; h += 4) accum_any<4>(hd, p + h * ld, ld, v, vs, n, out + (size_t)h * hd);
    if (nq - h == 3)
        accum_any<3>(hd, p + h * ld, ld, v, vs, n, out + (size_t)h * hd);
    else if (nq - h == 2)
        accum_any<2>(hd, p + h * ld, ld, v, vs, n, out + (size_t)h * hd);
    else if (nq - h == 1)
        accum_any<1>(hd, p + h * ld, ld, v, vs, n, out + (size_t)h * hd);
}

// ---- attention over one block of the int8 KV cache (layout in kernels.h) -------------------------
// Scores: a K chunk (4 elements of 16 positions) XOR 0x80 is k + 128 as unsigned bytes; one
// vpdpbusd against 4 broadcast query bytes advances the 16 positions' integer sums, and each
// group's sum is corrected by -128 * (its query sum): exact. Then the reference's float steps, 16
// positions per instruction. Heads go up to 4 at a time over one pass of the tile.

template <int NQ>
inline void q8_tile(const KV8Layout& L, const uint8_t* q, size_t qb, const uint8_t* tile, __m512 (&s)[NQ]) {
    const int G = L.groups(), C = L.chunks();
    const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
    const auto* dk = reinterpret_cast<const f16_t*>(tile + L.k_scales_offset());
    for (int h = 0; h < NQ; ++h) s[h] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
        __m512i acc[NQ];
        for (int h = 0; h < NQ; ++h) acc[h] = _mm512_setzero_si512();
        const int c1 = std::min(C, 8 * (g + 1));
        for (int c = 8 * g; c < c1; ++c) {
            const __m512i k = _mm512_xor_si512(_mm512_loadu_si512(tile + 64 * c), bias);
            for (int h = 0; h < NQ; ++h)
                acc[h] = dpbusd_bcast(acc[h], k, reinterpret_cast<const int8_t*>(q + h * qb) + 4 * c);
        }
        const __m512 dkg = _mm512_cvtph_ps(load256(dk + kKV8Tile * g));
        for (int h = 0; h < NQ; ++h) {
            const uint8_t* r = q + h * qb + 4 * C;
            float dq;
            int32_t qsum;
            std::memcpy(&dq, r + 4 * g, 4);
            std::memcpy(&qsum, r + 4 * G + 4 * g, 4);
            const __m512i isum = _mm512_sub_epi32(acc[h], _mm512_set1_epi32(128 * qsum));
            s[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(_mm512_set1_ps(dq), dkg), s[h]);
        }
    }
}

template <int NQ>
void scores_q8(const KV8Layout& L, const uint8_t* q, const uint8_t* k_run, int j0, int n, float scale, float* scores,
               size_t ld) {
    const size_t qb = L.query_bytes(), tb = L.k_tile_bytes();
    const __m512 vs = _mm512_set1_ps(scale);
    for (int t0 = j0 / kKV8Tile * kKV8Tile; t0 < j0 + n; t0 += kKV8Tile) {
        const int a = std::max(j0, t0), b = std::min(j0 + n, t0 + kKV8Tile);  // positions [a, b) of the tile
        const __mmask16 lanes = static_cast<__mmask16>(((1u << (b - t0)) - 1) & ~((1u << (a - t0)) - 1));
        __m512 sv[NQ];
        q8_tile<NQ>(L, q, qb, k_run + (size_t)(t0 / kKV8Tile) * tb, sv);
        for (int h = 0; h < NQ; ++h)
            _mm512_mask_storeu_ps(scores + h * ld + (a - j0), tail_mask(b - a),
                                  _mm512_maskz_compress_ps(lanes, _mm512_mul_ps(sv[h], vs)));
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

// 16 int8 (masked) as floats.
inline __m512 v16(const int8_t* p, __mmask16 k) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

// Accumulation, head_dim 64: NQ heads' outputs stay in registers across the positions; position j's
// two groups scale by p_j * d_v[j][g], one FMA per element, positions in order.
template <int NQ>
void accum_q8_64(const KV8Layout& L, const float* p, size_t ld, const uint8_t* v_run, int j0, int n, float* out) {
    const auto* dv = reinterpret_cast<const f16_t*>(v_run + L.v_scales_offset());
    __m512 acc[NQ][4];
    for (int h = 0; h < NQ; ++h)
        for (int c = 0; c < 4; ++c) acc[h][c] = _mm512_loadu_ps(out + h * 64 + c * 16);
    for (int j = j0; j < j0 + n; ++j) {
        const auto* vr = reinterpret_cast<const int8_t*>(v_run + (size_t)j * 64);
        __m512 v[4];
        for (int c = 0; c < 4; ++c) v[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load128(vr + 16 * c)));
        const float d0 = fp16_lut(dv[2 * j]), d1 = fp16_lut(dv[2 * j + 1]);
        for (int h = 0; h < NQ; ++h) {
            const float pj = p[h * ld + (j - j0)];
            const __m512 w0 = _mm512_set1_ps(pj * d0), w1 = _mm512_set1_ps(pj * d1);
            acc[h][0] = _mm512_fmadd_ps(w0, v[0], acc[h][0]);
            acc[h][1] = _mm512_fmadd_ps(w0, v[1], acc[h][1]);
            acc[h][2] = _mm512_fmadd_ps(w1, v[2], acc[h][2]);
            acc[h][3] = _mm512_fmadd_ps(w1, v[3], acc[h][3]);
        }
    }
    for (int h = 0; h < NQ; ++h)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + h * 64 + c * 16, acc[h][c]);
}

void attn_accum_q8(const KV8Layout& L, int nq, const float* p, size_t ld, const uint8_t* v_run, int j0, int n,
                   float* out) {
    const int hd = L.hd, G = L.groups();
    if (hd == 64) {
        int h = 0;
        for (; h + 4 <= nq; h += 4) accum_q8_64<4>(L, p + h * ld, ld, v_run, j0, n, out + h * 64);
        switch (nq - h) {
            case 3:
                accum_q8_64<3>(L, p + h * ld, ld, v_run, j0, n, out + h * 64);
                break;
            case 2:
                accum_q8_64<2>(L, p + h * ld, ld, v_run, j0, n, out + h * 64);
                break;
            case 1:
                accum_q8_64<1>(L, p + h * ld, ld, v_run, j0, n, out + h * 64);
                break;
            default:
                break;
        }
        return;
    }
    // any head_dim: 16 elements (one group's half or less) at a time, accumulated over the positions
    const auto* dv = reinterpret_cast<const f16_t*>(v_run + L.v_scales_offset());
    for (int h = 0; h < nq; ++h)
        for (int i = 0; i < hd; i += 16) {
            const __mmask16 mk = hd - i >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(hd - i);
            const int g = i / kKV8Group;
            float* o = out + (size_t)h * hd + i;
            __m512 acc = _mm512_maskz_loadu_ps(mk, o);
            for (int j = j0; j < j0 + n; ++j) {
                const float w = p[h * ld + (j - j0)] * fp16_lut(dv[(size_t)j * G + g]);
                acc = _mm512_fmadd_ps(_mm512_set1_ps(w),
                                      v16(reinterpret_cast<const int8_t*>(v_run + (size_t)j * hd + i), mk), acc);
            }
            _mm512_mask_storeu_ps(o, mk, acc);
        }
}

// ---- the int8 KV cache's quantizers (kv8.h; bit-identical to kv8_store / kv8_quantize_query) ------
// One group of 32 as q8_group: max|x| with max_ps's NaN rule (it returns the second operand, so a
// NaN element is skipped as std::fmax skips it), d = amax / 127 and id = 1 / d in float, q =
// roundf(x * id) (round_away), and a q outside [-128, 127] (a NaN, an overflow) stored as 0.
inline __m512i kv8_q8_value(__m512i q) {
    const __mmask16 ok = _mm512_cmp_epi32_mask(q, _mm512_set1_epi32(-128), _MM_CMPINT_NLT) &
                         _mm512_cmp_epi32_mask(q, _mm512_set1_epi32(127), _MM_CMPINT_LE);
    return _mm512_maskz_mov_epi32(ok, q);
}

float kv8_group(const float* x, int8_t* qs, int32_t* sum) {
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const __m512 a = _mm512_max_ps(_mm512_abs_ps(x1), _mm512_max_ps(_mm512_abs_ps(x0), _mm512_setzero_ps()));
    const float d = _mm512_reduce_max_ps(a) / 127.0f;
    const __m512 vid = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    const __m512i q0 = kv8_q8_value(round_away(_mm512_mul_ps(x0, vid)));
    const __m512i q1 = kv8_q8_value(round_away(_mm512_mul_ps(x1, vid)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + 16), _mm512_cvtepi32_epi8(q1));
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    return d;
}

// ---- the table ----------------------------------------------------------------------------------

}  // namespace

const IsaTable* isa_table_avx512() {
    static TypeKernels store[kMaxDTypeId];
    static const IsaTable table =
        make_isa_table(Isa::AVX512, store,
                       {
                           {DType::Q4_0, nullptr, vec_dot_q<Q4_0T>, gemm_q<Q4_0T>, gemm_x16<X16<Q4_0P>>},
                           {DType::Q4_1, nullptr, vec_dot_q<Q4_1T>, gemm_q<Q4_1T>, gemm_x16<X16<Q4_1P>>},
                           {DType::Q8_0, from_float_q8_0, vec_dot_q<Q8_0T>, gemm_q<Q8_0T>, gemm_x16<X16<Q8_0P>>},
                           {DType::Q8_1, from_float_q8_1},
                           {DType::Q8_K, from_float_q8_k},
                           {DType::Q5_0, nullptr, nullptr, nullptr, gemm_x16<X16<Q5_0P>>},
                           {DType::Q5_1, nullptr, nullptr, nullptr, gemm_x16<X16<Q5_1P>>},
                           {DType::IQ4_NL, nullptr, nullptr, nullptr, gemm_x16<X16<IQ4_NLP>>},
                           {DType::Q4_K, nullptr, nullptr, nullptr, gemm_x16<X16K<DType::Q4_K>>},
                           {DType::Q5_K, nullptr, nullptr, nullptr, gemm_x16<X16K<DType::Q5_K>>},
                           {DType::Q6_K, nullptr, nullptr, nullptr, gemm_x16<X16K<DType::Q6_K>>},
                           {DType::IQ4_XS, nullptr, nullptr, nullptr, gemm_x16<X16K<DType::IQ4_XS>>},
                           {DType::F32, nullptr, vec_dot_f<F32W>, gemm_f<F32W>},
                           {DType::F16, from_float_f16, vec_dot_f<F16W>, gemm_f<F16W>},
                           {DType::BF16, nullptr, vec_dot_f<BF16W>, gemm_f<BF16W>},
                       },
                       OpsKernels{dot_f16_f32, axpy_f16, f32_to_f16, dot_f32, rmsnorm, swiglu, attn_scores_f16,
                                  attn_accum_f16, softmax, geglu_tanh, attn_scores_q8, attn_accum_q8,
                                  kv8_store_with<kv8_group>, kv8_quantize_query_with<kv8_group>, attn_scores_f16_rows});
    return &table;
}

}  // namespace ts
