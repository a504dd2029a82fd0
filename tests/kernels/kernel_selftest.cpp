// kernel_selftest.cpp — stand-alone check of every available ISA's kernel table against the
// scalar reference and against plain fp32, at odd sizes so every tail loop runs; gemm must be
// bit-identical to vec_dot; the x16 packed kernels (gemm_x16, every packable type) close to the
// scalar reference and to fp32, exact at the ends of the quant ranges, and bit-identical across
// batchings; activation quantization (Q8_0, Q8_1, Q8_K, F16) bit-identical to the reference. Built with -DTINYSERVE_KERNEL_SELFTEST=ON (used for NEON under
// qemu-user: tools/neon_qemu.sh). Prints one line per failure and a summary line
// "N passed, M failed"; exits non-zero on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernels.h"
#include "quant.h"

using namespace ts;

namespace {

// Named tolerances (see tests/kernels/test_kernels.py for the reasoning).
constexpr double kRelAcc = 2e-6;       // summation-order differences, relative to sum|w*x|
constexpr double kActQuantErr = 0.57;  // int8 activation error per element, in block steps

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
    if (ok) {
        ++g_passed;
    } else {
        ++g_failed;
        std::printf("FAIL %s\n", what.c_str());
    }
}

struct Rng {  // xorshift64*, deterministic
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint64_t next() {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        return s * 2685821657736338717ull;
    }
    float uniform() { return static_cast<float>((next() >> 40) * (1.0 / (1ull << 24))); }
    float normal() {  // sum of uniforms: good enough for synthetic data
        float t = 0;
        for (int i = 0; i < 4; ++i) t += uniform();
        return (t - 2.0f) * 1.7320508f;
    }
};

std::vector<float> random_rows(int rows, int n, uint64_t seed, bool outliers) {
    Rng rng(seed);
    std::vector<float> x(static_cast<size_t>(rows) * n);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < n; ++j) {
            float v = rng.normal();
            if (outliers && j % 13 == 0) v *= 10.0f;
            x[static_cast<size_t>(r) * n + j] = v;
        }
    return x;
}

std::vector<uint8_t> quantize_rows(DType t, const std::vector<float>& x, int rows, int n,
                                   quantize_row_fn fn = nullptr) {
    const size_t rb = row_bytes(t, n);
    std::vector<uint8_t> q(rows * rb + 64);
    for (int r = 0; r < rows; ++r) {
        if (fn)
            fn(&x[static_cast<size_t>(r) * n], &q[r * rb], n);
        else
            quantize_row_ref(t, &x[static_cast<size_t>(r) * n], &q[r * rb], n);
    }
    return q;
}

std::vector<float> dequantize_rows(DType t, const std::vector<uint8_t>& q, int rows, int n) {
    const size_t rb = row_bytes(t, n);
    std::vector<float> x(static_cast<size_t>(rows) * n);
    for (int r = 0; r < rows; ++r) dequantize_row_ref(t, &q[r * rb], &x[static_cast<size_t>(r) * n], n);
    return x;
}

// y[c][r] through a table: activations quantized by the table's own from_float.
std::vector<float> matmul(const IsaTable& tab, DType t, const std::vector<uint8_t>& w, int rows,
                          const std::vector<float>& x, int m, int n, bool use_gemm) {
    const TypeKernels& k = *tab.types[static_cast<int>(t)];
    const TypeKernels& ak = *tab.types[static_cast<int>(k.vec_dot_type)];
    const std::vector<uint8_t> aq = quantize_rows(k.vec_dot_type, x, m, n, ak.from_float);
    const size_t wrb = row_bytes(t, n), arb = row_bytes(k.vec_dot_type, n);
    std::vector<float> y(static_cast<size_t>(m) * rows);
    if (use_gemm) {
        k.gemm(n, rows, m, w.data(), wrb, aq.data(), arb, y.data(), rows);
    } else {
        for (int c = 0; c < m; ++c)
            for (int r = 0; r < rows; ++r) k.vec_dot(n, &y[c * rows + r], &w[r * wrb], &aq[c * arb]);
    }
    return y;
}

