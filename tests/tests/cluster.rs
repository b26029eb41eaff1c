//! End-to-end tests of respire in front of a real 3-master/3-replica Redis
//! Cluster, and in front of standalone shards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Duration;

use redis::{Commands, Value};
use respire_tests::{
    Cluster, DATA_TYPES, Raw, RedisServer, Respire, assert_same_replies, cli, resp,
};

fn compare_with_single_redis(proxy_port: u16, script: &[&[&str]]) {
    let direct = RedisServer::start();
    assert_same_replies(direct.port, proxy_port, script);
}

/// The data-type script without database switching (a cluster has only database 0).
fn cluster_script() -> Vec<&'static [&'static str]> {
    DATA_TYPES
        .iter()
        .copied()
        .filter(|c| c[0] != "SELECT" && !c.contains(&"in2"))
        .collect()
}

const SPLIT: &[&[&str]] = &[
    &["FLUSHALL"],
    &["MSET", "a", "1", "b", "2", "c", "3", "{a}x", "4"],
    &["MGET", "a", "nope", "b", "c", "{a}x", "a"],
    &["EXISTS", "a", "b", "a", "missing"],
    &["TOUCH", "a", "b", "c"],
    &["DEL", "a", "b", "missing"],
    &["UNLINK", "c", "{a}x"],
    &["MGET", "a", "b", "c"],
    &["DBSIZE"],
    &["SET", "{t}1", "x"],
    &["RENAME", "{t}1", "{t}2"],
    &["GET", "{t}2"],
    &["KEYS", "{t}*"],
    &["SCRIPT", "LOAD", "return 7"],
    &[
        "SCRIPT",
        "EXISTS",
        "a2f3e2fd5d8d4d6e3ac2ac1e7fe5a4b9b1f0f3a0",
        "fd8d76f3dc2e26d0d42cd0c22de7fe4ba0fd8bc7",
    ],
    &["EVAL", "return redis.call('GET', KEYS[1])", "1", "{t}2"],
    &["PUBSUB", "NUMSUB", "nobody"],
    &["PUBSUB", "NUMPAT"],
    &["FLUSHALL"],
    &["DBSIZE"],
    &["RANDOMKEY"],
];

#[test]
fn cluster_behaves_like_one_redis() {
    let cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    compare_with_single_redis(proxy.port, &cluster_script());
    compare_with_single_redis(proxy.port, SPLIT);

    // Keys really are spread over the three masters.
    let mut con = proxy.conn();
    for i in 0..300 {
        let _: () = con.set(format!("key:{i}"), i).unwrap();
    }
    let masters = cluster.master_ports();
    assert_eq!(masters.len(), 3);
    for port in &masters {
        let mut direct = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let n: i64 = redis::cmd("DBSIZE").query(&mut direct).unwrap();
        assert!(n > 50, "master {port} holds only {n} of 300 keys");
    }
    let total: i64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(total, 300);
    let keys: Vec<String> = (0..300).map(|i| format!("key:{i}")).collect();
    let values: Vec<i64> = con.mget(&keys).unwrap();
    assert_eq!(values, (0..300).collect::<Vec<i64>>());
    let info: String = redis::cmd("INFO").arg("keyspace").query(&mut con).unwrap();
    assert!(info.contains("db0:keys=300,"), "{info}");
    // RANDOMKEY: a key of each master comes up (one key per master here).
    let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
    for k in ["a", "b", "c"] {
        let _: () = con.set(k, 1).unwrap();
    }
    let owners: std::collections::BTreeSet<String> = ["a", "b", "c"]
        .iter()
        .map(|k| slot_node(&cluster, k))
        .collect();
    assert_eq!(owners.len(), 3, "a, b and c live on three masters");
    let seen: std::collections::BTreeSet<String> = (0..30)
        .map(|_| redis::cmd("RANDOMKEY").query(&mut con).unwrap())
        .collect();
    assert_eq!(
        seen,
        ["a", "b", "c"].map(String::from).into_iter().collect()
    );
}

#[test]
fn multi_key_commands_need_one_slot() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut p = Raw::connect(proxy.port);
    let crossslot = "-CROSSSLOT Keys in request don't hash to the same slot\r\n";
    for cmd in [
        &[&b"RENAME"[..], b"a", b"b"][..],
        &[b"MSETNX", b"a", b"1", b"b", b"2"],
        &[b"SINTERSTORE", b"dst", b"a", b"b"],
        &[b"LMOVE", b"a", b"b", b"LEFT", b"RIGHT"],
        &[b"EVAL", b"return 1", b"2", b"a", b"b"],
        &[b"BLPOP", b"a", b"b", b"1"],
    ] {
        assert_eq!(
            String::from_utf8_lossy(&p.roundtrip(&resp(cmd), 1)),
            crossslot,
            "{:?}",
            String::from_utf8_lossy(cmd[0])
        );
    }
    assert_eq!(
        p.roundtrip(&resp(&[b"MSETNX", b"{x}a", b"1", b"{x}b", b"2"]), 1),
        b":1\r\n"
    );
    assert_eq!(
        p.roundtrip(&resp(&[b"SELECT", b"1"]), 1),
        b"-ERR SELECT is not allowed in cluster mode\r\n"
    );
}

#[test]
fn scan_returns_every_key_exactly_once() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut con = proxy.conn();
    // A keyspace small enough for one call of one Redis comes in one call over three masters
    // too (it used to come one master per call, in pages empty where a master had no match).
    let _: () = con.mset(&[("a", 1), ("b", 2), ("c", 3)]).unwrap();
    let _: () = con.sadd("a-set", 1).unwrap();
    let owners: HashSet<u16> = ["a", "b", "c"]
        .iter()
        .map(|k| cluster.owner_port(k))
        .collect();
    assert_eq!(owners.len(), 3);
    let (next, mut keys): (u64, Vec<String>) = redis::cmd("SCAN").arg(0).query(&mut con).unwrap();
    keys.sort();
    assert_eq!(
        (next, keys),
        (0, vec!["a".into(), "a-set".into(), "b".into(), "c".into()])
    );
    let typed: (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg("a*")
        .arg("TYPE")
        .arg("set")
        .query(&mut con)
        .unwrap();
    assert_eq!(typed, (0, vec!["a-set".to_string()]));
    let _: () = redis::cmd("FLUSHALL").query(&mut con).unwrap();
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.cmd("SET").arg(format!("scan:{i}")).arg(i).ignore();
        pipe.cmd("SET").arg(format!("other:{i}")).arg(i).ignore();
    }
    pipe.query::<()>(&mut con).unwrap();
    let mut seen = HashSet::new();
    let mut cursor: u64 = 0;
    let mut calls = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("scan:*")
            .arg("COUNT")
            .arg(50)
            .query(&mut con)
            .unwrap();
        for k in keys {
            assert!(k.starts_with("scan:"), "{k}");
            assert!(seen.insert(k.clone()), "{k} returned twice");
        }
        calls += 1;
        assert!(calls < 10_000);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    assert_eq!(seen.len(), 1000);
    let typed: (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("TYPE")
        .arg("hash")
        .query(&mut con)
        .unwrap();
    assert!(typed.1.is_empty());
    let bad: redis::RedisResult<Value> = redis::cmd("SCAN").arg("notanumber").query(&mut con);
    assert!(bad.unwrap_err().to_string().contains("invalid cursor"));
    let keys: Vec<String> = con.keys("scan:*").unwrap();
    assert_eq!(keys.len(), 1000);
}

