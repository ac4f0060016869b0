#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for the tests and benches: initdb into a fresh
# temporary folder as an unprivileged user (initdb refuses root; as root the
# `postgres` user runs it), on a free loopback port, trust authentication.
#
#   eval "$(scripts/postgres.sh start)"   # exports HER2MAP_TEST_PG_URL, HER2MAP_TEST_PG_DIR
#   scripts/postgres.sh stop  "$HER2MAP_TEST_PG_DIR"
#   scripts/postgres.sh pause "$HER2MAP_TEST_PG_DIR"  /  resume "$HER2MAP_TEST_PG_DIR"
set -euo pipefail
BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
as_owner() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
case "${1:-}" in
start)
    dir="$(mktemp -d /tmp/her2map-pg.XXXXXX)"
    chmod 755 "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; fi
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    as_owner "$BIN/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log" 2>&1
    echo "$port" >"$dir/port"
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on" start >/dev/null
    echo "export HER2MAP_TEST_PG_URL=postgres://postgres@127.0.0.1:$port HER2MAP_TEST_PG_DIR=$dir"
    ;;
stop)
    dir="${2:?folder}"
    as_owner "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
pause)
    as_owner "$BIN/pg_ctl" -D "${2:?folder}/data" -m immediate -w stop >/dev/null
    ;;
resume)
    dir="${2:?folder}"
    port="$(cat "$dir/port")"
    as_owner "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null
    ;;
*)
    echo "usage: $0 start | stop DIR | pause DIR | resume DIR" >&2
    exit 2
    ;;
esac
