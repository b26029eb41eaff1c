//! WebAssembly plugins end to end: the example plugin built for wasm32-wasip2 and loaded by respire.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use respire_tests::{Raw, RedisServer, Respire, hello_plugin, resp, respire_bin};

/// respire in front of `redis` with the plugins in `dir`, `workers` workers and a metrics
/// endpoint; and that endpoint's port.
fn plugin_proxy(redis: &RedisServer, dir: &tempfile::TempDir, workers: u32) -> (Respire, u16) {
    Respire::with_plugins(
        &redis.addr(),
        dir.path(),
        &["--workers", &workers.to_string()],
    )
}

fn plugin_dir(settings: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(hello_plugin(), dir.path().join("hello.wasm")).unwrap();
    if let Some(s) = settings {
        std::fs::write(dir.path().join("hello.toml"), s).unwrap();
    }
    dir
}

#[test]
fn request_hooks_deny_respond_and_continue() {
    let redis = RedisServer::start();
    let dir = plugin_dir(Some(
        "order = 1\non_error = \"open\"\ntime_budget = \"5ms\"\n[config]\ngreeting = \"hello from wasm\"\n",
    ));
    let proxy = Respire::start(
        &redis.addr(),
        &["--plugins", dir.path().to_str().unwrap(), "--workers", "1"],
    );
    let mut p = Raw::connect(proxy.port);
    let got = p.roundtrip(
        &[
            resp(&[b"PING"]),
            resp(&[b"FLUSHALL"]),
            resp(&[b"SET", b"k", b"v"]),
            resp(&[b"GET", b"k"]),
            resp(&[b"GET", b"hello:gets"]),
            resp(&[b"GET", b"hello:gets"]),
            resp(&[b"PING", b"arg"]),
        ]
        .concat(),
        7,
    );
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+hello from wasm\r\n-NOPERM 'flushall' is disabled by the hello plugin\r\n+OK\r\n$1\r\nv\r\n:1\r\n:2\r\n$3\r\narg\r\n"
    );
    // The denied FLUSHALL never reached Redis.
    let v: String =
        redis::Commands::get(&mut redis.client().get_connection().unwrap(), "k").unwrap();
    assert_eq!(v, "v");
}

#[test]
fn a_broken_plugin_file_is_left_out_and_respire_serves() {
    let redis = RedisServer::start();
    let dir = plugin_dir(None);
    std::fs::write(dir.path().join("broken.wasm"), b"not a component").unwrap();
    let proxy = Respire::start(&redis.addr(), &["--plugins", dir.path().to_str().unwrap()]);
    let mut p = Raw::connect(proxy.port);
    // The good plugin is active, without a greeting configured PING goes through.
    assert_eq!(p.roundtrip(&resp(&[b"PING"]), 1), b"+PONG\r\n");
    assert!(p.roundtrip(&resp(&[b"FLUSHDB"]), 1).starts_with(b"-NOPERM"));
    assert!(
        proxy.log().contains("broken"),
        "the bad file is reported:\n{}",
        proxy.log()
    );
}

