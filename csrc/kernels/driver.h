// driver.h — the matmul loops every ISA shares. An ISA file supplies tile kernels only; the loops
// over weight rows, activation rows, tiles and tails live here, once.
//
// Include this file INSIDE the ISA file's anonymous namespace (after its own helpers): everything
// here is then compiled with that file's flags and has internal linkage, so no ISA's instructions
// can reach another ISA's code through a shared inline function. For that reason it includes no
// headers itself: the ISA file includes <cstddef>, <cstdint>, <vector> and kernels/kernels.h first.
//
// Batch invariance: the drivers only choose which tile computes which (weight row, activation row)
// pairs. Every tile kernel computes a pair with the same arithmetic whatever tile shape it lands in,
// so no driver decision (row split, tile shape, tail) changes a result.

// ---- the file's layout: R x C register tiles -----------------------------------------------------
//
// Tile<T, R, C>::run(len, w, ws, a, as, out, ldo) computes out[c * ldo + r] for r < R, c < C, where
// len is blocks (quantized types) or elements (float types). gemm_tiled walks kR-row x kC-column
// tiles; calls with few activation rows (GEMV-like: nc <= kC) stream one weight row at a time.

template <template <class, int, int> class Tile, class T, int R, int C>
inline void tile_cols(int left, int len, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* out,
                      size_t ldo) {  // Tile<T, R, left> for a run-time left in [1, C]
    if constexpr (C >= 1) {
        if (left == C)
            Tile<T, R, C>::run(len, w, ws, a, as, out, ldo);
        else
            tile_cols<Tile, T, R, C - 1>(left, len, w, ws, a, as, out, ldo);
    }
}

template <template <class, int, int> class Tile, class T, int R, int kC>
inline void tile_row_span(int len, int nc, const uint8_t* w, size_t ws, const uint8_t* a, size_t as, float* out,
                          size_t ldo) {  // R weight rows against all nc activation rows
    int c = 0;
    for (; c + kC <= nc; c += kC) Tile<T, R, kC>::run(len, w, ws, a + c * as, as, out + c * ldo, ldo);
    if (c < nc) tile_cols<Tile, T, R, kC - 1>(nc - c, len, w, ws, a + c * as, as, out + c * ldo, ldo);
}

template <template <class, int, int> class Tile, class T, int kR, int kC>
void gemm_tiled(int len, int nr, int nc, const void* w, size_t ws, const void* a, size_t as, float* out, size_t ldo) {
    const auto* wb = static_cast<const uint8_t*>(w);
    const auto* ab = static_cast<const uint8_t*>(a);
    int r = 0;
    for (; nc > kC && r + kR <= nr; r += kR)
        tile_row_span<Tile, T, kR, kC>(len, nc, wb + r * ws, ws, ab, as, out + r, ldo);
    for (; r < nr; ++r) tile_row_span<Tile, T, 1, kC>(len, nc, wb + r * ws, ws, ab, as, out + r, ldo);
}

// ---- the x16 packed layout (quant.h): 16 weight rows per group ----------------------------------
//
// A kernel K (one per weight type and ISA) provides
//   static constexpr int kBlock;  // elements per block of the weight type (32, or 256 for K-quants)
//   static constexpr int kCols;   // activation rows per tile
//   static constexpr bool kStreams;  // its tiles prefetch their own weights (else the driver does)
//   using Acts;                   // per-call records of the activation rows (X16Acts, or Empty)
//   static void prep(int nb, const uint8_t* a, size_t as, int nc, Acts& x);
//   template <int C> static void tile(int nb, const uint8_t* w, const uint8_t* a, size_t as,
//                                     const Acts& x, int c0, float* out, size_t ldo);
// tile() computes out[c * ldo + r] for the group's 16 rows r and activation rows c < C, which are
// rows c0 + c of the call (x holds records for every row of the call).

