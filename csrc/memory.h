// memory.h — buffers the forward streams through, in transparent huge pages.
//
// At 4 KiB pages a sweep over a large buffer (decode over the weights, a prefill GEMM writing a
// [tokens, hidden] output) takes a TLB miss every 4 KiB; where the kernel's THP mode is "madvise"
// (common) only the advice asks for 2 MiB pages. alloc_streamed advises a buffer of 4 MiB or more
// before its first touch; TINYSERVE_HUGEPAGES=0 keeps 4 KiB pages. Freed with std::free.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstdint>
#include <memory>
#include <vector>

namespace ts {

uint8_t* alloc_streamed(size_t bytes);

// Owner of an alloc_streamed buffer (the packed weights, the KV arena).
struct StreamedFree {
    void operator()(uint8_t* p) const { std::free(p); }
};
using streamed_ptr = std::unique_ptr<uint8_t, StreamedFree>;

// std::vector's allocator over alloc_streamed (the run state's activations, the quantized ones).
template <class T>
struct StreamedAlloc {
    using value_type = T;
    StreamedAlloc() = default;
    template <class U>
    StreamedAlloc(const StreamedAlloc<U>&) {}
    T* allocate(size_t n) { return reinterpret_cast<T*>(alloc_streamed(n * sizeof(T))); }
    void deallocate(T* p, size_t) { std::free(p); }
    template <class U>
    bool operator==(const StreamedAlloc<U>&) const {
        return true;
    }
    template <class U>
    bool operator!=(const StreamedAlloc<U>&) const {
        return false;
    }
};
template <class T>
using streamed_vector = std::vector<T, StreamedAlloc<T>>;

}  // namespace ts
