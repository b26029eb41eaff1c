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
//! construction (FIFO). When the next command must go to a different kind of
//! connection (another database or protocol, an exclusive connection for a
//! transaction or a blocking command), the session first waits until every
//! reply it is owed has arrived, so Redis executes the client's commands in
//! the order sent. Over several shards, commands for different slots run
//! concurrently on different nodes; replies still come back in order.
//!
//! Redirections (`MOVED`, `ASK`) are followed here, when the reply reaches the
//! front of the queue: the command is re-sent to the node named, the slot map
//! is patched, and the client never sees the redirection.
//!
//! Subscriptions and `MONITOR` turn the connection into a stream (see `stream`).

mod cluster;
mod local;
mod pause;
mod stream;
mod subscribe;
mod tracking;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use crate::backend::{
    BackendConn, BackendError, ConnKey, GroupReply, GroupTx, Reply, ReplyRx, SCRIPT_LANES,
};
use crate::channel::TryRecvError;
use crate::clients::{ClientInfo, flag};
use crate::commands::{self, Kind, Local, Resolved};
use crate::config::ReadFrom;
use crate::io::{IoEvent, Stream, poll_read_into, poll_write_and_readable, write_now};
use crate::pause::Hold;
use crate::plugin::{
    ChainRequest, ChainResponse, Client as PluginClient, ClientHandle, Decision, ReplyRoute,
    ResponseChain,
};
use crate::protocol::{self as resp, Command, RequestParser, parse_i64};
use crate::pubsub::{HashSet, SubKind};
use crate::router::{self, CROSSSLOT, Merge, Plan};

/// Most keyless commands a transaction holds before its first keyed one (its node unknown
/// yet); later ones fix the node, as the first keyed command would.
const MAX_HELD: usize = 64;
use crate::server::Worker;
use crate::topology::{BackendKind, Topology};

use crate::stage::PreDecision;

/// Most commands of a pipeline that go through the plugins in one batch.
const MAX_PLUGIN_BATCH: usize = 256;
/// Most request bytes in one plugin batch (a batch ends after the command that reaches it).
const MAX_PLUGIN_BATCH_BYTES: usize = 1024 * 1024;
/// Requests at least this big count towards `max_pipeline_bytes` (smaller ones are bounded
/// by `max_pipeline` times this).
const BIG_REQUEST: usize = 16 * 1024;

/// Commands up to this size may share a backend request with the ones before them (see
/// [`OpenGroup`]); bigger ones go as they are, without a copy.
const GROUP_COMMAND_BYTES: usize = 1024;

/// Most redirections followed for one command before the client gets the error.
const MAX_REDIRECTS: u8 = 5;
/// Pub/sub messages already queued for a session are written together up to this much output
/// (one write for a burst of small messages; a client that does not read gets one at a time,
/// so its output limit is checked after each).
const PUSH_BATCH_BYTES: usize = 64 * 1024;
/// Most `TRYAGAIN` retries for one command.
const MAX_TRYAGAIN: u8 = 10;
/// The reply when no master serves a slot (Redis Cluster's own text).
const CLUSTERDOWN: &str = "CLUSTERDOWN Hash slot not served";

/// What is needed to re-send a command after a redirection.
struct Retry {
    /// The node the request was last sent to.
    addr: Rc<str>,
    data: Bytes,
    /// Redirections followed so far.
    attempts: u8,
    /// `TRYAGAIN` retries so far.
    tryagain: u8,
    blocking: bool,
    /// Sent on an exclusive connection (the retry then uses a connection of its own).
    exclusive: bool,
    /// Keeps an exclusive connection opened for a redirected blocking command alive.
    conn: Option<BackendConn>,
    /// The slot of the request's keys (a representative slot of the shard for fan-out parts),
    /// to find its master again after a failover.
    slot: Option<u16>,
    /// Safe to send again even if it may already have run (reads, idempotent writes).
    idempotent: bool,
    /// When waiting for a new master gives up (set when the wait starts).
    deadline: Option<Instant>,
    /// Not sent yet: the reply is expected from another client's identical request (the
    /// cache's single flight); if that one goes away, send it.
    unsent: bool,
}

impl Retry {
    fn new(
        addr: Rc<str>,
        data: Bytes,
        slot: Option<u16>,
        idempotent: bool,
        exclusive: bool,
        blocking: bool,
    ) -> Retry {
        Retry {
            addr,
            data,
            attempts: 0,
            tryagain: 0,
            blocking,
            exclusive,
            conn: None,
            slot,
            idempotent,
            deadline: None,
            unsent: false,
        }
    }
}

/// One backend request of a split or fanned-out command.
struct PartState {
    rx: Option<ReplyRx>,
    reply: Option<Reply>,
    retry: Retry,
}

struct MergeSlot {
    silent: bool,
    how: Merge,
    layout: Vec<router::Part>,
    parts: Vec<PartState>,
    /// The first part still waiting for its reply: parts are answered in order (a redirected
    /// part waits again in its place), so every part before it has its reply.
    next: usize,
    /// The parts are a group's commands (see [`OpenGroup`]): their replies are written one
    /// after another, not merged.
    each: bool,
    /// Parts sent to one node as one request (their own `rx` is `None` until a redirection
    /// re-sends one of them).
    runs: Vec<PartRun>,
}

/// Consecutive parts of a split for one node, sent as one request (over a cluster a split
/// has a part per slot, and a node serves several): their replies arrive together and go to
/// parts `first..first + count`, each of which is then followed on its own.
struct PartRun {
    rx: Option<crate::channel::Receiver<GroupReply>>,
    reply: Option<GroupReply>,
    first: u32,
    count: u8,
}

impl MergeSlot {
    /// The part whose reply is awaited now, with its receiver.
    fn awaited(&mut self) -> Option<(usize, &mut ReplyRx)> {
        let i = self.next;
        self.parts.get_mut(i)?.rx.as_mut().map(|rx| (i, rx))
    }

    /// Takes the replies of the runs that have answered; whether any had.
    fn poll_runs(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        let mut any = false;
        for run in &mut self.runs {
            if let Some(rx) = run.rx.as_mut()
                && let Poll::Ready(r) = Pin::new(rx).poll(cx)
            {
                run.reply = Some(r.unwrap_or_else(|_| Err(lost())));
                run.rx = None;
                any = true;
            }
        }
        any
    }

    /// [`MergeSlot::poll_runs`] without waiting.
    fn try_runs(&mut self) -> bool {
        let mut any = false;
        for run in &mut self.runs {
            let r = match run.rx.as_mut().map(|rx| rx.try_recv()) {
                Some(Ok(r)) => r,
                Some(Err(TryRecvError::Closed)) => Err(lost()),
                Some(Err(TryRecvError::Empty)) | None => continue,
            };
            run.reply = Some(r);
            run.rx = None;
            any = true;
        }
        any
    }
}

enum Slot {
    /// A reply respire produced while earlier replies were still owed.
    Ready(Bytes),
    /// A reply coming from a backend.
    Waiting {
        rx: ReplyRx,
        silent: bool,
        retry: Option<Retry>,
    },
    /// Replies of several backend requests, merged into one.
    Merge(Box<MergeSlot>),
    /// The replies of commands sent together (see [`OpenGroup`]), written in order.
    Group(Box<GroupSlot>),
}

/// Consecutive commands of a client for the shared connections of one database, in one slot
/// and one backend request per connection (a *part*): each backend splits its part's replies
/// off its input at once, and the session writes them, in the commands' order, when all
/// parts have answered, where each command would otherwise cost its own request, reply
/// channel, slot and write. Only commands with no cache work are grouped, and only small ones
/// (a part's commands are copied together); replies owing response hooks are taken apart
/// again for them. Over a cluster or Sentinel, a part whose replies include a redirection or
/// a failure goes back to one retry per command (see [`Session::group_to_merge`]). The group
/// is sent when the session is about to wait, or before anything else goes to a shared
/// connection.
struct OpenGroup {
    key: ConnKey,
    /// The group's slot (which gets `order` and `count`, and each part what it sent, when
    /// the group is sent).
    seq: u64,
    parts: SmallVec<[OpenPart; 1]>,
    /// Each command's part, in order (empty while there is one part).
    order: Vec<u8>,
    /// Commands in all.
    count: u8,
    /// Over a cluster or Sentinel: what each command sent is kept for a retry.
    managed: bool,
}

impl OpenGroup {
    /// Whether a command for `key` may join, the group's slot being the last of `pushed`.
    fn open_to(&self, key: ConnKey, pushed: u64) -> bool {
        self.key == key
            && self.seq + 1 == pushed
            && usize::from(self.count) < crate::backend::MAX_GROUP
    }

    /// Adds a command to part `part`; returns its place in the group.
    #[inline(always)]
    fn add(&mut self, part: usize, data: Bytes, slot: Option<u16>) -> u8 {
        if self.parts.len() > 1 {
            self.order.push(part as u8);
        }
        if let Some(op) = self.parts.get_mut(part) {
            match op.count {
                0 => op.first = data,
                1 => {
                    op.data.reserve(op.first.len() + data.len() * 16);
                    op.data.extend_from_slice(&op.first);
                    op.data.extend_from_slice(&data);
                }
                _ => op.data.extend_from_slice(&data),
            }
            op.count += 1;
            if self.managed {
                let end = if op.count == 1 {
                    op.first.len()
                } else {
                    op.data.len()
                };
                op.sent.push((end as u32, slot));
            }
        }
        let idx = self.count;
        self.count += 1;
        idx
    }
}

/// A group's commands for one connection, not sent yet.
struct OpenPart {
    conn: BackendConn,
    node: usize,
    /// The first command, sent as it is when no other joins it.
    first: Bytes,
    /// All of them, once there are two or more.
    data: BytesMut,
    count: u8,
    tx: GroupTx,
    /// Over a cluster or Sentinel: where each command ends and the slot of its keys.
    sent: Vec<(u32, Option<u16>)>,
}

/// The most connections one group goes to.
const MAX_GROUP_PARTS: usize = 16;

/// A group's slot (see [`OpenGroup`]).
struct GroupSlot {
    parts: SmallVec<[GroupPart; 1]>,
    /// Each command's part, in order (empty while there is one part).
    order: Vec<u8>,
    /// Commands in all.
    count: u8,
}

/// One part of a group's slot.
struct GroupPart {
    rx: Option<crate::channel::Receiver<GroupReply>>,
    reply: Option<GroupReply>,
    /// Over a cluster or Sentinel: the node's address, what the part sent and, per command,
    /// where it ends in that and the slot of its keys, for following a redirection or a
    /// failover.
    addr: Option<Rc<str>>,
    data: Bytes,
    sent: Vec<(u32, Option<u16>)>,
}

impl GroupPart {
    /// What its command `i` sent, and the slot of its keys.
    fn request(&self, i: usize) -> (Bytes, Option<u16>) {
        let Some(&(end, slot)) = self.sent.get(i) else {
            return (Bytes::new(), None);
        };
        let start = if i == 0 {
            0
        } else {
            self.sent.get(i - 1).map_or(0, |s| s.0)
        };
        let (start, end) = (start as usize, end as usize);
        if start <= end && end <= self.data.len() {
            (self.data.slice(start..end), slot)
        } else {
            (Bytes::new(), slot)
        }
    }
}

impl GroupSlot {
    /// Takes the replies that have arrived; ready once every part has answered.
    fn poll_parts(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut all = true;
        for p in &mut self.parts {
            if let Some(rx) = p.rx.as_mut() {
                match Pin::new(rx).poll(cx) {
                    Poll::Ready(r) => {
                        p.reply = Some(r.unwrap_or_else(|_| Err(lost())));
                        p.rx = None;
                    }
                    Poll::Pending => all = false,
                }
            }
        }
        if all { Poll::Ready(()) } else { Poll::Pending }
    }

    /// [`GroupSlot::poll_parts`] without waiting: whether every part has answered.
    fn try_parts(&mut self) -> bool {
        let mut all = true;
        for p in &mut self.parts {
            if let Some(rx) = p.rx.as_mut() {
                match rx.try_recv() {
                    Ok(r) => {
                        p.reply = Some(r);
                        p.rx = None;
                    }
                    Err(TryRecvError::Closed) => {
                        p.reply = Some(Err(lost()));
                        p.rx = None;
                    }
                    Err(TryRecvError::Empty) => all = false,
                }
            }
        }
        all
    }

    /// Whether a reply must be followed (a redirection, a node that cannot serve, a failed
    /// connection) rather than passed on. Only over a cluster or Sentinel, whose groups
    /// always ask where each reply ends.
    fn needs_following(&self) -> bool {
        self.parts.iter().any(|p| match &p.reply {
            Some(Ok(f)) => (0..f.ends.len()).any(|i| {
                (f.errors >> i) & 1 == 1 && f.frame(i).is_some_and(|frame| to_follow(&frame))
            }),
            _ => true,
        })
    }

    /// Every command's reply, in order. Only for groups that asked where each reply ends
    /// (several parts, or a cluster or Sentinel); one part's replies otherwise go on whole.
    fn replies(&self) -> Vec<Reply> {
        // Which reply of its part each command's is.
        let mut next: SmallVec<[usize; 8]> = SmallVec::from_elem(0, self.parts.len());
        (0..usize::from(self.count))
            .map(|i| {
                let pi = self.order.get(i).map_or(0, |&p| usize::from(p));
                let j = next.get(pi).copied().unwrap_or(0);
                if let Some(n) = next.get_mut(pi) {
                    *n += 1;
                }
                match self.parts.get(pi).and_then(|p| p.reply.as_ref()) {
                    Some(Err(e)) => Err(e.clone()),
                    Some(Ok(f)) => f.frame(j).ok_or_else(lost),
                    None => Err(lost()),
                }
            })
            .collect()
    }
}

/// The frames of replies lying back to back (at most `max`); a tail that is not one is
/// passed on whole.
fn split_frames(bytes: &Bytes, max: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < bytes.len() && out.len() < max {
        let n = match resp::reply_len_fast(&bytes[off..]) {
            Ok(Some(n)) => n,
            _ => bytes.len() - off,
        };
        out.push(bytes.slice(off..off + n));
        off += n;
    }
    out
}

/// An error reply respire follows over a cluster or Sentinel (see [`RedirectCtx::follow`]).
fn to_follow(frame: &[u8]) -> bool {
    [
        &b"-MOVED "[..],
        b"-ASK ",
        b"-TRYAGAIN",
        b"-CLUSTERDOWN",
        b"-READONLY",
        b"-LOADING",
        b"-MASTERDOWN",
    ]
    .iter()
    .any(|p| frame.starts_with(p))
}

/// Whether Redis took a command, by its reply (`None`: not shown to the client, or never
/// seen, which counts as taken): not an error, nor the nil of an aborted `EXEC`.
fn took(reply: Option<&[u8]>) -> bool {
    reply.is_none_or(|r| {
        !(r.starts_with(b"-")
            || r.starts_with(b"!")
            || r.starts_with(b"*-1")
            || r.starts_with(b"_"))
    })
}

/// A reply that never came.
fn lost() -> BackendError {
    BackendError::Lost {
        addr: Arc::from("backend"),
        reason: "reply dropped".into(),
    }
}

/// An error reply's frame.
fn error_frame(e: &BackendError) -> Bytes {
    let mut b = BytesMut::new();
    resp::error(&mut b, &e.to_string());
    b.freeze()
}

/// Commands' replies as frames (a failure as its error reply), with a bit per error reply.
fn frames_of(replies: impl Iterator<Item = Reply>) -> (Vec<Bytes>, u64) {
    let mut errors = 0u64;
    let frames = replies
        .enumerate()
        .map(|(i, r)| {
            let f = r.unwrap_or_else(|e| error_frame(&e));
            if matches!(f.first(), Some(b'-') | Some(b'!')) {
                errors |= 1 << i;
            }
            f
        })
        .collect();
    (frames, errors)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Shared(ConnKey),
    Exclusive,
    /// Waiting for a reply another client's request will bring (the cache's single flight).
    Flight,
    /// Waiting for the tracking connections before `CLIENT TRACKING on` is answered.
    Tracking,
}

/// What the response cache needs done when a command's reply arrives.
enum After {
    /// Keep the reply of a cache miss and pass it to the clients waiting for it.
    Fill(crate::cache::FillGuard),
    /// A write's reply: drop cached replies of its keys (again, now that it has run).
    Invalidate(Vec<Bytes>),
    /// `FLUSHALL`, `FLUSHDB`, `SWAPDB`: drop everything (again).
    Flush,
    /// `CLIENT PAUSE` (alone or in a transaction): once Redis took it, respire holds what it
    /// holds too, until the same end counted from now (never before Redis's).
    Pause(crate::pause::Mode, Duration),
    /// `CLIENT UNPAUSE`: once Redis took it, the commands respire holds go.
    Unpause,
}

/// A command waiting for Redis to grant its shared rate-limit tokens; it goes on (or is
/// refused) when the answer comes, and nothing after it is read meanwhile.
struct Gated {
    rx: oneshot::Receiver<Result<(), String>>,
    /// Held by a `CLIENT PAUSE`, not by a rate limit: the client counts as blocked meanwhile.
    paused: Option<crate::pause::Held>,
    cmd: Command,
    chain: Option<Box<ResponseChain>>,
    cache_for: Option<crate::cache::CacheFor>,
    /// The command's number and start, for metrics.
    stat: Option<(u16, Instant)>,
}

/// A command whose reply is still owed, for respire's metrics and slow log.
struct Stat {
    /// The sequence number of its (last) reply slot.
    seq: u64,
    /// Its number in the command table.
    id: u16,
    /// When respire read it (the start of its batch).
    start: Instant,
    /// What was sent to the backend, and to which node (kept only for the slow log).
    sent: Option<(Bytes, Option<usize>)>,
    /// Its place in its slot's group (0 when the slot is not a group).
    idx: u8,
}

/// GCRA over Redis's clock: `KEYS[1]` holds the bucket's theoretical arrival time (ms);
/// `ARGV`: ms per token, burst, cost (negative: a refund). Returns 0 when granted, else the
/// ms until it would be.
const GCRA: &str = "local t = redis.call('TIME') \
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 \
local interval, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]) \
local tat = tonumber(redis.call('GET', KEYS[1]) or now) \
if tat < now then tat = now end \
local new_tat = tat + cost * interval \
local wait = new_tat - burst * interval - now \
if cost > 0 and wait > 0 then return math.max(1, math.ceil(wait)) end \
if new_tat > now then redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000) \
else redis.call('DEL', KEYS[1]) end \
return 0";

