//! Connections to backend Redis servers.
//!
//! A [`BackendConn`] is a handle to one TCP connection owned by a task on the
//! worker's thread. Sessions send it requests (raw RESP bytes plus a one-shot
//! reply slot); the task appends everything queued since it last ran to one
//! write buffer and writes it with one syscall, so a pipelined batch from many
//! clients costs one write. Replies are matched to requests first-in,
//! first-out and handed back as zero-copy slices of the read buffer.
//!
//! Shared connections (one per node, database and protocol version, per
//! worker, a few at most) carry the traffic of every session. Exclusive
//! connections are checked out by one session for state that cannot be
//! shared (transactions, blocking commands) and returned only when clean.
//!
//! A shared connection reconnects by itself with exponential backoff and
//! jitter; while its node is unreachable, requests fail at once with a clear
//! error rather than queueing without bound.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::channel::{self, QueueReceiver, QueueSender, TryRecvError};
use crate::io::{IoEvent, Stream, poll_io, write_now};
use crate::protocol::{self, Value};

/// Why a request got no reply from its backend.
#[derive(Debug, Error, Clone)]
pub enum BackendError {
    /// The node could not be reached; the request was never sent.
    #[error("ERR respire: backend {addr} is unavailable ({reason})")]
    Unavailable {
        /// The node.
        addr: Arc<str>,
        /// What went wrong.
        reason: String,
    },
    /// The connection broke after the request was sent: it may or may not have run.
    #[error(
        "ERR respire: connection to backend {addr} was lost ({reason}); the command may or may not have run"
    )]
    Lost {
        /// The node.
        addr: Arc<str>,
        /// What went wrong.
        reason: String,
    },
}

/// A reply: the complete RESP frame from the backend, or why there is none.
pub type Reply = Result<Bytes, BackendError>;

/// Where a backend connection delivers a request's reply.
pub type ReplyTx = channel::Sender<Reply>;

/// A reply on its way: from a backend connection of this worker, or from another
/// thread (a response-cache fill that another worker's client is waiting for).
pub enum ReplyRx {
    /// From a connection of this worker.
    Local(channel::Receiver<Reply>),
    /// From another thread.
    Remote(tokio::sync::oneshot::Receiver<Reply>),
}

impl ReplyRx {
    /// The reply if it is there.
    pub fn try_recv(&mut self) -> Result<Reply, TryRecvError> {
        match self {
            ReplyRx::Local(rx) => rx.try_recv(),
            ReplyRx::Remote(rx) => rx.try_recv().map_err(|e| match e {
                tokio::sync::oneshot::error::TryRecvError::Empty => TryRecvError::Empty,
                tokio::sync::oneshot::error::TryRecvError::Closed => TryRecvError::Closed,
            }),
        }
    }
}

impl std::future::Future for ReplyRx {
    type Output = Result<Reply, channel::RecvError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            ReplyRx::Local(rx) => std::pin::Pin::new(rx).poll(cx),
            ReplyRx::Remote(rx) => std::pin::Pin::new(rx)
                .poll(cx)
                .map(|r| r.map_err(|_| channel::RecvError)),
        }
    }
}

/// The replies of a group of commands sent as one request (see [`BackendConn::send_group`]).
pub type GroupReply = Result<GroupFrames, BackendError>;

/// A group's replies.
pub struct GroupFrames {
    /// Their frames, back to back.
    pub bytes: Bytes,
    /// A bit per command (the first at bit 0), set when its reply is an error.
    pub errors: u64,
    /// Where each frame ends in `bytes`, when asked for.
    pub ends: Vec<u32>,
}

impl GroupFrames {
    /// The frame of reply `i`, when the ends were asked for.
    pub fn frame(&self, i: usize) -> Option<Bytes> {
        frame_at(&self.bytes, &self.ends, i)
    }
}

/// Reply `i` of replies lying back to back in `bytes`, where each ends at `ends`.
pub fn frame_at(bytes: &Bytes, ends: &[u32], i: usize) -> Option<Bytes> {
    let end = *ends.get(i)? as usize;
    let start = if i == 0 {
        0
    } else {
        *ends.get(i - 1)? as usize
    };
    (start <= end && end <= bytes.len()).then(|| bytes.slice(start..end))
}

/// Where a backend connection delivers a group's replies.
pub type GroupTx = channel::Sender<GroupReply>;

/// The most commands a group may hold (at most 64: one bit each in [`GroupFrames`]). A
/// group's replies stay in respire until all have arrived, so this also bounds how many big
/// values one group holds at once (a client's batch of 16 is one group).
pub const MAX_GROUP: usize = 16;

/// Where a request's reply goes.
pub enum Sink {
    /// One reply.
    One(ReplyTx),
    /// The replies of several commands, delivered together.
    Group(Box<GroupSink>),
}

/// Where a group's replies go, and how far they have arrived.
pub struct GroupSink {
    tx: GroupTx,
    /// Its commands.
    count: u8,
    /// Say where each reply ends.
    want_ends: bool,
    /// Replies counted so far, where they end in the read buffer, which are errors, and
    /// those set aside when a push frame came between them.
    got: u8,
    scanned: usize,
    errors: u64,
    partial: Option<BytesMut>,
    /// The reply bytes so far, and where each reply ends (when asked for).
    taken: u32,
    ends: Vec<u32>,
}

