// quant.cpp — GGUF type facts, fp16/bf16 conversion, and the reference (scalar) quantize and
// dequantize rows. These follow ggml's reference rounding exactly, so the bytes we produce match
// gguf-py's `gguf.quants.quantize` (tests/kernels/test_kernels.py checks it).
#include "quant.h"

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <stdexcept>
#include <string>

// Reference rounding must not depend on whether the compiler fuses a*b+c (aarch64 always can).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace ts {

namespace {

constexpr DTypeInfo kUnknown{nullptr, 0, 0, false};

struct InfoTable {
    DTypeInfo v[kMaxDTypeId];
    constexpr InfoTable() : v{} {
        for (auto& e : v) e = kUnknown;
        // id, name, elements per block, bytes per block, computable
        v[0] = {"F32", 1, 4, true};
        v[1] = {"F16", 1, 2, true};
        v[2] = {"Q4_0", 32, 18, true};
        v[3] = {"Q4_1", 32, 20, true};
        v[6] = {"Q5_0", 32, 22, true};
        v[7] = {"Q5_1", 32, 24, true};
        v[8] = {"Q8_0", 32, 34, true};
        v[9] = {"Q8_1", 32, 36, false};  // activation type (ggml: two halves + 32 int8)
        v[10] = {"Q2_K", 256, 84, false};
        v[11] = {"Q3_K", 256, 110, false};
        v[12] = {"Q4_K", 256, 144, true};
        v[13] = {"Q5_K", 256, 176, true};
        v[14] = {"Q6_K", 256, 210, true};
        v[15] = {"Q8_K", 256, 292, false};  // activation type
        v[16] = {"IQ2_XXS", 256, 66, false};
        v[17] = {"IQ2_XS", 256, 74, false};
        v[18] = {"IQ3_XXS", 256, 98, false};
        v[19] = {"IQ1_S", 256, 50, false};
        v[20] = {"IQ4_NL", 32, 18, true};
        v[21] = {"IQ3_S", 256, 110, false};
        v[22] = {"IQ2_S", 256, 82, false};
        v[23] = {"IQ4_XS", 256, 136, true};
        v[24] = {"I8", 1, 1, false};
        v[25] = {"I16", 1, 2, false};
        v[26] = {"I32", 1, 4, false};
        v[27] = {"I64", 1, 8, false};
        v[28] = {"F64", 1, 8, false};
        v[29] = {"IQ1_M", 256, 56, false};
        v[30] = {"BF16", 1, 2, true};
        v[34] = {"TQ1_0", 256, 54, false};
        v[35] = {"TQ2_0", 256, 66, false};
        v[39] = {"MXFP4", 32, 17, false};
    }
};
constexpr InfoTable kInfo{};

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace

void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

const int8_t kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

const DTypeInfo& dtype_info(uint32_t id) {
    static const DTypeInfo unknown = kUnknown;
    return id < static_cast<uint32_t>(kMaxDTypeId) ? kInfo.v[id] : unknown;
}

size_t row_bytes(DType t, int64_t n) {
    const DTypeInfo& info = dtype_info(t);
    if (!info.name || n < 0 || n % info.block_size != 0)
        throw std::invalid_argument("row_bytes: bad row length " + std::to_string(n) + " for type " +
                                    (info.name ? info.name : "?"));
    return static_cast<size_t>(n / info.block_size) * info.block_bytes;
}

// ---- fp16 / bf16 --------------------------------------------------------------------------------

float fp16_to_fp32(f16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24 is exact in fp32
        const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
        return bits_f32(f32_bits(v) | sign);
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));  // inf / nan (payload kept)
    return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

f16_t fp32_to_fp16(float f) {
    uint32_t x = f32_bits(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u)  // nan: keep the top payload bits, force quiet
        return static_cast<f16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
    if (ax >= 0x477ff000u)  // >= 65520 rounds to inf (ties-to-even from 65504 goes up)
        return static_cast<f16_t>(sign | 0x7c00u);
    if (ax < 0x38800000u) {
        // subnormal or zero in fp16: let the FPU round (nearest even) by adding 0.5f, whose
        // ulp is exactly the fp16 subnormal step 2^-24.
        const float v = bits_f32(ax) + 0.5f;
        return static_cast<f16_t>(sign | (f32_bits(v) - 0x3f000000u));
    }
    const uint32_t odd = (ax >> 13) & 1u;
    ax += 0xc8000fffu + odd;  // rebias exponent (127 -> 15) and round to nearest even
    return static_cast<f16_t>(sign | (ax >> 13));
}