// (GCC 12 for aarch64 hits an internal compiler error vectorizing these reference loops.)
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
void test_matmul(const IsaTable& tab, DType t, int n, int rows, int m, uint64_t seed) {
    const IsaTable& ref = *isa_table_scalar();
    const char* tn = dtype_info(t).name;
    const std::string tag = std::string(isa_name(tab.isa)) + " " + tn + " n=" + std::to_string(n) +
                            " rows=" + std::to_string(rows) + " m=" + std::to_string(m);
    const std::vector<float> wf = random_rows(rows, n, seed, false);
    const std::vector<uint8_t> w = quantize_rows(t, wf, rows, n);
    const std::vector<float> wd = dequantize_rows(t, w, rows, n);
    const std::vector<float> x = random_rows(m, n, seed + 7, true);

    const std::vector<float> y = matmul(tab, t, w, rows, x, m, n, true);
    const std::vector<float> yv = matmul(tab, t, w, rows, x, m, n, false);
    const std::vector<float> yr = matmul(ref, t, w, rows, x, m, n, false);
    const bool quant = dtype_info(t).block_size == 32;
    std::vector<double> step(static_cast<size_t>(m) * (n / 32 + 1), 0.0);  // int8 step per act block
    if (quant)
        for (int c = 0; c < m; ++c)
            for (int b = 0; b < n / 32; ++b) {
                double amax = 0;
                for (int i = 32 * b; i < 32 * b + 32; ++i)
                    amax = std::fmax(amax, std::fabs(x[static_cast<size_t>(c) * n + i]));
                step[static_cast<size_t>(c) * (n / 32 + 1) + b] = amax / 127.0;
            }
    bool same = true, near_ref = true, near_f32 = true;
    double worst_ref = 0, worst_f32 = 0;
    for (int c = 0; c < m; ++c)
        for (int r = 0; r < rows; ++r) {
            const size_t o = static_cast<size_t>(c) * rows + r;
            if (std::memcmp(&y[o], &yv[o], sizeof(float)) != 0) same = false;
            double exact = 0, mag = 0, qerr = 0;
            for (int j = 0; j < n; ++j) {
                const double a = wd[static_cast<size_t>(r) * n + j], b = x[static_cast<size_t>(c) * n + j];
                exact += a * b;
                mag += std::fabs(a * b);
                if (quant) qerr += std::fabs(a) * kActQuantErr * step[static_cast<size_t>(c) * (n / 32 + 1) + j / 32];
            }
            // the activation quantization error also scales the reference magnitude a little
            const double tol_ref = kRelAcc * (mag + qerr) + 1e-30;
            const double e_ref = std::fabs(static_cast<double>(y[o]) - yr[o]);
            const double e_f32 = std::fabs(static_cast<double>(y[o]) - exact);
            worst_ref = std::fmax(worst_ref, e_ref);
            worst_f32 = std::fmax(worst_f32, e_f32);
            if (!(e_ref <= tol_ref)) near_ref = false;
            if (!(e_f32 <= kRelAcc * mag + qerr + 1e-30)) near_f32 = false;
        }
    check(same, tag + ": gemm != vec_dot");
    check(near_ref, tag + ": vs scalar, worst " + std::to_string(worst_ref));
    check(near_f32, tag + ": vs fp32, worst " + std::to_string(worst_f32));
}

// ---- weights in every packable type, as raw blocks -----------------------------------------------

// Where a type's block keeps its fields (byte offsets), for random and extreme blocks.
struct BlockFields {
    std::vector<int> f16;                     // fp16 scales (d; m or dmin)
    std::vector<std::pair<int, int>> quants;  // [begin, end): quant bits, incl. high-bit fields
    std::vector<std::pair<int, int>> scales;  // [begin, end): sub-block scales (K-quants, IQ4_XS)
    uint8_t qmax, qmin;                       // a quant byte at the top / bottom of its range
    bool split_min;                           // d * q + m or d * sc * q - dmin * m: the two parts are separate terms
};

BlockFields block_fields(DType t) {
    switch (t) {
        case DType::Q4_0:
            return {{0}, {{2, 18}}, {}, 0xff, 0x00, false};
        case DType::Q4_1:
            return {{0, 2}, {{4, 20}}, {}, 0xff, 0x00, true};
        case DType::Q8_0:
            return {{0}, {{2, 34}}, {}, 0x7f, 0x80, false};
        case DType::Q5_0:
            return {{0}, {{2, 22}}, {}, 0xff, 0x00, false};
        case DType::Q5_1:
            return {{0, 2}, {{4, 24}}, {}, 0xff, 0x00, true};
        case DType::IQ4_NL:
            return {{0}, {{2, 18}}, {}, 0xff, 0x00, false};  // 0xf -> 113, 0x0 -> -127
        case DType::Q4_K:
            return {{0, 2}, {{16, 144}}, {{4, 16}}, 0xff, 0x00, true};
        case DType::Q5_K:
            return {{0, 2}, {{16, 176}}, {{4, 16}}, 0xff, 0x00, true};
        case DType::Q6_K:
            return {{208}, {{0, 192}}, {{192, 208}}, 0xff, 0x00, false};
        case DType::IQ4_XS:
            return {{0}, {{8, 136}}, {{2, 8}}, 0xff, 0x00, false};
        default:
            return {};
    }
}

// rows x n weights of random bytes (every quant, high bit, scale and min) with finite fp16 scales
// of realistic size (positive for the 256-element types, as real files have). qfill / sfill >= 0
// set every quant / sub-block scale byte to that value.
std::vector<uint8_t> random_blocks(DType t, int rows, int n, uint64_t seed, int qfill = -1, int sfill = -1) {
    const DTypeInfo& info = dtype_info(t);
    const BlockFields f = block_fields(t);
    const size_t nb = static_cast<size_t>(rows) * (n / info.block_size), bs = info.block_bytes;
    std::vector<uint8_t> w(nb * bs + 64);
    Rng rng(seed);
    for (size_t i = 0; i < nb * bs; ++i) w[i] = static_cast<uint8_t>(rng.next() >> 56);
    for (size_t i = 0; i < nb; ++i) {
        uint8_t* blk = &w[i * bs];
        if (qfill >= 0)
            for (auto [b, e] : f.quants) std::memset(blk + b, qfill, e - b);
        if (sfill >= 0)
            for (auto [b, e] : f.scales) std::memset(blk + b, sfill, e - b);
        for (int o : f.f16) {
            float d = rng.normal() * 0.02f;
            if (info.block_size == QK_K) d = std::fabs(d);
            const f16_t h = fp32_to_fp16(d);
            std::memcpy(blk + o, &h, 2);
        }
    }
    return w;
}

