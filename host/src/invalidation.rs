//! The tracking connections: Redis's own reports of changed keys, for the response cache
//! and for respire's clients' `CLIENT TRACKING`.
//!
//! A thread keeps one connection per master (and per replica when reads may go to replicas)
//! with `CLIENT TRACKING on BCAST [PREFIX …]`
//! over RESP3: over the plugins' prefixes while only the cache needs them, over every key
//! while a client tracks. The cache needs them while plugins ask it to keep reads: from the
//! first such read until `response_cache_idle` passes without one (tracking makes Redis match
//! every write against the prefixes, cached key or not). Their invalidation pushes drop cached replies
//! ([`crate::cache::Cache::invalidate`]) and reach tracking clients
//! ([`crate::tracking::Tracking::changed`]).
//!
//! **Invalidations before acknowledgements.** Redis writes a write's invalidation push to
//! the tracking connection before it writes the write's reply (both in one `beforeSleep`,
//! broadcasts first). So when a session gets the reply of a write while clients track, it
//! first reads what the tracking connections hold ([`sync`]), on its own thread: the
//! tracking clients have their messages queued before the writer has its answer, as with
//! one Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::io::{IoEvent, Stream, poll_read_into, write_now};
use crate::server::Shared;

/// What the tracking connections are for: the response cache (its prefixes and memory
/// bound) and clients' `CLIENT TRACKING` (every key).
#[derive(Clone, PartialEq)]
struct Want {
    cache: Option<(Vec<Bytes>, u64)>,
    clients: bool,
}

impl Want {
    /// The `BCAST` prefixes the connections ask for (none: every key).
    fn prefixes(&self) -> Vec<Bytes> {
        match (&self.cache, self.clients) {
            (Some((p, _)), false) => p.clone(),
            _ => Vec::new(),
        }
    }
}

/// Fence rounds over all the tracking connections, numbered from 1: a round sends a `PING` on
/// each, and completes when every `PONG` is back — after every invalidation Redis made before
/// the round started. The tracking thread runs them for NOLOOP writes
/// ([`crate::tracking::Tracking::fence`]) and for sessions that wait for one
/// ([`Fences::after_now`]).
#[derive(Default)]
pub struct Fences {
    /// The last round a session waits for, the last one started, the last one completed.
    wanted: AtomicU64,
    started: AtomicU64,
    done: AtomicU64,
}

impl Fences {
    /// A round that starts from now on: once it completes ([`Fences::passed`]), every
    /// invalidation Redis made for a command it ran before now has been applied. The tracking
    /// thread is to be woken.
    pub fn after_now(&self) -> u64 {
        let need = self.started.load(Ordering::Acquire) + 1;
        self.wanted.fetch_max(need, Ordering::AcqRel);
        need
    }

    /// Whether round `round` completed.
    pub fn passed(&self, round: u64) -> bool {
        self.done.load(Ordering::Acquire) >= round
    }

    /// Whether a session waits for a round not started yet.
    fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire) > self.started.load(Ordering::Acquire)
    }

    /// Round `round` starts (its `PING`s go after this).
    fn start(&self, round: u64) {
        self.started.store(round, Ordering::Release);
    }

    /// Round `round` completed, or (`false`) was given up (a connection went meanwhile): the
    /// rounds wanted since start again.
    fn end(&self, round: u64, completed: bool) {
        if completed {
            self.done.fetch_max(round, Ordering::AcqRel);
        } else {
            self.started
                .store(self.done.load(Ordering::Acquire), Ordering::Release);
        }
    }
}

/// Fence rounds on one tracking connection: a `PING` whose `PONG` comes after every
/// invalidation Redis made before it (see [`Fences`]).
#[derive(Default)]
struct Ping {
    notify: tokio::sync::Notify,
    round: AtomicU64,
    answered: AtomicU64,
}

