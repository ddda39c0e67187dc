#!/usr/bin/env bash
# llama.cpp's llama-batched-bench as the CPU peer of `conveyor bench` (issue 12), run on the
# GGUF Conveyor's default model is imported from (SmolLM2-135M-Instruct Q4_1).
#
#   bash bench/llama_cpp.sh batch    64 sequences x 128 prompt -> 128 new (the decode-heavy shape)
#   bash bench/llama_cpp.sh single   1 sequence, 128 -> 128 (single-stream comparison)
#   bash bench/llama_cpp.sh smoke    1 sequence, 16 -> 4 (checks the binary runs; not a benchmark)
#   bash bench/llama_cpp.sh build    build only, print the binary's path
# Extra arguments after the mode go to llama-batched-bench (e.g. --output-format jsonl).
# Environment: THREADS (default 2), LLAMA_CPP_PY_VERSION (default 0.3.36).
#
# Source: no network but the package index, so llama.cpp comes from the llama-cpp-python sdist
# on PyPI, which vendors it. 0.3.36 vendors ggml-org/llama.cpp@0c1e57098 (its CHANGELOG; the
# sdist carries the submodule's git data, so `--version` reports "0.5.0-dev (build 1, commit
# 0c1e570)"; the script prints that line before each run). Only the llama-batched-bench target
# is built: Release, GGML_NATIVE (-march=native), OpenMP, no OpenSSL/CURL, no server, -j2.
# The sdist and build live under ${CONVEYOR_CACHE:-<repo>/.cache}/llama.cpp/, reused when present.
# Build time on the 2-core dev machine: 450 s (7.5 min; load average 3-5 from other jobs), for a
# 11 MB static binary at <cache>/llama.cpp/build-0.3.36/bin/llama-batched-bench. The sdist and
# its unpacked source take about 290 MB of the cache, the build folder about 70 MB.
#
# Flags: -c 16384 is 64 x (128 + 128) cells; batched-bench gives each of the -npl sequences its
# own n_ctx/n_seq_max slice, so that is the smallest context that runs 64 x 256 (a row whose
# N_KV exceeds -c is silently skipped). -b 2048 -ub 512 are the values its README uses. Prompts
# are random token ids, not shared (-pps off); flash attention and the f16 KV cache stay at their
# defaults (KV: 64 seqs x 256 cells x 30 layers = 360 MiB). S_TG (B*TG / decode time) is the
# number to set against Conveyor's decode tok/s; T s and S t/s cover the whole run.
set -euo pipefail

mode="${1:-batch}"
[ $# -gt 0 ] && shift
repo="$(cd "$(dirname "$0")/.." && pwd)"
version="${LLAMA_CPP_PY_VERSION:-0.3.36}"
threads="${THREADS:-2}"
root="${CONVEYOR_CACHE:-$repo/.cache}/llama.cpp"
src="$root/llama_cpp_python-$version/vendor/llama.cpp"
build="$root/build-$version"
bin="$build/bin/llama-batched-bench"

fetch_source() {
  [ -f "$src/CMakeLists.txt" ] && return
  mkdir -p "$root"
  local sdist="$root/llama_cpp_python-$version.tar.gz"
  if [ ! -f "$sdist" ]; then
    python -m pip download --no-deps --no-binary :all: --disable-pip-version-check \
      -d "$root" "llama-cpp-python==$version" >&2
  fi
  tar -xzf "$sdist" -C "$root"
}

build_bench() {
  [ -x "$bin" ] && return
  fetch_source
  local start=$SECONDS
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DBUILD_SHARED_LIBS=OFF >&2
  cmake --build "$build" --config Release --target llama-batched-bench -j2 >&2
  echo "llama_cpp.sh: built $bin in $((SECONDS - start)) s" >&2
}

model_path() {
  # The same file Conveyor imports its default model from (downloaded once into its cache).
  (cd "$repo" && PYTHONPATH="$repo" python -c \
    'from engine.loading.model_store import DEFAULT_LLM, fetch_from_wheel
print(fetch_from_wheel(*DEFAULT_LLM))')
}

run_bench() {
  local model
  model="$(model_path)"
  "$bin" --version 2>&1 | head -1 >&2
  set -x
  "$bin" -m "$model" -t "$threads" -b 2048 -ub 512 "$@"
}

build_bench
case "$mode" in
  build)  echo "$bin" ;;
  batch)  run_bench -c 16384 -npp 128 -ntg 128 -npl 64 "$@" ;;
  single) run_bench -c 512 -npp 128 -ntg 128 -npl 1 "$@" ;;
  smoke)  run_bench -c 512 -npp 16 -ntg 4 -npl 1 "$@" ;;
  *) echo "usage: bash bench/llama_cpp.sh [batch|single|smoke|build] [llama-batched-bench args]" >&2
     exit 2 ;;
esac
