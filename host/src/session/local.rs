//! Commands respire answers itself: PING, ECHO, QUIT, RESET, AUTH, HELLO, SELECT, CLIENT, and
//! UNSUBSCRIBE outside subscribe mode.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{ReplyMode, Session, Target, Use};
use crate::backend;
use crate::clients::flag;
use crate::commands::{Local, Resolved};
use crate::protocol::{self as resp, Command, parse_i64};
use crate::topology::BackendKind;

impl Session {
    // ---- local commands ---------------------------------------------------

    pub(super) fn wrong_args(&mut self, name: &str) {
        self.reply_error(&format!(
            "ERR wrong number of arguments for '{name}' command"
        ));
    }

    pub(super) fn local(&mut self, which: Local, cmd: Command, res: Resolved<'_>) {
        let argc = cmd.len();
        match which {
            Local::Ping => match argc {
                1 => self.reply_with(|o, _| resp::simple(o, "PONG")),
                2 => {
                    let msg = cmd.arg(1).unwrap_or_default();
                    self.reply_with(|o, _| resp::bulk(o, msg));
                }
                _ => self.wrong_args("ping"),
            },
            Local::Echo => {
                if argc != 2 {
                    return self.wrong_args("echo");
                }
                let msg = cmd.arg(1).unwrap_or_default();
                self.reply_with(|o, _| resp::bulk(o, msg));
            }
            Local::Quit => {
                self.reply_ok();
                self.closing = true;
            }
            Local::Reset => {
                self.reset();
                self.reply_with(|o, _| resp::simple(o, "RESET"));
            }
            Local::Auth => self.auth(&cmd),
            Local::Hello => self.hello(&cmd),
            Local::Select => self.select(cmd),
            Local::Client => self.client(cmd, res),
            Local::Info => self.info(cmd, res),
            Local::Slowlog => self.slowlog(cmd),
        }
    }

