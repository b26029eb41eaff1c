#!/usr/bin/env bash
# Commands of many names, side by side: one Redis directly, respire in front of it, and
# respire in front of a 3-master Redis Cluster (where a multi-key command becomes a command
# per slot). Each command is timed from the first byte sent to its last reply read; medians of
# ROUNDS. What this guards is how a proxy's cost grows with a command's size: a step that is
# linear per name, repeated per name, does not show with ten names and does with 10,000.
#
#   bash examples/bench-big.sh
#   NAMES=20000 ROUNDS=5 bash examples/bench-big.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NAMES=${NAMES:-10000}
ROUNDS=${ROUNDS:-3}

source examples/common.sh
ensure_commands redis-server:redis-server redis-cli:redis-tools python3:python3
cargo build --release --locked -p respire >/dev/null

start_work

single=$(free_port); start_redis "$single"
start_masters 3
over_single=$(free_port)
RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$over_single" --backend "127.0.0.1:$single" --workers 1 2>"$work/r1.log" &
pids+=($!)
over_cluster=$(free_port)
RUST_LOG=warn "$target_dir"/release/respire --listen "127.0.0.1:$over_cluster" --cluster "127.0.0.1:${cluster_ports[0]}" --workers 1 2>"$work/r2.log" &
pids+=($!)
wait_port "$over_single"; wait_port "$over_cluster"

python3 - "$NAMES" "$ROUNDS" "$single" "$over_single" "$over_cluster" <<'EOF'
import socket, statistics, sys, time

names, rounds = int(sys.argv[1]), int(sys.argv[2])
targets = [("Redis", int(sys.argv[3])), ("respire", int(sys.argv[4])), ("respire, cluster", int(sys.argv[5]))]

def enc(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)

def frame_len(buf, pos):
    """Length of the RESP frame at buf[pos:], or None if incomplete."""
    need, p = 1, pos
    while need:
        if p >= len(buf):
            return None
        eol = buf.find(b"\r\n", p)
        if eol < 0:
            return None
        kind, n = buf[p:p + 1], buf[p + 1:eol]
        p = eol + 2
        need -= 1
        if kind == b"$" and int(n) >= 0:
            p += int(n) + 2
            if p > len(buf):
                return None
        elif kind in (b"*", b">") and int(n) > 0:
            need += int(n)
    return p - pos

def timed(sock, args, replies):
    """Milliseconds from sending the command to reading its `replies` frames."""
    t = time.perf_counter()
    sock.sendall(enc(args))
    buf, pos, got = b"", 0, 0
    while got < replies:
        d = sock.recv(1 << 20)
        if not d:
            raise SystemExit("connection closed")
        buf += d
        while got < replies:
            n = frame_len(buf, pos)
            if n is None:
                break
            pos += n
            got += 1
    return 1000 * (time.perf_counter() - t)

keys = [f"big:{i}" for i in range(names)]
tests = [
    ("MSET", lambda: ["MSET"] + [x for k in keys for x in (k, "v")], 1),
    ("MGET", lambda: ["MGET"] + keys, 1),
    ("DEL", lambda: ["DEL"] + keys, 1),
    ("SUBSCRIBE", lambda: ["SUBSCRIBE"] + [f"ch:{i}" for i in range(names)], names),
    ("UNSUBSCRIBE", lambda: ["UNSUBSCRIBE"] + [f"ch:{i}" for i in range(names)], names),
]
results = {}
for _ in range(rounds):
    for name, port in targets:
        for test, args, replies in tests:
            with socket.create_connection(("127.0.0.1", port)) as s:
                results.setdefault((test, name), []).append(timed(s, args(), replies))
print(f"\nCommands of {names:,} names (ms, median of {rounds}; respire with one worker)\n")
print(f"| command | {' | '.join(n for n, _ in targets)} |")
print("|---|" + "---:|" * len(targets))
for test, _, _ in tests:
    cells = [f"{statistics.median(results[(test, n)]):.1f}" for n, _ in targets]
    print(f"| {test} | {' | '.join(cells)} |")
EOF
