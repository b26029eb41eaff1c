//! Hostile input and abusive clients: respire answers an error or closes the offending
//! connection, keeps its memory flat, and every other client's requests complete.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use redis::Commands;
use respire_tests::*;

/// A field of `INFO section` as a number.
fn info_field(con: &mut redis::Connection, section: &str, field: &str) -> i64 {
    let info: String = redis::cmd("INFO").arg(section).query(con).expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in INFO {section}:\n{info}"))
}

/// respire in front of `redis` with these settings (TOML, before the `[backend]` table).
fn respire_with(redis: &RedisServer, settings: &str) -> Respire {
    Respire::with_config(&format!(
        "{settings}[backend]\naddress = \"{}\"\n",
        redis.addr()
    ))
}

/// Sends `bytes`, then reads everything until the peer closes or stays quiet for `quiet`.
/// Returns what was read and whether the peer closed.
fn send_and_drain(port: u16, bytes: &[u8], quiet: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(quiet)).expect("timeout");
    // The peer may close before everything is written: that is a valid answer too.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return (got, false);
            }
            Err(_) => return (got, true),
        }
    }
}

/// Waits until respire counts `n` connected clients.
fn wait_clients(con: &mut redis::Connection, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = info_field(con, "clients", "connected_clients");
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connected_clients stays at {now}, expected {n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn malformed_frames_get_redis_s_own_answer_and_close_only_that_connection() {
    let redis = RedisServer::start();
    let proxy = Respire::start(&redis.addr(), &[]);
    let load = Load::start(proxy.port, 4);
    let nested: Vec<u8> = [b"*1\r\n".repeat(10_000), b"$4\r\nPING\r\n".to_vec()].concat();
    let long_inline = vec![b'a'; 70 * 1024];
    let long_count: Vec<u8> = [b"*".to_vec(), vec![b'1'; 70 * 1024]].concat();
    let long_bulk_count: Vec<u8> = [b"*1\r\n$".to_vec(), vec![b'1'; 70 * 1024]].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "10-billion-element array header",
            b"*10000000000\r\n".to_vec(),
        ),
        (
            "array length overflowing 64 bits",
            b"*99999999999999999999\r\n".to_vec(),
        ),
        (
            "negative array length, then a command",
            b"*-5\r\nPING\r\n".to_vec(),
        ),
        ("negative bulk length", b"*1\r\n$-5\r\n".to_vec()),
        ("declared 10 GB bulk", b"*1\r\n$10000000000\r\n".to_vec()),
        (
            "bulk length overflowing 64 bits",
            b"*1\r\n$99999999999999999999\r\n".to_vec(),
        ),
        (
            "integer where a bulk belongs",
            b"*2\r\n$3\r\nGET\r\n:1\r\n".to_vec(),
        ),
        ("10,000 nested arrays", nested),
        (
            "a good command, then a bad length",
            b"*1\r\n$4\r\nPING\r\n*1\r\n$abc\r\n".to_vec(),
        ),
        ("garbage after the count", b"*3abc\r\n".to_vec()),
        ("unbalanced quotes", b"SET \"a b\r\n".to_vec()),
        (
            "NUL inside an inline command",
            b"SET a\0b c\r\nPING\r\n".to_vec(),
        ),
        ("70 KB inline command without a newline", long_inline),
        ("70 KB array count", long_count),
        ("70 KB bulk count", long_bulk_count),
        (
            "binary garbage",
            (0u8..=255)
                .cycle()
                .take(4096)
                .filter(|&b| b != b'\n' && b != b'*')
                .collect(),
        ),
    ];
    let quiet = Duration::from_millis(500);
    for (what, bytes) in &cases {
        let (want, want_closed) = send_and_drain(redis.port, bytes, quiet);
        let (got, got_closed) = send_and_drain(proxy.port, bytes, quiet);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{what}: respire (left) differs from Redis (right)"
        );
        assert_eq!(
            got_closed, want_closed,
            "{what}: closed by respire {got_closed}, by Redis {want_closed}"
        );
    }
    let report = load.stop();
    assert!(
        report.ops > 100,
        "the load ran: {}",
        report.summary("hostile frames")
    );
    assert!(
        report.errors.is_empty() && report.wrong_reads == 0,
        "{}",
        report.summary("hostile frames")
    );
    let mut con = proxy.conn();
    for (k, v) in &report.acked {
        let got: Option<i64> = con.get(k).expect("GET");
        assert_eq!(got, Some(*v), "acknowledged write of {k} lost");
    }
}

