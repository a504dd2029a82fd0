// quant.h — GGUF/ggml tensor types and block layouts, mirrored exactly from the GGUF format.
// Reference (scalar) quantize/dequantize live in quant.cpp; they are the truth every kernel is
// checked against.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ts {

// ggml_type ids as stored in GGUF tensor infos.
enum class DType : uint32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ4_NL = 20,
    IQ4_XS = 23,
    BF16 = 30,
};
constexpr int kMaxDTypeId = 64;

constexpr int QK4_0 = 32;
constexpr int QK4_1 = 32;
constexpr int QK5_0 = 32;
constexpr int QK5_1 = 32;
constexpr int QK8_0 = 32;
constexpr int QK8_1 = 32;
constexpr int QK4_NL = 32;
constexpr int QK_K = 256;  // super-block of the K-quants and IQ4_XS

using f16_t = uint16_t;   // IEEE half, raw bits
using bf16_t = uint16_t;  // bfloat16, raw bits

// Q4_0: d * (q - 8), q in [0, 15]; low nibbles hold elements 0..15, high nibbles 16..31.
struct block_q4_0 {
    f16_t d;
    uint8_t qs[QK4_0 / 2];
};
// Q4_1: d * q + m
struct block_q4_1 {
    f16_t d;
    f16_t m;
    uint8_t qs[QK4_1 / 2];
};
// Q8_0: d * q, q in [-127, 127]
struct block_q8_0 {
    f16_t d;
    int8_t qs[QK8_0];
};
// Q8_1 (activations for Q4_1): d * q, s = d * sum(q)
struct block_q8_1 {
    f16_t d;
    f16_t s;
    int8_t qs[QK8_1];
};

// Q5_0: d * (q - 16), q in [0, 31]; low 4 bits as Q4_0's nibbles, bit 4 of element j is bit j of
// qh (a little-endian uint32).
struct block_q5_0 {
    f16_t d;
    uint8_t qh[4];
    uint8_t qs[QK5_0 / 2];
};
// Q5_1: d * q + m, q in [0, 31], bits stored as Q5_0's.
struct block_q5_1 {
    f16_t d;
    f16_t m;
    uint8_t qh[4];
    uint8_t qs[QK5_1 / 2];
};
// IQ4_NL: d * kIQ4NL[q], q a 4-bit index (nibbles as Q4_0's) into a fixed non-linear table.
struct block_iq4_nl {
    f16_t d;
    uint8_t qs[QK4_NL / 2];
};
extern const int8_t kIQ4NL[16];

// K-quants: super-blocks of 256 elements in sub-blocks with their own scales.
// Q4_K: 8 sub-blocks of 32: y = d * sc_j * q - dmin * m_j, q in [0, 15]; sc_j, m_j are 6-bit,
// packed in `scales` (j < 4: scales[j] & 63 and scales[j + 4] & 63; j >= 4: low 4 bits from
// scales[j + 4], high 2 bits from the top of scales[j - 4] / scales[j]). qs byte 32k + l holds
// element 64k + l (low nibble, sub-block 2k) and 64k + 32 + l (high nibble, sub-block 2k + 1).
struct block_q4_K {
    f16_t d;
    f16_t dmin;
    uint8_t scales[12];
    uint8_t qs[QK_K / 2];
};
// The 6-bit scale and min of sub-block j (0..7) from the 12 `scales` bytes of a Q4_K / Q5_K block.
void scale_min_k4(int j, const uint8_t* scales, int& sc, int& m);
// Q5_K: Q4_K plus a fifth bit: bit 2k of qh[l] for element 64k + l, bit 2k + 1 for 64k + 32 + l.
struct block_q5_K {
    f16_t d;
    f16_t dmin;
    uint8_t scales[12];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
};
// Q6_K: 16 sub-blocks of 16: y = d * scales[j] * (q - 32), q in [0, 63]. In each half n of 128
// elements, ql byte 64n + l (l < 64) holds the low 4 bits of element 128n + l (low nibble) and
// 128n + 64 + l (high nibble); their top 2 bits are in qh[32n + l % 32] at bit 2 * (l / 32) and
// 4 + 2 * (l / 32).
struct block_q6_K {
    uint8_t ql[QK_K / 2];
    uint8_t qh[QK_K / 4];
    int8_t scales[QK_K / 16];
    f16_t d;
};
// IQ4_XS: 8 sub-blocks of 32: y = d * (ls_j - 32) * kIQ4NL[q], ls_j 6-bit (low 4 bits in
// scales_l nibble j, high 2 bits at 2j of scales_h); qs as IQ4_NL's, 16 bytes per sub-block.
struct block_iq4_xs {
    f16_t d;
    uint16_t scales_h;
    uint8_t scales_l[QK_K / 64];
    uint8_t qs[QK_K / 2];
};
// Q8_K (activations for the K-quants and IQ4_XS): y = d * q (d a float), bsums[j] = sum of the
// 16 quants of elements 16j .. 16j + 15.
struct block_q8_K {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
};

static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match GGUF");
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 must match GGUF");
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 must match GGUF");
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl must match GGUF");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K must match GGUF");
static_assert(sizeof(block_q5_K) == 176, "block_q5_K must match GGUF");
static_assert(sizeof(block_q6_K) == 210, "block_q6_K must match GGUF");
static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs must match GGUF");
static_assert(sizeof(block_q8_K) == 292, "block_q8_K must match ggml");
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 must match GGUF");
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match GGUF");
static_assert(sizeof(block_q8_1) == 36, "block_q8_1 must match GGUF");