bf16_t fp32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_t>((u >> 16) | 64u);  // quiet nan
    return static_cast<bf16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

// Filled before any ordinary static initializer runs (other files' statics may convert).
float g_fp16_table[1 << 16];
namespace {
struct Fp16TableInit {
    Fp16TableInit() {
        for (uint32_t i = 0; i < (1u << 16); ++i) g_fp16_table[i] = fp16_to_fp32(static_cast<f16_t>(i));
    }
};
#if defined(__GNUC__)
__attribute__((init_priority(101)))
#endif
Fp16TableInit g_fp16_table_init;
}  // namespace

// ---- reference quantize / dequantize ------------------------------------------------------------

namespace {

// float -> int with C's truncation where the value fits an int, and INT_MIN (what x86's cvttss2si
// gives) where it does not: NaN, +-inf, huge. Activations can hold NaN or inf (a model file with
// such weights), and a plain cast of those is undefined behaviour. Finite in-range values convert
// exactly as a cast does, so every result for finite input is unchanged.
inline int trunc_int(float v) { return v > -2147483648.0f && v < 2147483648.0f ? static_cast<int>(v) : INT_MIN; }

void quantize_q8_0(const float* x, block_q8_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; ++j) y[i].qs[j] = static_cast<int8_t>(trunc_int(std::roundf(x[j] * id)));
    }
}

void quantize_q8_1(const float* x, block_q8_1* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK8_1) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_1; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK8_1; ++j) {
            const int8_t q = static_cast<int8_t>(trunc_int(std::roundf(x[j] * id)));
            y[i].qs[j] = q;
            sum += q;
        }
        y[i].d = fp32_to_fp16(d);
        y[i].s = fp32_to_fp16(static_cast<float>(sum) * d);
    }
}

void quantize_q4_0(const float* x, block_q4_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK4_0) {
        float amax = 0.0f, max = 0.0f;  // max: the signed value of largest magnitude (first one)
        for (int j = 0; j < QK4_0; ++j) {
            if (amax < std::fabs(x[j])) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            const float v0 = x[j] * id;
            const float v1 = x[QK4_0 / 2 + j] * id;
            int q0 = static_cast<int8_t>(trunc_int(v0 + 8.5f));
            int q1 = static_cast<int8_t>(trunc_int(v1 + 8.5f));
            q0 = q0 < 15 ? q0 : 15;
            q1 = q1 < 15 ? q1 : 15;
            y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
        }
    }
}

void quantize_q4_1(const float* x, block_q4_1* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK4_1) {
        float min = INFINITY, max = -INFINITY;
        for (int j = 0; j < QK4_1; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(min);
        for (int j = 0; j < QK4_1 / 2; ++j) {
            const float v0 = (x[j] - min) * id;
            const float v1 = (x[QK4_1 / 2 + j] - min) * id;
            int q0 = static_cast<int8_t>(trunc_int(v0 + 0.5f));
            int q1 = static_cast<int8_t>(trunc_int(v1 + 0.5f));
            q0 = q0 < 15 ? q0 : 15;
            q1 = q1 < 15 ? q1 : 15;
            y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
        }
    }
}

// Q5_0 / Q5_1: as Q4_0 / Q4_1 with 32 levels; the fifth bit of element j goes to bit j of qh.
void quantize_q5_0(const float* x, block_q5_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK5_0) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK5_0; ++j) {
            if (amax < std::fabs(x[j])) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        }
        const float d = max / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        uint32_t qh = 0;
        for (int j = 0; j < QK5_0 / 2; ++j) {
            int q0 = static_cast<int8_t>(trunc_int(x[j] * id + 16.5f));
            int q1 = static_cast<int8_t>(trunc_int(x[QK5_0 / 2 + j] * id + 16.5f));
            q0 = q0 < 31 ? q0 : 31;
            q1 = q1 < 31 ? q1 : 31;
            y[i].qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
            qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j;
            qh |= static_cast<uint32_t>((q1 >> 4) & 1) << (j + QK5_0 / 2);
        }
        std::memcpy(y[i].qh, &qh, 4);
    }
}