#[test]
fn disconnects_at_every_byte_position_leave_nothing_behind() {
    let redis = RedisServer::start();
    // One idle exclusive connection kept per worker and key: how many a busy machine ends up
    // keeping (up to 8 by default) then cannot differ between the two passes below.
    let proxy = Respire::with_config(&format!(
        "[backend]\naddress = \"{}\"\nidle_exclusive = 1\n",
        redis.addr()
    ));
    let mut con = proxy.conn();
    let script: Vec<u8> = [
        resp(&[b"SET", b"k", b"value"]),
        resp(&[b"GET", b"k"]),
        resp(&[b"MGET", b"k", b"k2", b"k3"]),
        resp(&[b"MULTI"]),
        resp(&[b"INCR", b"counter"]),
        resp(&[b"EXEC"]),
        resp(&[b"HELLO", b"3"]),
        resp(&[b"HSET", b"h", b"f", b"v"]),
        resp(&[b"HGETALL", b"h"]),
        resp(&[b"BLPOP", b"nothing", b"5"]),
    ]
    .concat();
    let _: () = con.set("warm", 1).expect("SET");
    let load = Load::start(proxy.port, 4);
    let disconnect_at_every_byte = |con: &mut redis::Connection| {
        for cut in 0..=script.len() {
            let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
            s.write_all(&script[..cut]).expect("write");
            if cut % 7 == 0 {
                // Sometimes read part of the replies first.
                s.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                let _ = s.read(&mut [0u8; 64]);
            }
            drop(s);
            if cut % 32 == 0 {
                let v: String = con.get("k").unwrap_or_default();
                assert!(v.is_empty() || v == "value", "read {v:?}");
            }
        }
    };
    // The first pass settles what respire keeps for reuse (idle exclusive backend connections
    // for MULTI and BLPOP, buffers); the second must not add to it.
    disconnect_at_every_byte(&mut con);
    wait_clients(&mut con, 5);
    let (fds, rss) = (proxy.fd_count(), proxy.rss_kib());
    disconnect_at_every_byte(&mut con);
    let report = load.stop();
    assert!(
        report.errors.is_empty() && report.wrong_reads == 0,
        "{}",
        report.summary("disconnects")
    );
    wait_clients(&mut con, 1);
    // The transaction ran as a whole each time it was sent whole, never in part.
    let counter: i64 = con.get("counter").unwrap_or(0);
    let exec_end = script
        .windows(b"EXEC\r\n".len())
        .position(|w| w == b"EXEC\r\n")
        .expect("EXEC in script")
        + 6;
    assert_eq!(
        counter,
        2 * (script.len() + 1 - exec_end) as i64,
        "one INCR per connection that sent the whole MULTI … EXEC"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.fd_count() > fds + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        proxy.fd_count() <= fds + 2,
        "file descriptors: {} before, {} after",
        fds,
        proxy.fd_count()
    );
    let grown = proxy.rss_kib().saturating_sub(rss);
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB over {} disconnects",
        script.len() + 1
    );
}

