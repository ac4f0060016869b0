#!/usr/bin/env bash
# Several nodes on one PostgreSQL (issue 14), in one run on one machine:
#  1. ingest of the full-size synthetic patient (storescu, TCP_NODELAY=1)
#     into one node on SQLite and one node on PostgreSQL, over 1 and 4
#     associations; then into two nodes on PostgreSQL behind haproxy (round
#     robin) over 4 and 8 associations; $ROUNDS rounds (default 2);
#  2. a backlog of $PATIENTS (default 20) small synthetic patients sent at
#     once, demo weights: cases per minute from the last instance to the
#     last case done, on one node and on two.
# Usage: bench/multinode.sh [WORKDIR]   (needs dcmtk, haproxy, postgresql;
#        runs HER2MAP_BIN, or builds the release binary)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-target/bench-multinode}
mkdir -p "$WORK"; WORK=$(cd "$WORK" && pwd)
if [ -n "${HER2MAP_BIN:-}" ]; then BIN=$(realpath "$HER2MAP_BIN"); else
    cargo build --release --quiet --bin her2map; BIN=${CARGO_TARGET_DIR:-target}/release/her2map; fi
ROUNDS=${ROUNDS:-2}; PATIENTS=${PATIENTS:-20}
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
now() { date +%s.%N; }
eval "$("$ROOT/scripts/postgres.sh" start)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    "$ROOT/scripts/postgres.sh" stop "$HER2MAP_TEST_PG_DIR"; }
trap cleanup EXIT
PG=$HER2MAP_TEST_PG_URL
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; $(date -u +%F)"

PATIENT=$WORK/patient
[ -d "$PATIENT/MG" ] || "$BIN" synth "$PATIENT" --full-size >/dev/null
N=$(find "$PATIENT" -name '*.dcm' | wc -l)
MB=$(find "$PATIENT" -name '*.dcm' -printf '%s\n' | awk '{s+=$1} END {printf "%.0f", s/1e6}')
echo "patient: $N instances, $MB MB"
find "$PATIENT" -name '*.dcm' | sort > "$WORK/files.txt"

# node NAME PORT DBURL DATA [stable_age]: start `her2map serve`, wait for its port.
node() {
    cat > "$WORK/$1.toml" <<TOML
[dicom]
host = "127.0.0.1"
port = $2
max_associations = 64
[storage]
data_dir = "$4"
min_free_mb = 0
[node]
id = "$1"
[database]
url = "$3"
[cases]
stable_age_secs = ${5:-3600}
queue = 64
[model]
demo = true
TOML
    "$BIN" --config "$WORK/$1.toml" serve >"$WORK/$1.log" 2>&1 & PIDS+=($!)
    for _ in $(seq 300); do (echo > /dev/tcp/127.0.0.1/$2) 2>/dev/null && return; sleep 0.2; done
    echo "node $1 did not start"; exit 1
}
stop_nodes() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); }
haproxy_for() { # LBPORT PORT...
    local lb=$1; shift; local cfg=$WORK/haproxy.cfg i=0
    printf 'global\n  maxconn 512\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 5m\n  timeout server 5m\nfrontend f\n  bind 127.0.0.1:%s\n  default_backend b\nbackend b\n  balance roundrobin\n' "$lb" > "$cfg"
    for p in "$@"; do echo "  server n$i 127.0.0.1:$p" >> "$cfg"; i=$((i+1)); done
    haproxy -db -f "$cfg" >/dev/null 2>&1 & PIDS+=($!)
    sleep 0.5
}
# send PORT K: the patient over K associations at once (each a share of the files).
send() {
    rm -f "$WORK"/share.*; split -n "r/$2" "$WORK/files.txt" "$WORK/share."
    local pids=() f
    for f in "$WORK"/share.*; do
        xargs -a "$f" env TCP_NODELAY=1 storescu -aec HER2MAP -nh 127.0.0.1 "$1" >/dev/null 2>&1 & pids+=($!)
    done
    wait "${pids[@]}"
}
newdb() { local name="b_$(date +%s%N)"; psql -qAt "$PG/postgres" -c "CREATE DATABASE $name"; echo "$PG/$name"; }
# measure LABEL K URL NODES: one timed ingest; prints seconds and MB/s.
measure() {
    local label=$1 k=$2 url=$3 nodes=$4 data ports=() i t0 t1 port
    data=$WORK/data.$RANDOM; mkdir -p "$data"
    for i in $(seq "$nodes"); do ports+=("$(free_port)"); node "n$i" "${ports[-1]}" "$url" "$data"; done
    if [ "$nodes" -gt 1 ]; then port=$(free_port); haproxy_for "$port" "${ports[@]}"; else port=${ports[0]}; fi
    sync; t0=$(now); send "$port" "$k"; t1=$(now)
    local stored; stored=$(find "$data/spool" -name '*.dcm' | wc -l)
    stop_nodes
    python3 -c "t=$t1-$t0; print(f'$label: {t:.2f} s, {$MB/t:.0f} MB/s, {$stored} of $N stored')"
    rm -rf "$data"
}
echo "== ingest =="
for r in $(seq "$ROUNDS"); do
    echo "-- round $r"
    measure "1 node, SQLite,     1 assoc" 1 "" 1
    measure "1 node, PostgreSQL, 1 assoc" 1 "$(newdb)" 1
    measure "1 node, SQLite,     4 assoc" 4 "" 1
    measure "1 node, PostgreSQL, 4 assoc" 4 "$(newdb)" 1
    measure "2 nodes, PostgreSQL + haproxy, 4 assoc" 4 "$(newdb)" 2
    measure "2 nodes, PostgreSQL + haproxy, 8 assoc" 8 "$(newdb)" 2
done

echo "== backlog of $PATIENTS patients (small synthetic, demo weights) =="
for i in $(seq "$PATIENTS"); do
    [ -d "$WORK/p$i/MG" ] || "$BIN" synth "$WORK/p$i" --seed "$i" --patient-id "P$i" --patient-name "Bench^$i" >/dev/null
done
backlog() { # NODES
    local url data ports=() i port t0 t1 done_n
    url=$(newdb); data=$WORK/data.$RANDOM; mkdir -p "$data"
    for i in $(seq "$1"); do ports+=("$(free_port)"); node "b$i" "${ports[-1]}" "$url" "$data" 1; done
    if [ "$1" -gt 1 ]; then port=$(free_port); haproxy_for "$port" "${ports[@]}"; else port=${ports[0]}; fi
    local pids=()
    for i in $(seq "$PATIENTS"); do
        TCP_NODELAY=1 storescu -aec HER2MAP +sd +r -nh 127.0.0.1 "$port" "$WORK/p$i" >/dev/null 2>&1 & pids+=($!)
    done
    wait "${pids[@]}"; t0=$(now)
    for _ in $(seq 3000); do
        done_n=$(psql -qAt "$url" -c "SELECT count(*) FROM cases WHERE state = 'done'")
        [ "$done_n" -ge "$PATIENTS" ] && break; sleep 0.2
    done
    t1=$(now)
    local per_node; per_node=$(psql -qAt "$url" -c "SELECT node || ':' || count(*) FROM events WHERE event = 'case_result' GROUP BY node ORDER BY node" | tr '\n' ' ')
    stop_nodes; rm -rf "$data"
    python3 -c "t=$t1-$t0; print(f'$1 node(s): {$done_n} cases in {t:.1f} s after the last instance (includes the 1 s stable age): {$done_n*60/t:.0f} cases/min; run by {\"$per_node\".strip()}')"
}
backlog 1
backlog 2
