//! The plugins shipped in `plugins/`, end to end through respire against real Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use respire_tests::{Raw, RedisServer, Respire, resp, shipped_plugin};

/// A plugin folder with one shipped plugin and this settings text.
fn plugin_dir(name: &str, settings: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    add_plugin(&dir, name, settings);
    dir
}

/// Adds a shipped plugin (`rate-limit` is built as `rate_limit.wasm`) with its settings.
fn add_plugin(dir: &tempfile::TempDir, name: &str, settings: &str) {
    std::fs::copy(
        shipped_plugin(&name.replace('-', "_")),
        dir.path().join(format!("{name}.wasm")),
    )
    .unwrap();
    std::fs::write(dir.path().join(format!("{name}.toml")), settings).unwrap();
}

fn text(p: &mut Raw, cmd: &[&[u8]]) -> String {
    String::from_utf8_lossy(&p.roundtrip(&resp(cmd), 1)).into_owned()
}

#[test]
fn acl_rules_per_user_key_channel_and_network() {
    let redis = RedisServer::start();
    let acl = r#"
order = 10
on_error = "closed"
[config]
default = "+@all -@dangerous ~* &*"
[config.users]
alice = "+@read +@connection +@pubsub +@transaction ~cache:* &news:*"
writer = "+@all -@dangerous %R~* %W~app:*"
ops = { rules = "+@all ~* &*", from = ["10.0.0.0/8"] }
"#;
    let dir = plugin_dir("acl", acl);
    let users = [("alice", "wonder"), ("writer", "pen"), ("ops", "ops")];
    let mut cfg = format!("plugins = \"{}\"\n", dir.path().display());
    for (u, p) in users {
        cfg.push_str(&format!("[[users]]\nname = \"{u}\"\npassword = \"{p}\"\n"));
    }
    cfg.push_str(&format!("[backend]\naddress = \"{}\"\n", redis.addr()));
    let proxy = Respire::with_config(&cfg);
    let mut direct = redis.client().get_connection().unwrap();
    let _: () = redis::Commands::set(&mut direct, "cache:1", "c").unwrap();
    let _: () = redis::Commands::set(&mut direct, "other", "o").unwrap();

    // Unauthenticated clients are the default user: everything but @dangerous.
    let mut d = Raw::connect(proxy.port);
    assert_eq!(text(&mut d, &[b"GET", b"other"]), "$1\r\no\r\n");
    assert_eq!(
        text(&mut d, &[b"FLUSHALL"]),
        "-NOPERM User default has no permissions to run the 'flushall' command\r\n"
    );
    assert_eq!(
        text(&mut d, &[b"CONFIG", b"GET", b"maxmemory"]),
        "-NOPERM User default has no permissions to run the 'config|get' command\r\n"
    );

    // alice: reads under cache:*, news channels.
    let mut a = Raw::connect(proxy.port);
    assert_eq!(text(&mut a, &[b"AUTH", b"alice", b"wonder"]), "+OK\r\n");
    assert_eq!(text(&mut a, &[b"GET", b"cache:1"]), "$1\r\nc\r\n");
    assert_eq!(
        text(&mut a, &[b"GET", b"other"]),
        "-NOPERM No permissions to access a key\r\n"
    );
    assert_eq!(
        text(&mut a, &[b"MGET", b"cache:1", b"other"]),
        "-NOPERM No permissions to access a key\r\n"
    );
    assert_eq!(
        text(&mut a, &[b"SET", b"cache:1", b"x"]),
        "-NOPERM User alice has no permissions to run the 'set' command\r\n"
    );
    assert_eq!(text(&mut a, &[b"PUBLISH", b"news:today", b"hi"]), ":0\r\n");
    assert_eq!(
        text(&mut a, &[b"PUBLISH", b"gossip", b"hi"]),
        "-NOPERM No permissions to access a channel\r\n"
    );
    assert_eq!(text(&mut a, &[b"PING"]), "+PONG\r\n");
    // A transaction with a refused command aborts, as in Redis.
    let got = a.roundtrip(
        &[
            resp(&[b"MULTI"]),
            resp(&[b"GET", b"cache:1"]),
            resp(&[b"GET", b"other"]),
            resp(&[b"EXEC"]),
        ]
        .concat(),
        4,
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+OK\r\n+QUEUED\r\n-NOPERM No permissions to access a key\r\n-EXECABORT Transaction discarded because of previous errors.\r\n"
    );

    // writer: reads anything, writes only app:*; each key is checked for the access it needs.
    let mut w = Raw::connect(proxy.port);
    assert_eq!(text(&mut w, &[b"AUTH", b"writer", b"pen"]), "+OK\r\n");
    assert_eq!(text(&mut w, &[b"COPY", b"other", b"app:copy"]), ":1\r\n");
    assert_eq!(
        text(&mut w, &[b"COPY", b"app:copy", b"other2"]),
        "-NOPERM No permissions to access a key\r\n"
    );
    assert_eq!(
        text(&mut w, &[b"SET", b"other", b"x"]),
        "-NOPERM No permissions to access a key\r\n"
    );
    assert_eq!(text(&mut w, &[b"INCR", b"app:n"]), ":1\r\n");
    assert_eq!(
        text(
            &mut w,
            &[
                b"EVAL",
                b"return redis.call('get', KEYS[1])",
                b"1",
                b"app:copy"
            ]
        ),
        "$1\r\no\r\n"
    );
    assert_eq!(
        text(&mut w, &[b"EVAL", b"return 1", b"1", b"other"]),
        "-NOPERM No permissions to access a key\r\n"
    );

    // ops may only come from 10.0.0.0/8.
    let mut o = Raw::connect(proxy.port);
    assert_eq!(text(&mut o, &[b"AUTH", b"ops", b"ops"]), "+OK\r\n");
    assert_eq!(
        text(&mut o, &[b"GET", b"other"]),
        "-NOPERM User ops is not allowed from 127.0.0.1\r\n"
    );
    // RESET makes a client the default user again.
    assert_eq!(text(&mut o, &[b"RESET"]), "+RESET\r\n");
    assert_eq!(text(&mut o, &[b"GET", b"other"]), "$1\r\no\r\n");

    // Nothing refused reached Redis.
    let v: Option<String> = redis::Commands::get(&mut direct, "other").unwrap();
    assert_eq!(v.as_deref(), Some("o"));
    let n: i64 = redis::cmd("DBSIZE").query(&mut direct).unwrap();
    assert_eq!(n, 4, "cache:1, other, app:copy, app:n");
}

