#!/usr/bin/env bash
# Installs deltaserve's build and test dependencies (Debian 12 packages; the CUDA toolkit is
# installed separately) and builds the project into build/.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
PKGS=(build-essential cmake ninja-build pkg-config
      libgtest-dev libgmock-dev nlohmann-json3-dev libutf8proc-dev libcpp-httplib-dev libssl-dev
      zlib1g-dev xz-utils python3 clang libclang-rt-dev libpng-dev libjpeg62-turbo-dev libwebp-dev
      libavformat-dev libavcodec-dev libavutil-dev libswscale-dev)
command -v node >/dev/null 2>&1 || PKGS+=(nodejs)
command -v npm >/dev/null 2>&1 || PKGS+=(npm)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
