//! Fixtures for end-to-end tests: real `redis-server` processes and the real
//! `respire` binary, each on a free loopback port in its own temporary
//! directory, stopped when dropped. Nothing here mocks a backend.
//!
//! The binaries must be on the machine: the README's test command installs
//! `redis-server`/`redis-tools` and builds `respire` before running the tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A free TCP port on 127.0.0.1 (the OS picks it; there is a short race until it is used).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn wait_for_ping(port: u16, timeout: Duration, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            if s.write_all(b"PING\r\n").is_ok() {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    let reply = &buf[..n];
                    if reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH") || reply.starts_with(b"-ERR respire") {
                        return Ok(());
                    }
                }
            }
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} on port {port} did not come up within {timeout:?}; log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` process.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server with no persistence.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (`["--requirepass", "x"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer { port: free_port(), extra: extra.iter().map(|s| s.to_string()).collect(), dir, child: None };
        s.spawn().expect("start redis-server");
        s
    }

    /// Starts a server on a given port (for "the backend comes up later").
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedisServer { port, extra: Vec::new(), dir, child: None };
        s.spawn().expect("start redis-server");
        s
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--enable-debug-command", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("redis-server is not installed: run the README's test command, which installs it")?;
        self.child = Some(child);
        wait_for_ping(self.port, Duration::from_secs(10), "redis-server", &log)
    }

    /// "127.0.0.1:port"
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A `redis` client connected directly (not through respire).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).expect("client")
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn().expect("restart redis-server");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of real `redis-server` processes, created with `redis-cli --cluster create`.
pub struct Cluster {
    /// Every node (masters first as created; roles may change later).
    pub nodes: Vec<RedisServer>,
    masters: usize,
}

impl Cluster {
    /// Starts `masters` masters with `replicas` replicas each and waits until the cluster is healthy.
    pub fn start(masters: usize, replicas: usize) -> Cluster {
        let total = masters * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(n.addr());
        }
        cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = cmd.output().expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let c = Cluster { nodes, masters };
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    /// Comma-separated seed addresses (the first two nodes).
    pub fn seeds(&self) -> String {
        self.nodes.iter().take(2).map(|n| n.addr()).collect::<Vec<_>>().join(",")
    }

    /// Runs a command on node `i` with redis-cli and returns its output.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.nodes[i].port.to_string()]).args(args).output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ports of the current masters that own slots.
    pub fn master_ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        for line in self.cli(0, &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() >= 9 && f[2].contains("master") && !f[2].contains("fail")
                && let Some(p) = f[1].split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()) {
                    ports.push(p);
                }
        }
        ports.sort();
        ports
    }

    /// Waits until every node reports `cluster_state:ok`, agrees on the slot owners, and replicas are in sync.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = (0..self.nodes.len()).all(|i| self.cli(i, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let slots: Vec<String> = (0..self.nodes.len()).map(|i| normalize_slots(&self.cli(i, &["CLUSTER", "SLOTS"]))).collect();
            let agree = slots.windows(2).all(|w| w[0] == w[1]);
            let synced = (0..self.nodes.len()).all(|i| {
                let info = self.cli(i, &["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
            // Every node's CLUSTER SHARDS lists every node as online (Redis 7.0 takes a moment to
            // show fresh replicas in their master's shard).
            let shards_ok = (0..self.nodes.len()).all(|i| {
                let text = self.cli(i, &["CLUSTER", "SHARDS"]);
                let count = |w: &str| text.lines().filter(|l| l.trim() == w).count();
                count("online") == self.nodes.len() && count("replica") == self.nodes.len() - self.masters
            });
            if ok && agree && synced && shards_ok {
                return;
            }
            assert!(Instant::now() < deadline, "cluster not healthy within {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn normalize_slots(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    lines.join("\n")
}

/// Path of the `respire` binary built next to the running test executable.
pub fn respire_bin() -> PathBuf {
    if let Ok(p) = std::env::var("RESPIRE_BIN") {
        return PathBuf::from(p);
    }
    // `cargo test -p respire-tests` builds the library but not the binary: build it (a no-op when fresh).
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        if let Ok(cargo) = std::env::var("CARGO") {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "respire", "--bin", "respire", "--manifest-path"])
                .arg(manifest)
                .status();
            assert!(status.is_ok_and(|s| s.success()), "building respire failed");
        }
    });
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/respire
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("respire");
    assert!(bin.exists(), "{} is missing: run the README's test command (it builds respire before testing)", bin.display());
    bin
}

/// A `respire` process.
pub struct Respire {
    /// Its client port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Respire {
    /// Starts respire in front of `backend` ("host:port") with extra flags.
    pub fn start(backend: &str, extra: &[&str]) -> Respire {
        let mut args = vec!["--backend", backend];
        args.extend_from_slice(extra);
        Self::start_args(&args)
    }

    /// Starts respire with exactly these flags plus `--listen`.
    pub fn start_args(args: &[&str]) -> Respire {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = dir.path().join("respire.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new(respire_bin())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn respire");
        let r = Respire { port, dir, child: Some(child) };
        wait_for_ping(port, Duration::from_secs(10), "respire", &log).expect("respire starts");
        r
    }

    /// "127.0.0.1:port"
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A `redis` client pointed at respire.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port)).expect("client")
    }

    /// A synchronous connection through respire.
    pub fn conn(&self) -> redis::Connection {
        self.client().get_connection().expect("connect to respire")
    }

    /// respire's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("respire.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to `timeout`) for a clean exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Respire {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw TCP connection for byte-exact checks.