void quantize_q5_1(const float* x, block_q5_1* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK5_1) {
        float min = INFINITY, max = -INFINITY;
        for (int j = 0; j < QK5_1; ++j) {
            if (x[j] < min) min = x[j];
            if (x[j] > max) max = x[j];
        }
        const float d = (max - min) / 31.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        y[i].m = fp32_to_fp16(min);
        uint32_t qh = 0;
        for (int j = 0; j < QK5_1 / 2; ++j) {
            const int q0 = static_cast<uint8_t>(trunc_int((x[j] - min) * id + 0.5f));
            const int q1 = static_cast<uint8_t>(trunc_int((x[QK5_1 / 2 + j] - min) * id + 0.5f));
            y[i].qs[j] = static_cast<uint8_t>((q0 & 0x0f) | ((q1 & 0x0f) << 4));
            qh |= static_cast<uint32_t>((q0 >> 4) & 1) << j;
            qh |= static_cast<uint32_t>((q1 >> 4) & 1) << (j + QK5_1 / 2);
        }
        std::memcpy(y[i].qh, &qh, 4);
    }
}

// Round half to even (the FPU's default mode), as ggml's nearest_int.
inline int round_even(float v) { return trunc_int(std::nearbyint(v)); }

// Q8_K: scale by the signed value of largest magnitude so that it maps to -127 (as ggml does),
// round half to even, and keep the sums of each 16 quants.
void quantize_q8_K(const float* x, block_q8_K* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; ++j) {
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            std::memset(&y[i], 0, sizeof(block_q8_K));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; ++j) {
            const int v = round_even(iscale * x[j]);
            y[i].qs[j] = static_cast<int8_t>(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; ++j) {
            int sum = 0;
            for (int k = 0; k < 16; ++k) sum += y[i].qs[16 * j + k];
            y[i].bsums[j] = static_cast<int16_t>(sum);
        }
        y[i].d = 1.0f / iscale;
    }
}

[[noreturn]] void unsupported(const char* what, DType t) {
    const DTypeInfo& info = dtype_info(t);
    throw std::invalid_argument(std::string(what) + ": type " +
                                (info.name ? info.name : std::to_string(static_cast<uint32_t>(t))) +
                                " is not supported");
}

void check_len(const char* what, DType t, int64_t n) {
    const DTypeInfo& info = dtype_info(t);
    if (!info.name) unsupported(what, t);
    if (n < 0 || n % info.block_size != 0)
        throw std::invalid_argument(std::string(what) + ": row length " + std::to_string(n) +
                                    " is not a multiple of the " + info.name + " block size " +
                                    std::to_string(info.block_size));
}

}  // namespace

void quantize_row_ref(DType t, const float* x, void* y, int64_t n) {
    check_len("quantize_row_ref", t, n);
    switch (t) {
        case DType::F32:
            std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float));
            return;
        case DType::F16: {
            auto* o = static_cast<f16_t*>(y);
            for (int64_t i = 0; i < n; ++i) o[i] = fp32_to_fp16(x[i]);
            return;
        }
        case DType::BF16: {
            auto* o = static_cast<bf16_t*>(y);
            for (int64_t i = 0; i < n; ++i) o[i] = fp32_to_bf16(x[i]);
            return;
        }
        case DType::Q8_0:
            quantize_q8_0(x, static_cast<block_q8_0*>(y), n / QK8_0);
            return;
        case DType::Q8_1:
            quantize_q8_1(x, static_cast<block_q8_1*>(y), n / QK8_1);
            return;
        case DType::Q4_0:
            quantize_q4_0(x, static_cast<block_q4_0*>(y), n / QK4_0);
            return;
        case DType::Q4_1:
            quantize_q4_1(x, static_cast<block_q4_1*>(y), n / QK4_1);
            return;
        case DType::Q5_0:
            quantize_q5_0(x, static_cast<block_q5_0*>(y), n / QK5_0);
            return;
        case DType::Q5_1:
            quantize_q5_1(x, static_cast<block_q5_1*>(y), n / QK5_1);
            return;
        case DType::Q8_K:
            quantize_q8_K(x, static_cast<block_q8_K*>(y), n / QK_K);
            return;
        default:
            unsupported("quantize_row_ref", t);
    }
}

