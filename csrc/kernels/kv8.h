// kv8.h — the int8 KV cache's two quantizers around one ISA's group kernel. The layout walk is
// kv8_store's and kv8_quantize_query's (ref.cpp, the format's definition); an ISA supplies only
//   float Group(const float* x, int8_t* q, int32_t* sum)
// which rounds 32 floats as the reference's q8_group does (returns d, writes q[0..32) and the sum
// of the 32 q). A shorter last group (head_dim not a multiple of 32) is zero-padded first: a zero
// changes neither max|x| nor any other q, and its q = 0 is the reference's padding byte.
//
// Include this file INSIDE the ISA file's anonymous namespace, as driver.h (the same reason: no
// inline function compiled with one ISA's flags may be shared with another). It includes nothing:
// the ISA file includes <algorithm>, <cstring> and kernels/kernels.h first.

// Group g of x (elements [32g, 32g + m)), padded to 32 when shorter; returns m.
inline int kv8_group_in(const KV8Layout& L, const float* x, int g, float (&pad)[kKV8Group], const float*& in) {
    const int i0 = g * kKV8Group, m = std::min(L.hd - i0, kKV8Group);
    in = x + i0;
    if (m < kKV8Group) {
        std::fill(pad, pad + kKV8Group, 0.0f);
        std::memcpy(pad, x + i0, sizeof(float) * (size_t)m);
        in = pad;
    }
    return m;
}

template <float (*Group)(const float*, int8_t*, int32_t*)>
void kv8_store_with(const KV8Layout& L, int kv, int slot, const float* x, uint8_t* run) {
    const int G = L.groups(), C = L.chunks();
    float pad[kKV8Group];
    int8_t q[kKV8Group];
    int32_t sum;
    if (kv == 0) {  // K: 4 bytes of the position per 64-byte chunk; the scale at [group][position]
        uint8_t* tile = run + (size_t)(slot / kKV8Tile) * L.k_tile_bytes();
        auto* dk = reinterpret_cast<f16_t*>(tile + L.k_scales_offset());
        const int p = slot % kKV8Tile;
        for (int g = 0; g < G; ++g) {
            const float* in;
            kv8_group_in(L, x, g, pad, in);
            dk[g * kKV8Tile + p] = fp32_to_fp16(Group(in, q, &sum));
            const int c0 = g * kKV8Group / 4, c1 = std::min(C, c0 + kKV8Group / 4);  // the last chunk's pad is q = 0
            for (int c = c0; c < c1; ++c) std::memcpy(tile + (size_t)c * 64 + 4 * p, q + 4 * (c - c0), 4);
        }
    } else {  // V: a row of hd bytes; the scales at [position][group]
        auto* v = reinterpret_cast<int8_t*>(run + (size_t)slot * L.hd);
        auto* dv = reinterpret_cast<f16_t*>(run + L.v_scales_offset()) + (size_t)slot * G;
        for (int g = 0; g < G; ++g) {
            const float* in;
            const int m = kv8_group_in(L, x, g, pad, in);
            dv[g] = fp32_to_fp16(Group(in, q, &sum));
            std::memcpy(v + g * kKV8Group, q, (size_t)m);
        }
    }
}

template <float (*Group)(const float*, int8_t*, int32_t*)>
void kv8_quantize_query_with(const KV8Layout& L, const float* x, uint8_t* rec) {
    const int G = L.groups(), C = L.chunks();
    uint8_t* d = rec + (size_t)C * 4;
    uint8_t* sums = d + (size_t)G * 4;
    float pad[kKV8Group];
    int8_t q[kKV8Group];
    for (int g = 0; g < G; ++g) {
        const float* in;
        kv8_group_in(L, x, g, pad, in);
        int32_t sum;
        const float dg = Group(in, q, &sum);
        std::memcpy(d + 4 * g, &dg, 4);
        std::memcpy(sums + 4 * g, &sum, 4);
        const int i0 = g * kKV8Group;  // whole chunks: the zero pad up to 4 * C comes with them
        std::memcpy(rec + i0, q, (size_t)(std::min(C * 4, i0 + kKV8Group) - i0));
    }
}
