#!/usr/bin/env bash
# What plugins cost: direct Redis, respire without plugins and respire with a
# pass-through Wasm plugin called for every command (the request hook; RESPONSES=1
# adds the response hook), in one run, alternating, with redis-benchmark (SET and
# GET, 50 clients, 32-byte values). Prints ops/s (median of ROUNDS) and ratios.
#
#   bash examples/bench-plugins.sh        # ROUNDS=3 REQUESTS=200000 PIPELINES="1 16"
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-200000}
CLIENTS=${CLIENTS:-50}
WORKERS=${WORKERS:-1}
TESTS=${TESTS:-set,get}
PIPELINES=${PIPELINES:-"1 16"}
RESPONSES=${RESPONSES:-0}

source examples/common.sh
ensure_commands redis-server:redis-server redis-benchmark:redis-tools
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked -p respire >/dev/null
cargo build --release --locked --target wasm32-wasip2 -p probe-plugin >/dev/null

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/plugins"
cp target/wasm32-wasip2/release/probe_plugin.wasm "$work/plugins/passthrough.wasm"
responses=false; [ "$RESPONSES" = 1 ] && responses=true
printf '[config]\ntag = "pass"\ncategories = "all"\ncount = false\nresponses = %s\n' "$responses" > "$work/plugins/passthrough.toml"

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
wait_port "$redis_port"

plain_port=$(free_port)
RUST_LOG=warn target/release/respire --listen "127.0.0.1:$plain_port" --backend "127.0.0.1:$redis_port" --workers "$WORKERS" 2>"$work/plain.log" &
pids+=($!)
wait_port "$plain_port"

plug_port=$(free_port)
RUST_LOG=warn target/release/respire --listen "127.0.0.1:$plug_port" --backend "127.0.0.1:$redis_port" --workers "$WORKERS" \
  --plugins "$work/plugins" --plugin-cache "$work/cache" 2>"$work/plugged.log" &
pids+=($!)
wait_port "$plug_port"

declare -A results
targets="direct:$redis_port respire:$plain_port plugin:$plug_port"
bench_rounds "$targets"

printf '\n%-5s %-3s %12s %12s %14s %10s %12s\n' test P direct respire respire+plugin respire/d plugin/resp
for p in $PIPELINES; do
  for t in ${TESTS//,/ }; do
    d=$(echo "${results["direct,$t,$p"]}" | median)
    r=$(echo "${results["respire,$t,$p"]}" | median)
    w=$(echo "${results["plugin,$t,$p"]}" | median)
    printf '%-5s %-3s %12.0f %12.0f %14.0f %10.2f %12.2f\n' "$t" "$p" "$d" "$r" "$w" \
      "$(echo "$r / $d" | bc -l)" "$(echo "$w / $r" | bc -l)"
  done
done
echo
echo "machine: $(nproc) cores; $REQUESTS requests x $ROUNDS rounds, $CLIENTS clients, 32-byte values; workers=$WORKERS; response hook: $responses"
