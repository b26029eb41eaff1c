//! Operations: respire's own metrics (checked by promtool and scraped by a real Prometheus),
//! the admin views, INFO and SLOWLOG.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use respire_tests::{Raw, RedisServer, Respire, free_port, http_get, metric_value, resp};

fn text(p: &mut Raw, cmd: &[&[u8]]) -> String {
    String::from_utf8_lossy(&p.roundtrip(&resp(cmd), 1)).into_owned()
}

fn proxy_with_metrics(redis: &RedisServer, extra: &[&str]) -> (Respire, u16) {
    let port = free_port();
    let mut args = vec![
        "--metrics".to_string(),
        format!("127.0.0.1:{port}"),
        "--workers".into(),
        "2".into(),
        // Connections spread over both workers: the metrics add up their counts.
        "--worker-affinity".into(),
        "0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (Respire::start(&redis.addr(), &args), port)
}

#[test]
fn request_metrics_after_a_known_workload() {
    let redis = RedisServer::start();
    let (proxy, port) = proxy_with_metrics(&redis, &[]);
    let (_, before) = http_get(port, "/metrics");
    let v0 = |s: &str| metric_value(&before, s).unwrap_or(0.0);
    let (pings, accepted) = (
        v0("respire_commands_total{command=\"ping\",result=\"ok\"}"),
        v0("respire_client_connections_total"),
    );
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    for i in 0..100 {
        assert_eq!(
            text(&mut a, &[b"SET", format!("k{i}").as_bytes(), b"v"]),
            "+OK\r\n"
        );
    }
    let batch: Vec<u8> = (0..50)
        .flat_map(|i| resp(&[b"GET", format!("k{i}").as_bytes()]))
        .collect();
    b.roundtrip(&batch, 50);
    for _ in 0..5 {
        assert!(text(&mut b, &[b"LPUSH", b"k1", b"x"]).starts_with("-WRONGTYPE"));
    }
    // Pipelined, errors among successes are counted command by command (respire sends such
    // runs to Redis as one request), also past the 16 commands one request holds.
    let mixed: Vec<u8> = (0..100)
        .flat_map(|i| {
            if i % 4 == 3 {
                resp(&[b"LPUSH", b"k1", b"x"])
            } else {
                resp(&[b"GET", format!("k{i}").as_bytes()])
            }
        })
        .collect();
    let got = b.roundtrip(&mixed, 100);
    assert_eq!(
        String::from_utf8_lossy(&got).matches("-WRONGTYPE").count(),
        25
    );
    assert_eq!(text(&mut a, &[b"PING"]), "+PONG\r\n");
    assert!(text(&mut a, &[b"NOSUCHCOMMAND"]).starts_with("-ERR unknown command"));
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    let v = |s: &str| metric_value(&body, s).unwrap_or_else(|| panic!("{s} missing in\n{body}"));
    assert_eq!(
        v("respire_commands_total{command=\"set\",result=\"ok\"}"),
        100.0
    );
    assert_eq!(
        v("respire_commands_total{command=\"get\",result=\"ok\"}"),
        125.0
    );
    assert_eq!(
        v("respire_commands_total{command=\"lpush\",result=\"error\"}"),
        30.0
    );
    assert_eq!(
        v("respire_commands_total{command=\"ping\",result=\"ok\"}") - pings,
        1.0
    );
    assert_eq!(
        v("respire_commands_total{command=\"other\",result=\"error\"}"),
        1.0
    );
    assert_eq!(
        v("respire_command_duration_seconds_count{command=\"set\"}"),
        100.0
    );
    assert_eq!(
        v("respire_command_duration_seconds_bucket{command=\"get\",le=\"+Inf\"}"),
        125.0
    );
    assert!(v("respire_command_duration_seconds_sum{command=\"set\"}") > 0.0);
    assert_eq!(v("respire_client_connections_total") - accepted, 2.0);
    assert!(v("respire_client_connections") >= 2.0);
    assert!(v("respire_client_bytes_total{direction=\"in\"}") > 100.0 * 20.0);
    assert!(v("respire_client_bytes_total{direction=\"out\"}") > 100.0 * 5.0);
    assert!(
        v(&format!(
            "respire_backend_connections{{node=\"{}\"}}",
            redis.addr()
        )) >= 1.0
    );
    assert!(
        v(&format!(
            "respire_backend_connects_total{{node=\"{}\",result=\"ok\"}}",
            redis.addr()
        )) >= 1.0
    );
    assert!(v("process_open_fds") > 3.0);
    assert!(v("process_resident_memory_bytes") > 1e6);
    assert_eq!(v("respire_build_info{version=\"0.1.0\"}"), 1.0);
    assert_eq!(v("respire_topology_masters"), 1.0);
    // A backend that goes away is counted.
    drop(redis);
    assert!(text(&mut a, &[b"GET", b"k1"]).starts_with('-'));
    let (_, body) = http_get(port, "/metrics");
    let lost: f64 = body
        .lines()
        .filter(|l| l.starts_with("respire_backend_connections_lost_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(lost >= 1.0, "{body}");
}

#[test]
fn the_exposition_passes_promtool_and_a_real_prometheus_scrapes_it() {
    let redis = RedisServer::start();
    let (proxy, port) = proxy_with_metrics(&redis, &[]);
    let mut a = Raw::connect(proxy.port);
    for _ in 0..10 {
        assert_eq!(text(&mut a, &[b"SET", b"k", b"v"]), "+OK\r\n");
    }
    let (_, body) = http_get(port, "/metrics");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; the README's test command installs it)");
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A Prometheus server scraping respire every second.
    let dir = tempfile::tempdir().unwrap();
    let prom_port = free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: respire\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let mut prom = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package prometheus)");
    let deadline = Instant::now() + Duration::from_secs(60);
    let query = "/api/v1/query?query=respire_commands_total%7Bcommand%3D%22set%22%7D";
    let found = loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", prom_port)) {
            drop(s);
            let (status, body) = http_get(prom_port, query);
            if status == 200 && body.contains("\"result\":[{") {
                break body;
            }
        }
        if Instant::now() > deadline {
            let _ = prom.kill();
            panic!("Prometheus never had respire_commands_total");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        found.contains("\"job\":\"respire\"") && found.contains("\"10\"]"),
        "{found}"
    );
    // Every query of the shipped Grafana dashboard is valid PromQL over these metrics.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard = std::fs::read_to_string(root.join("examples/grafana-dashboard.json")).unwrap();
    let exprs: Vec<String> = dashboard
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"expr\": \""))
        .map(|e| {
            e.trim_end_matches(',')
                .trim_end_matches('"')
                .replace("\\\"", "\"")
        })
        .collect();
    assert!(exprs.len() >= 14, "{exprs:?}");
    for e in exprs {
        let q = e.replace("$__rate_interval", "1m").replace("$job", ".*");
        let encoded: String = q
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let (status, body) = http_get(prom_port, &format!("/api/v1/query?query={encoded}"));
        assert!(
            status == 200 && body.contains("\"status\":\"success\""),
            "{q}: {status} {body}"
        );
    }
    let _ = prom.kill();
    let _ = prom.wait();
}

