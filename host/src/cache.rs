//! The response cache that plugins drive (the `cache` action of a request hook).
//!
//! One cache for the process, shared by every worker: a hit on one worker serves a reply
//! another worker fetched. It is split into shards, each behind its own mutex; an entry
//! lives in the shard of its first key, and every key of an entry points to it from the
//! shard of that key (`by_key`), so that a write to any key of a multi-key read (`MGET`)
//! finds it.
//!
//! **Never stale beyond what the operator asked for.**
//! - A write through respire drops the replies that read its keys when it is sent and
//!   again when its reply arrives (so a read that raced it on another connection cannot
//!   leave an old value behind once the writer has its answer).
//! - A write by anyone else is reported by Redis itself: [`crate::invalidation`] keeps a connection per
//!   node with `CLIENT TRACKING on BCAST` (over the plugins' prefixes) and drops what it
//!   names. The cache serves only while every master's tracking connection is up; when one
//!   drops, everything is flushed before the next lookup. The connections are open only while
//!   plugins ask the cache to keep reads ([`Cache::asked`], `response_cache_idle`).
//! - A miss puts a *pending* entry in place before the request goes to Redis; an
//!   invalidation removes it, and the reply is then passed on but not kept. So a write that
//!   lands between a read and its reply never leaves the read's old value in the cache.
//!
//! **Single flight.** Clients that miss on a pending entry wait for its reply instead of
//! asking Redis again. If the client that went to Redis disappears first, they are told so
//! and each sends its own request.
//!
//! **Bounded memory.** Each shard holds at most `max_memory / shards` bytes (keys, reply,
//! bookkeeping); beyond that a CLOCK sweep (second chance for entries hit since the last
//! sweep) drops the least recently used.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{BufMut, Bytes, BytesMut};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::oneshot;

use crate::backend::Reply;

const SHARDS: usize = 16;
/// Bookkeeping bytes counted per entry on top of its key and reply.
const OVERHEAD: usize = 96;

/// Counters of the cache on the metrics endpoint.
struct Stats {
    hits: IntCounter,
    misses: IntCounter,
    joined: IntCounter,
    evictions: IntCounter,
    invalidations: IntCounter,
    flushes: IntCounter,
    bytes: IntGauge,
    entries: IntGauge,
    active: IntGauge,
}

static STATS: LazyLock<Stats> = LazyLock::new(|| {
    use crate::metrics::{int_counter, int_gauge};
    Stats {
        hits: int_counter(
            "respire_cache_hits_total",
            "Replies served from respire's response cache",
        ),
        misses: int_counter(
            "respire_cache_misses_total",
            "Cacheable commands sent to Redis because the cache had no fresh reply",
        ),
        joined: int_counter(
            "respire_cache_single_flight_waits_total",
            "Cacheable commands that waited for a request already on its way to Redis instead of sending their own",
        ),
        evictions: int_counter(
            "respire_cache_evictions_total",
            "Cached replies dropped to stay within max_memory",
        ),
        invalidations: int_counter(
            "respire_cache_invalidations_total",
            "Cached or pending replies dropped because one of their keys was written (through respire or on Redis)",
        ),
        flushes: int_counter(
            "respire_cache_flushes_total",
            "Times the whole cache was dropped (a tracking connection lost, FLUSHALL, a settings change)",
        ),
        bytes: int_gauge(
            "respire_cache_bytes",
            "Bytes held by respire's response cache (keys, replies and bookkeeping)",
        ),
        entries: int_gauge(
            "respire_cache_entries",
            "Replies held by respire's response cache",
        ),
        active: int_gauge(
            "respire_cache_active",
            "1 when the response cache serves (a plugin uses it, it was asked for within response_cache_idle, and every tracking connection is up)",
        ),
    }
});

/// Hits, misses, entries and bytes so far (for `INFO`).
pub fn counters() -> (u64, u64, i64, i64) {
    (
        STATS.hits.get(),
        STATS.misses.get(),
        STATS.entries.get(),
        STATS.bytes.get(),
    )
}

/// How long to keep a reply, as the request hooks asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheFor {
    /// A reply with content.
    pub ttl: Duration,
    /// An empty reply (nil, empty collection, `:0`); zero: not kept.
    pub empty_ttl: Duration,
}

enum State {
    Pending {
        token: u64,
        waiters: Vec<oneshot::Sender<Reply>>,
    },
    Ready {
        reply: Bytes,
        expires: Instant,
        referenced: bool,
    },
}

