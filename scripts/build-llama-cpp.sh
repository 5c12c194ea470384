#!/usr/bin/env bash
# Builds llama.cpp, the baseline every speed and exactness figure is compared against, from the
# source vendored in the PyPI sdist of llama-cpp-python 0.3.36 (model hubs and GitHub are out of
# reach; PyPI is not). Two CPU builds, both with GGML_NATIVE=OFF and explicit instruction sets so
# a figure always says which kernels llama.cpp ran:
#
#   .bench/llama.cpp/avx512/build/bin   AVX-512 F/BW/VL/VNNI/BF16 + AVX2/FMA/F16C, AMX off
#   .bench/llama.cpp/avx2/build/bin     AVX2/FMA/F16C only
#
# AMX stays off: on VMs whose hypervisor does not enable it, llama.cpp's AMX path faults on the
# first prompt. Each build holds llama-bench, llama-quantize, llama-server, llama-tokenize and the
# shared libraries. The Python binding (llama_cpp, pure ctypes) comes from the same sdist:
#   PYTHONPATH=.bench/llama.cpp/src LLAMA_CPP_LIB_PATH=.bench/llama.cpp/avx512/build/bin python3 ...
# so no third build is needed.
#
# Usage: scripts/build-llama-cpp.sh [avx512|avx2|all]   (default: all the CPU can run)
# Skips a variant whose binaries are already there. ~10 min per variant on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
URL=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-$VERSION.tar.gz
ROOT=.bench/llama.cpp
SRC=$ROOT/src
TARGETS=(llama-bench llama-quantize llama-server llama-tokenize llama)

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cmake; then
  echo "cmake is missing: installing Debian's cmake (needs root or sudo)" >&2
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get install -y -qq cmake >/dev/null
fi

fetch_source() {
  [ -f "$SRC/.complete" ] && return
  mkdir -p "$ROOT"
  local tarball=$ROOT/llama_cpp_python-$VERSION.tar.gz
  if ! { [ -f "$tarball" ] && echo "$SHA256  $tarball" | sha256sum --check --status; }; then
    echo "downloading llama-cpp-python $VERSION sdist from PyPI (77 MB)..." >&2
    curl -fsSL --retry 3 -o "$tarball.tmp" "$URL"
    echo "$SHA256  $tarball.tmp" | sha256sum --check --status \
      || { echo "error: SHA-256 of $tarball does not match $SHA256" >&2; exit 1; }
    mv "$tarball.tmp" "$tarball"
  fi
  rm -rf "$SRC" "$ROOT/unpack"
  mkdir -p "$ROOT/unpack"
  tar xzf "$tarball" -C "$ROOT/unpack"
  mv "$ROOT/unpack/llama_cpp_python-$VERSION" "$SRC"
  rmdir "$ROOT/unpack"
  touch "$SRC/.complete"
}

build() {
  local variant=$1
  shift
  local out=$ROOT/$variant
  if [ -f "$out/.complete" ]; then
    echo "llama.cpp $variant present: $out/build/bin" >&2
    return
  fi
  echo "building llama.cpp ($variant) into $out ..." >&2
  cmake -S "$SRC/vendor/llama.cpp" -B "$out/build" -G "$(need ninja && echo Ninja || echo 'Unix Makefiles')" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=OFF \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
    "$@" >"$out.configure.log" 2>&1 \
    || { tail -30 "$out.configure.log" >&2; exit 1; }
  cmake --build "$out/build" --target "${TARGETS[@]}" -j "$(nproc)" >"$out.build.log" 2>&1 \
    || { tail -30 "$out.build.log" >&2; exit 1; }
  touch "$out/.complete"
  echo "llama.cpp $variant ready: $out/build/bin" >&2
}

X86_COMMON=(-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
has_flag() { grep -qw "$1" /proc/cpuinfo; }

want=${1:-all}
fetch_source
case "$want" in
  avx512)
    build avx512 "${X86_COMMON[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON ;;
  avx2)
    build avx2 "${X86_COMMON[@]}" -DGGML_AVX512=OFF ;;
  all)
    if has_flag avx512f && has_flag avx512_vnni && has_flag avx512bw && has_flag avx512vl; then
      build avx512 "${X86_COMMON[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
    else
      echo "llama.cpp avx512 SKIPPED: this CPU lacks AVX-512 F/BW/VL/VNNI" >&2
    fi
    build avx2 "${X86_COMMON[@]}" -DGGML_AVX512=OFF ;;
  *) echo "usage: $0 [avx512|avx2|all]" >&2; exit 2 ;;
esac