#[test]
fn transactions_blocking_and_pubsub_over_a_cluster() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut p = Raw::connect(proxy.port);
    // A transaction on one node.
    let got = p.roundtrip(
        &[
            resp(&[b"MULTI"]),
            resp(&[b"SET", b"{u}a", b"1"]),
            resp(&[b"INCR", b"{u}b"]),
            resp(&[b"PING"]),
            resp(&[b"EXEC"]),
        ]
        .concat(),
        5,
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+OK\r\n+QUEUED\r\n+QUEUED\r\n+QUEUED\r\n*3\r\n+OK\r\n:1\r\n+PONG\r\n"
    );
    // CONFIG SET goes to every master (settings hold for the whole keyspace).
    assert_eq!(
        p.roundtrip(&resp(&[b"CONFIG", b"SET", b"lua-time-limit", b"10"]), 1),
        b"+OK\r\n"
    );
    for i in 0..3 {
        let got = cluster.cli(i, &["CONFIG", "GET", "lua-time-limit"]);
        assert!(got.contains("\n10"), "node {i}: {got}");
    }
    // A script that never ends on one master: SCRIPT KILL through respire reaches it (every
    // master gets it, on connections of their own), and the script's caller gets Redis's error.
    let mut scripted = Raw::connect(proxy.port);
    scripted.send(&resp(&[b"EVAL", b"while true do end", b"1", b"{u}loop"]));
    std::thread::sleep(Duration::from_millis(300));
    let mut killed = String::new();
    for _ in 0..50 {
        killed =
            String::from_utf8_lossy(&p.roundtrip(&resp(&[b"SCRIPT", b"KILL"]), 1)).into_owned();
        if !killed.starts_with("-NOTBUSY") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(killed, "+OK\r\n");
    let reply = String::from_utf8_lossy(&scripted.read_replies(1)).into_owned();
    assert!(reply.starts_with("-ERR Script killed by user"), "{reply}");
    assert_eq!(
        String::from_utf8_lossy(&p.roundtrip(&resp(&[b"SCRIPT", b"KILL"]), 1)),
        "-NOTBUSY No scripts in execution right now.\r\n"
    );
    // Keys of another node inside the transaction abort it, as Redis Cluster would.
    let other = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| slot_node(&cluster, k) != slot_node(&cluster, "{u}a"))
        .unwrap();
    let got = p.roundtrip(
        &[
            resp(&[b"MULTI"]),
            resp(&[b"SET", b"{u}a", b"2"]),
            resp(&[b"SET", other.as_bytes(), b"x"]),
            resp(&[b"EXEC"]),
        ]
        .concat(),
        4,
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+OK\r\n+QUEUED\r\n-CROSSSLOT Keys in request don't hash to the same slot\r\n-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(p.roundtrip(&resp(&[b"GET", b"{u}a"]), 1), b"$1\r\n1\r\n");
    // An empty transaction.
    assert_eq!(
        p.roundtrip(&[resp(&[b"MULTI"]), resp(&[b"EXEC"])].concat(), 2),
        b"+OK\r\n*0\r\n"
    );
    // Pipelined behind writes of the same client, a transaction sees them (its connection is
    // another one than theirs: it waits for their replies before it starts).
    for i in 0..100 {
        let key = format!("{{u}}n{i}");
        let got = p.roundtrip(
            &[
                resp(&[b"SET", key.as_bytes(), b"10"]),
                resp(&[b"APPEND", b"{u}log", b"x"]),
                resp(&[b"MULTI"]),
                resp(&[b"INCR", key.as_bytes()]),
                resp(&[b"EXEC"]),
            ]
            .concat(),
            5,
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            format!("+OK\r\n:{}\r\n+OK\r\n+QUEUED\r\n*1\r\n:11\r\n", i + 1),
            "round {i}"
        );
    }
    // WATCH aborts when the key changes.
    let mut other_con = proxy.conn();
    let got = p.roundtrip(
        &[resp(&[b"WATCH", b"{u}a"]), resp(&[b"GET", b"{u}a"])].concat(),
        2,
    );
    assert_eq!(got, b"+OK\r\n$1\r\n1\r\n");
    let _: () = other_con.set("{u}a", "changed").unwrap();
    let got = p.roundtrip(
        &[
            resp(&[b"MULTI"]),
            resp(&[b"SET", b"{u}a", b"mine"]),
            resp(&[b"EXEC"]),
        ]
        .concat(),
        3,
    );
    assert_eq!(got, b"+OK\r\n+QUEUED\r\n*-1\r\n");
    // BLPOP on the right node, released by a producer.
    let client = proxy.client();
    let waiter = std::thread::spawn(move || {
        let mut c = client.get_connection().unwrap();
        let v: (String, String) = redis::cmd("BLPOP")
            .arg("jobs")
            .arg(10)
            .query(&mut c)
            .unwrap();
        v
    });
    std::thread::sleep(Duration::from_millis(300));
    let _: () = other_con.rpush("jobs", "j1").unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        ("jobs".to_string(), "j1".to_string())
    );
    // Pub/Sub across nodes, and sharded Pub/Sub by slot. The count PUBLISH returns is the
    // number of respire's clients that receive it (three here, over the workers' subscriber
    // connections), whichever node the publishing client's commands go to.
    let mut sub_con = proxy.conn();
    let mut sub = sub_con.as_pubsub();
    sub.subscribe("news").unwrap();
    sub.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut others: Vec<Raw> = (0..2).map(|_| Raw::connect(proxy.port)).collect();
    for o in &mut others {
        o.roundtrip(&resp(&[b"SUBSCRIBE", b"news"]), 1);
    }
    for i in 0..4 {
        let mut publisher = proxy.conn();
        let n: i64 = redis::cmd("PUBLISH")
            .arg("news")
            .arg(format!("hello{i}"))
            .query(&mut publisher)
            .unwrap();
        assert_eq!(n, 3, "publisher {i}");
        assert_eq!(
            sub.get_message().unwrap().get_payload::<String>().unwrap(),
            format!("hello{i}")
        );
    }
    drop(sub);
    drop(others);
    let mut s = Raw::connect(proxy.port);
    let got = s.roundtrip(&resp(&[b"SSUBSCRIBE", b"orders"]), 1);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n"
    );
    let receivers: i64 = redis::cmd("SPUBLISH")
        .arg("orders")
        .arg("o1")
        .query(&mut other_con)
        .unwrap();
    assert_eq!(receivers, 1);
    assert_eq!(
        String::from_utf8_lossy(&s.read_replies(1)),
        "*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n$2\r\no1\r\n"
    );
    // CLIENT TRACKING over the three masters: a client that read keys on each is told of
    // each change, whichever node made it, before the writer has its answer.
    let mut t = Raw::tracking(proxy.port);
    let mut w = Raw::connect(proxy.port);
    let keys: Vec<String> = (0..9).map(|i| format!("tracked{i}")).collect();
    let nodes: std::collections::HashSet<u16> =
        keys.iter().map(|k| cluster.owner_port(k)).collect();
    assert_eq!(nodes.len(), 3, "the keys live on every master");
    for k in &keys {
        t.roundtrip(&resp(&[b"GET", k.as_bytes()]), 1);
    }
    for k in &keys {
        assert_eq!(
            w.roundtrip(&resp(&[b"SET", k.as_bytes(), b"v"]), 1),
            b"+OK\r\n"
        );
        let got = t.roundtrip(&resp(&[b"PING"]), 2);
        assert_eq!(
            String::from_utf8_lossy(&got),
            format!("{}+PONG\r\n", respire_tests::invalidation(k))
        );
    }
}