pub struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects to a port on 127.0.0.1.
    pub fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        Raw { s }
    }

    /// Sends bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Reads until `n` complete RESP replies have arrived (or the peer closes); returns the raw bytes.
    pub fn read_replies(&mut self, n: usize) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut tmp = [0u8; 65536];
        loop {
            if count_replies(&buf) >= n {
                return buf;
            }
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return buf,
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
            }
        }
    }

    /// Sends `req`, reads `n` replies.
    pub fn roundtrip(&mut self, req: &[u8], n: usize) -> Vec<u8> {
        self.send(req);
        self.read_replies(n)
    }

    /// Whether the peer has closed the connection (reads EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        matches!(self.s.read(&mut tmp), Ok(0))
    }
}

fn count_replies(mut buf: &[u8]) -> usize {
    let mut n = 0;
    while let Ok(Some(len)) = respire::protocol::reply_len(buf) {
        n += 1;
        buf = &buf[len..];
    }
    n
}

/// Encodes a command as RESP.
pub fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A script of commands over every data type, for comparing respire with direct Redis byte for byte.
pub const DATA_TYPES: &[&[&str]] = &[
    &["SET", "s", "hello"],
    &["APPEND", "s", " world"],
    &["GET", "s"],
    &["GETRANGE", "s", "0", "4"],
    &["INCRBY", "n", "41"],
    &["INCRBYFLOAT", "f", "1.5"],
    &["SET", "s2", "x", "NX", "PX", "100000"],
    &["SET", "s2", "y", "NX"],
    &["MSET", "a", "1", "b", "2"],
    &["MGET", "a", "b", "missing"],
    &["GETDEL", "a"],
    &["STRLEN", "s"],
    &["HSET", "h", "f1", "v1", "f2", "v2"],
    &["HGET", "h", "f1"],
    &["HGETALL", "h"],
    &["HINCRBY", "h", "c", "3"],
    &["HMGET", "h", "f1", "nope"],
    &["HKEYS", "h"],
    &["HDEL", "h", "f2"],
    &["LPUSH", "l", "a", "b", "c"],
    &["RPUSH", "l", "d"],
    &["LRANGE", "l", "0", "-1"],
    &["LPOP", "l", "2"],
    &["LINDEX", "l", "0"],
    &["LPOS", "l", "d"],
    &["SADD", "set", "1", "2", "3"],
    &["SISMEMBER", "set", "2"],
    &["SMEMBERS", "set"],
    &["SINTER", "set", "set"],
    &["SCARD", "set"],
    &["ZADD", "z", "1", "one", "2", "two", "3.5", "three"],
    &["ZRANGE", "z", "0", "-1", "WITHSCORES"],
    &["ZSCORE", "z", "three"],
    &["ZINCRBY", "z", "2", "one"],
    &["ZREVRANK", "z", "one"],
    &["ZRANGEBYSCORE", "z", "-inf", "+inf", "LIMIT", "0", "2"],
    &["ZPOPMIN", "z"],
    &["XADD", "st", "1-1", "k", "v1"],
    &["XADD", "st", "2-1", "k", "v2"],
    &["XLEN", "st"],
    &["XRANGE", "st", "-", "+"],
    &["XGROUP", "CREATE", "st", "g", "0"],
    &["XREADGROUP", "GROUP", "g", "c1", "COUNT", "1", "STREAMS", "st", ">"],
    &["XACK", "st", "g", "1-1"],
    &["XPENDING", "st", "g"],
    &["XREAD", "COUNT", "5", "STREAMS", "st", "0"],
    &["XINFO", "GROUPS", "st"],
    &["PFADD", "hll", "a", "b", "c", "a"],
    &["PFCOUNT", "hll"],
    &["SETBIT", "bits", "7", "1"],
    &["GETBIT", "bits", "7"],
    &["BITCOUNT", "bits"],
    &["BITPOS", "bits", "1"],
    &["EVAL", "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}", "1", "counter", "arg"],
    &["SCRIPT", "LOAD", "return 42"],
    &["EVALSHA", "1fa00e76656cc152ad327c13fe365858fd7be306", "0"],
    &["EVAL", "return redis.error_reply('boom')", "0"],
    &["TYPE", "z"],
    &["EXISTS", "s", "h", "nope"],
    &["EXPIRE", "s", "1000"],
    &["TTL", "s"],
    &["PERSIST", "s"],
    &["DEL", "s", "h"],
    &["DBSIZE"],
    &["ECHO", "echo me"],
    &["PING"],
    &["PING", "pong me"],
    &["NOSUCHCOMMAND", "x"],
    &["GET"],
    &["SELECT", "2"],
    &["SET", "in2", "v"],
    &["GET", "in2"],
    &["SELECT", "99"],
    &["SELECT", "x"],
    &["SELECT", "0"],
    &["GET", "in2"],
    &["HELLO", "4"],
    &["HELLO", "x"],
    &["UNSUBSCRIBE"],
    &["PUNSUBSCRIBE", "a", "b"],
    &["EXEC"],
    &["DISCARD"],
    &["CLIENT", "SETNAME", "bad name"],
    &["CLIENT", "SETNAME", "good"],
    &["CLIENT", "GETNAME"],
    &["CLIENT", "NOSUCH"],
    &["CLIENT", "GETNAME", "extra"],
    &["AUTH", "pass"],
];