struct Entry {
    id: u64,
    keys: Vec<Bytes>,
    state: State,
    size: usize,
}

#[derive(Default)]
struct Shard {
    entries: HashMap<Bytes, Entry>,
    /// Key → (cache key, shard of its entry) of every entry that reads it.
    by_key: HashMap<Bytes, Vec<(Bytes, u8)>>,
    /// CLOCK order of ready entries: (cache key, entry id).
    clock: VecDeque<(Bytes, u64)>,
    /// Waiters of pending entries that were invalidated: they still get the reply.
    orphans: HashMap<u64, Vec<oneshot::Sender<Reply>>>,
    bytes: usize,
}

/// What a lookup found.
pub enum Lookup {
    /// A fresh reply.
    Hit(Bytes),
    /// Another client's request for the same reply is on its way: wait for it here.
    Wait(oneshot::Receiver<Reply>),
    /// Nothing: send the request and hand its reply to the guard.
    Miss(FillGuard),
    /// The cache is not serving (no plugin uses it, or a tracking connection is down).
    Off,
}

/// The respire-wide response cache.
pub struct Cache {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    next_id: AtomicU64,
    /// Serving: a plugin uses the cache and every master's tracking connection is up.
    active: AtomicBool,
    /// Replies are kept only for keys under these prefixes (none: every key).
    prefixes: ArcSwap<crate::prefixes::Prefixes>,
    max_memory: AtomicU64,
    /// Bumped each time a tracking connection is lost: the manager only turns serving on if no
    /// connection was lost since it found them all up.
    epoch: Mutex<u64>,
    /// A plugin asked to cache a read since the tracking manager last looked: the cache is in
    /// use (see [`Cache::asked`]).
    asked: AtomicBool,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            next_id: AtomicU64::new(1),
            active: AtomicBool::new(false),
            prefixes: ArcSwap::from_pointee(crate::prefixes::Prefixes::default()),
            max_memory: AtomicU64::new(64 << 20),
            epoch: Mutex::new(0),
            asked: AtomicBool::new(false),
        }
    }
}

/// Whether `key` is under one of `prefixes` (none: every key is).
fn under(prefixes: &crate::prefixes::Prefixes, key: &[u8]) -> bool {
    prefixes.is_empty() || prefixes.covers(key)
}

/// Whether a reply counts as empty for `empty_ttl`.
fn is_empty_reply(reply: &[u8]) -> bool {
    matches!(
        reply,
        b"$-1\r\n" | b"*-1\r\n" | b"_\r\n" | b"*0\r\n" | b"%0\r\n" | b"~0\r\n" | b":0\r\n"
    )
}

/// The cache key of a command: database, protocol, lower-case name and arguments.
pub fn cache_key(db: u32, proto: u8, cmd: &crate::protocol::Command) -> Bytes {
    let mut k = BytesMut::with_capacity(8 + cmd.iter().map(|a| a.len() + 4).sum::<usize>());
    k.put_u32(db);
    k.put_u8(proto);
    for (i, a) in cmd.iter().enumerate() {
        k.put_u32(a.len() as u32);
        if i == 0 {
            k.extend(a.iter().map(u8::to_ascii_lowercase));
        } else {
            k.extend_from_slice(a);
        }
    }
    k.freeze()
}

impl Cache {
    fn shard_of(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % self.shards.len()
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // A poisoned lock means a panic mid-update; the maps are still consistent enough to serve.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn budget(&self) -> usize {
        (self.max_memory.load(Ordering::Relaxed) as usize / SHARDS).max(1)
    }

