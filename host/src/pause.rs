//! `CLIENT PAUSE` as respire keeps it.
//!
//! Redis holds a paused command on the connection it came on. Through respire that is a
//! connection many clients share: one held `SET` would hold every client's `GET` behind it,
//! though `CLIENT PAUSE WRITE` lets reads through. So respire keeps the pause too (the one a
//! client set through it): a command the pause holds waits in its client's session, not on a
//! shared connection, and goes when the pause ends. Redis still gets the pause (writes of its
//! other clients wait, keys do not expire), and respire's end is never before Redis's.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a pause holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Commands that may write, or be sent to replicas (`PUBLISH`, `PFCOUNT`, scripts that
    /// do not declare `no-writes`).
    Write = 1,
    /// Every command.
    All = 2,
}

/// The pause in force, shared by the workers.
#[derive(Debug)]
pub struct Pause {
    base: Instant,
    /// 0: none; otherwise a [`Mode`].
    mode: AtomicU8,
    /// When it ends, in ms after `base`.
    end: AtomicU64,
    /// Serialises changes (readers only load the atomics).
    change: Mutex<()>,
    /// Bumped when a pause is lifted before its end.
    lifted: tokio::sync::watch::Sender<u64>,
    /// Clients whose command respire holds (Redis does not count them as blocked).
    held: Arc<AtomicUsize>,
}

/// A client whose command respire holds, counted while this lives.
#[derive(Debug)]
pub struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            base: Instant::now(),
            mode: AtomicU8::new(0),
            end: AtomicU64::new(0),
            change: Mutex::new(()),
            lifted: tokio::sync::watch::Sender::new(0),
            held: Arc::default(),
        }
    }
}