    /// `INFO [section …]`: respire's own sections (respire, clients, stats, plugins,
    /// topology) and Redis's others, with the keyspace added up over the masters.
    fn info(&mut self, cmd: Command, res: Resolved<'_>) {
        let args = cmd.to_args();
        const OURS: [&str; 5] = ["respire", "clients", "stats", "plugins", "topology"];
        let asked: Vec<String> = args
            .iter()
            .skip(1)
            .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            .collect();
        let everything = asked.is_empty()
            || asked
                .iter()
                .any(|a| a == "all" || a == "default" || a == "everything");
        let ours: Vec<&str> = OURS
            .iter()
            .copied()
            .filter(|s| everything || asked.iter().any(|a| a == s))
            .collect();
        let text = self.respire_info(&ours);
        // Redis has a clients and a stats section too: respire's fields go into Redis's.
        let theirs: Vec<&String> = asked
            .iter()
            .filter(|a| !OURS.contains(&a.as_str()) || *a == "clients" || *a == "stats")
            .collect();
        let masters: Vec<(usize, Option<u16>)> = self
            .topo
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.master, self.topo.slot_of_shard(i)))
            .collect();
        if (!everything && theirs.is_empty()) || masters.is_empty() {
            // Nothing of Redis's to add to.
            let text = text.replace(":+", ":");
            return self.reply_with(|o, proto| resp::verbatim(o, text.as_bytes(), proto));
        }
        let mut sent = vec![Bytes::from_static(b"INFO")];
        if everything {
            sent.extend(args.iter().skip(1).cloned());
        } else {
            sent.extend(theirs.iter().map(|t| Bytes::from(t.to_string())));
        }
        let forward = Command::from_args(&sent);
        let data = forward.to_resp();
        let replaced = ours
            .iter()
            .filter(|s| **s == "clients" || **s == "stats")
            .map(|s| s.to_string())
            .collect();
        let how = crate::router::Merge::Info {
            ours: std::sync::Arc::from(text),
            replaced,
        };
        let targets = masters
            .into_iter()
            .map(|(node, slot)| (node, data.clone(), slot))
            .collect();
        self.send_parts(forward, res, how, Vec::new(), targets, None);
    }

    /// The text of respire's `INFO` sections, each followed by a blank line.
    fn respire_info(&self, sections: &[&str]) -> String {
        use std::fmt::Write as _;
        let shared = &self.worker.shared;
        let mut out = String::new();
        let mut section = |name: &str, body: String| {
            let _ = write!(out, "# {name}\r\n{body}\r\n");
        };
        let line = |b: &mut String, k: &str, v: &dyn std::fmt::Display| {
            let _ = write!(b, "{k}:{v}\r\n");
        };
        let topo = &self.topo;
        for s in sections {
            let mut b = String::new();
            match *s {
                "respire" => {
                    line(&mut b, "respire_version", &env!("CARGO_PKG_VERSION"));
                    line(&mut b, "redis_version", &backend::backend_version());
                    line(&mut b, "process_id", &std::process::id());
                    line(&mut b, "listen", &shared.config.listen);
                    line(&mut b, "workers", &shared.config.worker_count());
                    line(
                        &mut b,
                        "uptime_in_seconds",
                        &shared.started.elapsed().as_secs(),
                    );
                    line(
                        &mut b,
                        "backend_mode",
                        &format!("{:?}", topo.kind).to_ascii_lowercase(),
                    );
                    section("Respire", b);
                }
                "clients" => {
                    line(&mut b, "connected_clients", &shared.clients.count());
                    line(&mut b, "maxclients", &shared.config.max_clients);
                    line(&mut b, "tracking_clients", &shared.tracking.clients());
                    // Over one master its own count is exact: a client counts once Redis has
                    // it blocked (respire flags it when it sends the command). Over several,
                    // respire's count (the section is the first master's).
                    // Clients whose command a `CLIENT PAUSE` holds in respire are added.
                    if topo.shards.len() > 1 {
                        line(&mut b, "blocked_clients", &shared.clients.blocked());
                    } else if shared.pause.held() > 0 {
                        line(
                            &mut b,
                            "blocked_clients",
                            &format!("+{}", shared.pause.held()),
                        );
                    }
                    section("Clients", b);
                }
                "stats" => {
                    let c = shared.counters();
                    let (_, _, entries, bytes) = crate::cache::counters();
                    line(&mut b, "total_connections_received", &c.accepted);
                    line(&mut b, "rejected_connections", &c.rejected);
                    // Redis's count of the commands it ran, and of its error replies plus
                    // respire's own (`+`: added to Redis's value); respire's counts of what
                    // its clients sent and got are its own fields.
                    line(
                        &mut b,
                        "total_error_replies",
                        &format!("+{}", c.local_errors),
                    );
                    line(&mut b, "respire_commands_processed", &c.commands);
                    line(&mut b, "respire_error_replies", &c.errors);
                    line(&mut b, "total_net_input_bytes", &c.bytes_in);
                    line(&mut b, "total_net_output_bytes", &c.bytes_out);
                    line(
                        &mut b,
                        "client_query_buffer_limit_disconnections",
                        &c.query_closed,
                    );
                    line(
                        &mut b,
                        "client_output_buffer_limit_disconnections",
                        &c.output_closed,
                    );
                    line(&mut b, "cache_hits", &c.cache_hits);
                    line(&mut b, "cache_misses", &c.cache_misses);
                    line(&mut b, "cache_entries", &entries);
                    line(&mut b, "cache_bytes", &bytes);
                    line(&mut b, "slowlog_len", &shared.slowlog.len());
                    let (keys, items, prefixes) = shared.tracking.totals();
                    line(&mut b, "tracking_total_keys", &keys);
                    line(&mut b, "tracking_total_items", &items);
                    line(&mut b, "tracking_total_prefixes", &prefixes);
                    section("Stats", b);
                }
                "plugins" => {
                    let set = shared.plugins.load();
                    line(&mut b, "plugins", &set.plugins.len());
                    line(&mut b, "plugins_version", &set.version);
                    for p in &set.plugins {
                        let failures = p.failures.load(Ordering::Relaxed);
                        let desc = format!(
                            "name={},version={},order={},on_error={:?},failures={failures}",
                            p.manifest.name,
                            p.manifest.version,
                            p.settings.order,
                            p.settings.on_error
                        )
                        .to_ascii_lowercase();
                        line(&mut b, &format!("plugin_{}", p.file_name), &desc);
                    }
                    section("Plugins", b);
                }
                "topology" => {
                    let served = topo
                        .slots
                        .iter()
                        .filter(|&&s| (s as usize) < topo.shards.len())
                        .count();
                    line(&mut b, "topology_version", &topo.version);
                    line(&mut b, "masters", &topo.shards.len());
                    line(
                        &mut b,
                        "replicas",
                        &topo.shards.iter().map(|s| s.replicas.len()).sum::<usize>(),
                    );
                    line(&mut b, "slots_served", &served);
                    for (i, (shard, ranges)) in topo.shards.iter().zip(topo.ranges()).enumerate() {
                        let node =
                            |n: usize| topo.nodes.get(n).map(|a| a.to_string()).unwrap_or_default();
                        let replicas: Vec<String> =
                            shard.replicas.iter().map(|&r| node(r)).collect();
                        let slots: Vec<String> = ranges
                            .iter()
                            .map(|(a, b)| {
                                if a == b {
                                    a.to_string()
                                } else {
                                    format!("{a}-{b}")
                                }
                            })
                            .collect();
                        let desc = format!(
                            "master={},replicas={},slots={}",
                            node(shard.master),
                            replicas.join("|"),
                            slots.join("|")
                        );
                        line(&mut b, &format!("shard_{i}"), &desc);
                    }
                    section("Topology", b);
                }
                _ => {}
            }
        }
        out
    }

    /// `SLOWLOG GET [count] | LEN | RESET | HELP` over respire's own slow log: commands slower
    /// end to end than `slowlog_log_slower_than`, with the client and the backend node.
    fn slowlog(&mut self, cmd: Command) {
        let args = cmd.to_args();
        let sub = cmd
            .arg(1)
            .map(|s| s.to_ascii_lowercase())
            .unwrap_or_default();
        let argc = args.len();
        let log = &self.worker.shared.slowlog;
        match (sub.as_slice(), argc) {
            (b"len", 2) => {
                let n = log.len() as i64;
                self.reply_with(|o, _| resp::int(o, n));
            }
            (b"reset", 2) => {
                log.reset();
                self.reply_ok();
            }
            (b"get", 2 | 3) => {
                let count = match cmd.arg(2) {
                    None => 10,
                    Some(c) => match parse_i64(c) {
                        Some(-1) => usize::MAX,
                        Some(n) if n >= 0 => n as usize,
                        _ => {
                            return self
                                .reply_error("ERR count should be greater than or equal to -1");
                        }
                    },
                };
                let entries = log.get(count);
                let node = self.worker.shared.config.slowlog_show_node;
                self.reply_with(|o, _| {
                    resp::array_header(o, entries.len());
                    for e in &entries {
                        resp::array_header(o, if node { 7 } else { 6 });
                        resp::int(o, e.id as i64);
                        resp::int(o, e.timestamp as i64);
                        resp::int(o, e.duration_us as i64);
                        resp::array_header(o, e.args.len());
                        for a in &e.args {
                            resp::bulk(o, a);
                        }
                        resp::bulk(o, e.client.as_bytes());
                        resp::bulk(o, &e.name);
                        if node {
                            resp::bulk(o, e.node.as_bytes());
                        }
                    }
                });
            }
            (b"help", 2) => {
                let lines = [
                    "SLOWLOG <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
                    "GET [<count>]",
                    "    Return top <count> entries from respire's slowlog (default: 10, -1 mean all).",
                    "    Entries are made of:",
                    "    id, timestamp, time in microseconds (end to end through respire), arguments array,",
                    "    client IP and port, client name, and the backend node with slowlog_show_node",
                    "LEN",
                    "    Return the length of the slowlog.",
                    "RESET",
                    "    Reset the slowlog.",
                    "HELP",
                    "    Print this help.",
                ];
                self.reply_with(|o, _| {
                    resp::array_header(o, lines.len());
                    for l in lines {
                        resp::simple(o, l);
                    }
                });
            }
            (b"get" | b"len" | b"reset" | b"help", _) => {
                let name = format!("slowlog|{}", String::from_utf8_lossy(&sub));
                self.wrong_args(&name);
            }
            _ if argc < 2 => self.wrong_args("slowlog"),
            _ => {
                let shown = String::from_utf8_lossy(cmd.arg(1).unwrap_or_default()).into_owned();
                self.reply_error(&format!(
                    "ERR unknown subcommand '{shown}'. Try SLOWLOG HELP."
                ));
            }
        }
    }

    pub(super) fn reset(&mut self) {
        self.set_multi(false);
        self.watching = false;
        // The exclusive connection may hold a transaction or a watch: close it.
        if let Some(ex) = self.exclusive.take() {
            drop(ex);
        }
        if self.last_target == Some(Target::Exclusive) {
            self.last_target = None;
        }
        self.unsubscribe_all();
        self.stop_tracking();
        self.db = 0;
        self.proto = 2;
        self.reply_mode = ReplyMode::On;
        self.authenticated = !self.worker.shared.config.auth_required();
        self.info.db.store(0, Ordering::Relaxed);
        self.info.resp.store(2, Ordering::Relaxed);
        if let Ok(mut n) = self.info.name.lock() {
            *n = Bytes::new();
        }
        if let Ok(mut u) = self.info.user.lock() {
            *u = "default".into();
        }
        self.plugin_client = None;
    }

    /// Checks credentials; on success the session is authenticated as `user`, otherwise the
    /// error to reply. Failed attempts are throttled per client address (see `crate::guard`).
    pub(super) fn authenticate(&mut self, user: &[u8], pass: &[u8]) -> Result<(), String> {
        let shared = self.worker.shared.clone();
        let cfg = &shared.config;
        let ip = self.info.addr.ip();
        let now = self.now().into_std();
        if let Err(wait) = shared.auth_throttle.attempt(ip, now) {
            tracing::warn!(client = self.info.id, addr = %ip, "AUTH refused: too many failed attempts from this address");
            return Err(format!(
                "ERR respire: too many failed AUTH attempts from this address; retry in {} s",
                wait.as_secs_f64().ceil().max(1.0) as u64
            ));
        }
        let ok = if user == b"default" {
            match &cfg.requirepass {
                Some(p) => constant_time_eq(p.as_bytes(), pass),
                // Without requirepass the default user has no password and accepts any.
                None => true,
            }
        } else {
            // Every user's password is compared, so the time taken does not tell which exist.
            cfg.users.iter().fold(false, |found, u| {
                (constant_time_eq(u.password.as_bytes(), pass) & (u.name.as_bytes() == user))
                    | found
            })
        };
        shared.auth_throttle.outcome(ip, ok);
        if !ok {
            tracing::info!(client = self.info.id, addr = %self.info.addr, user = %String::from_utf8_lossy(user), "AUTH failed");
            return Err("WRONGPASS invalid username-password pair or user is disabled.".into());
        }
        self.authenticated = true;
        if let Ok(mut u) = self.info.user.lock() {
            *u = String::from_utf8_lossy(user).into_owned();
        }
        self.plugin_client = None;
        Ok(())
    }

    pub(super) fn auth(&mut self, cmd: &Command) {
        let args = cmd.to_args();
        let (user, pass) = match args.len() {
            2 => (Bytes::from_static(b"default"), args[1].clone()),
            3 => (args[1].clone(), args[2].clone()),
            1 => return self.wrong_args("auth"),
            _ => return self.reply_error("ERR syntax error"),
        };
        if args.len() == 2 && self.worker.shared.config.requirepass.is_none() {
            return self.reply_error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            );
        }
        match self.authenticate(&user, &pass) {
            Ok(()) => self.reply_ok(),
            Err(e) => self.reply_error(&e),
        }
    }

    pub(super) fn hello(&mut self, cmd: &Command) {
        let args = cmd.to_args();
        let mut proto = self.proto;
        let mut creds: Option<(Bytes, Bytes)> = None;
        let mut name: Option<Bytes> = None;
        if let Some(v) = cmd.arg(1) {
            match parse_i64(v) {
                Some(n) if (2..=3).contains(&n) => proto = n as u8,
                Some(_) => return self.reply_error("NOPROTO unsupported protocol version"),
                None => {
                    return self
                        .reply_error("ERR Protocol version is not an integer or out of range");
                }
            }
            let mut i = 2;
            while i < args.len() {
                let opt = &args[i];
                let more = args.len() - i - 1;
                if opt.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
                    creds = Some((args[i + 1].clone(), args[i + 2].clone()));
                    i += 3;
                } else if opt.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
                    name = Some(args[i + 1].clone());
                    i += 2;
                } else {
                    let opt = String::from_utf8_lossy(opt).into_owned();
                    return self.reply_error(&format!("ERR Syntax error in HELLO option '{opt}'"));
                }
            }
        }
        if let Some((user, pass)) = creds {
            if let Err(e) = self.authenticate(&user, &pass) {
                return self.reply_error(&e);
            }
        }
        if !self.authenticated {
            return self.reply_error(
                "NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time",
            );
        }
        if let Some(name) = name {
            if !self.set_name(name) {
                return;
            }
        }
        if proto != self.proto && self.watching {
            return self.reply_error(
                "ERR respire: HELLO cannot change the protocol while keys are WATCHed",
            );
        }
        self.proto = proto;
        self.info.resp.store(proto, Ordering::Relaxed);
        let id = self.info.id as i64;
        let version = backend::backend_version();
        let cluster = self.cluster_mode();
        self.reply_with(|o, p| {
            resp::map_header(o, 7, p);
            resp::bulk(o, b"server");
            resp::bulk(o, b"redis");
            resp::bulk(o, b"version");
            resp::bulk(o, version.as_bytes());
            resp::bulk(o, b"proto");
            resp::int(o, i64::from(p));
            resp::bulk(o, b"id");
            resp::int(o, id);
            resp::bulk(o, b"mode");
            resp::bulk(o, if cluster { b"cluster" } else { b"standalone" });
            resp::bulk(o, b"role");
            resp::bulk(o, b"master");
            resp::bulk(o, b"modules");
            resp::array_header(o, 0);
        });
    }

    pub(super) fn select(&mut self, cmd: Command) {
        let args = cmd.to_args();
        if args.len() != 2 {
            return self.wrong_args("select");
        }
        if self.topo.kind == BackendKind::Cluster {
            return self.reply_error("ERR SELECT is not allowed in cluster mode");
        }
        let Some(db) = parse_i64(&args[1]).filter(|n| i32::try_from(*n).is_ok()) else {
            return self.reply_error("ERR value is not an integer or out of range");
        };
        if db < 0 || db >= i64::from(self.worker.shared.config.databases) {
            return self.reply_error("ERR DB index is out of range");
        }
        let db = db as u32;
        if self.watching {
            // Keep the watched connection on the same database as the session.
            if self.send_exclusive_pinned(cmd) {
                self.exclusive_dirty = true;
                self.db = db;
                self.info.db.store(db, Ordering::Relaxed);
            }
            return;
        }
        self.db = db;
        self.info.db.store(db, Ordering::Relaxed);
        self.reply_ok();
    }

    /// Validates and sets the client name; replies with an error and returns `false` if invalid.
    pub(super) fn set_name(&mut self, name: Bytes) -> bool {
        if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
            self.reply_error(
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
            return false;
        }
        if let Ok(mut n) = self.info.name.lock() {
            *n = name;
        }
        self.plugin_client = None;
        true
    }

    pub(super) fn client(&mut self, cmd: Command, res: Resolved<'_>) {
        let args = cmd.to_args();
        let Some(sub) = cmd.arg(1).map(|s| s.to_ascii_lowercase()) else {
            return self.wrong_args("client");
        };
        let argc = args.len();
        let arity_error =
            |s: &mut Self| s.wrong_args(&format!("client|{}", String::from_utf8_lossy(&sub)));
        match sub.as_slice() {
            b"id" if argc == 2 => {
                let id = self.info.id as i64;
                self.reply_with(|o, _| resp::int(o, id));
            }
            b"getname" if argc == 2 => {
                let name = self.info.name.lock().map(|n| n.clone()).unwrap_or_default();
                self.reply_with(|o, p| {
                    if name.is_empty() {
                        resp::null(o, p)
                    } else {
                        resp::bulk(o, &name)
                    }
                });
            }
            b"setname" if argc == 3 => {
                if self.set_name(args[2].clone()) {
                    self.reply_ok();
                }
            }
            b"info" if argc == 2 => {
                self.note_activity();
                let qbuf = cmd.raw().len() + self.inbuf.len();
                let line = format!("{}\n", self.info.line(self.worker.shared.commands, qbuf));
                self.reply_with(|o, p| resp::verbatim(o, line.as_bytes(), p));
            }
            b"list" => {
                self.note_activity();
                self.client_list(&cmd);
            }
            b"kill" if argc >= 3 => self.client_kill(&cmd),
            b"setinfo" if argc == 4 => {
                let attr = args[2].to_ascii_lowercase();
                let value = args[3].clone();
                let slot = match attr.as_slice() {
                    b"lib-name" => &self.info.lib_name,
                    b"lib-ver" => &self.info.lib_ver,
                    _ => {
                        let a = String::from_utf8_lossy(&args[2]).into_owned();
                        return self.reply_error(&format!("ERR Unrecognized option '{a}'"));
                    }
                };
                if value.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
                    let a = String::from_utf8_lossy(&attr).into_owned();
                    return self.reply_error(&format!(
                        "ERR {a} cannot contain spaces, newlines or special characters."
                    ));
                }
                if let Ok(mut s) = slot.lock() {
                    *s = value;
                }
                self.reply_ok();
            }
            b"reply" if argc == 3 => {
                let mode = args[2].to_ascii_lowercase();
                match mode.as_slice() {
                    b"on" => {
                        self.reply_mode = ReplyMode::On;
                        self.reply_ok();
                    }
                    b"off" => self.reply_mode = ReplyMode::Off,
                    b"skip" => {
                        if self.reply_mode == ReplyMode::On {
                            self.reply_mode = ReplyMode::SkipNext;
                        }
                    }
                    _ => self.reply_error("ERR syntax error"),
                }
            }
            b"no-evict" | b"no-touch" if argc == 3 => {
                let v = args[2].to_ascii_lowercase();
                if v == b"on" || v == b"off" {
                    self.reply_ok();
                } else {
                    self.reply_error("ERR syntax error");
                }
            }
            b"getredir" if argc == 2 => self.client_getredir(),
            b"trackinginfo" if argc == 2 => self.client_trackinginfo(),
            b"tracking" if argc >= 3 => self.client_tracking(&args),
            b"caching" if argc >= 3 => self.client_caching(&args[2]),
            b"unblock" if argc == 3 || argc == 4 => self.client_unblock(cmd, &args),
            b"id" | b"getname" | b"setname" | b"info" | b"kill" | b"setinfo" | b"reply"
            | b"no-evict" | b"no-touch" | b"getredir" | b"unblock" | b"tracking" | b"caching"
            | b"trackinginfo" => arity_error(self),
            b"pause" | b"unpause" => self.client_pause(cmd),
            // HELP and anything newer go to Redis.
            _ => {
                self.route(cmd, res, Use::Shared);
            }
        }
    }

    /// `CLIENT UNBLOCK id [TIMEOUT|ERROR]`: the client's blocking command waits on a
    /// connection of its own, so Redis unblocks that connection (the command then answers as
    /// it would on Redis) and says whether it was blocked.
    pub(super) fn client_unblock(&mut self, cmd: Command, args: &[Bytes]) {
        let mode = match args.get(3).map(|m| m.to_ascii_lowercase()) {
            None => "TIMEOUT",
            Some(m) if m == b"timeout" => "TIMEOUT",
            Some(m) if m == b"error" => "ERROR",
            Some(_) => {
                return self.reply_error("ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR");
            }
        };
        let Some(id) = args.get(2).and_then(|a| parse_i64(a)) else {
            return self.reply_error("ERR value is not an integer or out of range");
        };
        let blocked_on = u64::try_from(id)
            .ok()
            .and_then(|id| self.worker.shared.clients.get(id))
            .filter(|t| t.flags.load(Ordering::Relaxed) & flag::BLOCKED != 0)
            .and_then(|t| t.blocked_on.lock().ok()?.clone());
        let target = blocked_on.and_then(|(addr, server_id)| {
            let node = self.topo.nodes.iter().position(|n| *n == addr)?;
            let server_id = server_id.load(Ordering::Relaxed);
            (server_id > 0).then_some((node, server_id))
        });
        let Some((node, server_id)) = target else {
            return self.reply_with(|o, _| resp::int(o, 0));
        };
        let mut c = Some(cmd);
        if !self.barrier(&mut c, Target::Shared(self.key())) {
            return;
        }
        let mut data = bytes::BytesMut::new();
        resp::encode_args(
            &mut data,
            &["CLIENT", "UNBLOCK", &server_id.to_string(), mode],
        );
        let rx = self.shared_conn(node).send(data.freeze(), 0, false);
        self.push_waiting(rx, None, false, false, node, None, false);
    }

    pub(super) fn client_list(&mut self, cmd: &Command) {
        let args = cmd.to_args();
        let mut ids: Option<Vec<u64>> = None;
        let mut kind: Option<Vec<u8>> = None;
        let mut i = 2;
        while i < args.len() {
            let opt = args[i].to_ascii_lowercase();
            if opt == b"type" && i + 1 < args.len() {
                let t = args[i + 1].to_ascii_lowercase();
                if !matches!(
                    t.as_slice(),
                    b"normal" | b"master" | b"replica" | b"slave" | b"pubsub"
                ) {
                    let t = String::from_utf8_lossy(&args[i + 1]).into_owned();
                    return self.reply_error(&format!("ERR Unknown client type '{t}'"));
                }
                kind = Some(t);
                i += 2;
            } else if opt == b"id" && i + 1 < args.len() {
                let mut list = Vec::new();
                for a in &args[i + 1..] {
                    match parse_i64(a) {
                        Some(n) if n > 0 => list.push(n as u64),
                        _ => return self.reply_error("ERR Invalid client ID"),
                    }
                }
                ids = Some(list);
                i = args.len();
            } else {
                return self.reply_error("ERR syntax error");
            }
        }
        let mut text = String::new();
        for c in self.worker.shared.clients.snapshot() {
            if ids.as_ref().is_some_and(|ids| !ids.contains(&c.id)) {
                continue;
            }
            if kind
                .as_ref()
                .is_some_and(|k| !flag::is_type(c.flags.load(Ordering::Relaxed), k))
            {
                continue;
            }
            // The caller's query buffer holds this command and what follows it, as in Redis.
            let qbuf = if c.id == self.info.id {
                cmd.raw().len() + self.inbuf.len()
            } else {
                0
            };
            text.push_str(&c.line(self.worker.shared.commands, qbuf));
            text.push('\n');
        }
        self.reply_with(|o, p| resp::verbatim(o, text.as_bytes(), p));
    }

    pub(super) fn client_kill(&mut self, cmd: &Command) {
        let args = cmd.to_args();
        let clients = self.worker.shared.clients.snapshot();
        if args.len() == 3 {
            // Old form: CLIENT KILL addr:port
            let addr = args[2].clone();
            match clients
                .iter()
                .find(|c| c.addr.to_string().as_bytes() == addr.as_ref())
            {
                Some(c) => {
                    self.reply_ok();
                    if c.id == self.info.id {
                        // As Redis: closed once the reply is written.
                        self.closing = true;
                    } else {
                        c.kill();
                    }
                }
                None => self.reply_error("ERR No such client"),
            }
            return;
        }
        let mut id: Option<u64> = None;
        let mut addr: Option<SocketAddr> = None;
        let mut laddr: Option<SocketAddr> = None;
        let mut user: Option<String> = None;
        let mut skipme = true;
        let mut maxage: Option<u64> = None;
        let mut kind: Option<Vec<u8>> = None;
        let mut i = 2;
        while i < args.len() {
            if i + 1 >= args.len() {
                return self.reply_error("ERR syntax error");
            }
            let opt = args[i].to_ascii_lowercase();
            let val = &args[i + 1];
            let text = String::from_utf8_lossy(val).into_owned();
            match opt.as_slice() {
                b"id" => match parse_i64(val) {
                    Some(n) if n > 0 => id = Some(n as u64),
                    _ => return self.reply_error("ERR client-id should be greater than 0"),
                },
                b"addr" => match text.parse() {
                    Ok(a) => addr = Some(a),
                    Err(_) => return self.reply_error("ERR No such client"),
                },
                b"laddr" => match text.parse() {
                    Ok(a) => laddr = Some(a),
                    Err(_) => return self.reply_error("ERR No such client"),
                },
                b"user" => {
                    let known = text == "default"
                        || self
                            .worker
                            .shared
                            .config
                            .users
                            .iter()
                            .any(|u| u.name == text);
                    if !known {
                        return self.reply_error(&format!("ERR No such user '{text}'"));
                    }
                    user = Some(text)
                }
                b"skipme" => match val.to_ascii_lowercase().as_slice() {
                    b"yes" => skipme = true,
                    b"no" => skipme = false,
                    _ => return self.reply_error("ERR syntax error"),
                },
                b"maxage" => match parse_i64(val) {
                    Some(n) if n >= 0 => maxage = Some(n as u64),
                    _ => return self.reply_error("ERR value is not an integer or out of range"),
                },
                b"type" => {
                    let t = val.to_ascii_lowercase();
                    if !matches!(
                        t.as_slice(),
                        b"normal" | b"master" | b"replica" | b"slave" | b"pubsub"
                    ) {
                        let t = String::from_utf8_lossy(val).into_owned();
                        return self.reply_error(&format!("ERR Unknown client type '{t}'"));
                    }
                    kind = Some(t);
                }
                _ => return self.reply_error("ERR syntax error"),
            }
            i += 2;
        }
        let mut killed = 0i64;
        let mut me = false;
        for c in &clients {
            if id.is_some_and(|id| id != c.id)
                || addr.is_some_and(|a| a != c.addr)
                || laddr.is_some_and(|a| a != c.laddr)
                || user
                    .as_ref()
                    .is_some_and(|u| c.user.lock().map(|cu| *cu != *u).unwrap_or(true))
                || maxage.is_some_and(|m| c.created.elapsed().as_secs() < m)
                || kind
                    .as_ref()
                    .is_some_and(|k| !flag::is_type(c.flags.load(Ordering::Relaxed), k))
            {
                continue;
            }
            if c.id == self.info.id {
                if skipme {
                    continue;
                }
                me = true;
            } else {
                c.kill();
            }
            killed += 1;
        }
        self.reply_with(|o, _| resp::int(o, killed));
        if me {
            // As Redis: the killer gets its count, then its connection is closed.
            self.closing = true;
        }
    }
}

/// Compares a password in time that depends on neither its content nor its length: both
/// sides are hashed first (as Redis does) and the digests compared without branching.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    let diff = x
        .iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q));
    std::hint::black_box(diff) == 0
}