#[test]
fn acl_refuses_bad_rules_and_keeps_the_running_version() {
    let dir = plugin_dir("acl", "[config]\ndefault = \"+@all ~*\"\n");
    let check = |settings: &str| {
        let s = dir.path().join("check.toml");
        std::fs::write(&s, settings).unwrap();
        std::process::Command::new(respire_tests::respire_bin())
            .args(["plugin", "check"])
            .arg(dir.path().join("acl.wasm"))
            .arg("--config")
            .arg(&s)
            .output()
            .unwrap()
    };
    let ok = check("[config]\ndefault = \"+@all ~*\"\n");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (bad, says) in [
        ("[config]\ndefault = \"+@nosuch\"\n", "+@nosuch"),
        (
            "[config.users]\nalice = \"+@all >secret\"\n",
            "passwords belong",
        ),
        (
            "[config.users]\nalice = { rules = \"+@all\", from = [\"10.0.0.0/40\"] }\n",
            "users.alice.from",
        ),
        ("[config]\ndefualt = \"+@all\"\n", "defualt"),
    ] {
        let out = check(bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn rate_limits_hold_across_workers_and_take_all_or_nothing() {
    let redis = RedisServer::start();
    let rules = r#"
[[config.rules]]
name = "per-client"
rate = 0.001
burst = 6
categories = ["read", "write"]
by = ["client"]

[[config.rules]]
name = "writes-per-tenant"
rate = 0.001
burst = 1
categories = ["write"]
by = ["prefix"]
prefix_segments = 2

[[config.rules]]
name = "keys"
rate = 0.001
burst = 1
commands = ["keys"]
by = ["user", "command"]
"#;
    let dir = plugin_dir("rate-limit", rules);
    let proxy = Respire::with_plugins_over_two_workers(&redis.addr(), dir.path());
    let refused = |r: &str, rule: &str| {
        r.starts_with(&format!("-ERR rate limit '{rule}' exceeded, retry in "))
            && r.ends_with(" ms\r\n")
    };
    let mut a = Raw::connect(proxy.port);
    // One write per tenant prefix; a refused write gives back the per-client token it took.
    assert_eq!(text(&mut a, &[b"SET", b"t:1:a", b"x"]), "+OK\r\n");
    assert!(refused(
        &text(&mut a, &[b"SET", b"t:1:b", b"x"]),
        "writes-per-tenant"
    ));
    assert_eq!(text(&mut a, &[b"SET", b"t:2:a", b"x"]), "+OK\r\n");
    // KEYS once per user.
    assert_eq!(text(&mut a, &[b"KEYS", b"t:9*"]), "*0\r\n");
    assert!(refused(&text(&mut a, &[b"KEYS", b"t:9*"]), "keys"));
    // (The fixture's PINGs while respire starts are in neither category.)
    // The per-client bucket (6) is shared by every connection from 127.0.0.1, on both workers:
    // 3 tokens were used above (the refused SET's was given back, the refused KEYS's too).
    let mut conns: Vec<Raw> = (0..4).map(|_| Raw::connect(proxy.port)).collect();
    let (mut ok, mut limited) = (0, 0);
    for c in conns.iter_mut() {
        for _ in 0..3 {
            let r = text(c, &[b"GET", b"t:1:a"]);
            if r == "$1\r\nx\r\n" {
                ok += 1;
            } else {
                assert!(refused(&r, "per-client"), "{r:?}");
                limited += 1;
            }
        }
    }
    assert_eq!((ok, limited), (3, 9));
    let v: Option<String> =
        redis::Commands::get(&mut redis.client().get_connection().unwrap(), "t:1:b").unwrap();
    assert_eq!(v, None, "a refused command never reached Redis");
}

#[test]
fn traffic_metrics_by_command_prefix_and_error() {
    let redis = RedisServer::start();
    let dir = plugin_dir(
        "metrics",
        "order = 1\n[config]\nprefix_segments = 1\nmax_prefixes = 2\n",
    );
    add_plugin(
        &dir,
        "acl",
        "order = 10\n[config]\ndefault = \"+@all -flushall ~*\"\n",
    );
    let (proxy, port) = Respire::with_plugins(&redis.addr(), dir.path(), &[]);
    let mut p = Raw::connect(proxy.port);
    for i in 0..3 {
        assert_eq!(
            text(&mut p, &[b"SET", format!("shop:cart:{i}").as_bytes(), b"x"]),
            "+OK\r\n"
        );
    }
    assert_eq!(text(&mut p, &[b"GET", b"shop:cart:0"]), "$1\r\nx\r\n");
    assert!(text(&mut p, &[b"LPUSH", b"shop:cart:0", b"x"]).starts_with("-WRONGTYPE"));
    assert!(text(&mut p, &[b"FLUSHALL"]).starts_with("-NOPERM"));
    assert_eq!(text(&mut p, &[b"ECHO", b"hi"]), "$2\r\nhi\r\n");
    // Two prefixes get labels of their own (max_prefixes = 2); the rest are "other".
    for k in ["users:1", "orders:1", "carts:1"] {
        assert_eq!(text(&mut p, &[b"GET", k.as_bytes()]), "$-1\r\n");
    }
    // Metrics recorded for a reply are flushed at the end of the event-loop turn it was written
    // in: any later command on the connection comes after that.
    assert_eq!(text(&mut p, &[b"PING"]), "+PONG\r\n");
    let (status, body) = respire_tests::http_get(port, "/metrics");
    assert_eq!(status, 200);
    let v = |s: &str| respire_tests::metric_value(&body, s);
    assert_eq!(
        v("respire_plugin_metrics_commands_total{command=\"set\",prefix=\"shop\",result=\"ok\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_commands_total{command=\"get\",prefix=\"shop\",result=\"ok\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v(
            "respire_plugin_metrics_commands_total{command=\"lpush\",prefix=\"shop\",result=\"error\"}"
        ),
        Some(1.0),
        "{body}"
    );
    // The ACL's refusal is seen too: the metrics plugin runs first, so its response hook runs last.
    assert_eq!(
        v(
            "respire_plugin_metrics_commands_total{command=\"flushall\",prefix=\"\",result=\"error\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_errors_total{code=\"WRONGTYPE\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_errors_total{code=\"NOPERM\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_latency_seconds_count{command=\"set\"}"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_reply_bytes_sum{command=\"echo\"}"),
        Some(8.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_request_bytes_sum{command=\"echo\"}"),
        Some(6.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_commands_total{command=\"get\",prefix=\"users\",result=\"ok\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_commands_total{command=\"get\",prefix=\"other\",result=\"ok\"}"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_metrics_prefix_latency_seconds_count{prefix=\"shop\"}"),
        Some(5.0),
        "{body}"
    );
}

#[test]
fn the_sample_settings_of_every_shipped_plugin_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for name in ["acl", "rate-limit", "metrics", "cache-policy"] {
        let out = std::process::Command::new(respire_tests::respire_bin())
            .args(["plugin", "check", "--plugin-cache", ""])
            .arg(shipped_plugin(&name.replace('-', "_")))
            .arg("--config")
            .arg(root.join(format!("plugins/{name}/{name}.toml")))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("plugin {name} ")),
            "{name}: {stdout}"
        );
        if name == "cache-policy" {
            // Only reads with a key under a caching rule reach it (the sample's 0s session rule caches nothing).
            assert!(
                stdout.contains("  keys under: user: product:\n"),
                "{stdout}"
            );
        }
    }
}

/// Four clients per port pipelining GETs of one key as fast as they can for `run`: (allowed,
/// refused by the rule named `rule`, seconds).
fn hammer(ports: &[u16], rule: &str, run: std::time::Duration) -> (u64, u64, f64) {
    let start = std::time::Instant::now();
    let threads: Vec<_> = ports
        .iter()
        .flat_map(|&port| std::iter::repeat_n(port, 4))
        .map(|port| {
            let refusal = format!("-ERR rate limit '{rule}' exceeded");
            std::thread::spawn(move || {
                let mut c = Raw::connect(port);
                let batch: Vec<u8> = (0..20).flat_map(|_| resp(&[b"GET", b"k"])).collect();
                let (mut ok, mut refused) = (0u64, 0u64);
                while start.elapsed() < run {
                    let got = String::from_utf8(c.roundtrip(&batch, 20)).unwrap();
                    ok += got.matches("$-1\r\n").count() as u64;
                    refused += got.matches(&refusal).count() as u64;
                }
                (ok, refused)
            })
        })
        .collect();
    let (ok, refused) = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    (ok, refused, start.elapsed().as_secs_f64())
}

#[test]
fn a_rate_limit_holds_its_configured_rate_under_load() {
    let redis = RedisServer::start();
    let rules = "[[config.rules]]\nname = \"all\"\nrate = 300\nburst = 30\ncommands = [\"get\"]\n";
    let dir = plugin_dir("rate-limit", rules);
    let proxy = Respire::with_plugins_over_two_workers(&redis.addr(), dir.path());
    let (ok, refused, elapsed) = hammer(&[proxy.port], "all", std::time::Duration::from_secs(3));
    let allowed = 300.0 * elapsed + 30.0;
    eprintln!("{ok} allowed, {refused} refused in {elapsed:.2} s; the limit allows {allowed:.0}");
    assert!(
        refused > ok,
        "the load must exceed the limit for the test to mean anything"
    );
    let ratio = ok as f64 / allowed;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{ok} allowed where the rate allows {allowed:.0} ({ratio:.2}×)"
    );
}

#[test]
fn a_shared_rate_limit_holds_across_two_respire_processes() {
    let redis = RedisServer::start();
    let rules = "[[config.rules]]\nname = \"quota\"\nrate = 150\nburst = 20\ncommands = [\"get\"]\nshared = true\n";
    let (dir_a, dir_b) = (
        plugin_dir("rate-limit", rules),
        plugin_dir("rate-limit", rules),
    );
    let a = Respire::start(
        &redis.addr(),
        &[
            "--plugins",
            dir_a.path().to_str().unwrap(),
            "--workers",
            "2",
        ],
    );
    let b = Respire::start(
        &redis.addr(),
        &[
            "--plugins",
            dir_b.path().to_str().unwrap(),
            "--workers",
            "2",
        ],
    );
    let (ok, refused, elapsed) = hammer(
        &[a.port, b.port],
        "quota",
        std::time::Duration::from_secs(3),
    );
    let allowed = 150.0 * elapsed + 20.0;
    eprintln!(
        "{ok} allowed, {refused} refused in {elapsed:.2} s over two respire processes; the limit allows {allowed:.0}"
    );
    assert!(
        refused > ok,
        "the load must exceed the limit for the test to mean anything"
    );
    let ratio = ok as f64 / allowed;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{ok} allowed where one shared quota allows {allowed:.0} ({ratio:.2}×)"
    );
    // The bucket is a key in Redis.
    let mut direct = Raw::connect(redis.port);
    assert!(
        text(
            &mut direct,
            &[b"EXISTS", b"{respire:ratelimit:rate-limit:quota:}"]
        )
        .starts_with(":1")
    );
}

#[test]
fn a_shared_refusal_gives_local_tokens_back() {
    let redis = RedisServer::start();
    // "local" (in respire) covers GET and SET; "remote" (in Redis) only GET and is soon empty.
    let rules = "[[config.rules]]\nname = \"local\"\nrate = 0.001\nburst = 5\ncommands = [\"get\", \"set\"]\n\
[[config.rules]]\nname = \"remote\"\nrate = 0.001\nburst = 2\ncommands = [\"get\"]\nshared = true\n";
    let dir = plugin_dir("rate-limit", rules);
    let proxy = Respire::start(&redis.addr(), &["--plugins", dir.path().to_str().unwrap()]);
    let mut p = Raw::connect(proxy.port);
    assert_eq!(text(&mut p, &[b"GET", b"k"]), "$-1\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"k"]), "$-1\r\n");
    for _ in 0..5 {
        assert!(
            text(&mut p, &[b"GET", b"k"])
                .starts_with("-ERR rate limit 'remote' exceeded, retry in ")
        );
    }
    // Had the refused GETs kept their local tokens, "local" would be empty now.
    for _ in 0..3 {
        assert_eq!(text(&mut p, &[b"SET", b"k2", b"v"]), "+OK\r\n");
    }
    assert!(text(&mut p, &[b"SET", b"k2", b"v"]).starts_with("-ERR rate limit 'local' exceeded"));
    // Pipelined commands behind a gated one keep their order.
    let got = p.roundtrip(
        &[resp(&[b"GET", b"k"]), resp(&[b"ECHO", b"after"])].concat(),
        2,
    );
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("-ERR rate limit 'local' exceeded") && got.ends_with("$5\r\nafter\r\n"),
        "{got}"
    );
}

#[test]
fn a_shared_rate_limit_does_not_wait_behind_a_client_pause() {
    let redis = RedisServer::start();
    let rules = "[[config.rules]]\nname = \"quota\"\nrate = 1000\nburst = 100\ncommands = [\"get\"]\nshared = true\n";
    let dir = plugin_dir("rate-limit", rules);
    let proxy = Respire::start(
        &redis.addr(),
        &["--plugins", dir.path().to_str().unwrap(), "--workers", "1"],
    );
    let mut admin = Raw::connect(proxy.port);
    assert_eq!(text(&mut admin, &[b"GET", b"k"]), "$-1\r\n");
    assert_eq!(
        text(&mut admin, &[b"CLIENT", b"PAUSE", b"20000", b"WRITE"]),
        "+OK\r\n"
    );
    // The bucket's script writes: Redis would hold it, and every read behind it on the
    // shared connection. The read goes on without asking Redis for the shared tokens.
    let mut p = Raw::connect(proxy.port);
    let t = std::time::Instant::now();
    assert_eq!(text(&mut p, &[b"GET", b"k"]), "$-1\r\n");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(text(&mut admin, &[b"CLIENT", b"UNPAUSE"]), "+OK\r\n");
    assert_eq!(text(&mut p, &[b"GET", b"k"]), "$-1\r\n");
}

#[test]
fn hot_and_big_keys_across_workers() {
    let redis = RedisServer::start();
    let settings = "[config]\nhot_keys = 3\nhot_sample = 1\nhot_window = \"500ms\"\nbig_keys = 5\nbig_key_bytes = 1000\n";
    let dir = plugin_dir("metrics", settings);
    let (proxy, port) = Respire::with_plugins(
        &redis.addr(),
        dir.path(),
        &["--workers", "2", "--worker-affinity", "0"],
    );
    // Two clients (one per worker): "hot" 4 times as often as "warm", "cold" once; one client
    // pipelines, so that the plugin sees both keys in one batch.
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    assert_eq!(
        text(&mut a, &[b"SET", b"big:1", &vec![b'x'; 3000]]),
        "+OK\r\n"
    );
    assert_eq!(text(&mut a, &[b"GET", b"cold"]), "$-1\r\n");
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(1600) {
        for _ in 0..4 {
            assert_eq!(text(&mut a, &[b"GET", b"hot"]), "$-1\r\n");
        }
        assert_eq!(text(&mut a, &[b"GET", b"warm"]), "$-1\r\n");
        let pipeline = [
            resp(&[b"GET", b"hot"]),
            resp(&[b"GET", b"hot"]),
            resp(&[b"GET", b"warm"]),
            resp(&[b"GET", b"hot"]),
            resp(&[b"GET", b"hot"]),
        ]
        .concat();
        assert_eq!(b.roundtrip(&pipeline, 5), b"$-1\r\n".repeat(5));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let got = text(&mut b, &[b"METRICS.HOTKEYS", b"2"]);
    let lines: Vec<&str> = got.split("\r\n").collect();
    assert_eq!(lines[0], "*2", "{got}");
    assert_eq!((lines[1], lines[3]), ("*2", "hot"), "{got}");
    assert_eq!(lines[7], "warm", "{got}");
    let (hot, warm): (f64, f64) = (
        lines[4][1..].parse().unwrap(),
        lines[8][1..].parse().unwrap(),
    );
    assert!(
        hot > 0.0 && (hot / warm - 4.0).abs() < 0.5,
        "hot {hot}/s, warm {warm}/s: {got}"
    );
    // The big key: seen when written (3000 bytes of argument) and when read.
    assert_eq!(text(&mut b, &[b"STRLEN", b"big:1"]), ":3000\r\n");
    assert!(text(&mut b, &[b"GET", b"big:1"]).starts_with("$3000\r\n"));
    // The hook observes the reply once it is written, in the same turn: a later command on b
    // comes after it.
    assert_eq!(text(&mut b, &[b"PING"]), "+PONG\r\n");
    assert_eq!(
        text(&mut a, &[b"METRICS.BIGKEYS"]),
        "*1\r\n*2\r\n$5\r\nbig:1\r\n:3009\r\n"
    );
    assert!(text(&mut a, &[b"METRICS.BIGKEYS", b"x"]).starts_with("-ERR value is not an integer"));
    // Both as gauges, published when a window with traffic rolls over.
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_millis(1200) {
        text(&mut a, &[b"GET", b"hot"]);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let (_, body) = respire_tests::http_get(port, "/metrics");
    assert!(
        respire_tests::metric_value(
            &body,
            "respire_plugin_metrics_hot_key_ops_per_second{key=\"hot\"}"
        )
        .is_some_and(|v| v > 0.0),
        "{body}"
    );
    assert_eq!(
        respire_tests::metric_value(&body, "respire_plugin_metrics_big_key_bytes{key=\"big:1\"}"),
        Some(3009.0),
        "{body}"
    );
    assert!(
        !body.contains("hot_key_ops_per_second{key=\"cold\"}"),
        "only the top 3 are kept, and cold is not among them"
    );
}
