#!/usr/bin/env bash
# Runs Redis's own test suite (the `tests/` of the installed redis-server's Debian source
# package) against respire in front of one Redis, as Redis's CI runs it against an external
# server: `--host/--port`, DEBUG enabled; by default without the tests tagged needs:repl.
#
#   bash examples/redis-test-suite.sh                 # the units below (~10 min)
#   UNITS="unit/type/list unit/multi" bash examples/redis-test-suite.sh
#   TAGS=-slow UNITS="<every unit>" bash examples/redis-test-suite.sh   # as Redis's external CI
#   CLUSTER=1 TAGS=-slow UNITS="…" bash examples/redis-test-suite.sh    # --cluster-mode, over a cluster
#
# Some tests are skipped for reasons of the proxy's design, not of Redis's semantics (the
# list is `skip` below, each with its reason). The report is the suite's own output; the
# last lines list the failures. Not part of the test command: it fetches the source.
set -euo pipefail
cd "$(dirname "$0")/.."
source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools tclsh:tcl
cargo build --release --locked -p respire >/dev/null

start_work

# The source of the Redis that is installed (its tests match its behaviour).
version=$(dpkg-query -W -f '${source:Version}' redis-server 2>/dev/null || true)
(
  cd "$work"
  src=/etc/apt/sources.list.d/respire-deb-src.sources
  if ! apt-get source --download-only "redis=$version" >/dev/null 2>&1; then
    # Debian's sources are off by default: the same mirrors, for sources, for this download.
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | as_root tee "$src" >/dev/null
    as_root apt-get update -qq
    apt-get source --download-only "redis=$version" >/dev/null 2>&1 || apt-get source --download-only redis >/dev/null
    as_root rm -f "$src"
    as_root apt-get update -qq
  fi
  tar xzf redis_*.orig.tar.gz
)
suite=$(echo "$work"/redis-*/)
# The suite runs the tools from its build tree (src/redis-cli, …): the installed ones, which
# are of the same version.
mkdir -p "$suite/src"
for tool in redis-server redis-cli redis-benchmark redis-check-aof redis-check-rdb; do
  command -v "$tool" >/dev/null && ln -sf "$(command -v "$tool")" "$suite/src/$tool"
done

UNITS=${UNITS:-"unit/type/string unit/type/incr unit/type/list unit/type/list-2 unit/type/list-3 unit/type/hash unit/type/set unit/type/zset unit/type/stream unit/type/stream-cgroups unit/keyspace unit/expire unit/multi unit/scripting unit/functions unit/pubsub unit/pubsubshard unit/protocol unit/sort unit/scan unit/dump unit/bitops unit/bitfield unit/geo unit/hyperloglog unit/info-command unit/info unit/other unit/introspection unit/introspection-2 unit/slowlog unit/lazyfree unit/limits unit/auth unit/quit unit/tracking unit/pause"}

# Skipped, with the reason (patterns: a leading / makes a regular expression).
cat > "$work/skip" <<'EOF'
/ACL
RESET clears authenticated state
Tracking only occurs for scripts when a command calls a read-only command
Tracking invalidation message of eviction keys should be before response
SLOWLOG - Rewritten commands are logged as their original command
/query buffer resized
LATENCY HISTOGRAM sub commands
HSCAN with encoding listpack
Tracking gets notification of lazy expired keys
SLOWLOG - EXEC is not logged, just executed commands
verify reply buffer limits
EOF
# - ACL users and AUTH as one of them: clients authenticate to respire (its own users and
#   the acl plugin), not to Redis's ACL, since many clients share each backend connection.
# - CLIENT TRACKING and scripts: respire cannot see whether a script read anything, so a
#   tracking client's script keys count as read (Redis tracks them only if the script called a
#   read command): the client may get an invalidation Redis would not send, never miss one.
# - CLIENT TRACKING and eviction: Redis tells a client of a key evicted to make room for the
#   client's command before that command's reply; through respire invalidations come from
#   another connection and follow the replies owed (a cached value is dropped just after).
# - The order of two slow-log entries written by two clients at the same moment.
# - Query buffer sizes: respire reads into buffers of its own, Redis sees one connection.
# - LATENCY HISTOGRAM after CONFIG RESETSTAT: Redis also counts respire's own commands.
# - HSCAN's listpack case, run after the other units on one server: an earlier unit leaves a
#   smaller hash-max-listpack-entries (it passes alone).
# - CLIENT TRACKING BCAST NOLOOP and a key that expires lazily in the event loop where the
#   client wrote it: Redis reports the key once per loop and respire cannot tell the expiry
#   from the client's own write, so the client is not told (Redis tells it).
# - SLOWLOG and transactions: respire times commands end to end, and the commands of a
#   transaction run inside its EXEC, so respire logs the EXEC; Redis logs the commands.
# - Reply buffer sizes (`rbs` in CLIENT LIST): an idle respire client holds no reply buffer.

