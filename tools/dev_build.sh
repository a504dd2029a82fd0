#!/usr/bin/env bash
# Incremental developer build of the C++ core without reinstalling the package.
#   eval "$(tools/dev_build.sh NAME)"   # builds into build/dev-NAME and exports PYTHONPATH
# The extension lands in build/dev-NAME/py/tinyserve/; tinyserve/__init__.py extends its
# package path so `import tinyserve` from server/ finds it.
set -euo pipefail
name="${1:-default}"
root="$(cd "$(dirname "$0")/.." && pwd)"
bdir="$root/build/dev-$name"
py="${PYTHON:-python3}"
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$bdir/py/tinyserve" >&2
cmake --build "$bdir" -j2 >&2
echo "export PYTHONPATH=\"$root/server:$bdir/py\""