// |terms| of each dequantized weight: |w| itself, or |d part| + |min part| where the kernels add
// the two parts separately (they may cancel in w).
std::vector<float> term_mags(DType t, const std::vector<uint8_t>& w, int rows, int n) {
    std::vector<float> mags = dequantize_rows(t, w, rows, n);
    for (float& v : mags) v = std::fabs(v);
    const BlockFields f = block_fields(t);
    if (!f.split_min) return mags;
    mags.assign(mags.size(), 0.0f);
    const DTypeInfo& info = dtype_info(t);
    const size_t nb = static_cast<size_t>(rows) * (n / info.block_size);
    for (int zero : {f.f16[0], f.f16[1]}) {
        std::vector<uint8_t> part(w);
        for (size_t i = 0; i < nb; ++i) std::memset(&part[i * info.block_bytes + zero], 0, 2);
        const std::vector<float> y = dequantize_rows(t, part, rows, n);
        for (size_t i = 0; i < mags.size(); ++i) mags[i] += std::fabs(y[i]);
    }
    return mags;
}

std::vector<uint8_t> pack_rows(DType t, const std::vector<uint8_t>& w, int rows, int n) {
    const size_t gb = kPackRows * row_bytes(t, n);
    std::vector<uint8_t> p(rows * row_bytes(t, n));
    for (int g = 0; g < rows / kPackRows; ++g) pack_x16(t, &w[g * gb], row_bytes(t, n), n, &p[g * gb]);
    return p;
}

// The x16 packed layout: pack_x16/unpack_x16_row round-trip; gemm_x16 close to the scalar
// reference on the unpacked weights (same quantized activations: only the float order may differ)
// and to the fp32 product of the dequantized weights and the unquantized activations; each result
// bit-identical whether the activation rows go all at once, one at a time, or in chunks, and
// whether the 16-row groups go together or alone. Weights: quantized random floats where the
// reference can quantize the type, else (or with random_bytes) random blocks.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
void test_x16(const IsaTable& tab, DType t, int rows, int nb, uint64_t seed, bool random_bytes) {
    const TypeKernels& k = *tab.types[static_cast<int>(t)];
    const TypeKernels& rk = *isa_table_scalar()->types[static_cast<int>(t)];
    const TypeKernels& ak = *tab.types[static_cast<int>(k.vec_dot_type)];
    const int n = x16_shape(t).block * nb;
    const int ab = dtype_info(k.vec_dot_type).block_size;  // activation block: 32 or 256
    const std::string tag = std::string(isa_name(tab.isa)) + " x16 " + dtype_info(t).name + " n=" + std::to_string(n) +
                            " rows=" + std::to_string(rows) + (random_bytes ? " random blocks" : "");
    const size_t rb = row_bytes(t, n), gb = kPackRows * rb, arb = row_bytes(k.vec_dot_type, n);
    const std::vector<uint8_t> w =
        random_bytes ? random_blocks(t, rows, n, seed) : quantize_rows(t, random_rows(rows, n, seed, false), rows, n);
    const std::vector<float> wd = dequantize_rows(t, w, rows, n);
    const std::vector<float> terms = term_mags(t, w, rows, n);
    const std::vector<uint8_t> p = pack_rows(t, w, rows, n);
    bool round_trip = true;
    std::vector<uint8_t> row(rb);
    for (int r = 0; r < rows; ++r) {
        unpack_x16_row(t, &p[(r / kPackRows) * gb], n, r % kPackRows, row.data());
        round_trip &= std::memcmp(row.data(), &w[r * rb], rb) == 0;
    }
    check(round_trip, tag + ": unpack_x16_row(pack_x16(w)) != w");
    check(std::memcmp(p.data(), w.data(), rows * rb) != 0, tag + ": pack_x16 left the layout unchanged");

    const float kSentinel = -12345.5f;
    for (int m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17}) {
        const std::string mtag = tag + " m=" + std::to_string(m);
        const std::vector<float> x = random_rows(m, n, seed + 100 + m, true);
        const std::vector<uint8_t> aq = quantize_rows(k.vec_dot_type, x, m, n, ak.from_float);
        const std::vector<float> xq = dequantize_rows(k.vec_dot_type, aq, m, n);
        // ldo wider than rows: the padding must stay untouched.
        const size_t ldo = rows + 3;
        auto fresh = [&] { return std::vector<float>(m * ldo, kSentinel); };
        std::vector<float> y_all = fresh(), y_one = fresh(), y_chunk = fresh(), y_grp = fresh();
        k.gemm_x16(n, rows, m, p.data(), gb, aq.data(), arb, y_all.data(), ldo);
        for (int c = 0; c < m; ++c) k.gemm_x16(n, rows, 1, p.data(), gb, &aq[c * arb], arb, &y_one[c * ldo], ldo);
        for (int c = 0; c < m; c += 16)
            k.gemm_x16(n, rows, std::min(16, m - c), p.data(), gb, &aq[c * arb], arb, &y_chunk[c * ldo], ldo);
        for (int g = 0; g < rows / kPackRows; ++g)  // one group at a time, activation rows 3 by 3
            for (int c = 0; c < m; c += 3)
                k.gemm_x16(n, kPackRows, std::min(3, m - c), &p[g * gb], gb, &aq[c * arb], arb,
                           &y_grp[c * ldo + g * kPackRows], ldo);
        bool pad_ok = true;
        for (int c = 0; c < m; ++c)
            for (size_t r = rows; r < ldo; ++r)
                pad_ok &= y_all[c * ldo + r] == kSentinel && y_one[c * ldo + r] == kSentinel &&
                          y_chunk[c * ldo + r] == kSentinel && y_grp[c * ldo + r] == kSentinel;
        check(pad_ok, mtag + ": gemm_x16 wrote outside its rows");
        check(std::memcmp(y_all.data(), y_one.data(), y_all.size() * sizeof(float)) == 0,
              mtag + ": all at once != one activation row at a time");
        check(std::memcmp(y_all.data(), y_chunk.data(), y_all.size() * sizeof(float)) == 0,
              mtag + ": all at once != 16-row activation chunks");
        check(std::memcmp(y_all.data(), y_grp.data(), y_all.size() * sizeof(float)) == 0,
              mtag + ": all at once != one 16-row group at a time");

        std::vector<float> yr(static_cast<size_t>(m) * rows), yg(static_cast<size_t>(m) * rows);
        for (int c = 0; c < m; ++c)
            for (int r = 0; r < rows; ++r) rk.vec_dot(n, &yr[c * rows + r], &w[r * rb], &aq[c * arb]);
        if (rk.gemm)
            rk.gemm(n, rows, m, w.data(), rb, aq.data(), arb, yg.data(), rows);
        else
            yg = yr;
        bool near_ref = true, near_f32 = true;
        double worst_ref = 0, worst_f32 = 0;
        for (int c = 0; c < m; ++c) {
            const float* xc = &x[static_cast<size_t>(c) * n];
            const float* xqc = &xq[static_cast<size_t>(c) * n];
            std::vector<double> step(n / ab, 0.0);  // int8 step of each activation block
            for (int j = 0; j < n; ++j) step[j / ab] = std::fmax(step[j / ab], std::fabs(xc[j]) / 127.0);
            for (int r = 0; r < rows; ++r) {
                const float* wr = &wd[static_cast<size_t>(r) * n];
                const float* tr = &terms[static_cast<size_t>(r) * n];
                double exact = 0, mag_q = 0, mag = 0, qerr = 0;
                for (int j = 0; j < n; ++j) {
                    exact += static_cast<double>(wr[j]) * xc[j];
                    mag_q += static_cast<double>(tr[j]) * std::fabs(xqc[j]);
                    mag += static_cast<double>(tr[j]) * std::fabs(xc[j]);
                    qerr += std::fabs(static_cast<double>(wr[j])) * kActQuantErr * step[j / ab];
                }
                const double tol = kRelAcc * mag_q + 1e-30;
                const double y = y_all[c * ldo + r];
                const double e = std::fmax(std::fabs(y - yr[c * rows + r]), std::fabs(y - yg[c * rows + r]));
                const double ef = std::fabs(y - exact);
                worst_ref = std::fmax(worst_ref, e);
                worst_f32 = std::fmax(worst_f32, ef);
                if (!(e <= tol)) near_ref = false;
                if (!(ef <= tol + kRelAcc * mag + qerr)) near_f32 = false;
            }
        }
        check(near_ref, mtag + ": gemm_x16 vs scalar, worst " + std::to_string(worst_ref));
        check(near_f32, mtag + ": gemm_x16 vs fp32, worst " + std::to_string(worst_f32));
    }
}

