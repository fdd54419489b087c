#!/usr/bin/env bash
# peer_llama_cpp.sh: vsup's CPU engine side by side with llama.cpp on the same random fp32
# weights, at the same thread count. Optional and run by hand (not in CI: it builds llama.cpp,
# minutes on a small machine, and its numbers need a quiet one).
#
#   bench/peer_llama_cpp.sh [--work DIR] [--threads N] [--runs R] [--json] [--help]
#
# Steps, each reusing what an earlier run left in the scratch folder:
#   1. npm installs node-llama-cpp (pinned below) into WORK/npm with --ignore-scripts and
#      --omit=optional: no install script runs, so no prebuilt binary or model is downloaded.
#      The package carries llama.cpp's source as a git bundle (llama/gitRelease.bundle, with the
#      release in llama/llama.cpp.info.json) plus patches it applies before building
#      (llama/patches/); both are used here as node-llama-cpp uses them.
#   2. cmake builds llama-bench from that source into WORK/build: CPU only (no CUDA, Metal,
#      Vulkan, BLAS), Release, -march=native (GGML_NATIVE), -j$(nproc). Then bench/peer/greedy.cpp
#      is compiled against the libllama it built (WORK/bin/peer_greedy). The build's output goes
#      to WORK/logs/build.log; the weights are written while it runs.
#   3. bench/peer/write_model.py writes one set of random weights in the shape of vsup's default
#      model (vsup-tiny-25m) as WORK/model/hf (config.json, model.safetensors, tokenizer files)
#      and as WORK/model/model-f32.gguf (all F32).
#   4. Greedy check: llama.cpp (peer_greedy: fp32 KV cache, no flash attention) decodes
#      GREEDY_TOKENS tokens from a fixed token-id prompt; vsup-logits runs the same prompt and
#      tokens through vsup's engine; the script fails unless vsup's arg-max is llama.cpp's token
#      at every step and every logit agrees within 1e-3 (they agree to about 1e-5).
#   5. Throughput at the same thread count: llama-bench -p 128,512 -n 128 -fa off,on -t N (its
#      defaults otherwise: f16 KV cache, batch 2048, micro-batch 512; each row takes the faster
#      flash-attention setting), and cpu_engine_bench --model WORK/model/hf --tp 1 (decode
#      batch 1, prefill 128 and 512).
#      Prints one markdown table with vsup / llama.cpp per row; --json prints one JSON object
#      instead (the table and the progress go to stderr).
#
# What is compared: decode is batch-1 forward passes (vsup: 32 steps after a 16-token prompt,
# logits every step, no sampling; llama-bench: 128 steps from an empty cache); prefill is one
# sequence of T tokens, logits for the last one only, in both. At this model's size the KV cache
# those steps read (at most 2 MiB) is small next to the weights (97 MiB) a step streams.
#
# Needs: bash, git, cmake, a C and C++ compiler, node and npm (registry access for the first
# run), python3, and vsup's build (build/engine/vsup-logits, build/bench/cpu_engine_bench:
# `ninja -C build engine/vsup-logits bench/cpu_engine_bench`). Writes nothing outside WORK (npm's
# cache included).
set -euo pipefail

NODE_LLAMA_CPP_VERSION=3.22.1   # the pinned package; its bundle is llama.cpp commit de3ff81
GREEDY_PROMPT=72,101,108,108,111,44,32,119,111,114,108,100,33,10   # "Hello, world!\n" as bytes
GREEDY_TOKENS=16

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEER="$REPO/bench/peer"
WORK="${TMPDIR:-/tmp}/vsup-peer-llama-cpp"
VSUP_BUILD="$REPO/build"
THREADS=$(nproc)
RUNS=5
JSON=0
# Any python3 works; one with NumPy writes the weights in a second rather than in 15.
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  for p in python3 /usr/bin/python3; do
    if "$p" -c 'import numpy' >/dev/null 2>&1; then PYTHON=$p; break; fi
  done
fi

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<EOF
Options:
  --work DIR        scratch folder (default: \${TMPDIR:-/tmp}/vsup-peer-llama-cpp, now $WORK)
  --vsup-build DIR  vsup's build folder (default: $REPO/build)
  --threads N       compute threads for both engines (default: nproc = $(nproc))
  --runs R          repetitions of each measurement, both engines (default: 5)
  --json            one JSON object on stdout (ratios *_vs_llama_cpp and the raw tok/s)
  -h, --help        this text