// Size facts per type (also for types we can parse but not compute with).
struct DTypeInfo {
    const char* name;    // "Q4_1"; nullptr if the id is unknown
    int block_size;      // elements per block
    size_t block_bytes;  // bytes per block
    bool supported;      // can the engine compute with it
};
const DTypeInfo& dtype_info(uint32_t id);  // unknown ids give {nullptr,0,0,false}
inline const DTypeInfo& dtype_info(DType t) { return dtype_info(static_cast<uint32_t>(t)); }
// bytes for a row of n elements (n must be a multiple of the block size)
size_t row_bytes(DType t, int64_t n);

// fp16 / bf16 conversion (portable; SIMD files use their own)
float fp16_to_fp32(f16_t h);
f16_t fp32_to_fp16(float f);
inline float bf16_to_fp32(bf16_t h) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = static_cast<uint32_t>(h) << 16;
    return v.f;
}
bf16_t fp32_to_bf16(float f);        // round to nearest even
extern float g_fp16_table[1 << 16];  // filled at start-up; fp16_to_fp32 via lookup
inline float fp16_lut(f16_t h) { return g_fp16_table[h]; }

// Reference quantize/dequantize of one row of n elements (n a multiple of the block size).
void quantize_row_ref(DType t, const float* x, void* y, int64_t n);
void dequantize_row_ref(DType t, const void* x, float* y, int64_t n);

}  // namespace ts

namespace ts {

// ---- the x16 packed layout (tinyserve's own, built at load time) --------------------------------
// 16 weight rows interleaved so that one 512-bit register holds the same 4 bytes of 16 rows: one
// integer dot-product instruction then advances 16 rows at once, and each row's block sum lands in
// its own lane (no horizontal reductions). A packed block (one block, or super-block, of each of
// the 16 rows) is a sequence of sections, in this order:
//   halves     fp16 fields (d, m, dmin, IQ4_XS's scales_h): 16 x 2 bytes each, row r at 2r
//   chunks     4-byte fields: 64 bytes each, row r's 4 bytes at 4r. The leading ones are a type's
//              packed scales (Q4_K/Q5_K: scales[0..3], [4..7], [8..11]; Q6_K: scales[4i..4i+3];
//              IQ4_XS: scales_l); the rest are the quants, chunk j = qs[4j .. 4j + 3] of each row
//              (Q8_0 stores q ^ 0x80, i.e. q + 128 as an unsigned byte)
//   bit planes extra high bits, 64 bytes each: bit t of byte 4r + k belongs to element k of a
//              quant chunk of row r (the "4-element group" at byte k). Q5_0/Q5_1: one plane, bit t
//              is the fifth bit of chunk t's low nibble (t < 4) or chunk t-4's high nibble, i.e.
//              bit 4t + k of qh. Q5_K: plane v serves quant chunks 4v .. 4v+3: bit 2i + h is the
//              fifth bit of chunk 4v+i's low (h = 0) or high (h = 1) nibble. Q6_K: plane v serves
//              quant chunks 2v and 2v+1: bits 4i + 2h, 4i + 2h + 1 are the top 2 bits of chunk
//              2v+i's low (h = 0) or high (h = 1) nibble.
// Section order: halves | leading (scale) chunks | bit planes | quant chunks. A packed block takes
// exactly 16 blocks' bytes, so the packed copy of a matrix is exactly the file's size.
constexpr int kPackRows = 16;
// The sections of one packed block of type t (all zero if t has no packed layout).
struct X16Shape {
    int block;        // elements per block (32, or 256 for K-quants / IQ4_XS)
    int halves;       // fp16 sections (32 bytes each)
    int lead_chunks;  // scale chunks (64 bytes each)
    int planes;       // bit planes (64 bytes each)
    int chunks;       // quant chunks (64 bytes each)
};
constexpr X16Shape x16_shape(DType t) {
    switch (t) {
        case DType::Q4_0:
            return {32, 1, 0, 0, 4};
        case DType::Q4_1:
            return {32, 2, 0, 0, 4};
        case DType::Q8_0:
            return {32, 1, 0, 0, 8};
        case DType::Q5_0:
            return {32, 1, 0, 1, 4};
        case DType::Q5_1:
            return {32, 2, 0, 1, 4};
        case DType::IQ4_NL:
            return {32, 1, 0, 0, 4};
        case DType::Q4_K:
            return {256, 2, 3, 0, 32};
        case DType::Q5_K:
            return {256, 2, 3, 8, 32};
        case DType::Q6_K:
            return {256, 1, 4, 16, 32};
        case DType::IQ4_XS:
            return {256, 2, 1, 0, 32};
        default:
            return {0, 0, 0, 0, 0};
    }
}
// Byte offsets of the sections inside a packed block.
constexpr int x16_lead_off(DType t) { return x16_shape(t).halves * 32; }
constexpr int x16_planes_off(DType t) { return x16_lead_off(t) + x16_shape(t).lead_chunks * 64; }
constexpr int x16_chunks_off(DType t) { return x16_planes_off(t) + x16_shape(t).planes * 64; }
constexpr int x16_block_bytes(DType t) { return x16_chunks_off(t) + x16_shape(t).chunks * 64; }
bool packable(DType t);
// Pack rows [0, 16) of `src` (row stride src_stride bytes, n elements per row) into dst.
void pack_x16(DType t, const void* src, size_t src_stride, int64_t n, void* dst);
// Row r (0..15) of a packed group back in the GGUF block layout (row_bytes(t, n) bytes).
void unpack_x16_row(DType t, const void* group, int64_t n, int r, void* dst);

}  // namespace ts
