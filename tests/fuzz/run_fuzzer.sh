#!/bin/sh
# One bounded libFuzzer run, as the 'fuzz' benchmark suite runs it (tests/fuzz/meson.build):
#   run_fuzzer.sh FUZZER SEED_DIR DICT|'' SECONDS OUT_DIR
# New inputs go to OUT_DIR/new-corpus (emptied first; the committed seeds are only read), crash
# reproducers to OUT_DIR/crash-* (and leak-*, timeout-*, oom-*). Exits 0 when the fuzzer found
# nothing, else 1: never the fuzzer's own status, since libFuzzer reports a finding with 77, which
# meson reads as "skipped".
set -eu
fuzzer=$1 seeds=$2 dict=$3 seconds=$4 out=$5
rm -rf "$out/new-corpus"
mkdir -p "$out/new-corpus"
set -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  -artifact_prefix="$out/"
if [ -n "$dict" ]; then set -- "$@" -dict="$dict"; fi
# UBSan reports must stop the run (by default it prints and goes on).
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
rc=0
"$fuzzer" "$@" "$out/new-corpus" "$seeds" || rc=$?
if [ "$rc" -ne 0 ]; then
  echo "run_fuzzer.sh: $fuzzer found a problem; reproducer(s) in $out:" >&2
  ls -l "$out" >&2
  exit 1
fi
exit 0
