//! One client connection.
//!
//! A session is one task on its worker. It reads whatever the client has sent,
//! parses every complete command in the batch, answers local commands at once
//! and hands the rest to backend connections, keeping a queue of reply slots in
//! request order. Replies are copied into one output buffer as the front of the
//! queue completes and written with as few syscalls as possible. The output
//! buffer is not bounded by the socket, so a client that pipelines thousands of
//! commands before reading never deadlocks respire (as with Redis).
//!
//! Ordering: a session's commands on one backend connection stay in order by
//! construction (FIFO). When the next command must go to a different
//! connection (another database, an exclusive connection for a transaction or
//! a blocking command), the session first waits until every reply it is owed
//! has arrived, so Redis executes the client's commands in the order sent.
//!
//! Subscriptions and `MONITOR` turn the connection into a stream: the session
//! opens a dedicated backend connection and relays frames both ways until the
//! client sends `RESET` or disconnects.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use crate::backend::{self, BackendConn, BackendError, ConnKey, Reply};
use crate::clients::{ClientInfo, flag};
use crate::commands::{self, Kind, Local};
use crate::io::{IoEvent, poll_io, write_now};
use crate::protocol::{self as resp, Command, RequestParser, parse_i64, reply_len};
use crate::server::Worker;

enum Slot {
    /// A reply respire produced while earlier replies were still owed.
    Ready(Bytes),
    /// A reply coming from a backend.
    Waiting { rx: oneshot::Receiver<Reply>, silent: bool },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Shared(ConnKey),
    Exclusive,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// What ended a stream (subscribe / monitor) phase.
enum StreamEnd {
    /// The client is gone or must be closed.
    Close,
    /// The client sent `RESET`: back to normal commands.
    Reset,
}

/// A client connection's state.
pub struct Session {
    worker: Rc<Worker>,
    info: Arc<ClientInfo>,
    stream: TcpStream,
    inbuf: BytesMut,
    out: BytesMut,
    parser: RequestParser,
    queue: VecDeque<Slot>,
    /// Slots in `queue` still waiting for a backend.
    waiting: usize,
    /// Where the commands owed replies went.
    last_target: Option<Target>,
    /// A command that must wait until all owed replies have arrived.
    stalled: Option<Command>,
    /// A command that turns the connection into a stream once nothing is owed.
    stream_start: Option<Command>,
    proto: u8,
    db: u32,
    authenticated: bool,
    shared: Option<(ConnKey, BackendConn)>,
    exclusive: Option<(ConnKey, BackendConn)>,
    /// The exclusive connection's state was changed in ways respire does not track; never reuse it.
    exclusive_dirty: bool,
    in_multi: bool,
    watching: bool,
    reply_mode: ReplyMode,
    /// Stop reading; close once every owed reply is written.
    closing: bool,
    /// Name and first argument of the last command, for `CLIENT LIST`.
    last_name: (Bytes, Option<Bytes>),
}

/// Serves one client connection until it closes.
pub async fn run(worker: Rc<Worker>, stream: TcpStream, info: Arc<ClientInfo>) {
    let authenticated = !worker.shared.config.auth_required();
    let mut s = Session {
        worker,
        info,
        stream,
        inbuf: BytesMut::with_capacity(16 * 1024),
        out: BytesMut::with_capacity(16 * 1024),
        parser: RequestParser::new(),
        queue: VecDeque::new(),
        waiting: 0,
        last_target: None,
        stalled: None,
        stream_start: None,
        proto: 2,
        db: 0,
        authenticated,
        shared: None,
        exclusive: None,
        exclusive_dirty: false,
        in_multi: false,
        watching: false,
        reply_mode: ReplyMode::On,
        closing: false,
        last_name: (Bytes::new(), None),
    };
    s.serve().await;
    s.release_exclusive(true);
    let id = s.info.id;
    s.worker.shared.clients.unregister(id);
    debug!(client = id, "client closed");
}

impl Session {
    fn key(&self) -> ConnKey {
        ConnKey { db: self.db, proto: self.proto }
    }