#[test]
fn plugin_check_prints_the_manifest_or_the_reason() {
    let dir = plugin_dir(None);
    let out = Command::new(respire_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("hello.wasm"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("plugin hello 0.1.0") && text.contains("flushall"),
        "{text}"
    );
    // The example settings file shipped with the plugin is valid.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/hello-plugin/hello.toml");
    // It stages the plugin next to a copy of the settings in a temporary directory, and
    // removes that directory when it is done.
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(respire_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("hello.wasm"))
        .arg("--config")
        .arg(&example)
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind in the temporary directory: {left:?}"
    );
    std::fs::write(dir.path().join("bad.wasm"), b"\0asm garbage").unwrap();
    let out = Command::new(respire_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("bad.wasm"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad.wasm"));
    // A settings file the plugin's host cannot read is refused with its path.
    let s = dir.path().join("s.toml");
    std::fs::write(&s, "on_error = \"sometimes\"\n").unwrap();
    let out = Command::new(respire_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("hello.wasm"))
        .arg("--config")
        .arg(&s)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("on_error"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A plugin built for another version of the contract is refused with the versions, not a
    // type mismatch: the same component with its `respire:plugin/…@` imports renamed.
    let mut old = std::fs::read(dir.path().join("hello.wasm")).unwrap();
    let (ours, theirs) = (b"respire:plugin/types@0.5.0", b"respire:plugin/types@0.4.0");
    let mut renamed = 0;
    for i in 0..old.len().saturating_sub(ours.len()) {
        if old[i..].starts_with(ours) {
            old[i..i + theirs.len()].copy_from_slice(theirs);
            renamed += 1;
        }
    }
    assert!(
        renamed > 0,
        "the component imports respire:plugin/types@0.5.0"
    );
    std::fs::write(dir.path().join("old.wasm"), &old).unwrap();
    let out = Command::new(respire_bin())
        .args(["plugin", "check", "--plugin-cache", ""])
        .arg(dir.path().join("old.wasm"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("built for the plugin contract respire:plugin@0.4.0; this respire loads respire:plugin@0.5.0 plugins"), "{err}");
}

fn misbehave_dir(settings: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        respire_tests::misbehave_plugin(),
        dir.path().join("misbehave.wasm"),
    )
    .unwrap();
    std::fs::write(dir.path().join("misbehave.toml"), settings).unwrap();
    dir
}

#[test]
fn a_failing_plugin_never_stalls_or_crashes_respire() {
    let redis = RedisServer::start();
    let _: () = redis::Commands::set(
        &mut redis.client().get_connection().unwrap(),
        "plugin:loop",
        "survived",
    )
    .unwrap();
    let dir = misbehave_dir("on_error = \"open\"\ntime_budget = \"2ms\"\nmax_memory = \"16MiB\"\n");
    let proxy = Respire::start(
        &redis.addr(),
        &["--plugins", dir.path().to_str().unwrap(), "--workers", "1"],
    );
    let mut p = Raw::connect(proxy.port);
    let mut other = Raw::connect(proxy.port);
    for _ in 0..3 {
        // An infinite loop is cut off by the time budget; with on_error = "open" the command goes on.
        let start = std::time::Instant::now();
        assert_eq!(
            p.roundtrip(&resp(&[b"GET", b"plugin:loop"]), 1),
            b"$8\r\nsurvived\r\n"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_millis(500),
            "took {:?}",
            start.elapsed()
        );
        // A memory bomb hits the cap; a panic traps. Neither takes respire down.
        assert_eq!(p.roundtrip(&resp(&[b"GET", b"plugin:bomb"]), 1), b"$-1\r\n");
        assert_eq!(
            p.roundtrip(&resp(&[b"GET", b"plugin:panic"]), 1),
            b"$-1\r\n"
        );
        // The recycled instance keeps working for everyone.
        assert_eq!(other.roundtrip(&resp(&[b"SET", b"k", b"v"]), 1), b"+OK\r\n");
        assert_eq!(other.roundtrip(&resp(&[b"GET", b"k"]), 1), b"$1\r\nv\r\n");
    }
    assert!(
        proxy.log().contains("misbehave"),
        "failures are logged:\n{}",
        proxy.log()
    );
}

#[test]
fn on_error_closed_refuses_the_command() {
    let redis = RedisServer::start();
    let dir = misbehave_dir("on_error = \"closed\"\n");
    let proxy = Respire::start(&redis.addr(), &["--plugins", dir.path().to_str().unwrap()]);
    let mut p = Raw::connect(proxy.port);
    assert_eq!(
        String::from_utf8_lossy(&p.roundtrip(&resp(&[b"GET", b"plugin:panic"]), 1)),
        "-ERR respire: plugin misbehave failed\r\n"
    );
    assert_eq!(p.roundtrip(&resp(&[b"GET", b"fine"]), 1), b"$-1\r\n");
}

#[test]
fn plugins_reload_on_change_without_dropping_clients() {
    let redis = RedisServer::start();
    let dir = plugin_dir(Some("[config]\ngreeting = \"one\"\n"));
    let proxy = Respire::start(&redis.addr(), &["--plugins", dir.path().to_str().unwrap()]);
    let load = respire_tests::Load::start(proxy.port, 4);
    let mut p = Raw::connect(proxy.port);
    assert_eq!(p.roundtrip(&resp(&[b"PING"]), 1), b"+one\r\n");
    let wait_for = |p: &mut Raw, want: &[u8], what: &str| {
        let start = std::time::Instant::now();
        loop {
            if p.roundtrip(&resp(&[b"PING"]), 1) == want {
                eprintln!("{what} took effect after {:?}", start.elapsed());
                return;
            }
            // Generous: the machine may be busy; the time it took is printed above.
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "{what} did not take effect\n{}",
                proxy.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // A config change is live on the same connection.
    std::fs::write(
        dir.path().join("hello.toml"),
        "[config]\ngreeting = \"two, changed\"\n",
    )
    .unwrap();
    wait_for(&mut p, b"+two, changed\r\n", "the config change");
    assert!(
        proxy.log().contains("code=reused"),
        "a settings change must not recompile:\n{}",
        proxy.log()
    );
    // An invalid file leaves the running version in place.
    std::fs::write(dir.path().join("hello.wasm"), b"\0asm broken").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(p.roundtrip(&resp(&[b"PING"]), 1), b"+two, changed\r\n");
    assert!(proxy.log().contains("rejected"), "{}", proxy.log());
    // Removing the file unloads the plugin.
    std::fs::remove_file(dir.path().join("hello.wasm")).unwrap();
    wait_for(&mut p, b"+PONG\r\n", "the removal");
    // Adding it back loads it again.
    std::fs::copy(hello_plugin(), dir.path().join("hello.wasm")).unwrap();
    wait_for(&mut p, b"+two, changed\r\n", "the addition");
    let report = load.stop();
    assert!(report.ops > 100);
    assert!(
        report.errors.is_empty(),
        "{}",
        report.summary("reloads under load")
    );
    assert_eq!(report.wrong_reads, 0);
}

#[test]
fn compiled_plugins_are_cached_across_restarts() {
    let redis = RedisServer::start();
    let dir = plugin_dir(Some("[config]\ngreeting = \"hello\"\n"));
    let cache = tempfile::tempdir().unwrap();
    let args = [
        "--plugins",
        dir.path().to_str().unwrap(),
        "--plugin-cache",
        cache.path().to_str().unwrap(),
    ];
    let mut first = Respire::start(&redis.addr(), &args);
    assert!(first.log().contains("code=compiled"), "{}", first.log());
    let artifacts: Vec<_> = std::fs::read_dir(cache.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "one compiled artifact in the cache");
    first
        .terminate(std::time::Duration::from_secs(10))
        .expect("exits");
    let second = Respire::start(&redis.addr(), &args);
    assert!(second.log().contains("code=cached"), "{}", second.log());
    let mut p = Raw::connect(second.port);
    assert_eq!(p.roundtrip(&resp(&[b"PING"]), 1), b"+hello\r\n");
    // A cache entry that is not a valid artifact is dropped and the plugin compiled again.
    drop(second);
    std::fs::write(artifacts[0].path(), b"not machine code").unwrap();
    let third = Respire::start(&redis.addr(), &args);
    assert!(third.log().contains("code=compiled"), "{}", third.log());
    assert_eq!(
        Raw::connect(third.port).roundtrip(&resp(&[b"PING"]), 1),
        b"+hello\r\n"
    );
}

fn probe_dir(probes: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (file, settings) in probes {
        std::fs::copy(
            respire_tests::probe_plugin(),
            dir.path().join(format!("{file}.wasm")),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{file}.toml")), settings).unwrap();
    }
    dir
}

fn echo_int(p: &mut Raw, what: &str) -> i64 {
    let r = String::from_utf8(p.roundtrip(&resp(&[b"ECHO", what.as_bytes()]), 1)).unwrap();
    r.trim_start_matches(':')
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an integer: {r:?}"))
}

#[test]
fn a_plugin_is_called_only_for_the_commands_it_asked_for() {
    let redis = RedisServer::start();
    // `a` asks for SET by name, `w` for the `write` category; both also ask for ECHO (to answer).
    let dir = probe_dir(&[
        ("a", "[config]\ntag = \"a\"\ncommands = \"set\"\n"),
        ("w", "[config]\ntag = \"w\"\ncategories = \"write\"\n"),
    ]);
    let proxy = Respire::with_plugins_over_two_workers(&redis.addr(), dir.path());
    // Several connections, spread over both workers: the counter is shared by the instances.
    let mut conns: Vec<Raw> = (0..4).map(|_| Raw::connect(proxy.port)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        for j in 0..5 {
            let key = format!("k{i}:{j}");
            assert_eq!(
                c.roundtrip(&resp(&[b"SET", key.as_bytes(), b"v"]), 1),
                b"+OK\r\n"
            );
            assert_eq!(
                c.roundtrip(&resp(&[b"GET", key.as_bytes()]), 1),
                b"$1\r\nv\r\n"
            );
            assert_eq!(c.roundtrip(&resp(&[b"PING"]), 1), b"+PONG\r\n");
        }
        assert_eq!(
            c.roundtrip(&resp(&[b"DEL", format!("k{i}:0").as_bytes()]), 1),
            b":1\r\n"
        );
    }
    // `a`: 20 SETs and this ECHO; never a GET, PING or DEL.
    assert_eq!(echo_int(&mut conns[0], "probe:a:calls"), 21);
    // `w`: 20 SETs, 4 DELs (both `write`) and its own ECHO; never a GET or PING.
    assert_eq!(echo_int(&mut conns[1], "probe:w:calls"), 25);
}

#[test]
fn hooks_run_in_chain_order_and_responses_in_reverse() {
    let redis = RedisServer::start();
    let dir = probe_dir(&[
        (
            "first",
            "order = 1\n[config]\ntag = \"1\"\ncommands = \"get set\"\nprefix = \"one:\"\nresponses = true\n",
        ),
        (
            "second",
            "order = 2\n[config]\ntag = \"2\"\ncommands = \"get set\"\nprefix = \"two:\"\nresponses = true\n",
        ),
    ]);
    let proxy = Respire::start(&redis.addr(), &["--plugins", dir.path().to_str().unwrap()]);
    let mut p = Raw::connect(proxy.port);
    assert_eq!(p.roundtrip(&resp(&[b"SET", b"k", b"v"]), 1), b"+OK\r\n");
    // The request chain ran first then second: the key was rewritten twice, in that order.
    let mut direct = redis.client().get_connection().unwrap();
    let stored: Option<String> = redis::Commands::get(&mut direct, "two:one:k").unwrap();
    assert_eq!(stored.as_deref(), Some("v"));
    // The reply went through second's response hook, then first's.
    assert_eq!(p.roundtrip(&resp(&[b"GET", b"k"]), 1), b"$5\r\nv|2|1\r\n");
    // Pipelined, across many owed replies, each gets its own hooks in order.
    let mut batch = Vec::new();
    for i in 0..200 {
        let key = format!("p{i}");
        batch.extend(resp(&[b"SET", key.as_bytes(), key.as_bytes()]));
        batch.extend(resp(&[b"GET", key.as_bytes()]));
        batch.extend(resp(&[b"PING"]));
    }
    let got = String::from_utf8(p.roundtrip(&batch, 600)).unwrap();
    let mut want = String::new();
    for i in 0..200 {
        let v = format!("p{i}|2|1");
        want.push_str(&format!("+OK\r\n${}\r\n{v}\r\n+PONG\r\n", v.len()));
    }
    assert_eq!(got, want);
    // Runs longer than respire sends to Redis in one request, mixing commands with hooks and
    // one without (INCR, not asked for): each reply still gets exactly its own hooks.
    let mut batch = Vec::new();
    for i in 0..200 {
        let key = format!("q{i}");
        batch.extend(resp(&[b"SET", key.as_bytes(), key.as_bytes()]));
        batch.extend(resp(&[b"INCR", b"n"]));
        batch.extend(resp(&[b"GET", key.as_bytes()]));
    }
    let got = String::from_utf8(p.roundtrip(&batch, 600)).unwrap();
    let mut want = String::new();
    for i in 0..200 {
        let v = format!("q{i}|2|1");
        want.push_str(&format!("+OK\r\n:{}\r\n${}\r\n{v}\r\n", i + 1, v.len()));
    }
    assert_eq!(got, want);
    // A reply that is not a bulk string is left alone.
    assert_eq!(p.roundtrip(&resp(&[b"GET", b"missing"]), 1), b"$-1\r\n");
    // A plugin that stops the chain: the hooks before it see its reply, the ones after it do not run.
    assert_eq!(
        String::from_utf8_lossy(&p.roundtrip(&resp(&[b"GET", b"probe:deny"]), 1)),
        "-NOPERM denied by probe 1\r\n"
    );
}

#[test]
fn token_buckets_are_shared_by_all_workers() {
    let redis = RedisServer::start();
    let dir = probe_dir(&[(
        "limit",
        "[config]\ntag = \"l\"\ncommands = \"get\"\nrate = 0.01\nburst = 6\nlimit_by = \"all\"\n",
    )]);
    let proxy = Respire::with_plugins_over_two_workers(&redis.addr(), dir.path());
    let mut conns: Vec<Raw> = (0..4).map(|_| Raw::connect(proxy.port)).collect();
    let (mut ok, mut limited) = (0, 0);
    for c in conns.iter_mut() {
        for _ in 0..4 {
            let r = String::from_utf8(c.roundtrip(&resp(&[b"GET", b"x"]), 1)).unwrap();
            if r == "$-1\r\n" {
                ok += 1;
            } else {
                assert!(
                    r.starts_with("-ERR rate limit 'per-client' exceeded, retry in "),
                    "{r:?}"
                );
                assert!(r.ends_with(" ms\r\n"), "{r:?}");
                limited += 1;
            }
        }
        // Commands the plugin did not ask for are never limited.
        assert_eq!(c.roundtrip(&resp(&[b"PING"]), 1), b"+PONG\r\n");
    }
    assert_eq!(
        (ok, limited),
        (6, 10),
        "one bucket of 6 for 16 GETs over two workers"
    );
}

#[test]
fn a_pipeline_takes_tokens_in_order_until_the_bucket_is_empty() {
    let redis = RedisServer::start();
    let dir = probe_dir(&[(
        "limit",
        "[config]\ntag = \"l\"\ncommands = \"get\"\nrate = 0.01\nburst = 10\nlimit_by = \"all\"\n",
    )]);
    let proxy = Respire::start(&redis.addr(), &["--plugins", dir.path().to_str().unwrap()]);
    let mut c = Raw::connect(proxy.port);
    let pipeline = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| resp(&[b"GET", b"x"])).collect() };
    // 4 pipelined GETs fit the bucket of 10: all pass.
    assert_eq!(
        String::from_utf8(c.roundtrip(&pipeline(4), 4)).unwrap(),
        "$-1\r\n".repeat(4)
    );
    // 9 more, 6 tokens left: the first 6 pass and the last 3 are refused, in order.
    let got = String::from_utf8(c.roundtrip(&pipeline(9), 9)).unwrap();
    let replies: Vec<&str> = got.split_inclusive("\r\n").collect();
    assert_eq!(replies.len(), 9, "{got:?}");
    assert!(replies[..6].iter().all(|r| *r == "$-1\r\n"), "{got:?}");
    assert!(
        replies[6..]
            .iter()
            .all(|r| r.starts_with("-ERR rate limit 'per-client' exceeded, retry in ")),
        "{got:?}"
    );
    // Empty now: a whole pipeline is refused, and commands the plugin does not see still pass.
    let mut mixed = pipeline(2);
    mixed.extend_from_slice(&resp(&[b"PING"]));
    let got = String::from_utf8(c.roundtrip(&mixed, 3)).unwrap();
    let replies: Vec<&str> = got.split_inclusive("\r\n").collect();
    assert_eq!(replies.len(), 3, "{got:?}");
    assert!(
        replies[..2].iter().all(|r| r
            .starts_with("-ERR rate limit 'per-client' exceeded, retry in ")
            && r.ends_with(" ms\r\n")),
        "{got:?}"
    );
    assert_eq!(replies[2], "+PONG\r\n");
}

#[test]
fn repeatable_decisions_are_applied_again_without_a_call() {
    let redis = RedisServer::start();
    let settings = "[config]\ntag = \"r\"\ncommands = \"get keys\"\nrepeat = true\nrefuse_dangerous = true\nrate = 0.001\nburst = 8\nlimit_by = \"all\"\n";
    let dir = probe_dir(&[("r", settings)]);
    let (proxy, port) = plugin_proxy(&redis, &dir, 1);
    let mut c = Raw::connect(proxy.port);
    let refused = |r: &[u8]| {
        String::from_utf8_lossy(r).starts_with("-ERR rate limit 'per-client' exceeded, retry in ")
    };
    // Five GETs one by one, then five pipelined: the plugin decides the first (taking a token)
    // and marks it repeatable; respire applies it to the other nine, taking a token each time,
    // so the bucket of 8 still runs out in order.
    for _ in 0..5 {
        assert_eq!(c.roundtrip(&resp(&[b"GET", b"x"]), 1), b"$-1\r\n");
    }
    let pipeline: Vec<u8> = (0..5).flat_map(|_| resp(&[b"GET", b"x"])).collect();
    let got = String::from_utf8(c.roundtrip(&pipeline, 5)).unwrap();
    let replies: Vec<&str> = got.split_inclusive("\r\n").collect();
    assert_eq!(replies.len(), 5, "{got:?}");
    assert!(replies[..3].iter().all(|r| *r == "$-1\r\n"), "{got:?}");
    assert!(
        replies[3..].iter().all(|r| refused(r.as_bytes())),
        "{got:?}"
    );
    // One call for the ten GETs, and this ECHO (answered by the plugin, never repeated).
    assert_eq!(echo_int(&mut c, "probe:r:calls"), 2);
    // A refusal is repeated too: KEYS is `dangerous`.
    for _ in 0..3 {
        assert_eq!(
            String::from_utf8_lossy(&c.roundtrip(&resp(&[b"KEYS", b"*"]), 1)),
            "-NOPERM 'keys' is dangerous\r\n"
        );
    }
    assert_eq!(echo_int(&mut c, "probe:r:calls"), 4);
    // New client details (a name) are a new generation: the plugin decides again.
    assert_eq!(
        c.roundtrip(&resp(&[b"CLIENT", b"SETNAME", b"renamed"]), 1),
        b"+OK\r\n"
    );
    assert!(refused(&c.roundtrip(&resp(&[b"GET", b"x"]), 1)));
    assert_eq!(echo_int(&mut c, "probe:r:calls"), 6);
    // So does another connection (another client); its tokens come from the same bucket.
    let mut other = Raw::connect(proxy.port);
    assert!(refused(&other.roundtrip(&resp(&[b"GET", b"x"]), 1)));
    assert!(refused(&other.roundtrip(&resp(&[b"GET", b"x"]), 1)));
    assert_eq!(echo_int(&mut other, "probe:r:calls"), 8);
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let v = |s: &str| respire_tests::metric_value(&body, s);
    // Repeated: 9 + 2 KEYS + 1 GET on the other connection; called for 1 + 1 + 1 + 1 commands and 4 ECHOs.
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"request\",plugin=\"r\",result=\"repeated\"}"),
        Some(12.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"request\",plugin=\"r\",result=\"ok\"}"),
        Some(8.0),
        "{body}"
    );
    // A reload forgets every remembered decision: with neither refusal nor limit in the new
    // settings, KEYS passes on this same connection.
    std::fs::write(
        dir.path().join("r.toml"),
        "[config]\ntag = \"r\"\ncommands = \"get keys\"\nrepeat = true\n",
    )
    .unwrap();
    let start = std::time::Instant::now();
    while c.roundtrip(&resp(&[b"KEYS", b"nomatch*"]), 1) != b"*0\r\n" {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the reload did not take effect\n{}",
            proxy.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_plugin_scoped_to_key_prefixes_sees_only_commands_with_such_a_key() {
    let redis = RedisServer::start();
    let dir = probe_dir(&[(
        "scoped",
        "[config]\ntag = \"s\"\ncommands = \"get mget\"\nkey_prefixes = \"a: b:\"\nresponses = true\n",
    )]);
    let (proxy, port) = plugin_proxy(&redis, &dir, 1);
    let mut c = Raw::connect(proxy.port);
    for k in ["a:1", "b:1", "c:1", "c:2", "ab"] {
        assert_eq!(
            c.roundtrip(&resp(&[b"SET", k.as_bytes(), b"v"]), 1),
            b"+OK\r\n"
        );
    }
    // The response hook marks the replies it saw (`|s`): keys under a: and b: only.
    let get = |c: &mut Raw, k: &str| {
        String::from_utf8(c.roundtrip(&resp(&[b"GET", k.as_bytes()]), 1)).unwrap()
    };
    assert_eq!(get(&mut c, "a:1"), "$3\r\nv|s\r\n");
    assert_eq!(get(&mut c, "b:1"), "$3\r\nv|s\r\n");
    assert_eq!(get(&mut c, "c:1"), "$1\r\nv\r\n");
    assert_eq!(
        get(&mut c, "ab"),
        "$1\r\nv\r\n",
        "a prefix is matched whole"
    );
    // A multi-key command is passed when any of its keys is in scope.
    let mget = |c: &mut Raw, a: &str, b: &str| {
        String::from_utf8(c.roundtrip(&resp(&[b"MGET", a.as_bytes(), b.as_bytes()]), 1)).unwrap()
    };
    assert_eq!(mget(&mut c, "c:1", "c:2"), "*2\r\n$1\r\nv\r\n$1\r\nv\r\n");
    assert!(mget(&mut c, "c:1", "a:1").starts_with("*2\r\n"));
    // Pipelined, in and out of scope alternately: each reply is its own command's.
    let batch: Vec<u8> = (0..50)
        .flat_map(|i| resp(&[b"GET", if i % 2 == 0 { b"a:1" } else { b"c:1" }]))
        .collect();
    let want: String = (0..50)
        .map(|i| {
            if i % 2 == 0 {
                "$3\r\nv|s\r\n"
            } else {
                "$1\r\nv\r\n"
            }
        })
        .collect();
    assert_eq!(String::from_utf8(c.roundtrip(&batch, 50)).unwrap(), want);
    // The request hook ran for the same commands: 2 + 25 GETs and one MGET.
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let v = |s: &str| respire_tests::metric_value(&body, s);
    assert_eq!(
        v("respire_plugin_scoped_calls_total{command=\"get\"}"),
        Some(27.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_scoped_calls_total{command=\"mget\"}"),
        Some(1.0),
        "{body}"
    );
}

/// A remembered decision is applied to a client's later commands of the same kind in scope,
/// also when commands out of the plugin's key prefixes come between them in a pipeline.
#[test]
fn repeated_decisions_hold_across_commands_out_of_scope() {
    let redis = RedisServer::start();
    let settings = "[config]\ntag = \"q\"\ncommands = \"get\"\nkey_prefixes = \"a:\"\nrepeat = true\nrate = 0.001\nburst = 8\nlimit_by = \"all\"\n";
    let dir = probe_dir(&[("q", settings)]);
    let (proxy, port) = plugin_proxy(&redis, &dir, 1);
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.roundtrip(&resp(&[b"GET", b"a:1"]), 1), b"$-1\r\n");
    // Out of scope first, then in and out alternately: the ten GETs of a:1 take a token each
    // (the bucket of 8 has 7 left), the others none.
    let batch: Vec<u8> = (0..20)
        .flat_map(|i| resp(&[b"GET", if i % 2 == 0 { b"c:1" } else { b"a:1" }]))
        .collect();
    let got = String::from_utf8(c.roundtrip(&batch, 20)).unwrap();
    let replies: Vec<&str> = got.split_inclusive("\r\n").collect();
    assert_eq!(replies.len(), 20, "{got:?}");
    for (i, r) in replies.iter().enumerate() {
        let refused = r.starts_with("-ERR rate limit 'per-client' exceeded");
        // In scope: the 2nd, 4th … of the batch; the 8th in-scope GET of the batch (i = 15)
        // is the first the bucket cannot pay for.
        let want_refused = i % 2 == 1 && i >= 15;
        assert_eq!(refused, want_refused, "reply {i}: {got:?}");
        if !refused {
            assert_eq!(*r, "$-1\r\n", "reply {i}: {got:?}");
        }
    }
    // The plugin was called for the first GET only; respire repeated its decision ten times.
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let v = |s: &str| respire_tests::metric_value(&body, s);
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"request\",plugin=\"q\",result=\"ok\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"request\",plugin=\"q\",result=\"repeated\"}"),
        Some(10.0),
        "{body}"
    );
}

#[test]
fn plugin_and_respire_metrics_are_served() {
    let redis = RedisServer::start();
    let dir = probe_dir(&[(
        "probe",
        "[config]\ntag = \"p\"\ncommands = \"get\"\nresponses = true\n",
    )]);
    std::fs::copy(
        respire_tests::misbehave_plugin(),
        dir.path().join("misbehave.wasm"),
    )
    .unwrap();
    std::fs::write(dir.path().join("misbehave.toml"), "time_budget = \"2ms\"\n").unwrap();
    let (proxy, port) = plugin_proxy(&redis, &dir, 1);
    let mut p = Raw::connect(proxy.port);
    for _ in 0..3 {
        assert_eq!(p.roundtrip(&resp(&[b"GET", b"a"]), 1), b"$-1\r\n");
    }
    assert_eq!(p.roundtrip(&resp(&[b"GET", b"plugin:loop"]), 1), b"$-1\r\n");
    assert_eq!(
        p.roundtrip(&resp(&[b"GET", b"plugin:panic"]), 1),
        b"$-1\r\n"
    );
    assert_eq!(p.roundtrip(&resp(&[b"GET", b"plugin:bomb"]), 1), b"$-1\r\n");
    let (status, body) = respire_tests::http_get(port, "/metrics");
    assert_eq!(status, 200);
    let v = |s: &str| respire_tests::metric_value(&body, s);
    // The plugin's own metrics, declared in its manifest and recorded through hook effects.
    assert_eq!(
        v("respire_plugin_probe_calls_total{command=\"get\"}"),
        Some(6.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_probe_reply_seconds_count"),
        Some(6.0),
        "{body}"
    );
    assert!(
        body.contains("# HELP respire_plugin_probe_calls_total Request hook calls"),
        "{body}"
    );
    // respire's own view of its plugins: calls, and each kind of failure.
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"request\",plugin=\"probe\",result=\"ok\"}"),
        Some(6.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"response\",plugin=\"probe\",result=\"ok\"}"),
        Some(6.0),
        "{body}"
    );
    for kind in ["timeout", "trap", "memory"] {
        assert_eq!(
            v(&format!(
                "respire_plugin_failures_total{{hook=\"request\",kind=\"{kind}\",plugin=\"misbehave\"}}"
            )),
            Some(1.0),
            "{kind}: {body}"
        );
    }
    assert_eq!(
        respire_tests::http_get(port, "/health"),
        (200, "ok\n".to_string())
    );
    assert_eq!(respire_tests::http_get(port, "/nope").0, 404);
}

#[test]
fn plugins_see_categories_and_keys_with_their_access() {
    let redis = RedisServer::start();
    let dir = probe_dir(&[(
        "guard",
        "[config]\ntag = \"g\"\ncategories = \"all\"\nprotect = \"secret:\"\nrefuse_dangerous = true\n",
    )]);
    let proxy = Respire::start(&redis.addr(), &["--plugins", dir.path().to_str().unwrap()]);
    let mut direct = redis.client().get_connection().unwrap();
    let _: () = redis::Commands::set(&mut direct, "secret:x", "s").unwrap();
    let mut p = Raw::connect(proxy.port);
    let denied = b"-NOPERM No permissions to access a key\r\n".to_vec();
    let cases: Vec<(Vec<&[u8]>, Vec<u8>)> = vec![
        // Reads of protected keys are fine; writes are refused, whichever argument the key is.
        (vec![b"GET", b"secret:x"], b"$1\r\ns\r\n".to_vec()),
        (vec![b"SET", b"secret:x", b"v"], denied.clone()),
        (vec![b"MSET", b"a", b"1", b"secret:y", b"2"], denied.clone()),
        (vec![b"COPY", b"secret:x", b"plain"], b":1\r\n".to_vec()),
        (vec![b"COPY", b"plain", b"secret:z"], denied.clone()),
        (
            vec![b"LMOVE", b"list", b"secret:l", b"LEFT", b"RIGHT"],
            denied.clone(),
        ),
        (
            vec![b"EVAL", b"return 1", b"1", b"secret:x"],
            denied.clone(),
        ),
        (vec![b"DEL", b"plain"], b":1\r\n".to_vec()),
        // By category.
        (
            vec![b"FLUSHALL"],
            b"-NOPERM 'flushall' is dangerous\r\n".to_vec(),
        ),
        (
            vec![b"KEYS", b"*"],
            b"-NOPERM 'keys' is dangerous\r\n".to_vec(),
        ),
        (vec![b"DBSIZE"], b":1\r\n".to_vec()),
    ];
    for (cmd, want) in cases {
        let got = p.roundtrip(&resp(&cmd), 1);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{:?}",
            String::from_utf8_lossy(&cmd.concat())
        );
    }
    let untouched: Option<String> = redis::Commands::get(&mut direct, "secret:x").unwrap();
    assert_eq!(untouched.as_deref(), Some("s"));
}

