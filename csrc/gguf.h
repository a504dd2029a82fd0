// gguf.h — GGUF reader: mmap, parse, validate. Model files are untrusted input: every count,
// length, offset, size, type and shape is checked against the file before it is used, and any
// problem is a GGUFError whose message names it (key or tensor name, the offending value, the
// byte offset where it was read). Nothing here ever reads outside the mapping.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>
#include "quant.h"

namespace ts {

class GGUFError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

enum class GGUFType : uint32_t {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    BOOL = 7,
    STRING = 8,
    ARRAY = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
};
const char* gguf_type_name(GGUFType t);

// One metadata value. Scalars: integers (and bools) in `i` (U64 stored bit-cast), floats in `f`,
// strings in `s`. Arrays: `elem_type` names the element type and the elements go to `ai`
// (integers/bools), `af` (floats) or `as` (strings). Nested arrays are validated, then stored
// empty with elem_type == ARRAY.
struct GGUFValue {
    GGUFType type = GGUFType::U8;
    GGUFType elem_type = GGUFType::U8;
    int64_t i = 0;
    double f = 0.0;
    std::string s;
    std::vector<int64_t> ai;
    std::vector<double> af;
    std::vector<std::string> as;
    uint64_t array_len = 0;

    bool is_array() const { return type == GGUFType::ARRAY; }
    bool is_int() const;    // any integer or bool scalar
    bool is_float() const;  // F32 / F64 scalar
};

struct GGUFTensorInfo {
    std::string name;
    DType type;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};  // ggml order: ne[0] is the contiguous (row) dimension
    uint64_t offset = 0;           // relative to the start of the data section
    uint64_t nbytes = 0;
    const uint8_t* data = nullptr;  // inside the mapping; valid while the GGUFFile lives
    int64_t n_elements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
};

// What parsing a GGUF file yields: the header, the metadata and the tensor table. A GGUFFile holds
// one once the whole file has validated.
struct GGUFContents {
    uint32_t version = 0;
    uint64_t alignment = 32;
    uint64_t data_offset = 0;                           // absolute offset of tensor data
    std::vector<std::pair<std::string, GGUFValue>> kv;  // in file order
    std::map<std::string, size_t> kv_index;
    std::vector<GGUFTensorInfo> tensors;
    std::map<std::string, size_t> tensor_index;
};

class GGUFFile {
  public:
    // mmap + parse + validate the whole header and tensor table. Throws GGUFError.
    explicit GGUFFile(const std::string& path);
    ~GGUFFile();
    GGUFFile(const GGUFFile&) = delete;
    GGUFFile& operator=(const GGUFFile&) = delete;

    uint32_t version() const { return c_.version; }
    uint64_t file_size() const { return size_; }
    uint64_t alignment() const { return c_.alignment; }
    uint64_t data_offset() const { return c_.data_offset; }  // absolute offset of tensor data
    const std::string& path() const { return path_; }

    // Metadata, in file order.
    const std::vector<std::pair<std::string, GGUFValue>>& metadata() const { return c_.kv; }
    const GGUFValue* find(const std::string& key) const;  // nullptr if absent
    // Typed getters: absent -> default; present with the wrong type -> GGUFError naming the key.
    int64_t get_int(const std::string& key, int64_t def) const;
    double get_float(const std::string& key, double def) const;  // accepts ints too
    std::string get_string(const std::string& key, const std::string& def) const;
    bool get_bool(const std::string& key, bool def) const;
    // Required variants: absent -> GGUFError("missing required metadata key '...'").
    int64_t require_int(const std::string& key) const;
    std::string require_string(const std::string& key) const;

    const std::vector<GGUFTensorInfo>& tensors() const { return c_.tensors; }
    const GGUFTensorInfo* find_tensor(const std::string& name) const;  // nullptr if absent

    // Tell the kernel the mapped bytes [p, p + n) will not be read again (whole pages inside the
    // range only): they leave this process's resident set; reading them later just faults them
    // back in from the file.
    void release(const void* p, size_t n) const;

  private:
    std::string path_;
    int fd_ = -1;
    const uint8_t* base_ = nullptr;
    uint64_t size_ = 0;
    GGUFContents c_;
};

}  // namespace ts
