#!/usr/bin/env bash
# The respire demo: a local 3-master/3-replica Redis Cluster, respire in front of it with
# the shipped plugins (acl, rate-limit, cache-policy, metrics) loaded and metrics served, and what to try.
# Installs what is missing, builds respire, and stops everything on Ctrl-C.
#
#   bash examples/demo.sh                 # respire on 127.0.0.1:6380
#   RESPIRE_PORT=7380 METRICS_PORT=9479 bash examples/demo.sh
#   DEMO_SECONDS=5 bash examples/demo.sh  # stop by itself after 5 seconds (for tests)
#   RESPIRE_BIN=path/to/respire           # use this binary instead of building one
#   PROMETHEUS_PORT=9090                  # where Prometheus listens when it is installed (0: do not start it)
set -euo pipefail
cd "$(dirname "$0")/.."

RESPIRE_PORT=${RESPIRE_PORT:-6380}
METRICS_PORT=${METRICS_PORT:-9379}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}

source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
echo "==> building respire and its plugins"
if [ -z "${RESPIRE_BIN:-}" ]; then
  cargo build --release --locked -p respire
  RESPIRE_BIN="$target_dir"/release/respire
fi
cargo build --release --locked --target wasm32-wasip2 \
  -p respire-plugin-acl -p respire-plugin-rate-limit -p respire-plugin-metrics -p respire-plugin-cache-policy


work=$(mktemp -d)
pids=()
cleanup() {
  echo
  echo "==> stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

echo "==> starting a local Redis Cluster (three masters, three replicas)"
start_cluster "$work"
echo "==> Redis Cluster on ports ${ports[*]}"

# The shipped plugins with their sample settings (the ACL's default user may do anything
# but @dangerous commands).
plugins="$work/plugins"
copy_shipped_plugins "$plugins"

"$RESPIRE_BIN" --listen "127.0.0.1:$RESPIRE_PORT" --cluster "127.0.0.1:${ports[0]},127.0.0.1:${ports[1]}" \
  --plugins "$plugins" --metrics "127.0.0.1:$METRICS_PORT" 2> >(tee "$work/respire.log" >&2) &
pids+=($!)
wait_port "$RESPIRE_PORT"
respire_pid=${pids[-1]}

# Prometheus scraping respire, when it is installed (Debian: apt-get install prometheus).
prometheus_note="Prometheus is not installed (apt-get install prometheus): scrape 127.0.0.1:$METRICS_PORT/metrics yourself."
if [ "$PROMETHEUS_PORT" != 0 ] && command -v prometheus >/dev/null 2>&1; then
  mkdir -p "$work/prometheus"
  printf 'global:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: respire\n    static_configs:\n      - targets: ["127.0.0.1:%s"]\n' \
    "$METRICS_PORT" > "$work/prometheus/prometheus.yml"
  prometheus --config.file="$work/prometheus/prometheus.yml" --storage.tsdb.path="$work/prometheus/data" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" >"$work/prometheus/log" 2>&1 &
  pids+=($!)
  prometheus_note="Prometheus scrapes respire: http://127.0.0.1:$PROMETHEUS_PORT/graph?g0.expr=sum%20by%20(command)%20(rate(respire_commands_total%5B1m%5D))"
fi

cat <<EOF

respire is listening on 127.0.0.1:$RESPIRE_PORT in front of a Redis Cluster (masters and
replicas on ports ${ports[*]}).
Try:
  redis-cli -p $RESPIRE_PORT set greeting hello
  redis-cli -p $RESPIRE_PORT mset a 1 b 2 c 3 && redis-cli -p $RESPIRE_PORT mget a b c   # keys on different masters
  redis-cli -p $RESPIRE_PORT dbsize
  redis-cli -p $RESPIRE_PORT -3 hello 3
  redis-cli -p $RESPIRE_PORT cluster slots        # respire presents itself as one node
  redis-cli -p <a replica's port> cluster failover   # respire keeps serving through it
  redis-cli -p $RESPIRE_PORT flushall             # refused by the acl plugin (-NOPERM)
  redis-cli -p $RESPIRE_PORT set user:1 alice && for i in 1 2 3; do redis-cli -p $RESPIRE_PORT get user:1; done
  curl -s 127.0.0.1:$METRICS_PORT/metrics | grep respire_cache_    # the 1st GET turned the cache on, the 2nd filled it, the 3rd was a hit
  redis-cli -p $RESPIRE_PORT metrics.hotkeys      # the most used keys (metrics plugin)
  redis-cli -p $RESPIRE_PORT info stats             # respire's own sections, with Redis's
  redis-cli -p $RESPIRE_PORT slowlog get            # respire's end-to-end slow log
  redis-benchmark -p $RESPIRE_PORT -t set,get -c 50 -q
  curl -s 127.0.0.1:$METRICS_PORT/metrics | grep respire_commands_total
  curl -s 127.0.0.1:$METRICS_PORT/topology        # also /health, /ready, /plugins
$prometheus_note
A Grafana dashboard for these metrics: examples/grafana-dashboard.json.
Plugins are loaded from $plugins: edit a .toml there (say, lower a rate in
rate-limit.toml, or add "-get" to the default rule in acl.toml) and respire reloads it
within a second, without dropping a connection.
Press Ctrl-C to stop.
EOF

# Waiting in the background keeps Ctrl-C (or SIGTERM) prompt.
if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS" &
  pids+=($!)
  wait $!
else
  wait "$respire_pid"
fi
