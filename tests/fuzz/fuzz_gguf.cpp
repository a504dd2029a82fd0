// fuzz_gguf.cpp — libFuzzer harness for the GGUF reader (csrc/gguf.*): any bytes as a GGUF file.
//
// The reader either refuses the file with a GGUFError (checked by fuzz::check_error), or every
// promise gguf.h makes holds: each typed getter returns a value or a GGUFError naming the key,
// arrays hold the elements they declare, every tensor's bytes lie inside the file and have the
// size its type and shape give. Anything else (a crash, a sanitizer report, another exception,
// a leak, a hang) is a finding.
#include <cmath>
#include <cstdint>
#include <string>

#include "fuzz_common.h"
#include "gguf.h"
#include "quant.h"

namespace {

volatile uint64_t g_sink;  // keeps the reads below from being optimised away

void check_value(const ts::GGUFFile& g, const std::string& key, const ts::GGUFValue& v) {
    uint64_t sink = 0;
    // every typed getter on every key: a value, or a GGUFError naming the key
    auto typed = [&](auto get) {
        try {
            get();
        } catch (const ts::GGUFError& e) { fuzz::check_error(g.path(), e.what()); }
    };
    typed([&] { sink += (uint64_t)g.get_int(key, 0); });
    typed([&] { sink += (uint64_t)std::isnan(g.get_float(key, 0.0)); });
    typed([&] { sink += g.get_string(key, "").size(); });
    typed([&] { sink += g.get_bool(key, false); });
    if (g.find(key) != &v) fuzz::report("find() does not return the key's own value");
    if (v.is_array()) {
        size_t held = v.ai.size() + v.af.size() + v.as.size();
        const bool nested = v.elem_type == ts::GGUFType::ARRAY;
        if (nested ? held != 0 : held != v.array_len)
            fuzz::report("array '" + key.substr(0, 80) + "' declares " + std::to_string(v.array_len) +
                         " elements and holds " + std::to_string(held));
        for (const std::string& s : v.as) sink += s.size();
    }
    g_sink += sink;
}

void check_tensor(const ts::GGUFFile& g, const ts::GGUFTensorInfo& t) {
    if (g.find_tensor(t.name) != &t) fuzz::report("find_tensor() does not return the tensor's own info");
    const ts::DTypeInfo& info = ts::dtype_info(t.type);
    if (!info.name || info.block_size <= 0) fuzz::report("tensor of an unknown type was accepted");
    if (t.n_dims < 1 || t.n_dims > 4) fuzz::report("tensor with n_dims outside 1..4 was accepted");
    uint64_t n = 1;
    for (int d = 0; d < 4; d++) {
        if (t.ne[d] < 1) fuzz::report("tensor with a dimension < 1 was accepted");
        if (__builtin_mul_overflow(n, (uint64_t)t.ne[d], &n)) fuzz::report("tensor element count overflows");
    }
    if (t.ne[0] % info.block_size != 0) fuzz::report("row length is not a multiple of the block size");
    if (t.nbytes != (uint64_t)(n / info.block_size) * info.block_bytes)
        fuzz::report("tensor nbytes disagrees with its type and shape");
    if (t.nbytes != ts::row_bytes(t.type, t.ne[0]) * (n / (uint64_t)t.ne[0]))
        fuzz::report("tensor nbytes disagrees with row_bytes");
    uint64_t end = 0;
    if (__builtin_add_overflow(g.data_offset(), t.offset, &end) || __builtin_add_overflow(end, t.nbytes, &end) ||
        end > g.file_size())
        fuzz::report("tensor data lies outside the file");
    // first and last byte: inside the mapping, or this faults
    g_sink += t.data[0] + t.data[t.nbytes - 1];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string& path = fuzz::InputFile::get().write(data, size);
    try {
        ts::GGUFFile g(path);
        if (g.version() != 2 && g.version() != 3) fuzz::report("unsupported version accepted");
        const uint64_t al = g.alignment();
        if (al == 0 || (al & (al - 1)) != 0 || g.data_offset() % al != 0) fuzz::report("bad alignment accepted");
        for (const auto& [key, v] : g.metadata()) check_value(g, key, v);
        for (const ts::GGUFTensorInfo& t : g.tensors()) check_tensor(g, t);
        for (const ts::GGUFTensorInfo& t : g.tensors()) g.release(t.data, t.nbytes);
    } catch (const ts::GGUFError& e) { fuzz::check_error(path, e.what()); }
    return 0;
}
