//! Subscriptions and MONITOR: the connection becomes a stream relayed to a dedicated backend connection.

use std::task::Poll;

use bytes::BytesMut;

use super::{Session, StreamEnd};
use crate::backend::{self, BackendError};
use crate::clients::flag;
use crate::commands::{self, Kind, Local};
use crate::io::{IoEvent, poll_io, write_now};
use crate::protocol::{self as resp, Command};

impl Session {
    // ---- streams (subscribe, monitor) -------------------------------------

    /// Relays between the client and a dedicated backend connection.
    pub(super) async fn relay_stream(&mut self, first: Command, node_index: usize) -> StreamEnd {
        // Give back a clean exclusive connection; a stream needs its own.
        self.release_exclusive(false);
        let addr = self
            .topo
            .nodes
            .get(node_index)
            .cloned()
            .unwrap_or_else(|| std::sync::Arc::from(""));
        let node = self.worker.pool(&addr).node().clone();
        let mut backend = match backend::connect(&node, self.key()).await {
            Ok(s) => s,
            Err(reason) => {
                let e = BackendError::Unavailable {
                    addr: node.addr.clone(),
                    reason,
                };
                self.reply_error(&e.to_string());
                return StreamEnd::Reset;
            }
        };
        self.info.set_flag(flag::PUBSUB, true);
        let monitor = first.name().eq_ignore_ascii_case(b"monitor");
        // The commands respire answers itself, which Redis never sees.
        let mut local_lines = monitor.then(|| self.worker.shared.monitors.join());
        // respire's connections whose handshake is under way (see `own_handshake`).
        let mut greeting: Vec<Vec<u8>> = Vec::new();
        let mut signals = crate::clients::SignalWatch::default();
        let info = self.info.clone();
        let mut to_backend = BytesMut::new();
        let mut from_backend = BytesMut::with_capacity(16 * 1024);
        first.encode_into(&mut to_backend);
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
            if write_now(&mut backend, &mut to_backend).is_err() {
                resp::error(
                    &mut self.out,
                    "ERR respire: connection to backend was lost; subscriptions ended",
                );
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
            // Both sides at once, so that neither starves the other.
            let (stream, out, inbuf) = (&mut self.stream, &mut self.out, &mut self.inbuf);
            let (signal, from, to) = std::future::poll_fn(|cx| {
                let signal = match signals.poll(&info, cx) {
                    Poll::Ready(bits) => bits,
                    Poll::Pending => 0,
                };
                let from = poll_io(&mut backend, cx, &mut to_backend, &mut from_backend, true);
                let to = poll_io(stream, cx, out, inbuf, true);
                let mut local = false;
                if let Some(rx) = local_lines.as_mut() {
                    while let Poll::Ready(Some(line)) = rx.poll_recv(cx) {
                        out.extend_from_slice(&line);
                        local = true;
                    }
                }
                if signal != 0 || from.is_ready() || to.is_ready() || local {
                    Poll::Ready((signal, from, to))
                } else {
                    Poll::Pending
                }
            })
            .await;
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
            match from {
                Poll::Ready(IoEvent::Read) => loop {
                    match resp::next_reply(&mut from_backend) {
                        // respire's own connections saying hello are not the clients' commands.
                        Ok(Some(frame)) if monitor && own_handshake(&frame, &mut greeting) => {}
                        Ok(Some(frame)) => self.out.extend_from_slice(&frame),
                        Ok(None) => break,
                        Err(_) => {
                            self.closing = true;
                            break;
                        }
                    }
                },
                Poll::Ready(IoEvent::Closed(_)) => {
                    resp::error(
                        &mut self.out,
                        "ERR respire: connection to backend was lost; subscriptions ended",
                    );
                    self.closing = true;
                }
                _ => {}
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

    /// Shows a command respire answers itself to `MONITOR` clients, as Redis would: not the
    /// administrative ones, nor those carrying a password (`AUTH`, `HELLO`), nor `QUIT`.
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
            Local::Auth | Local::Hello | Local::Quit => false,
            Local::Client => !admin_client(),
            _ => !res.has(commands::flags::ADMIN),
        };
        if shown {
            let line = crate::clients::monitor_line(self.db, &self.info.addr, cmd.iter());
            self.worker.shared.monitors.feed(line);
        }
    }
}

/// Whether a `MONITOR` line is respire's own connection handshake: `HELLO … SETNAME respire`,
/// then `SELECT` or `READONLY` from the same connection (`greeting`: connections seen saying
/// hello whose first other command has not come yet).
fn own_handshake(line: &[u8], greeting: &mut Vec<Vec<u8>>) -> bool {
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