/// One tracking connection's read side, shared by its task and the sessions that drain it.
pub struct Link {
    conn: Mutex<Option<Conn>>,
    /// A session read the socket (its poll replaced the task's waker): the task polls again.
    rearm: tokio::sync::Notify,
    want: Want,
    ping: Arc<Ping>,
    /// Over TLS a session's read goes through tokio (and replaces the task's waker).
    tls: bool,
}

struct Conn {
    stream: Stream,
    buf: BytesMut,
    /// Fence rounds whose `PONG` is owed, in order.
    pings: VecDeque<u64>,
}

impl Link {
    /// Reads what the socket holds and applies it. `Ready(Ok)` when something was read,
    /// `Pending` when nothing was there. With `cx` (the connection's task) the task is woken
    /// when something comes; without (a session, on another thread) a TCP socket is read
    /// directly: tokio's readiness is only learnt on the task's thread.
    fn drain(&self, shared: &Shared, cx: Option<&mut Context<'_>>) -> Poll<Result<(), String>> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = guard.as_mut() else {
            return Poll::Ready(Err("closed".into()));
        };
        let mut read = false;
        let mut closed = None;
        match (cx, &mut conn.stream) {
            (None, Stream::Tcp(tcp)) => {
                use std::io::Read as _;
                let sock = socket2::SockRef::from(&*tcp);
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match (&*sock).read(&mut chunk) {
                        Ok(0) => {
                            closed = Some("connection closed by the server".to_string());
                            break;
                        }
                        Ok(n) => {
                            conn.buf.extend_from_slice(&chunk[..n]);
                            read = true;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            closed = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            (cx, stream) => {
                let mut noop = Context::from_waker(std::task::Waker::noop());
                let cx = cx.unwrap_or(&mut noop);
                loop {
                    match poll_read_into(stream, cx, &mut conn.buf) {
                        Poll::Ready(IoEvent::Read) => read = true,
                        Poll::Ready(IoEvent::Closed(e)) => {
                            closed = Some(e.map_or_else(
                                || "connection closed by the server".to_string(),
                                |e| e.to_string(),
                            ));
                            break;
                        }
                        _ => break,
                    }
                }
            }
        }
        loop {
            match crate::protocol::next_reply(&mut conn.buf) {
                Ok(Some(frame)) => {
                    if frame.first() == Some(&b'>') {
                        apply_push(shared, &self.want, &frame);
                    } else if let Some(r) = conn.pings.pop_front() {
                        self.ping.answered.store(r, Ordering::Relaxed);
                        // The manager sees the round complete now, not at its next tick.
                        shared.tracking.wake.notify_one();
                    }
                }
                Ok(None) => break,
                Err(e) => return Poll::Ready(Err(e.to_string())),
            }
        }
        match closed {
            Some(e) => Poll::Ready(Err(e)),
            None if read => Poll::Ready(Ok(())),
            None => Poll::Pending,
        }
    }

    /// Sends a fence `PING` for `round`.
    fn ping(&self, round: u64) -> Result<(), String> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = guard.as_mut() else {
            return Err("closed".into());
        };
        conn.pings.push_back(round);
        let mut out = BytesMut::from(&b"*1\r\n$4\r\nPING\r\n"[..]);
        write_now(&mut conn.stream, &mut out).map_err(|e| e.to_string())
    }
}

/// Reads, on the calling thread, what every tracking connection that serves clients holds:
/// a session calls it before handing a write's reply to its client (see the module's doc).
pub fn sync(shared: &Shared) {
    let links = shared.tracking.links();
    for link in links.iter().filter(|l| l.want.clients) {
        let _ = link.drain(shared, None);
        if link.tls {
            link.rearm.notify_one();
        }
    }
}

/// Keeps the tracking connections (runs on its own thread while respire runs). They are
/// open while a plugin uses the cache (over its prefixes) or a client tracks keys (over
/// every key). The cache serves only while every master has one; a lost connection flushes
/// the cache, and tells tracking clients to drop everything, at once; a change of what is
/// wanted starts over with new connections and an empty cache.
pub fn track(shared: Arc<Shared>) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        tracing::error!("cannot start the tracking connections");
        return;
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut shutdown = shared.shutdown.clone();
        type Handle = (Arc<AtomicBool>, Arc<Ping>, tokio::task::JoinHandle<()>);
        let mut trackers: HashMap<Arc<str>, Handle> = HashMap::new();
        let mut current: Option<Want> = None;
        let cache = shared.cache.clone();
        let fences = &shared.tracking.fences;
        let replica_reads = shared.config.backend.read_from != crate::config::ReadFrom::Master;
        let idle = shared.config.response_cache_idle;
        // When a plugin last asked the cache to keep a read.
        let mut last_asked: Option<Instant> = None;
        // The cache went off for being idle (its coming back is not news).
        let mut idled = false;
        // A fence round under way: when it started, its number.
        let mut fence: Option<(Instant, u64)> = None;
        let mut round = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = shared.tracking.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let clients = shared.tracking.wanted();
            let now = Instant::now();
            if cache.take_asked() {
                last_asked = Some(now);
            }
            // The cache is in use while plugins ask it to keep reads; while clients track, the
            // connections cover every key anyway, and it rides on them.
            let in_use = idle.is_zero()
                || clients
                || last_asked.is_some_and(|t| now.saturating_duration_since(t) < idle);
            let cache_want = crate::cache::wanted(&shared.plugins.load()).filter(|_| in_use);
            let want = (cache_want.is_some() || clients).then_some(Want {
                cache: cache_want,
                clients,
            });
            if want != current {
                cache.set_active(false);
                for (_, (_, _, h)) in trackers.drain() {
                    h.abort();
                }
                shared.tracking.set_links(Vec::new());
                shared.tracking.set_up(false, &shared.clients);
                if let Some((_, r)) = fence.take() {
                    fences.end(r, false);
                }
                let old_cache = current.as_ref().and_then(|w| w.cache.clone());
                let new_cache = want.as_ref().and_then(|w| w.cache.clone());
                if new_cache != old_cache {
                    if let Some((prefixes, max_memory)) = &new_cache {
                        cache.configure(prefixes.clone(), *max_memory);
                        if idled {
                            tracing::debug!("response cache asked for again; opening tracking connections");
                        } else {
                            tracing::info!(
                                prefixes = prefixes.len(),
                                max_memory,
                                "response cache on; opening tracking connections"
                            );
                        }
                    } else if old_cache.is_some() && !in_use {
                        // Said once; it may come and go with the traffic.
                        if std::mem::replace(&mut idled, true) {
                            tracing::debug!("response cache idle; tracking connections closed");
                        } else {
                            tracing::info!(
                                idle = ?idle,
                                "response cache off until a plugin asks for it again (not asked for within response_cache_idle); tracking connections closed"
                            );
                        }
                    } else if old_cache.is_some() {
                        idled = false;
                        tracing::info!("response cache off (no plugin uses it)");
                    }
                }
                let old_clients = current.as_ref().is_some_and(|w| w.clients);
                if clients != old_clients {
                    tracing::info!(
                        on = clients,
                        "tracking of every key for clients' CLIENT TRACKING"
                    );
                }
                current = want;
            }
            let Some(want) = &current else {
                continue;
            };
            let epoch = cache.epoch();
            let topo = shared.topology.load();
            // Masters only, while reads go to masters: a replica reports the keys its
            // master's writes change too, so a connection to it would tell every change
            // twice. A promoted replica gets one when the topology shows it as a master; a
            // demoted master's goes. When reads may go to replicas, the replicas are tracked
            // too: a read there can come after the master's invalidation and before the
            // replica applied the write, and only the replica's own report follows it.
            let tracked: Vec<Arc<str>> = if replica_reads {
                topo.nodes.clone()
            } else {
                topo.masters()
                    .filter_map(|m| topo.nodes.get(m).cloned())
                    .collect()
            };
            trackers.retain(|addr, (_, _, h)| {
                let keep = tracked.contains(addr);
                if !keep {
                    h.abort();
                }
                keep
            });
            for addr in &tracked {
                if trackers.get(addr).is_some_and(|(_, _, h)| !h.is_finished()) {
                    continue;
                }
                let up = Arc::new(AtomicBool::new(false));
                let ping = Arc::new(Ping::default());
                let node = crate::backend::NodeSettings {
                    addr: addr.clone(),
                    ..shared.node_settings.clone()
                };
                let h = tokio::task::spawn_local(tracker(
                    node,
                    want.clone(),
                    up.clone(),
                    ping.clone(),
                    shared.clone(),
                ));
                trackers.insert(addr.clone(), (up, ping, h));
            }
            let all_up = topo.complete()
                && trackers
                    .values()
                    .all(|(up, _, _)| up.load(Ordering::Acquire));
            if all_up && want.cache.is_some() {
                cache.activate(epoch);
            } else {
                cache.set_active(false);
            }
            if want.clients {
                shared.tracking.set_up(all_up, &shared.clients);
                if !all_up {
                    shared
                        .tracking
                        .expire_waiters("the tracking connections to Redis are not up");
                }
            }
            // A fence round shows that every invalidation Redis made before it has arrived:
            // NOLOOP writes wait for their invalidations only until one completes, and a
            // session that sent commands while the cache was off uses it only after one.
            match fence {
                Some((_, r)) if !all_up => {
                    fences.end(r, false);
                    fence = None;
                }
                _ if !all_up => {}
                None if (want.clients && shared.tracking.has_own_writes())
                    || (want.cache.is_some() && fences.wanted()) =>
                {
                    round += 1;
                    fences.start(round);
                    for (_, ping, _) in trackers.values() {
                        ping.round.store(round, Ordering::Relaxed);
                        ping.notify.notify_one();
                    }
                    fence = Some((Instant::now(), round));
                }
                Some((start, r)) => {
                    if trackers
                        .values()
                        .all(|(_, p, _)| p.answered.load(Ordering::Relaxed) >= r)
                    {
                        if want.clients {
                            shared.tracking.fence(start);
                        }
                        fences.end(r, true);
                        fence = None;
                    } else if start.elapsed() > Duration::from_secs(2) {
                        // A connection was replaced meanwhile: start a new round.
                        fences.end(r, false);
                        fence = None;
                    }
                }
                None => {}
            }
        }
        shared.tracking.set_links(Vec::new());
        cache.set_active(false);
    });
}

