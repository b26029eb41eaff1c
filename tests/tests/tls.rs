//! TLS: clients reach respire over TLS (`redis-cli --tls`, rustls), respire reaches Redis over
//! TLS (Debian's `redis-server` with a TLS port, standalone and as a Redis Cluster), and the
//! certificate files are reloaded when they change.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use respire_tests::{
    Cluster, Raw, RedisServer, Respire, TlsConn, TlsFiles, cli, cli_with, free_port, resp,
};

/// Polls `check` until it holds or `within` passes.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

fn tls_section(files: &TlsFiles, port: u16, extra: &str) -> String {
    format!(
        "[tls]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n{extra}",
        files.path("server.crt"),
        files.path("server.key"),
        files.path("ca.crt")
    )
}

/// respire in front of `redis` with this `[tls]` section; and its metrics port.
fn respire_tls(redis: &RedisServer, tls: &str) -> (Respire, u16) {
    let metrics = free_port();
    (
        Respire::with_config(&format!(
            "metrics = \"127.0.0.1:{metrics}\"\n{tls}[backend]\naddress = \"{}\"\n",
            redis.addr()
        )),
        metrics,
    )
}

fn pong(reply: &[u8]) -> bool {
    reply == b"+PONG\r\n"
}

#[test]
fn clients_over_tls_with_client_certificates() {
    let files = TlsFiles::generate("main");
    let other = TlsFiles::generate("other");
    let redis = RedisServer::start();
    let port = free_port();
    let (respire, metrics_port) = respire_tls(&redis, &tls_section(&files, port, ""));

    // redis-cli --tls with the client certificate: commands work, as on the plain port.
    let with_cert = files.cli_args(true);
    assert_eq!(
        cli_with(port, &with_cert, &["SET", "tls:k", "v"]).trim(),
        "OK"
    );
    assert_eq!(cli_with(port, &with_cert, &["GET", "tls:k"]).trim(), "v");
    assert_eq!(
        cli(respire.port, &["GET", "tls:k"]).trim(),
        "v",
        "the plain listener serves the same data"
    );

    // Big values and deep pipelines cross TLS intact (records larger than one read, output
    // the socket takes in parts).
    let mut c = TlsConn::connect(
        port,
        &files.path("ca.crt"),
        Some((&files.path("client.crt"), &files.path("client.key"))),
    )
    .unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(
        c.roundtrip(&resp(&[b"SET", b"tls:big", &big]), 1),
        b"+OK\r\n"
    );
    let got = c.roundtrip(&resp(&[b"GET", b"tls:big"]), 1);
    let mut want = format!("${}\r\n", big.len()).into_bytes();
    want.extend_from_slice(&big);
    want.extend_from_slice(b"\r\n");
    assert!(
        got == want,
        "GET of a 3 MB value over TLS: {} bytes back, {} expected",
        got.len(),
        want.len()
    );
    let mut pipeline = Vec::new();
    for _ in 0..2000 {
        pipeline.extend_from_slice(&resp(&[b"INCR", b"tls:counter"]));
    }
    let replies = c.roundtrip(&pipeline, 2000);
    assert!(
        replies.ends_with(b":2000\r\n"),
        "2000 pipelined INCRs over TLS end at 2000"
    );
    assert!(pong(&c.roundtrip(b"PING\r\n", 1)));

    // Refused: no client certificate, one from another CA, a server certificate we do not trust, plain TCP.
    let no_cert = cli_with(port, &files.cli_args(false), &["PING"]);
    assert!(
        !no_cert.contains("PONG"),
        "a client without a certificate is refused: {no_cert}"
    );
    let wrong_ca = TlsConn::connect(
        port,
        &files.path("ca.crt"),
        Some((&other.path("client.crt"), &other.path("client.key"))),
    );
    assert!(
        wrong_ca
            .map(|mut c| !pong(&c.roundtrip(b"PING\r\n", 1)))
            .unwrap_or(true),
        "a certificate from another CA is refused"
    );
    assert!(
        TlsConn::connect(port, &other.path("ca.crt"), None).is_err(),
        "respire's certificate does not verify against another CA"
    );
    let mut plain = respire_tests::Raw::connect(port);
    plain.set_timeout(Duration::from_secs(5));
    let answer = plain.roundtrip(b"PING\r\n", 1);
    assert!(
        !answer.windows(4).any(|w| w == b"PONG"),
        "plain text on the TLS port gets no reply"
    );

    // The failures are counted, and the connection that works is unaffected.
    let (_, metrics) = respire_tests::http_get(metrics_port, "/metrics");
    let failed = respire_tests::metric_value(&metrics, "respire_tls_handshake_failures_total")
        .unwrap_or(0.0);
    assert!(failed >= 3.0, "handshake failures counted: {failed}");
    assert!(pong(&c.roundtrip(b"PING\r\n", 1)));
}

