// backend.h — where the forward runs: the CPU (Model's own forward, the ISA kernel tables) or a
// CUDA device (csrc/cuda: the weights and the KV cache in device memory). Chosen once per Model;
// the scheduler, block manager, sampling and API above the core do not know which.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ts {

enum class Device { CPU = 0, CUDA = 1 };
const char* device_name(Device d);             // "cpu", "cuda"
Device parse_device(const std::string& name);  // throws std::invalid_argument on other names

// The device cannot be used here; the message says why (not built with CUDA, no driver, no
// device, too old a device).
struct DeviceError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

class Model;
class KVCache;
struct SeqSpan;

class Backend {
  public:
    virtual ~Backend() = default;
    virtual Device device() const = 0;
    virtual std::string description() const = 0;  // e.g. "cpu (avx2)", "cuda:0 NVIDIA H200 (sm_90, 140 GB)"
    // The forward of a batch Model::forward has already checked (same arguments, same contract).
    virtual void forward(KVCache& kv, const int32_t* tokens, int T, const std::vector<SeqSpan>& seqs,
                         const int32_t* logit_rows, int R, float* logits) = 0;
    // Device memory for a KV cache arena of `bytes`, zeroed (CPU: never called; the arena is host memory).
    virtual std::shared_ptr<uint8_t> alloc_kv(size_t bytes) {
        (void)bytes;
        return nullptr;
    }
    // Copy `bytes` inside a device arena from src_off to dst_off (KVCache::copy_block).
    virtual void copy_kv(uint8_t* arena, size_t dst_off, size_t src_off, size_t bytes) {
        (void)arena, (void)dst_off, (void)src_off, (void)bytes;
    }
};

// The CPU backend: Model::forward_cpu, bit for bit today's forward.
std::unique_ptr<Backend> make_cpu_backend(const Model& m);

// The CUDA backend (csrc/cuda/backend.cu; csrc/cuda/none.cpp when built without TINYSERVE_CUDA):
// uploads the weights once. Throws DeviceError naming why CUDA cannot be used, or GGUFError for a
// model the CUDA kernels do not cover.
std::unique_ptr<Backend> make_cuda_backend(const Model& m);
bool cuda_compiled();                   // was the extension built with TINYSERVE_CUDA
std::string cuda_status();              // "" when a usable CUDA device is there; else why not (one line)
std::string cuda_device_description();  // the device make_cuda_backend would use ("" if none)

}  // namespace ts
