#!/usr/bin/env bash
# Consumer groups through the Kafka port (librdkafka) beside the native client, in one run,
# with the same load generator: `aqueduct bench consume|e2e --group`, 6 partitions read by a
# group of 3 members (each side's coordinator assigns them, offsets committed every 5 s), on
# 1 node and on 3 nodes with RF=3, acks=all. Prints Kafka-port / native for each.
#
# Usage: benches/groups.sh [consume|e2e] [extra `aqueduct bench` flags...]
# consume reads 600,000 records (produced first, unmeasured); e2e produces for 20 s with
# 4 producers x 256 in flight, 1 KiB records. Data goes under $AQ_BENCH_DIR (default
# /var/tmp/aq-groups, a real disk).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
MODE=consume
case "${1:-}" in e2e|consume) MODE=$1; shift ;; esac
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-groups}
LOAD=(--producers 4 --in-flight 256 --record-size 1024 --partitions 6 --consumers 3)
if [ "$MODE" = consume ]; then LOAD+=(--count 600000); else LOAD+=(--duration 20); fi
LOAD+=("$@")
make --no-print-directory release >&2
need_release
rm -rf "$DIR"; mkdir -p "$DIR"; sync
RESULTS=$DIR/results.jsonl
: >"$RESULTS"

run() { # label bench-args...
  local label=$1 out; shift
  echo "== $label" >&2
  out=$("$BIN" bench "$MODE" "$@" "${LOAD[@]}" --output json)
  echo "$out" >&2
  echo "$out" | jq -c --arg name "$label" '. + {label: $name}' >>"$RESULTS"
}

settle() { stop_all; rm -rf "$1"; sync; sleep 2; }

# Each system on its own cluster and topic, so neither reads the other's page cache.
start_aqueduct "$DIR/n1" 1 127.0.36
run "native 1 node" --server "$SERVERS" --topic bench --group native
settle "$DIR/n1"
start_aqueduct "$DIR/k1" 1 127.0.37
run "Kafka port 1 node" --system kafka --kafka-bootstrap 127.0.37.1:9092 --topic bench \
  --group kafka
settle "$DIR/k1"
start_aqueduct "$DIR/n3" 3 127.0.38
run "native 3 nodes RF=3" --server "$SERVERS" --topic bench --replication-factor 3 \
  --group native
settle "$DIR/n3"
start_aqueduct "$DIR/k3" 3 127.0.39
run "Kafka port 3 nodes RF=3" --system kafka --replication-factor 3 \
  --kafka-bootstrap 127.0.39.1:9092,127.0.39.2:9092,127.0.39.3:9092 --topic bench --group kafka
settle "$DIR/k3"

python3 - "$RESULTS" "$MODE" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
mode = sys.argv[2]
lat = {"consume": "poll_latency_ms", "e2e": "e2e_latency_ms"}[mode]
by = {r["label"]: r for r in rows}
print(f"\n{mode} in a group of {rows[0]['consumers']} over {rows[0]['partitions']} partitions: "
      f"{rows[0]['record_size']} B records")
print(f"{'system':<26} {'msgs/s':>10} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
      f"{'consumed':>9} {'joining':>8}")
for r in rows:
    l = r[lat]
    print(f"{r['label']:<26} {r['msgs_per_s']:>10.0f} {r['mb_per_s']:>8.1f} {l['p50']:>8.2f} "
          f"{l['p99']:>8.2f} {l['p99_9']:>9.2f} {r['consumed']:>9} "
          f"{r.get('consumed_while_joining', 0):>8}")
print(f"\n{'ratio':<48} {'msgs/s':>8} {'p99':>8}")
for k, n in [("Kafka port 1 node", "native 1 node"),
             ("Kafka port 3 nodes RF=3", "native 3 nodes RF=3")]:
    if k in by and n in by:
        ra = by[k]["msgs_per_s"] / max(by[n]["msgs_per_s"], 1e-9)
        rp = by[k][lat]["p99"] / max(by[n][lat]["p99"], 1e-9)
        print(f"{k + ' / ' + n:<48} {ra:>7.2f}x {rp:>7.2f}x")
PY
