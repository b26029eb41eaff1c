//! `CLIENT TRACKING`, `CLIENT CACHING`, `CLIENT GETREDIR`, `CLIENT TRACKINGINFO`, and what
//! a tracking client's commands tell the tracking table (see `crate::tracking`).

use bytes::Bytes;

use super::{Session, Slot, Target};
use crate::backend::ReplyRx;
use crate::clients::flag;
use crate::commands::{Kind, Local, Resolved, flags};
use crate::protocol::{self as resp, Command, parse_i64};
use crate::tracking::{Mode, prefix_collision};

/// Scripts and functions: respire cannot see the keys they read, so their declared keys
/// count as read (a client may get an invalidation Redis would not send, never miss one).
fn is_script(name: &[u8]) -> bool {
    [
        &b"eval"[..],
        b"evalsha",
        b"eval_ro",
        b"evalsha_ro",
        b"fcall",
        b"fcall_ro",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

impl Session {
    /// Tells the tracking table what a tracking client's command reads and writes (before
    /// it is sent, so that an invalidation can never pass the read it concerns).
    pub(super) fn track_command(&mut self, cmd: &Command, res: Resolved<'_>) {
        let Some(mode) = self.tracking.as_deref() else {
            return;
        };
        if self.info.flags.load(std::sync::atomic::Ordering::Relaxed) & flag::TRACKING == 0 {
            // Turned off by respire (the tracking connections never came up).
            self.tracking = None;
            return;
        }
        // `CLIENT CACHING` applies to the next command (or transaction), as in Redis.
        let caching = self.caching;
        let kind = res.spec.kind;
        // Kept by `CLIENT` itself, by `MULTI` and the commands queued after it, until `EXEC`.
        let keep = kind == Kind::Local(Local::Client)
            || kind == Kind::Multi
            || (self.in_multi && kind != Kind::EndTransaction);
        if !keep {
            self.caching = false;
        }
        let Some(info) = res.info else { return };
        let script = is_script(cmd.name());
        let keys = || {
            let mut keys = Vec::new();
            info.for_each_key(cmd, |i, _| keys.extend(cmd.arg_bytes(i)));
            keys
        };
        let tracking = &self.worker.shared.tracking;
        let id = self.info.id;
        if mode.noloop && !info.has(flags::READONLY) {
            let keys = keys();
            if !keys.is_empty() {
                tracking.wrote(id, keys.into_iter());
            }
        }
        let read = info.has(flags::READONLY) || script;
        if !mode.noloop && !mode.bcast && self.in_multi && kind != Kind::EndTransaction {
            // In a transaction Redis registers a read when it runs, after the writes queued
            // before it: their invalidation does not concern that read (a write after it
            // does). NOLOOP clients have their own writes left out anyway.
            if info.has(flags::WRITE) {
                for k in keys() {
                    self.tx_reread.retain(|r| *r != k);
                    self.tx_written.push(k);
                }
            } else if read {
                for k in keys() {
                    if self.tx_written.contains(&k) && !self.tx_reread.contains(&k) {
                        self.tx_reread.push(k);
                    }
                }
            }
        }
        if kind == Kind::Multi || kind == Kind::EndTransaction {
            if cmd.name().eq_ignore_ascii_case(b"exec") && !self.tx_reread.is_empty() {
                tracking.reread_after_write(id, std::mem::take(&mut self.tx_reread));
            }
            self.tx_written.clear();
            self.tx_reread.clear();
        }
        let opted_out = (mode.optin && !caching) || (mode.optout && caching);
        if read && !mode.bcast && !opted_out && !info.has(flags::PUBSUB) {
            let keys = keys();
            if !keys.is_empty() {
                tracking.remember(&self.worker.shared.clients, id, keys.into_iter());
            }
        }
    }

    /// A command of any client while clients track keys: a write's reply waits until the
    /// tracking connections have been read; `FLUSHALL`, `FLUSHDB`, `SWAPDB` empty the
    /// tracking table at once, as in Redis (`INFO` shows it), and the clients are told when
    /// Redis's null comes back.
    pub(super) fn track_write(&mut self, cmd: &Command, res: Resolved<'_>) {
        let name = cmd.name();
        if res.info.is_some_and(|i| i.has(flags::WRITE)) || is_script(name) {
            self.sync_tracking = true;
        }
        if crate::commands::empties_databases(name) {
            self.worker.shared.tracking.forget_keys();
        }
    }

    /// Queued tracking messages: written after the replies already owed.
    pub(super) fn on_notes(&mut self) {
        let subscribed = self.subscribed();
        for note in self.info.take_notes() {
            if let Some(frame) = note.frame(self.proto, subscribed) {
                self.emit_push(frame);
            }
        }
    }

    /// Turns tracking off when the client leaves or sends `RESET`.
    pub(super) fn stop_tracking(&mut self) {
        if self.tracking.take().is_some() {
            self.worker.shared.tracking.disable(&self.info);
        }
        self.caching = false;
    }

    /// `CLIENT TRACKING on|off [REDIRECT id] [BCAST] [PREFIX p …] [OPTIN] [OPTOUT] [NOLOOP]`,
    /// with Redis's checks and error texts.
    pub(super) fn client_tracking(&mut self, args: &[Bytes]) {
        let mut redirect: u64 = 0;
        let mut new = Mode::default();
        let mut prefixes: Vec<Bytes> = Vec::new();
        let mut j = 3;
        while j < args.len() {
            let more = args.len() - 1 - j;
            let a = args[j].to_ascii_lowercase();
            match a.as_slice() {
                b"redirect" if more > 0 => {
                    j += 1;
                    if redirect != 0 {
                        return self.reply_error(
                            "ERR A client can only redirect to a single other client",
                        );
                    }
                    let Some(id) = parse_i64(&args[j]) else {
                        return self.reply_error("ERR value is not an integer or out of range");
                    };
                    if id <= 0 || self.worker.shared.clients.get(id as u64).is_none() {
                        return self
                            .reply_error("ERR The client ID you want redirect to does not exist");
                    }
                    redirect = id as u64;
                }
                b"bcast" => new.bcast = true,
                b"optin" => new.optin = true,
                b"optout" => new.optout = true,
                b"noloop" => new.noloop = true,
                b"prefix" if more > 0 => {
                    j += 1;
                    prefixes.push(args[j].clone());
                }
                _ => return self.reply_error("ERR syntax error"),
            }
            j += 1;
        }
        let on = args[2].to_ascii_lowercase();
        match on.as_slice() {
            b"on" => {}
            b"off" => {
                self.stop_tracking();
                return self.reply_ok();
            }
            _ => return self.reply_error("ERR syntax error"),
        }
        let current = self.tracking.as_deref();
        if !new.bcast && !prefixes.is_empty() {
            return self.reply_error("ERR PREFIX option requires BCAST mode to be enabled");
        }
        if current.is_some_and(|c| c.bcast != new.bcast) {
            return self.reply_error(
                "ERR You can't switch BCAST mode on/off before disabling tracking for this client, and then re-enabling it with a different mode.",
            );
        }
        if new.bcast && (new.optin || new.optout) {
            return self.reply_error("ERR OPTIN and OPTOUT are not compatible with BCAST");
        }
        if new.optin && new.optout {
            return self.reply_error("ERR You can't specify both OPTIN mode and OPTOUT mode");
        }
        if current.is_some_and(|c| (new.optin && c.optout) || (new.optout && c.optin)) {
            return self.reply_error(
                "ERR You can't switch OPTIN/OPTOUT mode before disabling tracking for this client, and then re-enabling it with a different mode.",
            );
        }
        if new.bcast {
            let existing = current.map(|c| c.prefixes.as_slice()).unwrap_or_default();
            if let Some(e) = prefix_collision(existing, &prefixes) {
                return self.reply_error(&e);
            }
            // Prefixes add up; none given means every key.
            let mut all = existing.to_vec();
            if prefixes.is_empty() {
                prefixes.push(Bytes::new());
            }
            all.extend(prefixes);
            all.sort();
            all.dedup();
            new.prefixes = all;
        }
        new.redirect = redirect;
        let shared = &self.worker.shared;
        let wait = shared.node_settings.connect_timeout * 3;
        let rx = shared.tracking.enable(&self.info, new.clone(), wait);
        self.tracking = Some(Box::new(new));
        match rx {
            None => self.reply_ok(),
            Some(rx) => {
                // The first tracking client waits for the tracking connections; commands
                // after it wait for its `+OK` (their keys must be tracked by then).
                let silent = self.take_silent();
                self.push_slot(Slot::Waiting {
                    rx: ReplyRx::Remote(rx),
                    silent,
                    retry: None,
                });
                self.waiting += 1;
                self.last_target = Some(Target::Tracking);
            }
        }
    }

    /// `CLIENT CACHING yes|no`.
    pub(super) fn client_caching(&mut self, arg: &[u8]) {
        let Some(mode) = self.tracking.as_deref() else {
            return self.reply_error(
                "ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
            );
        };
        let (optin, optout) = (mode.optin, mode.optout);
        if arg.eq_ignore_ascii_case(b"yes") {
            if !optin {
                return self.reply_error(
                    "ERR CLIENT CACHING YES is only valid when tracking is enabled in OPTIN mode.",
                );
            }
        } else if arg.eq_ignore_ascii_case(b"no") {
            if !optout {
                return self.reply_error(
                    "ERR CLIENT CACHING NO is only valid when tracking is enabled in OPTOUT mode.",
                );
            }
        } else {
            return self.reply_error("ERR syntax error");
        }
        self.caching = true;
        self.reply_ok();
    }

    /// `CLIENT GETREDIR`.
    pub(super) fn client_getredir(&mut self) {
        let redir = self.tracking.as_deref().map_or(-1, |m| m.redirect as i64);
        self.reply_with(|o, _| resp::int(o, redir));
    }

    /// `CLIENT TRACKINGINFO`.
    pub(super) fn client_trackinginfo(&mut self) {
        let mode = self.tracking.as_deref().cloned();
        let broken = mode.is_some() && self.worker.shared.tracking.broken(self.info.id);
        let caching = self.caching;
        let mut shown: Vec<&[u8]> = vec![if mode.is_some() { b"on" } else { b"off" }];
        if let Some(m) = &mode {
            if m.bcast {
                shown.push(b"bcast");
            }
            if m.optin {
                shown.push(b"optin");
                if caching {
                    shown.push(b"caching-yes");
                }
            }
            if m.optout {
                shown.push(b"optout");
                if caching {
                    shown.push(b"caching-no");
                }
            }
            if m.noloop {
                shown.push(b"noloop");
            }
            if broken {
                shown.push(b"broken_redirect");
            }
        }
        let redirect = mode.as_ref().map_or(-1, |m| m.redirect as i64);
        let prefixes = mode.map(|m| m.prefixes).unwrap_or_default();
        self.reply_with(|o, p| {
            resp::map_header(o, 3, p);
            resp::bulk(o, b"flags");
            if p >= 3 {
                o.extend_from_slice(format!("~{}\r\n", shown.len()).as_bytes());
            } else {
                resp::array_header(o, shown.len());
            }
            for f in &shown {
                resp::bulk(o, f);
            }
            resp::bulk(o, b"redirect");
            resp::int(o, redirect);
            resp::bulk(o, b"prefixes");
            resp::array_header(o, prefixes.len());
            for p in &prefixes {
                resp::bulk(o, p);
            }
        });
    }
}