// The largest integer sums a packed kernel can see: every quant at the top (or bottom) of its
// range, sub-block scales random or at 0x00 / 0xff / 0x80, against activations that quantize to
// +-127. Exact integer sums leave only float-order differences from the scalar reference.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
void test_x16_extremes(const IsaTable& tab, DType t, uint64_t seed) {
    const TypeKernels& k = *tab.types[static_cast<int>(t)];
    const TypeKernels& rk = *isa_table_scalar()->types[static_cast<int>(t)];
    const TypeKernels& ak = *tab.types[static_cast<int>(k.vec_dot_type)];
    const BlockFields f = block_fields(t);
    const int rows = 32, n = x16_shape(t).block == QK_K ? 2 * QK_K : 7 * 32, m = 5;
    const size_t rb = row_bytes(t, n), arb = row_bytes(k.vec_dot_type, n);
    std::vector<float> x(static_cast<size_t>(m) * n);
    Rng rng(seed);
    for (int j = 0; j < n; ++j) {
        x[j] = 1.0f;       // all +127 (Q8_K: all -127)
        x[n + j] = -1.0f;  // all -127
        x[2 * n + j] = (rng.next() >> 63) ? 1.0f : -1.0f;
        x[3 * n + j] = j % 256 == 0 ? -1.0f : 1.0f;  // Q8_K: the first sets the sign, the rest +127
        x[4 * n + j] = j % 2 ? 1.0f : -1.0f;
    }
    const std::vector<uint8_t> aq = quantize_rows(k.vec_dot_type, x, m, n, ak.from_float);
    const std::vector<float> xq = dequantize_rows(k.vec_dot_type, aq, m, n);
    std::vector<int> sfills = {-1};
    if (!f.scales.empty()) sfills = {-1, 0x00, 0xff, 0x80};
    for (int qfill : {static_cast<int>(f.qmax), static_cast<int>(f.qmin)})
        for (int sfill : sfills) {
            char fills[64];
            if (sfill < 0)
                std::snprintf(fills, sizeof fills, "quants=0x%02x scales=random", qfill);
            else
                std::snprintf(fills, sizeof fills, "quants=0x%02x scales=0x%02x", qfill, sfill);
            const std::string tag =
                std::string(isa_name(tab.isa)) + " x16 extremes " + dtype_info(t).name + " " + fills;
            const std::vector<uint8_t> w = random_blocks(t, rows, n, seed + qfill + 7 * sfill, qfill, sfill);
            const std::vector<float> terms = term_mags(t, w, rows, n);
            const std::vector<uint8_t> p = pack_rows(t, w, rows, n);
            std::vector<float> y(static_cast<size_t>(m) * rows), y1(y.size());
            k.gemm_x16(n, rows, m, p.data(), kPackRows * rb, aq.data(), arb, y.data(), rows);
            for (int c = 0; c < m; ++c)
                k.gemm_x16(n, rows, 1, p.data(), kPackRows * rb, &aq[c * arb], arb, &y1[c * rows], rows);
            bool ok = true;
            double worst = 0;
            for (int c = 0; c < m; ++c)
                for (int r = 0; r < rows; ++r) {
                    float yr;
                    rk.vec_dot(n, &yr, &w[r * rb], &aq[c * arb]);
                    double mag = 0;
                    for (int j = 0; j < n; ++j)
                        mag += static_cast<double>(terms[static_cast<size_t>(r) * n + j]) *
                               std::fabs(xq[static_cast<size_t>(c) * n + j]);
                    const double e = std::fabs(static_cast<double>(y[c * rows + r]) - yr);
                    worst = std::fmax(worst, e);
                    ok &= e <= kRelAcc * mag + 1e-30;
                }
            check(ok, tag + ": vs scalar, worst " + std::to_string(worst));
            check(y == y1, tag + ": batched != one activation row at a time");
        }
}

