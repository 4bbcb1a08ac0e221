#!/usr/bin/env bash
# Build llama-cpp-python from its PyPI sdist with CPU flags that work on this CPU, cache the
# wheel under $UPLIMIT_HOME/wheels, and install it into the given interpreter.
#
# Why not the default build: GGML_NATIVE=ON segfaults in llama_decode on Sapphire Rapids
# (AMX weight repacking, FACTS.md). We pick explicit ISA flags instead: AVX2/FMA/F16C as the
# floor, then each AVX-512 extension only where this CPU reports it (an AVX-512 build crashes
# on CPUs without it; an AMD EPYC has AVX-512 VNNI/BF16 but no AVX-VNNI). AMX stays off.
#
# UPLIMIT_LLAMA_ISA=avx2 forces the AVX2 floor (to test the suite on the narrowest path);
# the default, "best", takes everything the CPU has. Each flag set gets its own cached wheel.
# Encoder and decoder must run the same build: the build's feature list is part of the codec
# fingerprint (models/llama.py), so a mismatch is refused at the handshake.
set -euo pipefail
PY=${1:?usage: build_llama_wheel.sh PYTHON}
VERSION=0.3.36
HOME_DIR=${UPLIMIT_HOME:-$HOME/.cache/uplimit}
ISA=${UPLIMIT_LLAMA_ISA:-best}

has() { grep -qw "$1" /proc/cpuinfo; }

for f in avx avx2 fma f16c; do
  has "$f" || { echo "error: this CPU lacks $f; uplimit's llama.cpp build needs AVX2, FMA and F16C" >&2; exit 1; }
done
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
variant=avx2
case "$ISA" in
  avx2) ;;
  best)
    # GGML_AVX512 compiles with -mavx512{f,cd,vl,dq,bw}: all five must be there.
    if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
      flags+=" -DGGML_AVX512=ON"; variant+="-avx512"
      has avx512_vnni && { flags+=" -DGGML_AVX512_VNNI=ON"; variant+="-vnni"; }
      has avx512_bf16 && { flags+=" -DGGML_AVX512_BF16=ON"; variant+="-bf16"; }
      has avx512vbmi && { flags+=" -DGGML_AVX512_VBMI=ON"; variant+="-vbmi"; }
    fi
    has avx_vnni && { flags+=" -DGGML_AVX_VNNI=ON"; variant+="-avxvnni"; }
    ;;
  *) echo "error: UPLIMIT_LLAMA_ISA must be 'best' or 'avx2', not '$ISA'" >&2; exit 1 ;;
esac
flags+=" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
flags+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF"
flags+=" -DLLAMA_BUILD_SERVER=OFF"
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
echo "llama-cpp-python $VERSION: $variant build"
# Its runtime dependencies come pinned from requirements.lock, so no resolver runs here.
"$PY" -m pip install -q --no-deps --force-reinstall "$cache"/llama_cpp_python-*.whl
