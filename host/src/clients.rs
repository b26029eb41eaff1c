//! The process-wide list of client connections, for `CLIENT LIST`, `CLIENT KILL`
//! and connection limits. Touched when a client connects, disconnects or asks
//! about clients; the per-command path only stores into atomics of its own entry.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

/// What respire knows about one client connection.
#[derive(Debug)]
pub struct ClientInfo {
    /// Unique id (as `CLIENT ID`).
    pub id: u64,
    /// The client's address.
    pub addr: SocketAddr,
    /// respire's address for this connection.
    pub laddr: SocketAddr,
    /// The socket's file descriptor.
    pub fd: i32,
    /// When the connection was accepted.
    pub created: Instant,
    /// Milliseconds after `created` of the last command.
    pub last_active_ms: AtomicU64,
    /// Name set with `CLIENT SETNAME` / `HELLO … SETNAME`.
    pub name: Mutex<Bytes>,
    /// `CLIENT SETINFO LIB-NAME`.
    pub lib_name: Mutex<Bytes>,
    /// `CLIENT SETINFO LIB-VER`.
    pub lib_ver: Mutex<Bytes>,
    /// Authenticated user.
    pub user: Mutex<String>,
    /// The last command, as a [`crate::commands::CommandInfo::display_id`] (named only when listed).
    pub last_cmd: AtomicU32,
    /// Selected database.
    pub db: AtomicU32,
    /// RESP version.
    pub resp: AtomicU8,
    /// Flags as `CLIENT LIST` prints them: see [`flag`].
    pub flags: AtomicU8,
    /// Requests from other threads: see [`signal`].
    signals: AtomicU8,
    /// Wakes the session when signalled (registered once by the session, not per wake-up).
    waker: Mutex<Option<Waker>>,
    /// While blocked: the node and the server's client id of the connection the blocking
    /// command waits on (the id is 0 until that connection is up), for `CLIENT UNBLOCK`.
    pub blocked_on: Mutex<Option<(Arc<str>, Arc<AtomicI64>)>>,
    /// Channels, patterns and shard channels subscribed to (`sub`, `psub`, `ssub`).
    pub subscriptions: [AtomicU32; 3],
    /// Where tracking invalidations go (`redir=`: -1 when not tracking, 0 for itself).
    pub redir: AtomicI64,
    /// Tracking messages for the session (see [`signal::NOTES`]).
    inbox: Mutex<Vec<crate::tracking::Note>>,
}

/// Bits of the requests a session gets from other threads.
pub mod signal {
    /// `CLIENT KILL`: close now.
    pub const KILL: u8 = 1;
    /// Graceful shutdown: stop reading, deliver what is owed, close.
    pub const SHUTDOWN: u8 = 2;
    /// Tracking messages wait in the inbox (cleared by the session when it takes them).
    pub const NOTES: u8 = 4;
}

/// The session's side of [`ClientInfo`]'s signals: polled with every wait, cheaply (an
/// atomic load; the session's waker is handed over only when it changes).
#[derive(Default)]
pub struct SignalWatch {
    registered: Option<Waker>,
}

impl SignalWatch {
    /// The signals raised so far (`Pending` when none), leaving the waker registered.
    pub fn poll(&mut self, info: &ClientInfo, cx: &mut Context<'_>) -> Poll<u8> {
        let bits = info.signals.load(Ordering::Acquire);
        if bits != 0 {
            return Poll::Ready(bits);
        }
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            if let Ok(mut slot) = info.waker.lock() {
                *slot = Some(cx.waker().clone());
            }
            self.registered = Some(cx.waker().clone());
            // A signal raised before the waker was in place.
            let bits = info.signals.load(Ordering::Acquire);
            if bits != 0 {
                return Poll::Ready(bits);
            }
        }
        Poll::Pending
    }
}

/// Bits of [`ClientInfo::flags`].
pub mod flag {
    /// In a transaction (`x`).
    pub const MULTI: u8 = 1;
    /// Subscribed or monitoring (`P`).
    pub const PUBSUB: u8 = 2;
    /// Waiting on a blocking command (`b`).
    pub const BLOCKED: u8 = 4;
    /// `CLIENT TRACKING on` (`t`).
    pub const TRACKING: u8 = 8;
    /// Its tracking redirection is gone (`R`).
    pub const TRACKING_BROKEN: u8 = 16;
    /// Tracking in `BCAST` mode (`B`).
    pub const TRACKING_BCAST: u8 = 32;
    /// A replication link (`SYNC` / `PSYNC`, `S`): of type `replica`.
    pub const REPLICA: u8 = 64;

    /// Whether a client with these flags is of `CLIENT LIST` / `CLIENT KILL` type `kind`
    /// (lowercase: `normal`, `master`, `replica`, `slave`, `pubsub`).
    pub fn is_type(flags: u8, kind: &[u8]) -> bool {
        let (pubsub, replica) = (flags & PUBSUB != 0, flags & REPLICA != 0);
        match kind {
            b"normal" => !pubsub && !replica,
            b"pubsub" => pubsub && !replica,
            b"replica" | b"slave" => replica,
            _ => false,
        }
    }
}

