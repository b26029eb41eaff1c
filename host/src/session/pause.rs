//! `CLIENT PAUSE` in a session (see [`crate::pause`]): the command goes to every master, and
//! while a pause is in force the commands it holds wait in their client's session, not on a
//! connection other clients share.

use std::time::Duration;

use tokio::sync::oneshot;

use super::{After, Gated, ResponseChain, Session};
use crate::clients::flag;
use crate::commands::{Resolved, flags};
use crate::pause::{Hold, Mode, holds};
use crate::protocol::{Command, parse_i64};
use crate::router::Merge;

/// What respire keeps of a `CLIENT PAUSE` or `CLIENT UNPAUSE` once Redis took it; `None` for
/// anything else, and for arguments Redis refuses (its error is the reply).
pub(super) fn pause_after(cmd: &Command) -> Option<After> {
    if !cmd.name().eq_ignore_ascii_case(b"client") {
        return None;
    }
    let sub = cmd.arg(1)?;
    if sub.eq_ignore_ascii_case(b"unpause") && cmd.len() == 2 {
        return Some(After::Unpause);
    }
    if !sub.eq_ignore_ascii_case(b"pause") || !(cmd.len() == 3 || cmd.len() == 4) {
        return None;
    }
    let ms = u64::try_from(parse_i64(cmd.arg(2)?)?).ok()?;
    let mode = match cmd.arg(3) {
        None => Mode::All,
        Some(m) if m.eq_ignore_ascii_case(b"write") => Mode::Write,
        Some(m) if m.eq_ignore_ascii_case(b"all") => Mode::All,
        Some(_) => return None,
    };
    Some(After::Pause(mode, Duration::from_millis(ms)))
}

/// Whether a command has the number of arguments its table entry asks for (Redis answers a
/// wrong number at once, paused or not).
fn arity_ok(cmd: &Command, res: Resolved<'_>) -> bool {
    let Some(info) = res.info else { return true };
    let n = i64::try_from(cmd.len()).unwrap_or(i64::MAX);
    if info.arity >= 0 {
        n == info.arity
    } else {
        n >= -info.arity
    }
}

impl Session {
    /// `CLIENT PAUSE timeout [WRITE|ALL]` and `CLIENT UNPAUSE`: every master gets it (Redis
    /// pauses its other clients and its expiry too, and answers, errors included); once all
    /// took it, respire keeps the pause as well.
    pub(super) fn client_pause(&mut self, cmd: Command) {
        let after = pause_after(&cmd);
        let pushed = self.pushed;
        if self.everywhere(cmd, Merge::AllOk) {
            self.note_after(pushed, after);
        }
    }

    /// Whether the pause in force (`mode`) holds a command, and where.
    pub(super) fn pause_holds(&self, mode: Mode, cmd: &Command, res: Resolved<'_>) -> Hold {
        if pause_after(cmd).is_some() || !arity_ok(cmd, res) {
            // The pause commands themselves go (Redis may hold an UNPAUSE under ALL), and
            // so do commands Redis refuses at once.
            return Hold::No;
        }
        let write = res.info.is_some_and(|i| i.has(flags::WRITE));
        let mut args = cmd.iter().skip(1);
        holds(mode, cmd.name(), write, &mut args)
    }

    /// Whether a command about to be forwarded goes on a connection of its own, because a
    /// pause is in force and only Redis knows whether it holds it (`EVALSHA`, `FCALL`).
    pub(super) fn pause_own_connection(&self, cmd: &Command, res: Resolved<'_>) -> bool {
        !self.in_multi
            && self
                .worker
                .shared
                .pause
                .current()
                .is_some_and(|m| self.pause_holds(m, cmd, res) == Hold::Redis)
    }

    /// Keeps a command the pause holds until the pause lets it go (its end, `CLIENT UNPAUSE`,
    /// or a milder pause): then it carries on as if just read. The client counts as blocked
    /// meanwhile (Redis counts a paused client so), and nothing after it is read.
    pub(super) fn hold_for_pause(
        &mut self,
        cmd: Command,
        res: Resolved<'_>,
        chain: Option<Box<ResponseChain>>,
        cache_for: Option<crate::cache::CacheFor>,
    ) {
        // The mildest pause that holds it.
        let least = if self.pause_holds(Mode::Write, &cmd, res) == Hold::Here {
            Mode::Write
        } else {
            Mode::All
        };
        let (tx, rx) = oneshot::channel();
        let worker = self.worker.clone();
        tokio::task::spawn_local(async move {
            worker.shared.pause.wait(|m| m >= least).await;
            let _ = tx.send(Ok(()));
        });
        if self.blocked_until.is_none() {
            self.info.set_flag(flag::BLOCKED, true);
        }
        self.gated = Some(Box::new(Gated {
            rx,
            paused: Some(self.worker.shared.pause.hold()),
            cmd,
            chain,
            cache_for,
            stat: None,
        }));
    }

    /// A transaction's `EXEC` sent while a pause is in force: Redis holds it if the
    /// transaction writes, so the client counts as blocked until its reply.
    pub(super) fn exec_in_pause(&mut self) {
        if self.worker.shared.pause.current().is_some() {
            self.mark_blocked();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(args: &[&str]) -> Option<(Option<Mode>, Option<Duration>)> {
        match pause_after(&Command::from_args(args))? {
            After::Pause(m, d) => Some((Some(m), Some(d))),
            After::Unpause => Some((None, None)),
            _ => None,
        }
    }

    #[test]
    fn pause_arguments_as_redis_reads_them() {
        let ms = Duration::from_millis;
        assert_eq!(
            after(&["CLIENT", "PAUSE", "100"]),
            Some((Some(Mode::All), Some(ms(100))))
        );
        assert_eq!(
            after(&["client", "pause", "5", "write"]),
            Some((Some(Mode::Write), Some(ms(5))))
        );
        assert_eq!(
            after(&["client", "pause", "5", "ALL"]),
            Some((Some(Mode::All), Some(ms(5))))
        );
        assert_eq!(after(&["client", "unpause"]), Some((None, None)));
        // What Redis refuses is not kept: its error is the reply.
        assert_eq!(after(&["client", "pause", "-1"]), None);
        assert_eq!(after(&["client", "pause", "x"]), None);
        assert_eq!(after(&["client", "pause", "5", "reads"]), None);
        assert_eq!(after(&["client", "pause", "5", "write", "x"]), None);
        assert_eq!(after(&["client", "unpause", "x"]), None);
        assert_eq!(after(&["client", "list"]), None);
    }
}
