# Shared by the bench scripts: the release binary, a data directory on a real disk (tmpfs
# would make fsync free), and helpers that start Aqueduct nodes and stop everything on exit.
BIN=${CARGO_TARGET_DIR:-/var/tmp/aqueduct-target}/release/aqueduct
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}
trap stop_all EXIT
need_release() {
  [ -x "$BIN" ] || { echo "no release binary at $BIN: run make release" >&2; exit 1; }
}
start_node() { # dir id host [join]
  local dir=$1 id=$2 host=$3 join=${4:-}
  AQUEDUCT_LOG=warn "$BIN" serve --node-id "$id" --data-dir "$dir/n$id" --listen-host "$host" \
    ${join:+--join "$join"} >"$dir/n$id.log" 2>&1 &
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
start_aqueduct() { # dir n-nodes prefix (127.0.X): sets SERVERS (the --server list)
  local dir=$1 n=$2 prefix=$3
  mkdir -p "$dir"
  start_node "$dir" 1 "$prefix.1"
  wait_members 1 "$prefix.1:7070"
  local servers="$prefix.1:7070"
  for i in $(seq 2 "$n"); do
    start_node "$dir" "$i" "$prefix.$i" "$prefix.1:7070"
    servers="$servers,$prefix.$i:7070"
  done
  wait_members "$n" "$prefix.1:7070"
  SERVERS=$servers
}
