#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-bench, llama-batched-bench, llama-perplexity, llama-tokenize,
# llama-server) from the source that PyPI's llama-cpp-python sdist vendors (or LLAMA_CPP_SRC, an unpacked
# tree), for side-by-side baselines. Nothing is installed;
# the binaries land in build/llamacpp/bin. Needs cmake, ninja and a C++ compiler (~10 min on 2 cores).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ver="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
work="$root/build/llamacpp"
mkdir -p "$work"
if [ ! -d "$work/src" ] && [ -n "${LLAMA_CPP_SRC:-}" ]; then   # an unpacked source elsewhere (read-only)
  ln -s "$LLAMA_CPP_SRC" "$work/src"
fi
if [ ! -d "$work/src" ]; then
  python3 -m pip download --no-deps --no-binary :all: --no-build-isolation -q -d "$work" "llama-cpp-python==$ver"
  tar xzf "$work/llama_cpp_python-$ver.tar.gz" -C "$work"
  mv "$work/llama_cpp_python-$ver/vendor/llama.cpp" "$work/src"
fi
# -march=native, except where the CPU advertises AMX: on a Xeon with amx_tile/amx_int8 (2026-12-02)
# this llama.cpp's AMX matmul crashed at its first ldtilecfg (llama-bench died with SIGILL/SIGSEGV;
# llama.cpp issue 20824, and its open PR 26954: the tile config on the stack is optimized away, and
# worker threads never ask for the tile state), while AMX itself ran there. So the same ISA is named
# flag by flag without AMX (LLAMA_CPP_AMX=1 keeps -march=native).
isa=(-DGGML_NATIVE=ON)
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null && [ "${LLAMA_CPP_AMX:-0}" != 1 ]; then
  has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
  isa=(-DGGML_NATIVE=OFF -DGGML_SSE42="$(has sse4_2)" -DGGML_F16C="$(has f16c)" -DGGML_FMA="$(has fma)"
    -DGGML_BMI2="$(has bmi2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)" -DGGML_AVX_VNNI="$(has avx_vnni)"
    -DGGML_AVX512="$(has avx512bw)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
    -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  echo "build_llamacpp: this CPU advertises AMX; building without it: ${isa[*]}" >&2
fi
cmake -S "$work/src" -B "$work/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release "${isa[@]}" \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$work/bin" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$work/bin" >/dev/null
cmake --build "$work/cmake" -j"$(nproc)" --target llama-bench llama-batched-bench llama-perplexity llama-tokenize \
  llama-server
# recent llama.cpp sets its own output folder (cmake/bin); expose it as bin/ either way
if [ ! -x "$work/bin/llama-bench" ] && [ -x "$work/cmake/bin/llama-bench" ]; then
  rm -rf "$work/bin"
  ln -s cmake/bin "$work/bin"
fi
echo "$work/bin"
