//! MONITOR: the connection becomes a stream relayed from dedicated backend connections, one
//! per node that runs the clients' commands, following the topology as it changes.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::{Session, StreamEnd};
use crate::backend::{self, BackendError};
use crate::clients::flag;
use crate::commands::{self, Kind, Local};
use crate::io::{IoEvent, poll_io, write_now};
use crate::protocol::{self as resp, Command};

impl Session {
    // ---- MONITOR -----------------------------------------------------------

    /// Relays between the client and dedicated backend connections, one per node in `nodes`
    /// (every node that runs clients' commands, for `MONITOR`): their output merged as it
    /// comes; the client's commands go to the first.
    ///
    /// The stream follows the topology: about once a second a node that should be followed
    /// and has no feed gets one (a new master, a replica promoted, a node back), and a node
    /// no longer followed (a master turned replica, which would repeat what it replicates)
    /// loses its feed. A feed whose connection breaks is dropped; the client is told only
    /// when none is left.
    pub(super) async fn relay_stream(&mut self, first: Command, nodes: &[usize]) -> StreamEnd {
        // Give back a clean exclusive connection; a stream needs its own.
        self.release_exclusive(false);
        let first = first.to_resp();
        let mut feeds = Vec::with_capacity(nodes.len());
        // The first node's answer (`+OK`): the client gets one.
        let mut answer = None;
        for &index in nodes {
            let addr = self.topo.node_addr(index);
            let node = self.worker.pool(&addr).node().clone();
            match start_feed(&node, self.key(), &first).await {
                Ok((feed, ok)) => {
                    answer.get_or_insert(ok);
                    feeds.push(feed);
                }
                Err(Started::Refused(frame)) => {
                    // The node refused (say, `NOPERM`): the client gets its answer, once.
                    self.out.extend_from_slice(&frame);
                    return StreamEnd::Reset;
                }
                Err(Started::Failed(reason)) => {
                    let e = BackendError::Unavailable {
                        addr: node.addr.clone(),
                        reason,
                    };
                    self.reply_error(&e.to_string());
                    return StreamEnd::Reset;
                }
            }
        }
        match answer {
            Some(ok) => self.out.extend_from_slice(&ok),
            None => {
                self.reply_error(super::CLUSTERDOWN);
                return StreamEnd::Reset;
            }
        }
        self.info.set_flag(flag::PUBSUB, true);
        // The commands respire answers itself, which Redis never sees.
        let mut local_lines = self.worker.shared.monitors.join();
        let mut signals = crate::clients::SignalWatch::default();
        let info = self.info.clone();
        let mut to_backend = BytesMut::new();
        // Feeds being started for nodes the topology added, and the nodes they are for.
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut starting: Vec<Arc<str>> = Vec::new();
        let mut follow = tokio::time::interval(FOLLOW_EVERY);
        follow.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        follow.reset();
        let end = loop {
            // Client commands go to the backend, except the few respire must answer.
            let mut reset = false;
            while !self.closing {
                match self.parser.parse(
                    &mut self.inbuf,
                    &self.worker.shared.limits,
                    self.authenticated,
                ) {
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
                            resp::error(
                                &mut self.out,
                                "ERR respire: AUTH and CLIENT are not available in subscribe or monitor mode",
                            );
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
            while let Some(feed) = feeds.first_mut()
                && write_now(&mut feed.stream, &mut to_backend).is_err()
            {
                feeds.remove(0);
            }
            if feeds.is_empty() {
                resp::error(&mut self.out, LOST);
                self.closing = true;
            }
            if !self.try_flush() {
                break StreamEnd::Close;
            }
            // MONITOR clients are of the normal class, as in Redis.
            if !self.output_within_limit(false) {
                break StreamEnd::Close;
            }
            if self.closing {
                let _ = self.flush_all().await;
                break StreamEnd::Close;
            }
            // Every side at once, so that none starves the others.
            let (stream, out, inbuf) = (&mut self.stream, &mut self.out, &mut self.inbuf);
            let (signal, lost, to, refollow) = std::future::poll_fn(|cx| {
                let signal = match signals.poll(&info, cx) {
                    Poll::Ready(bits) => bits,
                    Poll::Pending => 0,
                };
                let mut from = false;
                let mut broken = false;
                for (i, feed) in feeds.iter_mut().enumerate() {
                    let mut idle = BytesMut::new();
                    let w = if i == 0 { &mut to_backend } else { &mut idle };
                    match poll_io(&mut feed.stream, cx, w, &mut feed.input, true) {
                        Poll::Ready(IoEvent::Read) => {
                            from = true;
                            if !feed.relay(out) {
                                feed.broken = true;
                            }
                        }
                        Poll::Ready(IoEvent::Closed(_)) => feed.broken = true,
                        Poll::Ready(_) => from = true,
                        Poll::Pending => {}
                    }
                    broken |= feed.broken;
                }
                if broken {
                    feeds.retain(|f| !f.broken);
                }
                while let Poll::Ready(Some((addr, feed))) = started_rx.poll_recv(cx) {
                    starting.retain(|a| *a != addr);
                    if let Some(feed) = feed {
                        feeds.push(feed);
                    }
                    from = true;
                }
                let lost = feeds.is_empty();
                let refollow = follow.poll_tick(cx).is_ready();
                let to = poll_io(stream, cx, out, inbuf, true);
                let mut local = false;
                while let Poll::Ready(Some(line)) = local_lines.poll_recv(cx) {
                    out.extend_from_slice(&line);
                    local = true;
                }
                if signal != 0 || lost || from || to.is_ready() || local || refollow {
                    Poll::Ready((signal, lost, to, refollow))
                } else {
                    Poll::Pending
                }
            })
            .await;
            if refollow {
                self.follow_topology(&first, &mut feeds, &mut starting, &started_tx);
            }
            if signal & crate::clients::signal::NOTES != 0 {
                // Tracking messages (a RESP3 client that tracks keys, or a redirection target).
                for note in self.info.take_notes() {
                    if let Some(frame) = note.frame(self.proto, false) {
                        self.out.extend_from_slice(&frame);
                    }
                }
            }
            if signal & !crate::clients::signal::NOTES != 0 {
                break StreamEnd::Close;
            }
            if lost {
                resp::error(&mut self.out, LOST);
                self.closing = true;
            }
            match to {
                Poll::Ready(IoEvent::Read) => self.note_activity(),
                Poll::Ready(IoEvent::Closed(_)) => break StreamEnd::Close,
                _ => {}
            }
        };
        self.info.set_flag(flag::PUBSUB, false);
        end
    }

    // ---- SYNC / PSYNC -----------------------------------------------------

    /// `SYNC`, `PSYNC` and `REPLCONF` (which a replica or `redis-cli --rdb` sends before
    /// them, with its capabilities and filters): in front of a single master the connection
    /// becomes a replication link to it (see [`Session::relay_replication`]), so that
    /// replicas, replication tools and tests that read the replication stream work through
    /// respire. With several shards there is no one master to replicate: an error.
    pub(super) fn start_replica(&mut self, cmd: Command) {
        if self.waiting > 0 {
            // Redis refuses SYNC with replies still owed: the link starts after them.
            self.stalled = Some(cmd);
            return;
        }
        let masters: Vec<usize> = self.topo.shards.iter().map(|s| s.master).collect();
        match masters.len() {
            0 => self.reply_error(super::CLUSTERDOWN),
            1 => self.stream_start = Some((cmd, masters)),
            n => self.reply_error(&format!(
                "ERR respire: replication (SYNC, PSYNC, REPLCONF) needs a single master behind the proxy; there are {n}"
            )),
        }
    }

    /// The replication link: a connection of its own to the master, the client's command and
    /// everything after it relayed byte for byte both ways (the snapshot, the command stream,
    /// the replica's `REPLCONF ACK`s) until either side closes it or the client is killed. The
    /// client is closed then: the link's state is the master's and the replica's alone.
    pub(super) async fn relay_replication(&mut self, first: Command, node: usize) -> StreamEnd {
        self.release_exclusive(false);
        let addr = self.topo.node_addr(node);
        let settings = self.worker.pool(&addr).node().clone();
        let mut link = match backend::connect(&settings, self.key()).await {
            Ok(link) => link,
            Err(reason) => {
                let e = BackendError::Unavailable {
                    addr: settings.addr.clone(),
                    reason,
                };
                self.reply_error(&e.to_string());
                return StreamEnd::Reset;
            }
        };
        tracing::info!(client = self.info.id, addr = %self.info.addr, master = %addr, "replication link through respire");
        // A replica from here on, for `CLIENT LIST` and `CLIENT KILL TYPE replica`.
        self.info.set_flag(crate::clients::flag::REPLICA, true);
        let mut to_master = BytesMut::from(&first.to_resp()[..]);
        to_master.extend_from_slice(&self.inbuf.split());
        let mut to_client = BytesMut::with_capacity(64 * 1024);
        let mut signals = crate::clients::SignalWatch::default();
        let info = self.info.clone();
        let stream = &mut self.stream;
        loop {
            let (signal, closed) = std::future::poll_fn(|cx| {
                let signal = match signals.poll(&info, cx) {
                    Poll::Ready(bits) => bits,
                    Poll::Pending => 0,
                };
                // Each side is read only while the other has taken most of what it was given.
                let reading = to_client.len() < LINK_BUFFER;
                let from_master = poll_io(&mut link, cx, &mut to_master, &mut to_client, reading);
                let reading = to_master.len() < LINK_BUFFER;
                let from_client = poll_io(stream, cx, &mut to_client, &mut to_master, reading);
                let closed = matches!(from_master, Poll::Ready(IoEvent::Closed(_)))
                    || matches!(from_client, Poll::Ready(IoEvent::Closed(_)));
                if signal != 0 || closed || from_master.is_ready() || from_client.is_ready() {
                    Poll::Ready((signal, closed))
                } else {
                    Poll::Pending
                }
            })
            .await;
            if signal & crate::clients::signal::NOTES != 0 {
                // Tracking messages have no place in a replication stream.
                drop(info.take_notes());
            }
            if closed || signal & !crate::clients::signal::NOTES != 0 {
                // What the master sent last still goes to the client, if it takes it now.
                let _ = write_now(stream, &mut to_client);
                break StreamEnd::Close;
            }
        }
    }

    /// Starts feeds for the nodes to follow that have none (in the background: a node down
    /// must not hold the stream), and drops those of nodes no longer followed.
    fn follow_topology(
        &mut self,
        first: &Bytes,
        feeds: &mut Vec<Feed>,
        starting: &mut Vec<Arc<str>>,
        started: &tokio::sync::mpsc::UnboundedSender<(Arc<str>, Option<Feed>)>,
    ) {
        let topo = self.worker.shared.topology.load();
        let wanted: Vec<Arc<str>> = self
            .monitored_nodes(&topo)
            .into_iter()
            .map(|i| topo.node_addr(i))
            .collect();
        if wanted.is_empty() {
            // No node known now (the cluster is down): keep what there is.
            return;
        }
        if feeds.iter().any(|f| wanted.contains(&f.addr)) {
            feeds.retain(|f| wanted.contains(&f.addr));
        }
        for addr in wanted {
            if feeds.iter().any(|f| f.addr == addr) || starting.contains(&addr) {
                continue;
            }
            starting.push(addr.clone());
            let node = self.worker.pool(&addr).node().clone();
            let (key, first, started) = (self.key(), first.clone(), started.clone());
            tokio::task::spawn_local(async move {
                let feed = start_feed(&node, key, &first).await.ok().map(|(f, _)| f);
                let _ = started.send((addr, feed));
            });
        }
    }

    /// Shows a command respire answers itself to `MONITOR` clients, as Redis would: not the
    /// administrative ones, and `AUTH` and `HELLO` with their credentials redacted.
    pub(super) fn monitor_local(&self, which: Local, cmd: &Command, res: commands::Resolved<'_>) {
        let admin_client = || {
            let sub = cmd.arg(1).unwrap_or_default();
            [
                &b"kill"[..],
                b"list",
                b"pause",
                b"unpause",
                b"no-evict",
                b"unblock",
            ]
            .iter()
            .any(|s| sub.eq_ignore_ascii_case(s))
        };
        let shown = match which {
            // Shown with their credentials redacted, as Redis shows them.
            Local::Auth | Local::Hello | Local::Quit => true,
            Local::Client => !admin_client(),
            _ => !res.has(commands::flags::ADMIN),
        };
        if !shown {
            return;
        }
        if matches!(which, Local::Auth | Local::Hello) {
            let mut args = cmd.to_args();
            crate::stats::redact(&mut args);
            self.monitor_own(args.iter().map(|a| &a[..]));
        } else {
            self.monitor_own(cmd.iter());
        }
    }

    /// Shows a command respire answered for Redis to `MONITOR`, as Redis would show it.
    pub(super) fn monitor_own<'a>(&self, args: impl Iterator<Item = &'a [u8]>) {
        let line = crate::clients::monitor_line(self.db, &self.info.addr, args);
        self.worker.shared.monitors.feed(line);
    }
}

/// Whether a `MONITOR` line is respire's own: a connection's handshake (`HELLO … SETNAME
/// respire`, then `SELECT` or `READONLY` from the same connection; `greeting`: connections
/// seen saying hello whose first other command has not come yet), an idle connection's
/// health check ([`backend::HEALTH_PING`]), or anything from one of
/// respire's internal connections (named `respire-internal`: topology, command table, probes;
/// `internal`: those seen, the latest few hundred).
fn own_line(
    line: &[u8],
    greeting: &mut Vec<Vec<u8>>,
    internal: &mut std::collections::VecDeque<Vec<u8>>,
) -> bool {
    // `+1700000000.000000 [db addr] "CMD" …`
    let Some(open) = memchr::memchr(b'[', line) else {
        return false;
    };
    let Some(close) = memchr::memchr(b']', &line[open..]).map(|c| open + c) else {
        return false;
    };
    let Some(addr) = line[open..close].split(|&b| b == b' ').nth(1) else {
        return false;
    };
    let rest = &line[close..];
    if internal.iter().any(|a| a == addr) || rest == backend::HEALTH_PING_LINE {
        return true;
    }
    if line.ends_with(INTERNAL_HELLO_END) && rest.starts_with(b"] \"HELLO\"") {
        if internal.len() >= 256 {
            internal.pop_front();
        }
        internal.push_back(addr.to_vec());
        return true;
    }
    if line.ends_with(b"\"SETNAME\" \"respire\"\r\n") && rest.starts_with(b"] \"HELLO\"") {
        if greeting.len() < 64 {
            greeting.push(addr.to_vec());
        }
        return true;
    }
    let Some(at) = greeting.iter().position(|a| a == addr) else {
        return false;
    };
    greeting.swap_remove(at);
    rest.starts_with(b"] \"SELECT\"") || rest.starts_with(b"] \"READONLY\"")
}

/// How the `MONITOR` line of an internal connection's `HELLO` ends (its name is
/// [`backend::INTERNAL_NAME`]).
const INTERNAL_HELLO_END: &[u8] = b"\"SETNAME\" \"respire-internal\"\r\n";

/// What a stream's client is told when no node's connection is left.
const LOST: &str = "ERR respire: connection to backend was lost; subscriptions ended";

/// How much a replication link holds for a side that does not read before it stops reading
/// the other (the master then buffers, within its replica output limit).
const LINK_BUFFER: usize = 256 * 1024;

/// How often a stream checks that it follows the nodes the topology says it should.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// A stream's connection to one node.
struct Feed {
    /// The node's address.
    addr: Arc<str>,
    /// Its connection broke: it is dropped.
    broken: bool,
    stream: crate::io::Stream,
    input: BytesMut,
    /// respire's connections whose handshake is under way (see `own_line`).
    greeting: Vec<Vec<u8>>,
    /// respire's internal connections (see `own_line`).
    internal: std::collections::VecDeque<Vec<u8>>,
}

/// Why a stream could not start on a node.
enum Started {
    /// It answered the command with an error (this frame).
    Refused(bytes::Bytes),
    /// It could not be reached, or did not answer.
    Failed(String),
}

impl Feed {
    /// Moves the complete frames read to `out`, leaving out respire's own handshakes; `false`
    /// when the node sent something that is not RESP.
    fn relay(&mut self, out: &mut BytesMut) -> bool {
        loop {
            match resp::next_reply(&mut self.input) {
                // respire's own connections saying hello are not the clients' commands.
                Ok(Some(frame)) if own_line(&frame, &mut self.greeting, &mut self.internal) => {}
                Ok(Some(frame)) => out.extend_from_slice(&frame),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Connects to `node`, sends it `first` (the command that starts the stream) and reads its
/// answer: the feed and that answer.
async fn start_feed(
    node: &backend::NodeSettings,
    key: backend::ConnKey,
    first: &[u8],
) -> Result<(Feed, bytes::Bytes), Started> {
    let mut stream = backend::connect(node, key).await.map_err(Started::Failed)?;
    let mut input = BytesMut::with_capacity(16 * 1024);
    let answer = async {
        stream.send(first).await.map_err(|e| e.to_string())?;
        backend::read_frame(&mut stream, &mut input).await
    };
    let ok = match tokio::time::timeout(node.command_timeout, answer).await {
        Ok(Ok(frame)) if frame.first() == Some(&b'-') => return Err(Started::Refused(frame)),
        Ok(Ok(frame)) => frame,
        Ok(Err(reason)) => return Err(Started::Failed(reason)),
        Err(_) => {
            return Err(Started::Failed(format!(
                "no answer within {:?}",
                node.command_timeout
            )));
        }
    };
    let feed = Feed {
        addr: Arc::from(node.addr.as_ref()),
        broken: false,
        stream,
        input,
        greeting: Vec::new(),
        internal: std::collections::VecDeque::new(),
    };
    Ok((feed, ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respire_own_lines_are_left_out() {
        assert_eq!(
            INTERNAL_HELLO_END,
            format!("\"SETNAME\" \"{}\"\r\n", backend::INTERNAL_NAME).as_bytes()
        );
        let (mut greeting, mut internal) = (Vec::new(), std::collections::VecDeque::new());
        let mut own = |l: &str| own_line(l.as_bytes(), &mut greeting, &mut internal);
        // An internal connection: its hello and everything after it.
        assert!(own(
            "+1.0 [0 127.0.0.1:1] \"HELLO\" \"2\" \"SETNAME\" \"respire-internal\"\r\n"
        ));
        assert!(own("+1.1 [0 127.0.0.1:1] \"CLUSTER\" \"SHARDS\"\r\n"));
        // A clients' connection: its handshake only, not the commands it carries.
        assert!(own(
            "+1.2 [0 127.0.0.1:2] \"HELLO\" \"2\" \"SETNAME\" \"respire\"\r\n"
        ));
        assert!(own("+1.3 [0 127.0.0.1:2] \"SELECT\" \"3\"\r\n"));
        assert!(!own("+1.4 [3 127.0.0.1:2] \"GET\" \"k\"\r\n"));
        assert!(!own("+1.5 [0 127.0.0.1:3] \"CLUSTER\" \"SHARDS\"\r\n"));
    }
}