fn slot_node(cluster: &Cluster, key: &str) -> String {
    let slot: i64 = cluster
        .cli(0, &["CLUSTER", "KEYSLOT", key])
        .trim()
        .parse()
        .unwrap();
    for line in cluster.cli(0, &["CLUSTER", "NODES"]).lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if !f.get(2).is_some_and(|r| r.contains("master")) {
            continue;
        }
        for r in &f[8..] {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            if let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>())
                && (a..=b).contains(&slot)
            {
                return f[0].to_string();
            }
        }
    }
    panic!("no owner for slot {slot}");
}

fn node_id(cluster: &Cluster, port: u16) -> String {
    let i = cluster.nodes.iter().position(|n| n.port == port).unwrap();
    cluster.cli(i, &["CLUSTER", "MYID"]).trim().to_string()
}

#[test]
fn moved_and_ask_are_hidden_from_clients() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut con = proxy.conn();
    let _: () = con.set("moving", "v1").unwrap();
    let _: () = con.set("{moving}2", "v2").unwrap();
    let slot: u16 = cluster
        .cli(0, &["CLUSTER", "KEYSLOT", "moving"])
        .trim()
        .parse()
        .unwrap();
    let owner_id = slot_node(&cluster, "moving");
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let src = (0..3)
        .find(|&i| node_id(&cluster, ports[i]) == owner_id)
        .unwrap();
    let dst = (src + 1) % 3;
    let src_id = node_id(&cluster, ports[src]);
    let dst_id = node_id(&cluster, ports[dst]);
    let s = slot.to_string();
    // Start migrating: the slot is MIGRATING on src and IMPORTING on dst; move one key only.
    assert!(
        cluster
            .cli(dst, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &src_id])
            .contains("OK")
    );
    assert!(
        cluster
            .cli(src, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst_id])
            .contains("OK")
    );
    let out = cluster.cli(
        src,
        &[
            "MIGRATE",
            "127.0.0.1",
            &ports[dst].to_string(),
            "",
            "0",
            "5000",
            "KEYS",
            "moving",
        ],
    );
    assert!(out.contains("OK"), "{out}");
    // src answers ASK for the migrated key: respire follows it.
    let v: String = con.get("moving").unwrap();
    assert_eq!(v, "v1");
    let v: String = con.get("{moving}2").unwrap();
    assert_eq!(v, "v2");
    // Pipelined, commands for several nodes (sent as one request per node) with some
    // redirected by ASK among them: every reply is right and in order.
    let mut pipe = redis::pipe();
    for i in 0..20 {
        pipe.cmd("GET").arg("moving");
        pipe.cmd("SET").arg(format!("p{i}")).arg(i);
        pipe.cmd("GET").arg("{moving}2");
        pipe.cmd("GET").arg(format!("p{i}"));
    }
    let got: Vec<String> = pipe.query(&mut con).unwrap();
    for (i, chunk) in got.chunks(4).enumerate() {
        assert_eq!(chunk, ["v1", "OK", "v2", &i.to_string()], "round {i}");
    }
    // A command split over slots whose first or later part is redirected: the other part's
    // reply is kept and the merged reply is whole, in key order.
    let elsewhere = ["elsewhere", "other", "third"]
        .into_iter()
        .find(|k| cluster.cli(0, &["CLUSTER", "KEYSLOT", k]).trim() != s)
        .unwrap();
    let _: () = con.set(elsewhere, "v0").unwrap();
    let later: Vec<String> = redis::cmd("MGET")
        .arg(elsewhere)
        .arg("moving")
        .query(&mut con)
        .unwrap();
    assert_eq!(later, vec!["v0", "v1"]);
    let first: Vec<String> = redis::cmd("MGET")
        .arg("moving")
        .arg(elsewhere)
        .query(&mut con)
        .unwrap();
    assert_eq!(first, vec!["v1", "v0"]);
    // Split over many slots, a node's parts go to it as one request: a redirected part in the
    // middle of such a run is followed alone, the others' replies are kept.
    let mut keys: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    keys.push("moving".into());
    keys.extend((10..20).map(|i| format!("p{i}")));
    // (Not `{moving}2` too: two keys of a slot half migrated get TRYAGAIN until it ends.)
    keys.push("missing".into());
    let mut expected: Vec<Option<String>> = (0..10).map(|i| Some(i.to_string())).collect();
    expected.push(Some("v1".into()));
    expected.extend((10..20).map(|i| Some(i.to_string())));
    expected.push(None);
    for round in 0..5 {
        let got: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con).unwrap();
        assert_eq!(got, expected, "MGET round {round}");
        let n: i64 = redis::cmd("EXISTS").arg(&keys).query(&mut con).unwrap();
        assert_eq!(n, 21, "EXISTS round {round}");
    }
    // A multi-key read while the slot is half migrated gets TRYAGAIN from Redis: respire retries
    // until the migration finishes (a moment later, in another thread); src then answers MOVED.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(250));
            let out = cluster.cli(
                src,
                &[
                    "MIGRATE",
                    "127.0.0.1",
                    &ports[dst].to_string(),
                    "",
                    "0",
                    "5000",
                    "KEYS",
                    "{moving}2",
                ],
            );
            assert!(out.contains("OK"), "{out}");
            for i in 0..3 {
                assert!(
                    cluster
                        .cli(i, &["CLUSTER", "SETSLOT", &s, "NODE", &dst_id])
                        .contains("OK")
                );
            }
        });
        let both: Vec<String> = redis::cmd("MGET")
            .arg("moving")
            .arg("{moving}2")
            .query(&mut con)
            .unwrap();
        assert_eq!(both, vec!["v1", "v2"]);
    });
    for _ in 0..20 {
        let v: String = con.get("moving").unwrap();
        assert_eq!(v, "v1");
        let _: () = con.set("{moving}2", "v3").unwrap();
    }
    let direct: String = redis::Client::open(format!("redis://127.0.0.1:{}/", ports[dst]))
        .unwrap()
        .get_connection()
        .unwrap()
        .get("{moving}2")
        .unwrap();
    assert_eq!(direct, "v3", "the write went to the new owner");
    // The slot moves back behind respire's back: a pipeline for it gets MOVED replies, which
    // respire follows command by command, keeping the order and the writes.
    for (from, to) in [(dst, src)] {
        let (from_id, to_id) = (node_id(&cluster, ports[from]), node_id(&cluster, ports[to]));
        assert!(
            cluster
                .cli(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
                .contains("OK")
        );
        assert!(
            cluster
                .cli(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
                .contains("OK")
        );
        let out = cluster.cli(
            from,
            &[
                "MIGRATE",
                "127.0.0.1",
                &ports[to].to_string(),
                "",
                "0",
                "5000",
                "KEYS",
                "moving",
                "{moving}2",
            ],
        );
        assert!(out.contains("OK"), "{out}");
        for i in 0..3 {
            assert!(
                cluster
                    .cli(i, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id])
                    .contains("OK")
            );
        }
    }
    let mut pipe = redis::pipe();
    for i in 0..30 {
        pipe.cmd("GET").arg("moving");
        pipe.cmd("INCR").arg("{moving}n");
        pipe.cmd("GET").arg(format!("p{}", i % 20));
    }
    let got: Vec<String> = pipe.query(&mut con).unwrap();
    for (i, chunk) in got.chunks(3).enumerate() {
        assert_eq!(
            chunk,
            ["v1", &(i + 1).to_string(), &(i % 20).to_string()],
            "after MOVED, round {i}"
        );
    }
    // Writes split over many slots, the moved slot's among them, land on the owners; the
    // merged replies count every key once.
    let mut mset = redis::cmd("MSET");
    for i in 0..20 {
        mset.arg(format!("q{i}")).arg(format!("w{i}"));
        if i == 7 {
            mset.arg("{moving}q").arg("wm");
        }
    }
    let _: () = mset.query(&mut con).unwrap();
    let mut keys: Vec<String> = (0..20).map(|i| format!("q{i}")).collect();
    keys.insert(8, "{moving}q".into());
    let got: Vec<String> = redis::cmd("MGET").arg(&keys).query(&mut con).unwrap();
    let mut expected: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
    expected.insert(8, "wm".into());
    assert_eq!(got, expected);
    let owner: String = redis::Client::open(format!("redis://127.0.0.1:{}/", ports[src]))
        .unwrap()
        .get_connection()
        .unwrap()
        .get("{moving}q")
        .unwrap();
    assert_eq!(owner, "wm", "the split write went to the slot's owner");
    let n: i64 = redis::cmd("DEL")
        .arg(&keys)
        .arg("nope")
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 21);
    let back: String = redis::Client::open(format!("redis://127.0.0.1:{}/", ports[src]))
        .unwrap()
        .get_connection()
        .unwrap()
        .get("{moving}n")
        .unwrap();
    assert_eq!(back, "30", "the writes went to the owner, once each");
}

