//! respire's response cache, driven by the shipped cache-policy plugin, against real Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use respire_tests::{
    Cluster, Raw, RedisServer, Respire, http_get, metric_value, resp, shipped_plugin,
};

/// respire in front of `redis` with cache-policy loaded with these settings, and its metrics port.
fn cached_proxy(
    redis: &RedisServer,
    settings: &str,
    workers: &str,
) -> (Respire, u16, tempfile::TempDir) {
    cached_proxy_args(&["--backend", &redis.addr()], settings, workers)
}

fn cached_proxy_args(
    backend: &[&str],
    settings: &str,
    workers: &str,
) -> (Respire, u16, tempfile::TempDir) {
    // Connections spread over the workers: the cache is the process's, not a worker's.
    let mut args = backend.to_vec();
    args.extend(["--workers", workers, "--worker-affinity", "0"]);
    let (proxy, port, dir) = start_cached(&args, settings);
    // The cache opens its tracking connections when a plugin first asks it to keep a read
    // (`response_cache_idle`): that read goes to Redis uncached.
    let mut p = Raw::connect(proxy.port);
    assert_eq!(text(&mut p, &[b"GET", b"user:first-read"]), "$-1\r\n");
    wait_active(port, true, "the cache to start serving");
    (proxy, port, dir)
}

/// respire started with `args` and cache-policy loaded with these settings (the cache is off
/// until a read asks for it), its metrics port, and the plugins' folder.
fn start_cached(args: &[&str], settings: &str) -> (Respire, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        shipped_plugin("cache_policy"),
        dir.path().join("cache-policy.wasm"),
    )
    .unwrap();
    std::fs::write(dir.path().join("cache-policy.toml"), settings).unwrap();
    let port = respire_tests::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut args = args.to_vec();
    args.extend([
        "--plugins",
        dir.path().to_str().unwrap(),
        "--metrics",
        &metrics,
    ]);
    (Respire::start_args(&args), port, dir)
}

/// The id of respire's tracking connection in Redis's `CLIENT LIST` (flag `t`), if any.
fn tracking_client(direct: &mut Raw) -> Option<String> {
    let list = text(direct, &[b"CLIENT", b"LIST"]);
    list.lines()
        .find(|l| {
            l.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('t'))
        })
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
}

const USERS: &str = r#"
[config]
max_memory = "16MiB"
[[config.rules]]
keys = "user:*"
ttl = "60s"
"#;

fn metric(port: u16, series: &str) -> f64 {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    metric_value(&body, series).unwrap_or(0.0)
}

