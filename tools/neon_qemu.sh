#!/usr/bin/env bash
# Cross-build the stand-alone kernel self-test for aarch64 (NEON + dotprod) and run it under
# qemu-user. Installs g++-aarch64-linux-gnu and qemu-user with apt-get when they are missing.
#   tools/neon_qemu.sh            # builds into build/neon-qemu, prints "N passed, M failed"
# Exit status: the self-test's (non-zero on any failure).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bdir="${BUILD_DIR:-$root/build/neon-qemu}"
cxx=aarch64-linux-gnu-g++
sysroot=/usr/aarch64-linux-gnu

if ! command -v "$cxx" >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q g++-aarch64-linux-gnu qemu-user
fi

gen=()
if command -v ninja >/dev/null; then gen=(-G Ninja); fi
cmake -S "$root" -B "$bdir" "${gen[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_SYSTEM_NAME=Linux \
  -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
  -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_FIND_ROOT_PATH="$sysroot" \
  -DTINYSERVE_PYTHON=OFF \
  -DTINYSERVE_KERNEL_SELFTEST=ON >&2
cmake --build "$bdir" -j2 --target kernel_selftest >&2
# -cpu max: an emulated core with dotprod (HWCAP_ASIMDDP), so the NEON table is available.
exec qemu-aarch64 -cpu max -L "$sysroot" "$bdir/kernel_selftest"
