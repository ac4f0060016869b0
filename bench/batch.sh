#!/usr/bin/env bash
# The batch benchmark (issue 18): `her2map batch` over N synthetic patients
# with full-size random weights, with --jobs 1 and 2: cases per minute, the
# time split (header scan, weights load, imaging, inference, writing) and
# peak RSS, from the batch's own --json summary.
# Usage: bench/batch.sh [WORKDIR]
#   N_FULL (default 50) full-size patients (619 MB each) and N_SMALL
#   (default 0) small ones (2 MB each); HER2MAP_BIN (default: the release
#   build), WEIGHTS (default: the full-size random weights of
#   `cargo bench --bench model`, made once). KEEP=1 keeps the patients;
#   generation stops when the disk has under MIN_FREE_GB (default 10) free.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-target/bench-batch}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
N_FULL=${N_FULL:-50}
N_SMALL=${N_SMALL:-0}
if [ -n "${HER2MAP_BIN:-}" ]; then
    BIN=$(realpath "$HER2MAP_BIN")
else
    cargo build --release --quiet --bin her2map
    BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/her2map
fi
WEIGHTS=${WEIGHTS:-$WORK/map_reference_random.safetensors}
if [ ! -f "$WEIGHTS" ]; then
    HER2MAP_BENCH_SAVE="$WEIGHTS" RAYON_NUM_THREADS=$(nproc) cargo bench --quiet --bench model >/dev/null
fi
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
echo "weights: $(python3 -c "import os;print(round(os.path.getsize('$WEIGHTS')/2**20))") MiB"

make_set() { # NAME COUNT FLAG
    local dir=$WORK/$1
    [ "$2" -gt 0 ] || return 0
    mkdir -p "$dir"
    for i in $(seq 1 "$2"); do
        # A shared disk: stop short (and say so) rather than fill it.
        if [ "$(df -BG --output=avail "$WORK" | tail -1 | tr -dc 0-9)" -lt "${MIN_FREE_GB:-10}" ]; then
            echo "$1: stopped at $((i - 1)) patients: under ${MIN_FREE_GB:-10} GB free"
            break
        fi
        [ -d "$dir/p$i" ] || "$BIN" synth "$dir/p$i" $3 --seed "$i" --patient-id "BENCH$i" >/dev/null
    done
    echo "$1: $2 patients, $(du -sm "$dir" | cut -f1) MB, $(find "$dir" -type f | wc -l) files"
}
make_set full "$N_FULL" --full-size
make_set small "$N_SMALL" ""

printf '\n| set | jobs | cases | wall s | cases/min | scan s | load s | imaging s (sum) | inference s (sum) | writing s | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|---|\n'
for set in full small; do
    [ -d "$WORK/$set" ] || continue
    for jobs in 1 2; do
        rm -f "$WORK/$set.csv" "$WORK/$set.jsonl"
        HER2MAP__LOG__LEVEL=warn "$BIN" batch "$WORK/$set" --out "$WORK/$set.csv" \
            --model "$WEIGHTS" --jobs "$jobs" --json >"$WORK/$set-$jobs.json"
        python3 - "$WORK/$set-$jobs.json" "$set" "$jobs" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("| %s | %s | %d | %.1f | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %d |" % (
    sys.argv[2], sys.argv[3], s["done"] + s["failed"], s["wall_ms"] / 1e3, s["cases_per_minute"],
    s["scan_ms"] / 1e3, s["load_ms"] / 1e3, s["imaging_ms"] / 1e3, s["inference_ms"] / 1e3,
    s["writing_ms"] / 1e3, s["peak_rss_kb"] // 1024))
PY
    done
done
[ -n "${KEEP:-}" ] || rm -rf "$WORK/full" "$WORK/small"