impl GroupSink {
    fn new(tx: GroupTx, count: u8, want_ends: bool) -> GroupSink {
        GroupSink {
            tx,
            count,
            want_ends,
            got: 0,
            scanned: 0,
            errors: 0,
            partial: None,
            taken: 0,
            ends: Vec::new(),
        }
    }
}

impl Sink {
    /// Delivers a failure.
    fn fail(self, e: BackendError) {
        match self {
            Sink::One(tx) => tx.send(Err(e)),
            Sink::Group(g) => g.tx.send(Err(e)),
        }
    }
}

/// A reply channel of this worker.
pub fn reply_channel() -> (ReplyTx, ReplyRx) {
    let (tx, rx) = channel::oneshot();
    (tx, ReplyRx::Local(rx))
}

/// What a session hands a backend connection.
pub struct Request {
    /// One or more RESP commands.
    pub data: Bytes,
    /// How many replies to drop before the one that answers this request (for prefixes such as `ASKING`).
    pub skip: u8,
    /// Blocking commands are exempt from the command timeout.
    pub blocking: bool,
    /// Where the reply goes.
    pub reply: Sink,
}

/// How to reach and log in to one backend node.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// "host:port"
    pub addr: Arc<str>,
    /// ACL user for `HELLO … AUTH`.
    pub username: Option<String>,
    /// Password for `HELLO … AUTH`.
    pub password: Option<String>,
    /// TCP connect plus handshake deadline.
    pub connect_timeout: Duration,
    /// Deadline for a non-blocking command's reply.
    pub command_timeout: Duration,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Send `READONLY` after connecting (Redis Cluster, `read_from` other than `master`: lets
    /// replicas serve reads; a no-op on masters until one becomes a replica).
    pub readonly: bool,
    /// TLS to the node, when configured.
    pub tls: Option<Arc<crate::tls::ClientTls>>,
}

/// Which logical connection state a backend connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Selected database.
    pub db: u32,
    /// RESP version negotiated with `HELLO`.
    pub proto: u8,
    /// 0: the commands' connections. 1 to [`SCRIPT_LANES`]: the lanes of scripts and
    /// functions (`EVAL`, `FCALL`, …), shared connections of their own, so that a script
    /// running past Redis's `busy-reply-threshold` holds no other command behind it (the
    /// others get `-BUSY` from Redis, as its clients do). Scripts take lane 1, or the next
    /// when a script has held the one before for [`LANE_HELD`], so that they too get
    /// Redis's answer (`-BUSY`) instead of waiting behind it.
    pub lane: u8,
}

/// The scripts' lanes per database and protocol (see [`ConnKey::lane`]).
pub const SCRIPT_LANES: u8 = 3;

/// How long a scripts' lane may wait on its oldest request, without a byte of reply, before
/// the next script takes the next lane. Shorter than any useful `busy-reply-threshold`:
/// until that threshold Redis answers no one, so a script sent on another lane waits as
/// long as behind the long one; past it, Redis answers it `-BUSY`.
pub const LANE_HELD: Duration = Duration::from_millis(20);

impl ConnKey {
    /// The key of database `db` with protocol `proto`, not a scripts' lane.
    pub const fn new(db: u32, proto: u8) -> ConnKey {
        ConnKey { db, proto, lane: 0 }
    }
}

/// The version the backend reported in its `HELLO` reply, for respire's own `HELLO` replies.
static BACKEND_VERSION: Mutex<Option<String>> = Mutex::new(None);

/// The Redis version of the backend, once a connection has learnt it.
pub fn backend_version() -> String {
    BACKEND_VERSION
        .lock()
        .ok()
        .and_then(|v| v.clone())
        .unwrap_or_else(|| "7.0.0".to_string())
}

/// Opens the transport to a node: TCP, and TLS when configured (no Redis handshake).
pub async fn open(node: &NodeSettings) -> Result<Stream, String> {
    let tcp = TcpStream::connect(&*node.addr)
        .await
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    match &node.tls {
        None => Ok(Stream::Tcp(tcp)),
        Some(tls) => Ok(Stream::TlsClient(Box::new(
            tls.connect(&node.addr, tcp).await?,
        ))),
    }
}

/// Opens a connection and performs the handshake: `HELLO proto [AUTH …] SETNAME respire`
/// (one command that Redis runs even while a script is busy, so that `SCRIPT KILL` can get
/// through on a new connection), then `SELECT db`.
pub async fn connect(node: &NodeSettings, key: ConnKey) -> Result<Stream, String> {
    connect_with_id(node, key).await.map(|(stream, _)| stream)
}

/// The name of the connections that carry clients' commands (and `MONITOR` feeds).
pub const CLIENTS_NAME: &str = "respire";

/// The name of respire's own connections (topology, the command table, probes, tracking):
/// what they send is not a client's, and `MONITOR` through respire leaves it out.
pub const INTERNAL_NAME: &str = "respire-internal";

/// The health check of an idle client connection to Redis: a `PING` with an argument of its
/// own, so that `MONITOR` through respire can leave it out (it is not a client's).
pub const HEALTH_PING: &[u8] = b"*2\r\n$4\r\nPING\r\n$14\r\nrespire-health\r\n";

/// How [`HEALTH_PING`] shows in `MONITOR`, after the client's address.
pub const HEALTH_PING_LINE: &[u8] = b"] \"PING\" \"respire-health\"\r\n";

/// [`connect`] for one of respire's own connections (named [`INTERNAL_NAME`]).
pub async fn connect_internal(node: &NodeSettings, key: ConnKey) -> Result<Stream, String> {
    connect_named(node, key, INTERNAL_NAME)
        .await
        .map(|(stream, _)| stream)
}