    /// Whether the cache serves now.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Which keys a reply may be kept for (those under the prefixes), the prefixes read once:
    /// the only keys a write has to drop (`lookup` checks them again under the shard's lock, with
    /// the prefixes of the moment).
    pub fn keeps(&self) -> impl Fn(&[u8]) -> bool + '_ {
        let prefixes = self.prefixes.load();
        move |key| under(&prefixes, key)
    }

    /// Whether replies for these keys may be kept (all under the plugins' prefixes).
    pub fn covers(&self, keys: &[Bytes]) -> bool {
        let prefixes = self.prefixes.load();
        !keys.is_empty() && keys.iter().all(|k| under(&prefixes, k))
    }

    /// Looks a command up; `keys` are the keys it reads (the first decides its shard). With
    /// `may_wait` false, a request already on its way is not waited for ([`Lookup::Off`]).
    pub fn lookup(
        self: &Arc<Self>,
        ckey: Bytes,
        keys: Vec<Bytes>,
        how: CacheFor,
        may_wait: bool,
    ) -> Lookup {
        if !self.is_active() {
            return Lookup::Off;
        }
        let Some(first) = keys.first() else {
            return Lookup::Off;
        };
        let home = self.shard_of(first);
        let now = Instant::now();
        let token = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut foreign = Vec::new();
        {
            let mut s = self.lock(home);
            match s.entries.get_mut(&ckey) {
                Some(Entry {
                    state:
                        State::Ready {
                            reply,
                            expires,
                            referenced,
                        },
                    ..
                }) if *expires > now => {
                    *referenced = true;
                    STATS.hits.inc();
                    return Lookup::Hit(reply.clone());
                }
                Some(Entry {
                    state: State::Pending { .. },
                    ..
                }) if !may_wait => return Lookup::Off,
                Some(Entry {
                    state: State::Pending { waiters, .. },
                    ..
                }) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    STATS.joined.inc();
                    return Lookup::Wait(rx);
                }
                Some(_) => {
                    // Expired.
                    foreign = remove_entry(&mut s, &ckey, home);
                }
                None => {}
            }
            // Checked again under the lock: a flush (when serving stops, as it does before the
            // prefixes change) takes this lock after turning serving off, so nothing is kept
            // past it, and nothing is kept for keys outside the prefixes of the moment (writes
            // drop only keys under them, see `keeps`).
            if !self.is_active() || !self.covers(&keys) {
                drop(s);
                self.cleanup(foreign);
                return Lookup::Off;
            }
            STATS.misses.inc();
            let size = ckey.len() + OVERHEAD + keys.iter().map(|k| k.len()).sum::<usize>();
            for k in &keys {
                if self.shard_of(k) == home {
                    s.by_key
                        .entry(k.clone())
                        .or_default()
                        .push((ckey.clone(), home as u8));
                }
            }
            s.bytes += size;
            STATS.bytes.add(size as i64);
            STATS.entries.inc();
            s.entries.insert(
                ckey.clone(),
                Entry {
                    id: token,
                    keys: keys.clone(),
                    state: State::Pending {
                        token,
                        waiters: Vec::new(),
                    },
                    size,
                },
            );
        }
        self.cleanup(foreign);
        // Keys in other shards point here before the request is sent: a write to them from
        // now on finds the pending entry.
        for k in &keys {
            let i = self.shard_of(k);
            if i != home {
                self.lock(i)
                    .by_key
                    .entry(k.clone())
                    .or_default()
                    .push((ckey.clone(), home as u8));
            }
        }
        Lookup::Miss(FillGuard {
            cache: self.clone(),
            ckey,
            home,
            token,
            how,
            done: false,
        })
    }

    /// Removes `by_key` pointers (key, cache key) that live in other shards than their entry.
    fn cleanup(&self, foreign: Vec<(Bytes, Bytes)>) {
        for (key, ckey) in foreign {
            let mut s = self.lock(self.shard_of(&key));
            if let Some(v) = s.by_key.get_mut(&key) {
                v.retain(|(c, _)| *c != ckey);
                if v.is_empty() {
                    s.by_key.remove(&key);
                }
            }
        }
    }

    /// Drops every reply that read `key` (in any database). Writes call it only for the keys
    /// the cache keeps (see [`Cache::keeps`]): for any other key it would find nothing, after a
    /// hash and a lock shared with the other workers.
    pub fn invalidate(&self, key: &[u8]) {
        let i = self.shard_of(key);
        let refs = {
            let mut s = self.lock(i);
            match s.by_key.remove(key) {
                Some(r) => r,
                None => return,
            }
        };
        let mut foreign = Vec::new();
        for (ckey, home) in refs {
            let home = home as usize;
            let mut s = self.lock(home);
            if s.entries.contains_key(&ckey) {
                STATS.invalidations.inc();
                foreign.extend(
                    remove_entry(&mut s, &ckey, home)
                        .into_iter()
                        .filter(|(k, _)| k.as_ref() != key),
                );
            }
        }
        self.cleanup(foreign);
    }

    /// Drops everything (pending requests still answer their waiters, but are not kept).
    pub fn flush(&self) {
        for i in 0..self.shards.len() {
            let mut s = self.lock(i);
            let entries = std::mem::take(&mut s.entries);
            STATS.bytes.sub(s.bytes as i64);
            STATS.entries.sub(entries.len() as i64);
            for (_, e) in entries {
                if let State::Pending { token, waiters } = e.state {
                    if !waiters.is_empty() {
                        s.orphans.insert(token, waiters);
                    }
                }
            }
            s.by_key.clear();
            s.clock.clear();
            s.bytes = 0;
        }
        STATS.flushes.inc();
    }

    /// Turns serving on or off; every change flushes, so a cache that comes back starts empty.
    pub fn set_active(&self, on: bool) {
        if self.active.swap(on, Ordering::AcqRel) != on {
            self.flush();
            STATS.active.set(i64::from(on));
        }
    }

    /// A plugin asked to cache a read (served or not). The tracking connections are open only
    /// while the cache is asked for (`response_cache_idle`): true when the cache is not serving
    /// and this is the first ask since the manager last looked, so that the caller wakes it
    /// rather than leaving it to its next round. One load of a flag shared by the workers, and
    /// a store at most once per round.
    pub fn asked(&self) -> bool {
        if self.asked.load(Ordering::Relaxed) {
            return false;
        }
        self.asked.store(true, Ordering::Relaxed);
        !self.is_active()
    }

    /// Whether the cache was asked for since the last call (the tracking manager's round).
    pub fn take_asked(&self) -> bool {
        self.asked.swap(false, Ordering::Relaxed)
    }

    /// The count of lost tracking connections so far.
    pub fn epoch(&self) -> u64 {
        *self.epoch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns serving on, unless a tracking connection was lost since `epoch` was read.
    pub fn activate(&self, epoch: u64) {
        let e = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        if *e == epoch {
            self.set_active(true);
        }
    }

    /// A tracking connection broke: stop serving and drop everything, now.
    pub fn tracker_lost(&self) {
        let mut e = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
        *e += 1;
        self.set_active(false);
    }

    /// Sets the prefixes replies are kept for and the memory bound.
    pub fn configure(&self, prefixes: Vec<Bytes>, max_memory: u64) {
        self.prefixes
            .store(Arc::new(crate::prefixes::Prefixes::new(&prefixes)));
        self.max_memory.store(max_memory.max(1), Ordering::Relaxed);
    }

    /// Stores a reply for a pending entry (if it is still the same pending entry) and returns
    /// its waiters.
    fn complete(
        &self,
        ckey: &Bytes,
        home: usize,
        token: u64,
        reply: &Bytes,
        how: CacheFor,
    ) -> Vec<oneshot::Sender<Reply>> {
        let error = matches!(reply.first(), Some(b'-') | Some(b'!'));
        let ttl = if is_empty_reply(reply) {
            how.empty_ttl
        } else {
            how.ttl
        };
        let keep = !error && !ttl.is_zero() && self.is_active();
        let budget = self.budget();
        let foreign;
        let waiters = {
            let mut s = self.lock(home);
            let Some(e) = s.entries.get_mut(ckey) else {
                return s.orphans.remove(&token).unwrap_or_default();
            };
            let State::Pending { token: t, .. } = &e.state else {
                return s.orphans.remove(&token).unwrap_or_default();
            };
            if *t != token {
                return s.orphans.remove(&token).unwrap_or_default();
            }
            if !keep {
                let waiters = match &mut e.state {
                    State::Pending { waiters, .. } => std::mem::take(waiters),
                    State::Ready { .. } => Vec::new(),
                };
                foreign = remove_entry(&mut s, ckey, home);
                waiters
            } else {
                let added = reply.len();
                let state = State::Ready {
                    reply: reply.clone(),
                    expires: Instant::now() + ttl,
                    referenced: false,
                };
                let old = std::mem::replace(&mut e.state, state);
                e.size += added;
                let id = e.id;
                s.bytes += added;
                STATS.bytes.add(added as i64);
                s.clock.push_back((ckey.clone(), id));
                foreign = evict(&mut s, home, budget);
                match old {
                    State::Pending { waiters, .. } => waiters,
                    State::Ready { .. } => Vec::new(),
                }
            }
        };
        self.cleanup(foreign);
        waiters
    }

    /// Gives up a pending entry whose request will not be answered to it.
    fn abandon(&self, ckey: &Bytes, home: usize, token: u64) {
        let foreign = {
            let mut s = self.lock(home);
            s.orphans.remove(&token);
            match s.entries.get(ckey) {
                Some(Entry {
                    state: State::Pending { token: t, .. },
                    ..
                }) if *t == token => remove_entry(&mut s, ckey, home),
                _ => Vec::new(),
            }
        };
        self.cleanup(foreign);
    }
}