/// What the cache did with a cacheable read.
enum CacheRead {
    /// Answered (a hit) or queued behind another client's identical request.
    Done,
    /// A miss this session fills: send the command, keep its reply.
    Fill(crate::cache::FillGuard),
    /// Not cached: send the command.
    Pass,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// What woke a waiting session.
enum Wake {
    /// `CLIENT KILL`.
    Kill,
    /// Graceful shutdown began.
    Shutdown,
    /// A reply for part `.0` of the front slot (`None`: its sender went away).
    Reply(usize, Option<Reply>),
    /// Every part of the group at the front has answered.
    Group,
    /// Parts of the split at the front sent to one node together have answered.
    Runs,
    /// The client's socket.
    Io(IoEvent),
    /// Redis answered a gated command's shared tokens.
    Gate(Result<Result<(), String>, oneshot::error::RecvError>),
    /// A message from a subscriber connection.
    Push(crate::pubsub::Message),
    /// Tracking messages wait in the client's inbox.
    Notes,
    /// The plugin stage decided about this session's commands.
    Verdicts(Option<crate::stage::Decided>),
    /// The plugin stage ran the response hooks of this session's replies.
    Hooked(Option<Vec<Bytes>>),
    /// The idle timer fired.
    Idle,
}

/// What ended a stream (subscribe / monitor) phase.
enum StreamEnd {
    /// The client is gone or must be closed.
    Close,
    /// The client sent `RESET` (or the stream could not start): back to normal commands.
    Reset,
}

/// How a keyed command uses connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// The shared pipelined connection of its node.
    Shared,
    /// An exclusive connection: a blocking command.
    Blocking,
    /// An exclusive connection for a command that must not wait behind others (`SCRIPT
    /// KILL`), not a blocking one.
    Exclusive,
    /// An exclusive connection that stays pinned: `WATCH`.
    Watch,
}

struct Exclusive {
    addr: Arc<str>,
    key: ConnKey,
    conn: BackendConn,
}

/// A session's handles to shared connections, one per topology node, for one key (database,
/// protocol, lane); asking for another key starts over.
struct ConnCache {
    key: ConnKey,
    conns: Vec<Option<BackendConn>>,
}

impl Default for ConnCache {
    fn default() -> Self {
        ConnCache {
            key: ConnKey::new(0, 2),
            conns: Vec::new(),
        }
    }
}

impl ConnCache {
    /// The handle for `node` and `key`, made by `open` the first time. Borrowed, not cloned:
    /// a handle is three reference counts, taken and dropped for every request otherwise.
    #[inline]
    fn get(
        &mut self,
        node: usize,
        key: ConnKey,
        open: impl FnOnce() -> BackendConn,
    ) -> &BackendConn {
        if self.key != key {
            self.conns.clear();
            self.key = key;
        }
        if self.conns.len() <= node {
            self.conns.resize(node + 1, None);
        }
        self.conns[node].get_or_insert_with(open)
    }

    /// Forgets every handle (the topology changed: node indexes mean other nodes).
    fn clear(&mut self) {
        self.conns.clear();
    }
}

/// A client connection's state.
pub struct Session {
    worker: Rc<Worker>,
    info: Arc<ClientInfo>,
    stream: Stream,
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
    /// A command that turns the connection into a stream once nothing is owed, and its node.
    stream_start: Option<(Command, Vec<usize>)>,
    topo: Arc<Topology>,
    /// Shared connections for the current database and protocol, by topology node index.
    conns: ConnCache,
    /// The first scripts' lane's connections, by topology node index.
    lane_conns: ConnCache,
    proto: u8,
    db: u32,
    authenticated: bool,
    exclusive: Option<Exclusive>,
    /// The exclusive connection's state was changed in ways respire does not track; never reuse it.
    exclusive_dirty: bool,
    in_multi: bool,
    /// The client's `MULTI`, acknowledged by respire but not sent yet: the node is chosen by
    /// the transaction's first keyed command, and it goes ahead of that (`MONITOR` shows it
    /// as the client wrote it). See [`Session::multi_deferred`].
    multi_cmd: Option<Command>,
    /// Keyless commands queued (respire said `QUEUED`) before that first keyed command: they
    /// go with it, after `MULTI`, to its node (or with `EXEC` to any master).
    tx_held: Vec<Bytes>,
    /// A command queued in the transaction was refused by respire: EXEC must abort.
    tx_poisoned: bool,
    watching: bool,
    reply_mode: ReplyMode,
    /// Stop reading; close once every owed reply is written.
    closing: bool,
    /// The last command (its display id), for `CLIENT LIST`.
    last_cmd: u32,
    /// Subscriptions (the worker's hub knows which node holds each).
    subs: HashSet<(SubKind, Bytes)>,
    /// The plugin chain is not empty (checked once per batch).
    has_plugins: bool,
    /// Commands in the last batch for the plugins (see `process_input`).
    batch_hint: usize,
    /// The last command looked up in the command table (see [`commands::LastCommand`]).
    last_command: commands::LastCommand,
    /// The client as plugins see it (rebuilt when it changes).
    plugin_client: Option<ClientHandle>,
    /// The generation of the last `plugin_client` made.
    client_generation: u32,
    /// Slots ever pushed to / popped from `queue`: a slot's sequence number is `popped` when it is at the front.
    pushed: u64,
    popped: u64,
    /// Response hooks owed, by the sequence number of the slot whose reply they run on.
    /// (With its command's place in the slot's group.)
    hooks: VecDeque<(u64, u8, Box<ResponseChain>)>,
    /// Response hooks owed for the stalled command.
    stalled_hook: Option<Box<ResponseChain>>,
    /// Commands whose request hooks ran with their batch, waiting behind a stalled or gated one.
    deferred: VecDeque<(crate::stage::ResolvedCommand, Option<PreDecision>)>,
    /// Replies waiting for their response hooks (with the replies after them, in order).
    staged: Vec<(Bytes, Option<Box<ResponseChain>>)>,
    /// Commands with the worker's plugin stage, waiting for the request hooks' decisions.
    verdicts: Option<crate::channel::Receiver<crate::stage::Decided>>,
    /// Replies with the worker's plugin stage, waiting for their response hooks.
    hooked: Option<crate::channel::Receiver<Vec<Bytes>>>,
    /// Cache work owed, by the sequence number of the slot whose reply triggers it.
    after: VecDeque<(u64, After)>,
    /// Writes in `after` not answered yet: reads bypass the cache meanwhile (a client must
    /// see its own writes, even pipelined).
    writes_in_flight: usize,
    /// Slots up to this sequence number hold commands sent while the cache was off (writes it
    /// did not drop keys for): 0 once they are answered and their invalidations read.
    uncached_until: u64,
    /// The fence round after which those commands' invalidations are applied (0: none owed).
    cache_fence: u64,
    /// Cache work owed for the stalled command.
    stalled_after: Option<After>,
    /// Keys written by the commands queued in the current transaction.
    tx_keys: Vec<Bytes>,
    /// A command waiting for its shared rate-limit tokens.
    gated: Option<Box<Gated>>,
    /// When the batch being handled was read.
    batch_start: Instant,
    /// The time, read at most once per wake-up (see [`Session::now`]).
    now: Option<Instant>,
    /// Replies owed, for metrics and the slow log.
    stats: VecDeque<Stat>,
    /// The stalled command's number and start.
    stalled_stat: Option<(u16, Instant)>,
    /// What the last dispatched command sent and where (for the slow log), when it is on.
    last_sent: Option<(Bytes, Option<usize>)>,
    /// The slow log is on.
    slowlog: bool,
    /// Messages from the worker's subscriber connections.
    push_tx: Option<mpsc::UnboundedSender<crate::pubsub::Message>>,
    push_rx: Option<mpsc::UnboundedReceiver<crate::pubsub::Message>>,
    /// Messages queued when the session last left a channel (see `note_left`).
    stale_messages: usize,
    /// `max_pipeline` replies (or `max_pipeline_bytes` of big requests) are owed: further input
    /// waits, unread, until some arrive.
    held_back: bool,
    /// Big requests whose replies are owed: the sequence number of their last slot, and size.
    big: VecDeque<(u64, usize)>,
    /// Their bytes in all.
    big_bytes: usize,
    /// Since when the output has been over the soft limit of the client's class.
    soft_since: Option<Instant>,
    /// Commands grouped for a shared connection, not sent yet.
    open: Option<OpenGroup>,
    /// Commands in group slots beyond one per slot (they count against `max_pipeline`).
    grouped_extra: usize,
    /// The command being dispatched may join a group (no response hook or cache work).
    may_group: bool,
    /// The command just dispatched joined a group: its slot and place in it.
    grouped_now: Option<(u64, u8)>,
    /// More commands of the client's batch follow the one being handled: a group pays only
    /// then (or when one is open already).
    pipelined: bool,
    /// The slot of the last blocking command sent, while its reply is owed: the client is
    /// blocked (`b` in `CLIENT LIST`, counted in `INFO`'s `blocked_clients`).
    blocked_until: Option<u64>,
    /// `CLIENT PAUSE` / `UNPAUSE` queued in the transaction: respire keeps it when `EXEC` runs.
    tx_pause: Option<After>,
    /// The slots of scripts sent on the scripts' lane whose replies are owed (counted in
    /// `Shared::scripts_in_flight`).
    script_slots: VecDeque<u64>,
    /// `CLIENT TRACKING on`: the client's options (the table is in `Shared::tracking`).
    tracking: Option<Box<crate::tracking::Mode>>,
    /// `CLIENT CACHING yes|no` applies to the next command or transaction.
    caching: bool,
    /// A tracking client's transaction: the keys its queued commands write, and those a later
    /// queued command reads again (see `track_command`).
    tx_written: Vec<Bytes>,
    tx_reread: Vec<Bytes>,
    /// A write was sent while clients track keys: before its reply reaches the client, the
    /// tracking connections are read (see [`crate::invalidation`]).
    sync_tracking: bool,
}

/// Serves one client connection until it closes.
pub async fn run(worker: Rc<Worker>, stream: Stream, info: Arc<ClientInfo>) {
    let authenticated = !worker.shared.config.auth_required();
    let slowlog = worker.shared.slowlog.threshold() >= 0;
    let topo = worker.shared.topology.load();
    let mut s = Session {
        worker,
        info,
        stream,
        inbuf: BytesMut::new(),
        out: BytesMut::new(),
        parser: RequestParser::new(),
        queue: VecDeque::new(),
        waiting: 0,
        last_target: None,
        stalled: None,
        stream_start: None,
        topo,
        conns: ConnCache::default(),
        lane_conns: ConnCache::default(),
        proto: 2,
        db: 0,
        authenticated,
        exclusive: None,
        exclusive_dirty: false,
        in_multi: false,
        tx_held: Vec::new(),
        multi_cmd: None,
        tx_poisoned: false,
        watching: false,
        reply_mode: ReplyMode::On,
        closing: false,
        last_cmd: commands::NO_DISPLAY_ID,
        subs: HashSet::default(),
        has_plugins: false,
        batch_hint: 1,
        last_command: commands::LastCommand::default(),
        plugin_client: None,
        client_generation: 0,
        pushed: 0,
        popped: 0,
        uncached_until: 0,
        cache_fence: 0,
        hooks: VecDeque::new(),
        stalled_hook: None,
        deferred: VecDeque::new(),
        staged: Vec::new(),
        verdicts: None,
        hooked: None,
        after: VecDeque::new(),
        writes_in_flight: 0,
        stalled_after: None,
        tx_keys: Vec::new(),
        gated: None,
        batch_start: Instant::now(),
        now: None,
        stats: VecDeque::new(),
        stalled_stat: None,
        last_sent: None,
        slowlog: false,
        push_tx: None,
        push_rx: None,
        stale_messages: 0,
        held_back: false,
        big: VecDeque::new(),
        big_bytes: 0,
        soft_since: None,
        open: None,
        grouped_extra: 0,
        may_group: false,
        grouped_now: None,
        pipelined: false,
        blocked_until: None,
        tx_pause: None,
        script_slots: VecDeque::new(),
        tracking: None,
        caching: false,
        tx_written: Vec::new(),
        tx_reread: Vec::new(),
        sync_tracking: false,
    };
    s.slowlog = slowlog;
    s.serve().await;
    // Commands read before the client went away still go (as they would have at once).
    s.flush_group();
    // Writes whose replies never reached the front: they may have run, drop what they touched.
    s.run_after(u64::MAX, None);
    s.unsubscribe_all();
    s.stop_tracking();
    s.release_exclusive(true);
    // Scripts whose replies never came are no longer this session's to count.
    s.scripts_answered(u64::MAX);
    let id = s.info.id;
    s.worker.shared.clients.unregister(id);
    debug!(client = id, "client closed");
}

impl Session {
    fn key(&self) -> ConnKey {
        ConnKey::new(self.db, self.proto)
    }

    fn cluster_mode(&self) -> bool {
        self.topo.kind != BackendKind::Standalone
    }

    /// Picks up a new topology snapshot if there is one.
    fn refresh_topology(&mut self) {
        let v = self.worker.shared.topology.version();
        if v != self.topo.version {
            self.topo = self.worker.shared.topology.load();
            self.conns.clear();
            self.lane_conns.clear();
        }
    }