impl ClientInfo {
    /// Sets or clears a flag bit.
    pub fn set_flag(&self, bit: u8, on: bool) {
        if on {
            self.flags.fetch_or(bit, Ordering::Relaxed);
        } else {
            self.flags.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Asks the session to close.
    pub fn kill(&self) {
        self.signal(signal::KILL);
    }

    /// Raises a [`signal`] bit and wakes the session.
    pub fn signal(&self, bit: u8) {
        self.signals.fetch_or(bit, Ordering::AcqRel);
        if let Ok(w) = self.waker.lock() {
            if let Some(w) = w.as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// Queues a tracking message for the session and wakes it.
    pub fn notify(&self, note: crate::tracking::Note) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.push(note);
        }
        self.signal(signal::NOTES);
    }

    /// Takes the queued tracking messages (and clears the signal first, so none is missed).
    pub fn take_notes(&self) -> Vec<crate::tracking::Note> {
        self.signals.fetch_and(!signal::NOTES, Ordering::AcqRel);
        self.inbox
            .lock()
            .map(|mut inbox| std::mem::take(&mut *inbox))
            .unwrap_or_default()
    }

    /// Whether `CLIENT KILL` asked this client to close.
    pub fn killed(&self) -> bool {
        self.signals.load(Ordering::Acquire) & signal::KILL != 0
    }

    /// The `CLIENT LIST` / `CLIENT INFO` line for this client (without newline); `qbuf`: the
    /// bytes of its requests read and not yet answered (known for the calling client).
    pub fn line(&self, table: &crate::commands::CommandTable, qbuf: usize) -> String {
        let now = Instant::now();
        let age = now.duration_since(self.created).as_secs();
        let idle_ms = (now.duration_since(self.created).as_millis() as u64)
            .saturating_sub(self.last_active_ms.load(Ordering::Relaxed));
        let f = self.flags.load(Ordering::Relaxed);
        let mut flags = String::new();
        // In Redis's order.
        for (bit, c) in [
            (flag::REPLICA, 'S'),
            (flag::PUBSUB, 'P'),
            (flag::MULTI, 'x'),
            (flag::BLOCKED, 'b'),
            (flag::TRACKING, 't'),
            (flag::TRACKING_BROKEN, 'R'),
            (flag::TRACKING_BCAST, 'B'),
        ] {
            if f & bit != 0 {
                flags.push(c);
            }
        }
        if flags.is_empty() {
            flags.push('N');
        }
        let text = |m: &Mutex<Bytes>| {
            m.lock()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let user = self.user.lock().map(|u| u.clone()).unwrap_or_default();
        let cmd = table.display_name(self.last_cmd.load(Ordering::Relaxed));
        format!(
            "id={} addr={} laddr={} fd={} name={} age={} idle={} flags={} db={} sub={} psub={} ssub={} multi={} qbuf={} qbuf-free=0 argv-mem=0 multi-mem=0 rbs=0 rbp=0 obl=0 oll=0 omem=0 tot-mem=0 events=r cmd={} user={} redir={} resp={} lib-name={} lib-ver={}",
            self.id,
            self.addr,
            self.laddr,
            self.fd,
            text(&self.name),
            age,
            idle_ms / 1000,
            flags,
            self.db.load(Ordering::Relaxed),
            self.subscriptions[0].load(Ordering::Relaxed),
            self.subscriptions[1].load(Ordering::Relaxed),
            self.subscriptions[2].load(Ordering::Relaxed),
            if f & flag::MULTI != 0 { 0 } else { -1 },
            qbuf,
            cmd,
            user,
            self.redir.load(Ordering::Relaxed),
            self.resp.load(Ordering::Relaxed),
            text(&self.lib_name),
            text(&self.lib_ver),
        )
    }
}

/// The `MONITOR` clients, fed the commands respire answers itself (`PING`, `SELECT`, …):
/// Redis's own `MONITOR` stream, which they also get, carries every other command.
#[derive(Debug, Default)]
pub struct Monitors {
    count: AtomicUsize,
    sinks: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<Bytes>>>,
}

impl Monitors {
    /// Whether a `MONITOR` client may be listening (one relaxed load: the common answer is no).
    pub fn active(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// A new `MONITOR` client's feed (it ends when the receiver is dropped).
    pub fn join(&self) -> tokio::sync::mpsc::UnboundedReceiver<Bytes> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut sinks) = self.sinks.lock() {
            sinks.push(tx);
            self.count.store(sinks.len(), Ordering::Relaxed);
        }
        rx
    }

    /// Sends a `MONITOR` line to every listening client.
    pub fn feed(&self, line: Bytes) {
        if let Ok(mut sinks) = self.sinks.lock() {
            sinks.retain(|tx| tx.send(line.clone()).is_ok());
            self.count.store(sinks.len(), Ordering::Relaxed);
        }
    }
}

/// A `MONITOR` line as Redis writes it: `+<seconds>.<micros> [<db> <addr>] "arg" …`, each
/// argument quoted and escaped as Redis's `sdscatrepr` does.
pub fn monitor_line<'a>(db: u32, addr: &SocketAddr, args: impl Iterator<Item = &'a [u8]>) -> Bytes {
    use std::fmt::Write as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut line = String::with_capacity(64);
    let _ = write!(
        line,
        "+{}.{:06} [{db} {addr}]",
        now.as_secs(),
        now.subsec_micros()
    );
    for a in args {
        line.push_str(" \"");
        for &c in a {
            match c {
                b'\\' => line.push_str("\\\\"),
                b'"' => line.push_str("\\\""),
                b'\n' => line.push_str("\\n"),
                b'\r' => line.push_str("\\r"),
                b'\t' => line.push_str("\\t"),
                7 => line.push_str("\\a"),
                8 => line.push_str("\\b"),
                c if c.is_ascii_graphic() || c == b' ' => line.push(char::from(c)),
                c => {
                    let _ = write!(line, "\\x{c:02x}");
                }
            }
        }
        line.push('"');
    }
    line.push_str("\r\n");
    Bytes::from(line)
}

/// A per-client limit whose breach closes the connection.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// `client_query_buffer_limit`.
    QueryBuffer,
    /// `client_output_buffer_limit`.
    OutputBuffer,
}

