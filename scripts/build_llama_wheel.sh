#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI sdist with CPU flags that work on this machine kind,
# cache the wheel under $UPLIMIT_HOME/wheels, and install it into the given interpreter.
#
# Why not the default build: GGML_NATIVE=ON segfaults in llama_decode on Sapphire Rapids
# (AMX weight repacking, FACTS.md). We pick explicit ISA flags instead, and only enable
# AVX-512 where the CPU has it, since an AVX-512 build crashes on CPUs without it.
set -euo pipefail
PY=${1:?usage: build_llama_wheel.sh PYTHON}
VERSION=0.3.36
HOME_DIR=${UPLIMIT_HOME:-$HOME/.cache/uplimit}

flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
flags+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
flags+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
flags+=" -DLLAMA_BUILD_SERVER=OFF"
variant=avx2
if grep -qw avx512f /proc/cpuinfo && grep -qw avx512_vnni /proc/cpuinfo \
    && grep -qw avx512_bf16 /proc/cpuinfo && grep -qw avx_vnni /proc/cpuinfo; then
  flags+=" -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON"
  variant=avx512
fi
cache="$HOME_DIR/wheels/llama-cpp-python-$VERSION-$variant"
mkdir -p "$cache"

if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION ($variant) from source: about 4 minutes on 2 cores"
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # --no-cache-dir: pip would otherwise reuse a wheel built earlier with other CMAKE_ARGS
  CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$tmp" \
    "llama-cpp-python==$VERSION"
  mv "$tmp"/llama_cpp_python-*.whl "$cache/"   # only a finished wheel enters the cache
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$cache"/llama_cpp_python-*.whl
# llama-cpp-python's own runtime dependencies (it was installed with --no-deps).
"$PY" -m pip install -q "numpy" "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3"
