#!/usr/bin/env bash
# Reliability side by side: the same cluster events under the same load, once
# through respire (plain redis-py clients) and once with redis-py's
# cluster-aware RedisCluster client going direct. Prints operations, errors
# seen by the clients and the longest error window for each.
#
# Events, each on a fresh 3-master/3-replica cluster on 127.0.0.1:
#   failover  CLUSTER FAILOVER on a replica
#   reshard   1,000 slots moved with redis-cli --cluster reshard
#   kill      a master killed with SIGKILL (its replica is promoted)
#
#   bash examples/bench-failover.sh
#   CLIENTS=16 SECONDS_AFTER=3 bash examples/bench-failover.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-8}
SECONDS_AFTER=${SECONDS_AFTER:-2}
EVENTS=${EVENTS:-"failover reshard kill"}

source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools
ensure_redis_py
cargo build --release --locked -p respire >/dev/null


work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/load.py" <<'PY'
import sys, threading, time
import redis
from redis.cluster import RedisCluster

mode, port, clients, stop_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stats = {"ops": 0, "errors": [], "acked": {}}
lock = threading.Lock()

def make():
    if mode == "direct":
        return RedisCluster(host="127.0.0.1", port=port, socket_timeout=5)
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=40)

def worker(t):
    c = make()
    i = 0
    import os
    while not os.path.exists(stop_file) and i < 1_000_000:
        i += 1
        key = f"load:{t}:{i % 200}"
        try:
            c.set(key, i)
            v = c.get(key)
            with lock:
                stats["ops"] += 2
                stats["acked"][key] = i
                if v is None or int(v) != i:
                    stats["errors"].append((time.time(), "wrong read"))
        except Exception as e:
            with lock:
                stats["errors"].append((time.time(), type(e).__name__))
            time.sleep(0.01)
            try:
                c = make()
            except Exception:
                pass

threads = [threading.Thread(target=worker, args=(t,)) for t in range(clients)]
for th in threads: th.start()
for th in threads: th.join()
times = sorted(t for t, _ in stats["errors"])
longest, start, prev = 0.0, None, None
for t in times:
    if start is not None and prev is not None and t - prev < 1.0:
        longest = max(longest, t - start)
    else:
        start = t
    prev = t
print(f'{stats["ops"]} {len(stats["errors"])} {longest:.3f}')
PY

start_cluster() {
  cluster_ports=()
  for _ in 1 2 3 4 5 6; do
    p=$(free_port); mkdir -p "$work/$p"
    redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$work/$p" --logfile "$work/$p/log" \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 --cluster-port "$(free_port)" --cluster-require-full-coverage no &
    pids+=($!); eval "pid_$p=$!"
    wait_port "$p"; cluster_ports+=("$p")
  done
  redis-cli --cluster create $(for p in "${cluster_ports[@]}"; do echo "127.0.0.1:$p"; done) --cluster-replicas 1 --cluster-yes >/dev/null
  for _ in $(seq 200); do
    ok=1
    for p in "${cluster_ports[@]}"; do
      redis-cli -p "$p" cluster info | grep -q cluster_state:ok || ok=0
      [ "$(redis-cli -p "$p" cluster shards | grep -cx online)" = 6 ] || ok=0
    done
    [ $ok = 1 ] && break; sleep 0.1
  done
}

a_replica() { # prints "replica_port master_port"
  for p in "${cluster_ports[@]}"; do
    info=$(redis-cli -p "$p" info replication)
    if echo "$info" | grep -q role:slave; then
      echo "$p $(echo "$info" | grep master_port: | cut -d: -f2 | tr -d '\r')"; return
    fi
  done
}

run_event() { # event target -> "ops errors window"
  local event=$1 target=$2
  start_cluster
  local port=${cluster_ports[0]}
  if [ "$target" = respire ]; then
    port=$(free_port)
    RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$port" --cluster "127.0.0.1:${cluster_ports[0]},127.0.0.1:${cluster_ports[1]}" 2>"$work/respire.log" &
    pids+=($!); local rpid=$!
    wait_port "$port"
  fi
  rm -f "$work/stop"
  python3 "$work/load.py" "$([ "$target" = respire ] && echo proxy || echo direct)" "$port" "$CLIENTS" "$work/stop" > "$work/result" &
  local load=$!
  pids+=("$load")
  sleep 1
  read -r rep mas < <(a_replica)
  if [ -z "${mas:-}" ]; then echo "no replica found: cluster not ready" >&2; return 1; fi
  case $event in
    failover) redis-cli -p "$rep" cluster failover >/dev/null ;;
    reshard)
      local from to
      from=$(redis-cli -p "${cluster_ports[0]}" cluster myid); to=$(redis-cli -p "${cluster_ports[1]}" cluster myid)
      redis-cli --cluster reshard "127.0.0.1:${cluster_ports[0]}" --cluster-from "$from" --cluster-to "$to" --cluster-slots 1000 --cluster-yes >/dev/null ;;
    kill) eval "kill -9 \$pid_$mas" ;;
  esac
  for _ in $(seq 300); do
    if [ "$event" = reshard ] || redis-cli -p "$rep" info replication | grep -q role:master; then break; fi
    sleep 0.1
  done
  sleep "$SECONDS_AFTER"
  touch "$work/stop"; wait "$load" || true
  cat "$work/result"
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

printf '%-9s | %-28s | %-28s\n' event "respire: ops errors window" "RedisCluster direct: ops errors window"
for e in $EVENTS; do
  r=$(run_event "$e" respire)
  d=$(run_event "$e" direct)
  printf '%-9s | %-28s | %-28s\n' "$e" "$r" "$d"
done
echo "($CLIENTS clients writing unique values and reading them back; window in seconds)"