/// [`connect`], with the connection's client id on the server (from `HELLO`; 0 if absent).
pub async fn connect_with_id(node: &NodeSettings, key: ConnKey) -> Result<(Stream, i64), String> {
    connect_named(node, key, CLIENTS_NAME).await
}

/// [`connect_with_id`] with the connection's name.
async fn connect_named(
    node: &NodeSettings,
    key: ConnKey,
    name: &str,
) -> Result<(Stream, i64), String> {
    let fut = async {
        let mut stream = open(node).await?;
        let mut out = BytesMut::new();
        let proto = key.proto.to_string();
        match &node.password {
            Some(pass) => {
                let user = node.username.as_deref().unwrap_or("default");
                protocol::encode_args(
                    &mut out,
                    &["HELLO", &proto, "AUTH", user, pass, "SETNAME", name],
                );
            }
            None => protocol::encode_args(&mut out, &["HELLO", &proto, "SETNAME", name]),
        }
        let mut expected = 1;
        if node.readonly {
            protocol::encode_args(&mut out, &["READONLY"]);
            expected += 1;
        }
        if key.db != 0 {
            protocol::encode_args(&mut out, &["SELECT", &key.db.to_string()]);
            expected += 1;
        }
        stream.send(&out).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(1024);
        let mut id = 0;
        for i in 0..expected {
            let frame = read_frame(&mut stream, &mut buf).await?;
            match Value::parse(&frame).map_err(|e| e.to_string())? {
                Value::Error(e) => return Err(String::from_utf8_lossy(&e).into_owned()),
                hello if i == 0 => {
                    id = hello.get("id").and_then(|v| v.as_int()).unwrap_or(0);
                    if let Some(v) = hello.get("version").and_then(|v| v.as_bytes()) {
                        if let Ok(mut slot) = BACKEND_VERSION.lock() {
                            *slot = Some(String::from_utf8_lossy(v).into_owned());
                        }
                    }
                }
                _ => {}
            }
        }
        if !buf.is_empty() {
            return Err("unexpected data after handshake".into());
        }
        Ok((stream, id))
    };
    match timeout(node.connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", node.connect_timeout)),
    }
}

/// Reads one complete reply frame.
pub async fn read_frame(stream: &mut Stream, buf: &mut BytesMut) -> Result<Bytes, String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(frame) = protocol::next_reply(buf).map_err(|e| e.to_string())? {
            return Ok(frame);
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("connection closed by the server".into());
        }
    }
}

/// Whether a connection is shared by many sessions or owned by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reconnects by itself; lives as long as the worker.
    Shared,
    /// Owned by one session; ends when it breaks or its handle is dropped.
    Exclusive,
}

struct ConnState {
    /// The task is running (an exclusive connection that broke is not).
    alive: Cell<bool>,
    /// A TCP connection is established and handshaken.
    connected: Cell<bool>,
    /// While the node cannot be reached (between reconnect attempts): the error that
    /// requests get at once instead of queueing.
    failing: RefCell<Option<BackendError>>,
    /// The connection's client id on the server (0 until connected), for `CLIENT UNBLOCK`
    /// from any worker.
    id: Arc<AtomicI64>,
    /// No client's state is on it — a shared connection, or an exclusive one waiting in its
    /// pool — so an idle moment may be checked with [`HEALTH_PING`]. A checked-out one may hold
    /// a client's `MULTI`, where Redis would queue the check into the transaction.
    pooled: Cell<bool>,
    /// An exclusive connection's place among its pool's checkouts, until its first write
    /// after the checkout (see [`Turns`]).
    turn: Cell<Option<Turn>>,
    /// A scripts' lane's (see [`ConnKey::lane`]), while requests are in flight: when it will
    /// count as held, [`LANE_HELD`] after it last made progress (a request sent while none
    /// was in flight, or reply bytes read).
    held_from: Cell<Option<Instant>>,
}

/// The order in which a worker's exclusive connections to one node were checked out. Each
/// checkout takes a turn, and the connection writes its first request only when every
/// earlier turn is done: written (and settled, see `SETTLE`), failed, or given back unused.
/// A blocking command sent before another client's then reaches Redis first even when its
/// connection was still shaking hands and the other's was not, or finished later (Redis
/// writes the replies of one event-loop turn in reverse order, so handshakes started
/// together end in reverse).
#[derive(Default)]
struct Turns {
    issued: Cell<u64>,
    /// Turns taken and not done yet.
    open: RefCell<BTreeSet<u64>>,
    done: tokio::sync::Notify,
}

/// One checkout's turn (see [`Turns`]); done when dropped.
struct Turn {
    turns: Rc<Turns>,
    n: u64,
}

impl Turns {
    fn take(self: &Rc<Self>) -> Turn {
        let n = self.issued.get();
        self.issued.set(n + 1);
        self.open.borrow_mut().insert(n);
        Turn {
            turns: self.clone(),
            n,
        }
    }
}

