#!/usr/bin/env bash
# Run each fuzz target for a bounded time (not part of CI or scripts/test.sh).
#   fuzz/run.sh [SECONDS_PER_TARGET]   (default 60)
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and libFuzzer's nightly
# flags; on a stable toolchain RUSTC_BOOTSTRAP=1 lets them through.
# New inputs go to fuzz/corpus/<target>/ (ignored by git), crashes to
# fuzz/artifacts/<target>/; the summary lines are appended to fuzz/runs.log.
set -uo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
export RUSTC_BOOTSTRAP=1
for target in pdu_command ingest_dataset multipart_related; do
    mkdir -p "corpus/$target"
    log="$(mktemp)"
    # -s none: no sanitizer (safe Rust; also builds on stable with
    # RUSTC_BOOTSTRAP); -a: debug assertions, so overflows panic.
    cargo fuzz run -s none -a "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 2>&1 | tee "$log" | tail -5
    status=${PIPESTATUS[0]}
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    [ -z "$execs" ] && execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    crashes=$(ls "artifacts/$target" 2>/dev/null | wc -l)
    echo "$(date -u +%Y-%m-%dT%H:%MZ) $(hostname) $target ${secs}s execs=${execs:-?} exit=$status artifacts=$crashes" | tee -a runs.log
    rm -f "$log"
done