#[test]
fn admin_views_info_and_slowlog() {
    let redis = RedisServer::start();
    let (proxy, port) = proxy_with_metrics(&redis, &[]);
    let (status, topo) = http_get(port, "/topology");
    assert_eq!(status, 200);
    assert!(
        topo.contains("\"kind\": \"standalone\"")
            && topo.contains(&format!("\"master\": \"{}\"", redis.addr())),
        "{topo}"
    );
    assert!(
        topo.contains("\"complete\": true") && topo.contains("16383"),
        "{topo}"
    );
    assert_eq!(http_get(port, "/health").0, 200);

    let mut p = Raw::connect(proxy.port);
    assert_eq!(text(&mut p, &[b"SET", b"a", b"1"]), "+OK\r\n");
    // respire's sections only: no round trip to Redis.
    let info = text(&mut p, &[b"INFO", b"respire"]);
    assert!(info.contains("# Respire\r\nrespire_version:"), "{info}");
    assert!(!info.contains("# Server"), "{info}");
    // A section Redis has too: Redis's fields, respire's values for its own clients. (The
    // fixture's start-up PING connection may still be closing: its session ends on its own.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let info = loop {
        let info = text(&mut p, &[b"INFO", b"clients"]);
        if info.contains("\r\nconnected_clients:1\r\n") || Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        info.contains("# Clients\r\nconnected_clients:1\r\n"),
        "{info}"
    );
    assert!(info.contains("\r\nblocked_clients:0\r\n"), "{info}");
    assert!(
        info.contains("\r\ntracking_clients:"),
        "Redis's fields stay: {info}"
    );
    assert!(!info.contains("# Server"), "{info}");
    // CONFIG RESETSTAT resets respire's counters with Redis's; Redis's fields stay beside
    // respire's.
    assert!(text(&mut p, &[b"GET", b"a", b"extra"]).starts_with("-ERR wrong number"));
    assert_eq!(text(&mut p, &[b"CONFIG", b"RESETSTAT"]), "+OK\r\n");
    assert!(text(&mut p, &[b"INCR", b"a", b"b"]).starts_with("-ERR wrong number"));
    let stats = text(&mut p, &[b"INFO", b"stats"]);
    for want in [
        "\r\ntotal_error_replies:1\r\n",
        "\r\nrespire_error_replies:1\r\n",
        "\r\ntotal_commands_processed:",
        "\r\nexpired_keys:0\r\n",
        "\r\nkeyspace_hits:",
        "\r\ncache_hits:0\r\n",
    ] {
        assert!(stats.contains(want), "{want:?} missing in {stats}");
    }
    assert_eq!(stats.matches("total_error_replies").count(), 1, "{stats}");
    let processed: u64 = stats
        .split("\r\n")
        .find_map(|l| l.strip_prefix("respire_commands_processed:"))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        (1..=3).contains(&processed),
        "counted from the reset: {stats}"
    );
    // Everything: Redis's sections with respire's own, and the keyspace.
    let info = text(&mut p, &[b"INFO"]);
    for want in [
        "# Server\r\nredis_version:",
        "# Respire\r\nrespire_version:0.1.0",
        "# Stats\r\ntotal_connections_received:",
        "respire_commands_processed:",
        "# Plugins\r\nplugins:0",
        "# Topology\r\n",
        "shard_0:master=",
        "# Keyspace\r\ndb0:keys=1,",
    ] {
        assert!(info.contains(want), "{want:?} missing in {info}");
    }
    assert_eq!(
        info.matches("# Clients").count(),
        1,
        "respire's clients section replaces Redis's: {info}"
    );
    let memory = text(&mut p, &[b"INFO", b"memory"]);
    assert!(
        memory.contains("# Memory\r\nused_memory:") && !memory.contains("# Respire"),
        "{memory}"
    );
    let mut p3 = Raw::connect(proxy.port);
    assert!(text(&mut p3, &[b"HELLO", b"3"]).starts_with('%'));
    assert!(
        text(&mut p3, &[b"INFO", b"respire"]).starts_with("="),
        "RESP3 INFO is a verbatim string"
    );

    // The slow log: DEBUG SLEEP is slower than the 10 ms default.
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"RESET"]), "+OK\r\n");
    assert_eq!(
        text(&mut p, &[b"CLIENT", b"SETNAME", b"sleeper"]),
        "+OK\r\n"
    );
    assert_eq!(text(&mut p, &[b"DEBUG", b"SLEEP", b"0.05"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"a"]), "$1\r\n1\r\n");
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"LEN"]), ":1\r\n");
    let got = text(&mut p, &[b"SLOWLOG", b"GET"]);
    let lines: Vec<&str> = got.split("\r\n").collect();
    // Redis's six fields: id, time, duration, arguments, client address, client name.
    assert_eq!(&lines[..2], ["*1", "*6"], "{got}");
    let micros: u64 = lines[4][1..].parse().unwrap();
    assert!((50_000..5_000_000).contains(&micros), "{got}");
    assert_eq!(
        &lines[5..12],
        ["*3", "$5", "DEBUG", "$5", "SLEEP", "$4", "0.05"],
        "{got}"
    );
    assert!(
        got.contains("sleeper") && !got.contains(&redis.addr()) && got.contains("127.0.0.1:"),
        "{got}"
    );
    // Pipelined behind the sleep, the next commands are slow too (their replies wait for
    // it); each entry shows its own command.
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"RESET"]), "+OK\r\n");
    let batch = [
        resp(&[b"DEBUG", b"SLEEP", b"0.05"]),
        resp(&[b"GET", b"a"]),
        resp(&[b"SET", b"b", b"1"]),
    ]
    .concat();
    assert_eq!(p.roundtrip(&batch, 3), b"+OK\r\n$1\r\n1\r\n+OK\r\n");
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"LEN"]), ":3\r\n");
    let got = text(&mut p, &[b"SLOWLOG", b"GET"]);
    for args in [
        "*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$4\r\n0.05\r\n",
        "*2\r\n$3\r\nGET\r\n$1\r\na\r\n",
        "*3\r\n$3\r\nSET\r\n$1\r\nb\r\n$1\r\n1\r\n",
    ] {
        assert!(got.contains(args), "{args:?} not in {got}");
    }
    assert!(text(&mut p, &[b"SLOWLOG", b"GET", b"x"]).starts_with("-ERR count should be"));
    assert!(
        text(&mut p, &[b"SLOWLOG", b"NOPE"])
            .starts_with("-ERR unknown subcommand 'NOPE'. Try SLOWLOG HELP.")
    );
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"RESET"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"LEN"]), ":0\r\n");
}

