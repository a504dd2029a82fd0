// gguf.cpp — GGUF v2/v3 reader. The file is mapped read-only and parsed through a bounds-checked
// cursor: every read first checks the bytes that remain, every size is computed with overflow
// checks, and every error is a GGUFError naming the field, its value and its byte offset.
//
// Layout (little-endian):
//   header:  magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
//   kvs:     string key | u32 value_type | value            (string = u64 length + bytes)
//   tensors: string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset
//   padding to `general.alignment` (default 32), then the data section.
#include "gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <string>

namespace ts {

const char* gguf_type_name(GGUFType t) {
    switch (t) {
        case GGUFType::U8:
            return "U8";
        case GGUFType::I8:
            return "I8";
        case GGUFType::U16:
            return "U16";
        case GGUFType::I16:
            return "I16";
        case GGUFType::U32:
            return "U32";
        case GGUFType::I32:
            return "I32";
        case GGUFType::F32:
            return "F32";
        case GGUFType::BOOL:
            return "BOOL";
        case GGUFType::STRING:
            return "STRING";
        case GGUFType::ARRAY:
            return "ARRAY";
        case GGUFType::U64:
            return "U64";
        case GGUFType::I64:
            return "I64";
        case GGUFType::F64:
            return "F64";
    }
    return "UNKNOWN";
}

bool GGUFValue::is_int() const {
    switch (type) {
        case GGUFType::U8:
        case GGUFType::I8:
        case GGUFType::U16:
        case GGUFType::I16:
        case GGUFType::U32:
        case GGUFType::I32:
        case GGUFType::U64:
        case GGUFType::I64:
        case GGUFType::BOOL:
            return true;
        default:
            return false;
    }
}

bool GGUFValue::is_float() const { return type == GGUFType::F32 || type == GGUFType::F64; }

namespace {

using ull = unsigned long long;  // for printf's %llu

constexpr uint64_t kMaxKeyLen = 65535;  // GGUF spec: keys are at most 65535 bytes
constexpr uint64_t kMaxTensorNameLen = 65535;
constexpr uint64_t kMaxArrayElements = 1ull << 24;  // 16M: real vocabularies are < 1M
constexpr int kMaxArrayDepth = 4;                   // nested arrays deeper than this are refused
constexpr int kMaxDims = 4;
// Smallest possible encodings, used to reject absurd counts before allocating anything.
constexpr uint64_t kMinKVBytes = 8 + 1 + 4 + 1;                  // key len, 1-byte key, type, u8
constexpr uint64_t kMinTensorInfoBytes = 8 + 1 + 4 + 8 + 4 + 8;  // name, n_dims, ne[0], type, off

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

// Printable, bounded rendering of a (possibly hostile) name for error messages.
std::string quoted(const std::string& s) {
    std::string out = "'";
    size_t n = std::min<size_t>(s.size(), 80);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
            out += static_cast<char>(c);
        } else {
            out += fmt("\\x%02x", c);
        }
    }
    if (s.size() > n) out += "...";
    return out + "'";
}

size_t scalar_size(GGUFType t) {
    switch (t) {
        case GGUFType::U8:
        case GGUFType::I8:
        case GGUFType::BOOL:
            return 1;
        case GGUFType::U16:
        case GGUFType::I16:
            return 2;
        case GGUFType::U32:
        case GGUFType::I32:
        case GGUFType::F32:
            return 4;
        case GGUFType::U64:
        case GGUFType::I64:
        case GGUFType::F64:
            return 8;
        default:
            return 0;  // STRING, ARRAY: variable
    }
}

bool valid_type(uint32_t t) { return t <= static_cast<uint32_t>(GGUFType::F64); }

// Bounds-checked reader over [base, base + size). `ctx` says what is being parsed (for errors).
class Cursor {
  public:
    Cursor(const uint8_t* base, uint64_t size, const std::string& path) : base_(base), size_(size), path_(path) {}

    uint64_t pos() const { return pos_; }
    uint64_t remaining() const { return size_ - pos_; }
    std::string ctx;

    [[noreturn]] void fail(const std::string& msg) const { throw GGUFError(path_ + ": " + msg); }

