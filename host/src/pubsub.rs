//! Shared subscriber connections with fan-out inside respire.
//!
//! Each worker keeps one RESP3 subscriber connection per backend node it needs
//! (classic channels and patterns on one master — Redis Cluster carries
//! `PUBLISH` to every node — and sharded channels on the master of their slot).
//! A channel is subscribed on the backend once, when its first local
//! subscriber arrives, and unsubscribed when its last one leaves; every message
//! is copied to the worker's subscribed sessions. 10,000 subscribed clients
//! cost a handful of backend connections instead of 10,000. What a worker
//! (un)subscribes in one turn of its event loop goes out in one write, a run of
//! one verb as one command (`SUBSCRIBE a b c …`), and a client's `SUBSCRIBE`
//! is answered once Redis has confirmed every channel it added.
//!
//! Messages reach sessions as complete RESP frames: RESP3 push frames, or the
//! same frames with a RESP2 array header for RESP2 clients (the only
//! difference between the two is the first byte). When a subscriber
//! connection breaks, it reconnects and subscribes to everything again; when a
//! shard channel's slot moves to another master (Redis then sends
//! `sunsubscribe`), its subscribers follow it there. Messages published while
//! a subscription is being moved can be missed, as with any Redis client.
//!
//! Keyspace notifications are the exception to "one master hears every message": Redis
//! publishes them only on the node where the key lives, and a Redis Cluster does not carry
//! them to the other nodes. A channel or pattern that can carry them (`__keyspace@…`,
//! `__keyevent@…`, or a pattern such as `*` that may match those) is therefore also
//! subscribed on every other master, as an *echo*. A keyspace notification comes from one
//! node only, on the one connection respire has to it, and goes to every session subscribed
//! to the name, whichever connection holds its subscription; anything else reaches respire on
//! every connection subscribed to the name and goes to that connection's sessions only.
//! Echoes follow the masters as the topology changes.
//!
//! Redis counts respire's shared connection once however many clients it
//! serves, so the replies that count subscribers (`PUBLISH`, `SPUBLISH`,
//! `PUBSUB NUMSUB|SHARDNUMSUB`) are corrected by the [`Census`] of all workers'
//! subscriptions: each of respire's connections subscribed to the name counts
//! as the clients it serves.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::backend::{self, ConnKey, NodeSettings};
use crate::io::{IoEvent, poll_io, write_now};
use crate::protocol::{self as resp, next_reply};
use crate::server::Shared;
use crate::topology::key_slot;

/// Hash maps of names clients chose: a seeded fast hasher (SipHash was a fifth of a
/// `SUBSCRIBE` of many channels).
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A set of such names.
pub(crate) type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The three subscription namespaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubKind {
    /// `SUBSCRIBE` channels.
    Channel,
    /// `PSUBSCRIBE` patterns.
    Pattern,
    /// `SSUBSCRIBE` shard channels.
    Shard,
}

impl SubKind {
    fn subscribe_cmd(self) -> &'static str {
        match self {
            SubKind::Channel => "SUBSCRIBE",
            SubKind::Pattern => "PSUBSCRIBE",
            SubKind::Shard => "SSUBSCRIBE",
        }
    }

    fn unsubscribe_cmd(self) -> &'static str {
        match self {
            SubKind::Channel => "UNSUBSCRIBE",
            SubKind::Pattern => "PUNSUBSCRIBE",
            SubKind::Shard => "SUNSUBSCRIBE",
        }
    }
}

/// How many of respire's clients are subscribed to each channel, pattern and shard
/// channel, over all workers, and how many subscriptions respire's shared connections hold
/// in Redis for them. Redis counts each of those connections once; the difference
/// (`clients - conns`) corrects the counts Redis gives (`PUBLISH`'s receivers,
/// `PUBSUB NUMSUB`) to what they would be if every client were connected to Redis itself.
#[derive(Default)]
pub struct Census {
    tallies: Mutex<[HashMap<Bytes, Tally>; 3]>,
    /// Names tallied, of every kind (0: nothing to correct; no lock taken).
    names: AtomicUsize,
    /// Patterns tallied (a `PUBLISH` looks for matching ones only when there are some).
    patterns: AtomicUsize,
    /// Echo subscriptions of all workers (see the module's documentation), which Redis counts
    /// like any other: by name, and patterns by node.
    echoes: Mutex<EchoTally>,
}

#[derive(Default)]
struct EchoTally {
    /// Echo subscriptions to each channel and pattern, over all nodes and workers.
    by_name: HashMap<(SubKind, Bytes), i64>,
    /// Workers echoing each pattern on each node (Redis counts a pattern once per node).
    patterns: HashMap<(Arc<str>, Bytes), i64>,
}

#[derive(Default, Clone, Copy)]
struct Tally {
    clients: i64,
    conns: i64,
}

impl SubKind {
    /// Its place in arrays of the three kinds (`CLIENT LIST`'s `sub`, `psub`, `ssub`).
    pub fn index(self) -> usize {
        match self {
            SubKind::Channel => 0,
            SubKind::Pattern => 1,
            SubKind::Shard => 2,
        }
    }
}