void dequantize_row_ref(DType t, const void* vx, float* y, int64_t n) {
    check_len("dequantize_row_ref", t, n);
    switch (t) {
        case DType::F32:
            std::memcpy(y, vx, static_cast<size_t>(n) * sizeof(float));
            return;
        case DType::F16: {
            const auto* x = static_cast<const f16_t*>(vx);
            for (int64_t i = 0; i < n; ++i) y[i] = fp16_lut(x[i]);
            return;
        }
        case DType::BF16: {
            const auto* x = static_cast<const bf16_t*>(vx);
            for (int64_t i = 0; i < n; ++i) y[i] = bf16_to_fp32(x[i]);
            return;
        }
        case DType::Q8_0: {
            const auto* x = static_cast<const block_q8_0*>(vx);
            for (int64_t i = 0; i < n / QK8_0; ++i) {
                const float d = fp16_lut(x[i].d);
                for (int j = 0; j < QK8_0; ++j) y[i * QK8_0 + j] = static_cast<float>(x[i].qs[j]) * d;
            }
            return;
        }
        case DType::Q8_1: {
            const auto* x = static_cast<const block_q8_1*>(vx);
            for (int64_t i = 0; i < n / QK8_1; ++i) {
                const float d = fp16_lut(x[i].d);
                for (int j = 0; j < QK8_1; ++j) y[i * QK8_1 + j] = static_cast<float>(x[i].qs[j]) * d;
            }
            return;
        }
        case DType::Q4_0: {
            const auto* x = static_cast<const block_q4_0*>(vx);
            for (int64_t i = 0; i < n / QK4_0; ++i) {
                const float d = fp16_lut(x[i].d);
                float* o = y + i * QK4_0;
                for (int j = 0; j < QK4_0 / 2; ++j) {
                    o[j] = static_cast<float>((x[i].qs[j] & 0x0f) - 8) * d;
                    o[j + QK4_0 / 2] = static_cast<float>((x[i].qs[j] >> 4) - 8) * d;
                }
            }
            return;
        }
        case DType::Q4_1: {
            const auto* x = static_cast<const block_q4_1*>(vx);
            for (int64_t i = 0; i < n / QK4_1; ++i) {
                const float d = fp16_lut(x[i].d);
                const float m = fp16_lut(x[i].m);
                float* o = y + i * QK4_1;
                for (int j = 0; j < QK4_1 / 2; ++j) {
                    o[j] = static_cast<float>(x[i].qs[j] & 0x0f) * d + m;
                    o[j + QK4_1 / 2] = static_cast<float>(x[i].qs[j] >> 4) * d + m;
                }
            }
            return;
        }
        case DType::Q5_0:
        case DType::Q5_1: {
            const bool q51 = t == DType::Q5_1;
            const size_t bs = q51 ? sizeof(block_q5_1) : sizeof(block_q5_0);
            for (int64_t i = 0; i < n / 32; ++i) {
                const uint8_t* b = static_cast<const uint8_t*>(vx) + i * bs;
                f16_t dh, mh = 0;
                std::memcpy(&dh, b, 2);
                if (q51) std::memcpy(&mh, b + 2, 2);
                const uint8_t* qhp = b + (q51 ? 4 : 2);
                const uint8_t* qs = qhp + 4;
                uint32_t qh;
                std::memcpy(&qh, qhp, 4);
                const float d = fp16_lut(dh), m = fp16_lut(mh);
                float* o = y + i * 32;
                for (int j = 0; j < 16; ++j) {
                    const int q0 = (qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1) << 4);
                    const int q1 = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1) << 4);
                    if (q51) {
                        o[j] = static_cast<float>(q0) * d + m;
                        o[j + 16] = static_cast<float>(q1) * d + m;
                    } else {
                        o[j] = static_cast<float>(q0 - 16) * d;
                        o[j + 16] = static_cast<float>(q1 - 16) * d;
                    }
                }
            }
            return;
        }
        case DType::IQ4_NL: {
            const auto* x = static_cast<const block_iq4_nl*>(vx);
            for (int64_t i = 0; i < n / QK4_NL; ++i) {
                const float d = fp16_lut(x[i].d);
                float* o = y + i * QK4_NL;
                for (int j = 0; j < QK4_NL / 2; ++j) {
                    o[j] = d * static_cast<float>(kIQ4NL[x[i].qs[j] & 0x0f]);
                    o[j + QK4_NL / 2] = d * static_cast<float>(kIQ4NL[x[i].qs[j] >> 4]);
                }
            }
            return;
        }
        case DType::Q4_K:
        case DType::Q5_K: {
            const bool q5 = t == DType::Q5_K;
            const size_t bs = q5 ? sizeof(block_q5_K) : sizeof(block_q4_K);
            for (int64_t i = 0; i < n / QK_K; ++i) {
                const uint8_t* b = static_cast<const uint8_t*>(vx) + i * bs;
                f16_t dh, mh;
                std::memcpy(&dh, b, 2);
                std::memcpy(&mh, b + 2, 2);
                const uint8_t* scales = b + 4;
                const uint8_t* qh = b + 16;
                const uint8_t* qs = b + (q5 ? 48 : 16);
                const float d = fp16_lut(dh), dmin = fp16_lut(mh);
                float* o = y + i * QK_K;
                for (int k = 0; k < 4; ++k) {  // 64 elements: sub-blocks 2k and 2k + 1
                    int sc0, m0, sc1, m1;
                    scale_min_k4(2 * k, scales, sc0, m0);
                    scale_min_k4(2 * k + 1, scales, sc1, m1);
                    const float d0 = d * static_cast<float>(sc0), n0 = dmin * static_cast<float>(m0);
                    const float d1 = d * static_cast<float>(sc1), n1 = dmin * static_cast<float>(m1);
                    for (int l = 0; l < 32; ++l) {
                        int q0 = qs[32 * k + l] & 0x0f, q1 = qs[32 * k + l] >> 4;
                        if (q5) {
                            q0 |= ((qh[l] >> (2 * k)) & 1) << 4;
                            q1 |= ((qh[l] >> (2 * k + 1)) & 1) << 4;
                        }
                        o[64 * k + l] = d0 * static_cast<float>(q0) - n0;
                        o[64 * k + 32 + l] = d1 * static_cast<float>(q1) - n1;
                    }
                }
            }
            return;
        }
        case DType::Q6_K: {
            const auto* x = static_cast<const block_q6_K*>(vx);
            for (int64_t i = 0; i < n / QK_K; ++i) {
                const float d = fp16_lut(x[i].d);
                float* o = y + i * QK_K;
                for (int e = 0; e < QK_K; ++e) {
                    const int half = e / 128, r = e % 128, l = r % 64, hi = r / 64;  // hi: high nibble
                    const int lo4 = hi ? x[i].ql[64 * half + l] >> 4 : x[i].ql[64 * half + l] & 0x0f;
                    const int top = (x[i].qh[32 * half + l % 32] >> (4 * hi + 2 * (l / 32))) & 3;
                    o[e] = d * static_cast<float>(x[i].scales[e / 16]) * static_cast<float>((lo4 | (top << 4)) - 32);
                }
            }
            return;
        }
        case DType::IQ4_XS: {
            const auto* x = static_cast<const block_iq4_xs*>(vx);
            for (int64_t i = 0; i < n / QK_K; ++i) {
                const float d = fp16_lut(x[i].d);
                float* o = y + i * QK_K;
                for (int j = 0; j < 8; ++j) {
                    const int ls =
                        ((x[i].scales_l[j / 2] >> (4 * (j % 2))) & 0x0f) | (((x[i].scales_h >> (2 * j)) & 3) << 4);
                    const float dl = d * static_cast<float>(ls - 32);
                    const uint8_t* qs = x[i].qs + 16 * j;
                    for (int k = 0; k < 16; ++k) {
                        o[32 * j + k] = dl * static_cast<float>(kIQ4NL[qs[k] & 0x0f]);
                        o[32 * j + 16 + k] = dl * static_cast<float>(kIQ4NL[qs[k] >> 4]);
                    }
                }
            }
            return;
        }
        case DType::Q8_K: {
            const auto* x = static_cast<const block_q8_K*>(vx);
            for (int64_t i = 0; i < n / QK_K; ++i)
                for (int j = 0; j < QK_K; ++j) y[i * QK_K + j] = x[i].d * static_cast<float>(x[i].qs[j]);
            return;
        }
        default:
            unsupported("dequantize_row_ref", t);
    }
}

}  // namespace ts