    async fn serve(&mut self) {
        let mut shutdown = self.worker.shared.shutdown.clone();
        if *shutdown.borrow() {
            self.closing = true;
        }
        let idle = self.worker.shared.config.timeout;
        let mut idle_deadline = Instant::now() + idle;
        loop {
            if self.info.killed.load(Ordering::Relaxed) {
                return;
            }
            self.collect_ready();
            if self.waiting == 0 {
                if let Some(cmd) = self.stalled.take() {
                    self.handle(cmd);
                    self.process_input();
                    continue;
                }
                if let Some(first) = self.stream_start.take() {
                    if !self.flush_all().await {
                        return;
                    }
                    match self.relay_stream(first).await {
                        StreamEnd::Close => return,
                        StreamEnd::Reset => {
                            self.process_input();
                            continue;
                        }
                    }
                }
            }
            if !self.out.is_empty() && !self.try_flush() {
                return;
            }
            if self.closing && self.queue.is_empty() && self.out.is_empty() {
                return;
            }
            let reading = !self.closing && self.stalled.is_none() && self.stream_start.is_none();
            let queue = &mut self.queue;
            let front = async {
                match queue.front_mut() {
                    Some(Slot::Waiting { rx, .. }) => rx.await,
                    _ => std::future::pending().await,
                }
            };
            let (stream, out, inbuf) = (&mut self.stream, &mut self.out, &mut self.inbuf);
            let io = std::future::poll_fn(|cx| poll_io(stream, cx, out, inbuf, reading));
            tokio::select! {
                biased;
                _ = self.info.kill.notified() => return,
                r = front => self.complete_front(r),
                ev = io => match ev {
                    IoEvent::Read => {
                        self.process_input();
                        self.note_activity();
                        idle_deadline = Instant::now() + idle;
                    }
                    IoEvent::Wrote => {}
                    IoEvent::Closed(_) => return,
                },
                _ = shutdown.changed(), if !self.closing => self.closing = true,
                _ = sleep_until(idle_deadline), if !idle.is_zero() && self.waiting == 0 && !self.in_multi && !self.watching => return,
            }
        }
    }

    /// Writes as much of the output as the socket takes now; `false` if the client is gone.
    fn try_flush(&mut self) -> bool {
        if write_now(&self.stream, &mut self.out).is_err() {
            return false;
        }
        if !self.out.is_empty() {
            return true;
        }
        // Keep a modest buffer around instead of a huge one after a big reply.
        if self.out.capacity() > 1024 * 1024 {
            self.out = BytesMut::with_capacity(16 * 1024);
        }
        true
    }

    /// Writes the whole output; `false` if the client is gone.
    async fn flush_all(&mut self) -> bool {
        while !self.out.is_empty() {
            if !self.try_flush() || self.stream.writable().await.is_err() {
                return false;
            }
        }
        true
    }

    fn note_activity(&mut self) {
        let ms = self.info.created.elapsed().as_millis() as u64;
        self.info.last_active_ms.store(ms, Ordering::Relaxed);
        if !self.last_name.0.is_empty() {
            if let Ok(mut c) = self.info.last_cmd.lock() {
                *c = self.last_name.clone();
            }
        }
    }

    fn process_input(&mut self) {
        while !self.closing && self.stalled.is_none() && self.stream_start.is_none() {
            match self.parser.parse(&mut self.inbuf, &self.worker.shared.limits, self.authenticated) {
                Ok(Some(cmd)) => self.handle(cmd),
                Ok(None) => break,
                Err(e) => {
                    debug!(client = self.info.id, error = %e, "protocol error");
                    self.reply_mode = ReplyMode::On;
                    self.reply_error(&e.reply_text());
                    self.closing = true;
                }
            }
        }
    }

    // ---- replies ----------------------------------------------------------

    fn take_silent(&mut self) -> bool {
        match self.reply_mode {
            ReplyMode::On => false,
            ReplyMode::Off => true,
            ReplyMode::SkipNext => {
                self.reply_mode = ReplyMode::On;
                true
            }
        }
    }

