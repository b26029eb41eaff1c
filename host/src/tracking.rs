//! `CLIENT TRACKING` through respire: server-assisted client-side caching for respire's
//! clients, as Redis offers it to its own.
//!
//! Redis tracks keys per connection, and respire's connections to Redis are shared, so the
//! tracking table lives here, with Redis's rules:
//! - **Default mode:** the keys of a tracking client's read-only commands are remembered
//!   (`OPTIN` / `OPTOUT` with `CLIENT CACHING` decide which); when one changes, each client
//!   that read it is told once (`invalidate [key]`) and forgotten until it reads it again.
//! - **`BCAST`:** a client is told of every changed key under its prefixes, one message per
//!   prefix and batch of changes.
//! - **`NOLOOP`:** a client is not told of its own writes.
//! - **`REDIRECT id`:** another client of respire gets the messages: in RESP3 as push
//!   frames, in RESP2 as `__redis__:invalidate` messages if it is subscribed; when it is
//!   gone, the tracking client gets `tracking-redir-broken` (RESP3).
//! - **`FLUSHALL` / `FLUSHDB`:** every tracking client gets `invalidate` with a null.
//!
//! What changed is learnt from Redis itself: while any client tracks, the tracking thread
//! (`crate::cache::track`) keeps a `CLIENT TRACKING on BCAST` connection to every master,
//! over every key, and hands its pushes to [`Tracking::changed`]. Writes by anyone (other
//! proxies, expiry, eviction) are seen. `CLIENT TRACKING on` is answered once those
//! connections are up; if one is lost, every tracking client is told to drop everything
//! (a null), then again when it is back, since changes may have gone unseen meanwhile.
//!
//! A session hands invalidations to the client after the replies it already owes (a message
//! never overtakes the reply of a read it concerns), as Redis does on one connection.
//! Messages travel through the client's [`ClientInfo`] inbox and its `NOTES` signal.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::backend::Reply;
use crate::clients::{ClientInfo, Clients, flag};
use crate::protocol as resp;

/// Most keys remembered for default-mode clients at first (Redis's default
/// `tracking-table-max-keys`; `CONFIG SET` through respire changes both).
const MAX_KEYS: usize = 1_000_000;
/// How long the all-keys tracking connections stay after the last tracking client left (so
/// that clients that come and go do not reopen them each time).
const LINGER: Duration = Duration::from_secs(30);
/// Tracking series on the metrics endpoint (registered when first used).
struct Stats {
    clients: prometheus::IntGauge,
    messages: prometheus::IntCounter,
}

static STATS: std::sync::LazyLock<Stats> = std::sync::LazyLock::new(|| Stats {
    clients: crate::metrics::int_gauge(
        "respire_tracking_clients",
        "Clients with CLIENT TRACKING on",
    ),
    messages: crate::metrics::int_counter(
        "respire_tracking_messages_total",
        "Invalidation messages handed to tracking clients (or their redirection targets)",
    ),
});

/// The channel Redis uses for invalidations to RESP2 clients.
pub const CHANNEL: &[u8] = b"__redis__:invalidate";

/// A client's tracking options (`CLIENT TRACKING on …`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mode {
    pub bcast: bool,
    pub optin: bool,
    pub optout: bool,
    pub noloop: bool,
    /// The client messages go to (0: the tracking client itself).
    pub redirect: u64,
    /// `BCAST` prefixes (an empty one: every key).
    pub prefixes: Vec<Bytes>,
}

/// What a client is told (through its inbox).
#[derive(Debug, Clone)]
pub enum Note {
    /// Keys changed; `None`: everything (a flush). `redirected`: for another client, so a
    /// RESP2 client gets it as a pub/sub message. `null_proto`: the protocol of the
    /// tracking client, whose null Redis sends.
    Invalidate {
        keys: Option<Vec<Bytes>>,
        redirected: bool,
        null_proto: u8,
    },
    /// The client invalidations were redirected to is gone.
    RedirBroken(u64),
}

