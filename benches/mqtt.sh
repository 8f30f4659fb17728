#!/usr/bin/env bash
# MQTT: N simulated devices (rumqttc, one connection each) publishing QoS 1 property reports
# against Aqueduct's MQTT front (PUBACK once the record is committed: 1 node, and 3 nodes with
# RF=3) and against Debian's mosquitto without persistence (PUBACK from memory), in one run
# with the same load generator (`aqueduct bench mqtt`). Then the memory of idle connections:
# the node's RSS before and while `AQ_IDLE` (default 10,000) devices are connected.
#
# Usage: benches/mqtt.sh [extra `aqueduct bench mqtt` flags...]
# Defaults: 1,000 devices, 1 publish in flight each, 15 s. Data goes under $AQ_BENCH_DIR
# (default /var/tmp/aq-mqtt, a real disk). Needs mosquitto (apt-get install mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-mqtt}
DEVICES=${AQ_DEVICES:-1000}
IDLE=${AQ_IDLE:-10000}
LOAD=(--devices "$DEVICES" --duration 15 "$@")
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] ||
  { echo "mosquitto not found: apt-get install mosquitto" >&2; exit 1; }
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
make --no-print-directory release >&2
need_release
rm -rf "$DIR"; mkdir -p "$DIR"; sync
RESULTS=$DIR/results.jsonl
: >"$RESULTS"

run() { # label bench-args...
  local label=$1 out; shift
  echo "== $label" >&2
  out=$("$BIN" bench mqtt "$@" "${LOAD[@]}" --json)
  echo "$out" >&2
  echo "$out" | jq -c --arg name "$label" '. + {label: $name}' >>"$RESULTS"
}

register() { # server count: product thermo and devices bench-0.. (plain secret)
  cat >"$DIR/thermo.json" <<'EOF'
{"name":"thermo","services":[{"service_id":"env","properties":[{"name":"temperature","type":"decimal","min":-40,"max":125,"unit":"C","access":"R"}],"commands":[],"events":[]}]}
EOF
  "$BIN" product create --file "$DIR/thermo.json" --server "$1" >/dev/null
  { echo "device_id,product,secret"
    for i in $(seq 0 $(($2 - 1))); do echo "bench-$i,thermo,bench-secret"; done
  } >"$DIR/devices.csv"
  "$BIN" device import --file "$DIR/devices.csv" --server "$1" >/dev/null
}

settle() { stop_all; rm -rf "$1"; sync; sleep 2; }

# mosquitto: in memory, anonymous, no connection limit.
cat >"$DIR/mosquitto.conf" <<EOF
listener 1884 127.0.40.1
allow_anonymous true
persistence false
max_connections -1
max_inflight_messages 0
max_queued_messages 0
EOF
"$MOSQUITTO" -c "$DIR/mosquitto.conf" >"$DIR/mosquitto.log" 2>&1 &
pids+=($!)
sleep 1
run "mosquitto (memory)" --system mosquitto --addr 127.0.40.1:1884 --anonymous
stop_all; sleep 1

start_aqueduct "$DIR/a1" 1 127.0.41
register "$SERVERS" "$IDLE"
run "Aqueduct 1 node" --system aqueduct --addr 127.0.41.1:1883
# Idle connections: the node's RSS before and while IDLE devices are connected.
node_pid=${pids[0]}
rss0=$(ps -o rss= -p "$node_pid")
"$BIN" bench mqtt --addr 127.0.41.1:1883 --devices "$IDLE" --idle 20 --json >"$DIR/idle.json" &
idle_pid=$!
for _ in $(seq 1 120); do [ -s "$DIR/idle.json" ] && break; sleep 0.5; done
sleep 3
rss1=$(ps -o rss= -p "$node_pid")
wait "$idle_pid" || true
jq -c --argjson r0 "$rss0" --argjson r1 "$rss1" \
  '. + {label: "idle connections", rss_before_kib: $r0, rss_connected_kib: $r1,
        kib_per_connection: (($r1 - $r0) / .connected)}' "$DIR/idle.json" >>"$RESULTS"
settle "$DIR/a1"

start_aqueduct "$DIR/a3" 3 127.0.42
register "$SERVERS" "$DEVICES"
run "Aqueduct 3 nodes RF=3" --system aqueduct --addr 127.0.42.1:1883
settle "$DIR/a3"

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["label"]: r for r in rows}
print(f"\nQoS 1 property reports from {rows[0]['devices']} devices, "
      f"{rows[0]['in_flight_per_device']} in flight each")
print(f"{'system':<24} {'msgs/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}")
for r in rows:
    if "msgs_per_s" in r:
        l = r["latency_ms"]
        print(f"{r['label']:<24} {r['msgs_per_s']:>10.0f} {l['p50']:>8.2f} {l['p99']:>8.2f} "
              f"{l['p99_9']:>9.2f}")
m = by.get("mosquitto (memory)")
for k in ["Aqueduct 1 node", "Aqueduct 3 nodes RF=3"]:
    if m and k in by:
        print(f"{k} / mosquitto: {by[k]['msgs_per_s'] / max(m['msgs_per_s'], 1e-9):.2f}x msgs/s, "
              f"p99 {by[k]['latency_ms']['p99'] / max(m['latency_ms']['p99'], 1e-9):.2f}x")
i = by.get("idle connections")
if i:
    print(f"idle: {i['connected']} connections, node RSS {i['rss_before_kib']} -> "
          f"{i['rss_connected_kib']} KiB = {i['kib_per_connection']:.1f} KiB per connection")
PY