impl Turn {
    /// Until every earlier turn is done.
    async fn wait(&self) {
        loop {
            let done = self.turns.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.turns.open.borrow().first() == Some(&self.n) {
                return;
            }
            done.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.turns.open.borrow_mut().remove(&self.n);
        self.turns.done.notify_waiters();
    }
}

/// A handle to one pipelined backend connection. The connection's task ends (closing
/// the connection) when the last handle is dropped.
#[derive(Clone)]
pub struct BackendConn {
    tx: QueueSender<Request>,
    state: Rc<ConnState>,
    node: Rc<NodeSettings>,
}

impl BackendConn {
    /// Starts the connection's task on the current worker (connects on first use).
    pub fn spawn(node: Rc<NodeSettings>, key: ConnKey, mode: Mode) -> BackendConn {
        Self::start(node, key, mode, false)
    }

    /// An exclusive connection that connects now rather than on its first request: a spare,
    /// ready when a blocking command needs it.
    pub fn spawn_connected(node: Rc<NodeSettings>, key: ConnKey) -> BackendConn {
        Self::start(node, key, Mode::Exclusive, true)
    }

    fn start(node: Rc<NodeSettings>, key: ConnKey, mode: Mode, eager: bool) -> BackendConn {
        let (tx, rx) = channel::queue();
        let state = Rc::new(ConnState {
            alive: Cell::new(true),
            connected: Cell::new(false),
            failing: RefCell::new(None),
            id: Arc::new(AtomicI64::new(0)),
            // A spare (connected at once) waits in the pool; another exclusive one is taken.
            pooled: Cell::new(mode == Mode::Shared || eager),
            turn: Cell::new(None),
            held_from: Cell::new(None),
        });
        tokio::task::spawn_local(run(node.clone(), key, mode, eager, rx, state.clone()));
        BackendConn { tx, state, node }
    }

    /// Queues a request; the reply arrives on the returned receiver.
    pub fn send(&self, data: Bytes, skip: u8, blocking: bool) -> ReplyRx {
        let (reply, rx) = reply_channel();
        self.send_to(data, skip, blocking, reply);
        rx
    }

    /// Queues a request whose reply goes to `reply`.
    pub fn send_to(&self, data: Bytes, skip: u8, blocking: bool, reply: ReplyTx) {
        self.push(data, skip, blocking, Sink::One(reply));
    }

    /// Queues `count` (at most [`MAX_GROUP`]) commands, not blocking ones, as one request:
    /// their replies arrive together on `reply`, split off the connection's input once;
    /// `ends`: say where each reply ends.
    pub fn send_group(&self, data: Bytes, count: u8, ends: bool, reply: GroupTx) {
        let sink = GroupSink::new(reply, count, ends);
        self.push(data, 0, false, Sink::Group(Box::new(sink)));
    }

    fn push(&self, data: Bytes, skip: u8, blocking: bool, reply: Sink) {
        if !self.state.alive.get() {
            return reply.fail(BackendError::Unavailable {
                addr: self.node.addr.clone(),
                reason: "connection closed".into(),
            });
        }
        if let Some(e) = self.state.failing.borrow().as_ref() {
            // The node is unreachable: fail at once rather than pile requests up.
            return reply.fail(e.clone());
        }
        self.tx.push(Request {
            data,
            skip,
            blocking,
            reply,
        });
    }

    /// The connection's client id on the server, once connected (0 before).
    pub fn server_id(&self) -> Arc<AtomicI64> {
        self.state.id.clone()
    }

    /// The task is still running.
    pub fn is_alive(&self) -> bool {
        self.state.alive.get()
    }

    /// The connection is established.
    pub fn is_connected(&self) -> bool {
        self.state.connected.get()
    }

    /// Gives up this checkout's turn (see [`Pool::checkout`]): for a request sent later (a
    /// retry after a delay), which must not hold up the other checkouts' first writes.
    pub fn pass_turn(&self) {
        drop(self.state.turn.take());
    }

