// sampling.cpp — the batch sampler (see sampling.h for the semantics).
//
// Cost per row is a few passes over the vocabulary: argmax (greedy), or max + exp + sum (+ the
// draw's block sums) in float64. The full-vocabulary loops are written lane-wise so the compiler
// vectorises them; on x86 with GCC each is also compiled for AVX2 and AVX-512 (target_clones, the
// loader picks one). Everything else touches only the candidates (top-k, the nucleus).
#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "threadpool.h"

#if defined(__clang__)
#pragma clang diagnostic ignored "-Wpsabi"  // 64-byte vectors in always-inlined helpers only
#elif defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TS_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define TS_CLONES
#endif

namespace ts {

namespace {

// GCC/clang vector extensions (not intrinsics): one source for every ISA the clones target.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));

__attribute__((always_inline)) inline f32x16 load16(const float* x) {
    f32x16 v;
    std::memcpy(&v, x, sizeof v);
    return v;
}

__attribute__((always_inline)) inline f32x16 splat16(float v) { return f32x16{} + v; }
constexpr int kDrawBlock = 256;  // the draw walks block sums, then one block

// exp(x) for x <= 0, within ~1 ulp; 0 below -708 (where exp turns subnormal); NaN stays NaN.
// 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (Cody-Waite), e^r by its Taylor series to
// r^13 (|r| <= ln2 / 2: truncation < 1e-17). Branch-free, so it vectorises.
inline double exp_nonpositive(double x) {
    const double kLog2e = 1.4426950408889634, kShift = 6755399441055744.0;  // 1.5 * 2^52
    const double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
    const double xc = x < -708.0 ? -708.0 : x;
    const double t = xc * kLog2e + kShift;  // n sits in the low mantissa bits of t
    const double n = t - kShift;
    const double r = (xc - n * kLn2Hi) - n * kLn2Lo;
    double q = 1.0 / 6227020800.0;
    q = q * r + 1.0 / 479001600.0;
    q = q * r + 1.0 / 39916800.0;
    q = q * r + 1.0 / 3628800.0;
    q = q * r + 1.0 / 362880.0;
    q = q * r + 1.0 / 40320.0;
    q = q * r + 1.0 / 5040.0;
    q = q * r + 1.0 / 720.0;
    q = q * r + 1.0 / 120.0;
    q = q * r + 1.0 / 24.0;
    q = q * r + 1.0 / 6.0;
    q = q * r + 0.5;
    q = q * r + 1.0;
    q = q * r + 1.0;
    uint64_t bits;
    std::memcpy(&bits, &t, sizeof bits);
    bits = (bits << 52) + (uint64_t{1023} << 52);  // 2^n: (n + 1023) in the exponent field
    double scale;
    std::memcpy(&scale, &bits, sizeof scale);
    const double y = q * scale;
    return x < -708.0 ? 0.0 : y;
}

bool is_nan(float v) { return v != v; }

// Index of the largest entry, ties -> lowest index; the first NaN if there is one (numpy's
// argmax). Per lane: its maximum and the chunk where it first reached it.
TS_CLONES int argmax(const float* x, int n) {
    f32x16 m = splat16(-std::numeric_limits<float>::infinity());
    i32x16 at = {}, nan = {};
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const f32x16 v = load16(x + i);
        const i32x16 gt = v > m;
        m = gt ? v : m;
        at = gt ? lane + i : at;
        nan |= v != v;
    }
    float best = -std::numeric_limits<float>::infinity();
    int best_i = -1;
    bool any_nan = false;
    for (int j = 0; j < 16 && i > 0; j++) {  // lanes that never rose above -inf keep best_i -1
        any_nan |= nan[j] != 0;
        if (m[j] > best || (m[j] == best && best_i >= 0 && at[j] < best_i)) best = m[j], best_i = at[j];
    }
    for (; i < n; i++) {
        any_nan |= is_nan(x[i]);
        if (x[i] > best) best = x[i], best_i = i;
    }
    if (any_nan)
        for (int k = 0; k < n; k++)
            if (is_nan(x[k])) return k;
    return best_i < 0 ? 0 : best_i;  // every entry is -inf: the first
}

TS_CLONES float max_of(const float* x, int n) {
    const float ninf = -std::numeric_limits<float>::infinity();
    f32x16 m = splat16(ninf);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const f32x16 v = load16(x + i);
        m = v > m ? v : m;  // a NaN never wins
    }
    float best = ninf;
    for (int j = 0; j < 16; j++) best = m[j] > best ? m[j] : best;
    for (; i < n; i++) best = x[i] > best ? x[i] : best;
    return best;
}

TS_CLONES double sum_of(const double* p, int n) {
    f64x8 a = {}, b = {};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        f64x8 u, v;
        std::memcpy(&u, p + i, sizeof u);
        std::memcpy(&v, p + i + 8, sizeof v);
        a += u;
        b += v;
    }
    a += b;
    double total = 0.0;
    for (int j = 0; j < 8; j++) total += a[j];
    for (; i < n; i++) total += p[i];
    return total;
}