#[test]
fn a_plugin_that_keeps_failing_is_backed_off() {
    let redis = RedisServer::start();
    let dir = misbehave_dir("on_error = \"open\"\n");
    let (proxy, port) = plugin_proxy(&redis, &dir, 1);
    let mut p = Raw::connect(proxy.port);
    // 500 failing commands in one pipeline: every one is still answered (on_error = "open");
    // the pipeline crosses into the plugin in a few batches, so it traps a few times only.
    let batch: Vec<u8> = (0..500)
        .flat_map(|_| resp(&[b"GET", b"plugin:panic"]))
        .collect();
    let got = p.roundtrip(&batch, 500);
    assert_eq!(got, b"$-1\r\n".repeat(500));
    // 100 failing commands one at a time: after three failures in a row the plugin is left
    // alone for a while instead of being re-instantiated for every command.
    for _ in 0..100 {
        assert_eq!(
            p.roundtrip(&resp(&[b"GET", b"plugin:panic"]), 1),
            b"$-1\r\n"
        );
    }
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let traps = respire_tests::metric_value(
        &body,
        "respire_plugin_failures_total{hook=\"request\",kind=\"trap\",plugin=\"misbehave\"}",
    )
    .unwrap();
    assert!(
        (3.0..60.0).contains(&traps),
        "{traps} traps for 600 failing commands"
    );
    // After the pause the plugin is called again, and a success ends the streak.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(p.roundtrip(&resp(&[b"GET", b"fine"]), 1), b"$-1\r\n");
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let ok = respire_tests::metric_value(
        &body,
        "respire_plugin_calls_total{hook=\"request\",plugin=\"misbehave\",result=\"ok\"}",
    );
    assert_eq!(ok, Some(1.0), "{body}");
}