    /// Whether a scripts' lane has waited [`LANE_HELD`] or more on its oldest request,
    /// without a byte of reply, at `now` (never on other connections).
    pub fn is_held(&self, now: Instant) -> bool {
        self.state.held_from.get().is_some_and(|t| now >= t)
    }
}

async fn run(
    node: Rc<NodeSettings>,
    key: ConnKey,
    mode: Mode,
    eager: bool,
    mut rx: QueueReceiver<Request>,
    state: Rc<ConnState>,
) {
    let mut backoff = node.reconnect_min;
    let mut failures = 0u32;
    // Connect lazily (but a spare): wait for the first request.
    let mut first: Option<Request> = if eager {
        None
    } else {
        match rx.recv().await {
            Some(r) => Some(r),
            None => {
                state.alive.set(false);
                return;
            }
        }
    };
    loop {
        let stats = crate::metrics::backend_stats();
        match connect_with_id(&node, key).await {
            Ok((stream, id)) => {
                state.id.store(id, Ordering::Relaxed);
                stats.connects.with_label_values(&[&node.addr, "ok"]).inc();
                let open = stats.connections.with_label_values(&[&node.addr]);
                open.inc();
                if failures > 0 {
                    info!(backend = %node.addr, "backend reachable again");
                }
                failures = 0;
                backoff = node.reconnect_min;
                state.connected.set(true);
                let end = serve(
                    &node,
                    stream,
                    id,
                    &mut rx,
                    first.take(),
                    &state,
                    key.lane > 0,
                )
                .await;
                state.held_from.set(None);
                state.connected.set(false);
                open.dec();
                match end {
                    End::HandleDropped => break,
                    End::Failed(reason) => {
                        let why = if reason.starts_with("no reply within") {
                            "timeout"
                        } else if reason.contains("closed") {
                            "closed"
                        } else {
                            "error"
                        };
                        stats.lost.with_label_values(&[&node.addr, why]).inc();
                        warn!(backend = %node.addr, db = key.db, %reason, "backend connection lost");
                        if mode == Mode::Exclusive {
                            break;
                        }
                    }
                }
            }
            Err(reason) => {
                stats
                    .connects
                    .with_label_values(&[&node.addr, "error"])
                    .inc();
                failures += 1;
                if failures == 1 {
                    warn!(backend = %node.addr, %reason, "cannot connect to backend");
                } else {
                    debug!(backend = %node.addr, %reason, failures, "reconnect failed");
                }
                let err = BackendError::Unavailable {
                    addr: node.addr.clone(),
                    reason,
                };
                if let Some(req) = first.take() {
                    req.reply.fail(err.clone());
                }
                while let Some(req) = rx.try_recv() {
                    req.reply.fail(err.clone());
                }
                if mode == Mode::Exclusive {
                    break;
                }
                // Back off with jitter; meanwhile requests fail at once instead of piling up.
                let delay = backoff.mul_f64(0.5 + fastrand::f64());
                backoff = (backoff * 2).min(node.reconnect_max);
                *state.failing.borrow_mut() = Some(err.clone());
                let deadline = Instant::now() + delay;
                loop {
                    tokio::select! {
                        _ = sleep_until(deadline) => break,
                        req = rx.recv() => match req {
                            Some(req) => req.reply.fail(err.clone()),
                            None => { state.alive.set(false); return; }
                        }
                    }
                }
                *state.failing.borrow_mut() = None;
                // A request that arrived as the pause ended goes with the next attempt.
                first = rx.try_recv();
            }
        }
    }
    state.alive.set(false);
    // A turn not used (the connection failed first) lets the later ones go.
    drop(state.turn.take());
    for req in rx.drain() {
        req.reply.fail(BackendError::Unavailable {
            addr: node.addr.clone(),
            reason: "connection closed".into(),
        });
    }
}

enum End {
    HandleDropped,
    Failed(String),
}

struct InFlight {
    reply: Sink,
    skip: u8,
    /// Bytes appended to the write buffer over the connection's life, up to the end of this request.
    end: u64,
    /// Deadline for the reply, if the command is not a blocking one.
    deadline: Option<Instant>,
}

impl InFlight {
    fn new(reply: Sink, skip: u8, end: u64, deadline: Option<Instant>) -> InFlight {
        InFlight {
            reply,
            skip,
            end,
            deadline,
        }
    }
}

/// How long a connection may sit idle before it checks its node with `PING`.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Write buffer size above which no more requests are taken until the socket drains.
const HIGH_WATER: usize = 4 * 1024 * 1024;

/// Whether the connection `id` (the server's client id; 0 when unknown) is only waiting on
/// `node`, asked on a new connection:
/// - the node is busy running a script or function past its `busy-reply-threshold` (it
///   answers `-BUSY`): the request is waiting behind it;
/// - the node still lists the connection (`CLIENT LIST ID`): it holds the request (a
///   `CLIENT PAUSE WRITE`, a slow command) and will answer.
///
/// `false` when the node does not answer within `command_timeout` (or `connect_timeout`, if
/// shorter) at all (hung), or no longer knows the connection (it was lost on the way: the
/// node restarted, the path dropped it without a reset). Such a connection is so given up
/// two command timeouts after the request was sent.
async fn still_held(node: &NodeSettings, id: i64) -> bool {
    use tokio::io::AsyncWriteExt;
    let probe = async {
        let mut stream = match connect_internal(node, ConnKey::new(0, 2)).await {
            Ok(s) => s,
            Err(e) => return e.starts_with("BUSY"),
        };
        let mut ask = BytesMut::new();
        let id = id.to_string();
        crate::protocol::encode_args(&mut ask, &[&b"CLIENT"[..], b"LIST", b"ID", id.as_bytes()]);
        if stream.write_all(&ask).await.is_err() {
            return false;
        }
        let mut buf = BytesMut::new();
        match read_frame(&mut stream, &mut buf).await {
            Ok(f) if f.starts_with(b"-BUSY") => true,
            Ok(f) => {
                let listed = format!("id={id} ");
                memchr::memmem::find(&f, listed.as_bytes()).is_some()
            }
            Err(_) => false,
        }
    };
    timeout(node.connect_timeout.min(node.command_timeout), probe)
        .await
        .unwrap_or(false)
}

async fn serve(
    node: &NodeSettings,
    mut stream: Stream,
    id: i64,
    rx: &mut QueueReceiver<Request>,
    first: Option<Request>,
    state: &ConnState,
    lane: bool,
) -> End {
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut rbuf = BytesMut::with_capacity(16 * 1024);
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let mut pending = first;
    // One timer for the oldest request's deadline, re-armed only when that deadline changes.
    let timer = tokio::time::sleep(node.command_timeout);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    let mut appended: u64 = 0;
    // An idle connection sends PING every two to four seconds, so a node that died or hung is noticed
    // (and its requests rerouted) before the next real request has to find out.
    // The timer runs all the time and is re-armed only when it fires (re-arming it on every
    // idle moment costs a timer-wheel update per batch); `used` says whether real traffic
    // flowed since, in which case no PING is needed.
    let ping = tokio::time::sleep(HEALTH_INTERVAL);
    tokio::pin!(ping);
    let mut used = false;
    // When the oldest request is past its deadline: is it only held (a long script, a pause:
    // keep waiting) or is the node or the connection gone (give the connection up)?
    let mut probe: Option<std::pin::Pin<Box<dyn Future<Output = bool> + '_>>> = None;
    let settled = Instant::now() + SETTLE;
    let end = loop {
        // Take everything queued since we last ran: one write per batch.
        let now = Instant::now();
        let deadline = now + node.command_timeout;
        loop {
            let req = match pending.take() {
                Some(r) => r,
                None => match rx.try_recv() {
                    Some(r) => r,
                    None => break,
                },
            };
            wbuf.extend_from_slice(&req.data);
            appended += req.data.len() as u64;
            used = true;
            inflight.push_back(InFlight::new(
                req.reply,
                req.skip,
                appended,
                (!req.blocking).then_some(deadline),
            ));
            if wbuf.len() >= HIGH_WATER {
                break;
            }
        }
        // Checked out (exclusive): the first write waits for the earlier checkouts' (see
        // `Turns`); nothing is in flight on the connection meanwhile.
        let turn = state.turn.take();
        if let Some(t) = &turn {
            t.wait().await;
        }
        if let Err(e) = write_now(&mut stream, &mut wbuf) {
            break End::Failed(e.to_string());
        }
        if let Some(t) = turn
            && Instant::now() < settled
        {
            // Written right after the handshake's reply: the later checkouts wait a little
            // longer (see `SETTLE`).
            tokio::task::spawn_local(async move {
                sleep_until(settled).await;
                drop(t);
            });
        }
        if lane && state.held_from.get().is_none() && !inflight.is_empty() {
            state.held_from.set(Some(now + LANE_HELD));
        }
        let due = inflight.front().and_then(|f| f.deadline);
        if due != armed {
            if let Some(d) = due {
                timer.as_mut().reset(d);
            }
            armed = due;
        }
        let taking = wbuf.len() < HIGH_WATER && pending.is_none();
        let (stream_ref, w, r) = (&mut stream, &mut wbuf, &mut rbuf);
        let io = std::future::poll_fn(|cx| poll_io(stream_ref, cx, w, r, true));
        tokio::select! {
            biased;
            ev = io => match ev {
                IoEvent::Read => {
                    if let Err(e) = dispatch_replies(&mut rbuf, &mut inflight) {
                        break End::Failed(e);
                    }
                    // Progress: the wait starts again at the loop's next turn (its `now`).
                    if lane {
                        state.held_from.set(None);
                    }
                    // Replies are coming: the request now first was waiting behind the others
                    // (a long script, say), its time starts now.
                    if let Some(f) = inflight.front_mut()
                        && f.deadline.is_some_and(|d| d <= now)
                    {
                        f.deadline = Some(Instant::now() + node.command_timeout);
                    }
                }
                IoEvent::Wrote | IoEvent::Readable => {}
                IoEvent::Closed(e) => {
                    break End::Failed(e.map(|e| e.to_string()).unwrap_or_else(|| "connection closed by the server".into()));
                }
            },
            req = rx.recv(), if taking => match req {
                Some(r) => pending = Some(r),
                None => break End::HandleDropped,
            },
            _ = &mut ping => {
                ping.as_mut().reset(Instant::now() + HEALTH_INTERVAL);
                if !used && inflight.is_empty() && pending.is_none() && state.pooled.get() {
                    let (reply, _) = reply_channel();
                    pending = Some(Request { data: Bytes::from_static(HEALTH_PING), skip: 0, blocking: false, reply: Sink::One(reply) });
                }
                used = false;
            }
            _ = &mut timer, if armed.is_some() && probe.is_none() => {
                probe = Some(Box::pin(still_held(node, id)));
            }
            busy = std::future::poll_fn(|cx| match probe.as_mut() {
                Some(p) => p.as_mut().poll(cx),
                None => std::task::Poll::Pending,
            }), if probe.is_some() => {
                probe = None;
                let now = Instant::now();
                if let Some(f) = inflight.front_mut()
                    && f.deadline.is_some_and(|d| d <= now)
                {
                    if !busy {
                        break End::Failed(format!("no reply within {:?}", node.command_timeout));
                    }
                    debug!(backend = %node.addr, "the node holds the request (a long script, a pause); still waiting");
                    f.deadline = Some(now + node.command_timeout);
                }
            }
        }
    };
    if let End::Failed(reason) = &end {
        // Requests whose last byte never left the write buffer did not reach Redis (it runs
        // only complete commands): they are safe to retry. The others may have run.
        let written = appended - wbuf.len() as u64;
        for f in inflight.drain(..) {
            let e = if f.end <= written {
                BackendError::Lost {
                    addr: node.addr.clone(),
                    reason: reason.clone(),
                }
            } else {
                BackendError::Unavailable {
                    addr: node.addr.clone(),
                    reason: reason.clone(),
                }
            };
            f.reply.fail(e);
        }
        if let Some(req) = pending.take() {
            // Taken from the queue but never written: it did not reach Redis.
            req.reply.fail(BackendError::Unavailable {
                addr: node.addr.clone(),
                reason: reason.clone(),
            });
        }
    }
    end
}

fn dispatch_replies(rbuf: &mut BytesMut, inflight: &mut VecDeque<InFlight>) -> Result<(), String> {
    loop {
        if let Some(front) = inflight.front_mut()
            && let Sink::Group(g) = &mut front.reply
        {
            let Some(replies) = take_group(rbuf, g).map_err(|e| e.to_string())? else {
                return Ok(());
            };
            if let Some(f) = inflight.pop_front()
                && let Sink::Group(g) = f.reply
            {
                g.tx.send(Ok(replies));
            }
            continue;
        }
        let Some(frame) = protocol::next_reply(rbuf).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        if frame.first() == Some(&b'>') {
            // Out-of-band push on a shared connection (never subscribed here): not a reply.
            continue;
        }
        let Some(front) = inflight.front_mut() else {
            return Err("reply without a request".into());
        };
        if front.skip > 0 {
            front.skip -= 1;
            continue;
        }
        if let Some(f) = inflight.pop_front()
            && let Sink::One(tx) = f.reply
        {
            tx.send(Ok(frame));
        }
    }
}

/// Counts the replies of the group at the front where they lie in `rbuf` (from where the
/// last call stopped); once all are in, splits them off at once: the frames and which are
/// errors (and where each ends, when asked for). `None` when more bytes are needed.
fn take_group(
    rbuf: &mut BytesMut,
    g: &mut GroupSink,
) -> Result<Option<GroupFrames>, protocol::ProtocolError> {
    let mut off = g.scanned;
    while g.got < g.count {
        // `off` never passes the buffer's end (only this group consumes it meanwhile).
        let rest = rbuf
            .get(off..)
            .ok_or(protocol::ProtocolError::InvalidReply)?;
        let Some(n) = protocol::reply_len_fast(rest)? else {
            g.scanned = off;
            return Ok(None);
        };
        match rest.first() {
            Some(b'>') => {
                // Not a reply (see above): cut out, keeping the group's replies before it.
                if off > 0 {
                    g.partial
                        .get_or_insert_with(BytesMut::new)
                        .extend_from_slice(&rbuf[..off]);
                }
                rbuf.advance(off + n);
                off = 0;
                continue;
            }
            Some(b'-' | b'!') => g.errors |= 1 << g.got,
            _ => {}
        }
        off += n;
        g.got += 1;
        if g.want_ends {
            if g.ends.capacity() == 0 {
                g.ends.reserve_exact(usize::from(g.count));
            }
            g.taken = g.taken.saturating_add(n as u32);
            g.ends.push(g.taken);
        }
    }
    let frames = match g.partial.take() {
        None => rbuf.split_to(off).freeze(),
        Some(mut p) => {
            p.extend_from_slice(&rbuf[..off]);
            rbuf.advance(off);
            p.freeze()
        }
    };
    Ok(Some(GroupFrames {
        bytes: frames,
        errors: g.errors,
        ends: std::mem::take(&mut g.ends),
    }))
}

/// How long after its handshake a connection's first request holds up the later checkouts
/// (see `Turns`). Redis may still be in the system call that wrote the handshake's reply,
/// which keeps the socket to itself: a request that comes meanwhile waits in the kernel and
/// reaches Redis after one sent a little later on another connection. Clients talking to
/// Redis directly see this too (a command sent on each of three connections right after their
/// replies came was served out of order in about one round in a hundred, never after a 1 ms
/// pause). Through respire, blocking commands on new connections were served out of order in
/// 1 of 4,500 runs of three clients and 2 of 1,500 runs of eight, and in 1 of 3,000 runs of
/// eight with this wait (on a loaded machine the kernel can hold a request longer). It holds
/// up only checkouts behind one that found no spare ready (a new connection).
const SETTLE: Duration = Duration::from_millis(1);

/// Exclusive connections kept connected for a key once it has used one (two: clients
/// blocking one right after another each find one ready).
const SPARES: usize = 2;

/// A worker's backend connections to one node.
pub struct Pool {
    node: Rc<NodeSettings>,
    per_key: usize,
    max_idle: usize,
    shared: RefCell<HashMap<ConnKey, Vec<BackendConn>>>,
    idle: RefCell<HashMap<ConnKey, Vec<BackendConn>>>,
    /// The order of exclusive checkouts' first writes.
    turns: Rc<Turns>,
}

impl Pool {
    /// A pool for `node` with `per_key` shared connections per key and up to `max_idle` idle exclusive ones.
    pub fn new(node: Rc<NodeSettings>, per_key: usize, max_idle: usize) -> Pool {
        Pool {
            node,
            per_key: per_key.max(1),
            max_idle,
            shared: RefCell::default(),
            idle: RefCell::default(),
            turns: Rc::default(),
        }
    }

