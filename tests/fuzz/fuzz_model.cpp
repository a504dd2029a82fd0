// fuzz_model.cpp — libFuzzer harness for the model loader and the forward (csrc/model.*): any bytes
// as a GGUF model file.
//
// The loader either refuses the file with a GGUFError naming it, or the model it builds must run:
// two sequences prefilled together in one ragged batch, then one decode step each, over a small
// paged KV cache (block size 4, so both calls cross block edges), plus embed(). Nothing there may
// throw or crash whatever the weights hold (NaN and Inf included: they are numbers, not errors).
// The KV cache is f16, q8_0 or f32 by the input's length, so every path is reached.
//
// One compute thread unless TINYSERVE_THREADS says otherwise (reproducible runs; the box is
// shared). TINYSERVE_ISA and TINYSERVE_PACK pick the kernels as they do in the server.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_common.h"
#include "gguf.h"
#include "model.h"
#include "threadpool.h"

namespace {

constexpr int kBlockSize = 4;

void run_model(const ts::Model& m, const uint8_t* data, size_t size) {
    const ts::LlamaConfig& c = m.config();
    // the KV cache's element type from the input's size: f16, q8_0 (int8) or f32
    const ts::KVDType dtype = size & 1 ? ts::KVDType::F16 : size & 2 ? ts::KVDType::Q8_0 : ts::KVDType::F32;
    // sequence A: up to 5 prompt tokens, B: up to 3; then one more token each where the context allows
    const int ctx = c.context_length;
    const int na = std::min(5, ctx), nb = std::min(3, ctx);
    const int blocks_a = (std::min(na + 1, ctx) + kBlockSize - 1) / kBlockSize;
    const int blocks_b = (std::min(nb + 1, ctx) + kBlockSize - 1) / kBlockSize;
    ts::KVCache kv(c, kBlockSize, 0, blocks_a + blocks_b, dtype);
    std::vector<int32_t> table_a(blocks_a), table_b(blocks_b);
    for (int i = 0; i < blocks_a; i++) table_a[i] = i;
    for (int i = 0; i < blocks_b; i++) table_b[i] = blocks_a + i;
    auto token = [&](int i) { return (int32_t)((data[(size_t)i * 7919 % size] + 31 * i) % c.n_vocab); };

    // prefill: both prompts in one call, logits of each sequence's last row
    std::vector<int32_t> tokens;
    for (int i = 0; i < na + nb; i++) tokens.push_back(token(i));
    std::vector<ts::SeqSpan> seqs = {{na, 0, table_a.data(), blocks_a}, {nb, 0, table_b.data(), blocks_b}};
    std::vector<int32_t> rows = {na - 1, na + nb - 1};
    std::vector<float> logits(rows.size() * (size_t)c.n_vocab);
    m.forward(kv, tokens.data(), (int)tokens.size(), seqs, rows.data(), (int)rows.size(), logits.data());

    // decode: one new token for each sequence that still has room, B first this time
    tokens.clear();
    seqs.clear();
    if (nb < ctx) seqs.push_back({1, nb, table_b.data(), blocks_b}), tokens.push_back(token(100));
    if (na < ctx) seqs.push_back({1, na, table_a.data(), blocks_a}), tokens.push_back(token(101));
    if (!seqs.empty()) {
        rows.clear();
        for (int i = 0; i < (int)seqs.size(); i++) rows.push_back(i);
        m.forward(kv, tokens.data(), (int)tokens.size(), seqs, rows.data(), (int)rows.size(), logits.data());
    }

    std::vector<float> emb((size_t)2 * c.dim);
    const int32_t ends[2] = {0, c.n_vocab - 1};
    m.embed(ends, 2, emb.data());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    if (!std::getenv("TINYSERVE_THREADS")) ts::set_num_threads(1);
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string& path = fuzz::InputFile::get().write(data, size);
    std::unique_ptr<ts::Model> m;
    try {
        m = std::make_unique<ts::Model>(path);
    } catch (const ts::GGUFError& e) {
        fuzz::check_error(path, e.what());
        return 0;
    }
    run_model(*m, data, size);  // a model that loaded must run: any exception here is a finding
    return 0;
}