#[test]
fn the_demo_starts_serves_and_stops_cleanly() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (rport, mport, pport) = (free_port(), free_port(), free_port());
    let log = tempfile::NamedTempFile::new().unwrap();
    // One file description for both streams, so that they append instead of overwriting.
    let out = log.reopen().unwrap();
    let err = out.try_clone().unwrap();
    let mut demo = Command::new("bash")
        .arg("examples/demo.sh")
        .current_dir(&root)
        .env("RESPIRE_BIN", respire_tests::respire_bin())
        .env("RESPIRE_PORT", rport.to_string())
        .env("METRICS_PORT", mport.to_string())
        .env("PROMETHEUS_PORT", pport.to_string())
        .env("DEMO_SECONDS", "300")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", rport)) {
            drop(s);
            if std::fs::read_to_string(log.path())
                .unwrap_or_default()
                .contains("Press Ctrl-C to stop")
            {
                break;
            }
        }
        if let Ok(Some(st)) = demo.try_wait() {
            panic!(
                "the demo exited with {st}: {}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not come up: {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // What the demo says to try works: keys over several masters, the ACL, the cache.
    let mut p = Raw::connect(rport);
    assert_eq!(
        text(&mut p, &[b"MSET", b"a", b"1", b"b", b"2", b"c", b"3"]),
        "+OK\r\n"
    );
    assert_eq!(
        text(&mut p, &[b"MGET", b"a", b"b", b"c"]),
        "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$1\r\n3\r\n"
    );
    assert!(text(&mut p, &[b"FLUSHALL"]).starts_with("-NOPERM"));
    assert_eq!(text(&mut p, &[b"SET", b"user:1", b"alice"]), "+OK\r\n");
    // The cache: its first read turns it on, a later one is a hit.
    let start = Instant::now();
    loop {
        assert_eq!(text(&mut p, &[b"GET", b"user:1"]), "$5\r\nalice\r\n");
        let (_, body) = http_get(mport, "/metrics");
        if metric_value(&body, "respire_cache_hits_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no cache hit for the demo's GET user:1: {body}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (_, body) = http_get(mport, "/metrics");
    assert!(
        body.contains("respire_commands_total{command=\"mset\",result=\"ok\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("respire_plugin_metrics_commands_total"),
        "{body}"
    );
    let (status, plugins) = http_get(mport, "/plugins");
    assert_eq!(status, 200);
    for name in [
        "\"acl\"",
        "\"rate-limit\"",
        "\"cache-policy\"",
        "\"metrics\"",
    ] {
        assert!(plugins.contains(name), "{name} is not loaded: {plugins}");
    }
    let prometheus_up = std::net::TcpStream::connect(("127.0.0.1", pport)).is_ok();
    // Stopped like Ctrl-C: everything it started goes away.
    let _ = Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(st)) = demo.try_wait() {
            break st;
        }
        assert!(Instant::now() < deadline, "the demo did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(log.path()).unwrap_or_default();
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("==> stopping"), "{out}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", rport)).is_err(),
        "respire still runs after the demo stopped"
    );
    if prometheus_up {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", pport)).is_err(),
            "Prometheus still runs after the demo stopped"
        );
    }
    assert!(
        out.contains("Prometheus scrapes respire"),
        "Prometheus is installed by the test command, so the demo starts it: {out}"
    );
}