    fn reply_with(&mut self, f: impl FnOnce(&mut BytesMut, u8)) {
        if self.take_silent() {
            return;
        }
        if self.queue.is_empty() {
            f(&mut self.out, self.proto);
        } else {
            let mut b = BytesMut::new();
            f(&mut b, self.proto);
            self.queue.push_back(Slot::Ready(b.freeze()));
        }
    }

    fn reply_error(&mut self, msg: &str) {
        self.reply_with(|o, _| resp::error(o, msg));
    }

    fn reply_ok(&mut self) {
        self.reply_with(|o, _| resp::simple(o, "OK"));
    }

    fn append_reply(&mut self, r: Reply) {
        match r {
            Ok(frame) => self.out.extend_from_slice(&frame),
            Err(e) => resp::error(&mut self.out, &e.to_string()),
        }
    }

    fn collect_ready(&mut self) {
        while let Some(front) = self.queue.front_mut() {
            match front {
                Slot::Ready(b) => {
                    self.out.extend_from_slice(b);
                }
                Slot::Waiting { rx, silent } => {
                    let silent = *silent;
                    let r = match rx.try_recv() {
                        Ok(r) => r,
                        Err(oneshot::error::TryRecvError::Empty) => return,
                        Err(oneshot::error::TryRecvError::Closed) => Err(self.lost()),
                    };
                    self.waiting -= 1;
                    if !silent {
                        self.append_reply(r);
                    }
                }
            }
            self.queue.pop_front();
        }
    }

    fn complete_front(&mut self, r: Result<Reply, oneshot::error::RecvError>) {
        if let Some(Slot::Waiting { silent, .. }) = self.queue.pop_front() {
            self.waiting -= 1;
            if !silent {
                let r = r.unwrap_or_else(|_| Err(self.lost()));
                self.append_reply(r);
            }
        }
    }

    fn lost(&self) -> BackendError {
        BackendError::Lost { addr: self.worker.pool.node().addr.clone(), reason: "reply dropped".into() }
    }

    // ---- dispatch ---------------------------------------------------------

    fn handle(&mut self, cmd: Command) {
        let spec = commands::lookup(cmd.name());
        self.last_name = (cmd.args.first().cloned().unwrap_or_default(), cmd.args.get(1).cloned());
        if !self.authenticated && !spec.no_auth {
            self.reply_error("NOAUTH Authentication required.");
            return;
        }
        if self.in_multi {
            // Inside MULTI everything is queued by Redis on the exclusive connection,
            // except what ends the connection or the transaction.
            match spec.kind {
                Kind::Local(Local::Quit) | Kind::Local(Local::Reset) => {}
                Kind::EndTransaction => {
                    if self.forward(cmd, Target::Exclusive, false) {
                        self.set_multi(false);
                        self.watching = false;
                    }
                    return;
                }
                Kind::Local(_) => {
                    if !matches!(spec.kind, Kind::Local(Local::Ping) | Kind::Local(Local::Echo)) {
                        self.exclusive_dirty = true;
                    }
                    self.forward(cmd, Target::Exclusive, false);
                    return;
                }
                _ => {
                    self.forward(cmd, Target::Exclusive, false);
                    return;
                }
            }
        }
        match spec.kind {
            Kind::Forward => {
                let target = if self.exclusive_pinned() { Target::Exclusive } else { Target::Shared(self.key()) };
                self.forward(cmd, target, false);
            }
            Kind::Local(l) => self.local(l, cmd),
            Kind::Multi => {
                if self.forward(cmd, Target::Exclusive, false) {
                    self.set_multi(true);
                }
            }
            Kind::Watch => {
                if self.forward(cmd, Target::Exclusive, false) {
                    self.watching = true;
                }
            }
            Kind::EndTransaction | Kind::Unwatch => {
                let target = if self.exclusive_pinned() { Target::Exclusive } else { Target::Shared(self.key()) };
                if self.forward(cmd, target, false) {
                    self.watching = false;
                }
            }
            Kind::Blocking => {
                self.forward(cmd, Target::Exclusive, true);
            }
            Kind::MaybeBlocking => {
                if commands::has_block_option(&cmd) {
                    self.forward(cmd, Target::Exclusive, true);
                } else {
                    let target = if self.exclusive_pinned() { Target::Exclusive } else { Target::Shared(self.key()) };
                    self.forward(cmd, target, false);
                }
            }
            Kind::Stream => {
                if self.waiting > 0 || self.exclusive_pinned() {
                    if self.exclusive_pinned() {
                        // A subscription cannot share the watched connection; Redis would keep the watch.
                        self.reply_error("ERR respire: SUBSCRIBE and MONITOR are not allowed while keys are WATCHed");
                        return;
                    }
                    self.stalled = Some(cmd);
                } else {
                    self.stream_start = Some(cmd);
                }
            }
            Kind::Unsubscribe => self.unsubscribe_reply(&cmd),
            Kind::Refused(msg) => self.reply_error(msg),
        }
    }