EOF
}

die() {
  echo "peer_llama_cpp.sh: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --work) [ $# -ge 2 ] || die "--work needs a folder"; WORK=$2; shift 2 ;;
    --work=*) WORK=${1#*=}; shift ;;
    --vsup-build) [ $# -ge 2 ] || die "--vsup-build needs a folder"; VSUP_BUILD=$2; shift 2 ;;
    --vsup-build=*) VSUP_BUILD=${1#*=}; shift ;;
    --threads) [ $# -ge 2 ] || die "--threads needs a number"; THREADS=$2; shift 2 ;;
    --threads=*) THREADS=${1#*=}; shift ;;
    --runs) [ $# -ge 2 ] || die "--runs needs a number"; RUNS=$2; shift 2 ;;
    --runs=*) RUNS=${1#*=}; shift ;;
    --json) JSON=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument \"$1\" (see --help)" ;;
  esac
done
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads: \"$THREADS\" is not a positive integer"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs: \"$RUNS\" is not a positive integer"
[ -n "$WORK" ] || die "--work: empty folder name"

# Progress and the human table go to stderr under --json, so that stdout is the JSON alone.
if [ "$JSON" = 1 ]; then exec 3>&2; else exec 3>&1; fi
say() { echo "== $*" >&2; }

# --- What this needs ------------------------------------------------------------------------
need() {  # need COMMAND WHAT-FOR
  command -v "$1" >/dev/null 2>&1 || die "\"$1\" not found: it is needed $2"
}
need git "to unpack llama.cpp's source from the package's git bundle"
need cmake "to build llama.cpp (llama-bench)"
need node "by npm (node-llama-cpp's package)"
need npm "to install node-llama-cpp@$NODE_LLAMA_CPP_VERSION"
need "$PYTHON" "to write the weights and compare the results (set \$PYTHON to another python3)"
CC=${CC:-$(command -v cc || command -v gcc || command -v clang || true)}
CXX=${CXX:-$(command -v c++ || command -v g++ || command -v clang++ || true)}
[ -n "$CC" ] || die "no C compiler (cc, gcc or clang) found: set \$CC"
[ -n "$CXX" ] || die "no C++ compiler (c++, g++ or clang++) found: set \$CXX"
VSUP_LOGITS="$VSUP_BUILD/engine/vsup-logits"
VSUP_BENCH="$VSUP_BUILD/bench/cpu_engine_bench"
for b in "$VSUP_LOGITS" "$VSUP_BENCH"; do
  [ -x "$b" ] || die "$b not found: build vsup first (ninja -C $VSUP_BUILD engine/vsup-logits bench/cpu_engine_bench)"
done
if command -v ninja >/dev/null 2>&1; then GENERATOR=Ninja; else GENERATOR="Unix Makefiles"; fi

# cpu_engine_bench's options differ between versions: use --threads/--json where it has them.
BENCH_HELP=$("$VSUP_BENCH" --help 2>&1 || true)
has_option() { grep -q -- "$1" <<<"$BENCH_HELP"; }
if ! has_option --threads && [ "$THREADS" != "$(nproc)" ]; then
  die "--threads $THREADS: this cpu_engine_bench has no --threads (it uses nproc = $(nproc) at TP 1)"
fi

mkdir -p "$WORK"/{npm,logs,bin,results} || die "cannot create the scratch folder $WORK"
WORK=$(cd "$WORK" && pwd)
LOGS="$WORK/logs"
export npm_config_cache="$WORK/npm-cache" npm_config_update_notifier=false \
  npm_config_fund=false npm_config_audit=false

# --- 1. node-llama-cpp ------------------------------------------------------------------------
PKG="$WORK/npm/node_modules/node-llama-cpp"
installed=$(node -p "require('$PKG/package.json').version" 2>/dev/null || true)
if [ "$installed" != "$NODE_LLAMA_CPP_VERSION" ]; then
  say "installing node-llama-cpp@$NODE_LLAMA_CPP_VERSION into $WORK/npm (no scripts, no prebuilt binaries)"
  npm install --prefix "$WORK/npm" --ignore-scripts --omit=optional --no-save \
    "node-llama-cpp@$NODE_LLAMA_CPP_VERSION" >"$LOGS/npm.log" 2>&1 ||
    { tail -20 "$LOGS/npm.log" >&2; die "npm install failed (log: $LOGS/npm.log)"; }
