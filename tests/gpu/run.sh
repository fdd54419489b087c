#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU (an H200 was the target) and a fresh checkout,
# builds the CUDA targets (build-gpu/, warnings and register spills as errors) and runs every
# check that needs a GPU, within about 7 minutes, then prints one table:
#   1. the kernel tests under compute-sanitizer: memcheck, and racecheck for attention;
#   2. parity with the CPU engine (fp32: the same greedy tokens, logits within 1e-4; bf16: top-1
#      agreement >= 98 %), 16 prompts x 32 tokens of vsup-tiny-25m's dummy weights;
#   3. speed: decode tokens/s at batch 1, 8 and 64 of an 8B-shaped bf16 model against the
#      device-copy floor, and prefill against cuBLAS on the same products;
#   4. lifecycle: five vsup::LLM lifetimes back to the GPU's baseline memory (64 MiB), and three
#      `vsup run --engine cuda` serve -> SIGTERM cycles with exit 0 and no GPU process left;
#   5. a SIGKILLed rank mid-decode, and NCCL with one rank (init -> all-reduce -> finalize ->
#      destroy, init -> abort).
# Usage: tests/gpu/run.sh [--layers N]  (N: the benchmark model's layers, 32 by default)
set -uo pipefail
cd "$(dirname "$0")/../.."
layers=32
[ "${1:-}" = "--layers" ] && layers="$2"
started=$SECONDS
rows=()
row() { rows+=("$(printf '%-34s | %-4s | %s' "$1" "$2" "$3")"); }
verdict() { [ "$1" -eq 0 ] && echo PASS || echo FAIL; }
log=build-gpu-logs
mkdir -p "$log"

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "tests/gpu/run.sh: no NVIDIA GPU here (nvidia-smi -L failed): nothing to check" >&2
  exit 77
fi
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
command -v meson >/dev/null || .ci/install-deps

# The build: only what the checks run.
if [ ! -f build-gpu/build.ninja ]; then
  meson setup build-gpu -Dcuda=enabled -Dwerror=true >"$log/setup.txt" 2>&1 \
    || { cat "$log/setup.txt"; exit 1; }
fi
targets=(tools/vsup engine/libvsup-cuda.so tests/gpu/cuda_kernels_test tests/gpu/cuda_parity
         tests/gpu/nccl_one_rank_test tests/gpu/cuda_lifecycle bench/cuda_engine_bench)
if ninja -C build-gpu "${targets[@]}" >"$log/build.txt" 2>&1; then
  row "build (nvcc -Werror, spills errors)" PASS "$((SECONDS - started)) s"
else
  tail -40 "$log/build.txt"
  row "build (nvcc -Werror, spills errors)" FAIL "see $log/build.txt"
  printf '%s\n' "${rows[@]}"
  exit 1
fi
b=build-gpu
export VSUP_EXE="$PWD/$b/tools/vsup"

# 1. Kernels, plain and under compute-sanitizer.
$b/tests/gpu/cuda_kernels_test >"$log/kernels.txt" 2>&1
r=$?; row "kernels vs the CPU kernels" "$(verdict $r)" "$(tail -3 "$log/kernels.txt" | head -1)"
sanitizer=compute-sanitizer
command -v $sanitizer >/dev/null || sanitizer=/usr/local/cuda/bin/compute-sanitizer
$sanitizer --tool memcheck --error-exitcode 1 $b/tests/gpu/cuda_kernels_test >"$log/memcheck.txt" 2>&1
r=$?; row "kernels: compute-sanitizer memcheck" "$(verdict $r)" "$(grep -m1 'ERROR SUMMARY' "$log/memcheck.txt")"
$sanitizer --tool racecheck --error-exitcode 1 $b/tests/gpu/cuda_kernels_test \
  --test-case='*pagedAttention*' >"$log/racecheck.txt" 2>&1
r=$?; row "attention: compute-sanitizer racecheck" "$(verdict $r)" "$(grep -m1 'RACECHECK SUMMARY\|ERROR SUMMARY' "$log/racecheck.txt")"

# 2. Parity.
$b/tests/gpu/cuda_parity >"$log/parity.txt" 2>&1
r=$?
while IFS= read -r line; do rows+=("$line"); done < <(grep '^parity' "$log/parity.txt")
[ $r -eq 0 ] || row "parity" FAIL "$(tail -2 "$log/parity.txt")"

# 3. Speed.
$b/bench/cuda_engine_bench --layers "$layers" >"$log/bench.txt" 2>&1
r=$?; row "benchmark" "$(verdict $r)" "table below"

# 4. Lifecycle.
$b/tests/gpu/cuda_lifecycle >"$log/lifecycle.txt" 2>&1
r=$?; row "vsup::LLM x5, memory" "$(verdict $r)" "$(tail -1 "$log/lifecycle.txt")"
python3 tests/gpu/serve_checks.py --vsup "$VSUP_EXE" >"$log/serve.txt" 2>&1
while IFS= read -r line; do rows+=("$line"); done <"$log/serve.txt"

# 5. NCCL.
$b/tests/gpu/nccl_one_rank_test >"$log/nccl.txt" 2>&1
r=$?; row "NCCL one rank: reduce/finalize/abort" "$(verdict $r)" "$(tail -3 "$log/nccl.txt" | head -1)"

echo
echo "GPU check on: $gpu; $(nproc) CPUs; $((SECONDS - started)) s in all"
printf '%s\n' "${rows[@]}"
echo
cat "$log/bench.txt"
grep -q '| FAIL |' <(printf '%s\n' "${rows[@]}") && exit 1
exit 0
