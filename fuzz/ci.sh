#!/usr/bin/env bash
# CI fuzzing: checks the committed seed corpora, then runs every cargo-fuzz target for a short
# fixed time. A crash, a broken invariant or a build failure fails the script (libFuzzer writes
# the input to fuzz/artifacts/<target>/; `cargo fuzz run <target> <file>` replays it).
#
# Usage: fuzz/ci.sh [seconds per target]   (default 60, or $FUZZ_SECONDS)
# Works from any directory, on a stable toolchain (see docs/FUZZING.md).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-${FUZZ_SECONDS:-60}}"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz
fi

# The seeds decode to the stories they are meant to tell (and reach them).
cargo test --manifest-path fuzz/Cargo.toml

for target in $(cargo fuzz list); do
  echo "== fuzz ${target}: ${seconds}s"
  cargo fuzz run "$target" -- -max_total_time="$seconds" -print_final_stats=1
done
echo "== fuzz: no crash"