    // Pointer to the next n bytes, advancing past them. `what` names the field.
    const uint8_t* take(uint64_t n, const char* what, int64_t index = -1) {
        if (n > remaining()) {
            std::string field = index >= 0 ? fmt("%s #%lld", what, (long long)index) : what;
            fail(fmt("truncated GGUF: %s%s%s at offset %llu needs %llu bytes, file has %llu", ctx.c_str(),
                     ctx.empty() ? "" : " ", field.c_str(), (ull)pos_, (ull)n, (ull)size_));
        }
        const uint8_t* p = base_ + pos_;
        pos_ += n;
        return p;
    }

    template <typename T>
    T read(const char* what, int64_t index = -1) {
        T v;
        std::memcpy(&v, take(sizeof(T), what, index), sizeof(T));
        return v;
    }

    // u64 length + bytes; the length is checked against `max_len` and the bytes that remain.
    std::string read_string(const char* what, uint64_t max_len, int64_t index = -1) {
        uint64_t at = pos_;
        uint64_t len = read<uint64_t>(what, index);
        if (len > max_len) {
            fail(fmt("%s%s%s length %llu at offset %llu exceeds the limit of %llu bytes", ctx.c_str(),
                     ctx.empty() ? "" : " ", what, (ull)len, (ull)at, (ull)max_len));
        }
        if (len > remaining()) {
            std::string field = index >= 0 ? fmt("%s #%lld", what, (long long)index) : what;
            fail(fmt(
                "truncated GGUF: %s%s%s length %llu at offset %llu but only %llu bytes remain "
                "(file has %llu)",
                ctx.c_str(), ctx.empty() ? "" : " ", field.c_str(), (ull)len, (ull)at, (ull)remaining(), (ull)size_));
        }
        const uint8_t* p = take(len, what, index);
        return std::string(reinterpret_cast<const char*>(p), len);
    }

  private:
    const uint8_t* base_;
    uint64_t size_;
    uint64_t pos_ = 0;
    const std::string& path_;
};

// Reads one scalar of type t as an integer (bit-cast for U64) or a double.
void read_scalar(Cursor& c, GGUFType t, int64_t* i, double* f, const char* what, int64_t index) {
    switch (t) {
        case GGUFType::U8:
            *i = c.read<uint8_t>(what, index);
            break;
        case GGUFType::I8:
            *i = c.read<int8_t>(what, index);
            break;
        case GGUFType::U16:
            *i = c.read<uint16_t>(what, index);
            break;
        case GGUFType::I16:
            *i = c.read<int16_t>(what, index);
            break;
        case GGUFType::U32:
            *i = c.read<uint32_t>(what, index);
            break;
        case GGUFType::I32:
            *i = c.read<int32_t>(what, index);
            break;
        case GGUFType::U64:
            *i = static_cast<int64_t>(c.read<uint64_t>(what, index));
            break;
        case GGUFType::I64:
            *i = c.read<int64_t>(what, index);
            break;
        case GGUFType::BOOL:
            *i = c.read<uint8_t>(what, index) != 0;
            break;
        case GGUFType::F32:
            *f = c.read<float>(what, index);
            break;
        case GGUFType::F64:
            *f = c.read<double>(what, index);
            break;
        default:
            c.fail("internal: read_scalar on a non-scalar type");
    }
}

