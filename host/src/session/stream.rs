//! Subscriptions and MONITOR: the connection becomes a stream relayed to a dedicated backend connection.

use bytes::BytesMut;

use super::{Session, StreamEnd};
use crate::backend::{self, BackendError};
use crate::clients::flag;
use crate::commands::{self, Kind, Local};
use crate::protocol::{self as resp, Command};

impl Session {
    // ---- streams (subscribe, monitor) -------------------------------------

    /// Relays between the client and a dedicated backend connection.
    pub(super) async fn relay_stream(&mut self, first: Command, node_index: usize) -> StreamEnd {
        // Give back a clean exclusive connection; a stream needs its own.
        self.release_exclusive(false);
        let addr = self.topo.nodes.get(node_index).cloned().unwrap_or_else(|| std::sync::Arc::from(""));
        let node = self.worker.pool(&addr).node().clone();
        let backend = match backend::connect(&node, self.key()).await {
            Ok(s) => s,
            Err(reason) => {
                let e = BackendError::Unavailable { addr: node.addr.clone(), reason };
                self.reply_error(&e.to_string());
                return StreamEnd::Reset;
            }
        };
        self.info.set_flag(flag::PUBSUB, true);
        let mut signals = crate::clients::SignalWatch::default();
        let info = self.info.clone();
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
            // MONITOR clients are of the normal class, as in Redis.
            if !self.output_within_limit(false) {
                break StreamEnd::Close;
            }
            if self.closing {
                let _ = self.flush_all().await;
                break StreamEnd::Close;
            }
            tokio::select! {
                biased;
                _ = std::future::poll_fn(|cx| signals.poll(&info, cx)) => break StreamEnd::Close,
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
                            match resp::next_reply(&mut from_backend) {
                                Ok(Some(frame)) => self.out.extend_from_slice(&frame),
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
