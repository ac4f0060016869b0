#!/usr/bin/env bash
# The GPU checks of the CUDA build, on a machine with an NVIDIA GPU, in one
# run; the figures go to $OUT_FILE (default gpu-check.txt; with $OUT set,
# as on the device machine, $OUT/gpu-check.txt):
#   1. the release build with `--features cuda` (links against the driver's
#      libcuda; toolkit from scripts/cuda-env.sh, or HER2MAP_GPU_PREBUILT=1
#      to use the binaries already in the target folder);
#   2. the parity tests and the engine tests (batching) on cuda:0, same
#      fixtures and tolerances as on the CPU (tests/it/parity.rs,
#      tests/it/engine.rs), TF32 off; then parity again with TF32 on, to
#      record what it changes (expected to fail the 1e-4 bound);
#   3. the full-size model benchmark on cuda:0 (benches/model.rs): load,
#      first call, median at batch 1, cases/s at batch 8 and 32, with the
#      GPU's memory sampled by nvidia-smi every 100 ms for the peak;
#   4. one case end to end through the node (`her2map demo`: the node as
#      `serve` builds it, with the demo weights, three studies by C-STORE,
#      the SR delivered) with device = "cuda:0"; the case_inference_done
#      event and the SR's algorithm parameters name the GPU.
# Each step's exit status is recorded; the script fails if any did
# (except the TF32 parity run, which documents a known difference).
# HER2MAP_GPU_DEVICE (default cuda:0) names the device; `cpu` rehearses the
# script's steps on a machine without a GPU (with a build without CUDA,
# HER2MAP_GPU_PREBUILT=1 and HER2MAP_CUDA_TARGET_DIR at its target folder).
set -uo pipefail
cd "$(dirname "$0")/.."
DEV="${HER2MAP_GPU_DEVICE:-cuda:0}"
if ! command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi() { echo "(no nvidia-smi)"; }
fi
OUT_FILE="${OUT_FILE:-${OUT:+$OUT/}gpu-check.txt}"
export CARGO_TARGET_DIR="${HER2MAP_CUDA_TARGET_DIR:-/var/tmp/her2map-cuda-target}"
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -dc 0-9)}"
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDA_COMPUTE_CAP
failed=0
log() { echo "$*" | tee -a "$OUT_FILE"; }
step() {
    local name="$1"; shift
    log "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$OUT_FILE.log" | grep -E "$FILTER" | tee -a "$OUT_FILE"
    local rc=${PIPESTATUS[0]}
    log "-- $name: exit $rc after $((SECONDS - t0)) s"
    return "$rc"
}
: >"$OUT_FILE"; : >"$OUT_FILE.log"
log "gpu-check $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee -a "$OUT_FILE"

if [ -z "${HER2MAP_GPU_PREBUILT:-}" ]; then
    eval "$(scripts/cuda-env.sh)"
    FILTER='^(error|warning: unused|    Finished)'
    step build cargo build --release --features cuda --bins --benches || failed=1
    step build-tests cargo test --release --features cuda --no-run --test it || failed=1
fi
IT="$(ls -t "$CARGO_TARGET_DIR"/release/deps/it-* | grep -v '\.d$' | head -n1)"
BIN="$CARGO_TARGET_DIR/release/her2map"
BENCH="$(ls -t "$CARGO_TARGET_DIR"/release/deps/model-* | grep -v '\.d$' | head -n1)"

FILTER='worst|intermediates compared|^  |test result|FAILED|panicked|max abs diff'
HER2MAP_TEST_DEVICE="$DEV" step parity "$IT" --nocapture --test-threads 1 parity:: engine:: || failed=1
HER2MAP_TEST_DEVICE="$DEV" HER2MAP_TEST_TF32=1 step parity-tf32 "$IT" --nocapture --test-threads 1 parity::cases_match parity::intermediates_match_reference_on_real || true

FILTER='.'
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$OUT_FILE.mem" 2>/dev/null &
SMI=$!
HER2MAP_BENCH_DEVICE="$DEV" HER2MAP_BENCH_BATCHES="${HER2MAP_BENCH_BATCHES:-8,32}" BENCH_RUNS="${BENCH_RUNS:-20}" step bench "$BENCH" || failed=1
kill "$SMI" 2>/dev/null
log "peak GPU memory used during the benchmark (nvidia-smi, MiB): $(sort -n "$OUT_FILE.mem" | tail -n1)"

DEMO="$(mktemp -d)"
FILTER='.'
HER2MAP__MODEL__DEVICE="$DEV" step demo "$BIN" demo --out "$DEMO/out" || failed=1
log "case_inference_done: $(grep -h case_inference_done "$DEMO/out/audit.jsonl" 2>/dev/null | head -n1)"
sr="$(find "$DEMO/out/outputs" -iname 'sr-*.dcm' 2>/dev/null | head -n1)"
[ -n "$sr" ] && log "SR device line: $(strings "$sr" | grep -m1 'device:')"
log "gpu-check: $([ "$failed" = 0 ] && echo passed || echo FAILED)"
exit "$failed"