impl Census {
    /// Adds `clients` subscribed clients and `conns` backend subscriptions to `name`.
    fn change(&self, kind: SubKind, name: &Bytes, clients: i64, conns: i64) {
        if clients == 0 && conns == 0 {
            return;
        }
        let Ok(mut tallies) = self.tallies.lock() else {
            return;
        };
        let Some(map) = tallies.get_mut(kind.index()) else {
            return;
        };
        let t = map.entry(name.clone()).or_insert_with(|| {
            self.names.fetch_add(1, Ordering::Relaxed);
            if kind == SubKind::Pattern {
                self.patterns.fetch_add(1, Ordering::Relaxed);
            }
            Tally::default()
        });
        t.clients += clients;
        t.conns += conns;
        if t.clients <= 0 && t.conns <= 0 {
            map.remove(name);
            self.names.fetch_sub(1, Ordering::Relaxed);
            if kind == SubKind::Pattern {
                self.patterns.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// An echo subscription to `name` on `node` was made (`delta` 1) or ended (-1).
    fn echo_change(&self, node: &Arc<str>, kind: SubKind, name: &Bytes, delta: i64) {
        let Ok(mut t) = self.echoes.lock() else {
            return;
        };
        let n = t.by_name.entry((kind, name.clone())).or_default();
        *n += delta;
        if *n <= 0 {
            t.by_name.remove(&(kind, name.clone()));
        }
        if kind == SubKind::Pattern {
            let n = t.patterns.entry((node.clone(), name.clone())).or_default();
            *n += delta;
            if *n <= 0 {
                t.patterns.remove(&(node.clone(), name.clone()));
            }
        }
    }

    /// Echo subscriptions to `name` (a `PUBSUB NUMSUB` over every master counts them).
    fn echoes_of(&self, kind: SubKind, name: &[u8]) -> i64 {
        let Ok(t) = self.echoes.lock() else {
            return 0;
        };
        t.by_name
            .get(&(kind, Bytes::copy_from_slice(name)))
            .copied()
            .unwrap_or(0)
    }

    /// What to add to the sum of the masters' `PUBSUB NUMPAT`: less the patterns only echoes
    /// hold on a node.
    pub fn numpat_correction(&self) -> i64 {
        let Ok(t) = self.echoes.lock() else {
            return 0;
        };
        -(t.patterns.len() as i64)
    }

    /// Whether no client of respire is subscribed to anything (Redis's counts are right as they are).
    pub fn is_empty(&self) -> bool {
        self.names.load(Ordering::Relaxed) == 0
    }

    /// What to add to Redis's count of `name`'s subscribers (`PUBSUB NUMSUB` over every
    /// master, `SPUBLISH`'s receivers).
    pub fn correction(&self, kind: SubKind, name: &[u8]) -> i64 {
        let d = {
            let Ok(tallies) = self.tallies.lock() else {
                return 0;
            };
            tallies
                .get(kind.index())
                .and_then(|m| m.get(name))
                .map_or(0, |t| t.clients - t.conns)
        };
        d - self.echoes_of(kind, name)
    }

    /// What to add to Redis's count of `PUBLISH channel`'s receivers: the channel's
    /// subscribers, and those of every pattern that matches it.
    pub fn publish_correction(&self, channel: &[u8]) -> i64 {
        let Ok(tallies) = self.tallies.lock() else {
            return 0;
        };
        let [channels, patterns, _] = &*tallies;
        let mut d = channels.get(channel).map_or(0, |t| t.clients - t.conns);
        if self.patterns.load(Ordering::Relaxed) > 0 {
            for (p, t) in patterns {
                if crate::glob::matches(p, channel) {
                    d += t.clients - t.conns;
                }
            }
        }
        d
    }
}

/// Where a session receives its messages.
#[derive(Clone)]
pub struct Subscriber {
    /// The session's id.
    pub sid: u64,
    /// The session's message queue.
    pub tx: mpsc::UnboundedSender<Message>,
}

/// A message for a session, with what the hub read from it (so the session need not parse
/// the frame again).
pub struct Message {
    /// The namespace of `name`.
    pub kind: SubKind,
    /// The channel, or the pattern of a `pmessage`.
    pub name: Bytes,
    /// The frame as Redis sent it (a view of the hub's read buffer).
    pub frame: Bytes,
    /// The server ended the subscription (`sunsubscribe`: its slot moved) rather than
    /// carrying a message.
    pub ended: bool,
}

#[derive(Default)]
struct Entry {
    sessions: Vec<Subscriber>,
    confirmed: bool,
    waiters: Vec<Waiter>,
}

/// A wait for confirmations, shared by everything one command waits for (a `SUBSCRIBE` of
/// thousands of channels waits once, not once per channel): each [`Waiter`] of it stands for
/// one confirmation, given by dropping it — when it arrives, or when what it waited for is
/// gone (then nothing will come; the command goes on). The receiver fires once all are.
pub struct Waiter(Rc<Wait>);

struct Wait {
    left: std::cell::Cell<usize>,
    done: std::cell::Cell<Option<oneshot::Sender<()>>>,
}

impl Waiter {
    /// A wait held open by the returned waiter (its owner drops it once every confirmation it
    /// waits for has a waiter of its own).
    pub fn new() -> (Waiter, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let wait = Wait {
            left: std::cell::Cell::new(1),
            done: std::cell::Cell::new(Some(tx)),
        };
        (Waiter(Rc::new(wait)), rx)
    }

    /// One more confirmation to wait for.
    pub fn another(&self) -> Waiter {
        self.0.left.set(self.0.left.get() + 1);
        Waiter(self.0.clone())
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let left = self.0.left.get().saturating_sub(1);
        self.0.left.set(left);
        if left == 0
            && let Some(tx) = self.0.done.take()
        {
            let _ = tx.send(());
        }
    }
}

#[derive(Default)]
struct Registry {
    entries: HashMap<(SubKind, Bytes), Entry>,
}

/// A subscription held on a master only for the keyspace notifications it publishes; its
/// subscribers are those of the name's subscriptions, on other connections.
#[derive(Default)]
struct Echo {
    confirmed: bool,
    waiters: Vec<Waiter>,
}

/// One shared subscriber connection to a node.
struct HubConn {
    registry: RefCell<Registry>,
    /// Echoes of subscriptions held on another node (see the module's documentation).
    echoes: RefCell<HashMap<(SubKind, Bytes), Echo>>,
    /// (Un)subscriptions for the connection's task to send, in order: it sends a run of them
    /// as one command (a `SUBSCRIBE` of thousands of channels is one command to Redis too).
    out: RefCell<Vec<Change>>,
    /// Wakes the task when `out` gains its first name, or the connection is retired.
    wake: Notify,
    /// Nothing is held here any more: the connection closes (Redis then drops what it held).
    retired: std::cell::Cell<bool>,
}

/// A subscription (`subscribe`) or an unsubscription of `name`, for Redis.
struct Change {
    kind: SubKind,
    subscribe: bool,
    name: Bytes,
}

impl Change {
    fn cmd(&self) -> &'static str {
        if self.subscribe {
            self.kind.subscribe_cmd()
        } else {
            self.kind.unsubscribe_cmd()
        }
    }
}

impl HubConn {
    fn send(&self, kind: SubKind, subscribe: bool, name: &Bytes) {
        let mut out = self.out.borrow_mut();
        if out.is_empty() {
            self.wake.notify_one();
        }
        out.push(Change {
            kind,
            subscribe,
            name: name.clone(),
        });
    }
}

/// The most names respire puts in one (un)subscribe command.
const NAMES_PER_COMMAND: usize = 1024;

/// The most bytes of names respire puts in one (un)subscribe command beyond its first name
/// (Redis closes a connection whose command outgrows its query buffer limit).
const NAME_BYTES_PER_COMMAND: usize = 256 * 1024;

/// Encodes (un)subscriptions as commands: each run of one verb is one command of up to
/// [`NAMES_PER_COMMAND`] names and [`NAME_BYTES_PER_COMMAND`] bytes of them, and shard
/// channels only with others of their slot (Redis refuses an `SSUBSCRIBE` across slots).
/// Redis answers each name as it would alone.
fn encode_subscriptions(changes: &[Change], out: &mut BytesMut) {
    let mut rest = changes;
    while let Some(first) = rest.first() {
        let shard = first.kind == SubKind::Shard;
        let slot = shard.then(|| key_slot(&first.name));
        let mut bytes = 0;
        let n = rest
            .iter()
            .take(NAMES_PER_COMMAND)
            .take_while(|c| {
                bytes += c.name.len();
                c.kind == first.kind
                    && c.subscribe == first.subscribe
                    && (!shard || Some(key_slot(&c.name)) == slot)
                    && (bytes == c.name.len() || bytes <= NAME_BYTES_PER_COMMAND)
            })
            .count()
            .max(1);
        let (run, after) = rest.split_at(n.min(rest.len()));
        resp::array_header(out, run.len() + 1);
        resp::bulk(out, first.cmd().as_bytes());
        for c in run {
            resp::bulk(out, &c.name);
        }
        rest = after;
    }
}

/// A worker's subscriber connections, by node address.
#[derive(Clone)]
pub struct Hub {
    conns: Rc<RefCell<HashMap<Arc<str>, Rc<HubConn>>>>,
    shared: Arc<Shared>,
    /// Whether the task that keeps echoes on the current masters runs.
    watching: Rc<std::cell::Cell<bool>>,
}

/// Keyspace notification channels: `__keyspace@<db>__:<key>` and `__keyevent@<db>__:<event>`.
const KEYSPACE_PREFIXES: [&[u8]; 2] = [b"__keyspace@", b"__keyevent@"];

/// Whether `channel` is a keyspace notification channel.
fn is_keyspace_channel(channel: &[u8]) -> bool {
    KEYSPACE_PREFIXES.iter().any(|p| channel.starts_with(p))
}

/// Whether a subscription may receive keyspace notifications: a keyspace channel, or a
/// pattern whose fixed start (up to its first `*`, `?`, `[` or `\`) does not rule them out.
fn may_carry_keyspace(kind: SubKind, name: &[u8]) -> bool {
    match kind {
        SubKind::Shard => false,
        SubKind::Channel => is_keyspace_channel(name),
        SubKind::Pattern => {
            let Some(end) = name
                .iter()
                .position(|b| matches!(b, b'*' | b'?' | b'[' | b'\\'))
            else {
                // No wildcard: the pattern is the one channel it names.
                return is_keyspace_channel(name);
            };
            let fixed = &name[..end];
            KEYSPACE_PREFIXES
                .iter()
                .any(|p| p.starts_with(fixed) || fixed.starts_with(p))
        }
    }
}

impl Hub {
    /// A hub for one worker.
    pub fn new(shared: Arc<Shared>) -> Hub {
        Hub {
            conns: Rc::default(),
            shared,
            watching: Rc::default(),
        }
    }

    /// The settings of a connection to `addr`.
    fn node(&self, addr: Arc<str>) -> Rc<NodeSettings> {
        Rc::new(NodeSettings {
            addr,
            ..self.shared.node_settings.clone()
        })
    }

    fn conn(&self, node: &Rc<NodeSettings>) -> Rc<HubConn> {
        if let Some(c) = self.conns.borrow().get(&node.addr) {
            return c.clone();
        }
        let conn = Rc::new(HubConn {
            registry: RefCell::default(),
            echoes: RefCell::default(),
            out: RefCell::default(),
            wake: Notify::new(),
            retired: std::cell::Cell::new(false),
        });
        tokio::task::spawn_local(run(self.clone(), node.clone(), conn.clone()));
        self.conns
            .borrow_mut()
            .insert(node.addr.clone(), conn.clone());
        conn
    }

    /// Moves every subscription held on `addr` whose rightful node (by the current topology) is
    /// another one. Returns `true` when nothing is left on `addr` (its connection is retired).
    fn move_off(&self, addr: &Arc<str>, conn: &Rc<HubConn>) -> bool {
        let topo = self.shared.topology.load();
        let owner = |kind: SubKind, name: &Bytes| -> Option<Arc<str>> {
            let m = match kind {
                SubKind::Shard => topo.master_of(key_slot(name)),
                _ => topo.channels_master(),
            };
            m.and_then(|m| topo.nodes.get(m).cloned())
        };
        let moving: Vec<((SubKind, Bytes), Arc<str>)> = conn
            .registry
            .borrow()
            .entries
            .keys()
            .filter_map(|(k, n)| {
                owner(*k, n)
                    .filter(|o| o != addr)
                    .map(|o| ((*k, n.clone()), o))
            })
            .collect();
        // Echoes stay while the node is a master (it is only unreachable for now); the watch
        // puts them on the masters there are instead.
        if !topo.masters().any(|m| topo.nodes.get(m) == Some(addr)) {
            for ((kind, name), _) in conn.echoes.borrow_mut().drain() {
                self.shared.census.echo_change(addr, kind, &name, -1);
            }
        }
        for ((kind, name), to) in moving {
            let Some(entry) = conn
                .registry
                .borrow_mut()
                .entries
                .remove(&(kind, name.clone()))
            else {
                continue;
            };
            self.shared
                .census
                .change(kind, &name, -(entry.sessions.len() as i64), -1);
            debug!(channel = %String::from_utf8_lossy(&name), from = %addr, %to, "subscription moved");
            let node = self.node(to);
            for s in entry.sessions {
                self.subscribe(&node, kind, name.clone(), s, None);
            }
        }
        if !conn.registry.borrow().entries.is_empty() || !conn.echoes.borrow().is_empty() {
            return false;
        }
        let mut conns = self.conns.borrow_mut();
        if conns.get(addr).is_some_and(|c| Rc::ptr_eq(c, conn)) {
            conns.remove(addr);
        }
        conn.retired.set(true);
        // Wakes its task, which closes the connection.
        conn.wake.notify_one();
        true
    }

    /// Moves the subscribers of a shard channel whose slot left `from` to the slot's new
    /// master, once the topology knows it (up to 5 s); otherwise ends their subscriptions.
    fn rehome(&self, from: Arc<str>, name: Bytes, sessions: Vec<Subscriber>, ended: Bytes) {
        let hub = self.clone();
        tokio::task::spawn_local(async move {
            let slot = key_slot(&name);
            for _ in 0..50 {
                hub.shared.topology.request_refresh();
                tokio::time::sleep(Duration::from_millis(100)).await;
                let topo = hub.shared.topology.load();
                let Some(owner) = topo
                    .master_of(slot)
                    .and_then(|m| topo.nodes.get(m).cloned())
                else {
                    continue;
                };
                if owner == from {
                    continue;
                }
                debug!(channel = %String::from_utf8_lossy(&name), to = %owner, "shard channel subscribers moved");
                let node = hub.node(owner);
                for s in sessions {
                    // The sessions already count this subscription: no confirmation to wait for.
                    hub.subscribe(&node, SubKind::Shard, name.clone(), s, None);
                }
                return;
            }
            for s in sessions {
                let _ = s.tx.send(Message {
                    kind: SubKind::Shard,
                    name: name.clone(),
                    frame: ended.clone(),
                    ended: true,
                });
            }
        });
    }

    /// Adds a session to `name`; `wait`, when given, waits for the backend to confirm the
    /// subscription.
    pub fn subscribe(
        &self,
        node: &Rc<NodeSettings>,
        kind: SubKind,
        name: Bytes,
        sub: Subscriber,
        wait: Option<&Waiter>,
    ) {
        let conn = self.conn(node);
        // Redis holds one subscription per name and connection: an echo here becomes this one.
        if conn
            .echoes
            .borrow_mut()
            .remove(&(kind, name.clone()))
            .is_some()
        {
            self.shared.census.echo_change(&node.addr, kind, &name, -1);
        }
        // A name that may carry keyspace notifications waits for its echoes too (below), so
        // its own confirmation is waited for apart.
        let inner = may_carry_keyspace(kind, &name).then(Waiter::new);
        let mut reg = conn.registry.borrow_mut();
        let entry = reg.entries.entry((kind, name.clone())).or_default();
        let first = entry.sessions.is_empty() && !entry.confirmed && entry.waiters.is_empty();
        let before = entry.sessions.len();
        entry.sessions.retain(|s| s.sid != sub.sid);
        let new = entry.sessions.len() == before;
        entry.sessions.push(sub);
        self.shared
            .census
            .change(kind, &name, i64::from(new), i64::from(first));
        if !entry.confirmed
            && let Some(w) = inner.as_ref().map(|(w, _)| w).or(wait)
        {
            entry.waiters.push(w.another());
        }
        if first {
            conn.send(kind, true, &name);
        }
        drop(reg);
        let Some((inner, entry_done)) = inner else {
            return;
        };
        // Confirmed once the echoes are too, so that no notification after the reply is
        // missed; but a master that cannot be reached for now holds the reply up for at most
        // the connect timeout (its echo follows when it is back, or the watch moves it).
        let (echoes, echoes_done) = Waiter::new();
        self.add_echoes(kind, &name, Some(&echoes));
        drop(echoes);
        self.watch();
        drop(inner);
        let Some(hold) = wait.map(Waiter::another) else {
            return;
        };
        let patience = node.connect_timeout;
        tokio::task::spawn_local(async move {
            let _ = entry_done.await;
            let _ = tokio::time::timeout(patience, echoes_done).await;
            drop(hold);
        });
    }

    /// Echoes `name` on every master of several that does not hold a subscription to it;
    /// `wait`, when given, waits for them to be confirmed.
    fn add_echoes(&self, kind: SubKind, name: &Bytes, wait: Option<&Waiter>) {
        let topo = self.shared.topology.load();
        if topo.shards.len() < 2 {
            return;
        }
        for m in topo.masters() {
            let Some(addr) = topo.nodes.get(m) else {
                continue;
            };
            let conn = self.conn(&self.node(addr.clone()));
            if conn
                .registry
                .borrow()
                .entries
                .contains_key(&(kind, name.clone()))
            {
                continue;
            }
            let mut echoes = conn.echoes.borrow_mut();
            let echo = echoes.entry((kind, name.clone())).or_insert_with(|| {
                conn.send(kind, true, name);
                self.shared.census.echo_change(addr, kind, name, 1);
                Echo::default()
            });
            if !echo.confirmed
                && let Some(w) = wait
            {
                echo.waiters.push(w.another());
            }
        }
    }

    /// Starts the task that keeps echoes on the current masters, unless it runs: it looks at
    /// the topology's version every 100 ms, and ends once nothing needs echoes.
    fn watch(&self) {
        if self.watching.replace(true) {
            return;
        }
        let hub = self.clone();
        tokio::task::spawn_local(async move {
            let mut seen = hub.shared.topology.version();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now = hub.shared.topology.version();
                if now != seen {
                    seen = now;
                    hub.reconcile_echoes();
                }
                let idle = hub.conns.borrow().values().all(|c| {
                    c.echoes.borrow().is_empty()
                        && !c
                            .registry
                            .borrow()
                            .entries
                            .keys()
                            .any(|(k, n)| may_carry_keyspace(*k, n))
                });
                if idle {
                    hub.watching.set(false);
                    return;
                }
            }
        });
    }

    /// Puts echoes where the topology says they belong: for every subscription that may carry
    /// keyspace notifications, on each master that does not hold it; no others.
    fn reconcile_echoes(&self) {
        let topo = self.shared.topology.load();
        let is_master = |addr: &Arc<str>| topo.masters().any(|m| topo.nodes.get(m) == Some(addr));
        let listed = |hub: &Hub| -> Vec<(Arc<str>, Rc<HubConn>)> {
            hub.conns
                .borrow()
                .iter()
                .map(|(a, c)| (a.clone(), c.clone()))
                .collect()
        };
        // A node that stopped being a master (a failover that left it up as a replica) still
        // hears what is published, but it would publish its own keyspace notifications too,
        // again after the master's: subscriptions that may carry them leave it.
        for (addr, c) in listed(self) {
            let holds_keyspace = c
                .registry
                .borrow()
                .entries
                .keys()
                .any(|(k, n)| may_carry_keyspace(*k, n));
            if holds_keyspace && !is_master(&addr) && topo.channels_master().is_some() {
                self.move_off(&addr, &c);
            }
        }
        let conns = listed(self);
        // The subscriptions that want echoes.
        let mut wanted: HashSet<(SubKind, Bytes)> = Default::default();
        for (_, c) in &conns {
            for key in c.registry.borrow().entries.keys() {
                if may_carry_keyspace(key.0, &key.1) {
                    wanted.insert(key.clone());
                }
            }
        }
        let several = topo.shards.len() >= 2;
        for (addr, c) in &conns {
            c.echoes.borrow_mut().retain(|key, _| {
                let held = c.registry.borrow().entries.contains_key(key);
                let keep = several && is_master(addr) && wanted.contains(key) && !held;
                // Redis holds one subscription per name and connection: one that this
                // connection now holds for sessions of its own stays.
                if !keep && !held {
                    c.send(key.0, false, &key.1);
                }
                if !keep {
                    self.shared.census.echo_change(addr, key.0, &key.1, -1);
                }
                keep
            });
        }
        if several {
            for (kind, name) in &wanted {
                self.add_echoes(*kind, name, None);
            }
        }
    }

    /// Removes a session from `name` (wherever it is held); the backend subscription ends with its last session.
    pub fn unsubscribe(&self, kind: SubKind, name: &Bytes, sid: u64) {
        let key = (kind, name.clone());
        for conn in self.conns.borrow().values() {
            let mut reg = conn.registry.borrow_mut();
            let Some(entry) = reg.entries.get_mut(&key) else {
                continue;
            };
            let before = entry.sessions.len();
            entry.sessions.retain(|s| s.sid != sid);
            let gone = before - entry.sessions.len();
            let last = entry.sessions.is_empty();
            self.shared
                .census
                .change(kind, name, -(gone as i64), -i64::from(last));
            if last {
                reg.entries.remove(&key);
                conn.send(kind, false, name);
            }
        }
        if may_carry_keyspace(kind, name) {
            let conns: Vec<(Arc<str>, Rc<HubConn>)> = self
                .conns
                .borrow()
                .iter()
                .map(|(a, c)| (a.clone(), c.clone()))
                .collect();
            if conns
                .iter()
                .any(|(_, c)| c.registry.borrow().entries.contains_key(&key))
            {
                // Sessions elsewhere still want this node's notifications.
                self.add_echoes(kind, name, None);
                return;
            }
            for (addr, conn) in conns {
                if conn.echoes.borrow_mut().remove(&key).is_some() {
                    conn.send(kind, false, name);
                    self.shared.census.echo_change(&addr, kind, name, -1);
                }
            }
        }
    }
}

/// The subscriber connection's task: (re)connect, subscribe to everything registered, relay messages.
async fn run(hub: Hub, node: Rc<NodeSettings>, conn: Rc<HubConn>) {
    let key = ConnKey::new(0, 3);
    let mut backoff = node.reconnect_min;
    // Attempts in a row that failed: the first is a warning, the others debug lines.
    let mut failures = 0u32;
    loop {
        let mut stream = match backend::connect(&node, key).await {
            Ok(s) => s,
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == 1 {
                    warn!(backend = %node.addr, error = %e, "subscriber connection failed");
                } else {
                    debug!(backend = %node.addr, error = %e, failures, "subscriber connection: reconnect failed");
                }
                // The node may be gone for good (failover): move subscriptions to where they belong now.
                hub.shared.topology.request_refresh();
                if hub.move_off(&node.addr, &conn) {
                    debug!(backend = %node.addr, "subscriber connection retired");
                    return;
                }
                let delay = backoff.mul_f64(0.5 + fastrand::f64());
                backoff = (backoff * 2).min(node.reconnect_max);
                tokio::time::sleep(delay).await;
                if conn.retired.get() {
                    return;
                }
                continue;
            }
        };
        if failures > 0 {
            info!(backend = %node.addr, "subscriber connection up again");
        }
        backoff = node.reconnect_min;
        // Subscribe to everything registered (after a reconnect, again); queued commands are now redundant.
        conn.out.borrow_mut().clear();
        let mut wbuf = BytesMut::new();
        {
            let mut all = Vec::new();
            let mut reg = conn.registry.borrow_mut();
            let mut echoes = conn.echoes.borrow_mut();
            let held = reg.entries.iter_mut().map(|(k, e)| (k, &mut e.confirmed));
            let echoed = echoes.iter_mut().map(|(k, e)| (k, &mut e.confirmed));
            for ((kind, name), confirmed) in held.chain(echoed) {
                *confirmed = false;
                all.push(Change {
                    kind: *kind,
                    subscribe: true,
                    name: name.clone(),
                });
            }
            // A run of one verb goes as one command: by kind, and shard channels by slot.
            all.sort_by_cached_key(|c| {
                let shard = c.kind == SubKind::Shard;
                (c.kind.index(), shard.then(|| key_slot(&c.name)))
            });
            encode_subscriptions(&all, &mut wbuf);
        }
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let reason = loop {
            if conn.retired.get() {
                debug!(backend = %node.addr, "subscriber connection retired");
                return;
            }
            if let Err(e) = write_now(&mut stream, &mut wbuf) {
                break e.to_string();
            }
            let (s, w, r) = (&mut stream, &mut wbuf, &mut rbuf);
            let io = std::future::poll_fn(|cx| poll_io(s, cx, w, r, true));
            tokio::select! {
                ev = io => match ev {
                    IoEvent::Read => {
                        if let Err(e) = relay(&hub, &node.addr, &conn, &mut rbuf) {
                            break e;
                        }
                    }
                    IoEvent::Wrote | IoEvent::Readable => {}
                    IoEvent::Closed(e) => break e.map(|e| e.to_string()).unwrap_or_else(|| "closed by the server".into()),
                },
                () = conn.wake.notified() => {
                    let mut out = conn.out.borrow_mut();
                    encode_subscriptions(&out, &mut wbuf);
                    out.clear();
                }
            }
        };
        warn!(backend = %node.addr, %reason, "subscriber connection lost; resubscribing");
        // The outage is said: attempts that fail from here on are debug lines.
        failures = 1;
    }
}