// ---- x16 packed layout (see quant.h) -------------------------------------------------------------

namespace ts {

namespace {

// Where each section of a packed block comes from in the 16 source blocks (see quant.h).
struct PackLayout {
    size_t block;   // bytes of one block of one row
    int halves[2];  // byte offsets of the fp16 fields (x16_shape(t).halves of them)
    int lead[4];    // byte offsets of the 4-byte scale fields (.lead_chunks)
    size_t quants;  // byte offset of the quants (chunk j at quants + 4j)
    uint8_t flip;   // xor applied to each quant byte
    // Source bit (byte * 8 + bit, inside one row's block) of bit t of byte k of bit plane v.
    int (*plane_bit)(int v, int k, int t);
};

int plane_q5_0(int, int k, int t) { return 8 * offsetof(block_q5_0, qh) + 4 * t + k; }
int plane_q5_1(int, int k, int t) { return 8 * offsetof(block_q5_1, qh) + 4 * t + k; }
int plane_q5_k(int v, int k, int t) {  // quant chunk c = 4v + t/2, nibble t%2
    const int c = 4 * v + t / 2, l = 4 * (c % 8) + k;
    return 8 * (static_cast<int>(offsetof(block_q5_K, qh)) + l) + 2 * (c / 8) + t % 2;
}
int plane_q6_k(int v, int k, int t) {                              // quant chunk c = 2v + t/4, nibble (t/2)%2, bit t%2
    const int c = 2 * v + t / 4, hi = (t / 2) % 2, i = 4 * c + k;  // ql byte i
    const int half = i / 64, l = i % 64;
    return 8 * (static_cast<int>(offsetof(block_q6_K, qh)) + 32 * half + l % 32) + 4 * hi + 2 * (l / 32) + t % 2;
}

PackLayout pack_layout(DType t) {
    switch (t) {
        case DType::Q4_0:
            return {sizeof(block_q4_0), {0}, {0}, offsetof(block_q4_0, qs), 0, nullptr};
        case DType::Q4_1:
            return {sizeof(block_q4_1), {0, 2}, {0}, offsetof(block_q4_1, qs), 0, nullptr};
        case DType::Q8_0:
            return {sizeof(block_q8_0), {0}, {0}, offsetof(block_q8_0, qs), 0x80, nullptr};
        case DType::Q5_0:
            return {sizeof(block_q5_0), {0}, {0}, offsetof(block_q5_0, qs), 0, plane_q5_0};
        case DType::Q5_1:
            return {sizeof(block_q5_1), {0, 2}, {0}, offsetof(block_q5_1, qs), 0, plane_q5_1};
        case DType::IQ4_NL:
            return {sizeof(block_iq4_nl), {0}, {0}, offsetof(block_iq4_nl, qs), 0, nullptr};
        case DType::Q4_K:
            return {sizeof(block_q4_K), {0, 2}, {4, 8, 12, 0}, offsetof(block_q4_K, qs), 0, nullptr};
        case DType::Q5_K:
            return {sizeof(block_q5_K), {0, 2}, {4, 8, 12, 0}, offsetof(block_q5_K, qs), 0, plane_q5_k};
        case DType::Q6_K:
            return {sizeof(block_q6_K),
                    {static_cast<int>(offsetof(block_q6_K, d)), 0},
                    {192, 196, 200, 204},
                    offsetof(block_q6_K, ql),
                    0,
                    plane_q6_k};
        case DType::IQ4_XS:
            return {sizeof(block_iq4_xs),       {0, 2}, {static_cast<int>(offsetof(block_iq4_xs, scales_l)), 0, 0, 0},
                    offsetof(block_iq4_xs, qs), 0,      nullptr};
        default:
            throw std::invalid_argument("type cannot be packed");
    }
}

// Every layout takes exactly 16 source blocks.
template <DType T, class B>
constexpr bool exact_size() {
    constexpr X16Shape s = x16_shape(T);
    return s.halves * 32 + (s.lead_chunks + s.planes + s.chunks) * 64 == kPackRows * static_cast<int>(sizeof(B));
}
static_assert(exact_size<DType::Q4_0, block_q4_0>() && exact_size<DType::Q4_1, block_q4_1>() &&
                  exact_size<DType::Q8_0, block_q8_0>() && exact_size<DType::Q5_0, block_q5_0>() &&
                  exact_size<DType::Q5_1, block_q5_1>() && exact_size<DType::IQ4_NL, block_iq4_nl>() &&
                  exact_size<DType::Q4_K, block_q4_K>() && exact_size<DType::Q5_K, block_q5_K>() &&
                  exact_size<DType::Q6_K, block_q6_K>() && exact_size<DType::IQ4_XS, block_iq4_xs>(),
              "a packed block must take exactly 16 blocks");

// The source bit of every bit of every plane of type t, [v][k][b], computed once per type (packing a
// model calls this per block and row).
const int16_t* plane_bits(DType t, const PackLayout& L) {
    static int16_t table[kMaxDTypeId][16 * 4 * 8];
    static std::once_flag once[kMaxDTypeId];
    const int id = static_cast<int>(t);
    std::call_once(once[id], [&] {
        for (int v = 0; v < x16_shape(t).planes; v++)
            for (int k = 0; k < 4; k++)
                for (int b = 0; b < 8; b++) table[id][(v * 4 + k) * 8 + b] = static_cast<int16_t>(L.plane_bit(v, k, b));
    });
    return table[id];
}

// Copy between one row's block (`row`) and its share of a packed block (`packed`, row r).
template <bool kPack>
void move_block(DType t, const PackLayout& L, uint8_t* row, uint8_t* packed, int r) {
    const X16Shape s = x16_shape(t);
    auto bytes = [&](uint8_t* p, uint8_t* q, int n, uint8_t flip) {  // row bytes p <-> packed bytes q
        for (int i = 0; i < n; i++) {
            if (kPack)
                q[i] = p[i] ^ flip;
            else
                p[i] = q[i] ^ flip;
        }
    };
    for (int i = 0; i < s.halves; i++) bytes(row + L.halves[i], packed + i * 32 + 2 * r, 2, 0);
    uint8_t* lead = packed + x16_lead_off(t);
    for (int i = 0; i < s.lead_chunks; i++) bytes(row + L.lead[i], lead + i * 64 + 4 * r, 4, 0);
    uint8_t* planes = packed + x16_planes_off(t);
    const int16_t* bits = plane_bits(t, L);  // [v][k][b] -> source bit
    for (int v = 0; v < s.planes; v++)
        for (int k = 0; k < 4; k++) {
            uint8_t& q = planes[v * 64 + 4 * r + k];
            if (kPack) q = 0;
            for (int b = 0; b < 8; b++) {
                const int src = bits[(v * 4 + k) * 8 + b];
                const uint8_t mask = static_cast<uint8_t>(1u << (src % 8));
                if (kPack) {
                    if (row[src / 8] & mask) q |= static_cast<uint8_t>(1u << b);
                } else {
                    row[src / 8] = static_cast<uint8_t>((row[src / 8] & ~mask) | (((q >> b) & 1) ? mask : 0));
                }
            }
        }
    uint8_t* chunks = packed + x16_chunks_off(t);
    for (int j = 0; j < s.chunks; j++) bytes(row + L.quants + 4 * j, chunks + j * 64 + 4 * r, 4, L.flip);
}

}  // namespace

bool packable(DType t) { return x16_shape(t).block != 0; }

void pack_x16(DType t, const void* src, size_t src_stride, int64_t n, void* dst) {
    const PackLayout L = pack_layout(t);
    const int64_t nb = n / x16_shape(t).block;
    const auto* in = static_cast<const uint8_t*>(src);
    auto* out = static_cast<uint8_t*>(dst);
    for (int64_t b = 0; b < nb; b++)
        for (int r = 0; r < kPackRows; r++)
            move_block<true>(t, L, const_cast<uint8_t*>(in + r * src_stride + b * L.block),
                             out + b * kPackRows * L.block, r);
}

void unpack_x16_row(DType t, const void* group, int64_t n, int r, void* dst) {
    const PackLayout L = pack_layout(t);
    const int64_t nb = n / x16_shape(t).block;
    auto* in = const_cast<uint8_t*>(static_cast<const uint8_t*>(group));
    auto* out = static_cast<uint8_t*>(dst);
    for (int64_t b = 0; b < nb; b++) move_block<false>(t, L, out + b * L.block, in + b * kPackRows * L.block, r);
}

}  // namespace ts