else
  say "node-llama-cpp@$NODE_LLAMA_CPP_VERSION already in $WORK/npm"
fi
BUNDLE="$PKG/llama/gitRelease.bundle"
[ -f "$BUNDLE" ] || die "$BUNDLE not found: node-llama-cpp@$NODE_LLAMA_CPP_VERSION no longer ships llama.cpp's source as a git bundle"
RELEASE=$(node -p "require('$PKG/llama/llama.cpp.info.json').tag" 2>/dev/null || echo unknown)
BUNDLE_HEAD=$(git bundle list-heads "$BUNDLE" | awk '$2 == "HEAD" {print $1}')
[ -n "$BUNDLE_HEAD" ] || die "$BUNDLE has no HEAD"

# --- 2. llama.cpp's source and build --------------------------------------------------------
SRC="$WORK/llama.cpp"
if [ -d "$SRC/.git" ] && [ "$(git -C "$SRC" rev-parse HEAD)" = "$BUNDLE_HEAD" ]; then
  say "llama.cpp source ($RELEASE, ${BUNDLE_HEAD:0:7}) already in $SRC"
else
  say "unpacking llama.cpp ($RELEASE, ${BUNDLE_HEAD:0:7}) from the package's git bundle"
  rm -rf "$SRC" "$WORK/build"
  git clone --quiet "$BUNDLE" "$SRC" 2>"$LOGS/clone.log" ||
    { cat "$LOGS/clone.log" >&2; die "git clone of $BUNDLE failed"; }