    /// Whether the session must stay on its exclusive connection (a transaction or a watch is open).
    fn exclusive_pinned(&self) -> bool {
        self.exclusive.is_some() && (self.in_multi || self.watching)
    }

    fn set_multi(&mut self, on: bool) {
        self.in_multi = on;
        self.info.set_flag(flag::MULTI, on);
    }

    /// Sends `cmd` to `target`; returns `false` if it had to wait (stalled) instead.
    fn forward(&mut self, cmd: Command, target: Target, blocking: bool) -> bool {
        if self.waiting > 0 && self.last_target != Some(target) {
            self.stalled = Some(cmd);
            return false;
        }
        let conn = match target {
            Target::Shared(key) => {
                if self.exclusive.is_some() && !self.in_multi && !self.watching {
                    self.release_exclusive(false);
                }
                match &self.shared {
                    Some((k, c)) if *k == key => c.clone(),
                    _ => {
                        let c = self.worker.pool.shared(key, self.info.id);
                        self.shared = Some((key, c.clone()));
                        c
                    }
                }
            }
            Target::Exclusive => {
                let key = self.key();
                let pinned = self.in_multi || self.watching;
                if !pinned && self.exclusive.as_ref().is_some_and(|(k, c)| *k != key || !c.is_alive()) {
                    // Held over from an earlier blocking command but for another database or
                    // protocol, or broken: nothing is owed on it (we only get here with
                    // waiting == 0 or the same target), so swap it for a fitting one.
                    self.release_exclusive(false);
                }
                match &self.exclusive {
                    Some((_, c)) => c.clone(),
                    None => {
                        let c = self.worker.pool.checkout(key);
                        self.exclusive = Some((key, c.clone()));
                        self.exclusive_dirty = false;
                        c
                    }
                }
            }
        };
        let rx = conn.send(cmd.to_resp(), 0, blocking);
        let silent = self.take_silent();
        self.queue.push_back(Slot::Waiting { rx, silent });
        self.waiting += 1;
        self.last_target = Some(target);
        true
    }

    /// Gives the exclusive connection back to the pool when it is clean, or drops it (closing it).
    fn release_exclusive(&mut self, session_ending: bool) {
        if let Some((key, conn)) = self.exclusive.take() {
            let clean = self.waiting == 0 && !self.in_multi && !self.watching && !self.exclusive_dirty;
            if clean {
                self.worker.pool.checkin(key, conn);
            }
            // Otherwise dropping the handle closes the connection, which also
            // releases a command still blocked on it.
        }
        if session_ending || self.exclusive.is_none() {
            self.exclusive_dirty = false;
        }
        if self.last_target == Some(Target::Exclusive) && self.waiting == 0 {
            self.last_target = None;
        }
    }

    // ---- local commands ---------------------------------------------------

    fn wrong_args(&mut self, name: &str) {
        self.reply_error(&format!("ERR wrong number of arguments for '{name}' command"));
    }

