#!/usr/bin/env bash
# The respire demo: a local 3-master/3-replica Redis Cluster, respire in front of it,
# and what to try.
# Installs what is missing, builds respire, and stops everything on Ctrl-C.
#
#   bash examples/demo.sh                 # respire on 127.0.0.1:6380
#   RESPIRE_PORT=7380 bash examples/demo.sh
#   DEMO_SECONDS=5 bash examples/demo.sh  # stop by itself after 5 seconds (for tests)
set -euo pipefail
cd "$(dirname "$0")/.."

RESPIRE_PORT=${RESPIRE_PORT:-6380}

source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools
echo "==> building respire"
cargo build --release --locked -p respire


work=$(mktemp -d)
pids=()
cleanup() {
  echo
  echo "==> stopping"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

# A local Redis Cluster: three masters, three replicas.
ports=()
for _ in 1 2 3 4 5 6; do
  p=$(free_port); mkdir -p "$work/$p"
  redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$work/$p" --logfile "$work/$p/redis.log" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$(free_port)" --cluster-node-timeout 3000 &
  pids+=($!)
  wait_port "$p"
  ports+=("$p")
done
echo "==> creating a Redis Cluster on ports ${ports[*]}"
redis-cli --cluster create $(for p in "${ports[@]}"; do echo "127.0.0.1:$p"; done) --cluster-replicas 1 --cluster-yes >/dev/null
for _ in $(seq 200); do
  redis-cli -p "${ports[0]}" cluster info | grep -q cluster_state:ok && break
  sleep 0.1
done

target/release/respire --listen "127.0.0.1:$RESPIRE_PORT" --cluster "127.0.0.1:${ports[0]},127.0.0.1:${ports[1]}" \
  2> >(tee "$work/respire.log" >&2) &
pids+=($!)
wait_port "$RESPIRE_PORT"

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
  redis-benchmark -p $RESPIRE_PORT -t set,get -c 50 -q
Press Ctrl-C to stop.
EOF

if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
else
  wait "${pids[-1]}"
fi