#[test]
fn admin_endpoints_report_plugins_and_readiness() {
    let mut redis = RedisServer::start();
    let dir = probe_dir(&[(
        "probe",
        "order = 5\non_error = \"closed\"\n[config]\ntag = \"p\"\ncommands = \"get\"\nresponses = true\n",
    )]);
    let (proxy, port) = Respire::with_plugins(&redis.addr(), dir.path(), &[]);
    let (status, body) = respire_tests::http_get(port, "/plugins");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let p = &v["plugins"][0];
    assert_eq!(p["file"], "probe.wasm", "{body}");
    assert_eq!(p["name"], "probe-p");
    assert_eq!(p["order"], 5);
    assert_eq!(p["on_error"], "closed");
    assert_eq!(p["on_response"], true);
    assert!(
        p["commands"].as_array().unwrap().iter().any(|c| c == "get"),
        "{body}"
    );
    assert_eq!(
        respire_tests::http_get(port, "/ready"),
        (200, "ready\n".to_string())
    );
    // With its backend gone, respire is alive but not ready, and says why.
    redis.kill();
    let (status, body) = respire_tests::http_get(port, "/ready");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: backend 127.0.0.1:") && body.contains("unreachable"),
        "{body}"
    );
    assert_eq!(respire_tests::http_get(port, "/health").0, 200);
    drop(proxy);
}