void test_from_float(const IsaTable& tab, DType t, int n) {
    std::vector<float> x = random_rows(5, n, 99 + n, true);
    if (t == DType::Q8_K) {  // rows that pin Q8_K's choices down (n is a multiple of 256)
        std::vector<float> more = random_rows(6, n, 199 + n, false);
        for (int j = 0; j < n; ++j) {
            more[j] = 0.0f;                                                                    // all zero: a zero block
            more[n + j] = j % 256 == 0 ? -127.0f : static_cast<float>(j % 61 - 30) + 0.5f;     // iscale 1: ties to even
            more[2 * n + j] = j % 256 == 0 ? 127.0f : static_cast<float>(j % 53 - 26) - 0.5f;  // iscale -1
            more[3 * n + j] *= 1e-20f;                                                         // tiny values
        }
        for (int b = 0; b < n / 256; ++b) {  // the largest magnitude twice, with both signs
            more[4 * n + 256 * b + 5] = -9.0f;
            more[4 * n + 256 * b + 200] = 9.0f;
            more[5 * n + 256 * b + 17] = 9.0f;
            more[5 * n + 256 * b + 18] = -9.0f;
        }
        x.insert(x.end(), more.begin(), more.end());
    }
    const int rows = static_cast<int>(x.size() / n);
    const TypeKernels& k = *tab.types[static_cast<int>(t)];
    const std::vector<uint8_t> a = quantize_rows(t, x, rows, n, k.from_float);
    const std::vector<uint8_t> b = quantize_rows(t, x, rows, n);
    check(a == b, std::string(isa_name(tab.isa)) + " from_float " + dtype_info(t).name + " n=" + std::to_string(n) +
                      " differs from the reference");
}

void test_ops(const IsaTable& tab) {
    const OpsKernels& o = tab.ops;
    const OpsKernels& r = isa_table_scalar()->ops;
    const std::string isa = isa_name(tab.isa);
    for (int n : {1, 7, 16, 33, 64, 65, 577}) {
        const std::vector<float> x = random_rows(1, n, 5 + n, false), y = random_rows(1, n, 6 + n, false);
        std::vector<f16_t> h(n);
        for (int i = 0; i < n; ++i) h[i] = fp32_to_fp16(x[i] * 2.0f);
        double mag = 0;
        for (int i = 0; i < n; ++i) mag += std::fabs(fp16_to_fp32(h[i]) * y[i]);
        const std::string tag = isa + " n=" + std::to_string(n);
        check(std::fabs(o.dot_f16_f32(n, h.data(), y.data()) - r.dot_f16_f32(n, h.data(), y.data())) <=
                  kRelAcc * mag + 1e-30,
              tag + " dot_f16_f32");
        double mag2 = 0;
        for (int i = 0; i < n; ++i) mag2 += std::fabs(x[i] * y[i]);
        check(std::fabs(o.dot_f32(n, x.data(), y.data()) - r.dot_f32(n, x.data(), y.data())) <= kRelAcc * mag2 + 1e-30,
              tag + " dot_f32");
        std::vector<uint16_t> h1(n), h2(n);
        o.f32_to_f16(x.data(), h1.data(), n);
        for (int i = 0; i < n; ++i) h2[i] = fp32_to_fp16(x[i]);
        check(h1 == h2, tag + " f32_to_f16");
        std::vector<float> a1(y), a2(y);
        o.axpy_f16(n, 0.37f, h.data(), a1.data());
        r.axpy_f16(n, 0.37f, h.data(), a2.data());
        bool ok = true;
        for (int i = 0; i < n; ++i) ok &= std::fabs(a1[i] - a2[i]) <= 1e-6f + 1e-6f * std::fabs(a2[i]);
        check(ok, tag + " axpy_f16");
        std::vector<float> n1(n), n2(n);
        o.rmsnorm(n, x.data(), y.data(), 1e-5f, n1.data());
        r.rmsnorm(n, x.data(), y.data(), 1e-5f, n2.data());
        ok = true;
        for (int i = 0; i < n; ++i) ok &= std::fabs(n1[i] - n2[i]) <= 1e-5f * (1.0f + std::fabs(n2[i]));
        check(ok, tag + " rmsnorm");
        std::vector<float> g(x);
        for (int i = 0; i < n; ++i) g[i] *= 6.0f;
        if (n >= 3) {
            g[0] = -100.0f;
            g[1] = 100.0f;
            g[2] = 0.0f;
        }
        o.swiglu(n, g.data(), y.data(), n1.data());
        r.swiglu(n, g.data(), y.data(), n2.data());
        ok = true;
        for (int i = 0; i < n; ++i) ok &= std::fabs(n1[i] - n2[i]) <= 1e-5f * (1.0f + std::fabs(n2[i]));
        check(ok, tag + " swiglu");
    }
}

