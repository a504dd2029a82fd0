// quant.cpp — GGUF type facts, fp16/bf16 conversion, and the reference (scalar) quantize and
// dequantize rows. These follow ggml's reference rounding exactly, so the bytes we produce match
// gguf-py's `gguf.quants.quantize` (tests/kernels/test_kernels.py checks it).
#include "quant.h"

#include <cmath>
#include <cstring>
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
        v[6] = {"Q5_0", 32, 22, false};
        v[7] = {"Q5_1", 32, 24, false};
        v[8] = {"Q8_0", 32, 34, true};
        v[9] = {"Q8_1", 32, 36, false};  // activation type (ggml: two halves + 32 int8)
        v[10] = {"Q2_K", 256, 84, false};
        v[11] = {"Q3_K", 256, 110, false};
        v[12] = {"Q4_K", 256, 144, false};
        v[13] = {"Q5_K", 256, 176, false};
        v[14] = {"Q6_K", 256, 210, false};
        v[15] = {"Q8_K", 256, 292, false};
        v[16] = {"IQ2_XXS", 256, 66, false};
        v[17] = {"IQ2_XS", 256, 74, false};
        v[18] = {"IQ3_XXS", 256, 98, false};
        v[19] = {"IQ1_S", 256, 50, false};
        v[20] = {"IQ4_NL", 32, 18, false};
        v[21] = {"IQ3_S", 256, 110, false};
        v[22] = {"IQ2_S", 256, 82, false};
        v[23] = {"IQ4_XS", 256, 136, false};
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

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

}  // namespace

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

void quantize_q8_0(const float* x, block_q8_0* y, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; ++j) amax = std::fmax(amax, std::fabs(x[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; ++j) y[i].qs[j] = static_cast<int8_t>(std::roundf(x[j] * id));
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
            const int q = static_cast<int>(std::roundf(x[j] * id));
            y[i].qs[j] = static_cast<int8_t>(q);
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
            if (amax < std::fabs(x[j])) { amax = std::fabs(x[j]); max = x[j]; }
        }
        const float d = max / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; ++j) {
            const float v0 = x[j] * id;
            const float v1 = x[QK4_0 / 2 + j] * id;
            int q0 = static_cast<int8_t>(v0 + 8.5f);
            int q1 = static_cast<int8_t>(v1 + 8.5f);
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
            int q0 = static_cast<int8_t>(v0 + 0.5f);
            int q1 = static_cast<int8_t>(v1 + 0.5f);
            q0 = q0 < 15 ? q0 : 15;
            q1 = q1 < 15 ? q1 : 15;
            y[i].qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
        }
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
        case DType::F32: std::memcpy(y, x, static_cast<size_t>(n) * sizeof(float)); return;
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
        case DType::Q8_0: quantize_q8_0(x, static_cast<block_q8_0*>(y), n / QK8_0); return;
        case DType::Q8_1: quantize_q8_1(x, static_cast<block_q8_1*>(y), n / QK8_1); return;
        case DType::Q4_0: quantize_q4_0(x, static_cast<block_q4_0*>(y), n / QK4_0); return;
        case DType::Q4_1: quantize_q4_1(x, static_cast<block_q4_1*>(y), n / QK4_1); return;
        default: unsupported("quantize_row_ref", t);
    }
}

void dequantize_row_ref(DType t, const void* vx, float* y, int64_t n) {
    check_len("dequantize_row_ref", t, n);
    switch (t) {
        case DType::F32: std::memcpy(y, vx, static_cast<size_t>(n) * sizeof(float)); return;
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
        default: unsupported("dequantize_row_ref", t);
    }
}

}  // namespace ts

// ---- x16 packed layout (see quant.h) -------------------------------------------------------------

namespace ts {

namespace {

struct PackShape {
    size_t block;     // bytes of one block of one row
    int n_scales;     // fp16 scales per block per row (d, or d and m)
    int qs_off;       // offset of qs inside a block
    int n_chunks;     // 64-byte chunks per packed block
    uint8_t flip;     // xor applied to each quant byte
};

PackShape pack_shape(DType t) {
    switch (t) {
        case DType::Q4_0: return {sizeof(block_q4_0), 1, offsetof(block_q4_0, qs), 4, 0};
        case DType::Q4_1: return {sizeof(block_q4_1), 2, offsetof(block_q4_1, qs), 4, 0};
        case DType::Q8_0: return {sizeof(block_q8_0), 1, offsetof(block_q8_0, qs), 8, 0x80};
        default: throw std::invalid_argument("type cannot be packed");
    }
}

}  // namespace

bool packable(DType t) { return t == DType::Q4_0 || t == DType::Q4_1 || t == DType::Q8_0; }

void pack_x16(DType t, const void* src, size_t src_stride, int64_t n, void* dst) {
    const PackShape s = pack_shape(t);
    const int64_t nb = n / 32;
    const auto* in = static_cast<const uint8_t*>(src);
    auto* out = static_cast<uint8_t*>(dst);
    for (int64_t b = 0; b < nb; b++) {
        uint8_t* o = out + b * kPackRows * s.block;
        for (int r = 0; r < kPackRows; r++) {
            const uint8_t* blk = in + r * src_stride + b * s.block;
            for (int k = 0; k < s.n_scales; k++) std::memcpy(o + (k * kPackRows + r) * 2, blk + 2 * k, 2);
            uint8_t* q = o + s.n_scales * kPackRows * 2;
            for (int j = 0; j < s.n_chunks; j++)
                for (int i = 0; i < 4; i++) q[j * 64 + r * 4 + i] = blk[s.qs_off + 4 * j + i] ^ s.flip;
        }
    }
}

void unpack_x16_row(DType t, const void* group, int64_t n, int r, void* dst) {
    const PackShape s = pack_shape(t);
    const int64_t nb = n / 32;
    const auto* in = static_cast<const uint8_t*>(group);
    auto* out = static_cast<uint8_t*>(dst);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* p = in + b * kPackRows * s.block;
        uint8_t* blk = out + b * s.block;
        for (int k = 0; k < s.n_scales; k++) std::memcpy(blk + 2 * k, p + (k * kPackRows + r) * 2, 2);
        const uint8_t* q = p + s.n_scales * kPackRows * 2;
        for (int j = 0; j < s.n_chunks; j++)
            for (int i = 0; i < 4; i++) blk[s.qs_off + 4 * j + i] = q[j * 64 + r * 4 + i] ^ s.flip;
    }
}

}  // namespace ts
