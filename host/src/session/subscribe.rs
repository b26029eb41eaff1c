//! `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE` and their `UNSUBSCRIBE`s, through the
//! worker's shared subscriber connections (see `crate::pubsub`).
//!
//! The session keeps its own subscription set: replies carry its own counts,
//! and messages for channels it has left are dropped even if already queued.

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::{CLUSTERDOWN, Session, Slot};
use crate::clients::flag;
use crate::protocol::{self as resp, Command};
use crate::pubsub::{Message, SubKind, Subscriber};
use crate::router::{self, CROSSSLOT, Plan};

fn kind_of(name: &[u8]) -> SubKind {
    let lower = name.to_ascii_lowercase();
    match lower.as_slice() {
        b"psubscribe" | b"punsubscribe" => SubKind::Pattern,
        b"ssubscribe" | b"sunsubscribe" => SubKind::Shard,
        _ => SubKind::Channel,
    }
}

impl Session {
    /// Subscriptions counted in (un)subscribe replies for `kind`: channels and patterns
    /// together, shard channels on their own (as Redis counts them).
    fn sub_count(&self, kind: SubKind) -> i64 {
        self.subs
            .iter()
            .filter(|(k, _)| (*k == SubKind::Shard) == (kind == SubKind::Shard))
            .count() as i64
    }

    /// Shows the subscription counts in `CLIENT LIST` (`sub`, `psub`, `ssub`).
    fn show_subscriptions(&self) {
        let mut n = [0u32; 3];
        for (k, _) in &self.subs {
            if let Some(c) = n.get_mut(k.index()) {
                *c += 1;
            }
        }
        for (shown, n) in self.info.subscriptions.iter().zip(n) {
            shown.store(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether the client is in subscribe mode.
    pub(super) fn subscribed(&self) -> bool {
        !self.subs.is_empty()
    }

    fn push_sender(&mut self) -> mpsc::UnboundedSender<Message> {
        match &self.push_tx {
            Some(tx) => tx.clone(),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                self.push_tx = Some(tx.clone());
                self.push_rx = Some(rx);
                tx
            }
        }
    }

    pub(super) fn subscribe(&mut self, cmd: Command) {
        let args = cmd.to_args();
        let kind = kind_of(cmd.name());
        if args.len() < 2 {
            return self.wrong_args(&crate::commands::display_name(cmd.name()));
        }
        let node = if !self.cluster_mode() {
            Ok(0)
        } else if kind == SubKind::Shard {
            match router::plan(&cmd, self.worker.shared.commands.get(&cmd), &self.topo) {
                Plan::Single(slot) => self.node_for(slot),
                _ => Err(CROSSSLOT),
            }
        } else {
            // Channels and patterns: one master for the whole worker.
            self.topo.channels_master().ok_or(CLUSTERDOWN)
        };
        let node = match node {
            Ok(n) => n,
            Err(e) => return self.reply_error(e),
        };
        let addr = self.node_addr(node);
        let settings = self.worker.pool(&addr).node().clone();
        let tx = self.push_sender();
        let verb = crate::commands::display_name(cmd.name());
        let mut frames = BytesMut::new();
        // One wait for every confirmation the command needs (see `crate::pubsub::Waiter`).
        let (wait, mut confirmed) = crate::pubsub::Waiter::new();
        // Each reply carries the count after its channel: counted once, then kept up to date
        // (counting the set for each of thousands of channels made a big SUBSCRIBE quadratic).
        let mut count = self.sub_count(kind);
        for name in &args[1..] {
            if self.subs.insert((kind, name.clone())) {
                count += 1;
                let sub = Subscriber {
                    sid: self.info.id,
                    tx: tx.clone(),
                };
                self.worker
                    .hub
                    .subscribe(&settings, kind, name.clone(), sub, Some(&wait));
            }
            resp::push_header(&mut frames, 3, self.proto);
            resp::bulk(&mut frames, verb.as_bytes());
            resp::bulk(&mut frames, name);
            resp::int(&mut frames, count);
        }
        self.info.set_flag(flag::PUBSUB, true);
        self.show_subscriptions();
        let frames = frames.freeze();
        drop(wait);
        if confirmed.try_recv().is_ok() {
            // Nothing to wait for: every name was held and confirmed already.
            return self.reply_push(|o, _| o.extend_from_slice(&frames));
        }
        // Reply once the backend has confirmed, so no message published after the reply is missed.
        let (done, rx) = crate::backend::reply_channel();
        tokio::task::spawn_local(async move {
            let _ = confirmed.await;
            done.send(Ok(frames));
        });
        // A push: delivered even under `CLIENT REPLY OFF` (the mode still moves on).
        let _ = self.take_silent();
        self.push_slot(Slot::Waiting {
            rx,
            silent: false,
            retry: None,
        });
        self.waiting += 1;
    }

    pub(super) fn unsubscribe(&mut self, cmd: &Command) {
        let args = cmd.to_args();
        let kind = kind_of(cmd.name());
        let verb = crate::commands::display_name(cmd.name());
        let names: Vec<Bytes> = if args.len() > 1 {
            args[1..].to_vec()
        } else {
            let mut all: Vec<Bytes> = self
                .subs
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, n)| n.clone())
                .collect();
            all.sort();
            all
        };
        let mut frames = BytesMut::new();
        // Counted once, then kept up to date (see `subscribe`).
        let mut count = self.sub_count(kind);
        if names.is_empty() {
            resp::push_header(&mut frames, 3, self.proto);
            resp::bulk(&mut frames, verb.as_bytes());
            resp::null(&mut frames, self.proto);
            resp::int(&mut frames, count);
        }
        for name in names {
            if self.subs.remove(&(kind, name.clone())) {
                count -= 1;
                self.worker.hub.unsubscribe(kind, &name, self.info.id);
                self.note_left();
            }
            resp::push_header(&mut frames, 3, self.proto);
            resp::bulk(&mut frames, verb.as_bytes());
            resp::bulk(&mut frames, &name);
            resp::int(&mut frames, count);
        }
        if self.subs.is_empty() {
            self.info.set_flag(flag::PUBSUB, false);
        }
        self.show_subscriptions();
        let frames = frames.freeze();
        self.reply_push(|o, _| o.extend_from_slice(&frames));
    }