impl Note {
    /// The frame for a client in protocol `proto`, subscribed or not; `None`: nothing is sent
    /// (RESP2 has no push frames outside pub/sub).
    pub fn frame(&self, proto: u8, subscribed: bool) -> Option<Bytes> {
        let mut f = BytesMut::new();
        match self {
            Note::Invalidate {
                keys,
                redirected,
                null_proto,
            } => {
                if proto >= 3 {
                    resp::push_header(&mut f, 2, 3);
                    resp::bulk(&mut f, b"invalidate");
                } else if *redirected && subscribed {
                    resp::array_header(&mut f, 3);
                    resp::bulk(&mut f, b"message");
                    resp::bulk(&mut f, CHANNEL);
                } else {
                    return None;
                }
                match keys {
                    Some(keys) => {
                        resp::array_header(&mut f, keys.len());
                        for k in keys {
                            resp::bulk(&mut f, k);
                        }
                    }
                    None => resp::null(&mut f, *null_proto),
                }
            }
            Note::RedirBroken(id) => {
                if proto < 3 {
                    return None;
                }
                resp::push_header(&mut f, 2, 3);
                resp::bulk(&mut f, b"tracking-redir-broken");
                resp::int(&mut f, *id as i64);
            }
        }
        Some(f.freeze())
    }
}

struct Tracked {
    mode: Mode,
    info: Arc<ClientInfo>,
    /// Its redirection target went away (`broken_redirect`).
    broken: bool,
}

/// A `NOLOOP` client's write whose invalidation has not come back from Redis yet.
struct OwnWrite {
    /// When it was sent: a fence round started later clears it (see [`Tracking::fence`]).
    sent: Instant,
    /// The client read the key again after writing it: it stays tracked.
    reread: bool,
}

#[derive(Default)]
struct Table {
    clients: HashMap<u64, Tracked>,
    /// Default mode: key → the clients that read it.
    keys: HashMap<Bytes, Vec<u64>>,
    items: usize,
    own: HashMap<(u64, Bytes), OwnWrite>,
}

/// Whether the all-keys tracking connections are kept.
#[derive(Clone, Copy)]
enum Linger {
    /// No client has tracked yet.
    Never,
    /// Clients track now.
    Tracking,
    /// The last tracking client left then.
    Since(Instant),
}

/// The process's tracking state (in [`crate::server::Shared`]).
pub struct Tracking {
    /// `tracking-table-max-keys` (0: no limit): beyond it, keys are dropped from the table
    /// and their clients told, as Redis does.
    max_keys: AtomicUsize,
    /// Tracking clients: the per-command check is one relaxed load of this.
    count: AtomicUsize,
    /// Every node's all-keys tracking connection is up.
    up: AtomicBool,
    table: Mutex<Table>,
    /// `CLIENT TRACKING on` replies waiting for the connections, with their deadlines.
    waiters: Mutex<Vec<(Instant, u64, oneshot::Sender<Reply>)>>,
    /// Whether clients track, or since when none has (for [`LINGER`]).
    linger: Mutex<Linger>,
    /// Wakes the tracking thread (a client started tracking).
    pub wake: tokio::sync::Notify,
    /// The tracking connections' read sides (see [`crate::invalidation::sync`]).
    links: Mutex<Arc<Vec<Arc<crate::invalidation::Link>>>>,
    /// Fence rounds on the tracking connections.
    pub fences: crate::invalidation::Fences,
}

impl Default for Tracking {
    fn default() -> Self {
        Tracking {
            max_keys: AtomicUsize::new(MAX_KEYS),
            count: AtomicUsize::new(0),
            up: AtomicBool::new(false),
            table: Mutex::default(),
            waiters: Mutex::default(),
            linger: Mutex::new(Linger::Never),
            wake: tokio::sync::Notify::new(),
            links: Mutex::default(),
            fences: crate::invalidation::Fences::default(),
        }
    }
}