#[test]
fn respire_presents_itself_as_a_one_node_cluster() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut con = proxy.conn();
    let slots: Vec<(i64, i64, Vec<Value>)> =
        redis::cmd("CLUSTER").arg("SLOTS").query(&mut con).unwrap();
    assert_eq!(slots.len(), 1);
    assert_eq!((slots[0].0, slots[0].1), (0, 16383));
    let node = &slots[0].2;
    assert_eq!(node[0], Value::BulkString(b"127.0.0.1".to_vec()));
    assert_eq!(node[1], Value::Int(i64::from(proxy.port)));
    let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).unwrap();
    assert!(
        info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:1"),
        "{info}"
    );
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("foo")
        .query(&mut con)
        .unwrap();
    assert_eq!(slot, 12182);
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap();
    assert!(
        nodes.contains(&format!("127.0.0.1:{}@0 myself,master", proxy.port)),
        "{nodes}"
    );
    let links: Vec<Value> = redis::cmd("CLUSTER").arg("LINKS").query(&mut con).unwrap();
    assert!(links.is_empty(), "one node has no links: {links:?}");
    let ok: String = redis::cmd("READONLY").query(&mut con).unwrap();
    assert_eq!(ok, "OK");
    let _: () = con.set("foo", "bar").unwrap();
    let n: i64 = redis::cmd("CLUSTER")
        .arg("COUNTKEYSINSLOT")
        .arg(12182)
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 1);
}

/// Behind NAT or a port mapping respire gives the address it is told to (`announce`), as
/// Redis's `cluster-announce-*`: an IP address as is, a hostname as the endpoint.
#[test]
fn respire_announces_the_address_it_is_given() {
    let cluster = Cluster::start(3, 0);
    let by_ip = Respire::start_args(&[
        "--cluster",
        &cluster.seeds(),
        "--announce",
        "10.9.8.7:16380",
    ]);
    let mut con = by_ip.conn();
    let slots: Vec<(i64, i64, Vec<Value>)> =
        redis::cmd("CLUSTER").arg("SLOTS").query(&mut con).unwrap();
    let node = &slots[0].2;
    assert_eq!(node[0], Value::BulkString(b"10.9.8.7".to_vec()));
    assert_eq!(node[1], Value::Int(16380));
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut con).unwrap();
    assert!(
        nodes.contains(" 10.9.8.7:16380@0 myself,master "),
        "{nodes}"
    );
    let by_name = Respire::start_args(&[
        "--cluster",
        &cluster.seeds(),
        "--announce",
        "respire.example:16381",
    ]);
    let mut raw = Raw::connect(by_name.port);
    let slots =
        String::from_utf8_lossy(&raw.roundtrip(&resp(&[b"CLUSTER", b"SLOTS"]), 1)).into_owned();
    // The node: its endpoint, port, id (40 characters) and metadata (its IP).
    assert!(
        slots.contains("*4\r\n$15\r\nrespire.example\r\n:16381\r\n$40\r\n"),
        "{slots}"
    );
    assert!(
        slots.ends_with("*2\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n"),
        "{slots}"
    );
    let shards =
        String::from_utf8_lossy(&raw.roundtrip(&resp(&[b"CLUSTER", b"SHARDS"]), 1)).into_owned();
    assert!(
        shards.contains("$8\r\nendpoint\r\n$15\r\nrespire.example\r\n$8\r\nhostname\r\n$15\r\nrespire.example\r\n"),
        "{shards}"
    );
    let nodes =
        String::from_utf8_lossy(&raw.roundtrip(&resp(&[b"CLUSTER", b"NODES"]), 1)).into_owned();
    assert!(
        nodes.contains(" 127.0.0.1:16381@0,respire.example myself,master "),
        "{nodes}"
    );
}

