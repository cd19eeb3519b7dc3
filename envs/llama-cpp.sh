#!/usr/bin/env bash
# llama.cpp for `blockpruner export-gguf` and its tests: llama-cpp-python built once from its
# PyPI sdist (which vendors llama.cpp and its converter), the wheel kept in a cache, installed
# into the active Python, and llama.cpp's convert_hf_to_gguf.py unpacked beside it.
#
#   bash envs/llama-cpp.sh          # build if not cached (about 3 min on 2 idle cores), install
#
# Cache: $BLOCKPRUNER_CACHE (default ~/.cache/blockpruner)/llama-cpp-python-$VERSION/: llama.cpp/
# (the converter with its conversion/ and gguf-py/ folders; export-gguf finds it there) and
# wheel-<key>/ (built for this CPU's instruction sets, so keyed by the build flags).
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${BLOCKPRUNER_CACHE:-$HOME/.cache/blockpruner}/llama-cpp-python-$VERSION"
PY="${PYTHON:-python}"
# The Python bindings need only libllama and libggml: no server, tools, tests or multimodal library.
# The instruction sets are this CPU's, named one by one instead of GGML_NATIVE, to leave out AMX:
# a native build on a CPU with AMX segfaulted here at the first decode of a q8_0 file.
cpuflags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
on() { case " $cpuflags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
isa="-DGGML_NATIVE=OFF -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_FMA=$(on fma) -DGGML_F16C=$(on f16c)"
isa="$isa -DGGML_BMI2=$(on bmi2) -DGGML_AVX_VNNI=$(on avx_vnni) -DGGML_AVX512=$(on avx512f)"
isa="$isa -DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni) -DGGML_AVX512_BF16=$(on avx512_bf16)"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF $isa}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cpu=$(echo "$(uname -m) $CMAKE_ARGS" | md5sum | cut -c1-8)
WHEELS="$CACHE/wheel-$cpu"
mkdir -p "$WHEELS"

wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ] || [ ! -f "$CACHE/llama.cpp/convert_hf_to_gguf.py" ]; then
    start=$(date +%s)
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$src"
    tar xzf "$src"/llama_cpp_python-"$VERSION".tar.gz -C "$src"
    vendor="$src/llama_cpp_python-$VERSION/vendor/llama.cpp"
    rm -rf "$CACHE/llama.cpp.tmp" && mkdir -p "$CACHE/llama.cpp.tmp"
    cp -r "$vendor/convert_hf_to_gguf.py" "$vendor/conversion" "$vendor/gguf-py" "$vendor/LICENSE" "$CACHE/llama.cpp.tmp/"
    rm -rf "$CACHE/llama.cpp" && mv "$CACHE/llama.cpp.tmp" "$CACHE/llama.cpp"
    if [ -z "$wheel" ]; then
        echo "llama-cpp.sh: building llama-cpp-python $VERSION from its sdist (minutes; cached in $CACHE)"
        "$PY" -m pip wheel -q --no-deps -w "$src/wheel" "$src"/llama_cpp_python-"$VERSION".tar.gz
        mv "$src"/wheel/llama_cpp_python-*.whl "$WHEELS/"
        wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
    fi
    echo "llama-cpp.sh: built in $(( $(date +%s) - start ))s"
fi
"$PY" -m pip install -q "$wheel" "sentencepiece>=0.2"   # sentencepiece: the converter reads SentencePiece vocabularies
echo "llama-cpp.sh: llama-cpp-python $VERSION from $wheel; converter $CACHE/llama.cpp/convert_hf_to_gguf.py"