// p[i] = exp(x[i] / T - m), the softmax numerators over the whole vocabulary (float64, as the
// reference: x widened, divided by T, minus max(x) / T).
TS_CLONES void exp_scaled(const float* x, int n, double temperature, double m, double* p) {
    if (temperature == 1.0) {  // x / 1 is x: the same numbers without n divisions
        for (int i = 0; i < n; i++) p[i] = exp_nonpositive(static_cast<double>(x[i]) - m);
    } else {
        for (int i = 0; i < n; i++) p[i] = exp_nonpositive(static_cast<double>(x[i]) / temperature - m);
    }
}

TS_CLONES void scale(double* p, int n, double by) {
    for (int i = 0; i < n; i++) p[i] /= by;
}

struct Scratch {
    std::vector<double> p;     // candidate probabilities
    std::vector<int32_t> ids;  // candidate token ids (when not the whole vocabulary in order)
    std::vector<double> tmp;
};

Scratch& scratch() {
    thread_local Scratch s;
    return s;
}

// The k largest entries, ties -> lowest id, returned in id order: a bounded heap over one pass.
// Once it is full, chunks with nothing above its worst entry are skipped in a vectorised test.
TS_CLONES void top_k(const float* x, int n, int k, std::vector<int32_t>& out) {
    // heap of the k best so far, worst on top; "worse" = smaller value, or equal value and larger id
    auto worse = [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
    out.clear();
    int i = 0;
    for (; i < n && (int)out.size() < k; i++) {
        if (is_nan(x[i])) continue;
        out.push_back(i);
        std::push_heap(out.begin(), out.end(), worse);
    }
    float thr = (int)out.size() == k ? x[out.front()] : std::numeric_limits<float>::infinity();
    auto offer = [&](int j) {  // ids ascend: an equal value is never better
        if (x[j] > thr) {
            std::pop_heap(out.begin(), out.end(), worse);
            out.back() = j;
            std::push_heap(out.begin(), out.end(), worse);
            thr = x[out.front()];
        }
    };
    for (; i + 64 <= n; i += 64) {  // skip 64 entries at a time while none beats the heap's worst
        f32x16 m = load16(x + i);
        for (int j = 16; j < 64; j += 16) {
            const f32x16 v = load16(x + i + j);
            m = v > m ? v : m;
        }
        float bm = m[0];
        for (int j = 1; j < 16; j++) bm = m[j] > bm ? m[j] : bm;
        if (bm > thr)
            for (int j = 0; j < 64; j++) offer(i + j);
    }
    for (; i < n; i++) offer(i);
    std::sort(out.begin(), out.end());
}

// Mass of the entries >= t, vectorised.
TS_CLONES double mass_at_least(const double* p, int n, double t) {
    f64x8 acc = {};
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        f64x8 v;
        std::memcpy(&v, p + i, sizeof v);
        acc += v >= t ? v : f64x8{};
    }
    double m = 0.0;
    for (int j = 0; j < 8; j++) m += acc[j];
    for (; i < n; i++) m += p[i] >= t ? p[i] : 0.0;
    return m;
}

// Top-p over candidates (p[0..n), ids or the identity): keep the shortest prefix, by descending
// probability (ties -> lowest id), whose mass reaches top_p; renormalise. Above 1024 candidates
// only those at or above a threshold whose mass already reaches top_p are sorted: tokens with
// p >= t are a prefix of the sorted order, so the nucleus lies inside them (t starts at max / 4
// and drops 4x at a time, each try one vectorised pass).
int nucleus(Scratch& s, int n, bool have_ids, double top_p) {
    std::vector<double>& p = s.p;
    double t = 0.0;  // 0: every candidate
    if (n > 1024) {
        double pmax = 0.0;
        for (int i = 0; i < n; i++) pmax = std::max(pmax, p[i]);
        for (t = pmax / 4; t >= pmax * 1e-300; t /= 4)
            if (mass_at_least(p.data(), n, t) >= top_p) break;
        if (t < pmax * 1e-300) t = 0.0;
    }
    struct Cand {
        double p;
        int32_t id;
        int32_t at;
    };
    std::vector<Cand> c;
    c.reserve(n > 4096 ? 4096 : n);
    for (int i = 0; i < n; i++)
        if (p[i] >= t) c.push_back({p[i], have_ids ? s.ids[i] : i, i});
    std::sort(c.begin(), c.end(),
              [](const Cand& a, const Cand& b) { return a.p > b.p || (a.p == b.p && a.id < b.id); });
    const double target = top_p * (1 - 1e-12);
    double acc = 0.0;
    size_t keep = c.size();
    for (size_t j = 0; j < c.size(); j++) {
        acc += c[j].p;
        if (acc >= target) {
            keep = j + 1;
            break;
        }
    }
    double total = 0.0;
    for (size_t j = 0; j < keep; j++) total += c[j].p;
    s.ids.resize(keep);
    for (size_t j = 0; j < keep; j++) p[j] = c[j].p / total, s.ids[j] = c[j].id;
    return (int)keep;
}