/// One node's tracking connection: subscribes to invalidations, applies them until it breaks,
/// and connects again, backing off while the node cannot be reached (a node that is down stays
/// in the map until the cluster forgets it). Runs until aborted.
async fn tracker(
    node: crate::backend::NodeSettings,
    want: Want,
    up: Arc<AtomicBool>,
    ping: Arc<Ping>,
    shared: Arc<Shared>,
) {
    let addr = node.addr.clone();
    // Out of the sessions' list when the connection ends, however it ends (it may be aborted).
    struct Registered<'a>(&'a Shared, Arc<Link>);
    impl Drop for Registered<'_> {
        fn drop(&mut self) {
            self.0.tracking.remove_link(&self.1);
        }
    }
    let mut backoff = node.reconnect_min;
    // Attempts in a row that did not get the connection up.
    let mut failures = 0u32;
    // Whether the current outage has been logged.
    let mut told = false;
    loop {
        let mut registered: Option<Registered<'_>> = None;
        let result: Result<(), String> = async {
            let mut stream =
                crate::backend::connect_internal(&node, crate::backend::ConnKey::new(0, 3)).await?;
            let prefixes = want.prefixes();
            let mut args: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"on", b"BCAST"];
            for p in &prefixes {
                args.push(b"PREFIX");
                args.push(p);
            }
            let mut out = BytesMut::new();
            crate::protocol::encode_args(&mut out, &args);
            stream.send(&out).await.map_err(|e| e.to_string())?;
            let mut buf = BytesMut::with_capacity(4096);
            let ok = crate::backend::read_frame(&mut stream, &mut buf).await?;
            if !ok.starts_with(b"+OK") {
                return Err(String::from_utf8_lossy(&ok).trim_end().to_string());
            }
            let tls = !matches!(stream, Stream::Tcp(_));
            let link = Arc::new(Link {
                tls,
                conn: Mutex::new(Some(Conn {
                    stream,
                    buf,
                    pings: VecDeque::new(),
                })),
                rearm: tokio::sync::Notify::new(),
                want: want.clone(),
                ping: ping.clone(),
            });
            shared.tracking.add_link(link.clone());
            registered = Some(Registered(&shared, link.clone()));
            up.store(true, Ordering::Release);
            if failures > 0 {
                tracing::info!(node = %addr, failures, "tracking connection up again");
            } else {
                tracing::debug!(node = %addr, "tracking connection up");
            }
            loop {
                tokio::select! {
                    r = std::future::poll_fn(|cx| link.drain(&shared, Some(cx))) => r?,
                    // A session drained the socket: poll again (and so register this task's waker).
                    _ = link.rearm.notified() => {}
                    _ = ping.notify.notified() => link.ping(ping.round.load(Ordering::Relaxed))?,
                }
            }
        }
        .await;
        drop(registered);
        // Invalidations may have been lost: nothing cached may be served any more, and tracking
        // clients drop what they hold.
        let was_up = up.swap(false, Ordering::AcqRel);
        if want.cache.is_some() {
            shared.cache.tracker_lost();
        }
        if want.clients {
            shared.tracking.set_up(false, &shared.clients);
        }
        if was_up {
            failures = 0;
            told = false;
            backoff = node.reconnect_min;
        } else {
            failures = failures.saturating_add(1);
        }
        if let Err(e) = result {
            // Said once when the connection is lost or cannot be made; the attempts that follow
            // while the node stays unreachable are debug lines.
            if std::mem::replace(&mut told, true) {
                tracing::debug!(node = %addr, error = %e, failures, "tracking connection: reconnect failed");
            } else if want.cache.is_some() {
                tracing::warn!(node = %addr, error = %e, "cache tracking connection lost; cache flushed");
            } else {
                tracing::warn!(node = %addr, error = %e, "tracking connection lost; tracking clients told to drop what they cached");
            }
        }
        // Back off with jitter while the node cannot be reached.
        let delay = if failures == 0 {
            node.reconnect_min
        } else {
            let d = backoff.mul_f64(0.5 + fastrand::f64());
            backoff = (backoff * 2).min(node.reconnect_max);
            d
        };
        tokio::time::sleep(delay).await;
    }
}

/// Applies a `>2 invalidate [keys]` push (`_` instead of keys: everything was flushed).
fn apply_push(shared: &Shared, want: &Want, frame: &Bytes) {
    use crate::protocol::Value;
    let Ok(Value::Array(items)) = Value::parse(frame) else {
        return;
    };
    let [Value::Bulk(kind), keys] = items.as_slice() else {
        return;
    };
    if !kind.eq_ignore_ascii_case(b"invalidate") {
        return;
    }
    match keys {
        Value::Array(keys) => {
            let keys: Vec<Bytes> = keys
                .iter()
                .filter_map(|k| match k {
                    Value::Bulk(k) => Some(Bytes::copy_from_slice(k)),
                    _ => None,
                })
                .collect();
            if want.cache.is_some() {
                for k in &keys {
                    shared.cache.invalidate(k);
                }
            }
            if want.clients {
                shared.tracking.changed(&shared.clients, &keys);
            }
        }
        _ => {
            if want.cache.is_some() {
                shared.cache.flush();
            }
            if want.clients {
                shared.tracking.flushed(&shared.clients);
            }
        }
    }
}
