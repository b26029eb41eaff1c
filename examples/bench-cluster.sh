#!/usr/bin/env bash
# Sharded throughput, side by side in one run (alternating, medians of ROUNDS):
#   - a 3-master Redis Cluster behind respire, versus redis-benchmark's own
#     cluster-aware client going direct (--cluster);
#   - three standalone shards behind respire (--shards) and behind twemproxy;
#   - MGET of 10 keys spread over the masters through respire (over the cluster: one
#     sub-command per slot, as Redis Cluster requires; over standalone shards: one per
#     server), and through twemproxy over the same shards, versus MGET of the same 10
#     keys on one standalone Redis.
# SET and GET, 50 clients, 32-byte values, pipeline 16. Everything on 127.0.0.1.
#
#   bash examples/bench-cluster.sh
#   ROUNDS=5 REQUESTS=2000000 bash examples/bench-cluster.sh
# Runs of 1,000,000 requests at least: with 200,000 the cluster-aware client's own start
# (it asks every node for the slots) is a large part of its time, and the cluster ratio
# read 0.82 where it is 0.52.
# The cluster-aware client runs DIRECT_REQUESTS (8 times REQUESTS by default): with
# --cluster, redis-benchmark runs a thread per node and its main thread notices the end on
# its 250 ms progress tick, so its time is rounded up to the next tick (1,000,000 requests
# finished in 1.0–1.25 s all read 1.253 s: 798,085 ops/s). Over 6 s or more the rounding
# is a few percent at most.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-1000000}
DIRECT_REQUESTS=${DIRECT_REQUESTS:-$((REQUESTS * 8))}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-16}
WORKERS=${WORKERS:-1}

source examples/common.sh
ensure_commands redis-server:redis-server redis-benchmark:redis-tools nutcracker:nutcracker
cargo build --release --locked -p respire >/dev/null


start_work

# The cluster.
start_masters 3
# Standalone shards and a single Redis.
shard_ports=()
for _ in 1 2 3; do p=$(free_port); start_redis "$p"; shard_ports+=("$p"); done
single=$(free_port); start_redis "$single"

respire_cluster=$(free_port)
RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$respire_cluster" --cluster "127.0.0.1:${cluster_ports[0]}" --workers "$WORKERS" 2>"$work/r1.log" &
pids+=($!)
respire_shards=$(free_port)
RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$respire_shards" \
  --shards "$(IFS=,; for p in "${shard_ports[@]}"; do printf '127.0.0.1:%s,' "$p"; done | sed 's/,$//')" --workers "$WORKERS" 2>"$work/r2.log" &
pids+=($!)
twem=$(free_port)
{
  echo "bench:"; echo "  listen: 127.0.0.1:$twem"; echo "  hash: fnv1a_64"; echo "  distribution: ketama"; echo "  redis: true"; echo "  servers:"
  for p in "${shard_ports[@]}"; do echo "   - 127.0.0.1:$p:1"; done
} > "$work/nutcracker.yml"
nutcracker -c "$work/nutcracker.yml" -s "$(free_port)" -a 127.0.0.1 -o "$work/nutcracker.log" &
pids+=($!)
wait_port "$respire_cluster"; wait_port "$respire_shards"; wait_port "$twem"

# Keys for MGET: 10 keys, spread over every shard.
mget_keys=$(for i in $(seq 0 9); do printf 'mget:%s ' "$i"; done)
# twemproxy places keys by its own hash (ketama), which puts all of the keys above on one
# server: its MGET gets 10 keys of its own, chosen through it as they land: 6, 2 and 2 on the
# three servers, as respire places the keys above by slot (the shards are empty until those
# are set below).
twem_keys=""
declare -A twem_per=()
for i in $(seq 0 999); do
  k="mget:$((i + 10))"
  redis-cli -p "$twem" set "$k" xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx >/dev/null
  for s in 0 1 2; do
    [ "$(redis-cli -p "${shard_ports[$s]}" exists "$k")" = 1 ] && break
  done
  want=$([ "$s" = 0 ] && echo 6 || echo 2)
  if [ "${twem_per[$s]:-0}" -lt "$want" ]; then
    twem_keys+="$k "; twem_per[$s]=$(( ${twem_per[$s]:-0} + 1 ))
  else
    redis-cli -p "$twem" del "$k" >/dev/null
  fi
  [ "$(echo $twem_keys | wc -w)" -eq 10 ] && break
done
[ "$(echo $twem_keys | wc -w)" -eq 10 ] || echo "warning: twemproxy's MGET has only these keys: $twem_keys" >&2
for port in "$respire_cluster" "$respire_shards" "$single"; do
  for k in $mget_keys; do redis-cli -p "$port" set "$k" xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx >/dev/null; done
done

declare -A results
bench() { # name port-args… [-- command…]
  local name=$1; shift
  local opts=() cmd=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do opts+=("$1"); shift; done
  [ $# -gt 0 ] && shift && cmd=("$@")
  results["$name"]+="$(redis-benchmark "${opts[@]}" -n "${N:-$REQUESTS}" -c "$CLIENTS" -d 32 -P "$PIPELINE" --csv "${cmd[@]}" 2>/dev/null | rps) "
}
for round in $(seq "$ROUNDS"); do
  for t in set get; do
    N=$DIRECT_REQUESTS bench "cluster-direct,$t" --cluster -p "${cluster_ports[0]}" -t "$t" -r 100000
    bench "cluster-respire,$t" -p "$respire_cluster" -t "$t" -r 100000
    bench "shards-respire,$t" -p "$respire_shards" -t "$t" -r 100000
    bench "shards-twemproxy,$t" -p "$twem" -t "$t" -r 100000
  done
  bench "mget-single" -p "$single" -- MGET $mget_keys
  bench "mget-respire" -p "$respire_cluster" -- MGET $mget_keys
  bench "mget-shards" -p "$respire_shards" -- MGET $mget_keys
  bench "mget-twemproxy" -p "$twem" -- MGET $twem_keys
  echo "round $round of $ROUNDS done" >&2
done

m() { echo "${results[$1]}" | median; }
printf '\n%-4s %15s %15s %9s %15s %17s %9s\n' test cluster-direct cluster-respire ratio shards-respire shards-twemproxy ratio
for t in set get; do
  cd_=$(m "cluster-direct,$t"); cr=$(m "cluster-respire,$t"); sr=$(m "shards-respire,$t"); st=$(m "shards-twemproxy,$t")
  printf '%-4s %15.0f %15.0f %9.2f %15.0f %17.0f %9.2f\n' "$t" "$cd_" "$cr" "$(echo "$cr / $cd_" | bc -l)" "$sr" "$st" "$(echo "$st / $sr" | bc -l)"
done
ms=$(m mget-single); mr=$(m mget-respire); mh=$(m mget-shards); mt=$(m mget-twemproxy)
printf '\nMGET of 10 keys: one Redis %.0f ops/s; respire over a 3-master cluster %.0f ops/s (%.2f); over 3 standalone shards %.0f ops/s (%.2f); twemproxy over the same shards %.0f ops/s (%.2f)\n' \
  "$ms" "$mr" "$(echo "$mr / $ms" | bc -l)" "$mh" "$(echo "$mh / $ms" | bc -l)" "$mt" "$(echo "$mt / $ms" | bc -l)"
echo "(the 10 keys are 6, 2 and 2 on the three shards, for respire and for twemproxy)"
echo "machine: $(nproc) cores; $REQUESTS requests x $ROUNDS rounds ($DIRECT_REQUESTS for the cluster-aware client), $CLIENTS clients, pipeline $PIPELINE, 32-byte values; respire workers=$WORKERS"
