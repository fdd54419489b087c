#!/usr/bin/env bash
# Installs vsup into a scratch root (meson install --destdir) and builds examples/ against that
# installed copy through pkg-config, as a host project would; then runs both examples.
# Usage (meson test does this): install_examples.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build="$1"
src="$2"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
meson install -C "$build" --destdir "$scratch/root" --quiet --no-rebuild
pcdir="$(dirname "$(find "$scratch/root" -name vsup.pc | head -n 1)")"
[ -f "$pcdir/vsup.pc" ] || { echo "vsup.pc was not installed"; exit 1; }
export PKG_CONFIG_PATH="$pcdir"
export PKG_CONFIG_SYSROOT_DIR="$scratch/root"
libdir="$(dirname "$(find "$scratch/root" -name 'libvsup.so*' | head -n 1)")"
export LD_LIBRARY_PATH="$libdir"
export VSUP_EXE="$(find "$scratch/root" -path '*/bin/vsup' | head -n 1)"
[ -x "$VSUP_EXE" ] || { echo "the vsup executable was not installed"; exit 1; }
# The examples must compile from the installed headers alone: no source tree on the path.
meson setup "$scratch/examples-build" "$src/examples" >/dev/null
meson compile -C "$scratch/examples-build" >/dev/null
echo "examples built against the installed library ($pcdir/vsup.pc)"
out="$(timeout 60 "$scratch/examples-build/offline_generate" 2>&1)"
echo "$out"
grep -q '^\[1\] .*(length, 12 tokens)$' <<<"$out" || { echo "offline_generate: no second completion"; exit 1; }
out="$(timeout 60 "$scratch/examples-build/custom_topology" --run-for-ms 300 2>&1)"
echo "$out"
# The custom vsup-aware child was started, stopped over RPC after flushing, and the tree
# shut down without killing anything.
grep -q 'flusher \[worker\] running' <<<"$out" || { echo "custom_topology: flusher not running"; exit 1; }
grep -q '^flusher: flushed, exiting with 0$' <<<"$out" || { echo "aware_child did not finish its shutdown"; exit 1; }
grep -q '^shut down cleanly$' <<<"$out" || { echo "custom_topology: not a clean shutdown"; exit 1; }
echo "examples ran"
