#!/usr/bin/env bash
# respire's benchmark report: everything BENCHMARKS.md shows for one Redis, in one run.
#
# Direct Redis, respire, respire with the four shipped plugins, twemproxy (nutcracker) and the
# floor (tests/src/bin/floor.rs: the least a multiplexing proxy can do, a yardstick) run side
# by side and are measured alternately, round after round, so that drift on a shared
# machine hits them alike; the tables give medians. By default (PIN=1) Redis is pinned to
# core 0 and every proxy to core 1; the load generators float.
#
# Sections (SECTIONS, default all):
#   throughput  redis-benchmark SET and GET, 50 clients, 32-byte values, pipeline 1 and 16:
#               ops/s, ratio to direct, p50/p99, proxy CPU seconds per million requests
#   mix         20% SET / 80% GET over 100,000 keys, 50 and 200 connections, no pipelining
#               (respire's loadgen, closed loop): the same columns
#   latency     open loop at 25/50/75/100% of respire's saturation on the mix, direct and
#               respire at the same rates: p50/p99/p99.9 and what respire adds
#   memory      10,000 idle connections (each PINGs once): RSS per connection for respire,
#               Redis and twemproxy
#   workers     respire with 1 and 2 workers, nothing pinned: GET pipeline 16 and the mix
#   pubsub      1 and 50 subscribers through the target, one publisher on Redis, 64-byte
#               messages (loadgen --subscribers): messages/s per subscriber, delivery latency,
#               proxy CPU per million deliveries (twemproxy has no pub/sub)
#
# TARGETS narrows the throughput and mix sections, e.g. TARGETS="direct respire floor".
#
#   bash examples/bench-report.sh
#   ROUNDS=5 REQUESTS=500000 SECTIONS="throughput mix" bash examples/bench-report.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-200000}
PIN=${PIN:-1}
SECTIONS=${SECTIONS:-"throughput mix latency memory workers pubsub"}
IDLE=${IDLE:-10000}
LATENCY_SECONDS=${LATENCY_SECONDS:-5}

source examples/common.sh
ensure_commands redis-server:redis-server redis-benchmark:redis-tools nutcracker:nutcracker bc:bc taskset:util-linux
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --release --locked -p respire -p respire-tests --bin respire --bin loadgen --bin floor >/dev/null
cargo build --release --locked --target wasm32-wasip2 \
  -p respire-plugin-acl -p respire-plugin-rate-limit -p respire-plugin-metrics -p respire-plugin-cache-policy >/dev/null
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ]; then
  PIN_REDIS="taskset -c 0"; PIN_PROXY="taskset -c 1"
else
  PIN_REDIS=""; PIN_PROXY=""
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# The four shipped plugins with their sample settings; the rate limit takes a token per
# command but never refuses.
copy_shipped_plugins "$work/all"
printf 'order = 20\n[[config.rules]]\nname = "per-client"\nrate = 1e12\nby = ["client"]\n' > "$work/all/rate-limit.toml"
printf 'max_clients = %s\n' "$((IDLE + 1000))" > "$work/respire.toml"

redis_port=$(free_port)
$PIN_REDIS redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --maxclients "$((IDLE + 1000))" \
  --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
redis_pid=$!
wait_port "$redis_port"

declare -A pid_of port_of
start_respire() { # NAME PIN WORKERS [flags…]
  local name=$1 pin=$2 workers=$3 port; shift 3
  port=$(free_port)
  RUST_LOG=warn $pin "$target_dir"/release/respire --listen "127.0.0.1:$port" --backend "127.0.0.1:$redis_port" --workers "$workers" \
    --config "$work/respire.toml" --plugin-cache "$work/artifacts" "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
  pid_of[$name]=$!
  port_of[$name]=$port
  wait_port "$port"
}
start_respire respire "$PIN_PROXY" 1
start_respire plugins "$PIN_PROXY" 1 --plugins "$work/all"
twem_port=$(free_port)
printf 'bench:\n  listen: 127.0.0.1:%s\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  servers:\n   - 127.0.0.1:%s:1\n' \
  "$twem_port" "$redis_port" > "$work/nutcracker.yml"