    fn local(&mut self, which: Local, cmd: Command) {
        let argc = cmd.args.len();
        match which {
            Local::Ping => match argc {
                1 => self.reply_with(|o, _| resp::simple(o, "PONG")),
                2 => {
                    let msg = cmd.args[1].clone();
                    self.reply_with(|o, _| resp::bulk(o, &msg));
                }
                _ => self.wrong_args("ping"),
            },
            Local::Echo => {
                if argc != 2 {
                    return self.wrong_args("echo");
                }
                let msg = cmd.args[1].clone();
                self.reply_with(|o, _| resp::bulk(o, &msg));
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
            Local::Client => self.client(cmd),
        }
    }

    fn reset(&mut self) {
        self.set_multi(false);
        self.watching = false;
        // The exclusive connection may hold a transaction or a watch: close it.
        if let Some((_, conn)) = self.exclusive.take() {
            drop(conn);
        }
        if self.last_target == Some(Target::Exclusive) {
            self.last_target = None;
        }
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
    }

    /// Checks credentials; on success the session is authenticated as `user`.
    fn authenticate(&mut self, user: &[u8], pass: &[u8]) -> bool {
        let cfg = &self.worker.shared.config;
        let ok = if user == b"default" {
            match &cfg.requirepass {
                Some(p) => constant_time_eq(p.as_bytes(), pass),
                // Without requirepass the default user has no password and accepts any.
                None => true,
            }
        } else {
            cfg.users.iter().any(|u| u.name.as_bytes() == user && constant_time_eq(u.password.as_bytes(), pass))
        };
        if ok {
            self.authenticated = true;
            if let Ok(mut u) = self.info.user.lock() {
                *u = String::from_utf8_lossy(user).into_owned();
            }
        }
        ok
    }

    fn auth(&mut self, cmd: &Command) {
        let (user, pass) = match cmd.args.len() {
            2 => (Bytes::from_static(b"default"), cmd.args[1].clone()),
            3 => (cmd.args[1].clone(), cmd.args[2].clone()),
            1 => return self.wrong_args("auth"),
            _ => return self.reply_error("ERR syntax error"),
        };
        if cmd.args.len() == 2 && self.worker.shared.config.requirepass.is_none() {
            return self.reply_error(
                "ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?",
            );
        }
        if self.authenticate(&user, &pass) {
            self.reply_ok();
        } else {
            self.reply_error("WRONGPASS invalid username-password pair or user is disabled.");
        }
    }

    fn hello(&mut self, cmd: &Command) {
        let mut proto = self.proto;
        let mut creds: Option<(Bytes, Bytes)> = None;
        let mut name: Option<Bytes> = None;
        if let Some(v) = cmd.arg(1) {
            match parse_i64(v) {
                Some(n) if (2..=3).contains(&n) => proto = n as u8,
                Some(_) => return self.reply_error("NOPROTO unsupported protocol version"),
                None => return self.reply_error("ERR Protocol version is not an integer or out of range"),
            }
            let mut i = 2;
            while i < cmd.args.len() {
                let opt = &cmd.args[i];
                let more = cmd.args.len() - i - 1;
                if opt.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
                    creds = Some((cmd.args[i + 1].clone(), cmd.args[i + 2].clone()));
                    i += 3;
                } else if opt.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
                    name = Some(cmd.args[i + 1].clone());
                    i += 2;
                } else {
                    let opt = String::from_utf8_lossy(opt).into_owned();
                    return self.reply_error(&format!("ERR Syntax error in HELLO option '{opt}'"));
                }
            }
        }
        if let Some((user, pass)) = creds {
            if !self.authenticate(&user, &pass) {
                return self.reply_error("WRONGPASS invalid username-password pair or user is disabled.");
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
        if proto != self.proto && self.exclusive_pinned() {
            return self.reply_error("ERR respire: HELLO cannot change the protocol while keys are WATCHed");
        }
        self.proto = proto;
        self.info.resp.store(proto, Ordering::Relaxed);
        let id = self.info.id as i64;
        let version = backend::backend_version();
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
            resp::bulk(o, b"standalone");
            resp::bulk(o, b"role");
            resp::bulk(o, b"master");
            resp::bulk(o, b"modules");
            resp::array_header(o, 0);
        });
    }

