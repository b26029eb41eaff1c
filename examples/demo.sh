#!/usr/bin/env bash
# The respire demo: a local Redis, respire in front of it, and what to try.
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

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
wait_port "$redis_port"

target/release/respire --listen "127.0.0.1:$RESPIRE_PORT" --backend "127.0.0.1:$redis_port" 2> >(tee "$work/respire.log" >&2) &
pids+=($!)
wait_port "$RESPIRE_PORT"

cat <<EOF

respire is listening on 127.0.0.1:$RESPIRE_PORT in front of Redis on 127.0.0.1:$redis_port.
Try:
  redis-cli -p $RESPIRE_PORT set greeting hello
  redis-cli -p $RESPIRE_PORT get greeting
  redis-cli -p $RESPIRE_PORT -3 hello 3
  redis-cli -p $RESPIRE_PORT client list
  redis-benchmark -p $RESPIRE_PORT -t set,get -c 50 -q
Press Ctrl-C to stop.
EOF

if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
else
  wait "${pids[1]}"
fi
