#!/usr/bin/env bash
# Produce throughput and latency of Aqueduct over its Rust client (release build), one node
# and three nodes with replication factor 3 on loopback, acknowledging after fsync
# (acks=all). Usage: benches/produce.sh [extra `aqueduct bench produce` flags...]
# Needs `make release` first. Data goes under $AQ_BENCH_DIR (default /var/tmp/aq-produce-bench).
# benches/compare.sh runs the same loads against NATS JetStream in the same run.
set -euo pipefail
. "$(dirname "$0")/common.sh"
need_release
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-produce-bench}
rm -rf "$DIR"; mkdir -p "$DIR"
LOAD=(--producers 4 --in-flight 256 --record-size 1024 --duration 20 "$@")

echo "== 1 node, 1 partition, replication factor 1, acks=all (after fsync)"
start_aqueduct "$DIR/one" 1 127.0.30
"$BIN" bench produce --server "$SERVERS" --topic rf1 "${LOAD[@]}"
stop_all

echo "== 3 nodes, 1 partition, replication factor 3, acks=all (quorum fsynced)"
start_aqueduct "$DIR/three" 3 127.0.31
"$BIN" bench produce --server "$SERVERS" --topic rf3 --replication-factor 3 "${LOAD[@]}"