// Attention kernels vs the scalar table: close to it, and bitwise split/nq consistent.
void test_attn(const IsaTable& tab) {
    const OpsKernels& o = tab.ops;
    const OpsKernels& r = isa_table_scalar()->ops;
    const std::string isa = isa_name(tab.isa);
    for (int hd : {64, 32, 13}) {
        for (int nq : {1, 3, 4}) {
            const int n = 19, ks = hd * 3 + 1;
            const std::vector<float> q = random_rows(nq, hd, 70 + hd + nq, false);
            const std::vector<float> kf = random_rows(n, ks, 80 + hd, false);
            std::vector<f16_t> kv(kf.size());
            for (size_t i = 0; i < kf.size(); ++i) kv[i] = fp32_to_fp16(kf[i]);
            const std::string tag = isa + " hd=" + std::to_string(hd) + " nq=" + std::to_string(nq);
            std::vector<float> s1(nq * n), s2(nq * n), s3(nq * n);
            o.attn_scores_f16(hd, nq, q.data(), kv.data(), ks, n, 0.125f, s1.data(), n);
            r.attn_scores_f16(hd, nq, q.data(), kv.data(), ks, n, 0.125f, s2.data(), n);
            bool ok = true, same = true;
            for (int h = 0; h < nq; ++h)
                for (int j = 0; j < n; ++j) {
                    double mag = 0;
                    for (int i = 0; i < hd; ++i) mag += std::fabs(fp16_to_fp32(kv[j * ks + i]) * q[h * hd + i]);
                    ok &= std::fabs(s1[h * n + j] - s2[h * n + j]) <= 0.125 * (kRelAcc * mag) + 1e-30;
                }
            for (int h = 0; h < nq; ++h)  // one head, positions 5..n-1: same bits
                o.attn_scores_f16(hd, 1, q.data() + h * hd, kv.data() + 5 * ks, ks, n - 5, 0.125f,
                                  s3.data() + h * n + 5, n);
            for (int h = 0; h < nq; ++h)
                for (int j = 5; j < n; ++j) same &= s3[h * n + j] == s1[h * n + j];
            check(ok, tag + " attn_scores_f16");
            check(same, tag + " attn_scores_f16 independent of n/nq");
            std::vector<float> a1(nq * hd, 0.5f), a2(nq * hd, 0.5f), a3(nq * hd, 0.5f);
            for (float& x : s1) x = std::fabs(x);
            o.attn_accum_f16(hd, nq, s1.data(), n, kv.data(), ks, n, a1.data());
            r.attn_accum_f16(hd, nq, s1.data(), n, kv.data(), ks, n, a2.data());
            o.attn_accum_f16(hd, nq, s1.data(), n, kv.data(), ks, 7, a3.data());  // split 7 + 12
            o.attn_accum_f16(hd, nq, s1.data() + 7, n, kv.data() + 7 * ks, ks, n - 7, a3.data());
            ok = true;
            for (int i = 0; i < nq * hd; ++i) ok &= std::fabs(a1[i] - a2[i]) <= 1e-5f * (1.0f + std::fabs(a2[i]));
            check(ok, tag + " attn_accum_f16");
            check(a1 == a3, tag + " attn_accum_f16 split");
        }
    }
    for (int n : {1, 5, 17, 130}) {
        std::vector<float> x = random_rows(1, n, 90 + n, false), y;
        for (float& v : x) v *= 8.0f;
        y = x;
        (o.softmax ? o.softmax : r.softmax)(n, x.data());
        r.softmax(n, y.data());
        bool ok = true;
        for (int i = 0; i < n; ++i) ok &= std::fabs(x[i] - y[i]) <= 1e-5f * y[i] + 1e-30f;
        check(ok, isa + " softmax n=" + std::to_string(n));
    }
}

