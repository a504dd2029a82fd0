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
cmake -S "$work/src" -B "$work/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
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