/// All client connections of the process.
#[derive(Debug, Default)]
pub struct Clients {
    next_id: AtomicU64,
    count: AtomicUsize,
    rejected: AtomicU64,
    query_limit_closed: AtomicU64,
    output_limit_closed: AtomicU64,
    tls_failed: AtomicU64,
    all: Mutex<BTreeMap<u64, Arc<ClientInfo>>>,
}

impl Clients {
    /// Reserves a connection slot; `false` when `max` are connected already.
    pub fn try_reserve(&self, max: usize) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                if n < max { Some(n + 1) } else { None }
            })
            .is_ok()
    }

    /// Gives a reserved slot back (for connections that never registered).
    pub fn release(&self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connected clients.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Clients waiting on a blocking command (`INFO`'s `blocked_clients`).
    pub fn blocked(&self) -> usize {
        self.all.lock().map_or(0, |all| {
            all.values()
                .filter(|c| c.flags.load(Ordering::Relaxed) & flag::BLOCKED != 0)
                .count()
        })
    }

    /// Counts a connection closed because it went over a buffer limit.
    pub fn note_limit_closed(&self, limit: Limit) {
        let c = match limit {
            Limit::QueryBuffer => &self.query_limit_closed,
            Limit::OutputBuffer => &self.output_limit_closed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections closed since start for going over `client_query_buffer_limit` and
    /// `client_output_buffer_limit`.
    pub fn limit_closed(&self) -> (u64, u64) {
        (
            self.query_limit_closed.load(Ordering::Relaxed),
            self.output_limit_closed.load(Ordering::Relaxed),
        )
    }

    /// Counts a TLS handshake with a client that failed or timed out.
    pub fn note_tls_failed(&self) {
        self.tls_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// TLS handshakes with clients that failed or timed out since start.
    pub fn tls_failed(&self) -> u64 {
        self.tls_failed.load(Ordering::Relaxed)
    }

    /// Counts a connection refused because `max_clients` were connected.
    pub fn note_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Connections accepted since start, and refused for `max_clients`.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.next_id.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
        )
    }

    /// Registers a connection that holds a reserved slot.
    pub fn register(&self, addr: SocketAddr, laddr: SocketAddr, fd: i32) -> Arc<ClientInfo> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let info = Arc::new(ClientInfo {
            id,
            addr,
            laddr,
            fd,
            created: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            name: Mutex::new(Bytes::new()),
            lib_name: Mutex::new(Bytes::new()),
            lib_ver: Mutex::new(Bytes::new()),
            user: Mutex::new("default".into()),
            last_cmd: AtomicU32::new(crate::commands::NO_DISPLAY_ID),
            db: AtomicU32::new(0),
            resp: AtomicU8::new(2),
            flags: AtomicU8::new(0),
            signals: AtomicU8::new(0),
            waker: Mutex::new(None),
            blocked_on: Mutex::new(None),
            subscriptions: Default::default(),
            redir: AtomicI64::new(-1),
            inbox: Mutex::new(Vec::new()),
        });
        if let Ok(mut all) = self.all.lock() {
            all.insert(id, info.clone());
        }
        info
    }

    /// Removes a connection and frees its slot.
    pub fn unregister(&self, id: u64) {
        if let Ok(mut all) = self.all.lock() {
            all.remove(&id);
        }
        self.release();
    }

    /// Asks every client to close gracefully (shutdown).
    pub fn shut_down_all(&self) {
        for c in self.snapshot() {
            c.signal(signal::SHUTDOWN);
        }
    }

    /// The client with this id, if connected.
    pub fn get(&self, id: u64) -> Option<Arc<ClientInfo>> {
        self.all.lock().ok()?.get(&id).cloned()
    }

    /// A snapshot of all clients, by id.
    pub fn snapshot(&self) -> Vec<Arc<ClientInfo>> {
        self.all
            .lock()
            .map(|all| all.values().cloned().collect())
            .unwrap_or_default()
    }
}
