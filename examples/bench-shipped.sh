#!/usr/bin/env bash
# The shipped plugins under load, in one run, alternating, with redis-benchmark:
#
# 1. What having all four loaded costs: direct Redis, respire without plugins, and respire
#    with acl, rate-limit, cache-policy and metrics (their sample settings; the rate limit
#    raised so that it takes tokens but never refuses) — SET and GET, 50 clients, 32-byte
#    values, pipeline 1 and 16.
# 2. What the cache gives on a read-heavy mix: 40 clients GET and 10 clients SET at the
#    same time (80% / 20%) over a hot set of 1000 keys, against direct Redis, respire
#    without plugins and respire with cache-policy caching those keys.
#
#   bash examples/bench-shipped.sh        # ROUNDS=3 REQUESTS=200000 PIPELINES="1 16"
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-200000}
CLIENTS=${CLIENTS:-50}
WORKERS=${WORKERS:-1}
TESTS=${TESTS:-set,get}
PIPELINES=${PIPELINES:-"1 16"}

source examples/common.sh
ensure_commands redis-server:redis-server redis-benchmark:redis-tools
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked -p respire >/dev/null
cargo build --release --locked --target wasm32-wasip2 \
  -p respire-plugin-acl -p respire-plugin-rate-limit -p respire-plugin-metrics -p respire-plugin-cache-policy >/dev/null

start_work

# All four, with their sample settings (the rate limit raised out of the way).
copy_shipped_plugins "$work/all"
mkdir -p "$work/cache"
printf 'order = 20\n[[config.rules]]\nname = "per-client"\nrate = 1e12\nby = ["client"]\n' > "$work/all/rate-limit.toml"
# The cache alone, over redis-benchmark's keys.
cp "$target_dir"/wasm32-wasip2/release/cache_policy.wasm "$work/cache/cache-policy.wasm"
printf '[config]\nmax_memory = "64MiB"\n[[config.rules]]\nkeys = "key:*"\nttl = "60s"\n' > "$work/cache/cache-policy.toml"

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
wait_port "$redis_port"

start_respire() { # VAR NAME [respire flags…] — starts respire, sets VAR to its port
  local var=$1 name=$2 port; shift 2
  port=$(free_port)
  RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$port" --backend "127.0.0.1:$redis_port" --workers "$WORKERS" \
    --plugin-cache "$work/artifacts" "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
  wait_port "$port"
  printf -v "$var" '%s' "$port"
}
start_respire plain_port plain
start_respire all_port all --plugins "$work/all"
start_respire cache_port cache --plugins "$work/cache"
# The cache serves once its tracking connection is up (the first reads it is asked to keep open it).
sleep 1

declare -A results
bench_rounds "direct:$redis_port respire:$plain_port plugins:$all_port"

printf '\nAll four shipped plugins loaded\n%-5s %-3s %12s %12s %12s %10s %14s\n' test P direct respire +4plugins respire/d plugins/respire
for p in $PIPELINES; do
  for t in ${TESTS//,/ }; do
    d=$(echo "${results["direct,$t,$p"]}" | median)
    r=$(echo "${results["respire,$t,$p"]}" | median)
    w=$(echo "${results["plugins,$t,$p"]}" | median)
    printf '%-5s %-3s %12.0f %12.0f %12.0f %10.2f %14.2f\n' "$t" "$p" "$d" "$r" "$w" \
      "$(echo "$r / $d" | bc -l)" "$(echo "$w / $r" | bc -l)"
  done
done

# The read-heavy mix: GET and SET clients at once; ops/s is the sum of both.
mix() { # PORT — prints total ops/s
  local get set
  redis-benchmark -p "$1" -t get -n $((REQUESTS * 4 / 5)) -c 40 -d 32 -r 1000 --csv 2>/dev/null | rps > "$work/get.out" &
  local g=$!
  set=$(redis-benchmark -p "$1" -t set -n $((REQUESTS / 5)) -c 10 -d 32 -r 1000 --csv 2>/dev/null | rps)
  wait $g
  get=$(cat "$work/get.out")
  echo "$get + $set" | bc -l
}
# Fill the hot set once.
redis-benchmark -p "$redis_port" -t set -n 20000 -c 10 -d 32 -r 1000 -q >/dev/null 2>&1
declare -A mixed
for round in $(seq "$ROUNDS"); do
  for target in "direct:$redis_port" "respire:$plain_port" "cache:$cache_port"; do
    mixed["${target%%:*}"]+="$(mix "${target##*:}") "
  done
  echo "mix round $round of $ROUNDS done" >&2
done
d=$(echo "${mixed[direct]}" | median); r=$(echo "${mixed[respire]}" | median); c=$(echo "${mixed[cache]}" | median)
printf '\n80%% GET / 20%% SET on 1000 hot keys (50 clients, pipeline 1)\n%12s %12s %12s %10s %10s %12s\n' direct respire +cache respire/d cache/d cache/respire
printf '%12.0f %12.0f %12.0f %10.2f %10.2f %12.2f\n' "$d" "$r" "$c" "$(echo "$r / $d" | bc -l)" "$(echo "$c / $d" | bc -l)" "$(echo "$c / $r" | bc -l)"
echo
echo "machine: $(nproc) cores; $REQUESTS requests x $ROUNDS rounds, 32-byte values; workers=$WORKERS"