    async fn serve(&mut self) {
        if *self.worker.shared.shutdown.borrow() {
            self.closing = true;
        }
        let idle = self.worker.shared.config.timeout;
        // One timer for the idle timeout, re-armed only when it fires (from the last
        // activity), not on every command.
        let idle_timer = tokio::time::sleep(if idle.is_zero() {
            Duration::from_secs(86_400)
        } else {
            idle
        });
        tokio::pin!(idle_timer);
        let mut last_read = Instant::now();
        let mut signals = crate::clients::SignalWatch::default();
        loop {
            if self.info.killed() {
                return;
            }
            self.now = None;
            self.collect_ready();
            if self.held_back && !self.pipeline_full() {
                self.held_back = false;
                self.process_input();
                self.park_input();
            }
            if self.waiting == 0 {
                if let Some(cmd) = self.stalled.take() {
                    self.refresh_topology();
                    // Plugins have seen it already: straight to dispatch, with its response hooks.
                    let hook = self.stalled_hook.take();
                    let after = self.stalled_after.take();
                    let stat = self.stalled_stat.take();
                    let worker = self.worker.clone();
                    let res = worker.shared.commands.resolve(&cmd);
                    if after.is_none()
                        && !self.in_multi
                        && let Some(mode) = worker.shared.pause.current()
                        && self.pause_holds(mode, &cmd, res) == Hold::Here
                    {
                        // A pause began while it waited for the replies before it.
                        self.hold_for_pause(cmd, res, hook, None);
                        if let (Some(g), Some(stat)) = (self.gated.as_mut(), stat) {
                            g.stat = Some(stat);
                        }
                        continue;
                    }
                    let (pushed, mark) = (self.pushed, self.out.len());
                    self.last_sent = None;
                    self.with_hook(hook, |s| s.dispatch(cmd, res));
                    self.note_after(pushed, after);
                    if let Some(stat) = stat {
                        self.note_stat(stat, pushed, mark);
                    }
                    self.process_input();
                    continue;
                }
                if self.stream_start.is_some() && self.staged.is_empty() && self.hooked.is_none() {
                    let Some((first, nodes)) = self.stream_start.take() else {
                        continue;
                    };
                    if !self.flush_all().await {
                        return;
                    }
                    let replica = commands::lookup(first.name()).kind == Kind::Replica;
                    let end = match nodes.first() {
                        Some(&master) if replica => self.relay_replication(first, master).await,
                        _ => self.relay_stream(first, &nodes).await,
                    };
                    match end {
                        StreamEnd::Close => return,
                        StreamEnd::Reset => {
                            self.process_input();
                            continue;
                        }
                    }
                }
            }
            if self.sync_tracking && !self.out.is_empty() {
                // Tracking clients get their invalidations before the writer its answer.
                crate::invalidation::sync(&self.worker.shared);
                self.sync_tracking = !self.queue.is_empty();
            }
            if !self.out.is_empty() && !self.try_flush() {
                return;
            }
            if !self.output_within_limit(self.subscribed()) {
                return;
            }
            if self.closing
                && self.queue.is_empty()
                && self.out.is_empty()
                && self.gated.is_none()
                && self.staged.is_empty()
                && self.hooked.is_none()
            {
                return;
            }
            let reading = !self.closing
                && !self.held_back
                && self.stalled.is_none()
                && self.stream_start.is_none()
                && self.gated.is_none();
            let idle_applies = !idle.is_zero()
                && self.waiting == 0
                && !self.in_multi
                && !self.watching
                && !self.subscribed();
            // Everything read so far goes to the backends before the session waits.
            self.flush_group();
            let out_before = self.out.len();
            let closing = self.closing;
            let info = &*self.info;
            let (queue, stream, out) = (&mut self.queue, &mut self.stream, &mut self.out);
            let (gated, push_rx, timer) = (&mut self.gated, &mut self.push_rx, &mut idle_timer);
            let (verdicts, hooked) = (&mut self.verdicts, &mut self.hooked);
            // One hand-written poll over everything a session waits for: cheaper than
            // `select!`, which builds and drops a future per branch on every wake-up.
            let wake = std::future::poll_fn(|cx| {
                if let Poll::Ready(bits) = signals.poll(info, cx) {
                    if bits & crate::clients::signal::KILL != 0 {
                        return Poll::Ready(Wake::Kill);
                    }
                    if bits & crate::clients::signal::NOTES != 0 {
                        return Poll::Ready(Wake::Notes);
                    }
                    if !closing {
                        return Poll::Ready(Wake::Shutdown);
                    }
                }
                match queue.front_mut() {
                    Some(Slot::Waiting { rx, .. }) => {
                        if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                            return Poll::Ready(Wake::Reply(0, r.ok()));
                        }
                    }
                    Some(Slot::Merge(m)) => {
                        if !m.runs.is_empty() && m.poll_runs(cx) {
                            return Poll::Ready(Wake::Runs);
                        }
                        if let Some((i, rx)) = m.awaited() {
                            if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                                return Poll::Ready(Wake::Reply(i, r.ok()));
                            }
                        }
                    }
                    Some(Slot::Group(g)) => match g.poll_parts(cx) {
                        Poll::Ready(()) => return Poll::Ready(Wake::Group),
                        Poll::Pending => {}
                    },
                    _ => {}
                }
                if let Poll::Ready(ev) = poll_write_and_readable(stream, cx, out, reading) {
                    return Poll::Ready(Wake::Io(ev));
                }
                if let Some(g) = gated.as_mut() {
                    if let Poll::Ready(v) = Pin::new(&mut g.rx).poll(cx) {
                        return Poll::Ready(Wake::Gate(v));
                    }
                }
                if let Some(rx) = verdicts.as_mut() {
                    if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                        return Poll::Ready(Wake::Verdicts(r.ok()));
                    }
                }
                if let Some(rx) = hooked.as_mut() {
                    if let Poll::Ready(r) = Pin::new(rx).poll(cx) {
                        return Poll::Ready(Wake::Hooked(r.ok()));
                    }
                }
                if let Some(rx) = push_rx.as_mut() {
                    if let Poll::Ready(Some(frame)) = rx.poll_recv(cx) {
                        return Poll::Ready(Wake::Push(frame));
                    }
                }
                if idle_applies && timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Wake::Idle);
                }
                Poll::Pending
            })
            .await;
            self.now = None;
            match wake {
                Wake::Kill => return,
                Wake::Shutdown => self.closing = true,
                Wake::Reply(part, r) => {
                    let r = r.unwrap_or_else(|| Err(lost()));
                    self.on_result(part, r);
                }
                Wake::Group => self.on_group(),
                Wake::Runs => self.on_runs(),
                Wake::Io(IoEvent::Readable) => {
                    self.worker
                        .stats
                        .bytes(0, out_before.saturating_sub(self.out.len()));
                    match self.read_input().await {
                        Some(IoEvent::Closed(_)) => return,
                        Some(_) => {
                            self.process_input();
                            self.park_input();
                            if !self.input_within_limit() {
                                return;
                            }
                            self.note_activity();
                            last_read = self.now();
                        }
                        None => {}
                    }
                }
                Wake::Io(IoEvent::Read) => {}
                Wake::Io(IoEvent::Wrote) => self
                    .worker
                    .stats
                    .bytes(0, out_before.saturating_sub(self.out.len())),
                Wake::Io(IoEvent::Closed(_)) => return,
                Wake::Gate(verdict) => self.on_gate(verdict),
                Wake::Verdicts(Some(decided)) => {
                    self.on_verdicts(decided);
                    self.process_input();
                    self.park_input();
                }
                Wake::Hooked(Some(replies)) => self.on_hooked(replies),
                // The worker is going away.
                Wake::Verdicts(None) | Wake::Hooked(None) => return,
                Wake::Push(frame) => {
                    self.on_message(frame);
                    // What else has arrived, while the output is small: one write for the lot.
                    while self.out.len() < PUSH_BATCH_BYTES {
                        let Some(Ok(frame)) = self.push_rx.as_mut().map(|rx| rx.try_recv()) else {
                            break;
                        };
                        self.on_message(frame);
                    }
                }
                Wake::Notes => self.on_notes(),
                Wake::Idle => {
                    let due = last_read + idle;
                    if self.now() >= due {
                        return;
                    }
                    idle_timer.as_mut().reset(due);
                }
            }
        }
    }

    /// Reads what the client sent: into the worker's buffer, or into the session's own when it
    /// holds the start of a command. `None` when there was nothing after all.
    async fn read_input(&mut self) -> Option<IoEvent> {
        if self.inbuf.is_empty() {
            self.inbuf = self.worker.read_buf.take();
        }
        let before = self.inbuf.len();
        let (stream, inbuf) = (&mut self.stream, &mut self.inbuf);
        let ev = std::future::poll_fn(|cx| Poll::Ready(poll_read_into(stream, cx, inbuf))).await;
        match ev {
            Poll::Ready(IoEvent::Read) => {
                self.worker.stats.bytes(self.inbuf.len() - before, 0);
                Some(IoEvent::Read)
            }
            Poll::Ready(ev) => Some(ev),
            Poll::Pending => {
                self.park_input();
                None
            }
        }
    }

    /// Gives the worker's read buffer back after the commands in it were taken, keeping only
    /// the start of a command that has not fully arrived (a view into the same memory).
    fn park_input(&mut self) {
        let partial = self.inbuf.split();
        let mut rest = std::mem::replace(&mut self.inbuf, partial);
        if rest.capacity() > 1024 * 1024 {
            // Grown for one big argument: not kept for everyone.
            rest = BytesMut::new();
        }
        let mut shared = self.worker.read_buf.borrow_mut();
        if shared.capacity() < rest.capacity() {
            *shared = rest;
        }
    }

    /// Writes as much of the output as the socket takes now; `false` if the client is gone.
    fn try_flush(&mut self) -> bool {
        let before = self.out.len();
        let ok = write_now(&mut self.stream, &mut self.out).is_ok();
        self.worker.stats.bytes(0, before - self.out.len());
        if !ok {
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
        use tokio::io::AsyncWriteExt;
        let before = self.out.len();
        let (stream, out) = (&mut self.stream, &mut self.out);
        // `flush` too: TLS may hold records the socket has not taken yet.
        let ok = async {
            stream.write_all_buf(out).await?;
            stream.flush().await
        }
        .await
        .is_ok();
        self.worker.stats.bytes(0, before - self.out.len());
        ok
    }

    fn note_activity(&mut self) {
        let ms = self
            .now()
            .saturating_duration_since(self.info.created.into())
            .as_millis() as u64;
        self.info.last_active_ms.store(ms, Ordering::Relaxed);
        self.info.last_cmd.store(self.last_cmd, Ordering::Relaxed);
    }

    /// The time now, read once per wake-up: replies handled together count as arriving together.
    fn now(&mut self) -> Instant {
        *self.now.get_or_insert_with(Instant::now)
    }

    /// Whether the next command may be handled now (nothing stalled, gated or streaming, and
    /// fewer than `max_pipeline` replies owed).
    fn can_take(&self) -> bool {
        !self.closing
            && self.stalled.is_none()
            && self.stream_start.is_none()
            && self.gated.is_none()
            && self.verdicts.is_none()
            && !self.pipeline_full()
    }

    /// Whether `max_pipeline` replies, or `max_pipeline_bytes` of big requests, are owed.
    fn pipeline_full(&self) -> bool {
        let cfg = &self.worker.shared.config;
        self.queue.len() + self.grouped_extra >= cfg.max_pipeline
            || self.big_bytes as u64 >= cfg.max_pipeline_bytes.as_u64()
    }

    /// Applies `client_query_buffer_limit` to the input held; `false` when the client must be
    /// disconnected (as Redis does, without a reply: the connection is out of step).
    fn input_within_limit(&self) -> bool {
        let limit = self.worker.shared.config.client_query_buffer_limit.as_u64();
        if (self.inbuf.len() as u64) < limit {
            return true;
        }
        tracing::warn!(client = self.info.id, addr = %self.info.addr, bytes = self.inbuf.len(), "closing client that reached client_query_buffer_limit");
        self.worker
            .shared
            .clients
            .note_limit_closed(crate::clients::Limit::QueryBuffer);
        false
    }

    /// Applies the output buffer limit of the client's class (`pubsub` for subscribed clients,
    /// `normal` for the others, `MONITOR` among them as in Redis); `false` when the client must
    /// be disconnected.
    fn output_within_limit(&mut self, pubsub: bool) -> bool {
        let limits = &self.worker.shared.config.client_output_buffer_limit;
        let limit = if pubsub { limits.pubsub } else { limits.normal };
        let len = self.out.len() as u64;
        if !limit.is_set()
            || (limit.soft == 0 || len < limit.soft) && (limit.hard == 0 || len < limit.hard)
        {
            self.soft_since = None;
            return true;
        }
        let now = self.now();
        let over = if limit.hard > 0 && len >= limit.hard {
            true
        } else {
            let since = *self.soft_since.get_or_insert(now);
            now.saturating_duration_since(since) > Duration::from_secs(limit.soft_seconds)
        };
        if !over {
            return true;
        }
        let class = if pubsub { "pubsub" } else { "normal" };
        tracing::warn!(client = self.info.id, addr = %self.info.addr, bytes = len, class, "closing client that reached its client_output_buffer_limit");
        self.worker
            .shared
            .clients
            .note_limit_closed(crate::clients::Limit::OutputBuffer);
        false
    }

    fn process_input(&mut self) {
        self.batch_start = self.now();
        self.slowlog = self.worker.shared.slowlog.threshold() >= 0;
        self.refresh_topology();
        self.has_plugins = self.worker.has_plugins();
        while self.can_take() {
            if let Some(((cmd, res), pre)) = self.deferred.pop_front() {
                self.pipelined = !self.deferred.is_empty() || !self.inbuf.is_empty();
                self.handle_with(cmd, res, pre);
                continue;
            }
            if !self.has_plugins {
                match self.parser.parse(
                    &mut self.inbuf,
                    &self.worker.shared.limits,
                    self.authenticated,
                ) {
                    Ok(Some(cmd)) => {
                        self.pipelined = !self.inbuf.is_empty();
                        self.handle(cmd, None)
                    }
                    Ok(None) => break,
                    Err(e) => self.protocol_error(e),
                }
                continue;
            }
            // With plugins, a pipelined batch goes through the chain together: one call per
            // plugin for all of it. A command that changes what plugins see of the client
            // (AUTH, SELECT, CLIENT SETNAME …) ends the batch.
            // Each command with its decision when it needs no request hook (the plugins do
            // not see it, or only their response side does: see `run_batch`), found with its
            // kind in the same lookup (which then goes with the command to the stage and to
            // `handle_with`); `None` for the stage to decide, once some command needs a hook.
            let mut batch: crate::stage::Decided = Vec::new();
            let mut to_stage = false;
            let mut bytes = 0;
            // The input holds no whole command any more.
            let mut drained = false;
            let table = self.worker.shared.commands;
            let set = self.worker.plugin_set();
            let start = self.batch_start.into_std();
            loop {
                match self.parser.parse(
                    &mut self.inbuf,
                    &self.worker.shared.limits,
                    self.authenticated,
                ) {
                    Ok(Some(cmd)) => {
                        if batch.is_empty() {
                            // Sized as the last batch was (a pipelining client sends runs of
                            // one length): growing them copied the commands over and over.
                            // Not before a command is there: most reads end with none.
                            let hint = self.batch_hint.clamp(1, MAX_PLUGIN_BATCH);
                            batch.reserve_exact(hint);
                        }
                        let res = table.resolve_again(&cmd, &mut self.last_command);
                        let kind = res.spec.kind;
                        let decision = if !self.plugins_see(res.spec) {
                            Some(crate::stage::unseen())
                        } else if !to_stage {
                            let d = crate::plugin::PluginSet::decide_without_chain(
                                &set, &cmd, res.info, start,
                            );
                            to_stage = d.is_none();
                            d
                        } else if set.any_sees(&cmd, res.info) {
                            None
                        } else {
                            Some(crate::stage::unseen())
                        };
                        let ends = matches!(
                            kind,
                            Kind::Local(
                                Local::Auth
                                    | Local::Hello
                                    | Local::Select
                                    | Local::Reset
                                    | Local::Client
                                    | Local::Quit
                            ) | Kind::Stream
                                | Kind::Replica
                        );
                        if batch.is_empty() && decision.is_some() {
                            // Decided already and nothing before it waits for the stage: handled
                            // now, as without plugins (not moved into a batch and out again).
                            self.pipelined = !self.inbuf.is_empty();
                            self.handle_with(cmd, res, decision);
                            if ends || !self.can_take() {
                                break;
                            }
                            continue;
                        }
                        bytes += cmd.raw().len();
                        batch.push(((cmd, res), decision));
                        if ends
                            || batch.len() >= MAX_PLUGIN_BATCH
                            || bytes >= MAX_PLUGIN_BATCH_BYTES
                        {
                            break;
                        }
                    }
                    Ok(None) => {
                        drained = true;
                        break;
                    }
                    // Answered after the commands before it (parsing it again gives the same error).
                    Err(e) if batch.is_empty() => {
                        self.protocol_error(e);
                        drained = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                // Everything read was handled as it came: read on, unless the input holds no
                // whole command.
                if drained {
                    break;
                }
                continue;
            }
            self.batch_hint = batch.len();
            self.run_batch(batch, to_stage);
        }
        self.held_back =
            self.pipeline_full() && (!self.inbuf.is_empty() || !self.deferred.is_empty());
    }

    fn protocol_error(&mut self, e: resp::ProtocolError) {
        debug!(client = self.info.id, error = %e, "protocol error");
        self.reply_mode = ReplyMode::On;
        self.reply_error(&e.reply_text());
        self.closing = true;
    }

    /// Runs the request hooks on a batch of commands, then handles them in order; the ones
    /// that cannot be handled yet (behind a stalled or gated command) wait with their decisions.
    ///
    /// The hooks run in the worker's plugin stage, together with the other sessions' commands
    /// of this turn of the event loop: the session waits for the decisions (reading nothing
    /// meanwhile), then handles the commands in order. `to_stage`: some command has no
    /// decision yet (its request hooks must run); otherwise the batch goes on at once (see
    /// [`crate::plugin::PluginSet::decide_without_chain`]).
    fn run_batch(&mut self, batch: crate::stage::Decided, to_stage: bool) {
        let worker = self.worker.clone();
        if !to_stage {
            self.pipelined = batch.len() > 1;
            for (cmd, pre) in batch {
                self.take_decided(cmd, pre);
            }
            return;
        }
        let client = self.plugin_client().clone();
        self.verdicts = Some(worker.stage.submit_requests(client, batch));
    }

    /// The plugin stage decided about a batch of this session's commands.
    fn on_verdicts(&mut self, decided: crate::stage::Decided) {
        self.verdicts = None;
        self.pipelined = decided.len() > 1;
        for (cmd, pre) in decided {
            self.take_decided(cmd, pre);
        }
    }

    /// Handles a command whose request hooks ran, or keeps it for later behind a stalled one.
    fn take_decided(
        &mut self,
        (cmd, res): crate::stage::ResolvedCommand,
        pre: Option<PreDecision>,
    ) {
        if self.can_take() {
            self.handle_with(cmd, res, pre);
        } else if !self.closing {
            self.deferred.push_back(((cmd, res), pre));
        }
    }

    /// Whether the request hooks see a command (not the ones that authenticate or end the
    /// connection, nor anything an unauthenticated client is refused).
    fn plugins_see(&self, spec: &commands::Spec) -> bool {
        (self.authenticated || spec.no_auth)
            && !matches!(
                spec.kind,
                Kind::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
            )
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
        self.reply_always(f);
    }

    /// A reply that `CLIENT REPLY OFF|SKIP` does not silence: subscription confirmations
    /// are pushes, which Redis delivers regardless (the mode still moves on).
    fn reply_push(&mut self, f: impl FnOnce(&mut BytesMut, u8)) {
        let _ = self.take_silent();
        self.reply_always(f);
    }

    fn reply_always(&mut self, f: impl FnOnce(&mut BytesMut, u8)) {
        if self.queue.is_empty() && self.staged.is_empty() && self.hooked.is_none() {
            f(&mut self.out, self.proto);
        } else {
            let mut b = BytesMut::new();
            f(&mut b, self.proto);
            self.push_slot(Slot::Ready(b.freeze()));
        }
    }

    fn reply_error(&mut self, msg: &str) {
        // Counted apart: `INFO`'s `total_error_replies` is Redis's count plus respire's own.
        self.worker
            .shared
            .local_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.reply_with(|o, _| resp::error(o, msg));
    }

    fn reply_ok(&mut self) {
        self.reply_with(|o, _| resp::simple(o, "OK"));
    }

    fn push_slot(&mut self, slot: Slot) {
        self.queue.push_back(slot);
        self.pushed += 1;
    }

    /// The replies of scripts up to slot `seq` are in (or will never be).
    fn scripts_answered(&mut self, seq: u64) {
        while self.script_slots.front().is_some_and(|&s| s <= seq) {
            self.script_slots.pop_front();
            self.worker
                .shared
                .scripts_in_flight
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Takes the front slot with its sequence number.
    fn pop_slot(&mut self) -> (u64, Option<Slot>) {
        let seq = self.popped;
        let slot = self.queue.pop_front();
        if slot.is_some() {
            self.popped += 1;
            if !self.script_slots.is_empty() {
                self.scripts_answered(seq);
            }
            if self.blocked_until.is_some_and(|b| b <= seq) {
                self.unmark_blocked();
            }
            while let Some(&(last, n)) = self.big.front() {
                if last > seq {
                    break;
                }
                self.big.pop_front();
                self.big_bytes -= n;
            }
        }
        (seq, slot)
    }

    /// Writes the reply of slot `seq`, after the response hooks owed for it.
    fn emit(&mut self, seq: u64, bytes: Bytes) {
        let error = matches!(bytes.first(), Some(b'-') | Some(b'!'));
        self.emit_with(seq, bytes, u64::from(error), 1, &[]);
    }

    /// [`Session::emit`] for a slot whose reply may be the replies of a group of `count`
    /// commands: bit i of `errors` says whether the reply of its command i is an error.
    /// `ends`: where each reply ends in `bytes`, when the backend said (else found again).
    fn emit_with(&mut self, seq: u64, bytes: Bytes, errors: u64, count: u8, ends: &[u32]) {
        // Hooks of slots that had no reply to show (CLIENT REPLY OFF/SKIP) are dropped.
        while self.hooks.front().is_some_and(|(s, _, _)| *s < seq) {
            self.hooks.pop_front();
        }
        if count > 1 && self.hooks.front().is_some_and(|(s, _, _)| *s == seq) {
            // Some of the group's replies owe hooks: one by one, each with its own, cut where
            // the backend counted them (or found again when it did not).
            let ends = ends.get(..usize::from(count)).filter(|e| {
                e.windows(2).all(|w| w[0] <= w[1])
                    && e.last().is_some_and(|&l| l as usize <= bytes.len())
            });
            let Some(ends) = ends else {
                let frames = split_frames(&bytes, usize::from(count));
                return self.emit_frames(seq, frames, errors);
            };
            self.before_emitting(seq, errors);
            let mut start = 0;
            for (idx, &end) in ends.iter().enumerate() {
                let end = end as usize;
                let chain = self.hook_for(seq, idx);
                self.emit_part(&bytes, start..end, chain);
                start = end;
            }
            return;
        }
        if !self.after.is_empty() {
            self.run_after(seq, Some(&bytes));
        }
        if !self.stats.is_empty() {
            self.finish_stats(seq, Some(errors));
        }
        let chain = if self.hooks.front().is_some_and(|(s, _, _)| *s == seq) {
            self.hooks.pop_front().map(|(_, _, c)| c)
        } else {
            None
        };
        self.emit_one(bytes, chain);
    }

    /// Writes the replies of a group's slot one by one, each after its response hooks.
    #[inline(never)]
    fn emit_frames(&mut self, seq: u64, frames: Vec<Bytes>, errors: u64) {
        self.before_emitting(seq, errors);
        for (idx, frame) in frames.into_iter().enumerate() {
            let chain = self.hook_for(seq, idx);
            self.emit_one(frame, chain);
        }
    }

    /// What a slot's replies written one by one come after: its follow-ups and statistics,
    /// and the hooks of earlier slots that had no reply to show.
    fn before_emitting(&mut self, seq: u64, errors: u64) {
        if !self.after.is_empty() {
            self.run_after(seq, None);
        }
        if !self.stats.is_empty() {
            self.finish_stats(seq, Some(errors));
        }
        while self.hooks.front().is_some_and(|(s, _, _)| *s < seq) {
            self.hooks.pop_front();
        }
    }

    /// The response hooks owed for reply `idx` of slot `seq`, if any.
    fn hook_for(&mut self, seq: u64, idx: usize) -> Option<Box<ResponseChain>> {
        if self
            .hooks
            .front()
            .is_some_and(|(s, i, _)| *s == seq && usize::from(*i) == idx)
        {
            self.hooks.pop_front().map(|(_, _, c)| c)
        } else {
            None
        }
    }

    /// Writes one reply after the response hooks owed for it (held while they run).
    fn emit_one(&mut self, bytes: Bytes, chain: Option<Box<ResponseChain>>) {
        let all = 0..bytes.len();
        self.emit_part(&bytes, all, chain);
    }

    /// Writes the reply at `at` in `group` after the response hooks owed for it (held while
    /// they run, with the replies ready now, so that the hooks run on them together); the
    /// reply is cut out of the group only when it is held or copied for a hook.
    fn emit_part(
        &mut self,
        group: &Bytes,
        at: std::ops::Range<usize>,
        mut chain: Option<Box<ResponseChain>>,
    ) {
        let Some(reply) = group.get(at.clone()) else {
            return;
        };
        if let Some(c) = chain.take() {
            chain = self.triage_reply(c, reply, || group.slice(at.clone()));
        }
        if chain.is_some() || !self.staged.is_empty() || self.hooked.is_some() {
            self.staged.push((group.slice(at), chain));
            return;
        }
        self.out.extend_from_slice(reply);
    }

    /// A frame that is not a reply (a pub/sub message, a tracking invalidation): written
    /// after every reply already owed, as Redis writes it after what it has answered.
    fn emit_push(&mut self, frame: Bytes) {
        if self.queue.is_empty() {
            self.emit_one(frame, None);
        } else {
            self.push_slot(Slot::Ready(frame));
        }
    }

    fn emit_reply(&mut self, seq: u64, r: Reply) {
        let frame = r.unwrap_or_else(|e| error_frame(&e));
        self.emit(seq, frame);
    }

    /// Runs `f` (which answers one command) and makes `chain`'s response hooks run on the
    /// reply it produced: at once when it was written straight away, when its slot completes
    /// when it is owed, or when the command resumes when it stalled.
    fn with_hook(&mut self, chain: Option<Box<ResponseChain>>, f: impl FnOnce(&mut Self)) {
        let Some(chain) = chain else { return f(self) };
        let mark = self.out.len();
        let pushed = self.pushed;
        let was_stalled = self.stalled.is_some();
        f(self);
        if !was_stalled && self.stalled.is_some() {
            self.stalled_hook = Some(chain);
        } else if let Some((seq, idx)) = self.grouped_now {
            self.hooks.push_back((seq, idx, chain));
        } else if self.pushed > pushed {
            self.hooks.push_back((pushed, 0, chain));
        } else if self.out.len() > mark {
            let reply = self.out.split_off(mark);
            let replaced = self.run_response_plugins(chain, &reply);
            self.out
                .extend_from_slice(replaced.as_deref().unwrap_or(&reply));
        }
    }

    /// Moves every completed reply at the front of the queue to the output.
    fn collect_ready(&mut self) {
        self.collect_front();
        self.flush_staged();
    }

    fn collect_front(&mut self) {
        loop {
            let (part, r) = match self.queue.front_mut() {
                None => return,
                Some(Slot::Ready(b)) => {
                    let b = b.clone();
                    let (seq, _) = self.pop_slot();
                    self.emit(seq, b);
                    continue;
                }
                Some(Slot::Waiting { rx, .. }) => match rx.try_recv() {
                    Ok(r) => (0, r),
                    Err(TryRecvError::Empty) => return,
                    Err(TryRecvError::Closed) => (0, Err(lost())),
                },
                Some(Slot::Group(g)) => {
                    if !g.try_parts() {
                        return;
                    }
                    self.on_group();
                    continue;
                }
                Some(Slot::Merge(m)) => {
                    if !m.runs.is_empty() && m.try_runs() {
                        self.on_runs();
                        continue;
                    }
                    let Some((i, rx)) = m.awaited() else {
                        // All parts answered (cannot stay here, but never spin).
                        return;
                    };
                    match rx.try_recv() {
                        Ok(r) => (i, r),
                        Err(TryRecvError::Empty) => return,
                        Err(TryRecvError::Closed) => (i, Err(lost())),
                    }
                }
            };
            self.on_result(part, r);
        }
    }

    /// Every part of the group at the front has answered: its replies are written in the
    /// commands' order (a part that failed answers each of its commands with the error), or,
    /// over a cluster or Sentinel when some must be followed, it goes on as one retry per
    /// command.
    fn on_group(&mut self) {
        if let Some(Slot::Group(g)) = self.queue.front()
            && g.parts.iter().any(|p| p.addr.is_some())
            && g.needs_following()
        {
            return self.group_to_merge();
        }
        let (seq, Some(Slot::Group(mut g))) = self.pop_slot() else {
            return;
        };
        self.waiting -= 1;
        self.grouped_extra = self
            .grouped_extra
            .saturating_sub(usize::from(g.count.saturating_sub(1)));
        // One part that answered: its replies go on whole.
        if let [GroupPart { reply, .. }] = g.parts.as_mut_slice()
            && let Some(Ok(f)) = reply.take_if(|r| r.is_ok())
        {
            return self.emit_with(seq, f.bytes, f.errors, g.count, &f.ends);
        }
        let (frames, errors) = frames_of(g.replies().into_iter());
        self.emit_frames(seq, frames, errors);
    }

    /// Turns the group at the front into a retry per command, each following its reply as a
    /// command sent alone would (see [`RedirectCtx::follow`]); its replies are written in
    /// order once all are in.
    #[inline(never)]
    fn group_to_merge(&mut self) {
        let Some(front) = self.queue.front_mut() else {
            return;
        };
        let Slot::Group(g) = std::mem::replace(front, Slot::Ready(Bytes::new())) else {
            return;
        };
        let replies = g.replies();
        let mut taken: SmallVec<[usize; 4]> = SmallVec::from_elem(0, g.parts.len());
        let mut parts = Vec::with_capacity(replies.len());
        for (i, reply) in replies.into_iter().enumerate() {
            let pi = g.order.get(i).map_or(0, |&p| usize::from(p));
            let (Some(part), Some(n)) = (g.parts.get(pi), taken.get_mut(pi)) else {
                continue;
            };
            let (data, slot) = part.request(*n);
            *n += 1;
            let idempotent = self.idempotent_request(&data);
            let addr = part.addr.clone().unwrap_or_else(|| Rc::from(""));
            parts.push(PartState {
                rx: None,
                reply: Some(reply),
                retry: Retry::new(addr, data, slot, idempotent, false, false),
            });
        }
        let ctx = RedirectCtx {
            worker: &self.worker,
            topo: &self.topo,
            key: self.key(),
            sid: self.info.id,
        };
        for p in &mut parts {
            if let Some(reply) = &p.reply
                && let Some(rx) = ctx.follow(reply, &mut p.retry)
            {
                p.rx = Some(rx);
                p.reply = None;
            }
        }
        self.grouped_extra = self
            .grouped_extra
            .saturating_sub(usize::from(g.count.saturating_sub(1)));
        if let Some(front) = self.queue.front_mut() {
            *front = Slot::Merge(Box::new(MergeSlot {
                silent: false,
                how: Merge::First,
                layout: Vec::new(),
                parts,
                next: 0,
                each: true,
                runs: Vec::new(),
            }));
        }
        self.complete_merge();
    }

    /// Whether a request (one command's frame) may be sent again after its connection broke.
    #[inline(never)]
    fn idempotent_request(&self, data: &Bytes) -> bool {
        let mut buf = BytesMut::from(&data[..]);
        match RequestParser::new().parse(&mut buf, &self.worker.shared.limits, true) {
            Ok(Some(cmd)) => {
                let res = self.worker.shared.commands.resolve(&cmd);
                self.idempotent(&cmd, res)
            }
            _ => false,
        }
    }

    /// Completes the merge at the front once all its parts have replied.
    #[inline(never)]
    fn complete_merge(&mut self) {
        let Some(Slot::Merge(m)) = self.queue.front_mut() else {
            return;
        };
        while m.parts.get(m.next).is_some_and(|p| p.reply.is_some()) {
            m.next += 1;
        }
        if m.next < m.parts.len() {
            return;
        }
        let (seq, Some(Slot::Merge(m))) = self.pop_slot() else {
            return;
        };
        self.waiting -= 1;
        if m.silent {
            self.run_after(seq, None);
            self.finish_stats(seq, None);
            return;
        }
        if m.each {
            let replies = m
                .parts
                .into_iter()
                .map(|p| p.reply.unwrap_or_else(|| Err(lost())));
            let (frames, errors) = frames_of(replies);
            return self.emit_frames(seq, frames, errors);
        }
        let mut replies = Vec::with_capacity(m.parts.len());
        for p in m.parts {
            match p.reply {
                Some(Ok(frame)) => replies.push(frame),
                // A `SCAN` page beyond the one the cursor needs may be dropped: its failure
                // counts only if the merge takes it.
                Some(Err(e)) if matches!(m.how, Merge::Scan { .. }) => {
                    replies.push(error_frame(&e))
                }
                Some(Err(e)) => return self.emit_reply(seq, Err(e)),
                None => return,
            }
        }
        let merged = router::merge(&m.how, &replies, &m.layout);
        self.emit(seq, merged);
    }

    /// Handles a backend result for the front slot: follows a redirection, or completes the slot.
    fn on_result(&mut self, part: usize, reply: Reply) {
        let ctx = RedirectCtx {
            worker: &self.worker,
            topo: &self.topo,
            key: self.key(),
            sid: self.info.id,
        };
        match self.queue.front_mut() {
            Some(Slot::Waiting {
                rx,
                retry: Some(retry),
                ..
            }) => {
                if let Some(new_rx) = ctx.follow(&reply, retry) {
                    *rx = new_rx;
                    return;
                }
            }
            Some(Slot::Merge(m)) => {
                if let Some(p) = m.parts.get_mut(part) {
                    if let Some(new_rx) = ctx.follow(&reply, &mut p.retry) {
                        p.rx = Some(new_rx);
                        return;
                    }
                    p.rx = None;
                    p.reply = Some(reply);
                }
                return self.complete_merge();
            }
            _ => {}
        }
        if let (seq, Some(Slot::Waiting { silent, .. })) = self.pop_slot() {
            self.waiting -= 1;
            if !silent {
                self.emit_reply(seq, reply);
            } else {
                self.run_after(seq, None);
                self.finish_stats(seq, None);
            }
        }
    }

    /// Hands the replies of the split's runs that have answered to their parts, following
    /// each part's redirection or failure as [`Session::on_result`] does.
    #[inline(never)]
    fn on_runs(&mut self) {
        let ctx = RedirectCtx {
            worker: &self.worker,
            topo: &self.topo,
            key: self.key(),
            sid: self.info.id,
        };
        let Some(Slot::Merge(m)) = self.queue.front_mut() else {
            return;
        };
        for run in &mut m.runs {
            let Some(reply) = run.reply.take() else {
                continue;
            };
            for k in 0..usize::from(run.count) {
                let Some(p) = m.parts.get_mut(run.first as usize + k) else {
                    break;
                };
                let r = match &reply {
                    Ok(f) => f.frame(k).ok_or_else(lost),
                    Err(e) => Err(e.clone()),
                };
                // Only an error can be followed: values go straight in.
                let error = r.as_ref().map_or(true, |f| f.first() == Some(&b'-'));
                if error && let Some(rx) = ctx.follow(&r, &mut p.retry) {
                    p.rx = Some(rx);
                } else {
                    p.reply = Some(r);
                }
            }
        }
        self.complete_merge();
    }

    // ---- dispatch ---------------------------------------------------------

    /// Handles a command; `pre` carries the request chain's decision when it already ran.
    fn handle(&mut self, cmd: Command, pre: Option<PreDecision>) {
        let res = self
            .worker
            .shared
            .commands
            .resolve_again(&cmd, &mut self.last_command);
        self.handle_with(cmd, res, pre);
    }

    /// Handles a command already looked up in the command table.
    fn handle_with(&mut self, cmd: Command, res: Resolved<'static>, pre: Option<PreDecision>) {
        let size = cmd.raw().len();
        if size < BIG_REQUEST {
            return self.handle_resolved(cmd, res, pre);
        }
        let pushed = self.pushed;
        self.handle_resolved(cmd, res, pre);
        // Counted until the reply of its last slot is taken (a command not queued yet, stalled
        // or gated, is one at a time).
        if self.pushed > pushed {
            self.big.push_back((self.pushed - 1, size));
            self.big_bytes += size;
        }
    }

    fn handle_resolved(&mut self, cmd: Command, res: Resolved<'_>, pre: Option<PreDecision>) {
        let id = res.info.map_or(crate::stats::OTHER, |i| i.id);
        let (pushed, mark) = (self.pushed, self.out.len());
        self.last_sent = None;
        self.grouped_now = None;
        self.handle_command(cmd, res, pre);
        self.note_stat((id, self.batch_start), pushed, mark);
    }

    /// Counts a command in the metrics: now when its reply was written at once, when its
    /// reply slot completes when one was queued, later when it stalled or waits at a gate.
    fn note_stat(&mut self, (id, start): (u16, Instant), pushed: u64, mark: usize) {
        if let Some((seq, idx)) = self.grouped_now.take() {
            let sent = if self.slowlog {
                self.last_sent.take()
            } else {
                None
            };
            self.stats.push_back(Stat {
                seq,
                id,
                start,
                sent,
                idx,
            });
            return;
        }
        if let Some(g) = self.gated.as_mut() {
            if g.stat.is_none() {
                g.stat = Some((id, start));
                return;
            }
        }
        if self.stalled.is_some() {
            if self.stalled_stat.is_none() {
                self.stalled_stat = Some((id, start));
            }
            return;
        }
        if self.pushed > pushed {
            let sent = if self.slowlog {
                self.last_sent.take()
            } else {
                None
            };
            self.stats.push_back(Stat {
                seq: self.pushed - 1,
                id,
                start,
                sent,
                idx: 0,
            });
            return;
        }
        let error = matches!(self.out.get(mark), Some(b'-') | Some(b'!'));
        let elapsed = self.now().saturating_duration_since(start);
        self.worker.stats.record(id, error, elapsed);
        if self.slowlog {
            let sent = self.last_sent.take();
            // The threshold when the command is done, as Redis checks it (the command that
            // turns the log off is not logged).
            let threshold = self.worker.shared.slowlog.threshold();
            if threshold >= 0 && elapsed.as_micros() >= threshold as u128 {
                let stat = Stat {
                    seq: 0,
                    id,
                    start,
                    sent,
                    idx: 0,
                };
                self.log_slow(stat, elapsed);
            }
        }
    }

    /// Counts the replies owed up to slot `seq`, whose reply is `reply` (`None`: not shown),
    /// and logs the slow ones.
    /// `errors`: which replies of slot `seq` are errors, a bit per command of a group
    /// (`None`: the reply is not shown).
    fn finish_stats(&mut self, seq: u64, errors: Option<u64>) {
        if self.stats.is_empty() {
            return;
        }
        let now = self.now();
        let threshold = self.worker.shared.slowlog.threshold();
        let slow_from = (self.slowlog && threshold >= 0).then_some(threshold as u128);
        // Commands of one batch share their start: their time is worked out once, and a run
        // of one command that fared alike (a pipeline's) is counted at once.
        let mut last: Option<(Instant, Duration)> = None;
        let mut run: Option<(u16, bool, Duration, u64)> = None;
        while self.stats.front().is_some_and(|s| s.seq <= seq) {
            let Some(s) = self.stats.pop_front() else {
                break;
            };
            let error = s.seq == seq && errors.is_some_and(|e| (e >> s.idx) & 1 == 1);
            let elapsed = match last {
                Some((start, elapsed)) if start == s.start => elapsed,
                _ => {
                    let elapsed = now.saturating_duration_since(s.start);
                    last = Some((s.start, elapsed));
                    elapsed
                }
            };
            match &mut run {
                Some((id, e, d, n)) if *id == s.id && *e == error && *d == elapsed => *n += 1,
                _ => {
                    if let Some((id, e, d, n)) = run.replace((s.id, error, elapsed, 1)) {
                        self.worker.stats.record_n(id, e, d, n);
                    }
                }
            }
            if slow_from.is_some_and(|from| elapsed.as_micros() >= from) {
                self.log_slow(s, elapsed);
            }
        }
        if let Some((id, e, d, n)) = run {
            self.worker.stats.record_n(id, e, d, n);
        }
    }

    /// Adds a command to the slow log.
    fn log_slow(&self, s: Stat, elapsed: Duration) {
        let (args, node) = match s.sent {
            Some((data, node)) => {
                let mut buf = BytesMut::from(&data[..]);
                let limits = &self.worker.shared.limits;
                let args = match RequestParser::new().parse(&mut buf, limits, true) {
                    Ok(Some(c)) => c.to_args(),
                    _ => Vec::new(),
                };
                (
                    args,
                    node.map(|n| self.node_addr(n))
                        .unwrap_or_else(|| Arc::from("")),
                )
            }
            None => (
                vec![Bytes::from(
                    self.worker
                        .shared
                        .command_names
                        .get(s.id as usize)
                        .cloned()
                        .unwrap_or_default(),
                )],
                Arc::from(""),
            ),
        };
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let name = self.info.name.lock().map(|n| n.clone()).unwrap_or_default();
        let mut args = args;
        crate::stats::redact(&mut args);
        let entry = crate::stats::SlowEntry {
            id: 0,
            timestamp: since.saturating_sub(elapsed).as_secs(),
            duration_us: elapsed.as_micros() as u64,
            args: crate::stats::slowlog_args(&args),
            client: Arc::from(self.info.addr.to_string()),
            name,
            node,
        };
        self.worker
            .shared
            .slowlog
            .push(entry, self.worker.shared.slowlog.max_len());
    }

    fn handle_command(&mut self, mut cmd: Command, res: Resolved<'_>, pre: Option<PreDecision>) {
        let worker = self.worker.clone();
        let mut res = res;
        self.last_cmd = res.info.map_or(commands::NO_DISPLAY_ID, |i| i.display_id());
        let spec = res.spec;
        if !self.authenticated && !spec.no_auth {
            self.reply_error("NOAUTH Authentication required.");
            return;
        }
        let mut chain = None;
        let mut cache_for = None;
        let mut gate = None;
        if self.has_plugins && self.plugins_see(spec) {
            let (decision, c) = match pre {
                Some(p) => p,
                None => self.run_request_plugins(&cmd, res),
            };
            chain = c;
            match decision {
                Decision::Continue {
                    rewritten,
                    cache,
                    gate: g,
                } => {
                    if let Some(new) = rewritten {
                        cmd = *new;
                        res = worker.shared.commands.resolve(&cmd);
                    }
                    cache_for = cache;
                    gate = g;
                }
                Decision::Deny(msg) => {
                    // As a command Redis refuses while queueing: the transaction will abort.
                    if self.in_multi {
                        self.tx_poisoned = true;
                    }
                    return self.with_hook(chain, |s| s.reply_error(&msg));
                }
                Decision::Respond(bytes) => {
                    if resp::reply_len(&bytes).ok().flatten() != Some(bytes.len()) {
                        return self.with_hook(chain, |s| {
                            s.reply_error("ERR respire: a plugin answered with an invalid reply")
                        });
                    }
                    return self
                        .with_hook(chain, |s| s.reply_with(|o, _| o.extend_from_slice(&bytes)));
                }
            }
            if matches!(
                res.spec.kind,
                Kind::Stream | Kind::Unsubscribe | Kind::Replica
            ) {
                // Subscriptions and MONITOR answer with a stream, not one reply.
                chain = None;
            }
        }
        if let Some(gate) = gate {
            let rx = self.start_gate(gate);
            self.gated = Some(Box::new(Gated {
                rx,
                paused: None,
                cmd,
                chain,
                cache_for,
                stat: None,
            }));
            return;
        }
        self.proceed(cmd, res, chain, cache_for);
    }

    /// Carries on with a command the plugins let through: the response cache, then dispatch.
    fn proceed(
        &mut self,
        cmd: Command,
        res: Resolved<'_>,
        mut chain: Option<Box<ResponseChain>>,
        cache_for: Option<crate::cache::CacheFor>,
    ) {
        // A transaction's commands go to its own connection: Redis holds them there.
        if !self.in_multi
            && let Some(mode) = self.worker.shared.pause.current()
        {
            // (What only Redis can tell goes on a connection of its own: see `dispatch`.)
            if self.pause_holds(mode, &cmd, res) == Hold::Here {
                return self.hold_for_pause(cmd, res, chain, cache_for);
            }
        }
        if self.tracking.is_some() {
            self.track_command(&cmd, res);
        }
        if self.worker.shared.tracking.clients() > 0 {
            self.track_write(&cmd, res);
        }
        if cache_for.is_some() && self.worker.shared.cache.asked() {
            // The cache is idle: its tracking connections open now, and reads after are cached.
            self.worker.shared.tracking.wake.notify_one();
        }
        if !self.worker.shared.cache.is_active() {
            self.with_hook(chain, |s| s.dispatch_groupable(cmd, res));
            // Sent without the cache following it (see `cache_read`).
            self.uncached_until = self.pushed;
            return;
        }
        let mut after = self.cache_write(&cmd, res);
        if let (Some(how), None) = (cache_for, &after) {
            match self.cache_read(&cmd, res, how, &mut chain) {
                CacheRead::Done => return,
                CacheRead::Fill(g) => after = Some(After::Fill(g)),
                CacheRead::Pass => {}
            }
        }
        if after.is_none() {
            return self.with_hook(chain, |s| s.dispatch_groupable(cmd, res));
        }
        let pushed = self.pushed;
        self.with_hook(chain, |s| s.dispatch(cmd, res));
        self.note_after(pushed, after);
    }

    /// Dispatches a command whose reply needs no cache work: it may join a group.
    fn dispatch_groupable(&mut self, cmd: Command, res: Resolved<'_>) {
        self.grouped_now = None;
        self.may_group = true;
        self.dispatch(cmd, res);
        self.may_group = false;
    }

    /// Asks Redis for the shared tokens of a command (in order; all or nothing): resolves to
    /// the refusal text, or `Ok` to go on. When Redis cannot answer, the command goes on.
    fn start_gate(&self, gate: Box<crate::plugin::Gate>) -> oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let (worker, sid) = (self.worker.clone(), self.info.id);
        tokio::task::spawn_local(async move {
            let mut granted = Vec::new();
            let mut verdict = Ok(());
            for t in &gate.shared {
                match shared_take(&worker, sid, t, i64::from(t.cost)).await {
                    Ok(0) => granted.push(t),
                    Ok(wait) => {
                        t.note_refused();
                        verdict = Err(crate::plugin::rate_limit_error(&t.limiter, wait));
                        break;
                    }
                    Err(e) => t.note_error(&e),
                }
            }
            if verdict.is_err() {
                for t in granted {
                    let _ = shared_take(&worker, sid, t, -i64::from(t.cost)).await;
                }
                gate.refund_local();
            }
            let _ = tx.send(verdict);
        });
        rx
    }

    /// Redis answered a gated command's shared takes.
    fn on_gate(&mut self, verdict: Result<Result<(), String>, oneshot::error::RecvError>) {
        let Some(g) = self.gated.take() else { return };
        if g.paused.is_some() && self.blocked_until.is_none() {
            self.info.set_flag(flag::BLOCKED, false);
        }
        let Gated {
            cmd,
            chain,
            cache_for,
            stat,
            ..
        } = *g;
        let worker = self.worker.clone();
        let res = worker.shared.commands.resolve(&cmd);
        let (pushed, mark) = (self.pushed, self.out.len());
        self.last_sent = None;
        match verdict {
            Ok(Err(msg)) => {
                if self.in_multi {
                    self.tx_poisoned = true;
                }
                self.with_hook(chain, |s| s.reply_error(&msg));
            }
            _ => self.proceed(cmd, res, chain, cache_for),
        }
        if let Some(stat) = stat {
            self.note_stat(stat, pushed, mark);
        }
        self.process_input();
    }

    /// A command that writes: drops cached replies of its keys now, and says what to drop
    /// again when its reply arrives.
    fn cache_write(&mut self, cmd: &Command, res: Resolved<'_>) -> Option<After> {
        let cache = &self.worker.shared.cache;
        let name = cmd.name();
        if res.spec.kind == Kind::EndTransaction && self.in_multi {
            if name.eq_ignore_ascii_case(b"exec") && !self.tx_keys.is_empty() {
                return Some(After::Invalidate(std::mem::take(&mut self.tx_keys)));
            }
            self.tx_keys.clear();
            return None;
        }
        if commands::empties_databases(name) {
            cache.flush();
            return (!self.in_multi).then_some(After::Flush);
        }
        let info = res.info?;
        if info.has(commands::flags::READONLY) {
            return None;
        }
        // Only keys the cache keeps (under its prefixes) are dropped: most writes have none.
        let keeps = cache.keeps();
        let mut keys = Vec::new();
        info.for_each_key(cmd, |i, _| {
            if cmd.arg(i).is_some_and(&keeps) {
                keys.extend(cmd.arg_bytes(i));
            }
        });
        drop(keeps);
        if keys.is_empty() {
            return None;
        }
        for k in &keys {
            cache.invalidate(k);
        }
        if self.in_multi {
            self.tx_keys.extend(keys);
            return None;
        }
        Some(After::Invalidate(keys))
    }

    /// A read a plugin asked to cache: a hit answers it, a miss on a request already on its
    /// way waits for that one, and a plain miss is filled by this session.
    fn cache_read(
        &mut self,
        cmd: &Command,
        res: Resolved<'_>,
        how: crate::cache::CacheFor,
        chain: &mut Option<Box<ResponseChain>>,
    ) -> CacheRead {
        if self.in_multi
            || self.writes_in_flight > 0
            || self.subscribed()
            || res.spec.kind != Kind::Forward
        {
            return CacheRead::Pass;
        }
        let Some(info) = res.info else {
            return CacheRead::Pass;
        };
        if !info.has(commands::flags::READONLY)
            || info.has(commands::flags::RANDOM)
            || info.has(commands::flags::BLOCKING)
        {
            return CacheRead::Pass;
        }
        let mut keys = Vec::new();
        info.for_each_key(cmd, |i, _| keys.extend(cmd.arg_bytes(i)));
        let cache = self.worker.shared.cache.clone();
        if !cache.covers(&keys) {
            return CacheRead::Pass;
        }
        if self.uncached_until != 0 || self.cache_fence != 0 {
            // This client sent commands while the cache was off: its writes among them were not
            // followed, and only Redis's invalidations tell the cache of them. It uses the cache
            // again once their replies are in and then a fence round on the tracking
            // connections has shown every invalidation made so far applied; until then its
            // reads go to Redis (a client sees its own writes).
            if self.popped < self.uncached_until {
                return CacheRead::Pass;
            }
            let tracking = &self.worker.shared.tracking;
            if self.uncached_until != 0 {
                self.uncached_until = 0;
                self.cache_fence = tracking.fences.after_now();
                tracking.wake.notify_one();
            }
            if !tracking.fences.passed(self.cache_fence) {
                return CacheRead::Pass;
            }
            self.cache_fence = 0;
        }
        // Waiting for another client's request is possible when this one would go to one
        // node (so that it can still be sent if that client goes away) and nothing of this
        // session's is owed elsewhere (replies stay in order).
        let slot = if self.cluster_mode() {
            let first = crate::topology::key_slot(&keys[0]);
            keys.iter()
                .all(|k| crate::topology::key_slot(k) == first)
                .then_some(Some(first))
        } else {
            Some(None)
        };
        let node = slot.and_then(|slot| {
            let master = self.node_for(slot).ok()?;
            let node = self.read_node(res, slot, Use::Shared, master).ok()?;
            Some((node, slot))
        });
        let may_wait =
            node.is_some() && (self.waiting == 0 || self.last_target == Some(Target::Flight));
        let ckey = crate::cache::cache_key(self.db, self.proto, cmd);
        match cache.lookup(ckey, keys, how, may_wait) {
            crate::cache::Lookup::Hit(bytes) => {
                self.with_hook(chain.take(), |s| {
                    s.reply_with(|o, _| o.extend_from_slice(&bytes))
                });
                CacheRead::Done
            }
            crate::cache::Lookup::Wait(rx) => {
                let rx = ReplyRx::Remote(rx);
                let Some((node, slot)) = node else {
                    return CacheRead::Pass;
                };
                let mut retry = Retry::new(
                    self.retry_addr(node),
                    cmd.to_resp(),
                    slot,
                    true,
                    false,
                    false,
                );
                retry.unsent = true;
                let hook = chain.take();
                self.with_hook(hook, |s| {
                    let silent = s.take_silent();
                    s.push_slot(Slot::Waiting {
                        rx,
                        silent,
                        retry: Some(retry),
                    });
                    s.waiting += 1;
                    s.last_target = Some(Target::Flight);
                });
                CacheRead::Done
            }
            crate::cache::Lookup::Miss(g) => CacheRead::Fill(g),
            crate::cache::Lookup::Off => CacheRead::Pass,
        }
    }

    /// Files the cache work for the command just dispatched (its slots were pushed after
    /// `pushed`): at its reply, when the command stalled, or now when it was answered at once.
    fn note_after(&mut self, pushed: u64, after: Option<After>) {
        let Some(a) = after else { return };
        if self.stalled.is_some() {
            // A fill is given up (waiters send their own requests); a write's work waits.
            if !matches!(a, After::Fill(_)) {
                self.stalled_after = Some(a);
            }
            return;
        }
        match a {
            After::Fill(g) => {
                if self.pushed == pushed + 1 {
                    self.after.push_back((pushed, After::Fill(g)));
                }
            }
            a if self.pushed > pushed => {
                self.writes_in_flight += 1;
                self.after.push_back((self.pushed - 1, a));
            }
            a => self.run_one(a, None),
        }
    }

    /// Runs the cache work owed up to slot `seq`, whose reply is `reply` (`None`: not shown).
    fn run_after(&mut self, seq: u64, reply: Option<&[u8]>) {
        while self.after.front().is_some_and(|(s, _)| *s <= seq) {
            let Some((s, a)) = self.after.pop_front() else {
                break;
            };
            if !matches!(a, After::Fill(_)) {
                self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
            }
            self.run_one(a, reply.filter(|_| s == seq));
        }
    }

    fn run_one(&mut self, a: After, reply: Option<&[u8]>) {
        match a {
            After::Fill(g) => {
                if let Some(r) = reply {
                    g.complete(r);
                }
            }
            After::Invalidate(keys) => {
                for k in &keys {
                    self.worker.shared.cache.invalidate(k);
                }
            }
            After::Flush => self.worker.shared.cache.flush(),
            After::Pause(mode, timeout) => {
                if took(reply) {
                    self.worker
                        .shared
                        .pause
                        .start(mode, timeout, std::time::Instant::now());
                }
            }
            After::Unpause => {
                if took(reply) {
                    self.worker.shared.pause.stop();
                }
            }
        }
    }

    /// Carries out a command (after the plugins' request hooks).
    fn dispatch(&mut self, cmd: Command, res: Resolved<'_>) {
        let spec = res.spec;
        if self.in_multi {
            return self.handle_in_multi(cmd, res);
        }
        if self.proto == 2 && self.subscribed() {
            // RESP2 subscribe mode allows only these, as in Redis.
            match spec.kind {
                Kind::Stream
                | Kind::Unsubscribe
                | Kind::Local(Local::Quit)
                | Kind::Local(Local::Reset)
                    if !cmd.name().eq_ignore_ascii_case(b"monitor") => {}
                Kind::Local(Local::Ping) => {
                    let msg = cmd.arg_bytes(1).unwrap_or_default();
                    if cmd.len() > 2 {
                        return self.wrong_args("ping");
                    }
                    return self.reply_with(|o, _| {
                        resp::array_header(o, 2);
                        resp::bulk(o, b"pong");
                        resp::bulk(o, &msg);
                    });
                }
                _ => {
                    let name = commands::display_name(cmd.name());
                    return self.reply_error(&format!(
                        "ERR Can't execute '{name}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                    ));
                }
            }
        }
        match spec.kind {
            Kind::Forward if self.pause_own_connection(&cmd, res) => {
                // Redis holds it there or runs it, and no other client waits behind it.
                if self.route(cmd, res, Use::Blocking) {
                    self.mark_blocked();
                }
            }
            Kind::Forward => {
                self.route(cmd, res, Use::Shared);
            }
            Kind::Local(Local::Ping)
                if self.worker.shared.scripts_in_flight.load(Ordering::Relaxed) > 0 =>
            {
                // A script may be running past `busy-reply-threshold`: Redis says whether it
                // is busy (`-BUSY`), as a client pinging Redis would be told.
                self.route(cmd, res, Use::Shared);
            }
            Kind::Local(l) => {
                // Answered here: the slow log shows it as sent (Redis logs `PING` too).
                if self.slowlog {
                    self.last_sent = Some((cmd.to_resp(), None));
                }
                if self.worker.shared.monitors.active() {
                    self.monitor_local(l, &cmd, res);
                }
                self.local(l, cmd, res)
            }
            Kind::Multi => self.multi(cmd),
            Kind::Watch => {
                if self.route(cmd, res, Use::Watch) {
                    self.watching = self.exclusive.is_some();
                }
            }
            Kind::EndTransaction | Kind::Unwatch => {
                if self.watching {
                    if self.send_exclusive_pinned(cmd) {
                        self.watching = false;
                    }
                } else {
                    self.route(cmd, res, Use::Shared);
                }
            }
            Kind::Blocking => {
                if self.route(cmd, res, Use::Blocking) {
                    self.mark_blocked();
                }
            }
            Kind::MaybeBlocking => {
                if commands::has_block_option(&cmd) {
                    if self.route(cmd, res, Use::Blocking) {
                        self.mark_blocked();
                    }
                } else {
                    self.route(cmd, res, Use::Shared);
                }
            }
            Kind::Control => {
                if let Some(msg) = self.locks_respire_out(&cmd) {
                    return self.reply_error(&msg);
                }
                let sub = cmd.arg_bytes(1).unwrap_or_default();
                let config = cmd.name().eq_ignore_ascii_case(b"config");
                if config && sub.eq_ignore_ascii_case(b"resetstat") && cmd.len() == 2 {
                    self.worker.shared.reset_counters();
                }
                if config && sub.eq_ignore_ascii_case(b"set") {
                    self.config_set_own(&cmd);
                }
                // `SCRIPT KILL` / `FUNCTION KILL` on a connection of their own: the shared
                // one may be waiting behind the very script they stop.
                let kill = !config && sub.eq_ignore_ascii_case(b"kill");
                if kill && self.cluster_mode() && self.topo.shards.len() > 1 {
                    self.everywhere(cmd, Merge::AnyOk);
                } else {
                    self.route(cmd, res, if kill { Use::Exclusive } else { Use::Shared });
                }
            }
            Kind::Stream => {
                if cmd.name().eq_ignore_ascii_case(b"monitor") {
                    self.start_stream(cmd);
                } else {
                    self.subscribe(cmd);
                }
            }
            Kind::Unsubscribe => self.unsubscribe(&cmd),
            Kind::Replica => self.start_replica(cmd),
            Kind::Refused(msg) => self.reply_error(msg),
            Kind::Receivers => {
                self.receivers(cmd, res);
            }
            Kind::Cluster => {
                if self.cluster_mode() {
                    self.cluster(cmd);
                } else {
                    self.route(cmd, res, Use::Shared);
                }
            }
            Kind::ClusterConnection => {
                if self.cluster_mode() {
                    self.reply_ok();
                } else {
                    self.route(cmd, res, Use::Shared);
                }
            }
        }
    }

    /// `PUBLISH`, `SPUBLISH`, `PUBSUB`. Over several masters `PUBLISH` goes where respire's
    /// subscriber connections listen ([`Topology::channels_master`]). When respire's clients
    /// are subscribed to what the reply counts, the count is corrected in a merge of the
    /// replies (see [`crate::pubsub::Census`]).
    fn receivers(&mut self, cmd: Command, res: Resolved<'_>) -> bool {
        let publish = cmd.name().eq_ignore_ascii_case(b"publish");
        let channels = self.topo.channels_master();
        let Some(how) = self.receivers_correction(&cmd) else {
            return match channels {
                Some(node) if publish && self.cluster_mode() => {
                    self.send(cmd, res, node, Use::Shared, None)
                }
                _ => self.route(cmd, res, Use::Shared),
            };
        };
        let targets = if publish || !self.cluster_mode() {
            channels.map(|node| vec![(node, cmd.to_resp(), None)])
        } else {
            match router::plan(&cmd, res.info, &self.topo) {
                Plan::Single(slot) => self
                    .node_for(slot)
                    .ok()
                    .map(|node| vec![(node, cmd.to_resp(), slot)]),
                Plan::FanOut(_) => Some(self.fan_out_targets(cmd.to_resp())),
                _ => None,
            }
        };
        match targets {
            Some(targets) => self.send_parts(cmd, res, how, Vec::new(), targets, None),
            // No master known: the usual way (it waits for one, or says why not).
            None => self.route(cmd, res, Use::Shared),
        }
    }

    /// The merge that corrects the subscriber counts of `PUBLISH`, `SPUBLISH` or
    /// `PUBSUB NUMSUB|SHARDNUMSUB` for respire's own subscribers, if there is anything to add.
    fn receivers_correction(&self, cmd: &Command) -> Option<Merge> {
        let census = &self.worker.shared.census;
        if census.is_empty() {
            return None;
        }
        let name = cmd.name();
        let first = cmd.arg_bytes(1).unwrap_or_default();
        let kind = if name.eq_ignore_ascii_case(b"publish") {
            let d = census.publish_correction(&first);
            return (d != 0).then_some(Merge::SumIntPlus(d));
        } else if name.eq_ignore_ascii_case(b"spublish") {
            let d = census.correction(SubKind::Shard, &first);
            return (d != 0).then_some(Merge::SumIntPlus(d));
        } else if first.eq_ignore_ascii_case(b"numpat") {
            // Summed over the masters: the patterns respire echoes there are not the clients'.
            let d = census.numpat_correction();
            return (d != 0).then_some(Merge::SumIntPlus(d));
        } else if first.eq_ignore_ascii_case(b"numsub") {
            SubKind::Channel
        } else if first.eq_ignore_ascii_case(b"shardnumsub") {
            SubKind::Shard
        } else {
            return None;
        };
        let plus: Vec<(Bytes, i64)> = (2..cmd.len())
            .filter_map(|i| cmd.arg_bytes(i))
            .filter_map(|ch| {
                let d = census.correction(kind, &ch);
                (d != 0).then(|| {
                    let mut b = BytesMut::new();
                    crate::protocol::bulk(&mut b, &ch);
                    (b.freeze(), d)
                })
            })
            .collect();
        (!plus.is_empty()).then_some(Merge::SumPairsPlus(plus))
    }

    /// The same command (`data`) for every master, each with a slot it serves (for a retry).
    fn fan_out_targets(&self, data: Bytes) -> Vec<(usize, Bytes, Option<u16>)> {
        self.topo
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (s.master, data.clone(), self.topo.slot_of_shard(i)))
            .collect()
    }

    /// A fan-out command for the replicas too ([`router::replicas_too`]), their replies not
    /// waited for (the client gets the masters'). A replica that is down misses it.
    fn send_to_replicas(&self, data: &Bytes) {
        let key = ConnKey::new(0, self.proto);
        for shard in &self.topo.shards {
            for &r in &shard.replicas {
                let conn = self
                    .worker
                    .pool(&self.node_addr(r))
                    .shared(key, self.info.id);
                drop(conn.send(data.clone(), 0, false));
            }
        }
    }

    /// A command for every master, each on a connection of its own (a shared one may be
    /// waiting behind what the command is about), the replies merged by `merge`:
    /// - `SCRIPT KILL` / `FUNCTION KILL` over several masters: the script runs on one of
    ///   them; `+OK` if one stopped it, the first reply (`-NOTBUSY`) otherwise;
    /// - `CLIENT PAUSE` / `UNPAUSE`: every master, `+OK` when all took it.
    ///
    /// `false` when it waits behind replies owed on other connections.
    fn everywhere(&mut self, cmd: Command, merge: Merge) -> bool {
        let mut c = Some(cmd);
        if !self.barrier(&mut c, Target::Exclusive) {
            return false;
        }
        let Some(cmd) = c else { return false };
        self.flush_group();
        let data = cmd.into_resp();
        let key = ConnKey::new(0, self.proto);
        let masters: Vec<usize> = self.topo.masters().collect();
        let mut parts = Vec::with_capacity(masters.len());
        for node in masters {
            let conn = self.worker.pool(&self.node_addr(node)).checkout(key);
            let rx = conn.send(data.clone(), 0, false);
            let mut retry = Retry::new(
                self.retry_addr(node),
                data.clone(),
                None,
                false,
                true,
                false,
            );
            // Kept until the reply: the connection closes with its last handle.
            retry.conn = Some(conn);
            parts.push(PartState {
                rx: Some(rx),
                reply: None,
                retry,
            });
        }
        self.push_merge(merge, Vec::new(), parts, Vec::new(), Target::Exclusive);
        true
    }

    /// Why a command would change the credentials respire logs in to Redis with, if it would:
    /// `CONFIG SET requirepass`, or `ACL SETUSER` / `ACL DELUSER` of respire's own backend
    /// user. Applied, it would lock every new backend connection out (and with it every
    /// client), so it is refused: such a change is made on Redis and in respire's
    /// configuration together.
    fn locks_respire_out(&self, cmd: &Command) -> Option<String> {
        let name = cmd.name();
        let sub = cmd.arg_bytes(1)?;
        if name.eq_ignore_ascii_case(b"config") && sub.eq_ignore_ascii_case(b"set") {
            let mut i = 2;
            while let Some(param) = cmd.arg_bytes(i) {
                if param.eq_ignore_ascii_case(b"requirepass") {
                    return Some(
                        "ERR respire: CONFIG SET requirepass would lock respire out of Redis; \
                         change the password on Redis and in respire's backend.password together"
                            .into(),
                    );
                }
                i += 2;
            }
            return None;
        }
        let acl = name.eq_ignore_ascii_case(b"acl")
            && (sub.eq_ignore_ascii_case(b"setuser") || sub.eq_ignore_ascii_case(b"deluser"));
        if !acl {
            return None;
        }
        let own = self
            .worker
            .shared
            .config
            .backend
            .username
            .as_deref()
            .unwrap_or("default");
        if own == "default" && sub.eq_ignore_ascii_case(b"deluser") {
            return None; // Redis refuses to delete it itself.
        }
        let last = if sub.eq_ignore_ascii_case(b"setuser") {
            2
        } else {
            cmd.len().saturating_sub(1)
        };
        (2..=last)
            .filter_map(|i| cmd.arg_bytes(i))
            .any(|user| user[..] == *own.as_bytes())
            .then(|| {
                format!(
                    "ERR respire: ACL {} {own} would change the user respire logs in to Redis as; \
                     change it on Redis and in respire's backend settings together",
                    String::from_utf8_lossy(&sub).to_uppercase()
                )
            })
    }

    /// `CONFIG SET` of the slow log's settings and of `tracking-table-max-keys` applies to
    /// respire's slow log and tracking table too (the command still goes to Redis, for its own).
    fn config_set_own(&self, cmd: &Command) {
        let log = &self.worker.shared.slowlog;
        let mut i = 2;
        while let (Some(name), Some(value)) = (cmd.arg_bytes(i), cmd.arg_bytes(i + 1)) {
            let value = parse_i64(&value);
            if name.eq_ignore_ascii_case(b"slowlog-log-slower-than") {
                if let Some(us) = value {
                    log.set_threshold(us);
                }
            } else if name.eq_ignore_ascii_case(b"slowlog-max-len") {
                if let Some(n) = value.and_then(|n| usize::try_from(n).ok()) {
                    log.set_max_len(n);
                }
            } else if name.eq_ignore_ascii_case(b"tracking-table-max-keys") {
                // respire's tracking table is the one that fills (Redis's holds nothing).
                if let Some(n) = value.and_then(|n| usize::try_from(n).ok()) {
                    let shared = &self.worker.shared;
                    shared.tracking.set_max_keys(n, &shared.clients);
                }
            }
            i += 2;
        }
    }

    /// The blocking command just sent (the last slot) blocks the client until its reply:
    /// `CLIENT LIST` shows it, `INFO` counts it and `CLIENT UNBLOCK` finds its connection.
    fn mark_blocked(&mut self) {
        self.blocked_until = Some(self.pushed.saturating_sub(1));
        self.info.set_flag(flag::BLOCKED, true);
        if let (Some(ex), Ok(mut on)) = (&self.exclusive, self.info.blocked_on.lock()) {
            *on = Some((ex.addr.clone(), ex.conn.server_id()));
        }
    }

    fn unmark_blocked(&mut self) {
        self.blocked_until = None;
        self.info.set_flag(flag::BLOCKED, false);
        if let Ok(mut on) = self.info.blocked_on.lock() {
            *on = None;
        }
    }

    /// The client as plugins see it.
    fn plugin_client(&mut self) -> &ClientHandle {
        if self
            .plugin_client
            .as_ref()
            .is_some_and(|c| c.details.db != self.db || c.details.protocol != self.proto)
        {
            self.plugin_client = None;
        }
        if self.plugin_client.is_none() {
            self.client_generation = self.client_generation.wrapping_add(1);
        }
        let (info, db, protocol, generation) =
            (&self.info, self.db, self.proto, self.client_generation);
        self.plugin_client.get_or_insert_with(|| ClientHandle {
            generation,
            details: Arc::new(PluginClient {
                id: info.id,
                addr: info.addr.to_string(),
                user: info.user.lock().map(|u| u.clone()).unwrap_or_default(),
                db,
                name: info
                    .name
                    .lock()
                    .map(|n| String::from_utf8_lossy(&n).into_owned())
                    .unwrap_or_default(),
                protocol,
            }),
        })
    }

    /// Runs the request hooks of the plugins that want this one command.
    fn run_request_plugins(&mut self, cmd: &Command, res: Resolved<'_>) -> PreDecision {
        let worker = self.worker.clone();
        let set = worker.plugin_set();
        let client = self.plugin_client().clone();
        let one = [ChainRequest {
            client: &client,
            cmd,
            info: res.info,
        }];
        let mut out = worker
            .plugins
            .borrow_mut()
            .on_requests(&set, worker.shared.commands, &one);
        out.pop().unwrap_or((
            Decision::Continue {
                rewritten: None,
                cache: None,
                gate: None,
            },
            None,
        ))
    }

    /// Runs what the plugins owe one reply written at once: the replacement, if a plugin made
    /// one (hooks that may replace it run now; observing ones in the stage, on a copy).
    fn run_response_plugins(
        &mut self,
        chain: Box<ResponseChain>,
        reply: &BytesMut,
    ) -> Option<Vec<u8>> {
        let chain = self.triage_reply(chain, reply, || Bytes::copy_from_slice(reply))?;
        let worker = self.worker.clone();
        let client = self.plugin_client().clone();
        let one = [ChainResponse {
            client: &client,
            chain: &chain,
            reply,
        }];
        let replaced = worker
            .plugins
            .borrow_mut()
            .on_responses(&one, true)
            .pop()
            .flatten();
        worker.stage.flush_later();
        replaced
    }

    /// What the plugins owe a reply: `None` when it can be written now (its traffic metrics
    /// recorded, a copy — made by `copy` — handed to observing hooks), or the chain to hold it
    /// for, for hooks that may replace it.
    fn triage_reply(
        &mut self,
        mut chain: Box<ResponseChain>,
        reply: &[u8],
        copy: impl FnOnce() -> Bytes,
    ) -> Option<Box<ResponseChain>> {
        let worker = self.worker.clone();
        let now = self.now().into_std();
        let route = worker.plugins.borrow_mut().on_reply(&mut chain, reply, now);
        if route == ReplyRoute::Hold {
            return Some(chain);
        }
        worker.stage.flush_later();
        if route == ReplyRoute::Observe {
            let client = self.plugin_client().clone();
            worker.stage.submit_observed(client, copy(), chain);
        }
        None
    }

    /// Hands the replies held for response hooks to the worker's plugin stage (where they
    /// run with the other sessions' replies of this turn); they are written, in order, when
    /// they come back ([`Session::on_hooked`]).
    fn flush_staged(&mut self) {
        if self.staged.is_empty() || self.hooked.is_some() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        if staged.iter().all(|(_, chain)| chain.is_none()) {
            for (reply, _) in &staged {
                self.out.extend_from_slice(reply);
            }
            return;
        }
        let worker = self.worker.clone();
        let client = self.plugin_client().clone();
        self.hooked = Some(worker.stage.submit_responses(client, staged));
    }

    /// The plugin stage ran the response hooks of the held replies: write them.
    fn on_hooked(&mut self, replies: Vec<Bytes>) {
        self.hooked = None;
        for r in replies {
            self.out.extend_from_slice(&r);
        }
        self.flush_staged();
    }

    fn set_multi(&mut self, on: bool) {
        self.in_multi = on;
        self.tx_keys.clear();
        self.tx_held.clear();
        self.info.set_flag(flag::MULTI, on);
        if !on {
            self.multi_cmd = None;
            self.tx_poisoned = false;
            self.tx_pause = None;
        }
    }

    /// Any master for keyless commands (the same one for a session, spreading sessions over masters).
    fn any_master(&self) -> Option<usize> {
        let n = self.topo.shards.len();
        if n == 0 {
            return None;
        }
        let shard = &self.topo.shards[(self.info.id % n as u64) as usize];
        Some(shard.master)
    }

    /// The node a single-slot plan goes to, or the error to reply.
    fn node_for(&self, slot: Option<u16>) -> Result<usize, &'static str> {
        match slot {
            Some(s) => self.topo.master_of(s).ok_or(CLUSTERDOWN),
            None => self.any_master().ok_or(CLUSTERDOWN),
        }
    }

    /// The node a read goes to under `read_from`: a replica of the slot's shard, or `master`.
    fn read_node(
        &self,
        res: Resolved<'_>,
        slot: Option<u16>,
        how: Use,
        master: usize,
    ) -> Result<usize, &'static str> {
        let mode = self.worker.shared.config.backend.read_from;
        let Some(slot) = slot else { return Ok(master) };
        if mode == ReadFrom::Master || how != Use::Shared {
            return Ok(master);
        }
        if !res.has(commands::flags::READONLY) {
            return Ok(master);
        }
        let replicas = self
            .topo
            .slots
            .get(slot as usize)
            .and_then(|&s| self.topo.shards.get(s as usize))
            .map(|s| s.replicas.as_slice())
            .unwrap_or_default();
        match (replicas.is_empty(), mode) {
            (false, _) => Ok(replicas[(self.info.id % replicas.len() as u64) as usize]),
            (true, ReadFrom::Replica) => {
                Err("ERR respire: no replica is available for this key (read_from = \"replica\")")
            }
            (true, _) => Ok(master),
        }
    }

    /// Routes a command by its keys and sends it; `false` if it could not be sent now (stalled) or was refused.
    fn route(&mut self, cmd: Command, res: Resolved<'_>, how: Use) -> bool {
        if !self.cluster_mode() {
            return match self.node_for(None) {
                Ok(node) => self.send(cmd, res, node, how, None),
                Err(_) => self.send_when_master_known(cmd, res, None, how),
            };
        }
        let plan = router::plan(&cmd, res.info, &self.topo);
        match plan {
            Plan::Single(slot) => match self
                .node_for(slot)
                .and_then(|n| self.read_node(res, slot, how, n))
            {
                Ok(node) => self.send(cmd, res, node, how, slot),
                Err(e) if self.topo.managed && e == CLUSTERDOWN => {
                    self.send_when_master_known(cmd, res, slot, how)
                }
                Err(e) => {
                    self.worker.shared.topology.request_refresh();
                    self.reply_error(e);
                    false
                }
            },
            Plan::Error(e) => {
                self.reply_error(&e);
                false
            }
            _ if how != Use::Shared => {
                self.reply_error(CROSSSLOT);
                false
            }
            Plan::Split(merge, parts, all) => {
                let mut targets = Vec::with_capacity(parts.len());
                for p in &parts {
                    match self.topo.master_of(p.slot) {
                        Some(n) => targets.push((n, p.data.clone(), Some(p.slot))),
                        None => {
                            self.reply_error(CLUSTERDOWN);
                            return false;
                        }
                    }
                }
                self.send_parts(cmd, res, merge, parts, targets, Some(all))
            }
            Plan::FanOut(merge) => {
                if router::replicas_too(&cmd) {
                    self.send_to_replicas(cmd.raw());
                }
                let targets = self.fan_out_targets(cmd.to_resp());
                self.send_parts(cmd, res, merge, Vec::new(), targets, None)
            }
            Plan::Scan {
                ordinal,
                data,
                chain,
            } => {
                let total = self.topo.shards.len();
                if ordinal >= total {
                    self.reply_error("ERR invalid cursor");
                    return false;
                }
                let last = if chain { total } else { ordinal + 1 };
                let targets = (ordinal..last)
                    .filter_map(|i| {
                        let node = self.topo.shards.get(i)?.master;
                        Some((node, data.clone(), self.topo.slot_of_shard(i)))
                    })
                    .collect();
                self.send_parts(
                    cmd,
                    res,
                    Merge::Scan { ordinal, total },
                    Vec::new(),
                    targets,
                    None,
                )
            }
        }
    }

    /// Checks the ordering barrier for `target`; stalls `cmd` and returns `false` if it must wait.
    fn barrier(&mut self, cmd: &mut Option<Command>, target: Target) -> bool {
        if self.waiting > 0 && self.last_target != Some(target) {
            self.stalled = cmd.take();
            return false;
        }
        true
    }

    /// Whether a command may be sent again after its connection broke (it may have run once).
    fn idempotent(&self, cmd: &Command, res: Resolved<'_>) -> bool {
        let Some(info) = res.info else { return false };
        if info.has(commands::flags::READONLY) {
            return true;
        }
        let name = cmd.name();
        let plain_set = name.eq_ignore_ascii_case(b"set")
            && !cmd.iter().skip(3).any(|a| {
                a.eq_ignore_ascii_case(b"nx")
                    || a.eq_ignore_ascii_case(b"xx")
                    || a.eq_ignore_ascii_case(b"get")
            });
        plain_set
            || [
                &b"mset"[..],
                b"setex",
                b"psetex",
                b"hset",
                b"hmset",
                b"sadd",
                b"srem",
                b"hdel",
                b"zrem",
                b"expire",
                b"pexpire",
                b"expireat",
                b"pexpireat",
                b"persist",
                b"del",
                b"unlink",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
    }

    /// Queues a command whose slot has no known master yet: it is sent once one is known
    /// (within `failover_timeout`).
    fn send_when_master_known(
        &mut self,
        cmd: Command,
        res: Resolved<'_>,
        slot: Option<u16>,
        how: Use,
    ) -> bool {
        let target = if how == Use::Shared {
            Target::Shared(self.key())
        } else {
            Target::Exclusive
        };
        let mut c = Some(cmd);
        if !self.barrier(&mut c, target) {
            return false;
        }
        let Some(cmd) = c else { return false };
        if how == Use::Watch {
            self.reply_error(CLUSTERDOWN);
            return false;
        }
        let idempotent = self.idempotent(&cmd, res);
        let mut retry = Retry::new(
            Rc::from(""),
            cmd.to_resp(),
            slot,
            idempotent,
            how != Use::Shared,
            how == Use::Blocking,
        );
        let ctx = RedirectCtx {
            worker: &self.worker,
            topo: &self.topo,
            key: self.key(),
            sid: self.info.id,
        };
        let unavailable = Err(BackendError::Unavailable {
            addr: Arc::from("cluster"),
            reason: "no master serves this slot".into(),
        });
        let Some(rx) = ctx.wait_for_master(&mut retry, unavailable) else {
            self.reply_error(CLUSTERDOWN);
            return false;
        };
        let silent = self.take_silent();
        self.push_slot(Slot::Waiting {
            rx,
            silent,
            retry: Some(retry),
        });
        self.waiting += 1;
        self.last_target = Some(target);
        true
    }

    /// Sends a single command to `node` (shared, or an exclusive connection for blocking/WATCH).
    fn send(
        &mut self,
        cmd: Command,
        res: Resolved<'_>,
        node: usize,
        how: Use,
        slot: Option<u16>,
    ) -> bool {
        if how == Use::Shared && res.has(commands::flags::SCRIPT) {
            return self.send_script(cmd, res, node, slot);
        }
        let target = if how == Use::Shared {
            Target::Shared(self.key())
        } else {
            Target::Exclusive
        };
        let mut c = Some(cmd);
        if !self.barrier(&mut c, target) {
            return false;
        }
        let Some(cmd) = c else { return false };
        if how == Use::Shared
            && self.may_group
            && (self.pipelined || self.open.is_some())
            && self.reply_mode == ReplyMode::On
            && cmd.raw().len() <= GROUP_COMMAND_BYTES
        {
            self.release_unpinned_exclusive();
            let data = cmd.into_resp();
            if self.slowlog {
                self.last_sent = Some((data.clone(), Some(node)));
            }
            self.join_group(node, data, slot);
            return true;
        }
        let idempotent = self.topo.managed && self.idempotent(&cmd, res);
        // The frame goes to the backend; a reference is kept only for the slow log and for a
        // retry (every clone and drop of a shared buffer is an atomic count).
        let data = cmd.into_resp();
        let logged = self.slowlog.then(|| data.clone());
        let retry = self.topo.managed.then(|| data.clone());
        let blocking = how == Use::Blocking;
        let rx = if how == Use::Shared {
            self.release_unpinned_exclusive();
            self.shared_conn(node).send(data, 0, false)
        } else {
            // `SCRIPT KILL` on database 0: a new connection's `SELECT` would get `BUSY`.
            let key = if how == Use::Exclusive {
                ConnKey::new(0, self.proto)
            } else {
                self.key()
            };
            match self.exclusive_for(node, key) {
                Ok(conn) => conn.send(data, 0, blocking),
                Err(e) => {
                    self.reply_error(e);
                    return false;
                }
            }
        };
        if let Some(data) = logged {
            self.last_sent = Some((data, Some(node)));
        }
        self.push_waiting(
            rx,
            retry,
            how != Use::Shared,
            blocking,
            node,
            slot,
            idempotent,
        );
        true
    }

    /// [`Session::send`] of a script or function: on the scripts' lane (see
    /// `ConnKey::scripts`), after the replies the client is owed on other connections.
    #[inline(never)]
    fn send_script(
        &mut self,
        cmd: Command,
        res: Resolved<'_>,
        node: usize,
        slot: Option<u16>,
    ) -> bool {
        // Lane 1, or the first lane a script is not holding (the last if all are).
        let now = self.now();
        let mut key = ConnKey {
            lane: 1,
            ..self.key()
        };
        let mut other = None;
        if self.lane_conn(node, key).is_held(now) {
            let pool = self.worker.pool(&self.node_addr(node));
            loop {
                key.lane += 1;
                let conn = pool.shared(key, self.info.id);
                let held = conn.is_held(now);
                other = Some(conn);
                if key.lane == SCRIPT_LANES || !held {
                    break;
                }
            }
        }
        let target = Target::Shared(key);
        let mut c = Some(cmd);
        if !self.barrier(&mut c, target) {
            return false;
        }
        let Some(cmd) = c else { return false };
        self.release_unpinned_exclusive();
        self.flush_group();
        let idempotent = self.topo.managed && self.idempotent(&cmd, res);
        let data = cmd.into_resp();
        if self.slowlog {
            self.last_sent = Some((data.clone(), Some(node)));
        }
        let retry = self.topo.managed.then(|| data.clone());
        let rx = match &other {
            Some(conn) => conn.send(data, 0, false),
            None => self.lane_conn(node, key).send(data, 0, false),
        };
        self.script_slots.push_back(self.pushed);
        self.worker
            .shared
            .scripts_in_flight
            .fetch_add(1, Ordering::Relaxed);
        self.push_waiting(rx, retry, false, false, node, slot, idempotent);
        self.last_target = Some(target);
        true
    }

    fn node_addr(&self, node: usize) -> Arc<str> {
        self.topo.node_addr(node)
    }

    /// The address a retry record keeps (see [`Worker::node_addr`]).
    fn retry_addr(&self, node: usize) -> Rc<str> {
        self.worker.node_addr(&self.topo, node)
    }

    #[allow(clippy::too_many_arguments)]
    fn push_waiting(
        &mut self,
        rx: ReplyRx,
        retry: Option<Bytes>,
        exclusive: bool,
        blocking: bool,
        node: usize,
        slot: Option<u16>,
        idempotent: bool,
    ) {
        // What a redirect or failover sends again (managed topologies only).
        let retry = retry.map(|data| {
            Retry::new(
                self.retry_addr(node),
                data,
                slot,
                idempotent,
                exclusive,
                blocking,
            )
        });
        let silent = self.take_silent();
        self.push_slot(Slot::Waiting { rx, silent, retry });
        self.waiting += 1;
        self.last_target = Some(if exclusive {
            Target::Exclusive
        } else {
            Target::Shared(self.key())
        });
    }

    /// Sends several requests on shared connections and queues one merged reply. `all`: the
    /// targets' data back to back, when they lie so: consecutive targets on one node then go
    /// as one request (a run).
    fn send_parts(
        &mut self,
        cmd: Command,
        res: Resolved<'_>,
        how: Merge,
        layout: Vec<router::Part>,
        targets: Vec<(usize, Bytes, Option<u16>)>,
        all: Option<Bytes>,
    ) -> bool {
        let mut c = Some(cmd);
        if !self.barrier(&mut c, Target::Shared(self.key())) {
            return false;
        }
        let Some(cmd) = c else { return false };
        self.release_unpinned_exclusive();
        let mut parts = Vec::with_capacity(targets.len());
        let idempotent = self.topo.managed && self.idempotent(&cmd, res);
        if self.slowlog {
            let node = (targets.len() == 1).then(|| targets[0].0);
            self.last_sent = Some((cmd.to_resp(), node));
        }
        let mut runs = Vec::new();
        // Where the next target's data starts in `all`.
        let mut at = 0;
        let mut i = 0;
        while let Some(&(node, _, _)) = targets.get(i) {
            // The run of targets for this node (up to a group's size), when their data lie
            // back to back in `all`.
            let mut n = 1;
            if all.is_some() {
                while n < crate::backend::MAX_GROUP
                    && targets.get(i + n).is_some_and(|t| t.0 == node)
                {
                    n += 1;
                }
            }
            let run = targets.get(i..i + n).unwrap_or_default();
            let len: usize = run.iter().map(|t| t.1.len()).sum();
            let joined = match &all {
                Some(all) if n > 1 && at + len <= all.len() => Some(all.slice(at..at + len)),
                _ => None,
            };
            if let Some(data) = joined {
                let (tx, rx) = crate::channel::oneshot();
                self.shared_conn(node).send_group(data, n as u8, true, tx);
                runs.push(PartRun {
                    rx: Some(rx),
                    reply: None,
                    first: i as u32,
                    count: n as u8,
                });
            } else {
                n = 1;
            }
            let addr = self.retry_addr(node);
            for (j, (_, data, slot)) in run.iter().take(n).enumerate() {
                let rx =
                    (n == 1 && j == 0).then(|| self.shared_conn(node).send(data.clone(), 0, false));
                parts.push(PartState {
                    rx,
                    reply: None,
                    retry: Retry::new(addr.clone(), data.clone(), *slot, idempotent, false, false),
                });
            }
            at += run.iter().take(n).map(|t| t.1.len()).sum::<usize>();
            i += n;
        }
        self.push_merge(how, layout, parts, runs, Target::Shared(self.key()));
        true
    }

    /// Queues the merged reply of `parts` (sent to `target`).
    fn push_merge(
        &mut self,
        how: Merge,
        layout: Vec<router::Part>,
        parts: Vec<PartState>,
        runs: Vec<PartRun>,
        target: Target,
    ) {
        let silent = self.take_silent();
        self.push_slot(Slot::Merge(Box::new(MergeSlot {
            silent,
            how,
            layout,
            parts,
            next: 0,
            each: false,
            runs,
        })));
        self.waiting += 1;
        self.last_target = Some(target);
    }

    /// Adds a command for the shared connection of `node` to the open group, or opens one
    /// (with a slot of its own) when it cannot join: the open group is for another database,
    /// has slots after its own, or is full. `slot`: the slot of its keys (for a retry).
    fn join_group(&mut self, node: usize, data: Bytes, slot: Option<u16>) {
        let key = self.key();
        // The common case: the open group has a part for this connection.
        let pushed = self.pushed;
        if let Some(g) = self.open.as_mut()
            && g.open_to(key, pushed)
            && let Some(part) = g.parts.iter().position(|p| p.node == node)
        {
            let idx = g.add(part, data, slot);
            self.grouped_extra += 1;
            self.grouped_now = Some((g.seq, idx));
            self.last_target = Some(Target::Shared(key));
            return;
        }
        self.join_group_slow(node, data, slot);
    }

    /// [`Session::join_group`] when a group or a part must be opened first.
    #[inline(never)]
    fn join_group_slow(&mut self, node: usize, data: Bytes, slot: Option<u16>) {
        let key = self.key();
        let joinable = self.open.as_ref().is_some_and(|g| {
            g.open_to(key, self.pushed)
                && (g.parts.len() < MAX_GROUP_PARTS || g.parts.iter().any(|p| p.node == node))
        });
        if !joinable {
            self.flush_group();
            let seq = self.pushed;
            self.push_slot(Slot::Group(Box::new(GroupSlot {
                parts: SmallVec::new(),
                order: Vec::new(),
                count: 0,
            })));
            self.waiting += 1;
            self.open = Some(OpenGroup {
                key,
                seq,
                parts: SmallVec::new(),
                order: Vec::new(),
                count: 0,
                managed: self.topo.managed,
            });
        }
        let known = self
            .open
            .as_ref()
            .and_then(|g| g.parts.iter().position(|p| p.node == node));
        let new_part = match known {
            Some(_) => None,
            None => {
                let conn = self.conn_on(node).clone();
                let addr = self.topo.managed.then(|| self.retry_addr(node));
                Some((conn, addr))
            }
        };
        let (Some(g), Some(Slot::Group(gs))) = (self.open.as_mut(), self.queue.back_mut()) else {
            return;
        };
        let part = match (known, new_part) {
            (Some(pi), _) => pi,
            (None, Some((conn, addr))) => {
                let (tx, rx) = crate::channel::oneshot();
                g.parts.push(OpenPart {
                    conn,
                    node,
                    first: Bytes::new(),
                    data: BytesMut::new(),
                    count: 0,
                    tx,
                    sent: if g.managed {
                        Vec::with_capacity(16)
                    } else {
                        Vec::new()
                    },
                });
                gs.parts.push(GroupPart {
                    rx: Some(rx),
                    reply: None,
                    addr,
                    data: Bytes::new(),
                    sent: Vec::new(),
                });
                if g.parts.len() == 2 {
                    gs.parts.reserve(2);
                    g.parts.reserve(2);
                    let mut order = Vec::with_capacity(32);
                    order.resize(usize::from(g.count), 0);
                    g.order = order;
                }
                g.parts.len() - 1
            }
            (None, None) => return,
        };
        let idx = g.add(part, data, slot);
        let seq = g.seq;
        if idx > 0 {
            self.grouped_extra += 1;
        }
        self.grouped_now = Some((seq, idx));
        self.last_target = Some(Target::Shared(key));
    }

    /// Sends the open group, if any.
    #[inline]
    fn flush_group(&mut self) {
        if self.open.is_some() {
            self.send_open_group();
        }
    }

    #[inline(never)]
    fn send_open_group(&mut self) {
        let Some(g) = self.open.take() else {
            return;
        };
        // Where each reply ends is needed to put several parts' replies back in order, to
        // follow one of them, and, with plugins, to run a reply's hooks on it alone.
        let ends = g.managed || g.parts.len() > 1 || (self.has_plugins && g.count > 1);
        let at = g.seq.checked_sub(self.popped).map(|i| i as usize);
        let mut slot = match at.and_then(|at| self.queue.get_mut(at)) {
            Some(Slot::Group(gs)) => {
                gs.count = g.count;
                gs.order = g.order;
                Some(gs)
            }
            _ => None,
        };
        for (i, p) in g.parts.into_iter().enumerate() {
            let data = if p.count == 1 {
                p.first
            } else {
                p.data.freeze()
            };
            if g.managed
                && let Some(part) = slot.as_mut().and_then(|gs| gs.parts.get_mut(i))
            {
                part.data = data.clone();
                part.sent = p.sent;
            }
            p.conn.send_group(data, p.count, ends, p.tx);
        }
    }

    /// The session's shared connection to `node` for its current database and protocol, after
    /// the open group (whose commands came first) was sent.
    fn shared_conn(&mut self, node: usize) -> &BackendConn {
        self.flush_group();
        self.conn_on(node)
    }

    /// The session's shared connection to `node` for its current database and protocol.
    fn conn_on(&mut self, node: usize) -> &BackendConn {
        let key = self.key();
        let (worker, topo, id) = (&self.worker, &self.topo, self.info.id);
        self.conns.get(node, key, || {
            worker.pool(&topo.node_addr(node)).shared(key, id)
        })
    }

    /// The session's connection to `node` on the first scripts' lane for `key` (see
    /// [`Session::conn_on`]).
    fn lane_conn(&mut self, node: usize, key: ConnKey) -> &BackendConn {
        let (worker, topo, id) = (&self.worker, &self.topo, self.info.id);
        self.lane_conns.get(node, key, || {
            worker.pool(&topo.node_addr(node)).shared(key, id)
        })
    }

    /// The exclusive connection on `node`, checked out if needed; an error if the session is pinned elsewhere.
    fn exclusive_on(&mut self, node: usize) -> Result<BackendConn, &'static str> {
        self.exclusive_for(node, self.key())
    }

    /// [`Session::exclusive_on`] for database and protocol `key`.
    fn exclusive_for(&mut self, node: usize, key: ConnKey) -> Result<BackendConn, &'static str> {
        // What the session sent before goes out first.
        self.flush_group();
        let addr = self.node_addr(node);
        let pinned = self.pinned();
        if let Some(ex) = &self.exclusive {
            if ex.addr == addr && ex.key == key && (pinned || ex.conn.is_alive()) {
                return Ok(ex.conn.clone());
            }
            if pinned {
                return Err(CROSSSLOT);
            }
            // Held over from an earlier blocking command, for another node, database or
            // protocol, or broken: nothing is owed on it here, so swap it.
            self.release_exclusive(false);
        }
        let conn = self.worker.pool(&addr).checkout(key);
        self.exclusive = Some(Exclusive {
            addr,
            key,
            conn: conn.clone(),
        });
        self.exclusive_dirty = false;
        Ok(conn)
    }

    /// Sends to the pinned exclusive connection (transaction or watch in progress).
    fn send_exclusive_pinned(&mut self, cmd: Command) -> bool {
        let mut c = Some(cmd);
        if !self.barrier(&mut c, Target::Exclusive) {
            return false;
        }
        let Some(cmd) = c else { return false };
        let Some(ex) = &self.exclusive else {
            self.reply_error("ERR respire: the transaction's connection is gone");
            return false;
        };
        let data = cmd.into_resp();
        let retry = self.topo.managed.then(|| data.clone());
        let rx = ex.conn.send(data, 0, false);
        let node = self.topo.node_index(&ex.addr).unwrap_or(usize::MAX);
        self.push_waiting(rx, retry, true, false, node, None, false);
        true
    }

    /// A command for a shared connection ends the use of an exclusive one that no transaction
    /// or watch pins.
    fn release_unpinned_exclusive(&mut self) {
        if self.exclusive.is_some() && !self.in_multi && !self.watching {
            self.release_exclusive(false);
        }
    }

    /// Whether the exclusive connection holds a transaction or a watch. A transaction whose
    /// `MULTI` respire has not sent yet (its node is chosen by its first keyed command) holds
    /// nothing on it.
    fn pinned(&self) -> bool {
        (self.in_multi && !self.multi_deferred()) || self.watching
    }

    /// Gives the exclusive connection back to the pool when it is clean, or drops it (closing it).
    fn release_exclusive(&mut self, session_ending: bool) {
        if let Some(ex) = self.exclusive.take() {
            let clean = self.waiting == 0 && !self.pinned() && !self.exclusive_dirty;
            if clean {
                self.worker.pool(&ex.addr).checkin(ex.key, ex.conn);
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

    // ---- transactions -----------------------------------------------------

    /// `MULTI` was acknowledged by respire and not sent yet (see `multi_cmd`).
    fn multi_deferred(&self) -> bool {
        self.multi_cmd.is_some()
    }

    fn multi(&mut self, cmd: Command) {
        if self.watching || !self.cluster_mode() {
            // The connection is known: the watched one, or the only node's.
            let w = self.worker.clone();
            let res = w.shared.commands.resolve(&cmd);
            let sent = if self.watching {
                self.send_exclusive_pinned(cmd)
            } else {
                self.send(cmd, res, 0, Use::Watch, None)
            };
            if sent {
                self.set_multi(true);
            }
            return;
        }
        // Over shards the node is chosen by the transaction's first keyed command.
        self.set_multi(true);
        self.multi_cmd = Some(cmd);
        self.reply_ok();
    }

    fn handle_in_multi(&mut self, cmd: Command, res: Resolved<'_>) {
        let kind = res.spec.kind;
        if kind == Kind::Local(Local::Client)
            && cmd.arg(1).is_some_and(|s| {
                s.eq_ignore_ascii_case(b"tracking") || s.eq_ignore_ascii_case(b"caching")
            })
        {
            // Queued, it would reach Redis on the transaction's connection and turn tracking
            // on there, not for the client: refused, and the transaction aborts.
            self.tx_poisoned = true;
            let sub = String::from_utf8_lossy(cmd.arg(1).unwrap_or_default()).to_uppercase();
            return self.reply_error(&format!(
                "ERR respire: CLIENT {sub} is not allowed inside MULTI; send it before MULTI"
            ));
        }
        if kind == Kind::Control
            && let Some(msg) = self.locks_respire_out(&cmd)
        {
            // As a command Redis refuses while queueing: the transaction will abort.
            self.tx_poisoned = true;
            return self.reply_error(&msg);
        }
        match kind {
            Kind::Local(Local::Quit) | Kind::Local(Local::Reset) => {
                if let Kind::Local(l) = kind {
                    self.local(l, cmd, res);
                }
            }
            Kind::EndTransaction => {
                let exec = cmd.name().eq_ignore_ascii_case(b"exec");
                if self.multi_deferred() && exec && !self.tx_held.is_empty() {
                    // Keyless commands only: the transaction runs on any master.
                    let node = match self.node_for(None) {
                        Ok(n) => n,
                        Err(e) => {
                            self.set_multi(false);
                            self.watching = false;
                            return self.reply_error(e);
                        }
                    };
                    self.run_held(cmd, node);
                } else if self.multi_deferred() {
                    // Nothing was sent to Redis: an empty transaction, or only keyless
                    // commands, which DISCARD drops. MONITOR shows what Redis would.
                    if self.worker.shared.monitors.active() {
                        for c in self.multi_cmd.iter().chain(std::iter::once(&cmd)) {
                            self.monitor_own(c.iter());
                        }
                    }
                    self.set_multi(false);
                    self.watching = false;
                    if exec {
                        self.reply_with(|o, _| resp::array_header(o, 0))
                    } else {
                        self.reply_ok()
                    }
                } else if self.tx_poisoned && exec {
                    let discard = Command::from_args(&["DISCARD"]);
                    self.reply_mode_silent_once();
                    self.send_exclusive_pinned(discard);
                    self.set_multi(false);
                    self.watching = false;
                    self.reply_error("EXECABORT Transaction discarded because of previous errors.");
                } else {
                    let pushed = self.pushed;
                    if self.send_exclusive_pinned(cmd) {
                        let after = self.tx_pause.take().filter(|_| exec);
                        self.set_multi(false);
                        self.watching = false;
                        if exec {
                            self.exec_in_pause();
                        }
                        self.note_after(pushed, after);
                    }
                }
            }
            _ => {
                if matches!(kind, Kind::Local(l) if !matches!(l, Local::Ping | Local::Echo | Local::Info | Local::Slowlog))
                {
                    self.exclusive_dirty = true;
                }
                if let Some(a) = pause::pause_after(&cmd) {
                    // It takes effect when the transaction has run, as in Redis.
                    self.tx_pause = Some(a);
                }
                if !self.cluster_mode() {
                    self.send_exclusive_pinned(cmd);
                    return;
                }
                // The node of this command's keys; keyless commands follow the transaction.
                let node = match router::plan(&cmd, res.info, &self.topo) {
                    Plan::Single(Some(slot)) => self.node_for(Some(slot)),
                    Plan::Single(None) | Plan::FanOut(_) | Plan::Scan { .. } => {
                        match &self.exclusive {
                            Some(ex) => Ok(self.topo.node_index(&ex.addr).unwrap_or(usize::MAX)),
                            None => self.node_for(None),
                        }
                    }
                    Plan::Split(..) | Plan::Error(_) => Err(CROSSSLOT),
                };
                let node = match node {
                    Ok(n) => n,
                    Err(e) => {
                        self.tx_poisoned = true;
                        return self.reply_error(e);
                    }
                };
                if self.multi_deferred() {
                    // A keyless command waits for the first keyed one, which decides the
                    // node (Redis checks a command's arity when it queues it: so does respire).
                    let keyless = matches!(
                        router::plan(&cmd, res.info, &self.topo),
                        Plan::Single(None) | Plan::FanOut(_) | Plan::Scan { .. }
                    );
                    // Not those Redis answers with an error instead of QUEUED.
                    let queued = |i: &commands::CommandInfo| {
                        let n = cmd.len() as i64;
                        let arity_ok = if i.arity >= 0 {
                            n == i.arity
                        } else {
                            n >= -i.arity
                        };
                        arity_ok
                            && !i.has(commands::flags::NO_MULTI)
                            && !cmd.name().eq_ignore_ascii_case(b"multi")
                            && !cmd.name().eq_ignore_ascii_case(b"watch")
                    };
                    if keyless && self.tx_held.len() < MAX_HELD && res.info.is_some_and(queued) {
                        self.tx_held.push(cmd.into_resp());
                        return self.reply_with(|o, _| resp::simple(o, "QUEUED"));
                    }
                    self.run_held(cmd, node);
                    return;
                }
                let same = self
                    .exclusive
                    .as_ref()
                    .is_some_and(|ex| self.topo.node_index(&ex.addr) == Some(node));
                if !same {
                    self.tx_poisoned = true;
                    return self.reply_error(CROSSSLOT);
                }
                self.send_exclusive_pinned(cmd);
            }
        }
    }

    /// Starts a deferred transaction on `node`: `MULTI`, the keyless commands held (their
    /// `QUEUED` already given by respire), then `cmd` — the first keyed command, or `EXEC` —
    /// whose reply alone the client gets.
    fn run_held(&mut self, cmd: Command, node: usize) {
        // The exclusive connection of an earlier transaction (or blocking command) on another
        // node or database: nothing of this transaction went on it, so once nothing is owed on
        // it, `exclusive_on` gives it back and takes one of this node's.
        let (addr, key) = (self.node_addr(node), self.key());
        if self.waiting > 0
            && self
                .exclusive
                .as_ref()
                .is_some_and(|ex| ex.addr != addr || ex.key != key)
        {
            self.stalled = Some(cmd);
            return;
        }
        // Commands sent before on shared connections run first: their replies come before the
        // transaction starts (a write on one connection and a command on another may reach
        // Redis in either order).
        let mut c = Some(cmd);
        if !self.barrier(&mut c, Target::Exclusive) {
            return;
        }
        let Some(cmd) = c else { return };
        let exec = cmd.name().eq_ignore_ascii_case(b"exec");
        let Ok(conn) = self.exclusive_on(node) else {
            if exec {
                self.set_multi(false);
                self.watching = false;
                return self
                    .reply_error("EXECABORT Transaction discarded because of previous errors.");
            }
            self.tx_poisoned = true;
            return self.reply_error(CROSSSLOT);
        };
        let mut data = BytesMut::new();
        match self.multi_cmd.take() {
            Some(multi) => multi.encode_into(&mut data),
            None => resp::encode_args(&mut data, &["MULTI"]),
        }
        for held in &self.tx_held {
            data.extend_from_slice(held);
        }
        cmd.encode_into(&mut data);
        let data = data.freeze();
        let skip = 1 + self.tx_held.len() as u8;
        self.tx_held.clear();
        let retry = self.topo.managed.then(|| data.clone());
        let rx = conn.send(data, skip, false);
        if !exec {
            return self.push_waiting(rx, retry, true, false, node, None, false);
        }
        let pushed = self.pushed;
        let after = self.tx_pause.take();
        self.set_multi(false);
        self.watching = false;
        self.push_waiting(rx, retry, true, false, node, None, false);
        self.exec_in_pause();
        self.note_after(pushed, after);
    }

    /// The next backend reply is not shown to the client.
    fn reply_mode_silent_once(&mut self) {
        if self.reply_mode == ReplyMode::On {
            self.reply_mode = ReplyMode::SkipNext;
        }
    }

    // ---- streams ----------------------------------------------------------

    /// The nodes a `MONITOR` follows: every node that runs the clients' commands (the
    /// masters, and their replicas when reads may go there).
    fn monitored_nodes(&self, topo: &Topology) -> Vec<usize> {
        let replicas = self.worker.shared.config.backend.read_from != ReadFrom::Master;
        topo.shards
            .iter()
            .flat_map(|s| {
                std::iter::once(s.master).chain(s.replicas.iter().copied().filter(|_| replicas))
            })
            .collect()
    }

    fn start_stream(&mut self, cmd: Command) {
        if self.watching {
            // A subscription cannot share the watched connection.
            return self.reply_error("ERR respire: MONITOR is not allowed while keys are WATCHed");
        }
        if self.waiting > 0 {
            self.stalled = Some(cmd);
            return;
        }
        let nodes = self.monitored_nodes(&self.topo);
        if nodes.is_empty() {
            return self.reply_error(CLUSTERDOWN);
        }
        self.stream_start = Some((cmd, nodes));
    }
}

/// Runs the GCRA script for one shared bucket: 0 when `cost` tokens were granted, else the
/// ms to wait; an error when Redis could not answer, or is paused by a `CLIENT PAUSE` made
/// through respire (the command then goes on, as when Redis cannot answer).
async fn shared_take(
    worker: &Rc<Worker>,
    sid: u64,
    t: &crate::plugin::SharedTake,
    cost: i64,
) -> Result<u64, String> {
    if worker.shared.pause.current().is_some() {
        // Redis would hold the script (it writes) on a connection other clients share.
        return Err("Redis is paused (CLIENT PAUSE)".into());
    }
    let key = t.redis_key();
    let topo = worker.shared.topology.load();
    let node = topo
        .master_of(crate::topology::key_slot(key.as_bytes()))
        .ok_or("no master serves the bucket's slot")?;
    let addr = topo.nodes.get(node).cloned().ok_or("no such node")?;
    let interval = if t.rule.rate > 0.0 {
        1000.0 / t.rule.rate
    } else {
        1e15
    };
    let mut data = BytesMut::new();
    let args = [
        interval.to_string(),
        t.rule.burst.to_string(),
        cost.to_string(),
    ];
    resp::encode_args(
        &mut data,
        &["EVAL", GCRA, "1", &key, &args[0], &args[1], &args[2]],
    );
    let conn = worker.pool(&addr).shared(ConnKey::new(0, 2), sid);
    let rx = conn.send(data.freeze(), 0, false);
    let reply = match tokio::time::timeout(worker.shared.config.backend.command_timeout, rx).await {
        Ok(Ok(Ok(frame))) => frame,
        Ok(Ok(Err(e))) => return Err(e.to_string()),
        _ => return Err("no answer".into()),
    };
    match resp::Value::parse(&reply) {
        Ok(resp::Value::Int(n)) => Ok(n.max(0) as u64),
        Ok(resp::Value::Error(e)) => Err(String::from_utf8_lossy(&e).into_owned()),
        _ => Err("unexpected reply".into()),
    }
}

/// What following a redirection needs, borrowed apart from the reply queue.
struct RedirectCtx<'a> {
    worker: &'a Rc<Worker>,
    topo: &'a Topology,
    key: ConnKey,
    sid: u64,
}

impl RedirectCtx<'_> {
    /// If `reply` is a `MOVED`/`ASK` redirection to follow, re-sends the request and returns the new receiver.
    fn follow(&self, reply: &Reply, retry: &mut Retry) -> Option<ReplyRx> {
        if std::mem::take(&mut retry.unsent) && matches!(reply, Err(BackendError::Lost { .. })) {
            // The client whose request this one waited for went away: send it now.
            crate::metrics::backend_stats()
                .retries
                .with_label_values(&["single-flight"])
                .inc();
            return Some(
                self.worker
                    .pool(&retry.addr)
                    .shared(self.key, self.sid)
                    .send(retry.data.clone(), 0, false),
            );
        }
        let frame = match reply {
            Ok(f) => f,
            Err(e) => {
                // A node failed: the map may be stale, and a new master may be on its way.
                self.worker.shared.topology.request_refresh();
                let safe = matches!(e, BackendError::Unavailable { .. }) || retry.idempotent;
                return if safe {
                    self.wait_for_master(retry, reply.clone())
                } else {
                    None
                };
            }
        };
        if frame.first() != Some(&b'-') {
            return None;
        }
        if [
            &b"-CLUSTERDOWN"[..],
            b"-READONLY",
            b"-LOADING",
            b"-MASTERDOWN",
        ]
        .iter()
        .any(|p| frame.starts_with(p))
        {
            // Not run: the node is not (or not yet) a master that serves this slot.
            self.worker.shared.topology.request_refresh();
            return self.wait_for_master(retry, reply.clone());
        }
        if frame.starts_with(b"-TRYAGAIN") && retry.tryagain < MAX_TRYAGAIN {
            // A multi-key command during a slot migration: retry after a short pause
            // (10 ms doubling up to 200 ms: about 1.5 s in all).
            retry.tryagain += 1;
            crate::metrics::backend_stats()
                .retries
                .with_label_values(&["tryagain"])
                .inc();
            debug!(node = %retry.addr, attempt = retry.tryagain, "TRYAGAIN: retrying");
            let pool = self.worker.pool(&retry.addr);
            let conn = if retry.exclusive {
                pool.checkout(self.key)
            } else {
                pool.shared(self.key, self.sid)
            };
            let (tx, rx) = crate::backend::reply_channel();
            let (data, blocking, delay) = (
                retry.data.clone(),
                retry.blocking,
                Duration::from_millis((10u64 << retry.tryagain).min(200)),
            );
            if retry.exclusive {
                // Sent after the delay: the other clients' checkouts go first meanwhile.
                conn.pass_turn();
                retry.conn = Some(conn.clone());
            }
            tokio::task::spawn_local(async move {
                tokio::time::sleep(delay).await;
                conn.send_to(data, 0, blocking, tx);
            });
            return Some(rx);
        }
        let (ask, rest) = if let Some(r) = frame.strip_prefix(b"-MOVED ") {
            (false, r)
        } else if let Some(r) = frame.strip_prefix(b"-ASK ") {
            (true, r)
        } else {
            return None;
        };
        if self.topo.kind != BackendKind::Cluster || retry.attempts >= MAX_REDIRECTS {
            return None;
        }
        let text = std::str::from_utf8(rest).ok()?.trim_end();
        let (slot, addr) = text.split_once(' ')?;
        let slot: u16 = slot.parse().ok()?;
        let addr = normalize_addr(addr, self.topo);
        retry.attempts += 1;
        crate::metrics::backend_stats()
            .redirections
            .with_label_values(&[if ask { "ask" } else { "moved" }])
            .inc();
        let shared = &self.worker.shared;
        if !ask {
            shared.topology.moved(slot, &addr);
        }
        let (data, skip) = if ask {
            let mut d = BytesMut::with_capacity(retry.data.len() + 16);
            d.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
            d.extend_from_slice(&retry.data);
            (d.freeze(), 1)
        } else {
            (retry.data.clone(), 0)
        };
        let addr: Rc<str> = Rc::from(addr.as_str());
        let pool = self.worker.pool(&addr);
        retry.addr = addr.clone();
        debug!(slot, node = %addr, ask, "following a redirection");
        if retry.exclusive {
            let conn = pool.checkout(self.key);
            let rx = conn.send(data, skip, retry.blocking);
            retry.conn = Some(conn);
            Some(rx)
        } else {
            Some(pool.shared(self.key, self.sid).send(data, skip, false))
        }
    }
}

impl RedirectCtx<'_> {
    /// Re-sends the request to its slot's master once one is reachable, polling the topology
    /// with backoff until `failover_timeout` has passed since the first failure. `None` when
    /// waiting does not apply (no failover manager, a transaction, or the time is up).
    fn wait_for_master(&self, retry: &mut Retry, last: Reply) -> Option<ReplyRx> {
        if !self.topo.managed || (retry.exclusive && !retry.blocking) {
            return None;
        }
        let now = Instant::now();
        let deadline = *retry
            .deadline
            .get_or_insert(now + self.worker.shared.config.backend.failover_timeout);
        if now >= deadline {
            return None;
        }
        crate::metrics::backend_stats()
            .retries
            .with_label_values(&["failover"])
            .inc();
        let (tx, rx) = crate::backend::reply_channel();
        let worker = self.worker.clone();
        let (key, sid, slot) = (self.key, self.sid, retry.slot);
        let (data, blocking, exclusive, idempotent) = (
            retry.data.clone(),
            retry.blocking,
            retry.exclusive,
            retry.idempotent,
        );
        tokio::task::spawn_local(async move {
            let mut last = last;
            let mut delay = Duration::from_millis(20);
            while Instant::now() < deadline {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(250));
                worker.shared.topology.request_refresh();
                let topo = worker.shared.topology.load();
                let master = match slot {
                    Some(s) => topo.master_of(s),
                    None => topo.shards.first().map(|s| s.master),
                };
                let Some(addr) = master.and_then(|m| topo.nodes.get(m).cloned()) else {
                    continue;
                };
                let pool = worker.pool(&addr);
                let conn = if exclusive {
                    pool.checkout(key)
                } else {
                    pool.shared(key, sid)
                };
                let r = conn
                    .send(data.clone(), 0, blocking)
                    .await
                    .unwrap_or_else(|_| {
                        Err(BackendError::Unavailable {
                            addr: addr.clone(),
                            reason: "connection closed".into(),
                        })
                    });
                let again = match &r {
                    Err(BackendError::Unavailable { .. }) => true,
                    Err(BackendError::Lost { .. }) => idempotent,
                    Ok(f) => [
                        &b"-CLUSTERDOWN"[..],
                        b"-READONLY",
                        b"-LOADING",
                        b"-MASTERDOWN",
                    ]
                    .iter()
                    .any(|p| f.starts_with(p)),
                };
                if !again {
                    tx.send(r);
                    return;
                }
                last = r;
            }
            tx.send(last);
        });
        Some(rx)
    }
}

/// A redirection may name a node by an address form other than the one in the map
/// (e.g. `:7001` with an empty host): fill the host in from the known nodes.
fn normalize_addr(addr: &str, topo: &Topology) -> String {
    if let Some(port) = addr.strip_prefix(':') {
        if let Some(host) = topo
            .nodes
            .first()
            .and_then(|n| n.rsplit_once(':').map(|(h, _)| h.to_string()))
        {
            return format!("{host}:{port}");
        }
    }
    addr.to_string()
}