/// Removes an entry from its shard, with its pointers in that shard; returns the pointers in
/// other shards to remove (key, cache key). Waiters of a pending entry become orphans.
fn remove_entry(s: &mut Shard, ckey: &Bytes, home: usize) -> Vec<(Bytes, Bytes)> {
    let Some(e) = s.entries.remove(ckey) else {
        return Vec::new();
    };
    s.bytes = s.bytes.saturating_sub(e.size);
    STATS.bytes.sub(e.size as i64);
    STATS.entries.dec();
    if let State::Pending { token, waiters } = e.state {
        if !waiters.is_empty() {
            s.orphans.insert(token, waiters);
        }
    }
    let mut foreign = Vec::new();
    for k in e.keys {
        match s.by_key.get_mut(&k) {
            Some(v) if v.iter().any(|(c, h)| c == ckey && *h as usize == home) => {
                v.retain(|(c, _)| c != ckey);
                if v.is_empty() {
                    s.by_key.remove(&k);
                }
            }
            // Not here: the key's pointer lives in another shard.
            _ => foreign.push((k, ckey.clone())),
        }
    }
    foreign
}

/// Drops ready entries (CLOCK order, second chance) until the shard is within `budget`.
fn evict(s: &mut Shard, home: usize, budget: usize) -> Vec<(Bytes, Bytes)> {
    let mut foreign = Vec::new();
    let mut rounds = s.clock.len() * 2 + 1;
    while s.bytes > budget && rounds > 0 {
        rounds -= 1;
        let Some((ckey, id)) = s.clock.pop_front() else {
            break;
        };
        match s.entries.get_mut(&ckey) {
            Some(Entry {
                id: eid,
                state: State::Ready { referenced, .. },
                ..
            }) if *eid == id => {
                if *referenced {
                    *referenced = false;
                    s.clock.push_back((ckey, id));
                } else {
                    foreign.extend(remove_entry(s, &ckey, home));
                    STATS.evictions.inc();
                }
            }
            // Gone or replaced since: a stale position.
            _ => {}
        }
    }
    foreign
}