impl Tracking {
    /// The tracking connections up now.
    pub fn links(&self) -> Arc<Vec<Arc<crate::invalidation::Link>>> {
        self.links.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Replaces the list of tracking connections.
    pub fn set_links(&self, links: Vec<Arc<crate::invalidation::Link>>) {
        if let Ok(mut l) = self.links.lock() {
            *l = Arc::new(links);
        }
    }

    /// A tracking connection is up.
    pub fn add_link(&self, link: Arc<crate::invalidation::Link>) {
        if let Ok(mut l) = self.links.lock() {
            let mut v = l.as_ref().clone();
            v.push(link);
            *l = Arc::new(v);
        }
    }

    /// A tracking connection went away.
    pub fn remove_link(&self, link: &Arc<crate::invalidation::Link>) {
        if let Ok(mut l) = self.links.lock() {
            let v: Vec<_> = l
                .iter()
                .filter(|x| !Arc::ptr_eq(x, link))
                .cloned()
                .collect();
            *l = Arc::new(v);
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tracking clients now.
    pub fn clients(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// `INFO`'s `tracking_total_keys`, `tracking_total_items`, `tracking_total_prefixes`.
    pub fn totals(&self) -> (usize, usize, usize) {
        let t = self.table();
        let prefixes: HashSet<&Bytes> = t
            .clients
            .values()
            .filter(|c| c.mode.bcast)
            .flat_map(|c| c.mode.prefixes.iter())
            .collect();
        (t.keys.len(), t.items, prefixes.len())
    }

    /// Whether the all-keys tracking connections are wanted: a client tracks, or one did
    /// within `LINGER`.
    pub fn wanted(&self) -> bool {
        let mut linger = self.linger.lock().unwrap_or_else(|e| e.into_inner());
        if self.clients() > 0 || !self.waiters_empty() {
            *linger = Linger::Tracking;
            return true;
        }
        match *linger {
            Linger::Never => false,
            Linger::Tracking => {
                *linger = Linger::Since(Instant::now());
                true
            }
            Linger::Since(t) => t.elapsed() < LINGER,
        }
    }

    fn waiters_empty(&self) -> bool {
        self.waiters.lock().map_or(true, |w| w.is_empty())
    }

    /// Turns tracking on (or changes its options) for a client. Returns a receiver for the
    /// `+OK` when the tracking connections are not up yet (answered when they are, or with an
    /// error after `wait`).
    pub fn enable(
        &self,
        info: &Arc<ClientInfo>,
        mode: Mode,
        wait: Duration,
    ) -> Option<oneshot::Receiver<Reply>> {
        {
            let mut t = self.table();
            let fresh = t
                .clients
                .insert(
                    info.id,
                    Tracked {
                        mode: mode.clone(),
                        info: info.clone(),
                        broken: false,
                    },
                )
                .is_none();
            if fresh {
                let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
                STATS.clients.set(n as i64);
            }
        }
        show(info, Some(&mode), false);
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if self.up.load(Ordering::Acquire) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        w.push((Instant::now() + wait, info.id, tx));
        drop(w);
        self.wake.notify_one();
        Some(rx)
    }

    /// Turns tracking off for a client (its remembered keys are dropped lazily, as in Redis).
    pub fn disable(&self, info: &ClientInfo) {
        let mut t = self.table();
        if t.clients.remove(&info.id).is_some() {
            let n = self.count.fetch_sub(1, Ordering::Relaxed) - 1;
            STATS.clients.set(n as i64);
        }
        t.own.retain(|(id, _), _| *id != info.id);
        drop(t);
        show(info, None, false);
    }

    /// Whether the client's redirection broke (for `CLIENT TRACKINGINFO`).
    pub fn broken(&self, id: u64) -> bool {
        self.table().clients.get(&id).is_some_and(|c| c.broken)
    }

    /// A default-mode client read these keys.
    pub fn remember(&self, clients: &Clients, id: u64, keys: impl Iterator<Item = Bytes>) {
        let mut t = self.table();
        if !t.clients.contains_key(&id) {
            return;
        }
        for k in keys {
            if let Some(own) = t.own.get_mut(&(id, k.clone())) {
                own.reread = true;
            }
            let ids = t.keys.entry(k).or_default();
            if !ids.contains(&id) {
                ids.push(id);
                t.items += 1;
            }
        }
        self.limit(t, clients);
    }

    /// `CONFIG SET tracking-table-max-keys`.
    pub fn set_max_keys(&self, max: usize, clients: &Clients) {
        self.max_keys.store(max, Ordering::Relaxed);
        self.limit(self.table(), clients);
    }

    /// Drops keys over `tracking-table-max-keys` from the table; their clients are told.
    fn limit(&self, mut t: MutexGuard<'_, Table>, clients: &Clients) {
        let max = self.max_keys.load(Ordering::Relaxed);
        if max == 0 || t.keys.len() <= max {
            return;
        }
        let over: Vec<Bytes> = t.keys.keys().take(t.keys.len() - max).cloned().collect();
        let notes = deliveries_for_keys(&mut t, &over, false);
        drop(t);
        self.send(notes, clients);
    }

    /// A `NOLOOP` client wrote these keys: it is not to be told of them.
    pub fn wrote(&self, id: u64, keys: impl Iterator<Item = Bytes>) {
        self.own_writes(id, keys, false);
    }

    /// A transaction about to run writes these keys and then reads them: the invalidation its
    /// own writes cause does not reach the client, which keeps tracking them (Redis registers
    /// the read after the write).
    pub fn reread_after_write(&self, id: u64, keys: Vec<Bytes>) {
        self.own_writes(id, keys.into_iter(), true);
    }

    /// Notes the client's own writes of `keys`, sent now; `reread`: read again after them.
    fn own_writes(&self, id: u64, keys: impl Iterator<Item = Bytes>, reread: bool) {
        let sent = Instant::now();
        let mut t = self.table();
        for k in keys {
            t.own.insert((id, k), OwnWrite { sent, reread });
        }
    }

    /// Whether `NOLOOP` writes wait for their invalidations (the tracking thread then runs a
    /// fence round).
    pub fn has_own_writes(&self) -> bool {
        !self.table().own.is_empty()
    }

    /// A fence round that started at `start` completed: every invalidation Redis made for a
    /// write sent before it has arrived, so those writes' entries go.
    pub fn fence(&self, start: Instant) {
        self.table().own.retain(|_, o| o.sent >= start);
    }

    /// Redis reports these keys changed (one push of the tracking connection).
    pub fn changed(&self, clients: &Clients, keys: &[Bytes]) {
        if self.clients() == 0 {
            return;
        }
        let mut t = self.table();
        let mut notes = deliveries_for_keys(&mut t, keys, true);
        // Broadcast clients: one message per prefix with the keys under it.
        for (&id, c) in &t.clients {
            if !c.mode.bcast {
                continue;
            }
            for p in &c.mode.prefixes {
                let mut under: Vec<Bytes> = Vec::new();
                for k in keys {
                    if k.starts_with(p) && !(c.mode.noloop && t.own.contains_key(&(id, k.clone())))
                    {
                        under.push(k.clone());
                    }
                }
                if !under.is_empty() {
                    notes.push((id, Some(under)));
                }
            }
        }
        if t.clients.values().any(|c| c.mode.bcast && c.mode.noloop) {
            let Table { clients, own, .. } = &mut *t;
            own.retain(|(id, k), _| {
                !(keys.contains(k) && clients.get(id).is_some_and(|c| c.mode.bcast))
            });
        }
        drop(t);
        self.send(notes, clients);
    }

    /// Everything changed (a flush on Redis, or invalidations may have been missed): every
    /// tracking client is told to drop everything.
    pub fn flushed(&self, clients: &Clients) {
        let mut t = self.table();
        t.keys.clear();
        t.items = 0;
        let notes: Vec<(u64, Option<Vec<Bytes>>)> =
            t.clients.keys().map(|&id| (id, None)).collect();
        drop(t);
        self.send(notes, clients);
    }

    /// Empties the table without telling anyone (a flush is on its way to Redis; its null
    /// will tell every client).
    pub fn forget_keys(&self) {
        let mut t = self.table();
        t.keys.clear();
        t.items = 0;
    }

    /// The tracking connections are all up (`true`) or one is down.
    pub fn set_up(&self, up: bool, clients: &Clients) {
        // `up` changes under the waiters' lock, which `enable` checks it under: no `+OK`
        // waits for a change that already happened.
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let was = self.up.swap(up, Ordering::AcqRel);
        if up && !was {
            let waiters: Vec<(Instant, u64, oneshot::Sender<Reply>)> = w.drain(..).collect();
            drop(w);
            // Changes made while a connection was down went unseen: clients that were
            // tracking then drop everything (those whose `+OK` waited did not track yet).
            // The table stays: an entry only means a client may hold the key.
            let t = self.table();
            let notes: Vec<(u64, Option<Vec<Bytes>>)> = t
                .clients
                .keys()
                .filter(|id| !waiters.iter().any(|(_, w, _)| w == *id))
                .map(|&id| (id, None))
                .collect();
            drop(t);
            self.send(notes, clients);
            for (_, _, tx) in waiters {
                let _ = tx.send(Ok(Bytes::from_static(b"+OK\r\n")));
            }
        } else if !up && was {
            drop(w);
            self.flushed(clients);
        }
    }

    /// Answers the waiters whose deadline passed with an error, and turns their tracking off.
    pub fn expire_waiters(&self, reason: &str) {
        let now = Instant::now();
        let expired: Vec<(u64, oneshot::Sender<Reply>)> = match self.waiters.lock() {
            Ok(mut w) => {
                let (gone, kept): (Vec<_>, Vec<_>) =
                    w.drain(..).partition(|(deadline, _, _)| *deadline <= now);
                *w = kept;
                gone.into_iter().map(|(_, id, tx)| (id, tx)).collect()
            }
            Err(_) => return,
        };
        for (id, tx) in expired {
            let info = self.table().clients.get(&id).map(|c| c.info.clone());
            if let Some(info) = info {
                self.disable(&info);
            }
            let _ = tx.send(Ok(Bytes::from(format!(
                "-ERR respire: cannot track keys: {reason}\r\n"
            ))));
        }
    }

    /// Hands notes to their clients (or their redirection targets).
    fn send(&self, notes: Vec<(u64, Option<Vec<Bytes>>)>, clients: &Clients) {
        if notes.is_empty() {
            return;
        }
        STATS.messages.inc_by(notes.len() as u64);
        let mut t = self.table();
        for (id, keys) in notes {
            let Some(c) = t.clients.get_mut(&id) else {
                continue;
            };
            let null_proto = c.info.resp.load(Ordering::Relaxed);
            if c.mode.redirect == 0 {
                c.info.notify(Note::Invalidate {
                    keys,
                    redirected: false,
                    null_proto,
                });
                continue;
            }
            match clients.get(c.mode.redirect) {
                Some(target) => target.notify(Note::Invalidate {
                    keys,
                    redirected: true,
                    null_proto,
                }),
                None => {
                    if !c.broken {
                        c.broken = true;
                        show(&c.info, Some(&c.mode), true);
                    }
                    c.info.notify(Note::RedirBroken(c.mode.redirect));
                }
            }
        }
    }
}

/// Default-mode deliveries for changed keys: each client that read one is told once, then
/// forgotten for it, except a `NOLOOP` client's own write (`changes`: real changes, not an
/// eviction from the table).
fn deliveries_for_keys(
    t: &mut Table,
    keys: &[Bytes],
    changes: bool,
) -> Vec<(u64, Option<Vec<Bytes>>)> {
    let mut notes = Vec::new();
    if t.keys.is_empty() {
        return notes;
    }
    for k in keys {
        let Some(ids) = t.keys.remove(k) else {
            continue;
        };
        t.items -= ids.len();
        let mut keep = Vec::new();
        for id in ids {
            let Some(c) = t.clients.get(&id) else {
                continue;
            };
            if c.mode.bcast {
                continue;
            }
            // A NOLOOP client's own write, or a key a transaction read after writing it.
            if changes {
                if let Some(own) = t.own.remove(&(id, k.clone())) {
                    if own.reread {
                        keep.push(id);
                    }
                    continue;
                }
            }
            notes.push((id, Some(vec![k.clone()])));
        }
        if !keep.is_empty() {
            t.items += keep.len();
            t.keys.insert(k.clone(), keep);
        }
    }
    notes
}

/// Shows a client's tracking in `CLIENT LIST` (`t`, `R`, `B`, `redir=`).
fn show(info: &ClientInfo, mode: Option<&Mode>, broken: bool) {
    info.set_flag(flag::TRACKING, mode.is_some());
    info.set_flag(flag::TRACKING_BROKEN, broken);
    info.set_flag(flag::TRACKING_BCAST, mode.is_some_and(|m| m.bcast));
    info.redir
        .store(mode.map_or(-1, |m| m.redirect as i64), Ordering::Relaxed);
}

/// Checks `BCAST` prefixes as Redis does: none may be a prefix of another, new or existing.
/// Returns Redis's error text.
pub fn prefix_collision(existing: &[Bytes], new: &[Bytes]) -> Option<String> {
    let overlap = |a: &[u8], b: &[u8]| {
        let n = a.len().min(b.len());
        a[..n] == b[..n]
    };
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for (i, p) in new.iter().enumerate() {
        if let Some(e) = existing.iter().find(|e| overlap(e, p)) {
            return Some(format!(
                "ERR Prefix '{}' overlaps with an existing prefix '{}'. Prefixes for a single client must not overlap.",
                text(p),
                text(e)
            ));
        }
        if let Some(o) = new[i + 1..].iter().find(|o| overlap(p, o)) {
            return Some(format!(
                "ERR Prefix '{}' overlaps with another provided prefix '{}'. Prefixes for a single client must not overlap.",
                text(p),
                text(o)
            ));
        }
    }
    None
}