#[test]
fn client_certificates_optional_or_not_asked() {
    let files = TlsFiles::generate("main");
    let other = TlsFiles::generate("other");
    let redis = RedisServer::start();

    let port = free_port();
    let _no = respire_tls(
        &redis,
        &tls_section(&files, port, "auth_clients = \"no\"\n"),
    );
    assert_eq!(
        cli_with(port, &files.cli_args(false), &["PING"]).trim(),
        "PONG",
        "auth_clients = no: no certificate needed"
    );

    let port = free_port();
    let _optional = respire_tls(
        &redis,
        &tls_section(&files, port, "auth_clients = \"optional\"\n"),
    );
    assert_eq!(
        cli_with(port, &files.cli_args(false), &["PING"]).trim(),
        "PONG",
        "optional: without a certificate"
    );
    assert_eq!(
        cli_with(port, &files.cli_args(true), &["PING"]).trim(),
        "PONG",
        "optional: with a good certificate"
    );
    let wrong = TlsConn::connect(
        port,
        &files.path("ca.crt"),
        Some((&other.path("client.crt"), &other.path("client.key"))),
    );
    assert!(
        wrong
            .map(|mut c| !pong(&c.roundtrip(b"PING\r\n", 1)))
            .unwrap_or(true),
        "optional: a bad certificate is still refused"
    );

    // Only TLS: no plain listener at all (Redis's `port 0`).
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("respire.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"\"\n{}[backend]\naddress = \"{}\"\n",
            tls_section(&files, port, ""),
            redis.addr()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(respire_tests::respire_bin())
        .args(["--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(10), || {
        cli_with(port, &files.cli_args(true), &["PING"]).trim() == "PONG"
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "respire serves TLS only");
}

#[test]
fn backend_over_tls() {
    let files = TlsFiles::generate("main");
    let tls_port = free_port();
    let args = files.redis_args(tls_port);
    let redis = RedisServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let backend_tls = |extra: &str| {
        format!(
            "[backend.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
            files.path("ca.crt"),
            files.path("client.crt"),
            files.path("client.key")
        )
    };
    let respire = Respire::with_config(&format!(
        "[backend]\naddress = \"127.0.0.1:{tls_port}\"\n{}",
        backend_tls("")
    ));
    let mut con = respire.conn();
    let _: () = redis::cmd("SET")
        .arg("over:tls")
        .arg("yes")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        cli(redis.port, &["GET", "over:tls"]).trim(),
        "yes",
        "the write reached Redis"
    );
    // respire's connections are on Redis's TLS port.
    let list = cli(redis.port, &["CLIENT", "LIST"]);
    assert!(
        list.lines()
            .any(|l| l.contains("name=respire")
                && l.contains(&format!("laddr=127.0.0.1:{tls_port}"))),
        "{list}"
    );

    // The exclusive (MULTI, blocking) and subscriber paths use TLS too.
    let (a, b): (String, String) = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg("tx:a")
        .arg("1")
        .ignore()
        .cmd("GET")
        .arg("tx:a")
        .cmd("GET")
        .arg("over:tls")
        .query(&mut con)
        .unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("1", "yes"));
    let mut sub = respire_tests::Raw::connect(respire.port);
    assert!(
        sub.roundtrip(&resp(&[b"SUBSCRIBE", b"tls:chan"]), 1)
            .ends_with(b":1\r\n")
    );
    let n: i64 = redis::cmd("PUBLISH")
        .arg("tls:chan")
        .arg("hello")
        .query(&mut con)
        .unwrap();
    assert_eq!(n, 1, "the subscriber is registered on Redis");
    let msg = sub.read_replies(1);
    assert!(
        msg.ends_with(b"$5\r\nhello\r\n"),
        "{}",
        String::from_utf8_lossy(&msg)
    );
    let mut blocked = respire.conn();
    let waiter = std::thread::spawn(move || {
        let r: Option<(String, String)> = redis::cmd("BLPOP")
            .arg("tls:list")
            .arg(5)
            .query(&mut blocked)
            .unwrap();
        r
    });
    std::thread::sleep(Duration::from_millis(300));
    let _: () = redis::cmd("RPUSH")
        .arg("tls:list")
        .arg("x")
        .query(&mut con)
        .unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        Some(("tls:list".into(), "x".into()))
    );

    // The node's certificate is checked: a name it was not issued for is refused.
    let wrong = Respire::with_config(&format!(
        "[backend]\naddress = \"127.0.0.1:{tls_port}\"\nconnect_timeout = \"500ms\"\nfailover_timeout = \"1s\"\n{}",
        backend_tls("server_name = \"redis.example.com\"\n")
    ));
    let e = redis::cmd("GET")
        .arg("over:tls")
        .query::<Option<String>>(&mut wrong.conn())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("127.0.0.1"),
        "a clear error naming the node: {e}"
    );
    assert!(wrong.log().contains("TLS handshake"), "the log says why");
}

