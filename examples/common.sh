# Shared by the scripts in examples/ and tests/run.sh: install what is missing, find free
# ports, wait for servers. Source it; it defines functions only.

# Runs a command as root (directly when already root).
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# ensure_commands CMD:PACKAGE… — installs the Debian package of every command not on PATH.
ensure_commands() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# ensure_redis_py — the Python client the cluster tests and the failover benchmark use.
ensure_redis_py() {
  python3 -c 'import redis' >/dev/null 2>&1 || python3 -m pip install --quiet redis
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT — until something on PORT answers PING (10 s at most).
wait_port() {
  for _ in $(seq 200); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "port $1 did not come up" >&2
  return 1
}

# Median of the numbers on standard input (separated by spaces or newlines).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

# Requests per second from redis-benchmark --csv output on standard input.
rps() { awk -F'","' '/^"/ && !/^"test"/ { gsub(/"/, "", $2); print $2; exit }'; }

# Runs redis-benchmark against each "name:port" target of $1 in turn (alternating, so that
# drift on a shared machine hits them alike), ROUNDS times, for each pipeline in PIPELINES
# and test in TESTS (SET/GET, REQUESTS requests, CLIENTS clients, 32-byte values). Appends
# each round's ops/s to results["name,test,P"] (an associative array the caller declares).
bench_rounds() {
  local round p t target name port
  for round in $(seq "$ROUNDS"); do
    for p in $PIPELINES; do
      for t in ${TESTS//,/ }; do
        for target in $1; do
          name=${target%%:*}; port=${target##*:}
          results["$name,$t,$p"]+="$(redis-benchmark -p "$port" -t "$t" -n "$REQUESTS" -c "$CLIENTS" -d 32 -P "$p" -r 100000 --csv 2>/dev/null | rps) "
        done
      done
    done
    echo "round $round of $ROUNDS done" >&2
  done
}

# start_cluster DIR: a local Redis Cluster of three masters and three replicas, each in its own
# folder under DIR; sets `ports` (masters first after creation) and adds the servers to `pids`.
start_cluster() {
  local dir=$1 p
  ports=()
  cluster_dir=$dir
  for _ in 1 2 3 4 5 6; do
    p=$(free_port); mkdir -p "$dir/$p"
    free_port > "$dir/$p/cluster-port"
    start_cluster_node "$p"
    ports+=("$p")
  done
  redis-cli --cluster create $(for p in "${ports[@]}"; do echo "127.0.0.1:$p"; done) --cluster-replicas 1 --cluster-yes >/dev/null
  for _ in $(seq 200); do
    redis-cli -p "${ports[0]}" cluster info | grep -q cluster_state:ok && break
    sleep 0.1
  done
  # And every replica in sync: one that never synced with its master cannot take over from it
  # (its data counts as too old), so a master lost before then would stay lost.
  for _ in $(seq 200); do
    [ "$(for p in "${ports[@]}"; do redis-cli -p "$p" info replication; done | grep -c master_link_status:up)" -ge 3 ] && break
    sleep 0.1
  done
}

# start_cluster_node PORT: starts (or starts again, after a kill) the cluster node of
# start_cluster on PORT, with its directory, nodes.conf and cluster bus port; adds its pid to
# `pids` and writes it to DIR/PORT/pid. The server runs under a subshell that waits for it, so
# that a node killed on purpose (SIGKILL) is not reported by the shell as a killed job.
start_cluster_node() {
  local p=$1
  rm -f "$cluster_dir/$p/pid"
  (
    redis-server --port "$p" --bind 127.0.0.1 --save '' --appendonly no --dir "$cluster_dir/$p" \
      --logfile "$cluster_dir/$p/redis.log" --cluster-enabled yes --cluster-config-file nodes.conf \
      --cluster-port "$(cat "$cluster_dir/$p/cluster-port")" --cluster-node-timeout 3000 \
      --repl-diskless-sync-delay 0 ${CLUSTER_NODE_ARGS:-} &
    echo $! > "$cluster_dir/$p/pid"
    exec 2>/dev/null
    wait
  ) &
  wait_port "$p"
  pids+=("$(cat "$cluster_dir/$p/pid")")
}

# Where cargo builds (CARGO_TARGET_DIR when set).
target_dir=${CARGO_TARGET_DIR:-target}

# start_work: a scratch directory `work` and a list `pids` of the processes the script starts;
# on exit they are stopped and the directory removed.
start_work() {
  work=$(mktemp -d)
  pids=()
  trap stop_work EXIT
}
stop_work() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# start_redis PORT [ARGS…]: a Redis on 127.0.0.1:PORT (no persistence, its files and log in
# $work/PORT, extra server ARGS passed on), added to `pids`; returns once it listens.
start_redis() {
  local port=$1; shift
  mkdir -p "$work/$port"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work/$port" --logfile "$work/$port/log" "$@" &
  pids+=($!)
  wait_port "$port" || { cat "$work/$port/log" >&2; return 1; }
}

# start_masters N: a Redis Cluster of N masters and no replicas (each node by start_redis),
# slots spread by `redis-cli --cluster create`; returns once every node says the cluster is
# ok. Sets `cluster_ports`.
start_masters() {
  local n=$1 p ok
  cluster_ports=()
  for _ in $(seq "$n"); do
    p=$(free_port)
    start_redis "$p" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$(free_port)"
    cluster_ports+=("$p")
  done
  redis-cli --cluster create $(for p in "${cluster_ports[@]}"; do echo "127.0.0.1:$p"; done) --cluster-yes >/dev/null
  for _ in $(seq 100); do
    ok=1
    for p in "${cluster_ports[@]}"; do redis-cli -p "$p" cluster info | grep -q cluster_state:ok || ok=0; done
    [ $ok = 1 ] && break
    sleep 0.1
  done
}

# start_redis_and_respire DIR: one Redis (DEBUG enabled, as test suites want it) and respire
# with WORKERS workers (default 2) in front of it, logs in DIR; sets `rport` and `pport` and
# adds both to `pids`.
start_redis_and_respire() {
  local dir=$1
  rport=$(free_port); pport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" --enable-debug-command yes &
  pids+=($!)
  wait_port "$rport"
  RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$pport" --backend "127.0.0.1:$rport" \
    --workers "${WORKERS:-2}" 2>"$dir/respire.log" &
  pids+=($!)
  wait_port "$pport"
}

# copy_shipped_plugins DIR: the four shipped plugins (release builds, from CARGO_TARGET_DIR when
# it is set) with their sample settings.
copy_shipped_plugins() {
  local dir=$1 p
  mkdir -p "$dir"
  for p in acl rate-limit cache-policy metrics; do
    cp "$target_dir/wasm32-wasip2/release/${p//-/_}.wasm" "$dir/$p.wasm"
    cp "plugins/$p/$p.toml" "$dir/$p.toml"
  done
}