/// Handles every complete frame in `rbuf`.
fn relay(hub: &Hub, addr: &Arc<str>, conn: &HubConn, rbuf: &mut BytesMut) -> Result<(), String> {
    loop {
        // Messages and subscription replies in one pass; anything else the general way.
        let (frame, kind, name) = match simple_push(rbuf) {
            Some((len, kind, name)) => {
                let frame = rbuf.split_to(len).freeze();
                let (kind, name) = (frame.slice(kind), name.map(|n| frame.slice(n)));
                (frame, kind, name)
            }
            None => {
                let Some(frame) = next_reply(rbuf).map_err(|e| e.to_string())? else {
                    return Ok(());
                };
                let Some((kind, name)) = head(&frame) else {
                    continue;
                };
                (frame, kind, name)
            }
        };
        match (kind.as_ref(), name) {
            (b"subscribe" | b"psubscribe" | b"ssubscribe", Some(name)) => {
                let k = match kind.as_ref() {
                    b"subscribe" => SubKind::Channel,
                    b"psubscribe" => SubKind::Pattern,
                    _ => SubKind::Shard,
                };
                let key = (k, name);
                if let Some(e) = conn.registry.borrow_mut().entries.get_mut(&key) {
                    e.confirmed = true;
                    e.waiters.clear();
                }
                if let Some(e) = conn.echoes.borrow_mut().get_mut(&key) {
                    e.confirmed = true;
                    e.waiters.clear();
                }
            }
            (b"message" | b"smessage", Some(channel)) => {
                let k = if kind.as_ref() == b"message" {
                    SubKind::Channel
                } else {
                    SubKind::Shard
                };
                if k == SubKind::Channel && is_keyspace_channel(&channel) {
                    keyspace_out(hub, k, channel, &frame);
                } else {
                    fan_out(conn, k, channel, &frame);
                }
            }
            (b"pmessage", Some(pattern)) => {
                // With one connection, its sessions are all there are: no need to read the
                // channel.
                if hub.conns.borrow().len() > 1
                    && third_text(&frame).is_some_and(|c| is_keyspace_channel(&c))
                {
                    keyspace_out(hub, SubKind::Pattern, pattern, &frame);
                } else {
                    fan_out(conn, SubKind::Pattern, pattern, &frame);
                }
            }
            (b"sunsubscribe", Some(channel)) => {
                // The slot moved away from this node: follow it to its new master.
                debug!(channel = %String::from_utf8_lossy(&channel), "shard channel unsubscribed by the server");
                let removed = conn
                    .registry
                    .borrow_mut()
                    .entries
                    .remove(&(SubKind::Shard, channel.clone()));
                if let Some(e) = removed {
                    hub.shared.census.change(
                        SubKind::Shard,
                        &channel,
                        -(e.sessions.len() as i64),
                        -1,
                    );
                    if !e.sessions.is_empty() {
                        hub.rehome(addr.clone(), channel, e.sessions, frame.clone());
                    }
                }
            }
            _ => {}
        }
    }
}

