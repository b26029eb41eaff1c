"""Soak load for respire (driven by examples/soak.sh): writers set unique keys (one in four
through a script) and remember every acknowledged write, readers check values read back, a pipeline client does MGET/MSET
across shards; at the end every acknowledged write must read back.

    python3 examples/soak.py PORT SECONDS REPORT.json [CHAOS.log]

A master killed with SIGKILL (a line "... kill -9 master PORT at EPOCH" in CHAOS.log) loses
the writes it acknowledged but had not replicated yet, as Redis Cluster does: those
acknowledged within a second of a kill are counted apart (lost_to_kill) and do not fail the run.
"""
import json
import random
import sys
import threading
import time

import redis

port, seconds, report_path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
chaos_path = sys.argv[4] if len(sys.argv) > 4 else None
deadline = time.monotonic() + seconds
MAX_OPS = 50_000_000  # per thread: the loops are bounded even if the clock misbehaves
lock = threading.Lock()
acked = {}  # key -> value
acked_at = {}  # key -> time.time() of the acknowledgement
errors = {}  # first words of the error -> count
reads = {"checked": 0}
wrong_reads = []  # keys read back wrong while the load ran
wrong_examples = []


def client():
    return redis.Redis(port=port, socket_timeout=30, socket_connect_timeout=5)


def note_error(e):
    text = str(e)
    # A pipeline's error names the command first: keep what went wrong.
    text = text.split("caused error: ", 1)[-1]
    kind = " ".join(text.split()[:4])
    with lock:
        errors[kind] = errors.get(kind, 0) + 1


SET_SCRIPT = "return redis.call('SET', KEYS[1], ARGV[1])"


def writer(t):
    r = client()
    mine = []
    for n in range(MAX_OPS):
        if time.monotonic() > deadline:
            break
        key, value = f"soak:{t}:{n}", str(n)
        try:
            # One write in four through a script (respire sends those on a lane of their own).
            if n % 4 == 3:
                done = r.eval(SET_SCRIPT, 1, key, value)
            else:
                done = r.set(key, value)
            if done:
                now = time.time()
                with lock:
                    acked[key] = value
                    acked_at[key] = now
                mine.append(key)
        except redis.RedisError as e:
            note_error(e)
            time.sleep(0.01)
        # Now and then, read back one of this writer's own acknowledged writes.
        if mine and n % 10 == 0:
            k = random.choice(mine)
            try:
                got = r.get(k)
                with lock:
                    reads["checked"] += 1
                    if got is None or got.decode() != acked[k]:
                        wrong_reads.append(k)
                        if len(wrong_examples) < 10:
                            wrong_examples.append((k, acked[k], got.decode() if got else None))
            except redis.RedisError as e:
                note_error(e)


def batcher():
    r = client()
    for n in range(MAX_OPS):
        if time.monotonic() > deadline:
            break
        keys = [f"soak:batch:{n}:{i}" for i in range(10)]
        try:
            r.mset({k: str(n) for k in keys})
            now = time.time()
            with lock:
                for k in keys:
                    acked[k] = str(n)
                    acked_at[k] = now
            got = r.mget(keys)
            with lock:
                reads["checked"] += 1
                wrong_reads.extend(k for k, g in zip(keys, got) if g is None or g.decode() != str(n))
            p = r.pipeline(transaction=False)
            for i in range(20):
                p.incr(f"soak:counter:{i}")
            p.execute()
        except redis.RedisError as e:
            note_error(e)
            time.sleep(0.01)


threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)] + [threading.Thread(target=batcher)]
for th in threads:
    th.start()
for th in threads:
    th.join()

# Every acknowledged write must read back (retrying a key briefly while a failover settles).
r = client()
lost = []
keys = list(acked)
for i in range(0, len(keys), 500):
    chunk = keys[i:i + 500]
    for attempt in range(20):
        try:
            got = r.mget(chunk)
            break
        except redis.RedisError:
            time.sleep(0.5)
    else:
        got = [None] * len(chunk)
    for k, g in zip(chunk, got):
        if g is None or g.decode() != acked[k]:
            lost.append((k, acked[k], g.decode() if g else None))

kills = []
if chaos_path:
    with open(chaos_path) as f:
        kills = [float(line.split()[-1]) for line in f if " kill -9 master " in line]


def near_kill(k):
    return any(abs(acked_at.get(k, 0) - t) <= 1.0 for t in kills)


lost_to_kill = [x for x in lost if near_kill(x[0])]
lost = [x for x in lost if not near_kill(x[0])]
report = {
    "acknowledged_writes": len(acked),
    "masters_killed": len(kills),
    "lost_to_kill": len(lost_to_kill),
    "lost_writes": len(lost),
    "lost_examples": lost[:10],
    "reads_checked": reads["checked"],
    "reads_wrong": sum(1 for k in wrong_reads if not near_kill(k)),
    "reads_wrong_near_kill": sum(1 for k in wrong_reads if near_kill(k)),
    "wrong_examples": wrong_examples,
    "errors": errors,
}
with open(report_path, "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps(report, indent=1))
sys.exit(1 if lost or report["reads_wrong"] else 0)
