// dispatch.cpp — CPU feature detection and the choice of kernel table, made once at start-up.
// TINYSERVE_ISA=scalar|avx2|avx512|neon forces a path (tests run every one).
#include <cstdlib>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "kernels/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define TS_X86 1
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

namespace ts {

// ISA files not compiled in on this platform still link: their tables do not exist.
#ifndef TS_HAVE_X86_KERNELS
const IsaTable* isa_table_avx2() { return nullptr; }
const IsaTable* isa_table_avx512() { return nullptr; }
#endif
#ifndef TS_HAVE_NEON_KERNELS
const IsaTable* isa_table_neon() { return nullptr; }
#endif

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Scalar:
            return "scalar";
        case Isa::AVX2:
            return "avx2";
        case Isa::AVX512:
            return "avx512";
        case Isa::NEON:
            return "neon";
    }
    return "unknown";
}

namespace {

#ifdef TS_X86
uint64_t xgetbv0() {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<uint64_t>(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
    CpuFeatures f;
#ifdef TS_X86
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d))  // vendor string in ebx, edx, ecx: "Genu" "ineI" "ntel"
        f.intel = b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = (c >> 27) & 1;
    const bool avx = (c >> 28) & 1;
    const bool fma = (c >> 12) & 1;
    const bool f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return f;
    const uint64_t xcr0 = xgetbv0();
    const bool os_ymm = (xcr0 & 0x6) == 0x6;              // SSE + AVX state
    const bool os_zmm = os_ymm && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM_Hi256 + Hi16_ZMM
    if (!os_ymm) return f;
    f.fma = fma;
    f.f16c = f16c;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.avx2 = (b >> 5) & 1;
        if (os_zmm) {
            f.avx512f = (b >> 16) & 1;
            f.avx512dq = (b >> 17) & 1;
            f.avx512bw = (b >> 30) & 1;
            f.avx512vl = (b >> 31) & 1;
            f.avx512vnni = (c >> 11) & 1;
            if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512bf16 = (a >> 5) & 1;
        }
    }
#elif defined(__aarch64__)
    f.neon = true;
#if defined(__linux__)
    f.neon_dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    f.neon_dotprod = true;  // every Apple arm64 core has it
#endif
#endif
    return f;
}

const IsaTable* compiled_table(Isa isa) {
    switch (isa) {
        case Isa::Scalar:
            return isa_table_scalar();
        case Isa::AVX2:
            return isa_table_avx2();
        case Isa::AVX512:
            return isa_table_avx512();
        case Isa::NEON:
            return isa_table_neon();
    }
    return nullptr;
}

std::string available_list() {
    std::string s;
    for (Isa i : {Isa::Scalar, Isa::AVX2, Isa::AVX512, Isa::NEON}) {
        if (!isa_available(i)) continue;
        if (!s.empty()) s += ", ";
        s += isa_name(i);
    }
    return s;
}

}  // namespace

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

// A global, not a function-local static: the GEMV tiles read it once per call, and a local
// static's guard check there showed up at 0.6% of a one-sequence decode step (perf).
const bool g_gemv_prefetch = []() {
    const char* e = std::getenv("TINYSERVE_GEMV_PREFETCH");
    if (e && *e) return std::string(e) != "0";
    return cpu_features().intel;
}();

bool isa_available(Isa isa) {
    const CpuFeatures& f = cpu_features();
    bool cpu_ok = false;
    switch (isa) {
        case Isa::Scalar:
            cpu_ok = true;
            break;
        case Isa::AVX2:
            cpu_ok = f.avx2 && f.fma && f.f16c;
            break;
        case Isa::AVX512:
            cpu_ok = f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni;
            break;
        case Isa::NEON:
            cpu_ok = f.neon && f.neon_dotprod;
            break;
    }
    return cpu_ok && compiled_table(isa) != nullptr;
}

Isa best_isa() {
    for (Isa i : {Isa::AVX512, Isa::AVX2, Isa::NEON})
        if (isa_available(i)) return i;
    return Isa::Scalar;
}

Isa parse_isa(const char* name) {
    const std::string s = name ? name : "";
    for (Isa i : {Isa::Scalar, Isa::AVX2, Isa::AVX512, Isa::NEON})
        if (s == isa_name(i)) return i;
    throw std::invalid_argument("unknown ISA '" + s + "' (known: scalar, avx2, avx512, neon)");
}

const IsaTable& table_for(Isa isa) {
    if (!isa_available(isa))
        throw std::runtime_error(std::string("ISA '") + isa_name(isa) +
                                 "' is not available on this CPU/build (available: " + available_list() + ")");
    return *compiled_table(isa);
}

const IsaTable& active_table() {
    // Chosen once. If TINYSERVE_ISA is bad, every call throws the same clear error.
    static const IsaTable* table = []() {
        const char* env = std::getenv("TINYSERVE_ISA");
        if (!env || !*env) return &table_for(best_isa());
        Isa isa;
        try {
            isa = parse_isa(env);
        } catch (const std::invalid_argument&) {
            throw std::runtime_error(std::string("TINYSERVE_ISA='") + env +
                                     "' is not a known ISA (available: " + available_list() + ")");
        }
        if (!isa_available(isa))
            throw std::runtime_error(std::string("TINYSERVE_ISA='") + env +
                                     "' is not available on this CPU/build (available: " + available_list() + ")");
        return compiled_table(isa);
    }();
    return *table;
}

IsaTable make_isa_table(Isa isa, TypeKernels* store, std::initializer_list<TypeEntry> entries, OpsKernels ops) {
    const IsaTable& ref = *isa_table_scalar();
    IsaTable t = ref;
    t.isa = isa;
    for (const TypeEntry& e : entries) {
        const int id = static_cast<int>(e.type);
        TypeKernels& k = store[id];
        k = *ref.types[id];
        if (e.from_float) k.from_float = e.from_float;
        if (e.vec_dot) k.vec_dot = e.vec_dot;
        if (e.gemm) k.gemm = e.gemm;
        if (e.gemm_x16) k.gemm_x16 = e.gemm_x16;
        t.types[id] = &k;
    }
    // every op an ISA leaves out is the scalar one
    auto fill = [](auto& mine, auto theirs) {
        if (!mine) mine = theirs;
    };
    fill(ops.dot_f16_f32, ref.ops.dot_f16_f32);
    fill(ops.axpy_f16, ref.ops.axpy_f16);
    fill(ops.f32_to_f16, ref.ops.f32_to_f16);
    fill(ops.dot_f32, ref.ops.dot_f32);
    fill(ops.rmsnorm, ref.ops.rmsnorm);
    fill(ops.swiglu, ref.ops.swiglu);
    fill(ops.attn_scores_f16, ref.ops.attn_scores_f16);
    fill(ops.attn_accum_f16, ref.ops.attn_accum_f16);
    fill(ops.softmax, ref.ops.softmax);
    fill(ops.geglu_tanh, ref.ops.geglu_tanh);
    fill(ops.attn_scores_q8, ref.ops.attn_scores_q8);
    fill(ops.attn_accum_q8, ref.ops.attn_accum_q8);
    fill(ops.kv8_store, ref.ops.kv8_store);
    fill(ops.kv8_quantize_query, ref.ops.kv8_quantize_query);
    t.ops = ops;
    return t;
}

}  // namespace ts