/// A keyspace notification: published by one node, so it arrives once, on the connection to
/// that node (a subscription or an echo), and goes to the sessions of every connection.
fn keyspace_out(hub: &Hub, kind: SubKind, name: Bytes, frame: &Bytes) {
    for c in hub.conns.borrow().values() {
        fan_out(c, kind, name.clone(), frame);
    }
}

fn fan_out(conn: &HubConn, kind: SubKind, name: Bytes, frame: &Bytes) {
    let reg = conn.registry.borrow();
    let Some(entry) = reg.entries.get(&(kind, name.clone())) else {
        return;
    };
    // The frame as it came (a view of the read buffer, not a copy): each session writes it in
    // its own protocol (`in_protocol`).
    for s in &entry.sessions {
        let _ = s.tx.send(Message {
            kind,
            name: name.clone(),
            frame: frame.clone(),
            ended: false,
        });
    }
}

/// A complete push or array frame of at most four bulk strings and integers at the start of
/// `buf` — every message (`message`, `pmessage`, `smessage`) and subscription reply is one —
/// read in one pass: its length, and where the text of its first two elements lies. `None`
/// for anything else, or a frame not fully arrived (the general parser then decides).
fn simple_push(
    buf: &[u8],
) -> Option<(
    usize,
    std::ops::Range<usize>,
    Option<std::ops::Range<usize>>,
)> {
    if !matches!(buf.first(), Some(b'>' | b'*')) {
        return None;
    }
    let (count, mut at) = resp::count_line(buf, 1)?;
    if !(1..=4).contains(&count) {
        return None;
    }
    let mut texts: [Option<std::ops::Range<usize>>; 2] = [None, None];
    for i in 0..count {
        match buf.get(at)? {
            b'$' => {
                let (len, start) = resp::count_line(buf, at + 1)?;
                let end = start.checked_add(len)?;
                if buf.get(end..end + 2)? != b"\r\n" {
                    return None;
                }
                if let Some(t) = texts.get_mut(i) {
                    *t = Some(start..end);
                }
                at = end + 2;
            }
            b':' => {
                let (_, next) = resp::count_line(buf, at + 1)?;
                at = next;
            }
            _ => return None,
        }
    }
    let [kind, name] = texts;
    Some((at, kind?, name))
}

