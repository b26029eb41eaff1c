#!/usr/bin/env bash
# Side-by-side throughput: direct Redis, respire and twemproxy (nutcracker) in
# one run, alternating, with redis-benchmark (SET and GET, 50 clients, 32-byte
# values, pipeline 1 and 16). Prints ops/s (median of ROUNDS) and ratios to
# direct Redis. Everything runs on 127.0.0.1 and stops at the end.
#
#   bash examples/bench.sh            # ROUNDS=3 REQUESTS=200000 by default
#   ROUNDS=5 REQUESTS=500000 WORKERS=1 bash examples/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-200000}
CLIENTS=${CLIENTS:-50}
WORKERS=${WORKERS:-1}
TESTS=${TESTS:-set,get}
PIPELINES=${PIPELINES:-"1 16"}

source examples/common.sh
ensure_commands redis-server:redis-server redis-benchmark:redis-tools nutcracker:nutcracker
cargo build --release --locked -p respire >/dev/null


work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# PIN=1: Redis on core 0, the proxy on core 1 (the benchmark client floats).
# PIN=0 (default): the scheduler places everything.
PIN=${PIN:-0}
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  PIN_REDIS="taskset -c 0"; PIN_PROXY="taskset -c 1"
else
  PIN_REDIS=""; PIN_PROXY=""
fi

redis_port=$(free_port)
$PIN_REDIS redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
wait_port "$redis_port"

respire_port=$(free_port)
RUST_LOG=warn $PIN_PROXY target/release/respire --listen "127.0.0.1:$respire_port" --backend "127.0.0.1:$redis_port" --workers "$WORKERS" 2>"$work/respire.log" &
pids+=($!)
wait_port "$respire_port"

twem_port=$(free_port)
cat > "$work/nutcracker.yml" <<YML
bench:
  listen: 127.0.0.1:$twem_port
  hash: fnv1a_64
  distribution: ketama
  redis: true
  servers:
   - 127.0.0.1:$redis_port:1
YML
$PIN_PROXY nutcracker -c "$work/nutcracker.yml" -s "$(free_port)" -a 127.0.0.1 -o "$work/nutcracker.log" &
pids+=($!)
wait_port "$twem_port"

declare -A results
targets="direct:$redis_port respire:$respire_port twemproxy:$twem_port"
bench_rounds "$targets"

printf '\n%-5s %-3s %12s %12s %12s %9s %9s\n' test P direct respire twemproxy respire/d twem/d
for p in $PIPELINES; do
  for t in ${TESTS//,/ }; do
    d=$(echo "${results["direct,$t,$p"]}" | median)
    r=$(echo "${results["respire,$t,$p"]}" | median)
    w=$(echo "${results["twemproxy,$t,$p"]}" | median)
    printf '%-5s %-3s %12.0f %12.0f %12.0f %9.2f %9.2f\n' "$t" "$p" "$d" "$r" "$w" \
      "$(echo "$r / $d" | bc -l)" "$(echo "$w / $d" | bc -l)"
  done
done
echo
echo "machine: $(nproc) cores; $REQUESTS requests x $ROUNDS rounds, $CLIENTS clients, 32-byte values; respire workers=$WORKERS; PIN=$PIN"
