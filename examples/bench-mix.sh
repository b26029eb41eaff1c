#!/usr/bin/env bash
# The seed's headline workload: 20% SET / 80% GET over 100,000 keys, 32-byte values, no
# pipelining, with 50 and 200 connections — against direct Redis, respire, respire with the
# four shipped plugins, and twemproxy (nutcracker), in one run, alternating. Load comes from
# respire's own load generator (tests/src/bin/loadgen.rs: exact latency percentiles). Prints
# ops/s, p50/p99 latency, ratios to direct Redis, and each proxy's CPU seconds per million
# requests (from /proc/PID/stat).
#
#   bash examples/bench-mix.sh           # ROUNDS=3 REQUESTS=200000 CONNS="50 200" PIN=0
#   PIN=1 bash examples/bench-mix.sh     # Redis on core 0, proxies on core 1
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-200000}
CONNS=${CONNS:-"50 200"}
WORKERS=${WORKERS:-1}
PIPELINE=${PIPELINE:-1}
PIN=${PIN:-0}

source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools nutcracker:nutcracker
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked -p respire -p respire-tests --bin respire --bin loadgen >/dev/null
cargo build --release --locked --target wasm32-wasip2 \
  -p respire-plugin-acl -p respire-plugin-rate-limit -p respire-plugin-metrics -p respire-plugin-cache-policy >/dev/null

if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  PIN_REDIS="taskset -c 0"; PIN_PROXY="taskset -c 1"
else
  PIN_REDIS=""; PIN_PROXY=""
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/all"
for p in acl rate-limit cache-policy metrics; do
  cp "target/wasm32-wasip2/release/${p//-/_}.wasm" "$work/all/$p.wasm"
  cp "plugins/$p/$p.toml" "$work/all/$p.toml"
done
printf 'order = 20\n[[config.rules]]\nname = "per-client"\nrate = 1e12\nby = ["client"]\n' > "$work/all/rate-limit.toml"

redis_port=$(free_port)
$PIN_REDIS redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
wait_port "$redis_port"

declare -A pid_of
start_respire() { # NAME [flags…]
  local name=$1 port; shift
  port=$(free_port)
  RUST_LOG=warn $PIN_PROXY target/release/respire --listen "127.0.0.1:$port" --backend "127.0.0.1:$redis_port" --workers "$WORKERS" \
    --plugin-cache "$work/artifacts" "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
  pid_of[$name]=$!
  wait_port "$port"
  targets+=" $name:$port"
}
targets="direct:$redis_port"
start_respire respire
start_respire plugins --plugins "$work/all"
twem_port=$(free_port)
printf 'bench:\n  listen: 127.0.0.1:%s\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  servers:\n   - 127.0.0.1:%s:1\n' \
  "$twem_port" "$redis_port" > "$work/nutcracker.yml"
$PIN_PROXY nutcracker -c "$work/nutcracker.yml" -s "$(free_port)" -a 127.0.0.1 -o "$work/nutcracker.log" &
pids+=($!)
pid_of[twemproxy]=$!
wait_port "$twem_port"
targets+=" twemproxy:$twem_port"

# CPU seconds (user + system) a process has used.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); split($0, f, " "); print (f[12] + f[13]) / hz }' "/proc/$1/stat"; }

# Fill the keys once so that GETs find values.
target/release/loadgen --port "$redis_port" --clients 50 --requests 200000 --ratio 1:0 >/dev/null

declare -A ops p50 p99 cpu
for round in $(seq "$ROUNDS"); do
  for c in $CONNS; do
    for t in $targets; do
      name=${t%%:*}; port=${t##*:}
      before=0; [ -n "${pid_of[$name]:-}" ] && before=$(cpu_of "${pid_of[$name]}")
      line=$(target/release/loadgen --port "$port" --clients "$c" --requests "$REQUESTS" --ratio 1:4 --pipeline "$PIPELINE")
      if [ -n "${pid_of[$name]:-}" ]; then
        used=$(echo "$(cpu_of "${pid_of[$name]}") - $before" | bc -l)
        cpu["$name,$c"]+="$(echo "$used * 1000000 / $REQUESTS" | bc -l) "
      fi
      ops["$name,$c"]+="$(sed -E 's/.*ops=([0-9.]+).*/\1/' <<<"$line") "
      p50["$name,$c"]+="$(sed -E 's/.*p50_us=([0-9]+).*/\1/' <<<"$line") "
      p99["$name,$c"]+="$(sed -E 's/.*p99_us=([0-9]+).*/\1/' <<<"$line") "
    done
  done
  echo "round $round of $ROUNDS done" >&2
done

printf '\n20%% SET / 80%% GET, pipeline %s (medians of %s rounds of %s requests)\n' "$PIPELINE" "$ROUNDS" "$REQUESTS"
printf '%-6s %-10s %10s %8s %8s %8s %12s\n' conns target ops/s ratio p50_us p99_us cpu_s/M
for c in $CONNS; do
  d=$(echo "${ops[direct,$c]}" | median)
  for t in $targets; do
    name=${t%%:*}
    o=$(echo "${ops[$name,$c]}" | median)
    cpum="-"; [ -n "${cpu[$name,$c]:-}" ] && cpum=$(printf '%.2f' "$(echo "${cpu[$name,$c]}" | median)")
    printf '%-6s %-10s %10.0f %8.2f %8s %8s %12s\n' "$c" "$name" "$o" "$(echo "$o / $d" | bc -l)" \
      "$(echo "${p50[$name,$c]}" | median)" "$(echo "${p99[$name,$c]}" | median)" "$cpum"
  done
done
echo
echo "machine: $(nproc) cores; respire workers=$WORKERS; PIN=$PIN; loadgen: one thread, closed loop"
