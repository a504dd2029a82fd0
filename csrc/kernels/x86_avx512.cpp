// x86_avx512.cpp — AVX512 kernels (work in progress: scalar kernels where not yet vectorised).
#include "kernels/kernels.h"

namespace ts {
namespace {

IsaTable make_table() {
    IsaTable t = *isa_table_scalar();
    t.isa = Isa::AVX512;
    return t;
}

}  // namespace

const IsaTable* isa_table_avx512() {
    static const IsaTable table = make_table();
    return &table;
}

}  // namespace ts
