#!/usr/bin/env bash
# MQTT fan-out: one publisher, AQ_SUBSCRIBERS (default 1,000) subscribers to one topic, the
# same load (`aqueduct bench mqtt-fanout`, rumqttc, one connection each) against Debian's
# mosquitto (one broker, in memory) and against Aqueduct's general MQTT broker on 1 node and
# on 3 nodes (subscribers spread over the 3; every message goes through aq.mqtt-messages,
# replicated 3 ways, before any node hands it out), in one run. Reports deliveries/s, the
# share delivered and publish→delivery latency, and the ratio to mosquitto.
#
# Usage: benches/mqtt-fanout.sh [extra `aqueduct bench mqtt-fanout` flags...]
# Defaults: QoS 1, AQ_RATE (default 50) messages/s for 15 s, 64-byte payloads. Data goes
# under $AQ_BENCH_DIR (default /var/tmp/aq-fanout, a real disk). Needs mosquitto.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
DIR=${AQ_BENCH_DIR:-/var/tmp/aq-fanout}
SUBS=${AQ_SUBSCRIBERS:-1000}
RATE=${AQ_RATE:-50}
LOAD=(--subscribers "$SUBS" --rate "$RATE" --duration 15 "$@")
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
  out=$("$BIN" bench mqtt-fanout "$@" "${LOAD[@]}" --json)
  echo "$out" >&2
  echo "$out" | jq -c --arg name "$label" '. + {label: $name}' >>"$RESULTS"
}
settle() { stop_all; rm -rf "$1"; sync; sleep 2; }
# A just-started node creates its MQTT system topics first (CONNACKs wait meanwhile): warm it
# up with a small run, so the figures are of a serving cluster, as mosquitto's are.
warm() { "$BIN" bench mqtt-fanout --subscribers 10 --rate 10 --duration 2 --addr "$1" --json >/dev/null; }

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
run "mosquitto (memory)" --system mosquitto --addr 127.0.40.1:1884
stop_all; sleep 1

export AQUEDUCT_MQTT_ALLOW_ANONYMOUS=true
start_aqueduct "$DIR/a1" 1 127.0.41
warm 127.0.41.1:1883
run "Aqueduct 1 node" --system aqueduct --addr 127.0.41.1:1883
settle "$DIR/a1"

start_aqueduct "$DIR/a3" 3 127.0.42
warm 127.0.42.1:1883,127.0.42.2:1883,127.0.42.3:1883
run "Aqueduct 3 nodes RF=3" --system aqueduct \
  --addr 127.0.42.1:1883,127.0.42.2:1883,127.0.42.3:1883
settle "$DIR/a3"

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {r["label"]: r for r in rows}
r0 = rows[0]
print(f"\n1 publisher -> {r0['subscribers']} subscribers, QoS {r0['qos']}, {r0['rate']} msgs/s "
      f"({r0['expected']} deliveries expected)")
print(f"{'system':<24} {'deliv/s':>9} {'share':>7} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}")
for r in rows:
    l = r["latency_ms"]
    print(f"{r['label']:<24} {r['deliveries_per_s']:>9.0f} {r['delivered_ratio']:>7.3f} "
          f"{l['p50']:>8.2f} {l['p99']:>8.2f} {l['p99_9']:>9.2f}")
m = by.get("mosquitto (memory)")
for k in ["Aqueduct 1 node", "Aqueduct 3 nodes RF=3"]:
    if m and k in by:
        print(f"{k} / mosquitto: {by[k]['deliveries_per_s'] / max(m['deliveries_per_s'], 1e-9):.2f}x "
              f"deliveries/s, p50 {by[k]['latency_ms']['p50'] / max(m['latency_ms']['p50'], 1e-9):.2f}x, "
              f"p99 {by[k]['latency_ms']['p99'] / max(m['latency_ms']['p99'], 1e-9):.2f}x")
PY