    /// The node this pool connects to.
    pub fn node(&self) -> &Rc<NodeSettings> {
        &self.node
    }

    /// The shared connection for `key` that session `sid` uses (always the same one, so its commands stay ordered).
    pub fn shared(&self, key: ConnKey, sid: u64) -> BackendConn {
        let mut map = self.shared.borrow_mut();
        let conns = map.entry(key).or_insert_with(|| {
            (0..self.per_key)
                .map(|_| BackendConn::spawn(self.node.clone(), key, Mode::Shared))
                .collect()
        });
        let i = (sid % conns.len() as u64) as usize;
        conns[i].clone()
    }

    /// An exclusive connection for `key`: an idle one if a healthy one is kept (or the spare,
    /// connected or connecting), else a new one. A spare then starts connecting for the next
    /// checkout: a blocking command sent right after another client's would otherwise wait
    /// for a handshake, and a command sent after both could reach Redis first.
    ///
    /// The checkout takes a turn (see `Turns`): its first request is written after those of
    /// the earlier checkouts. Send it at once, or give the turn up first
    /// ([`BackendConn::pass_turn`]), or the later checkouts wait for it.
    pub fn checkout(&self, key: ConnKey) -> BackendConn {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(key).or_default();
        list.retain(BackendConn::is_alive);
        // A connected one first; else the spare that started connecting first, which is
        // still ahead of a new one; else a new one, started before the new spares, so that
        // this command goes ahead of the next client's, which takes a spare.
        let conn = match list.iter().rposition(BackendConn::is_connected) {
            Some(i) => list.swap_remove(i),
            None if !list.is_empty() => list.remove(0),
            None => BackendConn::spawn(self.node.clone(), key, Mode::Exclusive),
        };
        while list.len() < SPARES.min(self.max_idle) {
            list.push(BackendConn::spawn_connected(self.node.clone(), key));
        }
        conn.state.pooled.set(false);
        conn.state.turn.set(Some(self.turns.take()));
        conn
    }