#[test]
fn memory_stays_flat_under_hostile_input() {
    let redis = RedisServer::start();
    let proxy = Respire::start(&redis.addr(), &[]);
    let mut con = proxy.conn();
    let _: () = con.set("warm", 1).expect("SET");
    let rss = proxy.rss_kib();
    let vm = proxy.status_kib("VmSize");
    let openers: Vec<Vec<u8>> = vec![
        // A bulk just under the 512 MiB limit, declared and barely started.
        [
            b"*2\r\n$3\r\nSET\r\n$536870000\r\n".to_vec(),
            vec![b'x'; 4096],
        ]
        .concat(),
        // A million-element array with a few elements.
        [b"*1000000\r\n".to_vec(), resp(&[b"a"])[4..].repeat(100)].concat(),
        // An inline command still arriving.
        vec![b'a'; 60 * 1024],
    ];
    for round in 0..4 {
        let mut held = Vec::new();
        for i in 0..60 {
            let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
            s.write_all(&openers[i % openers.len()]).expect("write");
            held.push(s);
        }
        // Everyone else is served meanwhile.
        let _: () = con
            .set("during", round)
            .expect("SET while hostile connections are open");
        let during_rss = proxy.rss_kib().saturating_sub(rss);
        let during_vm = proxy.status_kib("VmSize").saturating_sub(vm);
        assert!(
            during_rss < 64 * 1024,
            "round {round}: RSS grew by {during_rss} KiB with 60 hostile connections open"
        );
        // A declared size is not reserved up front: 20 declared 512 MiB bulks would be 10 GiB.
        assert!(
            during_vm < 2 * 1024 * 1024,
            "round {round}: virtual memory grew by {during_vm} KiB"
        );
        drop(held);
    }
    wait_clients(&mut con, 1);
    let grown = proxy.rss_kib().saturating_sub(rss);
    assert!(
        grown < 48 * 1024,
        "RSS grew by {grown} KiB after the hostile connections closed"
    );
}