    fn select(&mut self, cmd: Command) {
        if cmd.args.len() != 2 {
            return self.wrong_args("select");
        }
        let Some(db) = parse_i64(&cmd.args[1]).filter(|n| i32::try_from(*n).is_ok()) else {
            return self.reply_error("ERR value is not an integer or out of range");
        };
        if db < 0 || db >= i64::from(self.worker.shared.config.databases) {
            return self.reply_error("ERR DB index is out of range");
        }
        let db = db as u32;
        if self.exclusive_pinned() {
            // Keep the watched connection on the same database as the session.
            if self.forward(cmd, Target::Exclusive, false) {
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
    fn set_name(&mut self, name: Bytes) -> bool {
        if name.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
            self.reply_error("ERR Client names cannot contain spaces, newlines or special characters.");
            return false;
        }
        if let Ok(mut n) = self.info.name.lock() {
            *n = name;
        }
        true
    }

    fn client(&mut self, cmd: Command) {
        let Some(sub) = cmd.arg(1).map(|s| s.to_ascii_lowercase()) else {
            return self.wrong_args("client");
        };
        let argc = cmd.args.len();
        let arity_error = |s: &mut Self| s.wrong_args(&format!("client|{}", String::from_utf8_lossy(&sub)));
        match sub.as_slice() {
            b"id" if argc == 2 => {
                let id = self.info.id as i64;
                self.reply_with(|o, _| resp::int(o, id));
            }
            b"getname" if argc == 2 => {
                let name = self.info.name.lock().map(|n| n.clone()).unwrap_or_default();
                self.reply_with(|o, p| if name.is_empty() { resp::null(o, p) } else { resp::bulk(o, &name) });
            }
            b"setname" if argc == 3 => {
                if self.set_name(cmd.args[2].clone()) {
                    self.reply_ok();
                }
            }
            b"info" if argc == 2 => {
                self.note_activity();
                let line = format!("{}\n", self.info.line());
                self.reply_with(|o, p| resp::verbatim(o, line.as_bytes(), p));
            }
            b"list" => {
                self.note_activity();
                self.client_list(&cmd);
            }
            b"kill" if argc >= 3 => self.client_kill(&cmd),
            b"setinfo" if argc == 4 => {
                let attr = cmd.args[2].to_ascii_lowercase();
                let value = cmd.args[3].clone();
                let slot = match attr.as_slice() {
                    b"lib-name" => &self.info.lib_name,
                    b"lib-ver" => &self.info.lib_ver,
                    _ => {
                        let a = String::from_utf8_lossy(&cmd.args[2]).into_owned();
                        return self.reply_error(&format!("ERR Unrecognized option '{a}'"));
                    }
                };
                if value.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
                    let a = String::from_utf8_lossy(&attr).into_owned();
                    return self.reply_error(&format!("ERR {a} cannot contain spaces, newlines or special characters."));
                }
                if let Ok(mut s) = slot.lock() {
                    *s = value;
                }
                self.reply_ok();
            }
            b"reply" if argc == 3 => {
                let mode = cmd.args[2].to_ascii_lowercase();
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
                let v = cmd.args[2].to_ascii_lowercase();
                if v == b"on" || v == b"off" {
                    self.reply_ok();
                } else {
                    self.reply_error("ERR syntax error");
                }
            }
            b"getredir" if argc == 2 => self.reply_with(|o, _| resp::int(o, -1)),
            b"tracking" | b"caching" | b"unblock" => {
                let s = String::from_utf8_lossy(&sub).to_uppercase();
                self.reply_error(&format!("ERR respire: CLIENT {s} is not supported through the proxy"));
            }
            b"id" | b"getname" | b"setname" | b"info" | b"kill" | b"setinfo" | b"reply" | b"no-evict" | b"no-touch"
            | b"getredir" => arity_error(self),
            // PAUSE, UNPAUSE, HELP, TRACKINGINFO and anything newer go to Redis.
            _ => {
                let target = if self.exclusive_pinned() { Target::Exclusive } else { Target::Shared(self.key()) };
                self.forward(cmd, target, false);
            }
        }
    }

    fn client_list(&mut self, cmd: &Command) {
        let mut ids: Option<Vec<u64>> = None;
        let mut kind: Option<Vec<u8>> = None;
        let mut i = 2;
        while i < cmd.args.len() {
            let opt = cmd.args[i].to_ascii_lowercase();
            if opt == b"type" && i + 1 < cmd.args.len() {
                let t = cmd.args[i + 1].to_ascii_lowercase();
                if !matches!(t.as_slice(), b"normal" | b"master" | b"replica" | b"slave" | b"pubsub") {
                    let t = String::from_utf8_lossy(&cmd.args[i + 1]).into_owned();
                    return self.reply_error(&format!("ERR Unknown client type '{t}'"));
                }
                kind = Some(t);
                i += 2;
            } else if opt == b"id" && i + 1 < cmd.args.len() {
                let mut list = Vec::new();
                for a in &cmd.args[i + 1..] {
                    match parse_i64(a) {
                        Some(n) if n > 0 => list.push(n as u64),
                        _ => return self.reply_error("ERR Invalid client ID"),
                    }
                }
                ids = Some(list);
                i = cmd.args.len();
            } else {
                return self.reply_error("ERR syntax error");
            }
        }
        let mut text = String::new();
        for c in self.worker.shared.clients.snapshot() {
            if ids.as_ref().is_some_and(|ids| !ids.contains(&c.id)) {
                continue;
            }
            if let Some(k) = &kind {
                let pubsub = c.flags.load(Ordering::Relaxed) & flag::PUBSUB != 0;
                let ok = match k.as_slice() {
                    b"normal" => !pubsub,
                    b"pubsub" => pubsub,
                    _ => false,
                };
                if !ok {
                    continue;
                }
            }
            text.push_str(&c.line());
            text.push('\n');
        }
        self.reply_with(|o, p| resp::verbatim(o, text.as_bytes(), p));
    }

    fn client_kill(&mut self, cmd: &Command) {
        let clients = self.worker.shared.clients.snapshot();
        if cmd.args.len() == 3 {
            // Old form: CLIENT KILL addr:port
            let addr = cmd.args[2].clone();
            match clients.iter().find(|c| c.addr.to_string().as_bytes() == addr.as_ref()) {
                Some(c) => {
                    c.kill();
                    self.reply_ok();
                    if c.id == self.info.id {
                        self.closing = true;
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
        while i < cmd.args.len() {
            if i + 1 >= cmd.args.len() {
                return self.reply_error("ERR syntax error");
            }
            let opt = cmd.args[i].to_ascii_lowercase();
            let val = &cmd.args[i + 1];
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
                b"user" => user = Some(text),
                b"skipme" => match val.to_ascii_lowercase().as_slice() {
                    b"yes" => skipme = true,
                    b"no" => skipme = false,
                    _ => return self.reply_error("ERR syntax error"),
                },
                b"maxage" => match parse_i64(val) {
                    Some(n) if n >= 0 => maxage = Some(n as u64),
                    _ => return self.reply_error("ERR value is not an integer or out of range"),
                },
                b"type" => kind = Some(val.to_ascii_lowercase()),
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
                || user.as_ref().is_some_and(|u| c.user.lock().map(|cu| *cu != *u).unwrap_or(true))
                || maxage.is_some_and(|m| c.created.elapsed().as_secs() < m)
                || kind.as_ref().is_some_and(|k| {
                    let pubsub = c.flags.load(Ordering::Relaxed) & flag::PUBSUB != 0;
                    !(k.as_slice() == b"normal" && !pubsub || k.as_slice() == b"pubsub" && pubsub)
                })
            {
                continue;
            }
            if c.id == self.info.id {
                if skipme {
                    continue;
                }
                me = true;
            }
            c.kill();
            killed += 1;
        }
        self.reply_with(|o, _| resp::int(o, killed));
        if me {
            self.closing = true;
        }
    }

    fn unsubscribe_reply(&mut self, cmd: &Command) {
        let kind = commands::display_name(cmd.name());
        let channels: Vec<Bytes> = cmd.args[1..].to_vec();
        self.reply_with(|o, p| {
            if channels.is_empty() {
                resp::push_header(o, 3, p);
                resp::bulk(o, kind.as_bytes());
                resp::null(o, p);
                resp::int(o, 0);
            }
            for ch in &channels {
                resp::push_header(o, 3, p);
                resp::bulk(o, kind.as_bytes());
                resp::bulk(o, ch);
                resp::int(o, 0);
            }
        });
    }

    // ---- streams (subscribe, monitor) -------------------------------------

    /// Relays between the client and a dedicated backend connection.
    async fn relay_stream(&mut self, first: Command) -> StreamEnd {
        // Give back a clean exclusive connection; a stream needs its own.
        self.release_exclusive(false);
        let node = self.worker.pool.node().clone();
        let backend = match backend::connect(&node, self.key()).await {
            Ok(s) => s,
            Err(reason) => {
                let e = BackendError::Unavailable { addr: node.addr.clone(), reason };
                self.reply_error(&e.to_string());
                return StreamEnd::Reset;
            }
        };
        self.info.set_flag(flag::PUBSUB, true);
        let mut shutdown = self.worker.shared.shutdown.clone();
        let mut to_backend = BytesMut::new();
        let mut from_backend = BytesMut::with_capacity(16 * 1024);
        first.encode_into(&mut to_backend);
        let end = loop {
            // Client commands go to the backend, except the few respire must answer.
            let mut reset = false;
            while !self.closing {
                match self.parser.parse(&mut self.inbuf, &self.worker.shared.limits, self.authenticated) {
                    Ok(Some(cmd)) => match commands::lookup(cmd.name()).kind {
                        Kind::Local(Local::Quit) => {
                            resp::simple(&mut self.out, "OK");
                            self.closing = true;
                        }
                        Kind::Local(Local::Reset) => {
                            reset = true;
                            break;
                        }
                        Kind::Local(Local::Auth) | Kind::Local(Local::Client) => {
                            resp::error(&mut self.out, "ERR respire: AUTH and CLIENT are not available in subscribe or monitor mode");
                        }
                        _ => cmd.encode_into(&mut to_backend),
                    },
                    Ok(None) => break,
                    Err(e) => {
                        resp::error(&mut self.out, &e.reply_text());
                        self.closing = true;
                    }
                }
            }
            if reset {
                self.reset();
                resp::simple(&mut self.out, "RESET");
                break StreamEnd::Reset;
            }
            while !to_backend.is_empty() {
                match backend.try_write(&to_backend) {
                    Ok(n) => {
                        let _ = to_backend.split_to(n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        resp::error(&mut self.out, "ERR respire: connection to backend was lost; subscriptions ended");
                        self.closing = true;
                        break;
                    }
                }
            }
            if !self.try_flush() {
                break StreamEnd::Close;
            }
            if self.closing {
                let _ = self.flush_all().await;
                break StreamEnd::Close;
            }
            tokio::select! {
                biased;
                _ = self.info.kill.notified() => break StreamEnd::Close,
                _ = shutdown.changed() => break StreamEnd::Close,
                r = backend.readable() => {
                    if r.is_err() {
                        break StreamEnd::Close;
                    }
                    from_backend.reserve(16 * 1024);
                    match backend.try_read_buf(&mut from_backend) {
                        Ok(0) => {
                            resp::error(&mut self.out, "ERR respire: connection to backend was lost; subscriptions ended");
                            self.closing = true;
                        }
                        Ok(_) => loop {
                            match reply_len(&from_backend) {
                                Ok(Some(n)) => {
                                    let frame = from_backend.split_to(n);
                                    self.out.extend_from_slice(&frame);
                                }
                                Ok(None) => break,
                                Err(_) => {
                                    self.closing = true;
                                    break;
                                }
                            }
                        },
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => self.closing = true,
                    }
                }
                r = self.stream.writable(), if !self.out.is_empty() => {
                    if r.is_err() {
                        break StreamEnd::Close;
                    }
                }
                r = backend.writable(), if !to_backend.is_empty() => {
                    if r.is_err() {
                        break StreamEnd::Close;
                    }
                }
                r = self.stream.readable() => {
                    if r.is_err() {
                        break StreamEnd::Close;
                    }
                    self.inbuf.reserve(16 * 1024);
                    match self.stream.try_read_buf(&mut self.inbuf) {
                        Ok(0) => break StreamEnd::Close,
                        Ok(_) => self.note_activity(),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break StreamEnd::Close,
                    }
                }
            }
        };
        self.info.set_flag(flag::PUBSUB, false);
        end
    }
}

/// Compares secrets in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