/// The first two elements of an array or push frame as text (the kind — `message`,
/// `subscribe` … — and the channel or pattern), as views of the frame; the rest is not read.
fn head(frame: &Bytes) -> Option<(Bytes, Option<Bytes>)> {
    if !matches!(frame.first(), Some(b'*' | b'>')) {
        return None;
    }
    let (n, mut pos) = resp::count_line(frame, 1)?;
    let element = |pos: &mut usize| -> Option<Bytes> {
        let len = resp::reply_len_fast(frame.get(*pos..)?).ok()??;
        let e = frame.slice(*pos..*pos + len);
        *pos += len;
        Some(e)
    };
    if n == 0 {
        return None;
    }
    let kind = bulk_text(&element(&mut pos)?)?;
    let name = if n >= 2 {
        element(&mut pos).and_then(|e| bulk_text(&e))
    } else {
        None
    };
    Some((kind, name))
}

/// The third element of an array or push frame as text: the channel of a `pmessage`.
fn third_text(frame: &Bytes) -> Option<Bytes> {
    if !matches!(frame.first(), Some(b'*' | b'>')) {
        return None;
    }
    let (n, mut pos) = resp::count_line(frame, 1)?;
    if n < 3 {
        return None;
    }
    for _ in 0..2 {
        pos += resp::reply_len_fast(frame.get(pos..)?).ok()??;
    }
    let len = resp::reply_len_fast(frame.get(pos..)?).ok()??;
    bulk_text(&frame.slice(pos..pos + len))
}