#[test]
fn introspection_answers_as_redis_does() {
    let redis = RedisServer::start();
    let proxy = Respire::start(&redis.addr(), &["--workers", "1"]);
    let mut p = Raw::connect(proxy.port);
    // CONFIG SET of the slow log's settings applies to respire's slow log (and Redis's).
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"RESET"]), "+OK\r\n");
    assert_eq!(
        text(
            &mut p,
            &[b"CONFIG", b"SET", b"slowlog-log-slower-than", b"0"]
        ),
        "+OK\r\n"
    );
    for i in 0..5u8 {
        assert_eq!(text(&mut p, &[b"SET", b"k", &[b'0' + i]]), "+OK\r\n");
    }
    // Commands respire answers itself are logged too, with their arguments.
    assert_eq!(text(&mut p, &[b"PING", b"hello"]), "$5\r\nhello\r\n");
    let newest = text(&mut p, &[b"SLOWLOG", b"GET", b"1"]);
    assert!(newest.contains("$4\r\nPING\r\n$5\r\nhello\r\n"), "{newest}");
    let len: usize = text(&mut p, &[b"SLOWLOG", b"LEN"])[1..]
        .trim()
        .parse()
        .unwrap();
    assert!(len >= 5, "every command is slower than 0 µs: {len}");
    assert_eq!(
        text(&mut p, &[b"CONFIG", b"SET", b"slowlog-max-len", b"2"]),
        "+OK\r\n"
    );
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"LEN"]), ":2\r\n");
    // Credentials are redacted as Redis redacts them, and the command that turns the log off
    // is not logged (Redis checks the threshold after the command).
    assert_eq!(
        text(&mut p, &[b"CONFIG", b"SET", b"slowlog-max-len", b"10"]),
        "+OK\r\n"
    );
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"RESET"]), "+OK\r\n");
    assert_eq!(
        text(
            &mut p,
            &[b"ACL", b"SETUSER", b"slow-user", b"on", b">pw1", b"+get"]
        ),
        "+OK\r\n"
    );
    assert_eq!(
        text(&mut p, &[b"CONFIG", b"SET", b"masterauth", b"pw2"]),
        "+OK\r\n"
    );
    assert!(text(&mut p, &[b"AUTH", b"pw3"]).starts_with('-'));
    assert_eq!(
        text(
            &mut p,
            &[b"CONFIG", b"SET", b"slowlog-log-slower-than", b"-1"]
        ),
        "+OK\r\n"
    );
    let got = text(&mut p, &[b"SLOWLOG", b"GET"]);
    assert!(
        !got.contains("pw1") && !got.contains("pw2") && !got.contains("pw3"),
        "{got}"
    );
    let shown: Vec<String> = got
        .split("\r\n")
        .filter(|l| !l.starts_with(['*', '$', ':']))
        .map(str::to_string)
        .collect();
    let joined = shown.join(" ");
    for entry in [
        "AUTH (redacted)",
        "CONFIG SET masterauth (redacted)",
        "ACL SETUSER (redacted) (redacted) (redacted) (redacted)",
        "SLOWLOG RESET",
    ] {
        assert!(joined.contains(entry), "{entry:?} not in {joined}");
    }
    assert!(!joined.contains("slowlog-log-slower-than"), "{joined}");
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"RESET"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"k"]), "$1\r\n4\r\n");
    assert_eq!(text(&mut p, &[b"SLOWLOG", b"LEN"]), ":0\r\n");
    // CLIENT KILL with a type or a user Redis does not know.
    assert_eq!(
        text(&mut p, &[b"CLIENT", b"KILL", b"TYPE", b"wrong_type"]),
        "-ERR Unknown client type 'wrong_type'\r\n"
    );
    assert_eq!(
        text(&mut p, &[b"CLIENT", b"KILL", b"USER", b"wrong_user"]),
        "-ERR No such user 'wrong_user'\r\n"
    );
    // The caller's query buffer holds the command being answered (26 bytes here).
    let info = text(&mut p, &[b"CLIENT", b"INFO"]);
    assert!(info.contains(" qbuf=26 "), "{info}");
    // MONITOR shows the clients' commands, not respire's own new connections saying hello
    // (a transaction opens one). Commands respire answers itself are shown too, as Redis
    // shows them (quoted, with the client's database and address), but not administrative
    // ones; AUTH and HELLO with their credentials redacted.
    let mut m = Raw::connect(proxy.port);
    assert_eq!(text(&mut m, &[b"MONITOR"]), "+OK\r\n");
    std::thread::sleep(Duration::from_millis(100));
    let mut t = Raw::connect(proxy.port);
    assert_eq!(text(&mut t, &[b"PING"]), "+PONG\r\n");
    assert!(text(&mut t, &[b"HELLO", b"2"]).starts_with("*14\r\n"));
    assert!(text(&mut t, &[b"AUTH", b"secret"]).starts_with('-'));
    assert!(text(&mut t, &[b"HELLO", b"2", b"AUTH", b"default", b"secret"]).starts_with("*14\r\n"));
    assert!(text(&mut t, &[b"CLIENT", b"LIST"]).starts_with('$'));
    assert_eq!(
        text(&mut t, &[b"ECHO", b"a\"b\n\x01"]),
        "$5\r\na\"b\n\x01\r\n"
    );
    assert_eq!(text(&mut t, &[b"SELECT", b"5"]), "+OK\r\n");
    assert_eq!(text(&mut t, &[b"MULTI"]), "+OK\r\n");
    assert_eq!(text(&mut t, &[b"SET", b"in-tx", b"1"]), "+QUEUED\r\n");
    assert_eq!(text(&mut t, &[b"EXEC"]), "*1\r\n+OK\r\n");
    let lines = String::from_utf8_lossy(&m.read_replies(9)).into_owned();
    assert!(!lines.contains("secret"), "{lines}");
    let shown: Vec<&str> = lines
        .lines()
        .map(|l| l.split("] ").nth(1).unwrap_or_default())
        .collect();
    assert_eq!(
        shown,
        [
            "\"PING\"",
            "\"HELLO\" \"2\"",
            "\"AUTH\" \"(redacted)\"",
            "\"HELLO\" \"2\" \"AUTH\" \"(redacted)\" \"(redacted)\"",
            "\"ECHO\" \"a\\\"b\\n\\x01\"",
            "\"SELECT\" \"5\"",
            "\"MULTI\"",
            "\"SET\" \"in-tx\" \"1\"",
            "\"EXEC\""
        ],
        "{lines}"
    );
    // Lines of commands respire answered name the client and the database it was in.
    let first = lines.lines().next().unwrap_or_default();
    assert!(
        first.starts_with('+') && first.contains(" [0 127.0.0.1:"),
        "{first}"
    );
    assert!(
        lines
            .lines()
            .nth(2)
            .unwrap_or_default()
            .contains(" [0 127.0.0.1:"),
        "{lines}"
    );
}
