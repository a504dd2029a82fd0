#!/usr/bin/env bash
# The CUDA build without a GPU (CI): configure with TINYSERVE_CUDA=ON, compile every .cu file for
# one architecture, run the CUDA block arithmetic on the CPU against the scalar reference
# (tests/cuda/blocks_selftest.cu), and run tests/cuda against the CUDA-built extension: it must load
# without a driver and say why --device cuda cannot be used (the GPU tests skip, naming why).
#   tools/cuda_build_check.sh            # exit 0: all passed; 2: no nvcc here (nothing checked)
# TINYSERVE_CUDA_ARCH (default 80) picks the one architecture; the build lands in build/ci-cuda.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if ! command -v nvcc >/dev/null; then
  echo "cuda: nvcc not found; the CUDA build is NOT checked"
  exit 2
fi
py="${PYTHON:-python3}"
bdir="$root/build/ci-cuda"
arch="${TINYSERVE_CUDA_ARCH:-80}"
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTINYSERVE_CUDA=ON -DTINYSERVE_CUDA_SELFTEST=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$bdir/py/tinyserve" >/dev/null
cmake --build "$bdir" -j"$(nproc)"
# every .cu file of csrc/cuda was compiled (a source list that forgot one would pass silently)
for cu in csrc/cuda/*.cu; do
  obj="$(find "$bdir" -name "$(basename "$cu").o" | head -1)"
  [ -n "$obj" ] || { echo "cuda: $cu was not compiled"; exit 1; }
done
echo "cuda: every csrc/cuda/*.cu compiled for sm_$arch ($(nvcc --version | tail -1))"
"$bdir/cuda_blocks_selftest"
PYTHONPATH="$root/server:$bdir/py" "$py" -m pytest -q -p no:cacheprovider tests/cuda