// Array body after its u32 element type: u64 length + elements. Fills `out` (unless depth > 0,
// where nested arrays are only validated).
void read_array(Cursor& c, GGUFValue& out, int depth) {
    uint64_t type_at = c.pos();
    uint32_t et = c.read<uint32_t>("array element type");
    if (!valid_type(et)) {
        c.fail(fmt("%s has an array of unknown value type %u (at offset %llu)", c.ctx.c_str(), et, (ull)type_at));
    }
    GGUFType etype = static_cast<GGUFType>(et);
    uint64_t len_at = c.pos();
    uint64_t len = c.read<uint64_t>("array length");
    out.type = GGUFType::ARRAY;
    out.elem_type = etype;
    out.array_len = len;
    // Smallest encoding of one element, to reject impossible lengths before any allocation.
    uint64_t min_elem = scalar_size(etype);
    if (etype == GGUFType::STRING) min_elem = 8;
    if (etype == GGUFType::ARRAY) min_elem = 12;
    if (len > c.remaining() / min_elem) {
        c.fail(
            fmt("%s array of %s has length %llu at offset %llu, but only %llu bytes remain in "
                "the file (each element needs at least %llu)",
                c.ctx.c_str(), gguf_type_name(etype), (ull)len, (ull)len_at, (ull)c.remaining(), (ull)min_elem));
    }
    if (len > kMaxArrayElements) {
        c.fail(fmt("%s array length %llu at offset %llu exceeds the limit of %llu elements", c.ctx.c_str(), (ull)len,
                   (ull)len_at, (ull)kMaxArrayElements));
    }
    if (etype == GGUFType::ARRAY) {
        if (depth + 1 >= kMaxArrayDepth) {
            c.fail(fmt("%s arrays nested deeper than %d levels (at offset %llu)", c.ctx.c_str(), kMaxArrayDepth,
                       (ull)type_at));
        }
        GGUFValue inner;
        for (uint64_t k = 0; k < len; k++) {
            inner = GGUFValue();
            read_array(c, inner, depth + 1);
        }
        return;  // nested arrays are validated, then stored empty
    }
    bool store = depth == 0;
    if (etype == GGUFType::STRING) {
        if (store) out.as.reserve(len);
        for (uint64_t k = 0; k < len; k++) {
            std::string s = c.read_string("string element", UINT64_MAX, (int64_t)k);
            if (store) out.as.push_back(std::move(s));
        }
        return;
    }
    // Scalars: the whole body was checked above, so a plain loop cannot run out of bytes.
    bool is_f = etype == GGUFType::F32 || etype == GGUFType::F64;
    if (store) {
        if (is_f)
            out.af.reserve(len);
        else
            out.ai.reserve(len);
    }
    for (uint64_t k = 0; k < len; k++) {
        int64_t i = 0;
        double f = 0;
        read_scalar(c, etype, &i, &f, "array element", (int64_t)k);
        if (!store) continue;
        if (is_f)
            out.af.push_back(f);
        else
            out.ai.push_back(i);
    }
}

bool checked_mul(uint64_t a, uint64_t b, uint64_t* r) { return !__builtin_mul_overflow(a, b, r); }
bool checked_add(uint64_t a, uint64_t b, uint64_t* r) { return !__builtin_add_overflow(a, b, r); }

// Magic, version, counts. Returns {n_tensors, n_kv}, both proven possible for the file size.
std::pair<uint64_t, uint64_t> parse_header(Cursor& c, GGUFContents& p) {
    c.ctx = "header";
    const uint8_t* magic = c.take(4, "magic");
    if (std::memcmp(magic, "GGUF", 4) != 0) {
        c.fail(
            fmt("not a GGUF file: bad magic %02x %02x %02x %02x at offset 0 (expected "
                "'GGUF')",
                magic[0], magic[1], magic[2], magic[3]));
    }
    uint32_t v = c.read<uint32_t>("version");
    if (v != 0 && (v & 0xFFFFu) == 0) {
        c.fail(
            fmt("big-endian GGUF is not supported (version field reads 0x%08x; byte-swapped "
                "that is version %u)",
                v, __builtin_bswap32(v)));
    }
    if (v == 1) c.fail("GGUF version 1 is not supported (old format; re-convert the model)");
    if (v != 2 && v != 3) c.fail(fmt("unsupported GGUF version %u (supported: 2 and 3)", v));
    p.version = v;
    uint64_t n_tensors = c.read<uint64_t>("tensor_count");
    uint64_t n_kv = c.read<uint64_t>("kv_count");
    if (n_kv > c.remaining() / kMinKVBytes) {
        c.fail(
            fmt("kv_count %llu is impossible: only %llu bytes follow the header (each "
                "key/value needs at least %llu; truncated or corrupt file)",
                (ull)n_kv, (ull)c.remaining(), (ull)kMinKVBytes));
    }
    if (n_tensors > c.remaining() / kMinTensorInfoBytes) {
        c.fail(
            fmt("tensor_count %llu is impossible: only %llu bytes follow the header (each "
                "tensor info needs at least %llu; truncated or corrupt file)",
                (ull)n_tensors, (ull)c.remaining(), (ull)kMinTensorInfoBytes));
    }
    return {n_tensors, n_kv};
}

