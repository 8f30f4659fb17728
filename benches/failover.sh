#!/usr/bin/env bash
# Failover figures (issue 7): how long a partition cannot take writes after its leader is
# SIGKILLed. Three release nodes on loopback, a topic with replication factor 3; each round
# finds the leader of partition 0, kills it with SIGKILL, and produces one record to
# partition 0 every $PROBE_MS (default 20) ms with a short request timeout until one is
# acknowledged; the unavailability is from the kill to that acknowledgement (it includes
# the client noticing the old leader is gone and finding the new one). The killed node is
# restarted and the next round waits until it is back. Prints each round and p50/p99/max.
# With PROBE=stream, one long-running producer instead writes a record to partition 0 every
# 10 ms throughout, and a round's unavailability is the longest gap between two of its
# acknowledgements from 1 s before the kill to 6 s after it (no process start-up, no metadata
# read in the figure: what a running client sees).
# Usage: benches/failover.sh [rounds] [partitions]   (defaults 30 and 1; needs `make release`)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
need_release
ROUNDS=${1:-30}
PARTS=${2:-1}
PROBE_MS=${PROBE_MS:-20}
PROBE=${PROBE:-process}
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-failover}
PREFIX=127.0.36
rm -rf "$DIR"; mkdir -p "$DIR"

start_aqueduct "$DIR" 3 "$PREFIX"
declare -A node_pid=([1]=${pids[0]} [2]=${pids[1]} [3]=${pids[2]})
"$BIN" topic create failover --partitions "$PARTS" --replication-factor 3 --server "$SERVERS" >/dev/null

now_ms() { date +%s%3N; }
leader_of_0() { # prints the node id leading partition 0 (empty if none)
  local addr
  addr=$("$BIN" topic describe failover --server "$SERVERS" --timeout 2 --output json 2>/dev/null |
    jq -r '.partitions[0].leader // empty') || true
  [ -n "$addr" ] && echo "${addr%%:*}" | awk -F. '{print $4}'
}
wait_all_partitions() { # until every partition has a leader
  for _ in $(seq 1 600); do
    n=$("$BIN" topic describe failover --server "$SERVERS" --timeout 1 --output json 2>/dev/null |
      jq '[.partitions[] | select(.leader != null)] | length' 2>/dev/null || echo 0)
    [ "$n" = "$PARTS" ] && return 0
    sleep 1
  done
  echo "partitions without a leader" >&2; exit 1
}
produce_once() {
  echo "probe" | "$BIN" produce failover --partition 0 --server "$SERVERS" --timeout 1 \
    --request-timeout-ms 250 >/dev/null 2>&1
}

wait_all_partitions
if [ "$PROBE" = stream ]; then
  # Acknowledgement times in microseconds, one per line.
  (while :; do echo p; sleep 0.01; done) |
    "$BIN" produce failover --partition 0 --server "$SERVERS" --acks all --linger-ms 0 \
      --output json 2>"$DIR/probe.err" |
    while read -r _; do echo "${EPOCHREALTIME/./}"; done >"$DIR/acks" &
  pids+=($!)
  sleep 2
fi
longest_gap_ms() { # from_us to_us: the longest gap between acknowledgements in the window
  awk -v a="$1" -v b="$2" '$1 >= a && $1 <= b { if (p) { g = $1 - p; if (g > m) m = g } p = $1 }
    END { printf "%d\n", m / 1000 }' "$DIR/acks"
}
times=()
for round in $(seq 1 "$ROUNDS"); do
  until produce_once; do sleep 0.2; done
  leader=$(leader_of_0)
  [ -n "$leader" ] || { sleep 1; continue; }
  if [ "$PROBE" = stream ]; then
    k=${EPOCHREALTIME/./}
    kill -9 "${node_pid[$leader]}"
    wait "${node_pid[$leader]}" 2>/dev/null || true
    sleep 6
    gap=$(longest_gap_ms $((k - 1000000)) $((k + 6000000)))
    times+=("$gap")
    echo "round $round: killed node $leader, longest gap between acknowledgements $gap ms"
  else
    t0=$(now_ms)
    kill -9 "${node_pid[$leader]}"
    wait "${node_pid[$leader]}" 2>/dev/null || true
    until produce_once; do sleep "0.0$((PROBE_MS / 10))"; done
    t1=$(now_ms)
    times+=($((t1 - t0)))
    echo "round $round: killed node $leader, writes back after $((t1 - t0)) ms"
  fi
  # Restart it, and wait for it to be a voter again and every partition to have a leader.
  AQUEDUCT_LOG=warn "$BIN" serve --node-id "$leader" --data-dir "$DIR/n$leader" \
    --listen-host "$PREFIX.$leader" >>"$DIR/n$leader.log" 2>&1 &
  node_pid[$leader]=$!
  pids+=($!)
  wait_members 3 "$SERVERS"
  wait_all_partitions
  sleep 2
done
# The stream probe's producer; its writer and reader loops end with it.
pkill -f "produce failover --partition 0 --server $SERVERS --acks all" || true
printf '%s\n' "${times[@]}" | sort -n | awk -v parts="$PARTS" -v probe="$PROBE" '
  { v[NR] = $1 }
  END {
    p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]
    printf "partitions=%d kills=%d probe=%s unavailability p50 %d ms, p99 %d ms, max %d ms\n", parts, NR, probe, p50, p99, v[NR]
  }'