#[test]
fn a_flood_of_large_requests_waits_in_the_clients_sockets_not_in_respire() {
    let redis = RedisServer::start();
    // One worker: its connection to Redis is open before Redis goes to sleep.
    let proxy = respire_with(&redis, "workers = 1\nmax_pipeline_bytes = \"4MiB\"\n");
    let mut con = proxy.conn();
    let _: () = con.set("warm", 1).expect("SET");
    let base = proxy.rss_kib();
    // Redis stops reading for four seconds: what the flood sends meanwhile piles up somewhere.
    let sleeper = {
        let client = redis.client();
        std::thread::spawn(move || {
            let mut c = client.get_connection().expect("direct");
            let _: () = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(4)
                .query(&mut c)
                .expect("DEBUG SLEEP");
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    const CLIENTS: usize = 4;
    const SETS: usize = 48;
    const SIZE: usize = 1024 * 1024;
    let writers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let port = proxy.port;
            std::thread::spawn(move || {
                let mut raw = Raw::connect(port);
                raw.set_timeout(Duration::from_secs(30));
                let mut req = Vec::with_capacity(SETS * (SIZE + 64));
                for i in 0..SETS {
                    let value = vec![b'a' + (i % 26) as u8; SIZE];
                    req.extend_from_slice(&resp(&[
                        b"SET",
                        format!("flood:{c}:{i}").as_bytes(),
                        &value,
                    ]));
                }
                raw.roundtrip(&req, SETS)
            })
        })
        .collect();
    // Sampled while Redis sleeps (it went to sleep 0.2 s before the flood began).
    let asleep_until = Instant::now() + Duration::from_millis(3500);
    let mut peak = 0;
    while Instant::now() < asleep_until {
        peak = peak.max(proxy.rss_kib().saturating_sub(base));
        std::thread::sleep(Duration::from_millis(20));
    }
    for w in writers {
        let got = w.join().expect("writer");
        assert_eq!(String::from_utf8_lossy(&got), "+OK\r\n".repeat(SETS));
    }
    sleeper.join().expect("sleeper");
    let flood = (CLIENTS * SETS * SIZE / 1024) as u64;
    // Each client may have 4 MiB of big requests in flight, plus the ones being read and held
    // (allocations round up): well under half of what was sent.
    assert!(
        peak < 80 * 1024,
        "respire's RSS rose by {peak} KiB while {flood} KiB were sent to a sleeping Redis"
    );
    for c in 0..CLIENTS {
        let v: Vec<u8> = con.get(format!("flood:{c}:{}", SETS - 1)).expect("GET");
        assert_eq!(v, vec![b'a' + ((SETS - 1) % 26) as u8; SIZE]);
    }
}

#[test]
fn a_deep_pipeline_is_paced_by_max_pipeline_and_keeps_order() {
    let redis = RedisServer::start();
    let proxy = respire_with(&redis, "max_pipeline = 64\n");
    let mut raw = Raw::connect(proxy.port);
    let n = 20_000;
    let req: Vec<u8> = (0..n).flat_map(|_| resp(&[b"INCR", b"paced"])).collect();
    // Everything is written before anything is read: respire must not deadlock.
    let got = raw.roundtrip(&req, n);
    let want: String = (1..=n).map(|i| format!(":{i}\r\n")).collect();
    assert_eq!(String::from_utf8_lossy(&got), want);
}

#[test]
fn a_subscriber_that_never_reads_is_disconnected_and_others_get_every_message() {
    // Redis's own pubsub output limit (32 MB) would apply to respire's shared subscriber
    // connection: on a slow machine the stuck client's worker has fallen that far behind the
    // 64 MiB burst and Redis cut it, so the stuck client never reached respire's limit. This
    // test is about respire's limit.
    let redis = RedisServer::start_with(&["--client-output-buffer-limit", "pubsub 0 0 0"]);
    let proxy = respire_with(
        &redis,
        "[client_output_buffer_limit]\npubsub = \"16mb 0 0\"\n",
    );
    let mut stuck = Raw::connect(proxy.port);
    // A known receive buffer whatever the machine's `tcp_rmem`: the kernel does not absorb the
    // burst for it.
    stuck.limit_receive_buffer(256 * 1024);
    stuck.send(&resp(&[b"SUBSCRIBE", b"news"]));
    assert!(String::from_utf8_lossy(&stuck.read_replies(1)).contains("subscribe"));
    // How many messages the reading subscriber has had: the publisher keeps within 64 of it, so
    // only the one that never reads falls behind.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let client = proxy.client();
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut c = client.get_connection().expect("subscriber");
            let mut ps = c.as_pubsub();
            ps.subscribe("news").expect("SUBSCRIBE");
            ps.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut n = 0;
            loop {
                let msg = ps
                    .get_message()
                    .map_err(|e| format!("after {n} messages: {e}"))?;
                let body: Vec<u8> = msg.get_payload().map_err(|e| e.to_string())?;
                if body == b"end" {
                    return Ok::<usize, String>(n);
                }
                n += 1;
                seen.store(n, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut publisher = redis.client().get_connection().expect("direct");
    let payload = vec![b'p'; 64 * 1024];
    let messages = 1024; // 64 MiB: more than the limit and the kernel's socket buffers together
    for i in 0..messages {
        let _: i64 = publisher.publish("news", &payload).expect("PUBLISH");
        let deadline = Instant::now() + Duration::from_secs(10);
        while i >= seen.load(std::sync::atomic::Ordering::Relaxed) + 64 && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let _: i64 = publisher.publish("news", "end").expect("PUBLISH");
    let read = reader.join().expect("reader");
    assert_eq!(
        read,
        Ok(messages),
        "the subscriber that reads gets every message; log:\n{}",
        proxy.log()
    );
    // The stuck one was cut off: after what its socket held, it reads the end of the stream.
    stuck.set_timeout(Duration::from_secs(10));
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let closed = loop {
        match stuck.read_some(&mut buf) {
            Ok(0) => break true,
            Ok(n) => total += n,
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "the subscriber that never reads was not disconnected ({total} bytes read); log:\n{}",
        proxy.log()
    );
    assert!(
        total < 48 * 1024 * 1024,
        "it was sent {total} of 64 MiB before being cut off"
    );
    let mut con = proxy.conn();
    assert!(
        info_field(
            &mut con,
            "stats",
            "client_output_buffer_limit_disconnections"
        ) >= 1
    );
    assert!(
        proxy.log().contains("client_output_buffer_limit"),
        "the log says why:\n{}",
        proxy.log()
    );
}

#[test]
fn a_client_that_does_not_read_big_replies_is_cut_at_the_normal_limit() {
    let redis = RedisServer::start();
    let proxy = respire_with(
        &redis,
        "[client_output_buffer_limit]\nnormal = \"2mb 0 0\"\n",
    );
    let mut con = proxy.conn();
    let _: () = con.set("big", vec![b'b'; 1024 * 1024]).expect("SET");
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
    let req: Vec<u8> = (0..64).flat_map(|_| resp(&[b"GET", b"big"])).collect();
    s.write_all(&req).expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while info_field(
        &mut con,
        "stats",
        "client_output_buffer_limit_disconnections",
    ) < 1
    {
        assert!(
            Instant::now() < deadline,
            "64 MiB of unread replies did not hit a 2 MiB limit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_clients(&mut con, 1);
    let v: Vec<u8> = con.get("big").expect("GET");
    assert_eq!(v.len(), 1024 * 1024, "other clients are served");
}

#[test]
fn a_command_bigger_than_the_query_buffer_limit_closes_the_connection() {
    let redis = RedisServer::start();
    let proxy = respire_with(&redis, "client_query_buffer_limit = \"1MiB\"\n");
    let big = [
        b"*3\r\n$3\r\nSET\r\n$1\r\nq\r\n$3000000\r\n".to_vec(),
        vec![b'q'; 1_500_000],
    ]
    .concat();
    let (got, closed) = send_and_drain(proxy.port, &big, Duration::from_secs(5));
    assert!(
        closed && got.is_empty(),
        "closed {closed}, got {:?}",
        String::from_utf8_lossy(&got)
    );
    let mut con = proxy.conn();
    assert_eq!(
        info_field(
            &mut con,
            "stats",
            "client_query_buffer_limit_disconnections"
        ),
        1
    );
    // Under the limit, the same kind of command works.
    let _: () = con
        .set("q", vec![b'q'; 900_000])
        .expect("SET under the limit");
}

#[test]
fn failed_auth_is_throttled_per_address_and_no_password_is_logged() {
    let redis = RedisServer::start();
    let proxy = respire_with(
        &redis,
        "requirepass = \"right-horse-battery\"\nauth_failure_limit = 5\n",
    );
    let mut raw = Raw::connect(proxy.port);
    for i in 0..5 {
        let got = raw.roundtrip(&resp(&[b"AUTH", format!("guess-{i}").as_bytes()]), 1);
        assert_eq!(
            String::from_utf8_lossy(&got),
            "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
        );
    }
    // The bucket is empty: even the right password is not checked now, from any connection.
    let mut other = Raw::connect(proxy.port);
    let got = other.roundtrip(&resp(&[b"AUTH", b"right-horse-battery"]), 1);
    assert!(
        String::from_utf8_lossy(&got).starts_with("-ERR respire: too many failed AUTH attempts"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let got = raw.roundtrip(&resp(&[b"HELLO", b"3", b"AUTH", b"default", b"guess-x"]), 1);
    assert!(
        String::from_utf8_lossy(&got).starts_with("-ERR respire: too many failed AUTH attempts")
    );
    // A second later one attempt is back.
    std::thread::sleep(Duration::from_millis(1100));
    let got = other.roundtrip(&resp(&[b"AUTH", b"right-horse-battery"]), 1);
    assert_eq!(String::from_utf8_lossy(&got), "+OK\r\n");
    let got = other.roundtrip(&resp(&[b"PING"]), 1);
    assert_eq!(String::from_utf8_lossy(&got), "+PONG\r\n");
    let log = proxy.log();
    assert!(log.contains("AUTH failed"), "failures are logged:\n{log}");
    for secret in ["right-horse-battery", "guess-0", "guess-4", "guess-x"] {
        assert!(
            !log.contains(secret),
            "the log shows a password ({secret}):\n{log}"
        );
    }
}

#[test]
fn protected_mode_refuses_an_open_address_without_a_password() {
    let cases: [(&[&str], i32); 4] = [
        (&["--listen", "0.0.0.0:6380"], 2),
        (&["--listen", "0.0.0.0:6380", "--protected-mode", "no"], 0),
        (&["--listen", "0.0.0.0:6380", "--requirepass", "x"], 0),
        (&["--listen", "127.0.0.1:6380"], 0),
    ];
    for (args, want) in cases {
        let out = std::process::Command::new(respire_bin())
            .args(args)
            .args(["--backend", "127.0.0.1:6379", "check"])
            .output()
            .expect("respire");
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(want), "{args:?}: {text}");
        if want == 2 {
            assert!(
                text.contains("protected mode") && text.contains("--protected-mode no"),
                "{text}"
            );
        }
    }
}