$PIN_PROXY nutcracker -c "$work/nutcracker.yml" -s "$(free_port)" -a 127.0.0.1 -o "$work/nutcracker.log" &
pids+=($!)
pid_of[twemproxy]=$!
port_of[twemproxy]=$twem_port
wait_port "$twem_port"
# The floor: the least a multiplexing proxy can do (tests/src/bin/floor.rs), as a yardstick.
floor_port=$(free_port)
$PIN_PROXY "$target_dir"/release/floor --listen "127.0.0.1:$floor_port" --backend "127.0.0.1:$redis_port" 2>"$work/floor.log" &
pids+=($!)
pid_of[floor]=$!
port_of[floor]=$floor_port
wait_port "$floor_port"
port_of[direct]=$redis_port
targets=${TARGETS:-"direct respire plugins twemproxy floor"}

# Seconds in fields N and N+1 of /proc/PID/stat, counted after the command name.
stat_seconds() { awk -v hz="$(getconf CLK_TCK)" -v n="$2" '{ sub(/.*\) /, ""); split($0, f, " "); print (f[n] + f[n + 1]) / hz }' "/proc/$1/stat"; }
cpu_of() { stat_seconds "$1" 12; }          # utime + stime
children_cpu() { stat_seconds "$$" 14; }    # cutime + cstime: this script's finished children (the load generators)
rss_of() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
field() { sed -E "s/.*$1=([0-9.]+).*/\\1/" <<<"$2"; }
fmt() { printf "%.${2:-2}f" "$1"; }

# Fill the keys once so that GETs find values.
"$target_dir"/release/loadgen --port "$redis_port" --clients 50 --requests 200000 --ratio 1:0 >/dev/null

declare -A ops p50 p99 p999 cpu rcpu gcpu

# Runs one measurement of KIND ("bench" for redis-benchmark arguments, "load" for loadgen
# arguments) against NAME, recording ops/s, latency and CPU under KEY: the proxy's, Redis's
# and the load generator's, each in seconds per million requests.
measure() { # KEY NAME REQUESTS KIND ARGS…
  local key=$1 name=$2 n=$3 kind=$4; shift 4
  local port=${port_of[$name]} before=0 line
  [ -n "${pid_of[$name]:-}" ] && before=$(cpu_of "${pid_of[$name]}")
  local redis_before gen_before
  redis_before=$(cpu_of "$redis_pid"); gen_before=$(children_cpu)
  if [ "$kind" = bench ]; then
    line=$(redis-benchmark -p "$port" -n "$n" "$@" --csv 2>/dev/null | awk -F',' '/^"/ && !/^"test"/ { gsub(/"/, ""); split($0, f, ","); print "ops=" f[2] " p50_ms=" f[5] " p99_ms=" f[7]; exit }')
    ops[$key]+="$(field ops "$line") "; p50[$key]+="$(echo "$(field p50_ms "$line") * 1000" | bc -l) "; p99[$key]+="$(echo "$(field p99_ms "$line") * 1000" | bc -l) "
  else
    line=$("$target_dir"/release/loadgen --port "$port" "$@")
    ops[$key]+="$(field ops "$line") "; p50[$key]+="$(field p50_us "$line") "; p99[$key]+="$(field p99_us "$line") "; p999[$key]+="$(field p999_us "$line") "
    n=$(field requests "$line")
  fi
  if [ -n "${pid_of[$name]:-}" ]; then
    cpu[$key]+="$(echo "($(cpu_of "${pid_of[$name]}") - $before) * 1000000 / $n" | bc -l) "
  fi
  rcpu[$key]+="$(echo "($(cpu_of "$redis_pid") - $redis_before) * 1000000 / $n" | bc -l) "
  gcpu[$key]+="$(echo "($(children_cpu) - $gen_before) * 1000000 / $n" | bc -l) "
}
# The CPU columns of KEY: proxy | Redis | load generator | all three.
cpu_cols() {
  local k=$1 proxy=0 c="–" r g
  if [ -n "${cpu[$k]:-}" ]; then proxy=$(med "${cpu[$k]}"); c=$(fmt "$proxy"); fi
  r=$(med "${rcpu[$k]}"); g=$(med "${gcpu[$k]}")
  echo "$c | $(fmt "$r") | $(fmt "$g") | $(fmt "$(echo "$proxy + $r + $g" | bc -l)")"
}
med() { echo "${1:-}" | median; }

has() { [[ " $SECTIONS " == *" $1 "* ]]; }
echo "# respire benchmark report"
echo
echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/^Mem:/ { print $2 }') GiB;" \
  "$(redis-server --version | awk '{ print $1, $2, $3 }'), $(nutcracker --version 2>&1 | head -1); PIN=$PIN; $ROUNDS rounds, medians."