// int8 KV cache attention vs the scalar table: the same bits (the contract), for every range of
// positions, head group and split; the scalar one close to a double product of the stored values.
void test_attn_q8(const IsaTable& tab) {
    const OpsKernels& o = tab.ops;
    const OpsKernels& r = isa_table_scalar()->ops;
    const std::string isa = isa_name(tab.isa);
    const int shapes[][2] = {{64, 16}, {64, 32}, {256, 16}, {96, 16}, {16, 4}, {48, 7}, {13, 5}, {5, 17}};
    for (const auto& sh : shapes) {
        const int hd = sh[0], bs = sh[1];
        const KV8Layout L{hd, bs};
        std::vector<float> x = random_rows(bs, hd, 200 + hd + bs, true);
        std::vector<uint8_t> k(L.k_run_bytes(), 0), v(L.v_run_bytes(), 0);
        for (int j = 0; j < bs; ++j) {
            kv8_store(L, 0, j, &x[(size_t)j * hd], k.data());
            kv8_store(L, 1, j, &x[(size_t)j * hd], v.data());
        }
        bool stored = true;  // a stored value is within 0.57 steps of x (step = max|group| / 127)
        for (int j = 0; j < bs; ++j)
            for (int i = 0; i < hd; ++i) {
                float amax = 0.0f;
                for (int t = i / 32 * 32; t < std::min(hd, i / 32 * 32 + 32); ++t)
                    amax = std::max(amax, std::fabs(x[(size_t)j * hd + t]));
                const float e = kActQuantErr * amax / 127.0f + 1e-30f;
                stored &= std::fabs(kv8_load(L, 0, j, i, k.data()) - x[(size_t)j * hd + i]) <= e;
                stored &= kv8_load(L, 1, j, i, v.data()) == kv8_load(L, 0, j, i, k.data());
            }
        check(stored, isa + " kv8 store hd=" + std::to_string(hd));
        // this ISA's quantizers write the reference's bytes: random rows, then ties, +-0, NaN, inf,
        // a subnormal group and values whose scale overflows fp16 (each pattern in every group)
        std::vector<float> sp = x;
        const float tiny = 1e-40f, nan = std::numeric_limits<float>::quiet_NaN(), inf = INFINITY;
        const std::vector<std::vector<float>> pats = {
            {127.0f, 0.5f, -0.5f, 1.5f, -1.5f, 2.5f, -2.5f, 126.5f, -126.5f, -0.0f},
            {127.0f, std::nextafter(0.5f, 0.0f), std::nextafter(0.5f, 1.0f), 126.49999f, -127.0f},
            {nan, 1.0f, -3.0f, 2.5f},
            {inf, 1.0f, -2.0f},
            {-inf, nan, 4.0f},
            {tiny, -tiny, tiny / 3},
            {3e38f, -1e38f, 1.0f},
            {0.0f}};
        for (int j = 0; j < bs; ++j) {
            const std::vector<float>& pat = pats[j % pats.size()];
            if (j % 2 == 0) continue;  // half the rows stay random
            for (int i = 0; i < hd; ++i)
                sp[(size_t)j * hd + i] = i % 32 < (int)pat.size() ? pat[i % 32] : (pat.size() > 1 ? 0.25f : 0.0f);
        }
        for (const std::vector<float>* rows : {&x, &sp}) {
            std::vector<uint8_t> k1(L.k_run_bytes(), 0), k2(L.k_run_bytes(), 0), v1(L.v_run_bytes(), 0),
                v2(L.v_run_bytes(), 0), q1(bs * L.query_bytes()), q2(bs * L.query_bytes());
            for (int j = 0; j < bs; ++j) {
                const float* xj = &(*rows)[(size_t)j * hd];
                o.kv8_store(L, 0, j, xj, k1.data());
                r.kv8_store(L, 0, j, xj, k2.data());
                o.kv8_store(L, 1, j, xj, v1.data());
                r.kv8_store(L, 1, j, xj, v2.data());
                o.kv8_quantize_query(L, xj, q1.data() + j * L.query_bytes());
                r.kv8_quantize_query(L, xj, q2.data() + j * L.query_bytes());
            }
            const std::string what = rows == &x ? " random" : " special values";
            check(k1 == k2 && v1 == v2, isa + " kv8_store == scalar" + what + " hd=" + std::to_string(hd));
            check(q1 == q2, isa + " kv8_quantize_query == scalar" + what + " hd=" + std::to_string(hd));
        }
        for (int nq : {1, 2, 3, 4, 5, 7}) {
            const std::string tag =
                isa + " q8 hd=" + std::to_string(hd) + " bs=" + std::to_string(bs) + " nq=" + std::to_string(nq);
            const std::vector<float> qf = random_rows(nq, hd, 300 + hd + nq, false);
            std::vector<uint8_t> q(nq * L.query_bytes());
            for (int h = 0; h < nq; ++h) kv8_quantize_query(L, &qf[(size_t)h * hd], q.data() + h * L.query_bytes());
            std::vector<float> s1(nq * bs, 0.0f), s2(nq * bs, 0.0f), s3(nq * bs, 0.0f);
            o.attn_scores_q8(L, nq, q.data(), k.data(), 0, bs, 0.125f, s1.data(), bs);
            r.attn_scores_q8(L, nq, q.data(), k.data(), 0, bs, 0.125f, s2.data(), bs);
            for (int j0 = 0; j0 < bs; j0 += 3) {  // ranges at every offset, one head at a time
                const int n = std::min(bs - j0, 5);
                for (int h = 0; h < nq; ++h)
                    o.attn_scores_q8(L, 1, q.data() + h * L.query_bytes(), k.data(), j0, n, 0.125f,
                                     s3.data() + h * bs + j0, bs);
            }
            bool close = true;
            for (int h = 0; h < nq; ++h)
                for (int j = 0; j < bs; ++j) {
                    double exact = 0, mag = 0;
                    const uint8_t* rec = q.data() + h * L.query_bytes();
                    for (int i = 0; i < hd; ++i) {
                        float dq;
                        std::memcpy(&dq, rec + 4 * L.chunks() + 4 * (i / 32), 4);
                        const double a = (double)dq * static_cast<int8_t>(rec[i]) * kv8_load(L, 0, j, i, k.data());
                        exact += a;
                        mag += std::fabs(a);
                    }
                    close &= std::fabs(s2[h * bs + j] - 0.125 * exact) <= 0.125 * 1e-6 * mag + 1e-30;
                }
            check(s1 == s2, tag + " attn_scores_q8 == scalar");
            check(s3 == s1, tag + " attn_scores_q8 independent of range and nq");
            check(close, tag + " attn_scores_q8 vs double");
            std::vector<float> p(nq * bs);
            for (int i = 0; i < nq * bs; ++i) p[i] = std::fabs(s1[i]) * 0.1f;
            std::vector<float> a1(nq * hd, 0.5f), a2(nq * hd, 0.5f), a3(nq * hd, 0.5f);
            o.attn_accum_q8(L, nq, p.data(), bs, v.data(), 0, bs, a1.data());
            r.attn_accum_q8(L, nq, p.data(), bs, v.data(), 0, bs, a2.data());
            const int cut = bs / 3;  // split [0, cut) + [cut, bs), one head at a time
            for (int h = 0; h < nq; ++h) {
                o.attn_accum_q8(L, 1, p.data() + h * bs, bs, v.data(), 0, cut, a3.data() + h * hd);
                o.attn_accum_q8(L, 1, p.data() + h * bs + cut, bs, v.data(), cut, bs - cut, a3.data() + h * hd);
            }
            check(a1 == a2, tag + " attn_accum_q8 == scalar");
            check(a3 == a1, tag + " attn_accum_q8 split and nq");
        }
    }
}