# Two workers by default (WORKERS=1 for one). Several tests send a blocking command and,
# without waiting for it to block, another client's command that must come after it: the
# suite's connections share a worker (`worker_affinity`), which keeps their order.
if [ "${CLUSTER:-0}" = 1 ]; then
  # As Redis's external CI runs the suite against a cluster (`--cluster-mode`: one database,
  # the tests tagged cluster:skip left out), here through respire in front of a Redis Cluster
  # of three masters and three replicas.
  CLUSTER_NODE_ARGS="--enable-debug-command yes" start_cluster "$work/cluster"
  pport=$(free_port)
  RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$pport" --cluster "127.0.0.1:${ports[0]}" \
    --workers "${WORKERS:-2}" 2>"$work/respire.log" &
  pids+=($!)
  wait_port "$pport"
  SUITE_ARGS="--cluster-mode ${SUITE_ARGS:-}"
  # Tests that read the replication stream (SYNC): over several masters there is no one stream
  # (respire refuses SYNC there), so these cannot run; run without needs:repl too (TAGS).
  cat >> "$work/skip" <<'EOF'
All TTL in commands are propagated as absolute timestamp in replication stream
SCAN: Lazy-expire should not be wrapped in MULTI/EXEC
RANDOMKEY: Lazy-expire should not be wrapped in MULTI/EXEC
propagation with eviction
propagation with eviction in MULTI
MULTI propagation of SCRIPT FLUSH
MULTI propagation of XREADGROUP
MULTI + LPUSH + EXPIRE + DEBUG SLEEP on blocked client, key already expired
LMPOP propagate as pop with count command to replica
/and script timeout$
LATENCY HISTOGRAM all commands
FUNCTION - test function kill
FUNCTION - test script kill not working on function
FUNCTION - test function kill not working on eval
MONITOR can log commands issued by functions
FUNCTION - test fcall_ro with read only commands
CONFIG sanity
EOF
  # The "… and script timeout" tests of unit/multi and the FUNCTION/SCRIPT KILL tests of
  # unit/functions: a keyless script runs on one master and makes only that one busy, while
  # the transaction's keys, or the test's PING, are on another.
  # MONITOR and functions, FCALL_RO with read only commands: the test's keyless FCALL
  # touches a key it does not declare, which Redis Cluster refuses unless the key is on the
  # master the call went to.
  # CONFIG sanity sets every parameter CONFIG GET * shows (the first master's) back: `port`
  # and the like belong to one node, and every master cannot take the first one's.
  # LATENCY HISTOGRAM's count of CONFIG RESETSTAT: respire sends it to every master, and the
  # histograms of the masters are added up (3 calls for the client's one).
else
  start_redis_and_respire "$work"
fi

args=()
for u in $UNITS; do args+=(--single "$u"); done
cd "$suite"
set +e
tags=()
for t in ${TAGS-"-needs:repl"}; do tags+=(--tags "$t"); done
tclsh tests/test_helper.tcl --host 127.0.0.1 --port "$pport" --timeout 120 \
  "${tags[@]}" --skipfile "$work/skip" "${args[@]}" ${SUITE_ARGS:-}
status=$?
set -e
echo "respire's log:" >&2
tail -n 20 "$work/respire.log" >&2
exit $status