// Records most x16 kernels want, per activation row and block: the scale d, and s (d * sum, from a
// Q8_1 block) or an integer correction (k * sum of the block's quants).
struct X16Acts {
    std::vector<float> d, s;
    std::vector<int32_t> corr;
    void resize(size_t n) {
        if (d.size() < n) d.resize(n), s.resize(n), corr.resize(n);
    }
};
struct X16NoActs {};  // kernels that read everything straight from the activation blocks

// Software prefetch of a packed block kAhead bytes on, spread over the work of the current one:
// part i (of kParts) asks for its share of the kBB bytes' 64-byte lines (prefetcht0 on x86).
template <size_t kBB, size_t kAhead, int kParts>
inline void prefetch_share(const uint8_t* wb, int i) {
    constexpr int kLines = static_cast<int>((kBB + 63) / 64), kPer = (kLines + kParts - 1) / kParts;
    const int end = (i + 1) * kPer < kLines ? (i + 1) * kPer : kLines;
    for (int l = i * kPer; l < end; ++l) __builtin_prefetch(wb + kAhead + 64 * l, 0, 3);
}

// How far on a GEMV tile (too few activation rows to stream its own weights) asks for its weights:
// a memory latency's worth of one core's stream, 3 KiB, rounded up to a whole block of kBB bytes.
// A forward's GEMVs are short streams that start cold (a task is a few groups of a small matrix),
// and the hardware prefetcher alone ramps up too late; x86_avx512.cpp's comment has the A/B.
template <size_t kBB>
constexpr size_t gemv_ahead() {
    return (3072 + kBB - 1) / kBB * kBB;
}

template <class K, int C>
inline void x16_tail(int left, int nb, const uint8_t* w, const uint8_t* a, size_t as, const typename K::Acts& x, int c0,
                     float* out, size_t ldo) {  // K::tile<left> for a run-time left in [1, C]
    if constexpr (C >= 1) {
        if (left == C)
            K::template tile<C>(nb, w, a, as, x, c0, out, ldo);
        else
            x16_tail<K, C - 1>(left, nb, w, a, as, x, c0, out, ldo);
    }
}

// w points at a group of 16 rows; ws is the bytes of one group; nr is a multiple of 16.
template <class K>
void gemm_x16(int n, int nr, int nc, const void* vw, size_t ws, const void* va, size_t as, float* out, size_t ldo) {
    if (nr <= 0 || nc <= 0) return;
    const int nb = n / K::kBlock;
    const auto* w = static_cast<const uint8_t*>(vw);
    const auto* a = static_cast<const uint8_t*>(va);
    thread_local typename K::Acts x;
    K::prep(nb, a, as, nc, x);
    constexpr int kC = K::kCols;
    const int groups = nr / kPackRows, tiles = (nc + kC - 1) / kC;
    const int lines = static_cast<int>((ws + 63) / 64);
    for (int g = 0; g < groups; ++g) {
        const uint8_t* wg = w + g * ws;
        float* o = out + g * kPackRows;
        // With several tiles per group, the first reads the group from memory and the rest from
        // L1: each tile asks for its share of the next group's lines, so the first tile of the next
        // group does not wait for memory. (A/B with the AVX-512 tiles' one integer chain per
        // activation row: Gemma 3's 32-sequence decode 401-462 -> 488-500 tok/s, two runs each;
        // its 262k-row head is most of that step.)
        auto fetch_next = [&](int t) {
            if (K::kStreams || tiles < 2 || g + 1 == groups) return;
            const uint8_t* nx = wg + ws;
            for (int l = t * lines / tiles, e = (t + 1) * lines / tiles; l < e; ++l) __builtin_prefetch(nx + 64 * l);
        };
        int c = 0, t = 0;
        for (; c + kC <= nc; c += kC, ++t) {
            fetch_next(t);
            K::template tile<kC>(nb, wg, a + c * as, as, x, c, o + c * ldo, ldo);
        }
        if (c < nc) {
            fetch_next(t);
            x16_tail<K, kC - 1>(nc - c, nb, wg, a + c * as, as, x, c, o + c * ldo, ldo);
        }
    }
}