#[test]
fn cluster_over_tls() {
    let files = TlsFiles::generate("cluster");
    let cluster = Cluster::start_tls(3, 0, &files);
    let seeds: Vec<String> = cluster
        .tls_ports()
        .iter()
        .take(2)
        .map(|p| format!("\"127.0.0.1:{p}\""))
        .collect();
    let respire = Respire::with_config(&format!(
        "[backend]\ncluster = [{}]\n[backend.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        seeds.join(", "),
        files.path("ca.crt"),
        files.path("client.crt"),
        files.path("client.key")
    ));
    let mut con = respire.conn();
    let keys: Vec<String> = (0..30).map(|i| format!("tlsk{i}")).collect();
    for k in &keys {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(k)
            .arg(format!("v-{k}"))
            .query(&mut con);
        assert!(r.is_ok(), "SET {k}: {r:?}\n{}", respire.log());
    }
    let got: Vec<String> = redis::cmd("MGET").arg(&keys).query(&mut con).unwrap();
    assert_eq!(
        got,
        keys.iter().map(|k| format!("v-{k}")).collect::<Vec<_>>(),
        "MGET across the three masters over TLS"
    );
    // Every master holds some of the keys, read directly on its plain port.
    for port in cluster.master_ports() {
        let n: usize = cli(port, &["DBSIZE"]).trim().parse().unwrap();
        assert!(n > 0, "master {port} got keys");
    }
    // respire learnt the nodes' TLS ports (the ones CLUSTER SLOTS reports to a TLS client).
    let list = cli(cluster.master_ports()[0], &["CLIENT", "LIST"]);
    assert!(
        list.lines().any(|l| l.contains("name=respire")
            && cluster
                .tls_ports()
                .iter()
                .any(|p| l.contains(&format!("laddr=127.0.0.1:{p}")))),
        "{list}"
    );
    // CLIENT TRACKING over TLS tracking connections: each change on each master is told
    // (the sessions read TLS tracking connections through tokio, not directly).
    let mut t = Raw::tracking(respire.port);
    let mut w = Raw::connect(respire.port);
    for k in &keys {
        t.roundtrip(&resp(&[b"GET", k.as_bytes()]), 1);
    }
    for k in &keys {
        assert_eq!(
            w.roundtrip(&resp(&[b"SET", k.as_bytes(), b"new"]), 1),
            b"+OK\r\n"
        );
        assert_eq!(
            String::from_utf8_lossy(&t.read_replies(1)),
            respire_tests::invalidation(k)
        );
    }
}

#[test]
fn certificate_files_are_reloaded() {
    let first = TlsFiles::generate("first");
    let second = TlsFiles::generate("second");
    let dir = tempfile::tempdir().unwrap();
    let live = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(first.path(f), live(f)).unwrap();
    }
    let tls_port = free_port();
    let args = second.redis_args(tls_port);
    let redis = RedisServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let port = free_port();
    // Towards the backend, respire starts with the wrong CA (the first): it cannot reach Redis.
    let respire = Respire::with_config(&format!(
        "[tls]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nauth_clients = \"no\"\n\
         [backend]\naddress = \"127.0.0.1:{tls_port}\"\nconnect_timeout = \"500ms\"\nfailover_timeout = \"1s\"\n\
         [backend.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        live("server.crt"),
        live("server.key"),
        live("ca.crt"),
        second.path("client.crt"),
        second.path("client.key"),
    ));
    let mut old = TlsConn::connect(port, &first.path("ca.crt"), None).unwrap();
    assert!(old.server_cert_mentions("server"));
    assert!(
        TlsConn::connect(port, &second.path("ca.crt"), None).is_err(),
        "the second CA does not know the first certificate"
    );
    assert!(
        redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query::<()>(&mut respire.conn())
            .is_err(),
        "the backend's certificate is not trusted yet"
    );

    // Replace the files the way deployment tools do: write a new file, rename it over the old.
    for f in ["server.crt", "server.key", "ca.crt"] {
        let tmp = live(&format!("{f}.new"));
        std::fs::copy(second.path(f), &tmp).unwrap();
        std::fs::rename(&tmp, live(f)).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(10), || TlsConn::connect(
            port,
            &second.path("ca.crt"),
            None
        )
        .is_ok()),
        "new connections get the new certificate: {}",
        respire.log()
    );
    assert!(
        eventually(Duration::from_secs(10), || redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query::<()>(&mut respire.conn())
            .is_ok()),
        "respire trusts the backend with the new CA"
    );
    assert_eq!(cli(redis.port, &["GET", "k"]).trim(), "v");
    assert!(
        TlsConn::connect(port, &first.path("ca.crt"), None).is_err(),
        "the old certificate is no longer served"
    );
    // The connection made before the reload is still open and works.
    assert_eq!(old.roundtrip(b"PING\r\n", 1), b"+PONG\r\n");

    // A broken file leaves the working configuration in force.
    std::fs::write(live("server.key"), "not a key").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        TlsConn::connect(port, &second.path("ca.crt"), None).is_ok(),
        "a bad key file does not break TLS"
    );
    assert!(
        respire.log().contains("do not load"),
        "the bad file is logged"
    );
}
