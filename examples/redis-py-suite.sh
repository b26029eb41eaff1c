#!/usr/bin/env bash
# Runs redis-py's own test suite (the tests in its source distribution on PyPI) against
# direct Redis and against respire in front of the same Redis, one after the other, and
# prints the tests that fail through respire only.
#
#   bash examples/redis-py-suite.sh                        # sync and asyncio tests (~4 min)
#   FILES="tests/test_pubsub.py" bash examples/redis-py-suite.sh
#   REDIS_PY=5.2.1 bash examples/redis-py-suite.sh
#   CLUSTER=1 bash examples/redis-py-suite.sh             # cluster mode (~12 min): RedisCluster
#       against a 3-master/3-replica cluster direct, and against respire in front of it
#
# In cluster mode respire is one node owning every slot, so the tests that look at the
# cluster's nodes (replicas, links, a node per master) differ by design; so do those that
# kill a connection, after which redis-py's RedisCluster has no node left to reconnect to
# (redis-py issues #2555, #3693).
#
# Not part of the test command: it fetches redis-py's source from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools
cargo build --release --locked -p respire >/dev/null

start_work

version=${REDIS_PY:-5.2.1}
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
pip install -q "pytest<9" "pytest-asyncio==0.23.8" pytest-timeout packaging mock ujson numpy
(cd "$work" && pip download -q --no-deps --no-binary :all: "redis==$version" && tar xzf "redis-$version.tar.gz")
src="$work/redis-$version"
pip install -q -e "$src"

FILES=${FILES:-"tests/test_commands.py tests/test_pipeline.py tests/test_pubsub.py tests/test_scripting.py
  tests/test_encoding.py tests/test_lock.py tests/test_connection.py tests/test_function.py tests/test_monitor.py
  tests/test_connection_pool.py tests/test_asyncio/test_commands.py tests/test_asyncio/test_pipeline.py
  tests/test_asyncio/test_pubsub.py tests/test_asyncio/test_scripting.py tests/test_asyncio/test_lock.py
  tests/test_asyncio/test_connection.py tests/test_asyncio/test_monitor.py
  tests/test_asyncio/test_connection_pool.py tests/test_asyncio/test_encoding.py"}

if [ "${CLUSTER:-0}" = 1 ]; then
  FILES=${CLUSTER_FILES:-"tests/test_cluster.py tests/test_commands.py tests/test_pipeline.py
    tests/test_pubsub.py tests/test_scripting.py tests/test_lock.py tests/test_function.py
    tests/test_asyncio/test_commands.py tests/test_asyncio/test_pubsub.py"}
  marks="not redismod and not ssl"
  start_cluster "$work"
  rport=${ports[0]}; pport=$(free_port)
  RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$pport" --cluster "127.0.0.1:$rport" \
    --workers "${WORKERS:-2}" 2>"$work/respire.log" &
  pids+=($!)
  wait_port "$pport"
  flush() { for p in "${ports[@]}"; do redis-cli -p "$p" flushall >/dev/null 2>&1 || true; done; }
  nodes() { if [ "$1" = "$pport" ]; then echo 1; else echo 6; fi; }
else
  marks="not onlycluster and not redismod and not ssl"
  start_redis_and_respire "$work"
  flush() { redis-cli -p "$rport" flushall >/dev/null; }
  nodes() { echo 6; }
fi

run() { # name port
  flush
  # shellcheck disable=SC2086
  (cd "$src" && python -m pytest $FILES --redis-url="redis://127.0.0.1:$2" -q -p no:cacheprovider \
    --timeout 60 --asyncio-mode=auto -m "$marks" --redis-cluster-nodes "$(nodes "$2")" \
    >"$work/$1.out" 2>&1) || true
  grep -E '^(FAILED|ERROR) ' "$work/$1.out" | cut -d' ' -f2 | sort -u >"$work/$1.failed" || true
  echo "$1: $(tail -n 1 "$work/$1.out")"
}
run direct "$rport"
run respire "$pport"
echo "Failing through respire only:"
comm -13 "$work/direct.failed" "$work/respire.failed" | sed 's/^/  /'