void parse_kvs(Cursor& c, GGUFContents& p, uint64_t n_kv) {
    p.kv.reserve(n_kv);
    for (uint64_t k = 0; k < n_kv; k++) {
        uint64_t key_at = c.pos();
        c.ctx = fmt("metadata kv #%llu", (ull)k);
        std::string key = c.read_string("key", kMaxKeyLen);
        if (key.empty()) c.fail(fmt("%s has an empty key (at offset %llu)", c.ctx.c_str(), (ull)key_at));
        c.ctx = "metadata key " + quoted(key);
        if (p.kv_index.count(key)) {
            c.fail(fmt("duplicate %s (second occurrence at offset %llu)", c.ctx.c_str(), (ull)key_at));
        }
        uint64_t type_at = c.pos();
        uint32_t t = c.read<uint32_t>("value type");
        if (!valid_type(t)) {
            c.fail(fmt("%s has unknown value type %u (at offset %llu)", c.ctx.c_str(), t, (ull)type_at));
        }
        GGUFValue v;
        v.type = static_cast<GGUFType>(t);
        if (v.type == GGUFType::STRING) {
            v.s = c.read_string("string value", UINT64_MAX);
        } else if (v.type == GGUFType::ARRAY) {
            read_array(c, v, 0);
        } else {
            read_scalar(c, v.type, &v.i, &v.f, "value", -1);
        }
        p.kv_index.emplace(key, p.kv.size());
        p.kv.emplace_back(std::move(key), std::move(v));
    }
}

// `general.alignment`: any integer type, a power of two of at least 8. The GGUF spec asks for a
// multiple of 8; a smaller one would let tensor data start at any byte, and the kernels read F32
// and F16 values and the blocks' f16 scales in place (tests/fuzz/fuzz_model with the scalar
// kernels reports misaligned float loads on a model written with alignment 1).
constexpr uint64_t kMinAlignment = 8;

void parse_alignment(Cursor& c, GGUFContents& p) {
    auto it = p.kv_index.find("general.alignment");
    if (it == p.kv_index.end()) return;
    const GGUFValue& a = p.kv[it->second].second;
    if (!a.is_int() || a.type == GGUFType::BOOL) {
        c.fail(fmt("metadata key 'general.alignment' has type %s, expected an integer (U32)", gguf_type_name(a.type)));
    }
    bool neg = a.i < 0 && a.type != GGUFType::U64;
    uint64_t al = static_cast<uint64_t>(a.i);
    if (neg || al == 0 || (al & (al - 1)) != 0 || al < kMinAlignment) {
        c.fail(
            fmt("metadata key 'general.alignment' is %lld, expected a nonzero power of two of at "
                "least %llu (GGUF: a multiple of 8)",
                (long long)a.i, (ull)kMinAlignment));
    }
    p.alignment = al;
}

GGUFTensorInfo parse_tensor_info(Cursor& c, const GGUFContents& p, uint64_t k) {
    uint64_t info_at = c.pos();
    c.ctx = fmt("tensor info #%llu", (ull)k);
    GGUFTensorInfo ti;
    ti.name = c.read_string("name", kMaxTensorNameLen);
    if (ti.name.empty()) { c.fail(fmt("%s has an empty name (at offset %llu)", c.ctx.c_str(), (ull)info_at)); }
    c.ctx = "tensor " + quoted(ti.name);
    if (p.tensor_index.count(ti.name)) {
        c.fail(fmt("duplicate %s (second occurrence at offset %llu)", c.ctx.c_str(), (ull)info_at));
    }
    uint64_t dims_at = c.pos();
    uint32_t n_dims = c.read<uint32_t>("n_dims");
    if (n_dims < 1 || n_dims > kMaxDims) {
        c.fail(fmt("%s has n_dims %u at offset %llu, expected 1..%d", c.ctx.c_str(), n_dims, (ull)dims_at, kMaxDims));
    }
    ti.n_dims = static_cast<int>(n_dims);
    uint64_t n_el = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t ne_at = c.pos();
        uint64_t ne = c.read<uint64_t>("dimension", d);
        if (ne == 0 || ne > static_cast<uint64_t>(INT64_MAX)) {
            c.fail(fmt("%s has dimension ne[%u] = %lld at offset %llu, expected >= 1", c.ctx.c_str(), d, (long long)ne,
                       (ull)ne_at));
        }
        if (!checked_mul(n_el, ne, &n_el) || n_el > static_cast<uint64_t>(INT64_MAX)) {
            c.fail(
                fmt("%s: the element count of its shape overflows 64 bits (ne[%u] = %llu)", c.ctx.c_str(), d, (ull)ne));
        }
        ti.ne[d] = static_cast<int64_t>(ne);
    }
    uint64_t type_at = c.pos();
    uint32_t type_id = c.read<uint32_t>("type");
    const DTypeInfo* info = type_id < static_cast<uint32_t>(kMaxDTypeId) ? &dtype_info(type_id) : nullptr;
    if (!info || !info->name || info->block_size <= 0 || info->block_bytes == 0) {
        c.fail(fmt("%s has unknown tensor type id %u (at offset %llu)", c.ctx.c_str(), type_id, (ull)type_at));
    }
    ti.type = static_cast<DType>(type_id);
    uint64_t bs = static_cast<uint64_t>(info->block_size);
    if (static_cast<uint64_t>(ti.ne[0]) % bs != 0) {
        c.fail(fmt("%s: row length ne[0] = %lld is not a multiple of the %s block size %d", c.ctx.c_str(),
                   (long long)ti.ne[0], info->name, info->block_size));
    }
    if (!checked_mul(n_el / bs, info->block_bytes, &ti.nbytes)) {
        c.fail(fmt("%s: its byte size overflows 64 bits (%llu elements of %s)", c.ctx.c_str(), (ull)n_el, info->name));
    }
    uint64_t off_at = c.pos();
    ti.offset = c.read<uint64_t>("data offset");
    if (ti.offset % p.alignment != 0) {
        c.fail(
            fmt("%s has data offset %llu (read at offset %llu) that is not a multiple of the "
                "alignment %llu",
                c.ctx.c_str(), (ull)ti.offset, (ull)off_at, (ull)p.alignment));
    }
    return ti;
}