/// `MONITOR` through respire shows the commands of every master (it used to follow one,
/// chosen per client), each once, after one `+OK`.
#[test]
fn monitor_shows_the_commands_run_on_every_master() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let keys = cluster.key_per_master("mon:");
    let mut monitor = Raw::connect(proxy.port);
    assert_eq!(monitor.roundtrip(&resp(&[b"MONITOR"]), 1), b"+OK\r\n");
    let mut client = Raw::connect(proxy.port);
    for key in &keys {
        assert_eq!(
            client.roundtrip(&resp(&[b"GET", key.as_bytes()]), 1),
            b"$-1\r\n"
        );
    }
    let lines = String::from_utf8_lossy(&monitor.read_replies(3)).into_owned();
    for key in &keys {
        assert_eq!(
            lines.matches(&format!("\"GET\" \"{key}\"")).count(),
            1,
            "{key} on port {} in:\n{lines}",
            cluster.owner_port(key)
        );
    }
    assert!(!lines.contains("+OK"), "{lines}");
    // A transaction over a cluster goes to its first key's master: MONITOR shows the client's
    // own MULTI and EXEC (as it wrote them), and those of one that never reached Redis.
    let tx = |cmds: &[&[&[u8]]], client: &mut Raw| {
        let mut out = Vec::new();
        for c in cmds {
            out.extend(resp(c));
        }
        client.roundtrip(&out, cmds.len());
    };
    let key = keys[1].as_bytes();
    tx(
        &[&[b"multi"], &[b"set", key, b"v"], &[b"exec"]],
        &mut client,
    );
    tx(&[&[b"Multi"], &[b"Exec"]], &mut client);
    tx(&[&[b"multi"], &[b"discard"]], &mut client);
    let lines = String::from_utf8_lossy(&monitor.read_replies(7)).into_owned();
    let names: Vec<&str> = lines
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, c)| c))
        .collect();
    let set = format!("\"set\" \"{}\" \"v\"", keys[1]);
    assert_eq!(
        names,
        [
            "\"multi\"",
            set.as_str(),
            "\"exec\"",
            "\"Multi\"",
            "\"Exec\"",
            "\"multi\"",
            "\"discard\""
        ],
        "{lines}"
    );
    // Nothing of respire's own: its idle connections check their node every 2 s.
    assert_eq!(monitor.more_within(Duration::from_millis(4500)), None);
}

/// `INFO` over a cluster speaks for every master: each master's commands in `commandstats`
/// (and its errors in `errorstats`), and the changes since the last save added up.
#[test]
fn info_counts_the_commands_of_every_master() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut c = Raw::connect(proxy.port);
    let info = |c: &mut Raw, section: &str| {
        String::from_utf8_lossy(&c.roundtrip(&resp(&[b"INFO", section.as_bytes()]), 1)).into_owned()
    };
    let field = |text: &str, name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    assert_eq!(
        c.roundtrip(&resp(&[b"CONFIG", b"RESETSTAT"]), 1),
        b"+OK\r\n"
    );
    let dirty: i64 = field(&info(&mut c, "persistence"), "rdb_changes_since_last_save")
        .parse()
        .unwrap();
    let keys: Vec<String> = (0..12).map(|i| format!("stat:{i}")).collect();
    let owners: HashSet<u16> = keys.iter().map(|k| cluster.owner_port(k)).collect();
    assert_eq!(owners.len(), 3, "the keys live on every master");
    for k in &keys {
        assert_eq!(
            c.roundtrip(&resp(&[b"GEOADD", k.as_bytes(), b"0", b"0", b"m"]), 1),
            b":1\r\n"
        );
        assert!(
            c.roundtrip(&resp(&[b"GEOADD", k.as_bytes(), b"x", b"0", b"m"]), 1)
                .starts_with(b"-ERR")
        );
    }
    let stats = info(&mut c, "commandstats");
    assert!(
        field(&stats, "cmdstat_geoadd").starts_with("calls=24,"),
        "{stats}"
    );
    assert!(
        field(&stats, "cmdstat_geoadd").ends_with(",rejected_calls=0,failed_calls=12"),
        "{stats}"
    );
    assert_eq!(
        field(&info(&mut c, "errorstats"), "errorstat_ERR"),
        "count=12"
    );
    let now: i64 = field(&info(&mut c, "persistence"), "rdb_changes_since_last_save")
        .parse()
        .unwrap();
    assert_eq!(now - dirty, 12, "one change per key, on every master");
}