fn wait_metric(port: u16, series: &str, ok: impl Fn(f64) -> bool, what: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(port, series);
        if ok(v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} ({series} = {v})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the cache serves (`on`) or does not (`respire_cache_active`).
fn wait_active(port: u16, on: bool, what: &str) {
    let want = if on { 1.0 } else { 0.0 };
    wait_metric(port, "respire_cache_active", |v| v == want, what);
}

fn text(p: &mut Raw, cmd: &[&[u8]]) -> String {
    String::from_utf8_lossy(&p.roundtrip(&resp(cmd), 1)).into_owned()
}

/// Reads through respire until the reply is `want` (a direct write reaches the cache through
/// an invalidation push); how long it took.
fn until(p: &mut Raw, cmd: &[&[u8]], want: &str) -> Duration {
    let start = Instant::now();
    loop {
        let got = text(p, cmd);
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still {got:?} instead of {want:?} after 5 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads `cmd` until a read of it is served from the cache (a fill can be dropped once by a
/// late invalidation of the write just before it, which is safe and only costs a miss).
fn until_cached(p: &mut Raw, mport: u16, cmd: &[&[u8]], want: &str) {
    let start = Instant::now();
    loop {
        let before = metric(mport, "respire_cache_hits_total");
        assert_eq!(text(p, cmd), want);
        if metric(mport, "respire_cache_hits_total") - before == 1.0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{cmd:?} is still not served from the cache after 5 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hits_are_served_while_redis_is_paused() {
    let redis = RedisServer::start();
    let (proxy, mport, _dir) = cached_proxy(&redis, USERS, "2");
    let mut p = Raw::connect(proxy.port);
    assert_eq!(text(&mut p, &[b"SET", b"user:1", b"alice"]), "+OK\r\n");
    assert_eq!(
        text(&mut p, &[b"HSET", b"user:h", b"name", b"bob"]),
        ":1\r\n"
    );
    // Misses fill the cache.
    until_cached(&mut p, mport, &[b"GET", b"user:1"], "$5\r\nalice\r\n");
    until_cached(
        &mut p,
        mport,
        &[b"HGETALL", b"user:h"],
        "*2\r\n$4\r\nname\r\n$3\r\nbob\r\n",
    );
    let mut p3 = Raw::connect(proxy.port);
    assert!(text(&mut p3, &[b"HELLO", b"3"]).starts_with('%'));
    until_cached(
        &mut p3,
        mport,
        &[b"HGETALL", b"user:h"],
        "%1\r\n$4\r\nname\r\n$3\r\nbob\r\n",
    );
    let hits = metric(mport, "respire_cache_hits_total");

    // Redis answers nobody for 2 s; cached replies still come at once, in both protocols,
    // from any connection (and worker).
    let mut direct = Raw::connect(redis.port);
    assert_eq!(
        text(&mut direct, &[b"CLIENT", b"PAUSE", b"2000", b"ALL"]),
        "+OK\r\n"
    );
    let start = Instant::now();
    let mut fresh = Raw::connect(proxy.port);
    assert_eq!(text(&mut fresh, &[b"GET", b"user:1"]), "$5\r\nalice\r\n");
    assert_eq!(
        text(&mut p, &[b"HGETALL", b"user:h"]),
        "*2\r\n$4\r\nname\r\n$3\r\nbob\r\n"
    );
    assert_eq!(
        text(&mut p3, &[b"HGETALL", b"user:h"]),
        "%1\r\n$4\r\nname\r\n$3\r\nbob\r\n"
    );
    let served = start.elapsed();
    assert!(
        served < Duration::from_millis(1000),
        "cached replies took {served:?} while Redis was paused"
    );
    assert_eq!(metric(mport, "respire_cache_hits_total") - hits, 3.0);
    // Not cached: another database, an uncached prefix. These wait for Redis.
    assert_eq!(text(&mut fresh, &[b"GET", b"product:1"]), "$-1\r\n");
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "an uncached read must have waited for the pause"
    );
    assert_eq!(text(&mut fresh, &[b"SELECT", b"1"]), "+OK\r\n");
    assert_eq!(
        text(&mut fresh, &[b"GET", b"user:1"]),
        "$-1\r\n",
        "replies are cached per database"
    );
}

#[test]
fn writes_through_respire_and_directly_on_redis_invalidate() {
    let redis = RedisServer::start();
    let (proxy, mport, _dir) = cached_proxy(&redis, USERS, "2");
    let mut p = Raw::connect(proxy.port);
    let mut other = Raw::connect(proxy.port);
    let mut direct = Raw::connect(redis.port);
    assert_eq!(text(&mut p, &[b"SET", b"user:1", b"v1"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"user:1"]), "$2\r\nv1\r\n");
    assert_eq!(text(&mut other, &[b"GET", b"user:1"]), "$2\r\nv1\r\n");

    // Through respire: the next read anywhere sees the write, no waiting.
    assert_eq!(text(&mut p, &[b"SET", b"user:1", b"v2"]), "+OK\r\n");
    assert_eq!(text(&mut other, &[b"GET", b"user:1"]), "$2\r\nv2\r\n");
    // Pipelined: a client sees its own write in the same batch.
    let got = p.roundtrip(
        &[
            resp(&[b"APPEND", b"user:1", b"x"]),
            resp(&[b"GET", b"user:1"]),
        ]
        .concat(),
        2,
    );
    assert_eq!(String::from_utf8_lossy(&got), ":3\r\n$3\r\nv2x\r\n");

    // Directly on Redis: the tracking push drops it.
    assert_eq!(text(&mut other, &[b"GET", b"user:1"]), "$3\r\nv2x\r\n");
    assert_eq!(text(&mut direct, &[b"SET", b"user:1", b"v3"]), "+OK\r\n");
    let took = until(&mut other, &[b"GET", b"user:1"], "$2\r\nv3\r\n");
    println!("a direct write reached the cache in {took:?}");

    // A multi-key read is dropped when any of its keys changes.
    assert_eq!(
        text(&mut p, &[b"MSET", b"user:a", b"1", b"user:b", b"2"]),
        "+OK\r\n"
    );
    assert_eq!(
        text(&mut p, &[b"MGET", b"user:a", b"user:b"]),
        "*2\r\n$1\r\n1\r\n$1\r\n2\r\n"
    );
    assert_eq!(text(&mut direct, &[b"SET", b"user:b", b"3"]), "+OK\r\n");
    until(
        &mut p,
        &[b"MGET", b"user:a", b"user:b"],
        "*2\r\n$1\r\n1\r\n$1\r\n3\r\n",
    );
    // Expiry, deletion and transactions count as writes.
    assert_eq!(text(&mut p, &[b"GET", b"user:a"]), "$1\r\n1\r\n");
    let got = p.roundtrip(
        &[
            resp(&[b"MULTI"]),
            resp(&[b"DEL", b"user:a"]),
            resp(&[b"EXEC"]),
            resp(&[b"GET", b"user:a"]),
        ]
        .concat(),
        4,
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+OK\r\n+QUEUED\r\n*1\r\n:1\r\n$-1\r\n"
    );
    // FLUSHALL on Redis drops everything (a null invalidation).
    assert_eq!(text(&mut p, &[b"GET", b"user:b"]), "$1\r\n3\r\n");
    assert_eq!(text(&mut direct, &[b"FLUSHALL"]), "+OK\r\n");
    until(&mut p, &[b"GET", b"user:b"], "$-1\r\n");
    assert!(metric(mport, "respire_cache_invalidations_total") >= 4.0);
}

#[test]
fn no_stale_read_under_concurrent_writers() {
    let redis = RedisServer::start();
    let (proxy, _mport, _dir) = cached_proxy(&redis, USERS, "2");
    let mut setup = Raw::connect(proxy.port);
    assert_eq!(text(&mut setup, &[b"SET", b"user:n", b"0"]), "+OK\r\n");
    assert_eq!(text(&mut setup, &[b"SET", b"user:d", b"0"]), "+OK\r\n");
    // `acked` is the last value a writer through respire had confirmed: a read that starts
    // after that must never return less.
    let acked = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    const WRITES: i64 = 1500;
    let writer = {
        let (acked, port) = (acked.clone(), proxy.port);
        std::thread::spawn(move || {
            let mut w = Raw::connect(port);
            for _ in 0..WRITES {
                let r = text(&mut w, &[b"INCR", b"user:n"]);
                let v: i64 = r.trim_start_matches(':').trim_end().parse().unwrap();
                acked.store(v, Ordering::SeqCst);
            }
        })
    };
    // A second writer straight on Redis, on another key.
    let direct_writer = {
        let port = redis.port;
        std::thread::spawn(move || {
            let mut w = Raw::connect(port);
            for _ in 0..WRITES {
                text(&mut w, &[b"INCR", b"user:d"]);
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (acked, done, port) = (acked.clone(), done.clone(), proxy.port);
            std::thread::spawn(move || {
                let mut r = Raw::connect(port);
                let (mut reads, mut last_d) = (0u64, 0i64);
                while !done.load(Ordering::SeqCst) && reads < 200_000 {
                    let before = acked.load(Ordering::SeqCst);
                    let got = text(&mut r, &[b"GET", b"user:n"]);
                    let v: i64 = got.lines().nth(1).unwrap().parse().unwrap();
                    assert!(
                        v >= before,
                        "stale read: {v} after the writer had {before} acknowledged"
                    );
                    let d: i64 = text(&mut r, &[b"GET", b"user:d"])
                        .lines()
                        .nth(1)
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!(
                        d >= last_d,
                        "a reader went back in time on user:d: {d} after {last_d}"
                    );
                    last_d = d;
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    writer.join().unwrap();
    direct_writer.join().unwrap();
    done.store(true, Ordering::SeqCst);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 100, "readers made only {reads} reads");
    // Once the writers stop, everyone sees the final values.
    let mut p = Raw::connect(proxy.port);
    assert_eq!(
        text(&mut p, &[b"GET", b"user:n"]),
        format!("${}\r\n{WRITES}\r\n", WRITES.to_string().len())
    );
    until(
        &mut p,
        &[b"GET", b"user:d"],
        &format!("${}\r\n{WRITES}\r\n", WRITES.to_string().len()),
    );
}

#[test]
fn concurrent_misses_make_one_request() {
    let redis = RedisServer::start();
    let (proxy, mport, _dir) = cached_proxy(&redis, USERS, "2");
    let mut p = Raw::connect(proxy.port);
    assert_eq!(text(&mut p, &[b"SET", b"user:sf", b"x"]), "+OK\r\n");
    let mut direct = Raw::connect(redis.port);
    assert_eq!(text(&mut direct, &[b"CONFIG", b"RESETSTAT"]), "+OK\r\n");
    let waits = metric(mport, "respire_cache_single_flight_waits_total");
    // Redis holds every request for 500 ms, so all ten clients miss at the same time.
    assert_eq!(
        text(&mut direct, &[b"CLIENT", b"PAUSE", b"500", b"ALL"]),
        "+OK\r\n"
    );
    let clients: Vec<_> = (0..10)
        .map(|_| {
            let port = proxy.port;
            std::thread::spawn(move || text(&mut Raw::connect(port), &[b"GET", b"user:sf"]))
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), "$1\r\nx\r\n");
    }
    let stats = text(&mut direct, &[b"INFO", b"commandstats"]);
    let calls = stats
        .lines()
        .find(|l| l.starts_with("cmdstat_get:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        calls.starts_with("cmdstat_get:calls=1,"),
        "Redis saw {calls:?}"
    );
    assert_eq!(
        metric(mport, "respire_cache_single_flight_waits_total") - waits,
        9.0
    );
}

#[test]
fn memory_stays_under_the_cap_by_evicting() {
    let redis = RedisServer::start();
    let settings =
        "[config]\nmax_memory = \"64KiB\"\n[[config.rules]]\nkeys = \"user:*\"\nttl = \"60s\"\n";
    let (proxy, mport, _dir) = cached_proxy(&redis, settings, "1");
    let mut p = Raw::connect(proxy.port);
    let value = vec![b'v'; 1000];
    for i in 0..300 {
        assert_eq!(
            text(&mut p, &[b"SET", format!("user:{i}").as_bytes(), &value]),
            "+OK\r\n"
        );
    }
    let want = format!("$1000\r\n{}\r\n", String::from_utf8_lossy(&value));
    for _ in 0..2 {
        for i in 0..300 {
            assert_eq!(
                text(&mut p, &[b"GET", format!("user:{i}").as_bytes()]),
                want
            );
        }
    }
    let bytes = metric(mport, "respire_cache_bytes");
    assert!(
        bytes > 0.0 && bytes <= 64.0 * 1024.0,
        "the cache holds {bytes} bytes, over its 64 KiB"
    );
    assert!(metric(mport, "respire_cache_evictions_total") > 100.0);
    // A sequential scan larger than the cache never hits (as with any LRU), but the most
    // recently read keys are still there.
    let hits = metric(mport, "respire_cache_hits_total");
    for i in 295..300 {
        assert_eq!(
            text(&mut p, &[b"GET", format!("user:{i}").as_bytes()]),
            want
        );
    }
    assert_eq!(metric(mport, "respire_cache_hits_total") - hits, 5.0);
}

#[test]
fn a_lost_tracking_connection_flushes_the_cache() {
    let redis = RedisServer::start();
    let (proxy, mport, _dir) = cached_proxy(&redis, USERS, "2");
    let mut p = Raw::connect(proxy.port);
    let mut direct = Raw::connect(redis.port);
    assert_eq!(text(&mut p, &[b"SET", b"user:t", b"v1"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"user:t"]), "$2\r\nv1\r\n");
    let flushes = metric(mport, "respire_cache_flushes_total");
    // Kill respire's tracking connection (flag t in CLIENT LIST).
    let id = tracking_client(&mut direct).expect("respire's tracking connection on Redis");
    assert_eq!(
        text(&mut direct, &[b"CLIENT", b"KILL", b"ID", id.as_bytes()]),
        ":1\r\n"
    );
    wait_metric(
        mport,
        "respire_cache_flushes_total",
        |v| v > flushes,
        "the cache to be flushed",
    );
    // A write respire could not hear of is never hidden by the old reply.
    assert_eq!(text(&mut direct, &[b"SET", b"user:t", b"v2"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"user:t"]), "$2\r\nv2\r\n");
    // The connection comes back and the cache serves again.
    wait_active(mport, true, "the cache to serve again");
    // (This client read while the cache was off: it uses the cache again after a fence round.)
    until_cached(&mut p, mport, &[b"GET", b"user:t"], "$2\r\nv2\r\n");
    assert!(
        proxy.log().contains("cache tracking connection lost"),
        "{}",
        proxy.log()
    );
}

/// A node that stays down is said once in the log, not at every reconnection attempt (they
/// back off), and the cache serves again once the node is back.
#[test]
fn a_node_down_for_a_while_is_logged_once_and_cached_again_when_back() {
    let mut redis = RedisServer::start();
    let (proxy, mport, _dir) = cached_proxy(&redis, USERS, "1");
    wait_active(mport, true, "the cache to serve");
    redis.kill();
    wait_active(mport, false, "the cache to stop serving");
    // Reconnection attempts went on meanwhile (every 100 ms before they backed off).
    std::thread::sleep(Duration::from_secs(3));
    let said = proxy
        .log()
        .matches("cache tracking connection lost")
        .count();
    assert_eq!(said, 1, "{}", proxy.log());
    redis.restart();
    wait_active(mport, true, "the cache to serve again");
    assert!(
        proxy.log().contains("tracking connection up again"),
        "{}",
        proxy.log()
    );
    let mut p = Raw::connect(proxy.port);
    // The data connections come back on their own backoff (the first read, made when respire
    // started, opened them before the node went down): until then writes are refused.
    let start = Instant::now();
    loop {
        let got = text(&mut p, &[b"SET", b"user:back", b"v"]);
        if got == "+OK\r\n" {
            break;
        }
        assert!(
            got.starts_with("-ERR respire: backend") && start.elapsed() < Duration::from_secs(10),
            "{got}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The SET's own invalidation comes back on the tracking connection and may land after the
    // next GET filled the cache (dropping that reply, as it should): a later GET is a hit.
    let hits = metric(mport, "respire_cache_hits_total");
    let start = std::time::Instant::now();
    while metric(mport, "respire_cache_hits_total") == hits
        && start.elapsed() < Duration::from_secs(5)
    {
        assert_eq!(text(&mut p, &[b"GET", b"user:back"]), "$1\r\nv\r\n");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        metric(mport, "respire_cache_hits_total") > hits,
        "never served from the cache again: {}",
        proxy.log()
    );
}

#[test]
fn over_a_cluster_every_node_reports_its_writes() {
    let cluster = Cluster::start(3, 1);
    let (proxy, mport, _dir) = cached_proxy_args(&["--cluster", &cluster.seeds()], USERS, "2");
    let mut p = Raw::connect(proxy.port);
    let keys: Vec<String> = (0..12).map(|i| format!("user:{i}")).collect();
    for k in &keys {
        assert_eq!(text(&mut p, &[b"SET", k.as_bytes(), b"old"]), "+OK\r\n");
    }
    let mget: Vec<&[u8]> = std::iter::once(&b"MGET"[..])
        .chain(keys.iter().map(|k| k.as_bytes()))
        .collect();
    let old = format!("*12\r\n{}", "$3\r\nold\r\n".repeat(12));
    // The writes' invalidations come on three other connections and may land after the first
    // MGET's reply was kept, dropping it: a few tries, until a repeated MGET is a hit.
    let mut cached = false;
    for _ in 0..20 {
        assert_eq!(text(&mut p, &mget), old);
        let hits = metric(mport, "respire_cache_hits_total");
        assert_eq!(text(&mut p, &mget), old);
        if metric(mport, "respire_cache_hits_total") - hits == 1.0 {
            cached = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cached, "an MGET over three masters is cached whole");
    // A write on each master, straight to it: each one's tracking connection reports it.
    let mut want = vec!["$3\r\nold\r\n".to_string(); 12];
    let mut masters_written = std::collections::HashSet::new();
    for (i, k) in keys.iter().enumerate() {
        let port = cluster.owner_port(k);
        if masters_written.insert(port) {
            let mut d = Raw::connect(port);
            assert_eq!(text(&mut d, &[b"SET", k.as_bytes(), b"new"]), "+OK\r\n");
            want[i] = "$3\r\nnew\r\n".to_string();
            until(&mut p, &mget, &format!("*12\r\n{}", want.concat()));
        }
    }
    assert_eq!(masters_written.len(), 3);
}

/// A failover under a cached key: a write made straight on the promoted master afterwards
/// still drops the cached reply (respire follows the new master with a tracking connection of
/// its own, and empties the cache while it has none), and the cache serves again.
#[test]
fn the_cache_follows_a_failover() {
    let cluster = Cluster::start(3, 1);
    let (proxy, mport, _dir) = cached_proxy_args(&["--cluster", &cluster.seeds()], USERS, "2");
    let mut p = Raw::connect(proxy.port);
    let key = "user:failover";
    assert_eq!(text(&mut p, &[b"SET", key.as_bytes(), b"old"]), "+OK\r\n");
    until_cached(&mut p, mport, &[b"GET", key.as_bytes()], "$3\r\nold\r\n");
    let master_port = cluster.owner_port(key);
    let master = cluster
        .nodes
        .iter()
        .position(|n| n.port == master_port)
        .unwrap();
    let replica = (0..cluster.nodes.len())
        .find(|&i| {
            cluster
                .cli(i, &["INFO", "replication"])
                .contains(&format!("master_port:{master_port}"))
        })
        .unwrap();
    assert!(
        cluster
            .cli(replica, &["CLUSTER", "FAILOVER"])
            .contains("OK")
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let promoted = || cluster.is_master(replica) && !cluster.is_master(master);
    while !promoted() {
        assert!(Instant::now() < deadline, "the replica was not promoted");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.wait_healthy(Duration::from_secs(30));
    // A write through respire to the key's slot makes it meet the new master (a redirection).
    assert_eq!(
        text(&mut p, &[b"SET", b"{user:failover}.other", b"x"]),
        "+OK\r\n"
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut direct = Raw::connect(cluster.nodes[replica].port);
    assert_eq!(
        text(&mut direct, &[b"SET", key.as_bytes(), b"new"]),
        "+OK\r\n"
    );
    until(&mut p, &[b"GET", key.as_bytes()], "$3\r\nnew\r\n");
    // Served from the cache again, fresh.
    until_cached(&mut p, mport, &[b"GET", key.as_bytes()], "$3\r\nnew\r\n");
}

#[test]
fn empty_replies_are_cached_only_when_asked_and_settings_reload_live() {
    let redis = RedisServer::start();
    let settings = "[config]\n[[config.rules]]\nkeys = \"user:*\"\nttl = \"60s\"\nempty_ttl = \"60s\"\n[[config.rules]]\nkeys = \"item:*\"\nttl = \"60s\"\n";
    let (proxy, mport, dir) = cached_proxy(&redis, settings, "2");
    let mut p = Raw::connect(proxy.port);
    let mut direct = Raw::connect(redis.port);
    let hits = || metric(mport, "respire_cache_hits_total");
    // A missing user is remembered (empty_ttl); a missing item is not.
    for key in [&b"user:none"[..], b"item:none"] {
        assert_eq!(text(&mut p, &[b"GET", key]), "$-1\r\n");
    }
    let before = hits();
    assert_eq!(text(&mut p, &[b"GET", b"user:none"]), "$-1\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"item:none"]), "$-1\r\n");
    assert_eq!(hits() - before, 1.0, "only the user's nil is a hit");
    // Creating the key drops the remembered nil.
    assert_eq!(
        text(&mut direct, &[b"SET", b"user:none", b"now"]),
        "+OK\r\n"
    );
    until(&mut p, &[b"GET", b"user:none"], "$3\r\nnow\r\n");

    // New settings while the client stays connected: only item:* is cached from now on.
    let flushes = metric(mport, "respire_cache_flushes_total");
    std::fs::write(
        dir.path().join("cache-policy.toml"),
        "[config]\n[[config.rules]]\nkeys = \"item:*\"\nttl = \"60s\"\n",
    )
    .unwrap();
    wait_metric(
        mport,
        "respire_cache_flushes_total",
        |v| v > flushes,
        "the cache to restart with the new settings",
    );
    wait_active(mport, true, "the cache to serve again");
    assert_eq!(text(&mut direct, &[b"SET", b"item:1", b"i"]), "+OK\r\n");
    // item:1 is cached now (it becomes a hit) …
    until_cached(&mut p, mport, &[b"GET", b"item:1"], "$1\r\ni\r\n");
    // … and user:none no longer is.
    assert_eq!(text(&mut p, &[b"GET", b"user:none"]), "$3\r\nnow\r\n");
    let before = hits();
    assert_eq!(text(&mut p, &[b"GET", b"item:1"]), "$1\r\ni\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"user:none"]), "$3\r\nnow\r\n");
    assert_eq!(
        hits() - before,
        1.0,
        "item:1 is a hit, user:none is no longer cached"
    );
    // Redis now reports writes under the new prefix.
    assert_eq!(text(&mut direct, &[b"SET", b"item:1", b"j"]), "+OK\r\n");
    until(&mut p, &[b"GET", b"item:1"], "$1\r\nj\r\n");
}

/// Tracking costs Redis on every write (it matches each written key against the cached
/// prefixes): while no plugin asks the cache to keep a read, respire holds no tracking
/// connection. The first such read opens them, the cache serves while reads come, and after
/// `response_cache_idle` without one they close and the cache empties — so a write Redis could
/// not report meanwhile is never hidden by an old reply.
#[test]
fn an_idle_cache_holds_no_tracking_connection_and_opens_one_when_asked() {
    let redis = RedisServer::start();
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(cfg.path(), "response_cache_idle = \"1500ms\"\n").unwrap();
    let (proxy, mport, _dir) = start_cached(
        &[
            "--config",
            cfg.path().to_str().unwrap(),
            "--backend",
            &redis.addr(),
        ],
        USERS,
    );
    let mut p = Raw::connect(proxy.port);
    let mut direct = Raw::connect(redis.port);
    // Writes and reads the plugin does not cache leave it off.
    for _ in 0..20 {
        assert_eq!(text(&mut p, &[b"SET", b"user:1", b"v1"]), "+OK\r\n");
        assert_eq!(text(&mut p, &[b"GET", b"other"]), "$-1\r\n");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(mport, "respire_cache_active"), 0.0);
    assert_eq!(tracking_client(&mut direct), None);

    // A read the plugin caches is answered (by Redis) and turns the cache on.
    assert_eq!(text(&mut p, &[b"GET", b"user:1"]), "$2\r\nv1\r\n");
    wait_active(mport, true, "the cache to start serving");
    assert!(tracking_client(&mut direct).is_some());
    until_cached(&mut p, mport, &[b"GET", b"user:1"], "$2\r\nv1\r\n");

    // Reads keep it on past the idle time.
    for _ in 0..30 {
        assert_eq!(text(&mut p, &[b"GET", b"user:1"]), "$2\r\nv1\r\n");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(mport, "respire_cache_active"), 1.0);

    // Without them it goes off, and Redis no longer tracks for it.
    let hits = metric(mport, "respire_cache_hits_total");
    wait_active(mport, false, "the idle cache to go off");
    let start = Instant::now();
    while tracking_client(&mut direct).is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "respire's tracking connection is still open on Redis"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(mport, "respire_cache_entries"), 0.0);
    // A write respire cannot hear of now: the next read is Redis's answer, not the old reply.
    assert_eq!(text(&mut direct, &[b"SET", b"user:1", b"v2"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"user:1"]), "$2\r\nv2\r\n");
    assert_eq!(metric(mport, "respire_cache_hits_total"), hits);
    // That read turned it on again.
    wait_active(mport, true, "the cache to serve again");
    until_cached(&mut p, mport, &[b"GET", b"user:1"], "$2\r\nv2\r\n");
    let log = proxy.log();
    assert_eq!(
        log.matches("response cache off until a plugin asks for it again")
            .count(),
        1,
        "{log}"
    );
}

/// A write sent while the cache was off, answered once it is on: the cache did not follow it,
/// so only Redis's invalidation tells it. Its writer must still see it on its next read, even
/// when that invalidation is long to apply (here 50,000 keys in one push) and another client
/// filled the cache with the old value meanwhile.
#[test]
fn a_write_sent_before_the_cache_came_on_is_seen_by_its_writer() {
    let redis = RedisServer::start();
    // Two workers, connections spread: the writer and the reader each have their own backend
    // connection (the paused write holds up only the writer's).
    let (proxy, mport, _dir) = start_cached(
        &[
            "--backend",
            &redis.addr(),
            "--workers",
            "2",
            "--worker-affinity",
            "0",
        ],
        USERS,
    );
    // A connection holds its seat on a worker until its session ends: once respire's start-up
    // probes are gone, the writer and the reader are placed on different workers. (On a loaded
    // machine a probe still open put both on one, and the reader's read then waited behind
    // the paused write.)
    wait_metric(
        mport,
        "respire_client_connections",
        |v| v == 0.0,
        "the start-up connections to close",
    );
    std::thread::sleep(Duration::from_millis(50));
    let mut writer = Raw::connect(proxy.port);
    let mut reader = Raw::connect(proxy.port);
    let mut direct = Raw::connect(redis.port);
    assert_eq!(text(&mut direct, &[b"SET", b"user:last", b"v1"]), "+OK\r\n");
    assert_eq!(metric(mport, "respire_cache_active"), 0.0);

    // Redis holds writes; the writer's MSET goes out while the cache is off.
    assert_eq!(
        text(&mut direct, &[b"CLIENT", b"PAUSE", b"10000", b"WRITE"]),
        "+OK\r\n"
    );
    let keys: Vec<Vec<u8>> = (0..50_000)
        .map(|i| format!("user:{i}").into_bytes())
        .collect();
    let mut mset: Vec<&[u8]> = vec![b"MSET"];
    for k in &keys {
        mset.push(k);
        mset.push(b"x");
    }
    mset.push(b"user:last");
    mset.push(b"v2");
    writer.send(&resp(&mset));
    // The reader's read turns the cache on and leaves the old value in it.
    until_cached(&mut reader, mport, &[b"GET", b"user:last"], "$2\r\nv1\r\n");

    // Read behind its own unanswered write (the cache is on now): never the old value.
    writer.send(&resp(&[b"GET", b"user:last"]));
    assert_eq!(text(&mut direct, &[b"CLIENT", b"UNPAUSE"]), "+OK\r\n");
    assert_eq!(
        String::from_utf8_lossy(&writer.read_replies(2)),
        "+OK\r\n$2\r\nv2\r\n"
    );
    // Nor right after its answer, while the invalidation of 50,000 keys may still be on its way.
    assert_eq!(text(&mut writer, &[b"GET", b"user:last"]), "$2\r\nv2\r\n");
    // Other clients see it once its invalidation is applied (as a write made on Redis), and
    // the cache keeps serving, the new value.
    until(&mut reader, &[b"GET", b"user:last"], "$2\r\nv2\r\n");
    until_cached(&mut reader, mport, &[b"GET", b"user:last"], "$2\r\nv2\r\n");
}