if has throughput; then
  for round in $(seq "$ROUNDS"); do
    for p in 1 16; do for t in set get; do for name in $targets; do
      measure "tp,$t,$p,$name" "$name" "$REQUESTS" bench -t "$t" -c 50 -d 32 -P "$p" -r 100000
    done; done; done
    echo "throughput: round $round of $ROUNDS done" >&2
  done
  echo
  echo "## SET and GET, 50 clients, 32-byte values (redis-benchmark, $REQUESTS requests)"
  echo
  echo "CPU columns: seconds per million requests, of the proxy, of Redis, of the load generator, and of all three."
  echo
  echo "| test | pipeline | target | ops/s | × direct | p50 µs | p99 µs | proxy CPU | Redis CPU | load gen CPU | all CPU |"
  echo "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for p in 1 16; do for t in set get; do
    d=$(med "${ops[tp,$t,$p,direct]}")
    for name in $targets; do
      k="tp,$t,$p,$name"; o=$(med "${ops[$k]}")
      echo "| ${t^^} | $p | $name | $(fmt "$o" 0) | $(fmt "$(echo "$o / $d" | bc -l)") | $(fmt "$(med "${p50[$k]}")" 0) | $(fmt "$(med "${p99[$k]}")" 0) | $(cpu_cols "$k") |"
    done
  done; done
fi

if has mix || has latency; then
  for round in $(seq "$ROUNDS"); do
    for c in 50 200; do for name in $targets; do
      measure "mix,$c,$name" "$name" "$REQUESTS" load --clients "$c" --requests "$REQUESTS" --ratio 1:4
    done; done
    echo "mix: round $round of $ROUNDS done" >&2
  done
fi
if has mix; then
  echo
  echo "## 20% SET / 80% GET over 100,000 keys, 32-byte values, no pipelining (loadgen, closed loop, $REQUESTS requests)"
  echo
  echo "| connections | target | ops/s | × direct | p50 µs | p99 µs | proxy CPU | Redis CPU | load gen CPU | all CPU |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  for c in 50 200; do
    d=$(med "${ops[mix,$c,direct]}")
    for name in $targets; do
      k="mix,$c,$name"; o=$(med "${ops[$k]}")
      echo "| $c | $name | $(fmt "$o" 0) | $(fmt "$(echo "$o / $d" | bc -l)") | $(med "${p50[$k]}") | $(med "${p99[$k]}") | $(cpu_cols "$k") |"
    done
  done
fi

if has latency; then
  sat=$(med "${ops[mix,50,respire]}")
  for round in $(seq "$ROUNDS"); do
    for f in 25 50 75 100; do
      rate=$(echo "$sat * $f / 100" | bc -l)
      for name in direct respire floor; do
        [[ " $targets " == *" $name "* ]] || continue
        measure "lat,$f,$name" "$name" 0 load --clients 50 --rate "$rate" --seconds "$LATENCY_SECONDS" --ratio 1:4 --threads 1
      done
    done
    echo "latency: round $round of $ROUNDS done" >&2
  done
  echo
  echo "## Latency against load: the mix, 50 connections, open loop at fractions of respire's saturation ($(fmt "$sat" 0) ops/s)"
  echo
  # The floor's columns when it is among the targets: what any multiplexing proxy adds here.
  floor_on=0; [[ " $targets " == *" floor "* ]] && floor_on=1
  if [ "$floor_on" = 1 ]; then
    echo "| load | rate ops/s | direct p50 / p99 / p99.9 µs | respire p50 / p99 / p99.9 µs | respire adds at p99 µs | floor p50 / p99 / p99.9 µs | floor adds at p99 µs |"
    echo "|---:|---:|---|---|---:|---|---:|"
  else
    echo "| load | rate ops/s | direct p50 / p99 / p99.9 µs | respire p50 / p99 / p99.9 µs | respire adds at p99 µs |"
    echo "|---:|---:|---|---|---:|"
  fi
  for f in 25 50 75 100; do
    dp99=$(med "${p99[lat,$f,direct]}"); rp99=$(med "${p99[lat,$f,respire]}")
    row="| $f% | $(fmt "$(echo "$sat * $f / 100" | bc -l)" 0) | $(med "${p50[lat,$f,direct]}") / $dp99 / $(med "${p999[lat,$f,direct]}") | $(med "${p50[lat,$f,respire]}") / $rp99 / $(med "${p999[lat,$f,respire]}") | $(echo "$rp99 - $dp99" | bc) |"
    if [ "$floor_on" = 1 ]; then
      fp99=$(med "${p99[lat,$f,floor]}")
      row+=" $(med "${p50[lat,$f,floor]}") / $fp99 / $(med "${p999[lat,$f,floor]}") | $(echo "$fp99 - $dp99" | bc) |"
    fi
    echo "$row"
  done
