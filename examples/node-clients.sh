#!/usr/bin/env bash
# Node.js's Redis clients through respire (not part of CI: it fetches them from npm): ioredis's
# and node-redis's cluster clients against respire in front of a 3-master/3-replica cluster,
# node-redis with RESP3, and a master killed under ioredis's cluster client.
# See examples/node-clients.js for the checks; the exit code is 1 if one failed.
#
#   bash examples/node-clients.sh
#   IOREDIS=5.4.2 NODE_REDIS=4.7.0 bash examples/node-clients.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools node:nodejs npm:npm
cargo build --release --locked -p respire >/dev/null

work=$(mktemp -d)
pids=()
cleanup() {
  for f in "$work"/*/pid; do [ -f "$f" ] && pids+=("$(cat "$f")"); done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$work" && npm init -y >/dev/null && npm install --silent --no-audit --no-fund \
  "ioredis@${IOREDIS:-latest}" "redis@${NODE_REDIS:-latest}" >/dev/null)
echo "==> ioredis $(node -p "require('$work/node_modules/ioredis/package.json').version"), node-redis $(node -p "require('$work/node_modules/redis/package.json').version")"

start_cluster "$work"
port=$(free_port)
RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$port" --cluster "127.0.0.1:${ports[0]}" \
  2>"$work/respire.log" &
pids+=($!)
wait_port "$port"
# A master with a replica (every master has one after start_cluster).
master=$(redis-cli -p "${ports[0]}" cluster nodes | awk '$3 ~ /master/ {split($2, a, "[:@]"); print a[2]; exit}')
NODE_PATH="$work/node_modules" node examples/node-clients.js "$port" "$(cat "$work/$master/pid")"