impl Pause {
    fn ms(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    /// The pause in force now, if any: one atomic load when there is none.
    #[inline]
    pub fn current(&self) -> Option<Mode> {
        let mode = self.mode.load(Ordering::Acquire);
        if mode == 0 {
            return None;
        }
        if self.ms(Instant::now()) >= self.end.load(Ordering::Acquire) {
            return None;
        }
        Some(if mode == Mode::All as u8 {
            Mode::All
        } else {
            Mode::Write
        })
    }

    /// A pause until `timeout` from `now`, as Redis combines them: the stricter mode and the
    /// later end of this one and the one in force.
    pub fn start(&self, mode: Mode, timeout: Duration, now: Instant) {
        let _g = self.change.lock().unwrap_or_else(|e| e.into_inner());
        let end = self
            .ms(now)
            .saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        let (old_mode, old_end) = match self.current() {
            Some(m) => (m as u8, self.end.load(Ordering::Acquire)),
            None => (0, 0),
        };
        self.end.store(end.max(old_end), Ordering::Release);
        self.mode
            .store((mode as u8).max(old_mode), Ordering::Release);
    }

    /// Counts a client whose command respire holds, until the result is dropped.
    pub fn hold(&self) -> Held {
        self.held.fetch_add(1, Ordering::Relaxed);
        Held(self.held.clone())
    }

    /// Clients whose command respire holds now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// `CLIENT UNPAUSE`: the commands held go now.
    pub fn stop(&self) {
        let _g = self.change.lock().unwrap_or_else(|e| e.into_inner());
        self.mode.store(0, Ordering::Release);
        self.end.store(0, Ordering::Release);
        self.lifted.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits until the pause in force no longer holds what `holds` says it holds (it ended,
    /// was lifted, or became one that lets the command through).
    pub async fn wait(&self, holds: impl Fn(Mode) -> bool) {
        let mut lifted = self.lifted.subscribe();
        loop {
            lifted.mark_unchanged();
            let Some(mode) = self.current() else { return };
            if !holds(mode) {
                return;
            }
            let end = self.base + Duration::from_millis(self.end.load(Ordering::Acquire));
            tokio::select! {
                _ = tokio::time::sleep_until(end.into()) => {}
                _ = lifted.changed() => {}
            }
        }
    }
}

/// Whether the pause in force holds a command, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// It runs now.
    No,
    /// It waits in respire until the pause ends.
    Here,
    /// Only Redis knows (a script by its SHA, a function: their flags say whether they may
    /// write): it goes on a connection of its own, where Redis holds it or runs it.
    Redis,
}

/// Whether a pause in `mode` holds command `name` (lower or any case), whose table flags say
/// whether it writes (`write`), with `args` its arguments after the name.
pub fn holds(mode: Mode, name: &[u8], write: bool, args: &mut dyn Iterator<Item = &[u8]>) -> Hold {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    if mode == Mode::All {
        return Hold::Here;
    }
    if write || is(b"publish") || is(b"spublish") || is(b"pfcount") {
        // Redis's write commands and its hidden `may_replicate` ones.
        return Hold::Here;
    }
    if is(b"eval") {
        // A script's shebang may declare it writes nothing; without one it may.
        let writes = args.next().is_none_or(|body| !declares_no_writes(body));
        return if writes { Hold::Here } else { Hold::No };
    }
    if is(b"evalsha") || is(b"fcall") {
        return Hold::Redis;
    }
    Hold::No
}

/// Whether a script's first line is a shebang whose `flags=` include `no-writes`.
fn declares_no_writes(body: &[u8]) -> bool {
    let Some(rest) = body.strip_prefix(b"#!") else {
        return false;
    };
    let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
    line.split(|&b| b == b' ')
        .filter_map(|w| w.strip_prefix(b"flags="))
        .any(|flags| flags.split(|&b| b == b',').any(|f| f == b"no-writes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(mode: Mode, cmd: &[&str], write: bool) -> Hold {
        let mut args = cmd[1..].iter().map(|a| a.as_bytes());
        holds(mode, cmd[0].as_bytes(), write, &mut args)
    }

    #[test]
    fn write_pauses_hold_what_may_write() {
        assert_eq!(hold(Mode::Write, &["SET", "k", "v"], true), Hold::Here);
        assert_eq!(hold(Mode::Write, &["GET", "k"], false), Hold::No);
        assert_eq!(hold(Mode::Write, &["publish", "c", "m"], false), Hold::Here);
        assert_eq!(hold(Mode::Write, &["PFCOUNT", "h"], false), Hold::Here);
        assert_eq!(
            hold(Mode::Write, &["EVAL", "return 1", "0"], false),
            Hold::Here
        );
        assert_eq!(
            hold(Mode::Write, &["EVAL", "#!lua\nreturn 1", "0"], false),
            Hold::Here
        );
        assert_eq!(
            hold(
                Mode::Write,
                &["EVAL", "#!lua flags=no-writes\nreturn 1", "0"],
                false
            ),
            Hold::No
        );
        assert_eq!(
            hold(
                Mode::Write,
                &[
                    "EVAL",
                    "#!lua name=x flags=allow-stale,no-writes\nreturn 1",
                    "0"
                ],
                false
            ),
            Hold::No
        );
        // `no-writes` after the first line is not a flag.
        assert_eq!(
            hold(
                Mode::Write,
                &["EVAL", "#!lua\n-- flags=no-writes\nreturn 1", "0"],
                false
            ),
            Hold::Here
        );
        assert_eq!(
            hold(Mode::Write, &["EVALSHA", "abc", "0"], false),
            Hold::Redis
        );
        assert_eq!(hold(Mode::Write, &["FCALL", "f", "0"], false), Hold::Redis);
        assert_eq!(
            hold(Mode::Write, &["EVAL_RO", "return 1", "0"], false),
            Hold::No
        );
        assert_eq!(hold(Mode::All, &["GET", "k"], false), Hold::Here);
    }

    #[test]
    fn pauses_combine_as_redis_does_and_end() {
        let p = Pause::default();
        assert_eq!(p.current(), None);
        let now = Instant::now();
        p.start(Mode::All, Duration::from_secs(60), now);
        // A shorter, milder pause changes neither the mode nor the end.
        p.start(Mode::Write, Duration::from_millis(1), now);
        assert_eq!(p.current(), Some(Mode::All));
        p.stop();
        assert_eq!(p.current(), None);
        let (a, b) = (p.hold(), p.hold());
        assert_eq!(p.held(), 2);
        drop(a);
        drop(b);
        assert_eq!(p.held(), 0);
        p.start(Mode::Write, Duration::from_millis(30), Instant::now());
        assert_eq!(p.current(), Some(Mode::Write));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(p.current(), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiting_ends_with_the_pause_or_when_it_is_lifted() {
        let p = std::sync::Arc::new(Pause::default());
        p.start(Mode::Write, Duration::from_millis(50), Instant::now());
        let t = Instant::now();
        p.wait(|m| m >= Mode::Write).await;
        assert!(
            t.elapsed() >= Duration::from_millis(45),
            "{:?}",
            t.elapsed()
        );
        p.start(Mode::Write, Duration::from_secs(60), Instant::now());
        let q = p.clone();
        let waiter = tokio::spawn(async move {
            let t = Instant::now();
            q.wait(|m| m >= Mode::Write).await;
            t.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        p.stop();
        let waited = waiter.await.unwrap_or_default();
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        // A write pause does not hold what only an ALL pause holds.
        p.start(Mode::Write, Duration::from_secs(60), Instant::now());
        let t = Instant::now();
        p.wait(|m| m == Mode::All).await;
        assert!(t.elapsed() < Duration::from_secs(5));
        p.stop();
    }
}
