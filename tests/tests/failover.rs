//! Failover and scaling under load: the cluster changes, clients keep working.
//! Each test runs concurrent clients through respire that write unique values
//! and read them back, performs one event on a fresh cluster, and prints its
//! figures (ops, errors, longest error window, p99 latency).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::{Duration, Instant};

use respire_tests::{Cluster, Load, Raw, RedisServer, Respire, lost_writes, resp};

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The replica of master `m`.
fn replica_of(cluster: &Cluster, m: usize) -> usize {
    (0..cluster.nodes.len())
        .find(|&i| {
            cluster
                .cli(i, &["INFO", "replication"])
                .contains(&format!("master_port:{}", cluster.nodes[m].port))
        })
        .unwrap()
}

/// `CLUSTER FAILOVER` on `replica`, until it is the master and `master` is not.
fn fail_over(cluster: &Cluster, replica: usize, master: usize) {
    assert!(
        cluster
            .cli(replica, &["CLUSTER", "FAILOVER"])
            .contains("OK")
    );
    wait_until("the replica's promotion", Duration::from_secs(20), || {
        cluster.is_master(replica) && !cluster.is_master(master)
    });
}

#[test]
fn manual_failover_is_invisible() {
    let cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let (replica, master) = cluster.a_replica();
    let load = Load::start(proxy.port, 8);
    std::thread::sleep(Duration::from_millis(500));
    fail_over(&cluster, replica, master);
    std::thread::sleep(Duration::from_millis(1000));
    let report = load.stop();
    eprintln!("{}", report.summary("CLUSTER FAILOVER"));
    assert!(report.ops > 1000, "{}", report.summary("too little load"));
    assert!(
        report.errors.is_empty(),
        "{}",
        report.summary("errors during failover")
    );
    assert_eq!(report.wrong_reads, 0);
    let lost = lost_writes(proxy.port, &report.acked);
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {:?}",
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn live_resharding_is_invisible() {
    let cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let load = Load::start(proxy.port, 8);
    std::thread::sleep(Duration::from_millis(500));
    let (from, to) = (cluster.id(0), cluster.id(1));
    let out = Command::new("redis-cli")
        .args(["--cluster", "reshard", &cluster.nodes[0].addr()])
        .args([
            "--cluster-from",
            &from,
            "--cluster-to",
            &to,
            "--cluster-slots",
            "1200",
            "--cluster-yes",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!("{}", report.summary("reshard 1200 slots"));
    assert!(report.ops > 1000);
    assert!(
        report.errors.is_empty(),
        "{}",
        report.summary("errors during resharding")
    );
    assert_eq!(report.wrong_reads, 0);
    let lost = lost_writes(proxy.port, &report.acked);
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {:?}",
        &lost[..lost.len().min(5)]
    );
}

#[test]
fn adding_a_master_and_rebalancing_is_invisible() {
    let mut cluster = Cluster::start(3, 0);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let load = Load::start(proxy.port, 8);
    std::thread::sleep(Duration::from_millis(500));
    let new = cluster.add_master();
    wait_until("the new node to join", Duration::from_secs(20), || {
        cluster
            .cli(new, &["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
    });
    cluster.wait_healthy(Duration::from_secs(30));
    let out = Command::new("redis-cli")
        .args([
            "--cluster",
            "rebalance",
            &cluster.nodes[0].addr(),
            "--cluster-use-empty-masters",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rebalance failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!("{}", report.summary("add a master + rebalance"));
    assert!(
        report.errors.is_empty(),
        "{}",
        report.summary("errors during rebalance")
    );
    assert_eq!(report.wrong_reads, 0);
    let lost = lost_writes(proxy.port, &report.acked);
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {:?}",
        &lost[..lost.len().min(5)]
    );
    // The new master serves keys now.
    let n: i64 = redis::cmd("DBSIZE")
        .query(&mut cluster.nodes[new].client().get_connection().unwrap())
        .unwrap();
    assert!(n > 0);
}

#[test]
fn killed_master_is_replaced_without_a_stream_of_errors() {
    let mut cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let (replica, master) = cluster.a_replica();
    let load = Load::start(proxy.port, 8);
    std::thread::sleep(Duration::from_millis(500));
    // A client that only uses keys of the surviving masters is not held up by the dead one.
    let dead_port = cluster.nodes[master].port;
    let healthy_key = (0..100)
        .map(|i| format!("healthy:{i}"))
        .find(|k| cluster.owner_port(k) != dead_port)
        .unwrap();
    let port = proxy.port;
    let bystander = std::thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection()
            .unwrap();
        let mut slowest = Duration::ZERO;
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let start = Instant::now();
            let _: () = redis::cmd("SET")
                .arg(&healthy_key)
                .arg(1)
                .query(&mut con)
                .unwrap();
            slowest = slowest.max(start.elapsed());
            std::thread::sleep(Duration::from_millis(5));
        }
        slowest
    });
    // A client that tracks a key of the master about to die.
    let tracked = (0..100)
        .map(|i| format!("tracked:{i}"))
        .find(|k| cluster.owner_port(k) == dead_port)
        .unwrap();
    let mut t = Raw::tracking(proxy.port);
    t.roundtrip(&resp(&[b"GET", tracked.as_bytes()]), 1);
    let killed_at = Instant::now();
    cluster.nodes[master].kill();
    wait_until("the replica's promotion", Duration::from_secs(30), || {
        cluster.is_master(replica)
    });
    let promoted_after = killed_at.elapsed();
    let slowest = bystander.join().unwrap();
    assert!(
        slowest < Duration::from_millis(500),
        "a client of a healthy shard waited {slowest:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let report = load.stop();
    eprintln!(
        "{} (promotion after {promoted_after:?})",
        report.summary("SIGKILL a master")
    );
    assert!(
        report.errors.len() <= 8,
        "{}",
        report.summary("a stream of errors")
    );
    assert_eq!(report.wrong_reads, 0, "misrouted or out-of-order replies");
    // Reads, split ones too, are sent again to the new master: only writes may fail.
    assert_eq!(report.read_errors, 0, "{}", report.summary("reads failed"));
    // Writes the old master acknowledged but had not replicated yet are lost by Redis itself
    // (asynchronous replication); respire keeps nothing it acknowledged in flight.
    let lost = lost_writes(proxy.port, &report.acked);
    eprintln!("writes lost to asynchronous replication: {}", lost.len());
    assert!(
        lost.len() <= 8 * 2,
        "too many lost writes for an asynchronous replica: {}",
        lost.len()
    );
    // The tracking client was told to drop everything when the master died (changes there
    // could go unseen), and tracking goes on over the new master. While the tracking
    // connections come back it may be told so again: those are nulls too.
    let null = respire_tests::INVALIDATE_ALL.to_vec();
    let first = t.read_frames(1);
    assert!(
        !first.is_empty() && first.iter().all(|f| *f == null),
        "told when the master died: {first:?}"
    );
    let told = respire_tests::invalidation(&tracked).into_bytes();
    let mut w = Raw::connect(proxy.port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        t.send(&[resp(&[b"GET", tracked.as_bytes()]), resp(&[b"PING"])].concat());
        let mut frames = Vec::new();
        while frames.last().map(Vec::as_slice) != Some(&b"+PONG\r\n"[..]) {
            let f = t.read_frames(1);
            assert!(!f.is_empty(), "no reply from respire");
            frames.extend(f);
        }
        assert!(
            frames
                .iter()
                .filter(|f| f.first() == Some(&b'>'))
                .all(|f| *f == null)
        );
        assert_eq!(
            w.roundtrip(&resp(&[b"SET", tracked.as_bytes(), b"after"]), 1),
            b"+OK\r\n"
        );
        let f = t.read_frames(1);
        if f.contains(&told) {
            break;
        }
        assert!(!f.is_empty() && f.iter().all(|f| *f == null), "{f:?}");
        assert!(Instant::now() < deadline, "tracking did not resume");
    }
}

#[test]
fn subscribers_keep_receiving_across_failover_and_resharding() {
    let cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut sub = Raw::connect(proxy.port);
    assert!(
        sub.roundtrip(&resp(&[b"SUBSCRIBE", b"feed"]), 1)
            .starts_with(b"*3\r\n$9\r\nsubscribe")
    );
    let mut publisher = proxy.conn();
    let expect = |n: &str, publisher: &mut redis::Connection, sub: &mut Raw| {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("feed")
            .arg(n)
            .query(publisher)
            .unwrap();
        let got = String::from_utf8_lossy(&sub.read_replies(1)).into_owned();
        assert!(
            got.ends_with(&format!("{n}\r\n")),
            "expected {n}, got {got:?}"
        );
    };
    expect("before", &mut publisher, &mut sub);
    // The master respire subscribes on: the first by address (the lowest port here).
    let hub_master = (0..cluster.nodes.len())
        .filter(|&i| cluster.is_master(i))
        .min_by_key(|&i| cluster.nodes[i].port)
        .unwrap();
    // 1. A manual failover of that master.
    let replica = replica_of(&cluster, hub_master);
    fail_over(&cluster, replica, hub_master);
    expect("after-failover", &mut publisher, &mut sub);
    // 2. Resharding (once every node agrees on the new configuration, as redis-cli requires).
    cluster.wait_healthy(Duration::from_secs(30));
    let masters: Vec<usize> = (0..cluster.nodes.len())
        .filter(|&i| cluster.is_master(i))
        .collect();
    let out = Command::new("redis-cli")
        .args(["--cluster", "reshard", &cluster.nodes[masters[0]].addr()])
        .args([
            "--cluster-from",
            &cluster.id(masters[0]),
            "--cluster-to",
            &cluster.id(masters[1]),
            "--cluster-slots",
            "1000",
            "--cluster-yes",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "reshard failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    expect("after-reshard", &mut publisher, &mut sub);
    // 3. The node holding the subscription is killed: respire subscribes elsewhere.
    let mut cluster = cluster;
    let hub_node = hub_master;
    cluster.nodes[hub_node].kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("feed")
            .arg("after-kill")
            .query(&mut publisher)
            .unwrap();
        sub.set_timeout(Duration::from_millis(500));
        let got = String::from_utf8_lossy(&sub.read_replies(1)).into_owned();
        if got.ends_with("after-kill\r\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscription did not survive losing its node"
        );
    }
}

/// Keyspace notifications come from the master holding the key (Redis does not pass them
/// on): after a failover of any master, a subscriber through respire still gets those of every
/// key, once each — from the promoted replica, and not again from the old master, which
/// stays up as a replica and publishes its own.
#[test]
fn keyspace_notifications_follow_failovers() {
    let cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    // Set through respire: Redis does not replicate CONFIG SET, respire sends it to the
    // replicas too, so that the ones promoted below publish notifications as well.
    let mut admin = Raw::connect(proxy.port);
    assert_eq!(
        admin.roundtrip(
            &resp(&[b"CONFIG", b"SET", b"notify-keyspace-events", b"KEA"]),
            1
        ),
        b"+OK\r\n"
    );
    wait_until("every node has the setting", Duration::from_secs(5), || {
        (0..cluster.nodes.len()).all(|i| {
            cluster
                .cli(i, &["CONFIG", "GET", "notify-keyspace-events"])
                .contains("AKE")
        })
    });
    let mut sub = Raw::connect(proxy.port);
    assert!(
        sub.roundtrip(&resp(&[b"SUBSCRIBE", b"__keyevent@0__:incrby"]), 1)
            .starts_with(b"*3\r\n$9\r\nsubscribe")
    );
    let mut writer = Raw::connect(proxy.port);
    let keys: Vec<String> = (0..30).map(|i| format!("kf:{i}")).collect();
    // Every key's notification, once, whatever order the masters send them in.
    let round = |what: &str, writer: &mut Raw, sub: &mut Raw| {
        for k in &keys {
            let got = writer.roundtrip(&resp(&[b"INCRBY", k.as_bytes(), b"2"]), 1);
            assert!(
                got.starts_with(b":"),
                "{what}: {}",
                String::from_utf8_lossy(&got)
            );
        }
        sub.set_timeout(Duration::from_secs(5));
        let mut got: Vec<String> = sub
            .read_frames(keys.len())
            .iter()
            .map(|f| {
                String::from_utf8_lossy(f)
                    .rsplit("\r\n")
                    .nth(1)
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        got.sort();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(got, want, "{what}");
        let extra = sub.more_within(Duration::from_millis(300));
        assert_eq!(extra, None, "{what}: more than one notification per key");
    };
    round("before", &mut writer, &mut sub);
    // The master respire subscribes on (the lowest address) fails over, then another one.
    let masters: Vec<usize> = (0..cluster.nodes.len())
        .filter(|&i| cluster.is_master(i))
        .collect();
    let hub = *masters
        .iter()
        .min_by_key(|&&i| cluster.nodes[i].port)
        .unwrap();
    let other = *masters.iter().find(|&&i| i != hub).unwrap();
    for (name, master) in [
        ("the subscription's master", hub),
        ("another master", other),
    ] {
        fail_over(&cluster, replica_of(&cluster, master), master);
        cluster.wait_healthy(Duration::from_secs(30));
        // respire learns of the new master from the first redirection (what a write in the
        // failover's moment publishes can be missed, as by any client subscribed on the
        // masters themselves); its subscriptions follow within a few hundred milliseconds.
        for k in &keys {
            writer.roundtrip(&resp(&[b"GET", k.as_bytes()]), 1);
        }
        std::thread::sleep(Duration::from_millis(1000));
        round(
            &format!("after a failover of {name}"),
            &mut writer,
            &mut sub,
        );
    }
}

/// `CLIENT TRACKING` over a cluster with replicas: a `BCAST` client, redirected to a RESP2
/// subscriber as Redis's own test suite does it, is told of each change once (a replica reports
/// its master's writes too, so respire's connections to replicas told every change twice), and
/// still once after a failover turned a master into a replica.
#[test]
fn tracking_clients_are_told_of_each_change_once_across_a_failover() {
    let cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let mut target = Raw::connect(proxy.port);
    let id = target.client_id();
    assert!(
        target
            .roundtrip(&resp(&[b"SUBSCRIBE", b"__redis__:invalidate"]), 1)
            .starts_with(b"*3\r\n$9\r\nsubscribe")
    );
    let mut tracker = Raw::connect(proxy.port);
    assert_eq!(
        tracker.roundtrip(
            &resp(&[
                b"CLIENT",
                b"TRACKING",
                b"on",
                b"BCAST",
                b"REDIRECT",
                id.as_bytes()
            ]),
            1
        ),
        b"+OK\r\n"
    );
    // Reads go to masters: respire learns of changes from them only.
    for i in 0..cluster.nodes.len() {
        let tracked = cluster
            .cli(i, &["CLIENT", "LIST"])
            .lines()
            .any(|l| l.contains("name=respire") && l.contains("flags=tB"));
        assert_eq!(tracked, cluster.is_master(i), "node {i}");
    }
    let keys: Vec<String> = (0..12).map(|i| format!("tracked:{i}")).collect();
    let owners: std::collections::HashSet<u16> =
        keys.iter().map(|k| cluster.owner_port(k)).collect();
    assert_eq!(owners.len(), 3, "the keys live on every master");
    let message = |k: &str| {
        format!(
            "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n${}\r\n{k}\r\n",
            k.len()
        )
    };
    // Each write's message, once: the writer's answer comes after it.
    let round = |what: &str, target: &mut Raw| {
        let mut writer = Raw::connect(proxy.port);
        for k in &keys {
            assert_eq!(
                writer.roundtrip(&resp(&[b"SET", k.as_bytes(), b"v"]), 1),
                b"+OK\r\n",
                "{what}"
            );
            target.set_timeout(Duration::from_secs(5));
            let got = String::from_utf8_lossy(&target.read_replies(1)).into_owned();
            assert_eq!(got, message(k), "{what}");
        }
        let extra = target.more_within(Duration::from_millis(500));
        assert_eq!(extra, None, "{what}: a change told more than once");
    };
    round("before", &mut target);
    let (replica, master) = cluster.a_replica();
    fail_over(&cluster, replica, master);
    cluster.wait_healthy(Duration::from_secs(30));
    // respire learns of the new master from the first redirection; meanwhile tracking clients
    // are told to drop everything (a null), since changes may have gone unseen.
    let mut reader = Raw::connect(proxy.port);
    for k in &keys {
        reader.roundtrip(&resp(&[b"GET", k.as_bytes()]), 1);
    }
    std::thread::sleep(Duration::from_millis(1000));
    while target.more_within(Duration::from_millis(300)).is_some() {}
    round("after a failover", &mut target);
}

/// A standalone Redis down for a while: the subscriber waits it out on the same connection
/// (respire subscribes again once Redis is back: channels, patterns and shard channels, many
/// of them), and respire's log says the outage once, not at every reconnection attempt.
#[test]
fn a_subscriber_waits_out_a_redis_restart_and_the_log_says_it_once() {
    let mut redis = RedisServer::start();
    let proxy = Respire::start(&redis.addr(), &[]);
    let mut sub = Raw::connect(proxy.port);
    let got = sub.roundtrip(&resp(&[b"SUBSCRIBE", b"news"]), 1);
    assert!(String::from_utf8_lossy(&got).contains("news"), "{got:?}");
    let many: Vec<Vec<u8>> = (0..1500).map(|i| format!("c:{i}").into_bytes()).collect();
    let mut subscribe: Vec<&[u8]> = vec![b"SUBSCRIBE"];
    subscribe.extend(many.iter().map(|c| c.as_slice()));
    sub.roundtrip(&resp(&subscribe), many.len());
    sub.roundtrip(&resp(&[b"PSUBSCRIBE", b"p:*"]), 1);
    sub.roundtrip(&resp(&[b"SSUBSCRIBE", b"{s}1", b"{s}2"]), 2);
    sub.roundtrip(&resp(&[b"SSUBSCRIBE", b"t"]), 1);
    redis.kill();
    // Reconnection attempts go on meanwhile (backing off from 50 ms).
    std::thread::sleep(Duration::from_secs(3));
    let log = proxy.log();
    let said = log.matches("subscriber connection lost").count()
        + log.matches("subscriber connection failed").count();
    assert_eq!(said, 1, "{log}");
    redis.restart();
    let mut publisher = Raw::connect(proxy.port);
    sub.set_timeout(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Counted once the subscription is made again (0 while respire reconnects).
        let n = publisher.roundtrip(&resp(&[b"PUBLISH", b"news", b"back"]), 1);
        let got = String::from_utf8_lossy(&sub.read_replies(1)).into_owned();
        if got.ends_with("back\r\n") {
            assert_eq!(n, b":1\r\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscription was not made again: {}",
            proxy.log()
        );
    }
    // Everything else was subscribed again too (it may come in after `news`).
    let mut direct = Raw::connect(redis.port);
    for (publish, channel, expect) in [
        (
            &b"PUBLISH"[..],
            &b"c:1499"[..],
            "message\r\n$6\r\nc:1499\r\n$2\r\nm1\r\n",
        ),
        (b"PUBLISH", b"c:0", "message\r\n$3\r\nc:0\r\n$2\r\nm2\r\n"),
        (
            b"PUBLISH",
            b"p:x",
            "pmessage\r\n$3\r\np:*\r\n$3\r\np:x\r\n$2\r\nm3\r\n",
        ),
        (
            b"SPUBLISH",
            b"{s}2",
            "smessage\r\n$4\r\n{s}2\r\n$2\r\nm4\r\n",
        ),
        (b"SPUBLISH", b"t", "smessage\r\n$1\r\nt\r\n$2\r\nm5\r\n"),
    ] {
        let msg = expect
            .rsplit("\r\n")
            .nth(1)
            .unwrap_or_default()
            .as_bytes()
            .to_vec();
        let deadline = Instant::now() + Duration::from_secs(5);
        // Redis counts respire's one subscriber connection.
        while direct.roundtrip(&resp(&[publish, channel, &msg]), 1) != b":1\r\n" {
            assert!(
                Instant::now() < deadline,
                "{} not subscribed again",
                String::from_utf8_lossy(channel)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // (A `back` published while the subscription was being made again may come late.)
        let got = loop {
            let mut frames: Vec<String> = sub
                .read_frames(1)
                .iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            assert!(
                !frames.is_empty(),
                "no message on {}",
                String::from_utf8_lossy(channel)
            );
            frames.retain(|f| !f.ends_with("news\r\n$4\r\nback\r\n"));
            if !frames.is_empty() {
                break frames;
            }
        };
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].ends_with(expect), "{got:?}");
    }
    assert!(
        proxy.log().contains("subscriber connection up again"),
        "{}",
        proxy.log()
    );
}

#[test]
fn sentinel_failover_is_followed() {
    let mut setup = respire_tests::SentinelSetup::start("mymaster", 2);
    let proxy = Respire::start_args(&["--sentinel", &setup.addrs(), "--master-name", "mymaster"]);
    let old = setup.master_port();
    assert_eq!(old, setup.servers[0].port);
    let load = Load::start(proxy.port, 8);
    std::thread::sleep(Duration::from_millis(500));
    setup.servers[0].kill();
    // Sentinel's own election: when a vote splits, the next try waits twice failover-timeout
    // (10 s here); on a loaded machine that has taken more than 40 s once.
    wait_until("sentinel failover", Duration::from_secs(90), || {
        let p = setup.master_port();
        p != 0 && p != old
    });
    std::thread::sleep(Duration::from_millis(1500));
    let report = load.stop();
    eprintln!("{}", report.summary("Sentinel failover after SIGKILL"));
    assert!(report.ops > 1000);
    assert!(
        report.errors.len() <= 8,
        "{}",
        report.summary("a stream of errors")
    );
    assert_eq!(report.wrong_reads, 0);
    let lost = lost_writes(proxy.port, &report.acked);
    eprintln!("writes lost to asynchronous replication: {}", lost.len());
    assert!(lost.len() <= 16, "too many lost writes: {}", lost.len());
    // Writes land on the new master.
    let mut con = proxy.conn();
    let _: () = redis::Commands::set(&mut con, "after", "failover").unwrap();
    let new = setup.master_port();
    let v = respire_tests::cli(new, &["GET", "after"]);
    assert_eq!(v.trim(), "failover");
}

/// `MONITOR` follows the topology: after a replica takes over, the new master's commands show
/// (the stream used to stay on the nodes it started on, the old master now a replica), once
/// each (the old master's feed, which would repeat what it replicates, is dropped).
#[test]
fn monitor_follows_a_failover() {
    let cluster = Cluster::start(3, 1);
    let proxy = Respire::start_args(&["--cluster", &cluster.seeds()]);
    let (replica, master) = cluster.a_replica();
    // A hash tag on that master: every probe key goes there.
    let port = cluster.nodes[master].port;
    let tag = (0..)
        .map(|i| format!("{{mf{i}}}"))
        .find(|t| cluster.owner_port(t) == port)
        .unwrap();
    let mut monitor = Raw::connect(proxy.port);
    assert_eq!(monitor.roundtrip(&resp(&[b"MONITOR"]), 1), b"+OK\r\n");
    monitor.set_timeout(Duration::from_millis(200));
    let mut lines = String::new();
    let mut read_monitor = |lines: &mut String| {
        let mut buf = [0u8; 65536];
        while let Ok(n) = monitor.read_some(&mut buf) {
            assert!(n > 0, "the MONITOR connection closed: {lines}");
            lines.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    };
    let mut client = Raw::connect(proxy.port);
    assert_eq!(
        client.roundtrip(
            &resp(&[b"SET", format!("{tag}:before").as_bytes(), b"v"]),
            1
        ),
        b"+OK\r\n"
    );
    assert!(
        cluster
            .cli(replica, &["CLUSTER", "FAILOVER"])
            .contains("OK")
    );
    wait_until("promotion", Duration::from_secs(20), || {
        cluster.is_master(replica) && !cluster.is_master(master)
    });
    // Probes until one shows: respire's topology and the stream catch up within seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        n += 1;
        // A read: a replica's MONITOR shows what it replicates, not the master's reads.
        let key = format!("{tag}:after{n}");
        assert_eq!(
            client.roundtrip(&resp(&[b"GET", key.as_bytes()]), 1),
            b"$-1\r\n"
        );
        read_monitor(&mut lines);
        if lines.contains(&format!("\"GET\" \"{key}\"")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new master's commands never showed:\n{lines}"
        );
    }
    assert!(
        lines.contains(&format!("\"SET\" \"{tag}:before\"")),
        "{lines}"
    );
    // Once each: a write shows on the new master, not again through the old one, which
    // now replicates it.
    let key = format!("{tag}:once");
    assert_eq!(
        client.roundtrip(&resp(&[b"SET", key.as_bytes(), b"v"]), 1),
        b"+OK\r\n"
    );
    std::thread::sleep(Duration::from_millis(1500));
    read_monitor(&mut lines);
    assert_eq!(
        lines.matches(&format!("\"SET\" \"{key}\"")).count(),
        1,
        "{lines}"
    );
    // respire's own topology requests (it asked for the new layout) are not clients'.
    assert!(!lines.contains("\"CLUSTER\" \"SHARDS\""), "{lines}");
}