// The data section starts at the end of the header, rounded up to the alignment. Every tensor
// must lie inside the file and no two may overlap.
void place_tensors(Cursor& c, GGUFContents& p, const uint8_t* base, uint64_t size) {
    c.ctx.clear();
    uint64_t end = c.pos();
    uint64_t rem = end % p.alignment;
    p.data_offset = end;
    if (rem != 0 && !checked_add(end, p.alignment - rem, &p.data_offset)) {
        c.fail("data section offset overflows 64 bits");
    }
    for (auto& ti : p.tensors) {
        uint64_t start = 0, stop = 0;
        if (!checked_add(p.data_offset, ti.offset, &start) || !checked_add(start, ti.nbytes, &stop) || stop > size) {
            c.fail(
                fmt("tensor %s data (offset %llu + data section start %llu, %llu bytes) lies "
                    "outside the file (file has %llu bytes)",
                    quoted(ti.name).c_str(), (ull)ti.offset, (ull)p.data_offset, (ull)ti.nbytes, (ull)size));
        }
        ti.data = base + start;
    }
    std::vector<const GGUFTensorInfo*> order;
    order.reserve(p.tensors.size());
    for (const auto& ti : p.tensors) order.push_back(&ti);
    std::sort(order.begin(), order.end(),
              [](const GGUFTensorInfo* a, const GGUFTensorInfo* b) { return a->offset < b->offset; });
    for (size_t k = 1; k < order.size(); k++) {
        const GGUFTensorInfo& prev = *order[k - 1];
        const GGUFTensorInfo& cur = *order[k];
        // no overflow: both ranges were checked against the file size above
        if (cur.offset < prev.offset + prev.nbytes) {
            c.fail(fmt("tensor %s data [%llu, %llu) overlaps tensor %s data [%llu, %llu)", quoted(cur.name).c_str(),
                       (ull)cur.offset, (ull)(cur.offset + cur.nbytes), quoted(prev.name).c_str(), (ull)prev.offset,
                       (ull)(prev.offset + prev.nbytes)));
        }
    }
}

GGUFContents parse_gguf(const uint8_t* base, uint64_t size, const std::string& path) {
    Cursor c(base, size, path);
    GGUFContents p;
    auto [n_tensors, n_kv] = parse_header(c, p);
    parse_kvs(c, p, n_kv);
    parse_alignment(c, p);
    p.tensors.reserve(n_tensors);
    for (uint64_t k = 0; k < n_tensors; k++) {
        GGUFTensorInfo ti = parse_tensor_info(c, p, k);
        p.tensor_index.emplace(ti.name, p.tensors.size());
        p.tensors.push_back(std::move(ti));
    }
    place_tensors(c, p, base, size);
    return p;
}

}  // namespace

