#!/usr/bin/env bash
# What the GGUF tests (pytest -m gguf) need: llama-cpp-python built from its sdist into the project venv (CPU), and
# llama.cpp's own converter (convert_hf_to_gguf.py, its `conversion` package and gguf-py, from the same sdist) in
# .venv/share/llama.cpp, where `runner promote --gguf` finds it ($QA_LLAMA_CPP_DIR overrides), with sentencepiece,
# which the converter imports. Idempotent; says what it did.
# Run after `just bootstrap`. Needs cmake and a C++ compiler (installed from Debian when missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.3.36
SDIST_NAME="llama_cpp_python-${VERSION}.tar.gz"
SHARE=.venv/share/llama.cpp
PY=.venv/bin/python

if [ ! -x "$PY" ]; then
    echo "llamacpp-up: no .venv here; run 'just bootstrap' first" >&2
    exit 1
fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "llamacpp-up: installing Debian's ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "llamacpp-up: cmake and g++ already installed"
fi

installed_version() {
    "$PY" -c 'import llama_cpp; print(llama_cpp.__version__)' 2>/dev/null || true
}

# CPU flags: on x86-64 the AVX2/FMA/F16C level (x86-64-v3) explicitly. GGML_NATIVE=OFF alone turns every SIMD
# extension off (a build ~5x slower); -march=native would tie the venv to this CPU.
if [ "$(uname -m)" = "x86_64" ]; then
    DEFAULT_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
else
    DEFAULT_CMAKE_ARGS="-DGGML_NATIVE=ON"
fi
BUILD_ARGS="${CMAKE_ARGS:-$DEFAULT_CMAKE_ARGS} -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
STAMP=.venv/share/llama-cpp-python.build
STAMP_TEXT="llama-cpp-python $VERSION; CMAKE_ARGS=$BUILD_ARGS"

need_build=1
if [ "$(installed_version)" = "$VERSION" ] && [ "$(cat "$STAMP" 2>/dev/null || true)" = "$STAMP_TEXT" ]; then
    need_build=0
fi
need_share=1
if [ -f "$SHARE/convert_hf_to_gguf.py" ] && [ -d "$SHARE/gguf-py/gguf" ] && [ -d "$SHARE/conversion" ] \
    && grep -q "^llama-cpp-python $VERSION" "$SHARE/VERSION" 2>/dev/null; then
    need_share=0
fi

if "$PY" -c 'import sentencepiece' 2>/dev/null; then
    echo "llamacpp-up: sentencepiece already in .venv"
else
    echo "llamacpp-up: installing sentencepiece (imported by llama.cpp's converter) into .venv"
    "$PY" -m pip install --quiet 'sentencepiece>=0.1.98,<0.3.0'
fi

if [ "$need_build" = 0 ] && [ "$need_share" = 0 ]; then
    echo "llamacpp-up: llama-cpp-python $VERSION already in .venv; converter already in $SHARE"
    exit 0
fi

# The sdist: a local copy when one was given ($QA_LLAMA_CPP_SDIST), else downloaded from PyPI.
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -n "${QA_LLAMA_CPP_SDIST:-}" ] && [ -f "$QA_LLAMA_CPP_SDIST" ]; then
    echo "llamacpp-up: using the sdist $QA_LLAMA_CPP_SDIST"
    cp -- "$QA_LLAMA_CPP_SDIST" "$work/$SDIST_NAME"
else
    echo "llamacpp-up: downloading the llama-cpp-python $VERSION sdist from PyPI"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$VERSION"
fi
sdist="$work/$SDIST_NAME"
if [ ! -f "$sdist" ]; then
    echo "llamacpp-up: expected $SDIST_NAME, got: $(ls "$work")" >&2
    exit 1
fi

if [ "$need_build" = 1 ]; then
    echo "llamacpp-up: building llama-cpp-python $VERSION (CPU: $BUILD_ARGS) into .venv; this takes minutes"
    start=$(date +%s)
    rm -f -- "$STAMP"
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" CMAKE_ARGS="$BUILD_ARGS" \
        "$PY" -m pip install --quiet --no-cache-dir --force-reinstall --no-deps "$sdist"
    # its dependencies (pip leaves those already satisfied alone)
    "$PY" -m pip install --quiet 'typing-extensions>=4.5.0' 'numpy>=1.20.0' 'diskcache>=5.6.1' 'jinja2>=2.11.3'
    got="$(installed_version)"
    if [ "$got" != "$VERSION" ]; then
        echo "llamacpp-up: llama_cpp does not import at $VERSION after the build (got '${got}')" >&2
        exit 1
    fi
    mkdir -p -- "$(dirname "$STAMP")"
    echo "$STAMP_TEXT" >"$STAMP"
    echo "llamacpp-up: llama-cpp-python $got built in $(( $(date +%s) - start )) s"
else
    echo "llamacpp-up: llama-cpp-python $VERSION already in .venv"
fi

if [ "$need_share" = 1 ]; then
    pkg="llama_cpp_python-${VERSION}"
    top="$pkg/vendor/llama.cpp"
    tar -xzf "$sdist" -C "$work" "$top/convert_hf_to_gguf.py" "$top/conversion" "$top/gguf-py" "$top/LICENSE"
    # The vendored llama.cpp commit, from the sdist's git metadata (when it ships it).
    commit="$(tar -xzOf "$sdist" "$pkg/.git/modules/vendor/llama.cpp/HEAD" 2>/dev/null | head -c 40 || true)"
    tmp_share="$SHARE.tmp.$$"
    rm -rf -- "$tmp_share"
    mkdir -p -- "$tmp_share"
    cp -- "$work/$top/convert_hf_to_gguf.py" "$work/$top/LICENSE" "$tmp_share/"
    cp -r -- "$work/$top/conversion" "$tmp_share/conversion"
    cp -r -- "$work/$top/gguf-py" "$tmp_share/gguf-py"
    echo "llama-cpp-python $VERSION, llama.cpp ${commit:-unknown commit}" >"$tmp_share/VERSION"
    rm -rf -- "$SHARE"
    mv -- "$tmp_share" "$SHARE"
    echo "llamacpp-up: llama.cpp's converter and gguf-py in $SHARE"
else
    echo "llamacpp-up: converter already in $SHARE"
fi
