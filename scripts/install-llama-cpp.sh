#!/usr/bin/env bash
# Installs the pinned llama-cpp-python used by scripts/llama_cpp_bench.py, the
# llama.cpp baseline our Rust engine is compared against. pip builds llama.cpp
# from source (~20 min on 2 cores): GGML_NATIVE=ON compiles with -march=native,
# so the build matches this machine's CPU (AVX2/FMA); CPU backend only.
# Skips the build when that exact version already imports.
set -euo pipefail
VERSION=0.3.36
PY=${PYTHON:-python3}

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already installed"
    exit 0
fi
CMAKE_ARGS="-DGGML_NATIVE=ON ${CMAKE_ARGS:-}" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip install --no-cache-dir "llama-cpp-python==$VERSION"
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