fi
# The patches node-llama-cpp applies before it builds (it skips one already in the source).
for patch in "$PKG"/llama/patches/*.diff; do
  [ -e "$patch" ] || continue
  if git -C "$SRC" apply --ignore-whitespace --reverse --check "$patch" 2>/dev/null; then
    continue  # already applied
  fi
  git -C "$SRC" apply --ignore-whitespace "$patch" ||
    die "node-llama-cpp's patch $(basename "$patch") does not apply to its own llama.cpp source"
done

BUILD="$WORK/build"
build_llama() {
  set -e
  local t0
  t0=$(date +%s)
  if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    cmake -S "$SRC" -B "$BUILD" -G "$GENERATOR" -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" \
      -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=ON
  fi
  cmake --build "$BUILD" --target llama-bench -j"$(nproc)"
  echo "built in $(( $(date +%s) - t0 )) s"
}
say "building llama-bench (CPU, Release, native, -j$(nproc)) in $BUILD; log: $LOGS/build.log"
build_llama >"$LOGS/build.log" 2>&1 &
BUILD_PID=$!

# --- 3. The weights, while llama.cpp builds ----------------------------------------------------
MODEL="$WORK/model"
say "writing the weights (vsup-tiny-25m's shape, seed 1) to $MODEL"
if ! "$PYTHON" "$PEER/write_model.py" --out "$MODEL" --preset vsup-tiny-25m --seed 1 >&2; then
  kill "$BUILD_PID" 2>/dev/null || true
  die "write_model.py failed"
fi
if ! wait "$BUILD_PID"; then
  tail -30 "$LOGS/build.log" >&2
  die "building llama.cpp failed (log: $LOGS/build.log)"
fi
say "llama.cpp: $(tail -1 "$LOGS/build.log")"
LLAMA_BENCH="$BUILD/bin/llama-bench"
[ -x "$LLAMA_BENCH" ] || die "$LLAMA_BENCH missing after the build (log: $LOGS/build.log)"

GREEDY="$WORK/bin/peer_greedy"
if [ ! -x "$GREEDY" ] || [ "$PEER/greedy.cpp" -nt "$GREEDY" ] || [ "$BUILD/bin/libllama.so" -nt "$GREEDY" ]; then
  say "compiling bench/peer/greedy.cpp against $BUILD/bin/libllama.so"
  "$CXX" -std=c++17 -O2 -o "$GREEDY" "$PEER/greedy.cpp" -I"$SRC/include" -I"$SRC/ggml/include" \
    -L"$BUILD/bin" -lllama -lggml -lggml-base -Wl,-rpath,"$BUILD/bin" 2>"$LOGS/greedy-build.log" ||
    { cat "$LOGS/greedy-build.log" >&2; die "compiling peer_greedy failed"; }
fi

# --- 4. The same greedy tokens ----------------------------------------------------------------
RES="$WORK/results"
say "greedy check: $GREEDY_TOKENS tokens after the prompt $GREEDY_PROMPT"
"$GREEDY" "$MODEL/model-f32.gguf" "$THREADS" "$GREEDY_TOKENS" "$GREEDY_PROMPT" \
  >"$RES/greedy.llama.json" 2>"$LOGS/greedy.llama.log" ||
  { cat "$LOGS/greedy.llama.log" >&2; die "llama.cpp's greedy run failed"; }
FED=$("$PYTHON" -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["tokens"][:-1])))' \
  "$RES/greedy.llama.json")
"$VSUP_LOGITS" --model "$MODEL/hf" --prompt "$GREEDY_PROMPT" ${FED:+--decode "$FED"} \
  >"$RES/greedy.vsup.json" 2>"$LOGS/greedy.vsup.log" ||
  { cat "$LOGS/greedy.vsup.log" >&2; die "vsup-logits failed"; }
"$PYTHON" "$PEER/report.py" greedy --llama "$RES/greedy.llama.json" --vsup "$RES/greedy.vsup.json" >&2 ||
  die "vsup and llama.cpp do not compute the same model (results: $RES/greedy.*.json)"

# --- 5. Throughput --------------------------------------------------------------------------
say "llama-bench -p 128,512 -n 128 -fa off,on -t $THREADS -r $RUNS"
"$LLAMA_BENCH" -m "$MODEL/model-f32.gguf" -p 128,512 -n 128 -fa off,on -t "$THREADS" -r "$RUNS" -o json \
  >"$RES/llama-bench.json" 2>"$LOGS/llama-bench.log" ||
  { tail -20 "$LOGS/llama-bench.log" >&2; die "llama-bench failed (log: $LOGS/llama-bench.log)"; }

VSUP_ARGS=(--model "$MODEL/hf" --tp 1 --runs "$RUNS")
has_option --threads && VSUP_ARGS+=(--threads "$THREADS")
has_option --batches && VSUP_ARGS+=(--batches 1)
has_option --prefill && VSUP_ARGS+=(--prefill "128,512")
if has_option --json; then
  VSUP_ARGS+=(--json)
  VSUP_OUT="$RES/cpu_engine_bench.json"
else
  VSUP_OUT="$RES/cpu_engine_bench.md"
fi
say "cpu_engine_bench ${VSUP_ARGS[*]}"
"$VSUP_BENCH" "${VSUP_ARGS[@]}" >"$VSUP_OUT" 2>"$LOGS/cpu_engine_bench.log" ||
  { tail -20 "$LOGS/cpu_engine_bench.log" >&2; die "cpu_engine_bench failed (log: $LOGS/cpu_engine_bench.log)"; }

CPU=$(grep -m1 '^model name' /proc/cpuinfo | sed 's/.*: //' || echo unknown)
NOTE="node-llama-cpp $NODE_LLAMA_CPP_VERSION (llama.cpp $RELEASE, ${BUNDLE_HEAD:0:7}), $CPU, $(nproc) cores, $THREADS threads, load average $(cut -d' ' -f1 /proc/loadavg) at the end"
echo "vsup's CPU engine and llama.cpp, vsup-tiny-25m's shape with random fp32 weights: $NOTE." >&3
echo >&3
"$PYTHON" "$PEER/report.py" table --llama-bench "$RES/llama-bench.json" --vsup "$VSUP_OUT" \
  --threads "$THREADS" --note "$NOTE" >&3 || die "cannot read the results in $RES"
if [ "$JSON" = 1 ]; then
  "$PYTHON" "$PEER/report.py" table --llama-bench "$RES/llama-bench.json" --vsup "$VSUP_OUT" \
    --threads "$THREADS" --note "$NOTE" --json
fi
