#!/usr/bin/env bash
# Produce throughput and latency of Aqueduct over its Rust client (release build), one node
# and three nodes with replication factor 3 on loopback, acknowledging after fsync
# (acks=all). Usage: benches/produce.sh [extra `aqueduct bench produce` flags...]
# Needs `make release` first. Data goes under $AQ_BENCH_DIR (default /var/tmp/aq-produce-bench,
# a real disk: tmpfs would make fsync free). The NATS side-by-side comparison is issue 6.
set -euo pipefail
BIN=${CARGO_TARGET_DIR:-/var/tmp/aqueduct-target}/release/aqueduct
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-produce-bench}
[ -x "$BIN" ] || { echo "no release binary at $BIN: run make release" >&2; exit 1; }
rm -rf "$DIR"; mkdir -p "$DIR"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start() { # id host [join]
  local id=$1 host=$2 join=${3:-}
  AQUEDUCT_LOG=warn "$BIN" serve --node-id "$id" --data-dir "$DIR/n$id" --listen-host "$host" \
    ${join:+--join "$join"} >"$DIR/n$id.log" 2>&1 &
  pids+=($!)
}
wait_members() { # n server
  for _ in $(seq 1 120); do
    if "$BIN" cluster status --server "$2" --output json 2>/dev/null |
       grep -o '"role":"voter"' | wc -l | grep -qx "$1"; then return 0; fi
    sleep 0.5
  done
  echo "cluster did not form" >&2; exit 1
}
LOAD=(--producers 4 --in-flight 256 --record-size 1024 --duration 20 "$@")

echo "== 1 node, 1 partition, replication factor 1, acks=all (after fsync)"
start 1 127.0.30.1
wait_members 1 127.0.30.1:7070
"$BIN" bench produce --server 127.0.30.1:7070 --topic rf1 "${LOAD[@]}"
cleanup; pids=()

echo "== 3 nodes, 1 partition, replication factor 3, acks=all (quorum fsynced)"
start 1 127.0.31.1
wait_members 1 127.0.31.1:7070
start 2 127.0.31.2 127.0.31.1:7070
start 3 127.0.31.3 127.0.31.1:7070
wait_members 3 127.0.31.1:7070
S=127.0.31.1:7070,127.0.31.2:7070,127.0.31.3:7070
"$BIN" bench produce --server "$S" --topic rf3 --replication-factor 3 "${LOAD[@]}"
