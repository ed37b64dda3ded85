#!/usr/bin/env bash
# Packs binaries built here for the GPU machine (which has CUDA but not the project's Debian libraries) into
# build-carry/gpu.tar.xz: the binaries (stripped) plus lib/ with every shared library they load from the system
# other than glibc, libstdc++ and libgcc (the GPU image has newer ones) and CUDA's (the GPU image has its own).
# Usage: tools/pack_gpu_carry.sh BUILD_DIR BINARY... ; then pass carry=["build-carry/gpu.tar.xz"] to the device
# run and, there: tar -C build-carry -xJf build-carry/gpu.tar.xz && bench/run_gpu.sh build-carry/gpu-carry ...
# (or LD_LIBRARY_PATH=build-carry/gpu-carry/lib build-carry/gpu-carry/deltaserve ...).
# PACK_NAME=x packs into build-carry/x/ and build-carry/x.tar.xz instead (several builds side by side in one run).
# Configure BUILD_DIR with -DCMAKE_CUDA_ARCHITECTURES=90-real -DDS_WITH_VIDEO=OFF to keep the archive small
# (FFmpeg's libavcodec pulls in ~170 MB of codec libraries; without it video requests are a 400 saying so).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$1; shift
NAME=${PACK_NAME:-}
DIR=${NAME:-gpu-carry}
TAR=${NAME:-gpu}.tar.xz
OUTDIR=$ROOT/build-carry/$DIR
# A binary older than a library of its build was not relinked after that library changed (a failed or partial
# build; session 18 carried such binaries to the GPU without noticing): refuse to pack it.
for b in "$@"; do
  for a in "$BUILD"/lib*.a; do
    if [ -e "$a" ] && [ "$a" -nt "$BUILD/$b" ]; then
      echo "pack_gpu_carry: $BUILD/$b is older than $a: rebuild it (ninja -C $BUILD $b) before packing" >&2
      exit 1
    fi
  done
done
rm -rf "$OUTDIR" "$ROOT/build-carry/$TAR" && mkdir -p "$OUTDIR/lib"
for b in "$@"; do
  cp "$BUILD/$b" "$OUTDIR/"
  strip "$OUTDIR/$b"
  ldd "$BUILD/$b" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libstdc++*|libgcc_s*|libpthread*|libdl.so*|librt.so*|ld-linux*|libcuda*|libcublas*|libcudart*) ;;
      *) cp -nL "$lib" "$OUTDIR/lib/" ;;
    esac
  done
done
# xz -9 (64 MiB dictionary): the test binaries share most of their code, so the archive shrinks ~3x against the
# default level (12 binaries: ~7 MB instead of ~20 MB), which leaves room under the device's 64 MiB tree limit.
XZ_OPT=${XZ_OPT:--9} tar -C "$ROOT/build-carry" -cJf "$ROOT/build-carry/$TAR" "$DIR"
ls -l "$ROOT/build-carry/$TAR" | awk '{print $5 " bytes: " $9}'
ls "$OUTDIR" "$OUTDIR/lib"