    /// Leaves every subscription (RESET, disconnect).
    pub(super) fn unsubscribe_all(&mut self) {
        for (kind, name) in self.subs.drain() {
            self.worker.hub.unsubscribe(kind, &name, self.info.id);
        }
        self.note_left();
        self.info.set_flag(flag::PUBSUB, false);
        self.show_subscriptions();
    }

    /// The session left a channel: the hub sends nothing more for it, but messages for it may
    /// already be queued. Only those are checked against the subscriptions (a hash of the
    /// channel per message otherwise, for a session that never leaves one).
    fn note_left(&mut self) {
        self.stale_messages = self.push_rx.as_ref().map_or(0, |rx| rx.len());
    }

    /// A message from the hub: delivered in order with replies, unless the session left its channel.
    pub(super) fn on_message(&mut self, msg: Message) {
        let Message {
            kind,
            name,
            frame,
            ended,
        } = msg;
        // Whether the session may have left this channel since the hub sent the message.
        let check = self.stale_messages > 0;
        self.stale_messages = self.stale_messages.saturating_sub(1);
        if ended {
            // The server ended a shard subscription (its slot moved): tell the client with its own count.
            if !self.subs.remove(&(kind, name.clone())) {
                return;
            }
            self.note_left();
            self.show_subscriptions();
            let count = self.sub_count(SubKind::Shard);
            let mut f = BytesMut::new();
            resp::push_header(&mut f, 3, self.proto);
            resp::bulk(&mut f, b"sunsubscribe");
            resp::bulk(&mut f, &name);
            resp::int(&mut f, count);
            return self.deliver(f.freeze());
        }
        if check && !self.subs.contains(&(kind, name)) {
            return;
        }
        self.deliver(frame);
    }

    /// Writes a message frame (as the hub relays it, or built here) in the client's protocol.
    fn deliver(&mut self, frame: Bytes) {
        if !self.queue.is_empty() || !self.staged.is_empty() || self.hooked.is_some() {
            return self.emit_push(crate::pubsub::in_protocol(frame, self.proto));
        }
        if let Some(rest) = frame.get(1..) {
            self.out
                .extend_from_slice(&[crate::pubsub::message_type(self.proto)]);
            self.out.extend_from_slice(rest);
        }
    }
}