/// The right to fill a pending entry: the client that missed sends the request, and hands
/// the reply here. Dropped without a reply, it releases the waiters to ask Redis themselves.
pub struct FillGuard {
    cache: Arc<Cache>,
    ckey: Bytes,
    home: usize,
    token: u64,
    how: CacheFor,
    done: bool,
}

impl FillGuard {
    /// Keeps the reply (unless it is an error or a write made it stale) and passes it to
    /// the clients waiting for it.
    pub fn complete(mut self, reply: &[u8]) {
        self.done = true;
        let reply = Bytes::copy_from_slice(reply);
        for w in self
            .cache
            .complete(&self.ckey, self.home, self.token, &reply, self.how)
        {
            let _ = w.send(Ok(reply.clone()));
        }
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        if !self.done {
            self.cache.abandon(&self.ckey, self.home, self.token);
        }
    }
}

/// What the loaded plugins ask of the cache: prefixes (normalised for `BCAST`: none
/// overlapping; empty: every key) and the memory bound. `None`: no plugin uses the cache.
pub fn wanted(set: &crate::plugin::PluginSet) -> Option<(Vec<Bytes>, u64)> {
    let mut all = false;
    let mut prefixes: Vec<Vec<u8>> = Vec::new();
    let mut max_memory = None;
    for p in &set.plugins {
        let Some(c) = &p.manifest.cache else { continue };
        max_memory = Some(max_memory.unwrap_or(0).max(c.max_memory));
        if c.prefixes.is_empty() || c.prefixes.iter().any(|p| p.is_empty()) {
            all = true;
        }
        prefixes.extend(c.prefixes.iter().map(|p| p.as_bytes().to_vec()));
    }
    let max_memory = max_memory?;
    if all {
        return Some((Vec::new(), max_memory));
    }
    // Redis refuses overlapping BCAST prefixes: keep only the shortest of each family.
    prefixes.sort();
    prefixes.dedup();
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for p in prefixes {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    Some((kept.into_iter().map(Bytes::from).collect(), max_memory))
}
