#!/usr/bin/env bash
# Partition density (issue 7): 1,000 partitions with RF=1 on one node, and 1,000 partitions
# with RF=3 on three nodes, release build, data on disk. For each setup: how long until every
# partition has a leader, whether a produce to every partition is acknowledged, and then,
# idle, each node's resident memory (and its growth over the empty node, per partition) and
# CPU use over $IDLE_SECS (default 60) seconds.
# Usage: benches/density.sh [partitions]   (needs `make release`)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
need_release
N=${1:-1000}
IDLE_SECS=${IDLE_SECS:-60}
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-density}
TICKS=$(getconf CLK_TCK)
rm -rf "$DIR"; mkdir -p "$DIR"

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

count_partitions() { # server topic jq-condition: partitions (as `topic describe` sees them) matching
  "$BIN" topic describe "$2" --server "$1" --timeout 1 --output json 2>/dev/null |
    jq "[.partitions[] | select($3)] | length" 2>/dev/null || echo 0
}

density() { # label nodes prefix rf
  local label=$1 nodes=$2 prefix=$3 rf=$4
  echo "== $label: $N partitions, replication factor $rf, $nodes node(s)"
  start_aqueduct "$DIR/$prefix" "$nodes" "$prefix"
  local node_pids=("${pids[@]}")
  sleep 5
  local base=()
  for p in "${node_pids[@]}"; do base+=("$(rss_kib "$p")"); done
  local t0=$SECONDS
  "$BIN" topic create dense --partitions "$N" --replication-factor "$rf" --server "$SERVERS" >/dev/null
  local have=0
  while [ $((SECONDS - t0)) -lt 600 ]; do
    have=$(count_partitions "$SERVERS" dense '.leader != null')
    [ "$have" = "$N" ] && break
    sleep 2
  done
  echo "partitions with a leader: $have of $N after $((SECONDS - t0)) s"
  # One record to every partition, each addressed explicitly (one `produce` per partition,
  # 20 at a time).
  local ok
  ok=$(seq 0 $((N - 1)) | xargs -P 20 -I{} sh -c \
    "echo r | '$BIN' produce dense --partition {} --server '$SERVERS' --timeout 60 >/dev/null 2>&1 && echo ok" |
    grep -c ok || true)
  echo "produce to every partition: $ok of $N acknowledged;" \
    "partitions holding a record: $(count_partitions "$SERVERS" dense '.high_watermark >= 1') of $N"
  sleep 10
  local c0=() c1=()
  for p in "${node_pids[@]}"; do c0+=("$(cpu_ticks "$p")"); done
  sleep "$IDLE_SECS"
  for p in "${node_pids[@]}"; do c1+=("$(cpu_ticks "$p")"); done
  for i in "${!node_pids[@]}"; do
    local p=${node_pids[$i]} rss
    rss=$(rss_kib "$p")
    awk -v n=$((i + 1)) -v rss="$rss" -v base="${base[$i]}" -v parts="$N" -v rf="$rf" \
        -v nodes="$nodes" -v dc=$((c1[i] - c0[i])) -v tck="$TICKS" -v secs="$IDLE_SECS" 'BEGIN {
      replicas = parts * rf / nodes
      printf "node %d: RSS %.1f MiB (empty node %.1f MiB), %.1f KiB per replica; idle CPU %.1f%% of one core\n",
        n, rss / 1024, base / 1024, (rss - base) / replicas, 100 * dc / tck / secs
    }'
  done
  stop_all
}

density "one node" 1 127.0.34 1
density "three nodes" 3 127.0.35 3