#[test]
fn many_clients_at_once_each_get_their_own_decisions_and_replies() {
    // Clients that send at the same time go through the plugins together (one call per
    // plugin per turn of a worker's event loop): each must still get the decisions about its
    // own commands and its own replies, in order.
    let redis = RedisServer::start();
    let dir = probe_dir(&[(
        "probe",
        "[config]\ntag = \"t\"\ncommands = \"get set\"\nprefix = \"ns:\"\nresponses = true\n",
    )]);
    let proxy = Respire::start(
        &redis.addr(),
        &["--plugins", dir.path().to_str().unwrap(), "--workers", "1"],
    );
    let threads: Vec<_> = (0..16)
        .map(|c| {
            let port = proxy.port;
            std::thread::spawn(move || {
                let mut p = Raw::connect(port);
                for round in 0..50 {
                    let key = format!("k{c}");
                    let value = format!("v{c}-{round}");
                    let mut batch = resp(&[b"SET", key.as_bytes(), value.as_bytes()]);
                    batch.extend(resp(&[b"GET", key.as_bytes()]));
                    batch.extend(resp(&[b"GET", b"probe:deny"]));
                    let got = p.roundtrip(&batch, 3);
                    let want = format!(
                        "+OK\r\n${}\r\n{value}|t\r\n-NOPERM denied by probe t\r\n",
                        value.len() + 2
                    );
                    assert_eq!(
                        String::from_utf8_lossy(&got),
                        want,
                        "client {c} round {round}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The rewrite reached Redis: keys carry the plugin's prefix.
    let v: Option<String> =
        redis::Commands::get(&mut redis.client().get_connection().unwrap(), "ns:k3").unwrap();
    assert_eq!(v.as_deref(), Some("v3-49"));
    // Counter additions returned as effects are applied after each call, none lost: one per
    // command seen (the ECHO's own comes after its answer) and one per reply hooked (every
    // one here, the plugin's own refusals and answers included).
    let mut p = Raw::connect(proxy.port);
    assert_eq!(echo_int(&mut p, "probe:t:requests"), 16 * 50 * 3);
    assert_eq!(echo_int(&mut p, "probe:t:replies"), 16 * 50 * 3 + 1);
    assert_eq!(echo_int(&mut p, "probe:t:requests"), 16 * 50 * 3 + 2);
    assert_eq!(echo_int(&mut p, "probe:t:calls"), 16 * 50 * 3 + 4);
}

#[test]
fn abusive_plugins_lose_no_acknowledged_write() {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    let redis = RedisServer::start();
    // A budget that lets the plugin build its 8 MiB answer, and cuts the loop off.
    let dir =
        misbehave_dir("on_error = \"open\"\ntime_budget = \"100ms\"\nmax_memory = \"32MiB\"\n");
    let proxy = Respire::with_plugins_over_two_workers(&redis.addr(), dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, i64>>> = Arc::default();
    let refused: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|t| {
            let (stop, acked, refused, port) =
                (stop.clone(), acked.clone(), refused.clone(), proxy.port);
            std::thread::spawn(move || {
                let mut p = Raw::connect(port);
                // Bounded: at most this many writes per writer.
                for n in 0..200_000i64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("abuse:{t}:{n}");
                    let reply = p.roundtrip(
                        &resp(&[b"SET", key.as_bytes(), n.to_string().as_bytes()]),
                        1,
                    );
                    match reply.as_slice() {
                        b"+OK\r\n" => {
                            acked.lock().unwrap().insert(key, n);
                        }
                        other => refused
                            .lock()
                            .unwrap()
                            .push((key, String::from_utf8_lossy(other).into_owned())),
                    }
                }
            })
        })
        .collect();
    // One client keeps asking the plugin to misbehave in every way it knows.
    let abuser = {
        let (stop, port) = (stop.clone(), proxy.port);
        std::thread::spawn(move || {
            let mut p = Raw::connect(port);
            let mut huge = format!("${}\r\n", 8 << 20).into_bytes();
            huge.resize(huge.len() + (8 << 20), b'h');
            huge.extend_from_slice(b"\r\n");
            let (mut rounds, mut whole) = (0, 0);
            while !stop.load(Ordering::Relaxed) && rounds < 10_000 {
                // While the deny-all plugin is loaded (it runs first), it refuses everything.
                let denied = |got: &[u8]| got == b"-NOPERM misbehave refuses 'get'\r\n";
                let got = p.roundtrip(&resp(&[b"GET", b"plugin:huge"]), 1);
                // Whole, or not at all: on a busy machine the call may overrun its budget (or
                // fall in a back-off), and on_error = "open" then lets the GET go to Redis.
                if got == huge {
                    whole += 1;
                } else if got != b"$-1\r\n" && !denied(&got) {
                    return Err(format!(
                        "an 8 MiB answer from a plugin arrives whole: {} bytes, {:?}",
                        got.len(),
                        String::from_utf8_lossy(&got[..got.len().min(60)])
                    ));
                }
                let got = p.roundtrip(&resp(&[b"GET", b"plugin:garbage"]), 1);
                if got != b"-ERR respire: a plugin answered with an invalid reply\r\n"
                    && !denied(&got)
                {
                    return Err(format!("garbage: {:?}", String::from_utf8_lossy(&got)));
                }
                for key in [&b"plugin:loop"[..], b"plugin:bomb", b"plugin:panic"] {
                    // Cut off (time budget, memory cap, trap); on_error = "open" lets the GET go on.
                    let got = p.roundtrip(&resp(&[b"GET", key]), 1);
                    if got != b"$-1\r\n" && !denied(&got) {
                        return Err(format!(
                            "{}: {:?}",
                            String::from_utf8_lossy(key),
                            String::from_utf8_lossy(&got)
                        ));
                    }
                }
                // Three failures in a row back the plugin off for 10 ms (its commands skip it
                // meanwhile); the next round starts after that.
                std::thread::sleep(Duration::from_millis(50));
                rounds += 1;
            }
            Ok((rounds, whole))
        })
    };
    let count = |m: &Arc<Mutex<HashMap<String, i64>>>| m.lock().unwrap().len();
    let wait_for = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    std::thread::sleep(Duration::from_secs(2));
    let before_deny = count(&acked);
    assert!(
        before_deny > 0,
        "writes go through while the plugin misbehaves"
    );

    // A plugin that refuses everything arrives mid-traffic, then leaves.
    std::fs::write(
        dir.path().join("denyall.toml"),
        "[config]\ndeny_all = true\n",
    )
    .unwrap();
    std::fs::copy(
        respire_tests::misbehave_plugin(),
        dir.path().join("denyall.wasm"),
    )
    .unwrap();
    wait_for("the deny-all plugin refuses writes", &|| {
        refused.lock().unwrap().len() >= 100
    });
    std::fs::remove_file(dir.path().join("denyall.wasm")).unwrap();
    let refused_then = refused.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(500));
    let after_removal = count(&acked);
    wait_for("writes go through again once it is gone", &|| {
        count(&acked) > after_removal + 100
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let (rounds, whole) = abuser
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", proxy.log()));
    assert!(rounds > 0, "the abusive client was served throughout");
    assert!(
        whole > 0,
        "no 8 MiB answer in {rounds} rounds\n{}",
        proxy.log()
    );

    // Every acknowledged write is in Redis; every refused one is not (it never left respire).
    let acked = acked.lock().unwrap();
    let lost = respire_tests::lost_writes(redis.port, &acked);
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    let refused = refused.lock().unwrap();
    assert!(refused.len() >= refused_then);
    let mut direct = redis.client().get_connection().unwrap();
    for (key, reply) in refused.iter() {
        assert!(
            reply.starts_with("-NOPERM misbehave refuses 'set'"),
            "{key}: refused with {reply:?}"
        );
        let v: Option<String> = redis::cmd("GET").arg(key).query(&mut direct).unwrap();
        assert_eq!(v, None, "{key} was refused but reached Redis");
    }
    assert_eq!(
        Raw::connect(proxy.port).roundtrip(b"PING\r\n", 1),
        b"+PONG\r\n"
    );
}

#[test]
fn traffic_metrics_are_recorded_by_respire_without_a_call() {
    let redis = RedisServer::start();
    // No hooks at all: only traffic metrics, over every command (2 prefixes get a label).
    let dir = probe_dir(&[(
        "t",
        "[config]\ntag = \"t\"\ncategories = \"all\"\ntraffic = true\nmax_key_prefixes = 2\nrequests = false\n",
    )]);
    let out = Command::new(respire_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("t.wasm"))
        .arg("--config")
        .arg(dir.path().join("t.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("traffic:    t_commands_total = count by command, key-prefix(1), result"),
        "{text}"
    );
    assert!(
        text.contains("traffic:    t_errors_total = count by error-code"),
        "{text}"
    );
    let (proxy, port) = plugin_proxy(&redis, &dir, 2);
    // Over two connections (both workers), pipelined and not.
    let mut a = Raw::connect(proxy.port);
    let mut b = Raw::connect(proxy.port);
    let batch = [
        resp(&[b"SET", b"shop:1", b"abc"]),
        resp(&[b"SET", b"shop:2", b"abcdef"]),
        resp(&[b"GET", b"shop:1"]),
        resp(&[b"LPUSH", b"shop:1", b"x"]),
        resp(&[b"ECHO", b"hi"]),
        resp(&[b"GET", b"user:1"]),
        resp(&[b"GET", b"third:1"]),
        resp(&[b"NOSUCHCOMMAND", b"x"]),
    ]
    .concat();
    let got = String::from_utf8(a.roundtrip(&batch, 8)).unwrap();
    // In order, the local ECHO among the backend's replies (no plugin holds any of them).
    let want = "+OK\r\n+OK\r\n$3\r\nabc\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n$2\r\nhi\r\n$-1\r\n$-1\r\n-ERR unknown command";
    assert!(got.starts_with(want), "{got}");
    for _ in 0..3 {
        assert_eq!(
            b.roundtrip(&resp(&[b"GET", b"shop:2"]), 1),
            b"$6\r\nabcdef\r\n"
        );
    }
    // A long pipeline of like replies, then one where sizes alternate: each reply counts once,
    // with its own size.
    let mut long = resp(&[b"GET", b"shop:2"]).repeat(40);
    for _ in 0..5 {
        long.extend(resp(&[b"GET", b"shop:1"]));
        long.extend(resp(&[b"GET", b"shop:2"]));
    }
    let got = a.roundtrip(&long, 50);
    assert_eq!(got.len(), 45 * 12 + 5 * 9);
    // Recorded metrics are flushed at the end of the event-loop turn: a later command on each
    // connection (each worker) comes after that.
    for c in [&mut a, &mut b] {
        assert_eq!(c.roundtrip(&resp(&[b"PING"]), 1), b"+PONG\r\n");
    }
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let v = |s: &str| respire_tests::metric_value(&body, s);
    let c = |cmd: &str, prefix: &str, result: &str| {
        v(&format!(
            "respire_plugin_t_t_commands_total{{command=\"{cmd}\",prefix=\"{prefix}\",result=\"{result}\"}}"
        ))
    };
    assert_eq!(c("set", "shop", "ok"), Some(2.0), "{body}");
    assert_eq!(c("get", "shop", "ok"), Some(54.0), "{body}");
    assert_eq!(c("lpush", "shop", "error"), Some(1.0), "{body}");
    assert_eq!(
        c("echo", "", "ok"),
        Some(1.0),
        "a command without a key has an empty prefix: {body}"
    );
    assert_eq!(c("get", "user", "ok"), Some(1.0), "{body}");
    assert_eq!(
        c("get", "other", "ok"),
        Some(1.0),
        "past max_key_prefixes a prefix is `other`: {body}"
    );
    assert_eq!(
        c("other", "", "error"),
        Some(1.0),
        "an unknown command is `other`: {body}"
    );
    assert_eq!(
        v("respire_plugin_t_t_errors_total{code=\"WRONGTYPE\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_t_t_errors_total{code=\"ERR\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_t_t_latency_seconds_count{command=\"get\"}"),
        Some(56.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_t_t_latency_seconds_bucket{command=\"get\",le=\"+Inf\"}"),
        Some(56.0),
        "{body}"
    );
    // Cumulative buckets never decrease, and a GET on loopback takes less than 10 s.
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("respire_plugin_t_t_latency_seconds_bucket{command=\"get\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(buckets.len() > 10, "{body}");
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{body}");
    assert_eq!(buckets[buckets.len() - 2], 56.0, "{body}");
    let sum = v("respire_plugin_t_t_latency_seconds_sum{command=\"get\"}").unwrap_or(-1.0);
    assert!(sum > 0.0 && sum < 56.0 * 10.0, "{body}");
    // Sizes: SET shop:1 abc is 3 + 6 + 3 bytes of name and arguments, SET shop:2 abcdef 15; the
    // replies to the four GETs of shop:2 are `$6\r\nabcdef\r\n` (12 bytes) and to GET shop:1 9.
    assert_eq!(
        v("respire_plugin_t_t_request_bytes_sum{command=\"set\"}"),
        Some(12.0 + 15.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_t_t_reply_bytes_sum{command=\"get\"}"),
        Some(9.0 + 3.0 * 12.0 + 2.0 * 5.0 + 45.0 * 12.0 + 5.0 * 9.0),
        "{body}"
    );
    // The plugin was never called.
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"response\",plugin=\"t\",result=\"ok\"}")
            .unwrap_or(0.0),
        0.0,
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"request\",plugin=\"t\",result=\"ok\"}").unwrap_or(0.0),
        0.0,
        "{body}"
    );
}

#[test]
fn a_traffic_metric_that_does_not_fit_its_metric_is_refused() {
    let dir = probe_dir(&[("bad", "[config]\ntag = \"b\"\nbad_traffic = true\n")]);
    let out = Command::new(respire_bin())
        .args(["plugin", "check"])
        .arg(dir.path().join("bad.wasm"))
        .arg("--config")
        .arg(dir.path().join("bad.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("traffic metric #0 (calls_total): latency needs a histogram"),
        "{err}"
    );
}

#[test]
fn an_observing_response_hook_never_changes_or_holds_a_reply() {
    let redis = RedisServer::start();
    // The probe would replace bulk replies with `…|o`: as an observer it must not.
    let dir = probe_dir(&[(
        "o",
        "[config]\ntag = \"o\"\ncommands = \"get\"\nresponses = true\nobserve = true\ncount = false\n",
    )]);
    let (proxy, port) = plugin_proxy(&redis, &dir, 1);
    let mut c = Raw::connect(proxy.port);
    assert_eq!(c.roundtrip(&resp(&[b"SET", b"k", b"v"]), 1), b"+OK\r\n");
    let batch: Vec<u8> = (0..20).flat_map(|_| resp(&[b"GET", b"k"])).collect();
    assert_eq!(c.roundtrip(&batch, 20), "$1\r\nv\r\n".repeat(20).as_bytes());
    // The hook did run on every reply (it records their latency), after they were written, in
    // the same turn of the event loop: a later command comes after it.
    assert_eq!(c.roundtrip(&resp(&[b"PING"]), 1), b"+PONG\r\n");
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let v = |s: &str| respire_tests::metric_value(&body, s);
    assert_eq!(
        v("respire_plugin_o_reply_seconds_count"),
        Some(20.0),
        "{body}"
    );
    assert_eq!(
        v("respire_plugin_calls_total{hook=\"response\",plugin=\"o\",result=\"ok\"}"),
        Some(20.0),
        "{body}"
    );
    let (_, plugins) = respire_tests::http_get(port, "/plugins");
    assert!(
        plugins.contains("\"responses\": \"observe, every reply\""),
        "{plugins}"
    );
}

#[test]
fn a_response_filter_calls_the_hook_only_for_the_replies_it_names() {
    let redis = RedisServer::start();
    let mut r = redis.client().get_connection().unwrap();
    let big = "x".repeat(200);
    let _: () = redis::Commands::set(&mut r, "big", &big).unwrap();
    let _: () = redis::Commands::set(&mut r, "small", "v").unwrap();
    let _: () = redis::Commands::lpush(&mut r, "list", "x").unwrap();
    // Replies of at least 100 bytes, commands of at least 100 bytes, errors: the hook tags what
    // it sees; a sample of 0 passes nothing else.
    let dir = probe_dir(&[(
        "f",
        "[config]\ntag = \"f\"\ncommands = \"get set\"\nresponses = true\nfilter = \"0 100 true\"\ncount = false\n",
    )]);
    let proxy = Respire::start(
        &redis.addr(),
        &["--plugins", dir.path().to_str().unwrap(), "--workers", "1"],
    );
    let mut c = Raw::connect(proxy.port);
    let get = |c: &mut Raw, k: &str| {
        String::from_utf8(c.roundtrip(&resp(&[b"GET", k.as_bytes()]), 1)).unwrap()
    };
    assert_eq!(get(&mut c, "small"), "$1\r\nv\r\n");
    assert_eq!(get(&mut c, "big"), format!("$202\r\n{big}|f\r\n"));
    assert!(
        get(&mut c, "list").starts_with("-WRONGTYPE"),
        "errors pass, and are not bulk replies"
    );
    // A big command: its reply (+OK) is small but the command is not.
    let set = resp(&[b"SET", b"k2", big.as_bytes()]);
    assert_eq!(c.roundtrip(&set, 1), b"+OK\r\n");
    // Pipelined: only the big reply is tagged, in order.
    let batch = [
        resp(&[b"GET", b"small"]),
        resp(&[b"GET", b"big"]),
        resp(&[b"GET", b"small"]),
    ]
    .concat();
    assert_eq!(
        String::from_utf8(c.roundtrip(&batch, 3)).unwrap(),
        format!("$1\r\nv\r\n$202\r\n{big}|f\r\n$1\r\nv\r\n")
    );
    // A sample of 1 is every reply.
    drop(proxy);
    let dir = probe_dir(&[(
        "f",
        "[config]\ntag = \"f\"\ncommands = \"get\"\nresponses = true\nfilter = \"1 0 false\"\ncount = false\n",
    )]);
    let proxy = Respire::start(
        &redis.addr(),
        &["--plugins", dir.path().to_str().unwrap(), "--workers", "1"],
    );
    let mut c = Raw::connect(proxy.port);
    assert_eq!(get(&mut c, "small"), "$3\r\nv|f\r\n");
}

#[test]
fn a_sampled_response_hook_sees_about_one_reply_in_the_sample() {
    let redis = RedisServer::start();
    let dir = probe_dir(&[(
        "s",
        "[config]\ntag = \"s\"\ncommands = \"get\"\nresponses = true\nobserve = true\nfilter = \"10 0 false\"\ncount = false\n",
    )]);
    let (proxy, port) = plugin_proxy(&redis, &dir, 1);
    let mut c = Raw::connect(proxy.port);
    let batch: Vec<u8> = (0..100).flat_map(|_| resp(&[b"GET", b"k"])).collect();
    for _ in 0..50 {
        assert_eq!(c.roundtrip(&batch, 100), "$-1\r\n".repeat(100).as_bytes());
    }
    assert_eq!(c.roundtrip(&resp(&[b"PING"]), 1), b"+PONG\r\n");
    let (_, body) = respire_tests::http_get(port, "/metrics");
    let seen =
        respire_tests::metric_value(&body, "respire_plugin_s_reply_seconds_count").unwrap_or(0.0);
    // 5,000 replies, one in 10 on average: 500, with a standard deviation of about 21.
    assert!(
        (380.0..=620.0).contains(&seen),
        "{seen} of 5000 replies sampled: {body}"
    );
}
