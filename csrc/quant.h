// quant.h — GGUF/ggml tensor types and block layouts, mirrored exactly from the GGUF format.
// Reference (scalar) quantize/dequantize live in quant.cpp; they are the truth every kernel is
// checked against.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ts {

// ggml_type ids as stored in GGUF tensor infos.
enum class DType : uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
    Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};
constexpr int kMaxDTypeId = 64;

constexpr int QK4_0 = 32;
constexpr int QK4_1 = 32;
constexpr int QK8_0 = 32;
constexpr int QK8_1 = 32;

using f16_t = uint16_t;   // IEEE half, raw bits
using bf16_t = uint16_t;  // bfloat16, raw bits

// Q4_0: d * (q - 8), q in [0, 15]; low nibbles hold elements 0..15, high nibbles 16..31.
struct block_q4_0 { f16_t d; uint8_t qs[QK4_0 / 2]; };
// Q4_1: d * q + m
struct block_q4_1 { f16_t d; f16_t m; uint8_t qs[QK4_1 / 2]; };
// Q8_0: d * q, q in [-127, 127]
struct block_q8_0 { f16_t d; int8_t qs[QK8_0]; };
// Q8_1 (activations for Q4_1): d * q, s = d * sum(q)
struct block_q8_1 { f16_t d; f16_t s; int8_t qs[QK8_1]; };

static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match GGUF");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must match GGUF");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match GGUF");
static_assert(sizeof(block_q8_1) == 36, "block_q8_1 must match GGUF");

// Size facts per type (also for types we can parse but not compute with).
struct DTypeInfo {
    const char* name;     // "Q4_1"; nullptr if the id is unknown
    int block_size;       // elements per block
    size_t block_bytes;   // bytes per block
    bool supported;       // can the engine compute with it
};
const DTypeInfo& dtype_info(uint32_t id);  // unknown ids give {nullptr,0,0,false}
inline const DTypeInfo& dtype_info(DType t) { return dtype_info(static_cast<uint32_t>(t)); }
// bytes for a row of n elements (n must be a multiple of the block size)
size_t row_bytes(DType t, int64_t n);

// fp16 / bf16 conversion (portable; SIMD files use their own)
float fp16_to_fp32(f16_t h);
f16_t fp32_to_fp16(float f);
inline float bf16_to_fp32(bf16_t h) {
    union { uint32_t u; float f; } v; v.u = static_cast<uint32_t>(h) << 16; return v.f;
}
bf16_t fp32_to_bf16(float f);  // round to nearest even
extern float g_fp16_table[1 << 16];  // filled at start-up; fp16_to_fp32 via lookup
inline float fp16_lut(f16_t h) { return g_fp16_table[h]; }

// Reference quantize/dequantize of one row of n elements (n a multiple of the block size).
void quantize_row_ref(DType t, const float* x, void* y, int64_t n);
void dequantize_row_ref(DType t, const void* x, float* y, int64_t n);

}  // namespace ts

namespace ts {

// ---- the x16 packed layout (tinyserve's own, built at load time) --------------------------------
// 16 weight rows of Q4_0 / Q4_1 / Q8_0 interleaved so that one 512-bit register holds the same 4
// bytes of 16 rows: one integer dot-product instruction then advances 16 rows at once, and each
// row's block sum lands in its own lane (no horizontal reductions). Per block b of the 16 rows:
//   d[16] (fp16) | m[16] (fp16, Q4_1 only) | chunks
// chunk j (64 bytes) holds, for row r = 0..15, the 4 bytes qs[4j .. 4j+3] of row r's block b
// (4 chunks for Q4_0/Q4_1, whose nibbles are split by the kernel; 8 for Q8_0, stored as q ^ 0x80,
// i.e. q + 128 as an unsigned byte). A group takes exactly 16 * row_bytes, the original size.
constexpr int kPackRows = 16;
bool packable(DType t);
// Pack rows [0, 16) of `src` (row stride src_stride bytes, n elements per row) into dst.
void pack_x16(DType t, const void* src, size_t src_stride, int64_t n, void* dst);
// Row r (0..15) of a packed group back in the GGUF block layout (row_bytes(t, n) bytes).
void unpack_x16_row(DType t, const void* group, int64_t n, int r, void* dst);

}  // namespace ts
