#!/usr/bin/env bash
# Fuzzes one target for SECONDS (default 600) with libFuzzer through cargo-fuzz on stable Rust
# (no sanitizer: `-s none`; debug assertions and overflow checks are on). New inputs go to
# fuzz/work/TARGET (not committed), seeded from fuzz/corpus/TARGET; a finding is written to
# fuzz/artifacts/TARGET/. Limits: 2 GiB of RSS, 10 s per input.
#   fuzz/run.sh weights 600
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1
seconds=${2:-600}
mkdir -p "fuzz/work/$target"
exec cargo fuzz run -s none "$target" "fuzz/work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
    -print_final_stats=1