fi

if has memory; then
  echo
  echo "## Memory: $IDLE idle connections (each sent one PING)"
  echo
  echo "| target | RSS before KiB | RSS with idle connections KiB | per connection bytes |"
  echo "|---|---:|---:|---:|"
  for name in direct respire twemproxy; do
    pid=${pid_of[$name]:-$redis_pid}
    before=$(rss_of "$pid")
    "$target_dir"/release/loadgen --port "${port_of[$name]}" --idle "$IDLE" --seconds 4 > "$work/idle.out" &
    idle_pid=$!
    for _ in $(seq 300); do grep -q '^idle=' "$work/idle.out" 2>/dev/null && break; sleep 0.1; done
    sleep 1
    with=$(rss_of "$pid")
    wait "$idle_pid" || true
    echo "| $name | $before | $with | $(( (with - before) * 1024 / IDLE )) |"
  done
fi

if has workers; then
  start_respire w1 "" 1
  start_respire w2 "" 2
  for round in $(seq "$ROUNDS"); do
    for name in direct w1 w2; do
      measure "wk,get,$name" "$name" "$REQUESTS" bench -t get -c 50 -d 32 -P 16 -r 100000
      measure "wk,mix,$name" "$name" "$REQUESTS" load --clients 50 --requests "$REQUESTS" --ratio 1:4
    done
    echo "workers: round $round of $ROUNDS done" >&2
  done
  echo
  echo "## Workers (nothing pinned): GET pipeline 16 (redis-benchmark) and the mix (loadgen), 50 connections"
  echo
  echo "| target | GET P16 ops/s | × direct | mix ops/s | × direct |"
  echo "|---|---:|---:|---:|---:|"
  dg=$(med "${ops[wk,get,direct]}"); dm=$(med "${ops[wk,mix,direct]}")
  for name in direct w1 w2; do
    g=$(med "${ops[wk,get,$name]}"); m=$(med "${ops[wk,mix,$name]}")
    label=$name; [ "$name" = w1 ] && label="respire, 1 worker"; [ "$name" = w2 ] && label="respire, 2 workers"
    echo "| $label | $(fmt "$g" 0) | $(fmt "$(echo "$g / $dg" | bc -l)") | $(fmt "$m" 0) | $(fmt "$(echo "$m / $dm" | bc -l)") |"
  done
fi

if has pubsub; then
  messages=$((REQUESTS / 2))
  for round in $(seq "$ROUNDS"); do
    for n in 1 50; do for name in direct respire plugins; do
      measure "ps,$n,$name" "$name" 0 load --subscribers "$n" --publish-port "$redis_port" --requests "$messages" --size 64 --pipeline 16
    done; done
    echo "pubsub: round $round of $ROUNDS done" >&2
  done
  echo
  echo "## Pub/sub fan-out: $messages PUBLISHes of 64 bytes on Redis, subscribers through the target (loadgen --subscribers)"
  echo
  echo "The publisher stays within 1,000 messages of the slowest subscriber; latency is from PUBLISH to delivery."
  echo
  echo "| subscribers | target | messages/s per subscriber | × direct | p50 µs | p99 µs | proxy CPU s per M deliveries |"
  echo "|---:|---|---:|---:|---:|---:|---:|"
  for n in 1 50; do
    d=$(med "${ops[ps,$n,direct]}")
    for name in direct respire plugins; do
      k="ps,$n,$name"; o=$(med "${ops[$k]}")
      cp="–"; [ -n "${cpu[$k]:-}" ] && cp=$(fmt "$(med "${cpu[$k]}")")
      echo "| $n | $name | $(fmt "$o" 0) | $(fmt "$(echo "$o / $d" | bc -l)") | $(med "${p50[$k]}") | $(med "${p99[$k]}") | $cp |"
    done
  done
fi