/// The type byte a message frame starts with for a client speaking `proto`: a RESP3 push, or a
/// RESP2 array (the rest of the frame is the same in both).
pub fn message_type(proto: u8) -> u8 {
    if proto >= 3 { b'>' } else { b'*' }
}

/// The message frame in `proto`: the frame itself when it already is, else a copy with the
/// type byte changed.
pub fn in_protocol(frame: Bytes, proto: u8) -> Bytes {
    let want = message_type(proto);
    if frame.first().is_none_or(|&b| b == want) {
        return frame;
    }
    let mut f = BytesMut::from(&frame[..]);
    f[0] = want;
    f.freeze()
}

/// The text of a bulk or simple string frame.
fn bulk_text(frame: &Bytes) -> Option<Bytes> {
    match frame.first()? {
        b'$' => {
            let start = frame.iter().position(|&b| b == b'\n')? + 1;
            let end = frame.len().checked_sub(2)?;
            // `$-1` (nil) has no text.
            (start <= end).then(|| frame.slice(start..end))
        }
        b'+' => {
            let end = frame.len().checked_sub(2)?;
            (end >= 1).then(|| frame.slice(1..end))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commands `encode_subscriptions` makes of (un)subscriptions given by verb and name,
    /// as lists of arguments.
    fn commands_of(names: &[(&str, &str)]) -> Vec<Vec<String>> {
        let changes: Vec<Change> = names
            .iter()
            .map(|(verb, name)| {
                let kind = kind_of_verb(verb);
                let change = Change {
                    kind,
                    subscribe: !verb.contains("UNSUB"),
                    name: Bytes::copy_from_slice(name.as_bytes()),
                };
                assert_eq!(change.cmd(), *verb);
                change
            })
            .collect();
        let mut out = BytesMut::new();
        encode_subscriptions(&changes, &mut out);
        let mut parser = crate::protocol::RequestParser::new();
        let limits = crate::protocol::RequestLimits::default();
        let mut commands = Vec::new();
        while let Ok(Some(c)) = parser.parse(&mut out, &limits, true) {
            commands.push(
                c.to_args()
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            );
        }
        assert!(out.is_empty(), "every byte is part of a command");
        commands
    }

    fn kind_of_verb(verb: &str) -> SubKind {
        match verb {
            "PSUBSCRIBE" | "PUNSUBSCRIBE" => SubKind::Pattern,
            "SSUBSCRIBE" | "SUNSUBSCRIBE" => SubKind::Shard,
            _ => SubKind::Channel,
        }
    }

    #[test]
    fn runs_of_one_verb_go_as_one_command_and_shard_channels_by_slot() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        // `{a}x` and `{a}y` share a slot; `b` is in another.
        assert_ne!(key_slot(b"{a}x"), key_slot(b"b"));
        let got = commands_of(&[
            ("SUBSCRIBE", "c1"),
            ("SUBSCRIBE", "c2"),
            ("PSUBSCRIBE", "p*"),
            ("UNSUBSCRIBE", "c1"),
            ("SUBSCRIBE", "c1"),
            ("SSUBSCRIBE", "{a}x"),
            ("SSUBSCRIBE", "{a}y"),
            ("SSUBSCRIBE", "b"),
            ("SUNSUBSCRIBE", "{a}x"),
        ]);
        assert_eq!(
            got,
            vec![
                s(&["SUBSCRIBE", "c1", "c2"]),
                s(&["PSUBSCRIBE", "p*"]),
                s(&["UNSUBSCRIBE", "c1"]),
                s(&["SUBSCRIBE", "c1"]),
                s(&["SSUBSCRIBE", "{a}x", "{a}y"]),
                s(&["SSUBSCRIBE", "b"]),
                s(&["SUNSUBSCRIBE", "{a}x"]),
            ]
        );
        // At most NAMES_PER_COMMAND names a command, none lost.
        let many: Vec<String> = (0..2500).map(|i| format!("m{i}")).collect();
        let names: Vec<(&str, &str)> = many.iter().map(|m| ("SUBSCRIBE", m.as_str())).collect();
        let got = commands_of(&names);
        let sizes: Vec<usize> = got.iter().map(|c| c.len() - 1).collect();
        assert_eq!(sizes, vec![1024, 1024, 452]);
        let all: Vec<&String> = got.iter().flat_map(|c| c.iter().skip(1)).collect();
        assert_eq!(all, many.iter().collect::<Vec<_>>());
        assert!(commands_of(&[]).is_empty());
        // And at most NAME_BYTES_PER_COMMAND bytes of names after the first; a bigger name
        // goes alone.
        let big = "x".repeat(100 * 1024);
        let huge = "y".repeat(300 * 1024);
        let got = commands_of(&[
            ("SUBSCRIBE", &big),
            ("SUBSCRIBE", &big),
            ("SUBSCRIBE", &big),
            ("SUBSCRIBE", &huge),
            ("SUBSCRIBE", "small"),
        ]);
        let sizes: Vec<Vec<usize>> = got
            .iter()
            .map(|c| c.iter().skip(1).map(String::len).collect())
            .collect();
        assert_eq!(
            sizes,
            vec![
                vec![100 * 1024, 100 * 1024],
                vec![100 * 1024],
                vec![300 * 1024],
                vec![5]
            ]
        );
    }

    /// A frame's length and its first two elements' text.
    type Read = (usize, Option<(Bytes, Option<Bytes>)>);

    /// What the general path makes of the frame at the start of `buf` (`None`: not complete).
    fn general(buf: &[u8]) -> Option<Read> {
        let mut b = BytesMut::from(buf);
        let frame = next_reply(&mut b).ok()??;
        Some((frame.len(), head(&frame)))
    }

    #[test]
    fn subscriptions_that_may_carry_keyspace_notifications() {
        let carries = |kind, name: &str| may_carry_keyspace(kind, name.as_bytes());
        assert!(carries(SubKind::Channel, "__keyspace@0__:user:1"));
        assert!(carries(SubKind::Channel, "__keyevent@3__:expired"));
        assert!(!carries(SubKind::Channel, "news"));
        assert!(!carries(SubKind::Channel, "__keys"));
        for p in [
            "*",
            "__key*",
            "__keyspace@*",
            "__keyevent@0__:*",
            "?_keyspace@0__:x",
            "__k[e]y*",
            "__keyspace@0__:user:\\*",
        ] {
            assert!(carries(SubKind::Pattern, p), "{p}");
        }
        for p in ["news*", "_x*", "__keyz*", "user:*", "__keyspac"] {
            assert!(!carries(SubKind::Pattern, p), "{p}");
        }
        assert!(!carries(SubKind::Shard, "__keyspace@0__:x"));
    }

    #[test]
    fn the_channel_of_a_pmessage() {
        let frame = Bytes::from_static(
            b">4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$20\r\n__keyspace@0__:a:b:c\r\n$3\r\nset\r\n",
        );
        assert_eq!(
            third_text(&frame).as_deref(),
            Some(&b"__keyspace@0__:a:b:c"[..])
        );
        let message = Bytes::from_static(b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n");
        assert_eq!(third_text(&message).as_deref(), Some(&b"b"[..]));
        assert_eq!(
            third_text(&Bytes::from_static(b"*2\r\n$1\r\na\r\n$1\r\nb\r\n")),
            None
        );
        assert_eq!(
            third_text(&Bytes::from_static(b"*3\r\n$1\r\na\r\n$1\r\nb\r\n")),
            None
        );
    }

    #[test]
    fn the_one_pass_reading_of_messages_agrees_with_the_general_parser() {
        let frames: &[&[u8]] = &[
            b">3\r\n$7\r\nmessage\r\n$5\r\nticks\r\n$2\r\nm1\r\n",
            b"*3\r\n$7\r\nmessage\r\n$0\r\n\r\n$0\r\n\r\n",
            b">4\r\n$8\r\npmessage\r\n$4\r\ntic*\r\n$5\r\nticks\r\n$4\r\na\r\nb\r\n",
            b">3\r\n$8\r\nsmessage\r\n$3\r\n{a}\r\n$12\r\nbinary\r\n\x00\xff..\r\n",
            b">3\r\n$9\r\nsubscribe\r\n$5\r\nticks\r\n:1\r\n",
            b">3\r\n$12\r\nsunsubscribe\r\n$1\r\nx\r\n:0\r\n",
            b">3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n",
            b">2\r\n$4\r\npong\r\n$0\r\n\r\n",
            b">1\r\n$4\r\npong\r\n",
            b"+OK\r\n",
            b">3\r\n+message\r\n$1\r\na\r\n$1\r\nb\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n:-1\r\n",
            b">5\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n$1\r\nd\r\n",
            b">3\r\n$7\r\nmessage\r\n$01\r\na\r\n$1\r\nb\r\n",
            b"*0\r\n",
        ];
        for frame in frames {
            // Whole, followed by another frame, and every incomplete prefix.
            let mut two = frame.to_vec();
            two.extend_from_slice(b">1\r\n$4\r\npong\r\n");
            for buf in [frame.to_vec(), two]
                .into_iter()
                .chain((0..frame.len()).map(|n| frame[..n].to_vec()))
            {
                let Some((len, kind, name)) = simple_push(&buf) else {
                    continue;
                };
                let text = |r: std::ops::Range<usize>| Bytes::copy_from_slice(&buf[r]);
                assert_eq!(
                    Some((len, Some((text(kind), name.map(text))))),
                    general(&buf),
                    "{:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
        }
        // The usual frames take the one pass.
        assert!(simple_push(frames[0]).is_some());
        assert!(simple_push(frames[2]).is_some());
        assert!(simple_push(frames[4]).is_some());
    }
}
