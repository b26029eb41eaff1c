"""Soak load for respire (driven by examples/soak.sh): writers set unique keys (one in four
through a script) and remember every acknowledged write, readers check values read back, a pipeline client does MGET/MSET
across shards; at the end every acknowledged write must read back.

    python3 examples/soak.py PORT SECONDS REPORT.json
"""
import json
import random
import sys
import threading
import time

import redis

port, seconds, report_path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + seconds
MAX_OPS = 50_000_000  # per thread: the loops are bounded even if the clock misbehaves
lock = threading.Lock()
acked = {}  # key -> value
errors = {}  # first words of the error -> count
reads = {"checked": 0, "wrong": 0}
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
                with lock:
                    acked[key] = value
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
                        reads["wrong"] += 1
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
            with lock:
                for k in keys:
                    acked[k] = str(n)
            got = r.mget(keys)
            with lock:
                reads["checked"] += 1
                if any(g is None or g.decode() != str(n) for g in got):
                    reads["wrong"] += 1
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

report = {
    "acknowledged_writes": len(acked),
    "lost_writes": len(lost),
    "lost_examples": lost[:10],
    "reads_checked": reads["checked"],
    "reads_wrong": reads["wrong"],
    "wrong_examples": wrong_examples,
    "errors": errors,
}
with open(report_path, "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps(report, indent=1))
sys.exit(1 if lost else 0)