GGUFFile::GGUFFile(const std::string& path) : path_(path) {
    auto fail = [&](const std::string& msg) {
        if (fd_ >= 0) ::close(fd_);
        fd_ = -1;
        throw GGUFError(path_ + ": " + msg);
    };
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) fail(fmt("cannot open GGUF file: %s", std::strerror(errno)));
    struct stat st;
    if (::fstat(fd_, &st) != 0) fail(fmt("cannot stat GGUF file: %s", std::strerror(errno)));
    if (S_ISDIR(st.st_mode)) fail("is a directory, not a GGUF file");
    if (!S_ISREG(st.st_mode)) fail("is not a regular file");
    if (st.st_size == 0) fail("empty file, not a GGUF file");
    size_ = static_cast<uint64_t>(st.st_size);
    void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (m == MAP_FAILED) fail(fmt("cannot mmap GGUF file: %s", std::strerror(errno)));
    ::close(fd_);  // the mapping keeps the file alive
    fd_ = -1;
    base_ = static_cast<const uint8_t*>(m);
    try {
        c_ = parse_gguf(base_, size_, path_);
    } catch (...) {
        ::munmap(const_cast<uint8_t*>(base_), size_);
        base_ = nullptr;
        throw;
    }
}

GGUFFile::~GGUFFile() {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
    if (fd_ >= 0) ::close(fd_);
}

const GGUFValue* GGUFFile::find(const std::string& key) const {
    auto it = c_.kv_index.find(key);
    return it == c_.kv_index.end() ? nullptr : &c_.kv[it->second].second;
}

namespace {
[[noreturn]] void wrong_type(const std::string& path, const std::string& key, const char* expected,
                             const GGUFValue& v) {
    std::string actual = gguf_type_name(v.type);
    if (v.is_array()) actual += std::string(" of ") + gguf_type_name(v.elem_type);
    throw GGUFError(path + ": metadata key " + quoted(key) + " has type " + actual + ", expected " + expected);
}
}  // namespace

int64_t GGUFFile::get_int(const std::string& key, int64_t def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (!v->is_int() || v->type == GGUFType::BOOL) wrong_type(path_, key, "an integer", *v);
    if (v->type == GGUFType::U64 && v->i < 0) {
        throw GGUFError(path_ + ": metadata key " + quoted(key) + " value " +
                        std::to_string(static_cast<uint64_t>(v->i)) + " does not fit in int64");
    }
    return v->i;
}

double GGUFFile::get_float(const std::string& key, double def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (v->is_float()) return v->f;
    if (v->is_int() && v->type != GGUFType::BOOL) {
        return v->type == GGUFType::U64 ? static_cast<double>(static_cast<uint64_t>(v->i)) : static_cast<double>(v->i);
    }
    wrong_type(path_, key, "a number", *v);
}

std::string GGUFFile::get_string(const std::string& key, const std::string& def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (v->type != GGUFType::STRING) wrong_type(path_, key, "STRING", *v);
    return v->s;
}

bool GGUFFile::get_bool(const std::string& key, bool def) const {
    const GGUFValue* v = find(key);
    if (!v) return def;
    if (v->type != GGUFType::BOOL) wrong_type(path_, key, "BOOL", *v);
    return v->i != 0;
}

int64_t GGUFFile::require_int(const std::string& key) const {
    if (!find(key)) throw GGUFError(path_ + ": missing required metadata key " + quoted(key));
    return get_int(key, 0);
}

std::string GGUFFile::require_string(const std::string& key) const {
    if (!find(key)) throw GGUFError(path_ + ": missing required metadata key " + quoted(key));
    return get_string(key, "");
}

const GGUFTensorInfo* GGUFFile::find_tensor(const std::string& name) const {
    auto it = c_.tensor_index.find(name);
    return it == c_.tensor_index.end() ? nullptr : &c_.tensors[it->second];
}

void GGUFFile::release(const void* p, size_t n) const {
    const auto* b = static_cast<const uint8_t*>(p);
    if (!base_ || b < base_ || b + n > base_ + size_) return;
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(b) + page - 1) / page * page;
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(b) + n) / page * page;
    if (hi > lo) ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

}  // namespace ts