    /// Returns a clean exclusive connection (nothing in flight, no transaction or watch) for reuse.
    pub fn checkin(&self, key: ConnKey, conn: BackendConn) {
        // Given back before its first write: the later checkouts need not wait for it.
        drop(conn.state.turn.take());
        if !(conn.is_alive() && conn.is_connected()) {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle {
            conn.state.pooled.set(true);
            list.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn inflight(reply: Sink, skip: u8) -> InFlight {
        InFlight::new(reply, skip, 0, None)
    }

    /// Checkouts' first writes go in checkout order, whatever order their connections are
    /// ready in; a turn given back unused holds no one up.
    #[test]
    fn turns_go_in_checkout_order() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let turns = Rc::new(Turns::default());
            let (a, b, c, d) = (turns.take(), turns.take(), turns.take(), turns.take());
            let order = Rc::new(RefCell::new(Vec::new()));
            let wait = |t: Turn, name: &'static str| {
                let order = order.clone();
                tokio::task::spawn_local(async move {
                    t.wait().await;
                    order.borrow_mut().push(name);
                })
            };
            // The last turn is ready first, then the second: both wait for the first.
            let (wd, wb) = (wait(d, "d"), wait(b, "b"));
            tokio::task::yield_now().await;
            assert!(order.borrow().is_empty());
            // The third is given back unused; the first writes.
            drop(c);
            tokio::task::yield_now().await;
            assert!(order.borrow().is_empty());
            drop(a);
            wb.await.unwrap();
            wd.await.unwrap();
            assert_eq!(*order.borrow(), ["b", "d"]);
            assert!(turns.open.borrow().is_empty());
        });
    }