#[test]
fn client_pause_reaches_every_master_and_holds_writes_in_respire() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds(), "--workers", "1"]);
    let mut admin = Raw::connect(proxy.port);
    assert_eq!(
        admin.roundtrip(&resp(&[b"CLIENT", b"PAUSE", b"20000", b"WRITE"]), 1),
        b"+OK\r\n"
    );
    // Every master is paused: a client of its own that publishes is held there.
    let mut direct: Vec<Raw> = cluster
        .master_ports()
        .into_iter()
        .map(|port| {
            let mut c = Raw::connect(port);
            c.send(&resp(&[b"PUBLISH", b"ch", b"m"]));
            c
        })
        .collect();
    for port in cluster.master_ports() {
        let mut held = false;
        for _ in 0..200 {
            if cli(port, &["INFO", "clients"]).contains("blocked_clients:1\r\n") {
                held = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(held, "master {port} is not paused");
    }
    // A write split over the three masters waits in respire; reads on every master go on.
    let keys = cluster.key_per_master("p:");
    let k: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
    let mut writer = Raw::connect(proxy.port);
    writer.send(&resp(&[b"MSET", k[0], b"1", k[1], b"2", k[2], b"3"]));
    let mut reader = Raw::connect(proxy.port);
    assert_eq!(
        reader.roundtrip(&resp(&[b"MGET", k[0], k[1], k[2]]), 1),
        b"*3\r\n$-1\r\n$-1\r\n$-1\r\n"
    );
    assert_eq!(
        admin.roundtrip(&resp(&[b"CLIENT", b"UNPAUSE"]), 1),
        b"+OK\r\n"
    );
    assert_eq!(writer.read_replies(1), b"+OK\r\n");
    for c in &mut direct {
        assert_eq!(c.read_replies(1), b":0\r\n");
    }
    assert_eq!(
        reader.roundtrip(&resp(&[b"MGET", k[0], k[1], k[2]]), 1),
        b"*3\r\n$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n"
    );
}

#[test]
fn redis_py_cluster_client_through_respire() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let script = format!(
        r#"
import redis
from redis.cluster import RedisCluster
rc = RedisCluster(host="127.0.0.1", port={port})
for i in range(200):
    rc.set(f"py:{{i}}", i)
assert [int(v) for v in rc.mget_nonatomic([f"py:{{i}}" for i in range(0, 200, 7)])] == list(range(0, 200, 7))
assert rc.incr("py:counter") == 1
p = rc.pipeline()
for i in range(50):
    p.incr("py:counter")
assert p.execute()[-1] == 51
rc.hset("py:h", mapping={{"a": "1", "b": "2"}})
assert rc.hgetall("py:h") == {{b"a": b"1", b"b": b"2"}}
assert rc.dbsize() >= 202
print("ok")
"#,
        port = proxy.port
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "redis-py RedisCluster failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three standalone Redis servers, and respire in front of them as shards.
fn three_shards() -> (Vec<RedisServer>, Respire) {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let list = shards
        .iter()
        .map(|s| s.addr())
        .collect::<Vec<_>>()
        .join(",");
    let proxy = Respire::start_args(&["--shards", &list]);
    (shards, proxy)
}

#[test]
fn standalone_shards_place_keys_by_slot() {
    let (mut shards, proxy) = three_shards();
    let mut con = proxy.conn();
    for i in 0..300 {
        let _: () = con.set(format!("s:{i}"), i).unwrap();
    }
    for s in &shards {
        let n: i64 = redis::cmd("DBSIZE")
            .query(&mut s.client().get_connection().unwrap())
            .unwrap();
        assert!(n > 50, "shard {} holds {n}", s.port);
    }
    // The shard holding a key is the one its slot falls to (even split of 16384 slots).
    let slot = respire::topology::key_slot(b"s:7") as usize;
    let owner = &shards[slot * 3 / 16384];
    let v: i64 = owner.client().get_connection().unwrap().get("s:7").unwrap();
    assert_eq!(v, 7);
    compare_with_single_redis(proxy.port, SPLIT);
    // SELECT works over standalone shards.
    let mut p = Raw::connect(proxy.port);
    let got = p.roundtrip(
        &[
            resp(&[b"SELECT", b"2"]),
            resp(&[b"SET", b"x", b"y"]),
            resp(&[b"GET", b"x"]),
        ]
        .concat(),
        3,
    );
    assert_eq!(got, b"+OK\r\n+OK\r\n$1\r\ny\r\n");
    // Pub/sub: standalone servers do not pass messages on to each other, yet every message
    // reaches the subscriber, whichever connection publishes it.
    let mut sub = Raw::connect(proxy.port);
    sub.roundtrip(&resp(&[b"SUBSCRIBE", b"news"]), 1);
    for i in 0..6 {
        let mut publisher = proxy.conn();
        let n: i64 = redis::cmd("PUBLISH")
            .arg("news")
            .arg(format!("m{i}"))
            .query(&mut publisher)
            .unwrap();
        assert_eq!(n, 1, "message {i}");
        let got = sub.read_replies(1);
        assert_eq!(
            got,
            resp(&[b"message", b"news", format!("m{i}").as_bytes()])
        );
    }
    // SCAN asks the later shards too when it starts one, but a shard whose turn has not come
    // cannot fail the call: with the last shard down, a page of the first still comes.
    for i in 0..300 {
        let _: () = con.set(format!("s:{i}"), i).unwrap();
    }
    // The shard walked last (static shards go in the order given).
    shards[2].kill();
    let (cursor, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("COUNT")
        .arg(10)
        .query(&mut con)
        .unwrap();
    assert!(cursor != 0 && !keys.is_empty(), "{cursor} {keys:?}");
}

/// GETs node `i` has run (`INFO commandstats`).
fn get_calls(cluster: &Cluster, i: usize) -> i64 {
    cluster
        .cli(i, &["INFO", "commandstats"])
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_get:calls="))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// The flags (`CLIENT LIST`) of respire's connections to node `i`, with their lines.
fn respire_connection_flags(cluster: &Cluster, i: usize) -> Vec<(String, String)> {
    cluster
        .cli(i, &["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains("name=respire"))
        .map(|line| {
            let flags = line
                .split(' ')
                .find_map(|f| f.strip_prefix("flags="))
                .unwrap_or_default();
            (flags.to_string(), line.to_string())
        })
        .collect()
}

#[test]
fn reads_go_to_replicas_when_asked() {
    let cluster = Cluster::start(3, 1);
    let seeds: Vec<String> = cluster
        .seeds()
        .split(',')
        .map(|s| format!("\"{s}\""))
        .collect();
    let proxy = Respire::with_config(&format!(
        "[backend]\ncluster = [{}]\nread_from = \"replica\"\n",
        seeds.join(", ")
    ));
    let mut con = proxy.conn();
    for i in 0..30 {
        let _: () = con.set(format!("r:{i}"), i).unwrap();
    }
    // Let replication catch up on every master.
    for port in cluster.master_ports() {
        let mut m = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let _: i64 = redis::cmd("WAIT").arg(1).arg(2000).query(&mut m).unwrap();
    }
    for i in 0..30 {
        let v: i64 = con.get(format!("r:{i}")).unwrap();
        assert_eq!(v, i);
    }
    let gets = |role: &str| -> i64 {
        (0..cluster.nodes.len())
            .filter(|&i| {
                cluster
                    .cli(i, &["INFO", "replication"])
                    .contains(&format!("role:{role}"))
            })
            .map(|i| get_calls(&cluster, i))
            .sum()
    };
    assert_eq!(gets("slave"), 30, "every GET was served by a replica");
    assert_eq!(gets("master"), 0);
    // Writes still go to masters.
    let _: () = con.set("r:write", 1).unwrap();
    // READONLY on the connections to replicas only: a master demoted by a failover must not
    // serve reads on a connection that was opened to it as a master.
    for i in 0..cluster.nodes.len() {
        let replica = cluster
            .cli(i, &["INFO", "replication"])
            .contains("role:slave");
        for (flags, line) in respire_connection_flags(&cluster, i) {
            assert_eq!(flags.contains('r'), replica, "{line}");
        }
    }
    // A client that tracks keys: reads go to replicas, so respire learns of changes from the
    // replicas too (a read there may follow the master's invalidation).
    let _tracking = Raw::tracking(proxy.port);
    for i in 0..cluster.nodes.len() {
        assert!(
            respire_connection_flags(&cluster, i)
                .iter()
                .any(|(flags, _)| flags.contains('B')),
            "node {i} has no tracking connection"
        );
    }
}

#[test]
fn reads_stay_on_masters_across_a_failover() {
    let cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut con = proxy.conn();
    for i in 0..60 {
        let _: () = con.set(format!("f:{i}"), i).unwrap();
    }
    // With reads going to masters (the default), respire's connections are not READONLY: a
    // master that becomes a replica must answer them MOVED, not serve its own copy.
    for port in cluster.master_ports() {
        for (flags, line) in respire_connection_flags(&cluster, cluster.index_of(port)) {
            assert!(
                !flags.contains('r'),
                "a READONLY backend connection: {line}"
            );
        }
    }
    // A replica takes over; respire's map still names the old master for its slots.
    let (replica, master) = cluster.a_replica();
    assert!(
        cluster
            .cli(replica, &["CLUSTER", "FAILOVER"])
            .contains("OK")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cluster.is_master(replica) || cluster.is_master(master) {
        assert!(std::time::Instant::now() < deadline, "no promotion");
        std::thread::sleep(Duration::from_millis(20));
    }
    let served_before = get_calls(&cluster, master);
    for i in 0..60 {
        let v: i64 = con.get(format!("f:{i}")).unwrap();
        assert_eq!(v, i);
    }
    assert_eq!(
        get_calls(&cluster, master),
        served_before,
        "the demoted master served reads (a replica's copy may lag behind)"
    );
}

#[test]
fn shard_subscriptions_follow_their_slot() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut s = Raw::connect(proxy.port);
    let got = s.roundtrip(&resp(&[b"SSUBSCRIBE", b"orders"]), 1);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "*3\r\n$10\r\nssubscribe\r\n$6\r\norders\r\n:1\r\n"
    );
    // Hand the channel's slot to another master (no keys live in it).
    let slot = cluster
        .cli(0, &["CLUSTER", "KEYSLOT", "orders"])
        .trim()
        .to_string();
    let owner = slot_node(&cluster, "orders");
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    let new_owner = (0..3)
        .map(|i| node_id(&cluster, ports[i]))
        .find(|id| *id != owner)
        .unwrap();
    for i in 0..3 {
        assert!(
            cluster
                .cli(i, &["CLUSTER", "SETSLOT", &slot, "NODE", &new_owner])
                .contains("OK")
        );
    }
    // Messages published to the new owner reach the subscriber once respire has moved it.
    let mut publisher = proxy.conn();
    let mut delivered = false;
    for i in 0..50 {
        let n: i64 = redis::cmd("SPUBLISH")
            .arg("orders")
            .arg(format!("o{i}"))
            .query(&mut publisher)
            .unwrap();
        if n == 1 {
            let got = String::from_utf8_lossy(&s.read_replies(1)).into_owned();
            assert_eq!(
                got,
                format!(
                    "*3\r\n$8\r\nsmessage\r\n$6\r\norders\r\n${}\r\no{i}\r\n",
                    format!("o{i}").len()
                )
            );
            delivered = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(delivered, "the subscription never moved to the new owner");
}

/// The bulk strings of a RESP2 message frame (`message`/`pmessage`, the pattern, the channel,
/// the payload).
fn message_fields(frame: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(frame);
    let parts: Vec<&str> = text.split("\r\n").collect();
    parts
        .iter()
        .skip(2)
        .step_by(2)
        .map(|s| s.to_string())
        .collect()
}

/// Redis publishes a keyspace notification only on the node that holds the key: through
/// respire a subscriber gets those of every master, each once, and ordinary messages once.
/// `masters` are the backend masters, `owners` how many distinct masters the test's keys are on.
fn keyspace_notifications_from_every_master(proxy: &Respire, masters: &[u16], owners: usize) {
    assert!(owners >= 2, "the keys must be spread over several masters");
    let mut p = Raw::connect(proxy.port);
    assert_eq!(
        p.roundtrip(
            &resp(&[b"CONFIG", b"SET", b"notify-keyspace-events", b"KEA"]),
            1
        ),
        b"+OK\r\n"
    );
    for &port in masters {
        let got = cli(port, &["CONFIG", "GET", "notify-keyspace-events"]);
        assert!(got.contains("AKE"), "master {port}: {got}");
    }
    let mut by_key = Raw::connect(proxy.port);
    let got = by_key.roundtrip(&resp(&[b"PSUBSCRIBE", b"__keyspace@0__:ks:*"]), 1);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "*3\r\n$10\r\npsubscribe\r\n$19\r\n__keyspace@0__:ks:*\r\n:1\r\n"
    );
    let mut by_event = Raw::connect(proxy.port);
    by_event.roundtrip(&resp(&[b"SUBSCRIBE", b"__keyevent@0__:set"]), 1);
    let mut everything = Raw::connect(proxy.port);
    everything.roundtrip(&resp(&[b"PSUBSCRIBE", b"*"]), 1);

    // The counts are the clients', as on one Redis: respire's echoes on the other masters are
    // not subscribers.
    assert_eq!(
        p.roundtrip(
            &resp(&[b"PUBSUB", b"NUMSUB", b"__keyevent@0__:set", b"news"]),
            1
        ),
        b"*4\r\n$18\r\n__keyevent@0__:set\r\n:1\r\n$4\r\nnews\r\n:0\r\n"
    );
    assert_eq!(p.roundtrip(&resp(&[b"PUBSUB", b"NUMPAT"]), 1), b":2\r\n");

    let keys: Vec<String> = (0..30).map(|i| format!("ks:{i}")).collect();
    for k in &keys {
        assert_eq!(
            p.roundtrip(&resp(&[b"SET", k.as_bytes(), b"v"]), 1),
            b"+OK\r\n"
        );
    }
    assert_eq!(
        p.roundtrip(&resp(&[b"PUBLISH", b"news", b"hello"]), 1),
        b":1\r\n"
    );

    let want: HashSet<String> = keys.iter().cloned().collect();
    // Per key, in any order across masters (each master publishes its own).
    let got: HashSet<String> = by_key
        .read_frames(30)
        .iter()
        .map(|f| {
            let m = message_fields(f);
            assert_eq!(m[0], "pmessage", "{m:?}");
            assert_eq!(m[3], "set", "{m:?}");
            m[2].strip_prefix("__keyspace@0__:").unwrap().to_string()
        })
        .collect();
    assert_eq!(got, want);
    let got: HashSet<String> = by_event
        .read_frames(30)
        .iter()
        .map(|f| {
            let m = message_fields(f);
            assert_eq!(&m[..2], ["message", "__keyevent@0__:set"], "{m:?}");
            m[2].clone()
        })
        .collect();
    assert_eq!(got, want);
    // `*`: each key's two notifications and the message, once each.
    let frames = everything.read_frames(61);
    assert_eq!(frames.len(), 61);
    let mut seen = HashSet::new();
    for f in &frames {
        let m = message_fields(f);
        assert!(seen.insert(m.clone()), "delivered twice: {m:?}");
    }
    assert!(seen.contains(&vec![
        "pmessage".to_string(),
        "*".into(),
        "news".into(),
        "hello".into()
    ]));
    for s in [&mut by_key, &mut by_event, &mut everything] {
        let extra = s.more_within(Duration::from_millis(300));
        assert_eq!(extra, None, "more than expected");
    }

    // When the subscribers leave, respire leaves every master.
    by_key.set_timeout(Duration::from_secs(5));
    everything.set_timeout(Duration::from_secs(5));
    by_key.roundtrip(&resp(&[b"PUNSUBSCRIBE"]), 1);
    everything.roundtrip(&resp(&[b"PUNSUBSCRIBE"]), 1);
    drop(by_event);
    for &port in masters {
        let mut left = false;
        for _ in 0..50 {
            let patterns = cli(port, &["PUBSUB", "NUMPAT"]);
            let channels = cli(port, &["PUBSUB", "CHANNELS", "__key*"]);
            if patterns.trim() == "0" && channels.trim().is_empty() {
                left = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(left, "master {port} still has respire's subscriptions");
    }
}

#[test]
fn keyspace_notifications_over_a_cluster_and_over_shards() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let owners: HashSet<String> = (0..30)
        .map(|i| slot_node(&cluster, &format!("ks:{i}")))
        .collect();
    keyspace_notifications_from_every_master(&proxy, &cluster.master_ports(), owners.len());

    let (shards, proxy) = three_shards();
    let owners: HashSet<usize> = (0..30)
        .map(|i| respire::topology::key_slot(format!("ks:{i}").as_bytes()) as usize * 3 / 16384)
        .collect();
    let ports: Vec<u16> = shards.iter().map(|s| s.port).collect();
    keyspace_notifications_from_every_master(&proxy, &ports, owners.len());
}

/// A field of a node's `INFO persistence`.
fn persistence_field(cluster: &Cluster, i: usize, field: &str) -> i64 {
    cluster
        .cli(i, &["INFO", "persistence"])
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

/// Each master persists its own keys: `BGSAVE`, `BGREWRITEAOF` and `SAVE` through respire run
/// on every master, `LASTSAVE` is the oldest of their saves, and `DEBUG LOADAOF` (which every
/// master runs) finds each master's AOF and keeps the data (Redis exits when it has none).
#[test]
fn persistence_commands_run_on_every_master() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut p = Raw::connect(proxy.port);
    for i in 0..30 {
        let k = format!("p:{i}");
        assert_eq!(
            p.roundtrip(&resp(&[b"SET", k.as_bytes(), b"v"]), 1),
            b"+OK\r\n"
        );
    }
    let masters = cluster.master_ports().len();
    let every = |field: &str, at_least: i64| {
        (0..masters).all(|i| persistence_field(&cluster, i, field) >= at_least)
    };
    let none = |field: &str| (0..masters).all(|i| persistence_field(&cluster, i, field) == 0);
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        for _ in 0..100 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("{what} did not happen on every master");
    };
    assert_eq!(p.roundtrip(&resp(&[b"SAVE"]), 1), b"+OK\r\n");
    assert!(every("rdb_saves", 1));
    let saved = String::from_utf8_lossy(&p.roundtrip(&resp(&[b"LASTSAVE"]), 1)).into_owned();
    let oldest = (0..masters)
        .map(|i| persistence_field(&cluster, i, "rdb_last_save_time"))
        .min()
        .unwrap();
    assert_eq!(saved, format!(":{oldest}\r\n"));
    assert_eq!(
        p.roundtrip(&resp(&[b"BGSAVE"]), 1),
        b"+Background saving started\r\n"
    );
    wait("BGSAVE", &|| {
        every("rdb_saves", 2) && none("rdb_bgsave_in_progress")
    });
    assert_eq!(
        p.roundtrip(
            &resp(&[b"CONFIG", b"SET", b"aof-use-rdb-preamble", b"no"]),
            1
        ),
        b"+OK\r\n"
    );
    assert_eq!(
        p.roundtrip(&resp(&[b"BGREWRITEAOF"]), 1),
        b"+Background append only file rewriting started\r\n"
    );
    wait("BGREWRITEAOF", &|| {
        every("aof_rewrites", 1) && none("aof_rewrite_in_progress")
    });
    assert_eq!(p.roundtrip(&resp(&[b"DEBUG", b"LOADAOF"]), 1), b"+OK\r\n");
    for i in 0..masters {
        assert!(
            cluster.cli(i, &["PING"]).contains("PONG"),
            "master {i} is gone"
        );
    }
    assert_eq!(p.roundtrip(&resp(&[b"DBSIZE"]), 1), b":30\r\n");
}

/// A transaction's keyless commands before its first keyed one (`MULTI`, `PING`, `GET k`,
/// `EXEC`) run on the key's node, whichever master that is; with keyless commands only it
/// runs on any master; replies as from one Redis, queueing errors included.
#[test]
fn keyless_commands_lead_a_transaction_to_its_keys_node() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    // A key on each master.
    let mut keys: Vec<String> = Vec::new();
    for i in 0..100 {
        let k = format!("t{i}");
        let node = slot_node(&cluster, &k);
        if !keys.iter().any(|o| slot_node(&cluster, o) == node) {
            keys.push(k);
        }
    }
    assert_eq!(keys.len(), 3);
    let mut script: Vec<Vec<&str>> = Vec::new();
    for k in &keys {
        script.push(vec!["SET", k, "v"]);
        script.push(vec!["MULTI"]);
        script.push(vec!["PING"]);
        script.push(vec!["ECHO", "x"]);
        script.push(vec!["GET", k]);
        script.push(vec!["INCR", k]);
        script.push(vec!["EXEC"]);
    }
    for s in [
        &["MULTI"][..],
        &["PING"],
        &["TIME", "extra"],
        &["EXEC"],
        &["MULTI"],
        &["PING", "hello"],
        &["ECHO", "x"],
        &["EXEC"],
        &["MULTI"],
        &["PING"],
        &["DISCARD"],
        &["MULTI"],
        &["EXEC"],
        &["PING"],
        // Answered with an error, not QUEUED, as by Redis.
        &["MULTI"],
        &["MULTI"],
        &["PING"],
        &["WATCH", "x"],
        &["EXEC"],
    ] {
        script.push(s.to_vec());
    }
    // Transactions one after the other on different masters, nothing in between.
    for k in &keys {
        script.push(vec!["MULTI"]);
        script.push(vec!["INCR", k]);
        script.push(vec!["EXEC"]);
    }
    let script: Vec<&[&str]> = script.iter().map(|c| c.as_slice()).collect();
    compare_with_single_redis(proxy.port, &script);
    // The same, pipelined: each waits for the one before to be answered.
    let direct = RedisServer::start();
    let mut batch = Vec::new();
    for k in &keys {
        batch.extend(resp(&[b"SET", k.as_bytes(), b"1"]));
    }
    for round in 0..3 {
        for k in &keys {
            batch.extend(resp(&[b"MULTI"]));
            if round == 1 {
                batch.extend(resp(&[b"PING"]));
            }
            batch.extend(resp(&[b"INCR", k.as_bytes()]));
            batch.extend(resp(&[b"EXEC"]));
        }
    }
    let n = 3 + 3 * 3 * 3 + 3;
    let want = Raw::connect(direct.port).roundtrip(&batch, n);
    let got = Raw::connect(proxy.port).roundtrip(&batch, n);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
}
