#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-perplexity, llama-bench, llama-simple, llama-tokenize) from the
# llama-cpp-python sdist, whose vendor/llama.cpp is llama.cpp itself, and print the directory holding them.
#
#   tools/llama_cpp.sh            # builds once, then reuses the cached binaries
#
# Cache: ${QCOMPILE_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/qcompile}/llama.cpp/<version>-<flags hash>/bin. The flags
# are chosen from this CPU: GGML_NATIVE=OFF with AVX2/FMA/F16C always, AVX-512 (F, VBMI, VNNI, BF16) where the CPU
# has it, AMX off (a native AMX build dies with an illegal instruction on some Sapphire Rapids machines). The Python
# bindings are not built: only llama.cpp's own tools. Every line but the last goes to stderr; the last line on stdout
# is the bin directory. Environment: PYTHON (runs pip download), LLAMA_CPP_PYTHON_VERSION, LLAMA_CPP_JOBS (2),
# LLAMA_CPP_SDIST_DIR (a folder already holding the sdist: copied instead of downloaded).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
JOBS="${LLAMA_CPP_JOBS:-2}"
TARGETS=(llama-perplexity llama-bench llama-simple llama-tokenize)

log() { echo "llama_cpp.sh: $*" >&2; }

cache_root="${QCOMPILE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/qcompile}"
base="$cache_root/llama.cpp"

has() { grep -qw "$1" /proc/cpuinfo; }
flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=ON
       -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
       -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
       -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
       -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF)
if has avx512f && has avx512bw && has avx512vl; then
    flags+=(-DGGML_AVX512=ON)
    has avx512vbmi && flags+=(-DGGML_AVX512_VBMI=ON)
    has avx512_vnni && flags+=(-DGGML_AVX512_VNNI=ON)
    has avx512_bf16 && flags+=(-DGGML_AVX512_BF16=ON)
fi
has avx_vnni && flags+=(-DGGML_AVX_VNNI=ON)
hash=$(printf '%s\n' "$VERSION" "${TARGETS[@]}" "${flags[@]}" | sha256sum | cut -c1-12)
root="$base/$VERSION-$hash"
bin="$root/bin"

if [[ -f "$bin/.complete" ]]; then
    log "cached: $bin"
    echo "$bin"
    exit 0
fi

mkdir -p "$root"
sdist="$base/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    local_copy=$(ls "${LLAMA_CPP_SDIST_DIR:-/nonexistent}/llama_cpp_python-$VERSION.tar.gz" 2>/dev/null || true)
    if [[ -n "$local_copy" ]]; then
        cp "$local_copy" "$sdist"
    else
        log "fetching llama-cpp-python==$VERSION (sdist)"
        "$PY" -m pip download -q --no-deps --no-binary :all: -d "$base" "llama-cpp-python==$VERSION"
    fi
fi
src="$root/src"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
    log "unpacking $sdist"
    rm -rf "$src" "$root/unpack"
    mkdir -p "$root/unpack"
    tar xzf "$sdist" -C "$root/unpack" "llama_cpp_python-$VERSION/vendor/llama.cpp"
    mv "$root/unpack/llama_cpp_python-$VERSION/vendor/llama.cpp" "$src"
    rm -rf "$root/unpack"
fi

log "configuring: ${flags[*]}"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$src" -B "$root/build" "${generator[@]}" "${flags[@]}" >"$root/configure.log" 2>&1 \
    || { tail -n 30 "$root/configure.log" >&2; log "configure failed (log: $root/configure.log)"; exit 1; }
log "building ${TARGETS[*]} with -j$JOBS at nice 19 (15-30 minutes on 2 cores; log: $root/build.log)"
nice -n 19 cmake --build "$root/build" -j"$JOBS" --target "${TARGETS[@]}" >"$root/build.log" 2>&1 \
    || { tail -n 30 "$root/build.log" >&2; log "build failed (log: $root/build.log)"; exit 1; }

mkdir -p "$bin"
for t in "${TARGETS[@]}"; do
    cp "$root/build/bin/$t" "$bin/$t"
done
printf '%s\n' "${flags[@]}" >"$bin/flags.txt"
touch "$bin/.complete"
log "built: $bin"
echo "$bin"
