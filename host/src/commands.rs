//! The command table: what respire must know about a command to handle it.
//!
//! Most commands need nothing: they are forwarded unchanged to the shared,
//! pipelined backend connection of the session's database, which is also
//! what happens to commands respire has never heard of (modules, newer Redis
//! versions). The table lists the exceptions: commands answered by respire
//! itself, commands that need a connection of their own (transactions,
//! blocking commands, subscriptions), and commands that are refused.

use crate::protocol::Command;

/// How respire handles a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Sent to the session's shared backend connection; the reply passes through.
    Forward,
    /// Answered by respire itself.
    Local(Local),
    /// `MULTI`: starts a transaction on an exclusive connection.
    Multi,
    /// `WATCH`: pins the session to an exclusive connection.
    Watch,
    /// `EXEC` / `DISCARD`: ends a transaction.
    EndTransaction,
    /// `UNWATCH`.
    Unwatch,
    /// A command that may block the connection (`BLPOP`, `WAIT`, …).
    Blocking,
    /// `XREAD` / `XREADGROUP`: blocking only with a `BLOCK` option.
    MaybeBlocking,
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`, `MONITOR`: the connection becomes a stream.
    Stream,
    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE` outside subscribe mode.
    Unsubscribe,
    /// Refused with the given reason.
    Refused(&'static str),
}

/// Commands answered by respire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// `PING [message]`
    Ping,
    /// `ECHO message`
    Echo,
    /// `QUIT`
    Quit,
    /// `RESET`
    Reset,
    /// `AUTH [username] password`
    Auth,
    /// `HELLO [protover [AUTH username password] [SETNAME name]]`
    Hello,
    /// `SELECT index`
    Select,
    /// `CLIENT subcommand …`
    Client,
}

/// One entry of the command table.
#[derive(Debug)]
pub struct Spec {
    /// The command name in lower case, as Redis prints it in errors.
    pub name: &'static str,
    /// How the command is handled.
    pub kind: Kind,
    /// Allowed before authentication (Redis's `no-auth` flag).
    pub no_auth: bool,
}

const fn spec(name: &'static str, kind: Kind) -> Spec {
    Spec { name, kind, no_auth: false }
}

const fn no_auth(name: &'static str, kind: Kind) -> Spec {
    Spec { name, kind, no_auth: true }
}

/// What respire tells the client for commands it cannot proxy.
const REPLICATION: &str = "ERR respire: replication commands cannot be sent through the proxy";

/// The table, sorted by name (checked by a test).
static TABLE: &[Spec] = &[
    no_auth("auth", Kind::Local(Local::Auth)),
    spec("blmove", Kind::Blocking),
    spec("blmpop", Kind::Blocking),
    spec("blpop", Kind::Blocking),
    spec("brpop", Kind::Blocking),
    spec("brpoplpush", Kind::Blocking),
    spec("bzmpop", Kind::Blocking),
    spec("bzpopmax", Kind::Blocking),
    spec("bzpopmin", Kind::Blocking),
    spec("client", Kind::Local(Local::Client)),
    spec("discard", Kind::EndTransaction),
    spec("echo", Kind::Local(Local::Echo)),
    spec("exec", Kind::EndTransaction),
    no_auth("hello", Kind::Local(Local::Hello)),
    spec("monitor", Kind::Stream),
    spec("multi", Kind::Multi),
    spec("ping", Kind::Local(Local::Ping)),
    spec("psubscribe", Kind::Stream),
    spec("psync", Kind::Refused(REPLICATION)),
    spec("punsubscribe", Kind::Unsubscribe),
    no_auth("quit", Kind::Local(Local::Quit)),
    spec("replconf", Kind::Refused(REPLICATION)),
    no_auth("reset", Kind::Local(Local::Reset)),
    spec("select", Kind::Local(Local::Select)),
    spec("ssubscribe", Kind::Stream),
    spec("subscribe", Kind::Stream),
    spec("sunsubscribe", Kind::Unsubscribe),
    spec("sync", Kind::Refused(REPLICATION)),
    spec("unsubscribe", Kind::Unsubscribe),
    spec("unwatch", Kind::Unwatch),
    spec("wait", Kind::Blocking),
    spec("waitaof", Kind::Blocking),
    spec("watch", Kind::Watch),
    spec("xread", Kind::MaybeBlocking),
    spec("xreadgroup", Kind::MaybeBlocking),
];

/// The entry for commands not in the table.
pub static FORWARD: Spec = spec("", Kind::Forward);

/// Looks a command name up, case-insensitively.
pub fn lookup(name: &[u8]) -> &'static Spec {
    let mut lower = [0u8; 16];
    if name.len() > lower.len() {
        return &FORWARD;
    }
    for (d, s) in lower.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    let key = &lower[..name.len()];
    match TABLE.binary_search_by(|s| s.name.as_bytes().cmp(key)) {
        Ok(i) => &TABLE[i],
        Err(_) => &FORWARD,
    }
}

/// Whether an `XREAD`/`XREADGROUP` call carries a `BLOCK` option (before `STREAMS`).
pub fn has_block_option(cmd: &Command) -> bool {
    for a in cmd.args.iter().skip(1) {
        if a.eq_ignore_ascii_case(b"streams") {
            return false;
        }
        if a.eq_ignore_ascii_case(b"block") {
            return true;
        }
    }
    false
}

/// Whether a command has subcommands (`CLIENT LIST` is reported as `client|list`).
pub fn is_container(name: &[u8]) -> bool {
    const CONTAINERS: &[&[u8]] = &[
        b"acl", b"client", b"cluster", b"command", b"config", b"function", b"latency", b"memory", b"module", b"object",
        b"pubsub", b"script", b"slowlog", b"xgroup", b"xinfo",
    ];
    CONTAINERS.iter().any(|c| c.eq_ignore_ascii_case(name))
}

/// The command name in lower case for error messages (`'foo'`), lossy for non-UTF-8 names.
pub fn display_name(name: &[u8]) -> String {
    String::from_utf8_lossy(name).to_lowercase()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;

    #[test]
    fn table_is_sorted_and_lookup_ignores_case() {
        assert!(TABLE.windows(2).all(|w| w[0].name < w[1].name));
        assert_eq!(lookup(b"MuLtI").kind, Kind::Multi);
        assert_eq!(lookup(b"get").kind, Kind::Forward);
        assert_eq!(lookup(b"averyveryverylongcommandname").kind, Kind::Forward);
        assert!(lookup(b"AUTH").no_auth);
    }

    #[test]
    fn xread_block_detection() {
        let cmd = |s: &str| Command::from_args(s.split(' ').map(|a| Bytes::copy_from_slice(a.as_bytes())).collect());
        assert!(has_block_option(&cmd("XREAD COUNT 1 BLOCK 0 STREAMS s $")));
        assert!(!has_block_option(&cmd("XREAD STREAMS block $")));
    }
}