    fn group(tx: GroupTx, count: u8, want_ends: bool) -> Sink {
        Sink::Group(Box::new(GroupSink::new(tx, count, want_ends)))
    }

    /// Replies of a group, a single request and another group, arriving a few bytes at a
    /// time with a push frame among them: each request gets exactly its replies, a group's
    /// in one piece with its errors marked.
    #[test]
    fn grouped_replies_are_split_off_together_whatever_the_reads() {
        let group1 = b"+OK\r\n-ERR no\r\n$3\r\nfoo\r\n".as_slice();
        let push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n".as_slice();
        let single = b"*2\r\n:1\r\n$-1\r\n".as_slice();
        let group2 = b":7\r\n!5\r\nerror\r\n_\r\n".as_slice();
        let mut wire = Vec::new();
        wire.extend_from_slice(&group1[..14]);
        wire.extend_from_slice(push);
        wire.extend_from_slice(&group1[14..]);
        wire.extend_from_slice(b"+ASKING-OK\r\n");
        wire.extend_from_slice(single);
        wire.extend_from_slice(group2);
        for step in [1, 3, 7, wire.len()] {
            let (g1, mut r1) = channel::oneshot();
            let (s, mut r2) = channel::oneshot();
            let (g2, mut r3) = channel::oneshot();
            let mut q = VecDeque::from([
                inflight(group(g1, 3, true), 0),
                inflight(Sink::One(s), 1),
                inflight(group(g2, 3, false), 0),
            ]);
            let mut rbuf = BytesMut::new();
            for piece in wire.chunks(step) {
                rbuf.extend_from_slice(piece);
                dispatch_replies(&mut rbuf, &mut q).unwrap();
            }
            assert!(q.is_empty() && rbuf.is_empty(), "step {step}");
            let g = r1.try_recv().unwrap().unwrap();
            assert_eq!(&g.bytes[..], group1, "step {step}");
            assert_eq!(g.errors, 0b010);
            assert_eq!(g.ends, [5, 14, 23]);
            assert_eq!(g.frame(1).as_deref(), Some(&b"-ERR no\r\n"[..]));
            assert_eq!(&r2.try_recv().unwrap().unwrap()[..], single);
            let g = r3.try_recv().unwrap().unwrap();
            assert_eq!(&g.bytes[..], group2);
            assert_eq!(g.errors, 0b010);
            assert!(g.ends.is_empty());
        }
    }

    /// A reply nobody asked for is an error of the connection (it is out of step).
    #[test]
    fn a_reply_beyond_the_requests_is_an_error() {
        let (g, _r) = channel::oneshot();
        let mut q = VecDeque::from([inflight(group(g, 1, false), 0)]);
        let mut rbuf = BytesMut::from(&b"+OK\r\n+OK\r\n"[..]);
        assert!(dispatch_replies(&mut rbuf, &mut q).is_err());
    }
}