// Min-p: keep candidates with p >= min_p * max p (order kept), renormalise.
int min_p_filter(Scratch& s, int n, bool have_ids, double min_p) {
    std::vector<double>& p = s.p;
    double pmax = 0.0;
    for (int i = 0; i < n; i++) pmax = std::max(pmax, p[i]);
    const double cut = min_p * pmax;
    if (!have_ids) {
        s.ids.resize(n);
        for (int i = 0; i < n; i++) s.ids[i] = i;
    }
    int m = 0;
    double total = 0.0;
    for (int i = 0; i < n; i++)
        if (p[i] >= cut) p[m] = p[i], s.ids[m] = s.ids[i], total += p[i], m++;
    for (int i = 0; i < m; i++) p[i] /= total;
    return m;
}

// Inverse CDF: the first index whose running sum exceeds u * sum(p). Above 4 blocks, block sums
// first, then the running sum inside the one block that holds the target.
int draw(const double* p, int n, double u) {
    if (n <= 4 * kDrawBlock) {
        double c = 0.0;
        for (int i = 0; i < n; i++) c += p[i];
        const double target = u * c;
        c = 0.0;
        for (int i = 0; i < n; i++) {
            c += p[i];
            if (c > target) return i;
        }
        return n - 1;
    }
    const int nb = (n + kDrawBlock - 1) / kDrawBlock;
    std::vector<double>& bs = scratch().tmp;
    bs.resize(nb);
    double total = 0.0;
    for (int b = 0; b < nb; b++) {
        const int lo = b * kDrawBlock;
        bs[b] = sum_of(p + lo, std::min(kDrawBlock, n - lo));
        total += bs[b];
    }
    const double target = u * total;
    double acc = 0.0;
    int b = 0;
    for (; b < nb - 1; b++) {
        if (acc + bs[b] > target) break;
        acc += bs[b];
    }
    const int lo = b * kDrawBlock, hi = std::min(n, lo + kDrawBlock);
    double c = acc;
    for (int i = lo; i < hi; i++) {
        c += p[i];
        if (c > target) return i;
    }
    for (int i = hi - 1; i > lo; i--)  // block sum and running sum rounded apart: last nonzero
        if (p[i] != 0.0) return i;
    return lo;
}

}  // namespace

int32_t sample_row(const float* x, int vocab, const SampleParams& sp) {
    if (vocab <= 0) return 0;
    if (!(sp.temperature > 0.0)) return argmax(x, vocab);
    Scratch& s = scratch();
    const double T = sp.temperature;
    int n;
    bool have_ids = false;
    if (sp.top_k > 0 && sp.top_k < vocab) {
        top_k(x, vocab, sp.top_k, s.ids);
        n = (int)s.ids.size();
        if (n == 0) return argmax(x, vocab);  // every entry NaN
        have_ids = true;
        s.p.resize(n);
        double m = -std::numeric_limits<double>::infinity();
        for (int i = 0; i < n; i++) s.p[i] = static_cast<double>(x[s.ids[i]]) / T, m = std::max(m, s.p[i]);
        for (int i = 0; i < n; i++) s.p[i] = std::exp(s.p[i] - m);
        scale(s.p.data(), n, sum_of(s.p.data(), n));
    } else {
        n = vocab;
        s.p.resize(n);
        const double m = static_cast<double>(max_of(x, n)) / T;
        exp_scaled(x, n, T, m, s.p.data());
        if (sp.top_p < 1.0) scale(s.p.data(), n, sum_of(s.p.data(), n));  // the draw and min-p
                                                                          // need no normalising
    }
    if (sp.top_p < 1.0) {
        n = nucleus(s, n, have_ids, sp.top_p);
        have_ids = true;
    }
    if (sp.min_p > 0.0) {
        n = min_p_filter(s, n, have_ids, sp.min_p);
        have_ids = true;
    }
    if (n <= 0) return argmax(x, vocab);
    const int i = draw(s.p.data(), n, sp.u);
    const int32_t token = have_ids ? s.ids[i] : i;
    if (token < 0 || token >= vocab || !(s.p[i] > 0.0)) return argmax(x, vocab);  // NaN logits
    return token;
}

void sample_rows(const float* logits, int rows, int vocab, const SampleParams* params, int32_t* out) {
    auto one = [&](int r, int) { out[r] = sample_row(logits + (size_t)r * vocab, vocab, params[r]); };
    if (rows > 1 && (int64_t)rows * vocab >= (int64_t{1} << 17)) {
        parallel_for(rows, one);
    } else {
        for (int r = 0; r < rows; r++) one(r, 0);
    }
}

}  // namespace ts