void test_fp16() {
    int bad = 0;
    for (uint32_t i = 0; i < (1u << 16); ++i) {
        const float f = fp16_to_fp32(static_cast<f16_t>(i));
        if (std::isnan(f)) continue;
        if (fp32_to_fp16(f) != i) ++bad;  // every non-nan half round-trips exactly
        if (fp16_lut(static_cast<f16_t>(i)) != f && !(std::isnan(f))) ++bad;
    }
    check(bad == 0, "fp16 round trip");
    check(fp32_to_fp16(65520.0f) == 0x7c00 && fp32_to_fp16(65519.0f) == 0x7bff, "fp16 overflow boundary");
    check(fp32_to_fp16(5.9604644775390625e-8f) == 1 && fp32_to_fp16(2.98023223876953125e-8f) == 0,
          "fp16 subnormal ties to even");
}

}  // namespace

int main() {
    test_fp16();
    const DType types[] = {DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::F32, DType::F16, DType::BF16};
    const int qns[] = {32, 96, 224, 544, 576, 1568};
    const int fns[] = {1, 7, 33, 100, 577};
    const int rows_list[] = {1, 3, 7, 33};
    const int ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 17};
    int isas = 0, x16_tables = 0;
    for (Isa isa : {Isa::Scalar, Isa::AVX2, Isa::AVX512, Isa::NEON}) {
        if (!isa_available(isa)) continue;
        ++isas;
        const IsaTable& tab = table_for(isa);
        for (DType t : {DType::Q8_0, DType::Q8_1, DType::F16})
            for (int n : {32, 96, 544, 1568}) test_from_float(tab, t, n);
        for (int n : {256, 768, 2560}) test_from_float(tab, DType::Q8_K, n);
        uint64_t seed = 1;
        for (DType t : types) {
            const bool quant = dtype_info(t).block_size == 32;
            const int* ns = quant ? qns : fns;
            const int nn = quant ? 6 : 5;
            for (int i = 0; i < nn; ++i)
                for (int rows : rows_list)
                    for (int m : ms) {
                        if (rows == 33 && m > 3 && ns[i] > 600) continue;  // keep qemu runs short
                        test_matmul(tab, t, ns[i], rows, m, seed++);
                    }
        }
        for (DType t : {DType::Q4_0, DType::Q4_1, DType::Q8_0, DType::Q5_0, DType::Q5_1, DType::IQ4_NL, DType::Q4_K,
                        DType::Q5_K, DType::Q6_K, DType::IQ4_XS}) {
            if (!packable(t) || !tab.types[static_cast<int>(t)] || !tab.types[static_cast<int>(t)]->gemm_x16) continue;
            ++x16_tables;
            // weights: quantized random floats (the types the reference quantizes) and/or random blocks
            const bool old = t == DType::Q4_0 || t == DType::Q4_1 || t == DType::Q8_0;
            const bool quantized = old || t == DType::Q5_0 || t == DType::Q5_1;
            const std::vector<int> nbs =
                x16_shape(t).block == QK_K ? std::vector<int>{1, 3, 5} : std::vector<int>{1, 3, 7, 17, 49};
            for (int rows : {16, 48})
                for (int nb : nbs) {
                    if (quantized) test_x16(tab, t, rows, nb, seed++, false);
                    if (!old) test_x16(tab, t, rows, nb, seed++, true);
                }
            test_x16_extremes(tab, t, seed++);
        }
        test_ops(tab);
        test_attn(tab);
        test_attn_q8(tab);
    }
    std::printf("kernel self-test: %d ISA(s) (best: %s), %d packed x16 kernel(s)\n", isas, isa_name(best_isa()),
                x16_tables);
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
