//! The command table: what respire must know about a command to handle it.
//!
//! Most commands need nothing: they are forwarded unchanged to the shared,
//! pipelined backend connection of the session's database, which is also
//! what happens to commands respire has never heard of (modules, newer Redis
//! versions). The table lists the exceptions: commands answered by respire
//! itself, commands that need a connection of their own (transactions,
//! blocking commands, subscriptions), and commands that are refused.

use std::sync::Arc;

use bytes::Bytes;
use rustc_hash::FxHashMap as HashMap;

use crate::protocol::{Args, Command, Value, parse_i64, reply_len};

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
    /// `SCRIPT`, `FUNCTION`, `CONFIG`, `ACL`: forwarded, with subcommands respire acts on too:
    /// `KILL` goes on a connection of its own (a shared one may be waiting behind the script
    /// it stops), `CONFIG RESETSTAT` also resets respire's counters, and changes of the
    /// credentials respire logs in to Redis with are refused.
    Control,
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`, `MONITOR`: the connection becomes a stream.
    Stream,
    /// `SYNC`, `PSYNC`, `REPLCONF`: the connection becomes a replication link to the one
    /// master behind respire, relayed byte for byte until either side closes it.
    Replica,
    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE` outside subscribe mode.
    Unsubscribe,
    /// `PUBLISH`, `SPUBLISH`, `PUBSUB`: forwarded; the subscriber counts in their replies are
    /// corrected for respire's shared subscriber connections (see [`crate::pubsub::Census`]).
    Receivers,
    /// Refused with the given reason.
    Refused(&'static str),
    /// `CLUSTER …`: answered by respire over shards (it presents itself as one node), forwarded otherwise.
    Cluster,
    /// `READONLY`, `READWRITE`, `ASKING`: accepted by respire over shards, forwarded otherwise.
    ClusterConnection,
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
    /// `INFO [section …]`: respire's sections, with Redis's (keyspace added up over masters).
    Info,
    /// `SLOWLOG GET|LEN|RESET|HELP`: respire's own slow log.
    Slowlog,
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
    Spec {
        name,
        kind,
        no_auth: false,
    }
}

const fn no_auth(name: &'static str, kind: Kind) -> Spec {
    Spec {
        name,
        kind,
        no_auth: true,
    }
}

/// The table, sorted by name (checked by a test).
static TABLE: &[Spec] = &[
    spec("acl", Kind::Control),
    spec("asking", Kind::ClusterConnection),
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
    spec("cluster", Kind::Cluster),
    spec("config", Kind::Control),
    spec("discard", Kind::EndTransaction),
    spec("echo", Kind::Local(Local::Echo)),
    spec("exec", Kind::EndTransaction),
    spec("function", Kind::Control),
    no_auth("hello", Kind::Local(Local::Hello)),
    spec("info", Kind::Local(Local::Info)),
    spec("monitor", Kind::Stream),
    spec("multi", Kind::Multi),
    spec("ping", Kind::Local(Local::Ping)),
    spec("psubscribe", Kind::Stream),
    spec("psync", Kind::Replica),
    spec("publish", Kind::Receivers),
    spec("pubsub", Kind::Receivers),
    spec("punsubscribe", Kind::Unsubscribe),
    no_auth("quit", Kind::Local(Local::Quit)),
    spec("readonly", Kind::ClusterConnection),
    spec("readwrite", Kind::ClusterConnection),
    spec("replconf", Kind::Replica),
    no_auth("reset", Kind::Local(Local::Reset)),
    spec("script", Kind::Control),
    spec("select", Kind::Local(Local::Select)),
    spec("slowlog", Kind::Local(Local::Slowlog)),
    spec("spublish", Kind::Receivers),
    spec("ssubscribe", Kind::Stream),
    spec("subscribe", Kind::Stream),
    spec("sunsubscribe", Kind::Unsubscribe),
    spec("sync", Kind::Replica),
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

/// What respire knows about one command, looked up once when it is read: how it is
/// handled, and Redis's description of it (absent for commands Redis does not describe).
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    /// How respire handles it.
    pub spec: &'static Spec,
    /// Redis's description: flags, categories, key positions.
    pub info: Option<&'a CommandInfo>,
}

impl Resolved<'_> {
    /// Whether Redis flags the command with `flag` (false when it is not described).
    pub fn has(&self, flag: u32) -> bool {
        self.info.is_some_and(|i| i.has(flag))
    }
}

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

/// `EVAL`, `EVALSHA`, `FCALL` and their read-only forms: commands that run a script or a
/// function, which may run past Redis's `busy-reply-threshold`.
#[inline]
pub fn is_script(name: &[u8]) -> bool {
    match name.first() {
        Some(b'e' | b'E') => [&b"eval"[..], b"evalsha", b"eval_ro", b"evalsha_ro"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n)),
        Some(b'f' | b'F') => {
            name.eq_ignore_ascii_case(b"fcall") || name.eq_ignore_ascii_case(b"fcall_ro")
        }
        _ => false,
    }
}

/// `FLUSHALL`, `FLUSHDB`, `SWAPDB`: a command that changes every key of a database at once
/// (caches of replies and clients' tracking start over).
pub fn empties_databases(name: &[u8]) -> bool {
    [&b"flushall"[..], b"flushdb", b"swapdb"]
        .iter()
        .any(|n| name.eq_ignore_ascii_case(n))
}

/// Whether an `XREAD`/`XREADGROUP` call carries a `BLOCK` option (before `STREAMS`).
pub fn has_block_option(cmd: &Command) -> bool {
    for a in cmd.iter().skip(1) {
        if a.eq_ignore_ascii_case(b"streams") {
            return false;
        }
        if a.eq_ignore_ascii_case(b"block") {
            return true;
        }
    }
    false
}

/// The command name in lower case for error messages (`'foo'`), lossy for non-UTF-8 names.
pub fn display_name(name: &[u8]) -> String {
    String::from_utf8_lossy(name).to_lowercase()
}

/// Bits of [`CommandInfo::flags`], from Redis's command flags.
pub mod flags {
    /// May modify data.
    pub const WRITE: u32 = 1;
    /// Only reads data.
    pub const READONLY: u32 = 1 << 1;
    /// Administrative.
    pub const ADMIN: u32 = 1 << 2;
    /// Pub/Sub related.
    pub const PUBSUB: u32 = 1 << 3;
    /// May block the client.
    pub const BLOCKING: u32 = 1 << 4;
    /// Key positions depend on the arguments.
    pub const MOVABLEKEYS: u32 = 1 << 5;
    /// Not allowed in scripts.
    pub const NOSCRIPT: u32 = 1 << 6;
    /// O(1) or O(log N).
    pub const FAST: u32 = 1 << 7;
    /// Allowed before authentication.
    pub const NO_AUTH: u32 = 1 << 8;
    /// Output may differ between calls with the same input.
    pub const RANDOM: u32 = 1 << 9;
    /// Refused inside a transaction.
    pub const NO_MULTI: u32 = 1 << 10;
    /// respire's own, not Redis's: runs a script or a function ([`super::is_script`]).
    pub const SCRIPT: u32 = 1 << 30;

    pub(super) fn from_name(name: &[u8]) -> u32 {
        match name {
            b"write" => WRITE,
            b"readonly" => READONLY,
            b"admin" => ADMIN,
            b"pubsub" => PUBSUB,
            b"blocking" => BLOCKING,
            b"movablekeys" => MOVABLEKEYS,
            b"noscript" => NOSCRIPT,
            b"fast" => FAST,
            b"no_auth" => NO_AUTH,
            b"random" => RANDOM,
            b"no_multi" => NO_MULTI,
            _ => 0,
        }
    }
}

/// Where the search for a key specification's first key begins.
#[derive(Debug, Clone, PartialEq)]
enum BeginSearch {
    /// At this argument index.
    Index(i64),
    /// After this keyword, searched from `startfrom` (negative: from the end, backwards).
    Keyword { keyword: Bytes, startfrom: i64 },
    /// Not described: keys cannot be found from this spec.
    Unknown,
}

/// How the keys continue after the first one.
#[derive(Debug, Clone, PartialEq)]
enum FindKeys {
    /// Up to `lastkey` (relative to the first key; negative counts from the end, divided by `limit` when set).
    Range {
        lastkey: i64,
        keystep: i64,
        limit: i64,
    },
    /// A count of keys at `keynumidx` (relative), keys from `firstkey` (relative).
    Keynum {
        keynumidx: i64,
        firstkey: i64,
        keystep: i64,
    },
    /// Not described.
    Unknown,
}

/// One of a command's key specifications (Redis 7 `COMMAND` "key specs").
#[derive(Debug, Clone, PartialEq)]
struct KeySpec {
    begin: BeginSearch,
    find: FindKeys,
    /// [`access`] bits of the keys it finds.
    access: u8,
}

/// How a command uses a key (from its key spec's flags: `RO` reads, `OW`/`RM` write,
/// `RW` both; a spec without them is taken as both).
pub mod access {
    /// The key's value is read.
    pub const READ: u8 = 1;
    /// The key is written, overwritten or removed.
    pub const WRITE: u8 = 2;
}

/// Redis's ACL categories, in the order of the `category` flags of respire's plugin contract.
pub const CATEGORIES: [&str; 21] = [
    "keyspace",
    "read",
    "write",
    "set",
    "sortedset",
    "list",
    "hash",
    "string",
    "bitmap",
    "hyperloglog",
    "geo",
    "stream",
    "pubsub",
    "admin",
    "fast",
    "slow",
    "blocking",
    "dangerous",
    "connection",
    "transaction",
    "scripting",
];

/// The bit of a category in [`CommandInfo::category_bits`] (0 for an unknown one).
pub fn category_bit(name: &str) -> u32 {
    CATEGORIES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name.trim_start_matches('@')))
        .map_or(0, |i| 1 << i)
}

/// What Redis says about a command: arity, flags, categories and where its keys are.
#[derive(Debug, Clone)]
pub struct CommandInfo {
    /// Lower-case name (`get`, `client|list`).
    pub name: String,
    /// How much of `name` is the command's own name (`client` of `client|list`).
    command_len: usize,
    /// Redis arity: N exactly, or -N for at least N arguments (name included).
    pub arity: i64,
    /// See [`flags`].
    pub flags: u32,
    /// ACL categories without the `@` (`read`, `string`, `fast`, …).
    pub categories: Vec<String>,
    /// The same as bits (see [`CATEGORIES`]).
    pub category_bits: u32,
    key_specs: Vec<KeySpec>,
    /// The access of the one key at argument 1, when that is all the key specs say (`GET`,
    /// `SET`, `INCR`, `HSET` …: most commands): the keys are found without reading the specs.
    single_key: Option<u8>,
    /// (first, last, step) key positions from before key specs existed.
    legacy: (i64, i64, i64),
    subcommands: HashMap<Box<[u8]>, Arc<CommandInfo>>,
    /// How respire handles it (its command's, for a subcommand).
    pub spec: &'static Spec,
    /// For a subcommand, its place (from 1) among its command's subcommands in name order;
    /// 0 for a command (see [`CommandInfo::display_id`]).
    pub sub: u16,
    /// Its number for metrics labels (see [`CommandTable::number`]; subcommands share their
    /// command's); [`crate::stats::OTHER`] until numbered.
    pub id: u16,
}

/// The [`CommandInfo::display_id`] of no command (`cmd=NULL` in `CLIENT LIST`).
pub const NO_DISPLAY_ID: u32 = u32::MAX;

impl CommandInfo {
    /// A number naming this command or subcommand, for `CLIENT LIST`'s `cmd=` (see
    /// [`CommandTable::display_name`]): cheap to store per command.
    pub fn display_id(&self) -> u32 {
        (u32::from(self.id) << 16) | u32::from(self.sub)
    }

    /// The command's name: its own for a command, its container's for a subcommand (`client`
    /// of `client|list`).
    pub fn command_name(&self) -> &str {
        self.name.get(..self.command_len).unwrap_or(&self.name)
    }

    /// Its key and how it uses it, when its key specs say it has exactly one, at argument 1
    /// (see `single_key`); `None` otherwise, or when the argument is missing.
    pub fn only_key<'a, A: Args + ?Sized>(&self, args: &'a A) -> Option<(&'a [u8], u8)> {
        let access = self.single_key?;
        Some((args.argv(1)?, access))
    }

    /// Whether a flag bit is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Appends the positions of the keys in `args` to `out`, as Redis finds them.
    pub fn key_positions<A: Args + ?Sized>(&self, args: &A, out: &mut Vec<usize>) {
        self.for_each_key(args, |i, _| out.push(i));
    }

    /// Calls `f` with the position of every key in `args` and how the command uses it.
    pub fn for_each_key<A: Args + ?Sized>(&self, args: &A, mut f: impl FnMut(usize, u8)) {
        if self.single_key.is_some() {
            if let Some((_, access)) = self.only_key(args) {
                f(1, access);
            }
            return;
        }
        let argc = args.argc() as i64;
        if self.key_specs.is_empty() {
            let (first, last, step) = self.legacy;
            if first <= 0 || step <= 0 {
                return;
            }
            let how = if self.has(flags::WRITE) {
                access::READ | access::WRITE
            } else {
                access::READ
            };
            let last = if last < 0 { argc + last } else { last };
            let mut i = first;
            while i <= last && i < argc {
                f(i as usize, how);
                i += step;
            }
            return;
        }
        for spec in &self.key_specs {
            let first = match &spec.begin {
                BeginSearch::Index(i) => *i,
                BeginSearch::Keyword { keyword, startfrom } => {
                    let (start, end, dir) = if *startfrom >= 0 {
                        (*startfrom, argc - 1, 1)
                    } else {
                        (argc + startfrom, 1, -1)
                    };
                    let mut found = None;
                    let mut i = start;
                    loop {
                        if i < 1 || i >= argc {
                            break;
                        }
                        if args
                            .argv(i as usize)
                            .is_some_and(|a| a.eq_ignore_ascii_case(keyword))
                        {
                            found = Some(i + 1);
                            break;
                        }
                        if i == end {
                            break;
                        }
                        i += dir;
                    }
                    match found {
                        Some(f) => f,
                        None => continue,
                    }
                }
                BeginSearch::Unknown => continue,
            };
            let (first, last, step) = match &spec.find {
                FindKeys::Range {
                    lastkey,
                    keystep,
                    limit,
                } => {
                    let last = if *lastkey >= 0 {
                        first.saturating_add(*lastkey)
                    } else if *limit <= 1 {
                        argc.saturating_add(*lastkey)
                    } else {
                        first.saturating_add((argc - first) / limit + lastkey)
                    };
                    (first, last, *keystep)
                }
                FindKeys::Keynum {
                    keynumidx,
                    firstkey,
                    keystep,
                } => {
                    let idx = first.saturating_add(*keynumidx);
                    let Some(n) = args
                        .argv(idx.max(0) as usize)
                        .and_then(parse_i64)
                        .filter(|n| *n >= 0)
                    else {
                        continue;
                    };
                    let first = first.saturating_add(*firstkey);
                    // Client-supplied counts: saturate rather than overflow (keys past argc are ignored).
                    (
                        first,
                        first
                            .saturating_add(n.saturating_mul(*keystep.max(&1)))
                            .saturating_sub(1),
                        *keystep,
                    )
                }
                FindKeys::Unknown => continue,
            };
            if step <= 0 {
                continue;
            }
            let mut i = first;
            while i <= last && i < argc {
                if i >= 1 {
                    f(i as usize, spec.access);
                }
                i += step;
            }
        }
    }
}

/// Every command Redis describes, by lower-case name.
#[derive(Debug, Clone, Default)]
pub struct CommandTable {
    map: HashMap<Box<[u8]>, Arc<CommandInfo>>,
    /// Command names by number, once numbered.
    names: Vec<String>,
}

/// The `COMMAND` reply of Redis 7.0, used until a backend tells us its own.
static BUILTIN: &[u8] = include_bytes!("commands.resp");

impl CommandTable {
    /// The table of Redis 7.0 commands built into respire.
    pub fn builtin() -> CommandTable {
        CommandTable::from_reply(&Bytes::from_static(BUILTIN)).unwrap_or_default()
    }

    /// Builds a table from a `COMMAND` (or `COMMAND INFO`) reply.
    pub fn from_reply(frame: &Bytes) -> Option<CommandTable> {
        if reply_len(frame).ok()?? != frame.len() {
            return None;
        }
        let Value::Array(entries) = Value::parse(frame).ok()? else {
            return None;
        };
        let mut map = HashMap::default();
        for e in &entries {
            if let Some(info) = parse_info(e, None) {
                map.insert(info.name.as_bytes().into(), Arc::new(info));
            }
        }
        Some(CommandTable {
            map,
            names: Vec::new(),
        })
    }

    /// Adds or replaces the commands of `other` (the backend's own description wins).
    pub fn merge(&mut self, other: CommandTable) {
        self.map.extend(other.map);
    }

    /// Numbers the commands in name order (subcommands share their command's number) and
    /// returns the names by number: the bounded set of `command` labels in metrics.
    pub fn number(&mut self) -> Vec<String> {
        let mut names: Vec<Box<[u8]>> = self.map.keys().cloned().collect();
        names.sort();
        names.truncate(usize::from(crate::stats::OTHER) - 1);
        for (i, n) in names.iter().enumerate() {
            if let Some(info) = self.map.get_mut(n) {
                let info = Arc::make_mut(info);
                info.id = i as u16;
                let mut subs: Vec<Box<[u8]>> = info.subcommands.keys().cloned().collect();
                subs.sort();
                for (j, name) in subs.iter().enumerate() {
                    if let Some(sub) = info.subcommands.get_mut(name) {
                        let sub = Arc::make_mut(sub);
                        sub.id = i as u16;
                        sub.sub = u16::try_from(j + 1).unwrap_or(u16::MAX);
                    }
                }
            }
        }
        self.names = names
            .iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        self.names.clone()
    }

    /// The name (`get`, `client|list`) of a [`CommandInfo::display_id`], `NULL` for none.
    pub fn display_name(&self, display_id: u32) -> String {
        let (id, sub) = ((display_id >> 16) as usize, (display_id & 0xffff) as usize);
        let Some(name) = self.names.get(id) else {
            return "NULL".into();
        };
        if sub == 0 {
            return name.clone();
        }
        let Some(info) = self.map.get(name.as_bytes()) else {
            return name.clone();
        };
        info.subcommands
            .values()
            .find(|s| usize::from(s.sub) == sub)
            .map_or_else(|| name.clone(), |s| s.name.clone())
    }

    /// Number of top-level commands.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The description of the command in `args` (its subcommand's, for container commands).
    pub fn get<A: Args + ?Sized>(&self, args: &A) -> Option<&CommandInfo> {
        let info = self.map.get(lower(args.argv(0)?)?.as_slice())?;
        if !info.subcommands.is_empty() {
            if let Some(sub) = args.argv(1).and_then(lower) {
                if let Some(s) = info.subcommands.get(sub.as_slice()) {
                    return Some(s);
                }
            }
        }
        Some(info)
    }

    /// How respire handles the command in `args` and what Redis says about it, in one lookup.
    pub fn resolve<A: Args + ?Sized>(&self, args: &A) -> Resolved<'_> {
        match self.get(args) {
            Some(info) => Resolved {
                spec: info.spec,
                info: Some(info),
            },
            None => Resolved {
                spec: lookup(args.argv(0).unwrap_or_default()),
                info: None,
            },
        }
    }
}

/// The last command a client sent, as it spelled it, with what the table says of it: a client
/// mostly sends runs of one command (a pipeline of GETs), and comparing a few bytes costs a
/// fraction of a table lookup (hashing, probing and comparing the lower-cased name).
#[derive(Default)]
pub struct LastCommand {
    name: [u8; 16],
    len: u8,
    resolved: Option<Resolved<'static>>,
}

impl CommandTable {
    /// [`CommandTable::resolve`], answered from `last` when the client sent the same name (as
    /// spelled) and the command has no subcommands (whose entry depends on the next argument).
    pub fn resolve_again<A: Args + ?Sized>(
        &'static self,
        args: &A,
        last: &mut LastCommand,
    ) -> Resolved<'static> {
        let name = args.argv(0).unwrap_or_default();
        // Compared byte by byte: names are a few bytes, shorter than a `memcmp` call's set-up.
        if let Some(r) = last.resolved
            && usize::from(last.len) == name.len()
            && name.iter().zip(&last.name).all(|(a, b)| a == b)
        {
            return r;
        }
        let r = self.resolve(args);
        // Not a subcommand's entry either: the next one may name another subcommand.
        let cacheable = r
            .info
            .is_some_and(|i| i.subcommands.is_empty() && i.command_len == i.name.len())
            && name.len() <= 16;
        last.resolved = None;
        if cacheable {
            last.name[..name.len()].copy_from_slice(name);
            last.len = name.len() as u8;
            last.resolved = Some(r);
        }
        r
    }
}

/// Lower-cases a short name into a stack buffer (`None` if longer than any command name).
fn lower(name: &[u8]) -> Option<LowerName> {
    if name.len() > 48 {
        return None;
    }
    let mut buf = [0u8; 48];
    for (d, s) in buf.iter_mut().zip(name) {
        *d = s.to_ascii_lowercase();
    }
    Some(LowerName {
        buf,
        len: name.len(),
    })
}

struct LowerName {
    buf: [u8; 48],
    len: usize,
}

impl LowerName {
    fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn parse_info(v: &Value, parent: Option<&'static Spec>) -> Option<CommandInfo> {
    let Value::Array(f) = v else { return None };
    let name = String::from_utf8_lossy(f.first()?.as_bytes()?).to_lowercase();
    let spec = parent.unwrap_or_else(|| lookup(name.as_bytes()));
    let arity = f.get(1)?.as_int()?;
    let mut fl = 0;
    if let Some(Value::Array(items)) = f.get(2) {
        for i in items {
            if let Some(b) = i.as_bytes() {
                fl |= flags::from_name(&b.to_ascii_lowercase());
            }
        }
    }
    if is_script(name.as_bytes()) {
        fl |= flags::SCRIPT;
    }
    let legacy = (
        f.get(3).and_then(Value::as_int).unwrap_or(0),
        f.get(4).and_then(Value::as_int).unwrap_or(0),
        f.get(5).and_then(Value::as_int).unwrap_or(0),
    );
    let mut categories = Vec::new();
    if let Some(Value::Array(items)) = f.get(6) {
        for i in items {
            if let Some(b) = i.as_bytes() {
                categories.push(
                    String::from_utf8_lossy(b)
                        .trim_start_matches('@')
                        .to_lowercase(),
                );
            }
        }
    }
    let mut key_specs = Vec::new();
    if let Some(Value::Array(specs)) = f.get(8) {
        for spec in specs {
            key_specs.push(parse_key_spec(spec));
        }
    }
    let mut subcommands = HashMap::default();
    if let Some(Value::Array(subs)) = f.get(9) {
        for s in subs {
            if let Some(info) = parse_info(s, Some(spec)) {
                let short: Box<[u8]> = info
                    .name
                    .rsplit('|')
                    .next()
                    .unwrap_or(&info.name)
                    .as_bytes()
                    .into();
                subcommands.insert(short, Arc::new(info));
            }
        }
    }
    let category_bits = categories.iter().fold(0, |b, c| b | category_bit(c));
    let command_len = name.find('|').unwrap_or(name.len());
    let single_key = match key_specs.as_slice() {
        [
            KeySpec {
                begin: BeginSearch::Index(1),
                find:
                    FindKeys::Range {
                        lastkey: 0,
                        keystep,
                        ..
                    },
                access,
            },
        ] if *keystep > 0 => Some(*access),
        _ => None,
    };
    Some(CommandInfo {
        name,
        command_len,
        arity,
        flags: fl,
        categories,
        category_bits,
        key_specs,
        single_key,
        legacy,
        subcommands,
        spec,
        sub: 0,
        id: crate::stats::OTHER,
    })
}

fn parse_key_spec(spec: &Value) -> KeySpec {
    let int = |v: Option<&Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_int)
            .unwrap_or(0)
    };
    let kind = |v: Option<&Value>| {
        v.and_then(|v| v.get("type"))
            .and_then(|t| t.as_bytes())
            .map(|b| b.to_ascii_lowercase())
            .unwrap_or_default()
    };
    let bs = spec.get("begin_search");
    let bs_spec = bs.and_then(|b| b.get("spec"));
    let begin = match kind(bs).as_slice() {
        b"index" => BeginSearch::Index(int(bs_spec, "index")),
        b"keyword" => match bs_spec
            .and_then(|s| s.get("keyword"))
            .and_then(|k| k.as_bytes())
        {
            Some(kw) => BeginSearch::Keyword {
                keyword: kw.clone(),
                startfrom: int(bs_spec, "startfrom"),
            },
            None => BeginSearch::Unknown,
        },
        _ => BeginSearch::Unknown,
    };
    let fk = spec.get("find_keys");
    let fk_spec = fk.and_then(|f| f.get("spec"));
    let find = match kind(fk).as_slice() {
        b"range" => FindKeys::Range {
            lastkey: int(fk_spec, "lastkey"),
            keystep: int(fk_spec, "keystep"),
            limit: int(fk_spec, "limit"),
        },
        b"keynum" => FindKeys::Keynum {
            keynumidx: int(fk_spec, "keynumidx"),
            firstkey: int(fk_spec, "firstkey"),
            keystep: int(fk_spec, "keystep"),
        },
        _ => FindKeys::Unknown,
    };
    let mut access = 0;
    if let Some(Value::Array(fl)) = spec.get("flags") {
        for f in fl {
            match f.as_bytes().map(|b| b.to_ascii_uppercase()).as_deref() {
                Some(b"RO") => access |= access::READ,
                Some(b"RW") => access |= access::READ | access::WRITE,
                Some(b"OW") | Some(b"RM") => access |= access::WRITE,
                _ => {}
            }
        }
    }
    if access == 0 {
        access = access::READ | access::WRITE;
    }
    KeySpec {
        begin,
        find,
        access,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
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

    /// The last-command shortcut gives what a lookup gives, whatever came before: the same
    /// name, another spelling, a command with subcommands, an unknown command, a long name.
    #[test]
    fn resolving_again_gives_what_a_lookup_gives() {
        let t: &'static CommandTable = Box::leak(Box::new(CommandTable::builtin()));
        let mut last = LastCommand::default();
        let seq = [
            "GET k",
            "GET k",
            "get k",
            "SET k v",
            "CLIENT SETNAME x",
            "CLIENT INFO",
            "CLIENT INFO",
            "NOSUCH a",
            "NOSUCH a",
            "GET k",
            "OBJECT ENCODING k",
            "OBJECT FREQ k",
            "averyveryverylongcommandname a",
            "averyveryverylongcommandname a",
            "GEt k",
            "MULTI",
            "EXEC",
            "GETSET k v",
            "GET k",
        ];
        for cmd in seq {
            let args: Vec<Bytes> = cmd
                .split(' ')
                .map(|a| Bytes::copy_from_slice(a.as_bytes()))
                .collect();
            let want = t.resolve(&args);
            let got = t.resolve_again(&args, &mut last);
            assert!(std::ptr::eq(want.spec, got.spec), "{cmd}");
            match (want.info, got.info) {
                (Some(w), Some(g)) => assert!(std::ptr::eq(w, g), "{cmd}: {} {}", w.name, g.name),
                (None, None) => {}
                (w, g) => panic!("{cmd}: {w:?} {g:?}"),
            }
        }
    }

    /// The one-key shortcut finds what the key specs find, for every command it applies to and
    /// any number of arguments; and it applies to the common one-key commands.
    #[test]
    fn the_single_key_shortcut_agrees_with_the_key_specs() {
        let t = CommandTable::builtin();
        let mut checked = 0;
        let mut all: Vec<&CommandInfo> = Vec::new();
        for info in t.map.values() {
            all.push(info);
            all.extend(info.subcommands.values().map(|s| &**s));
        }
        for info in all {
            let Some(_) = info.single_key else { continue };
            let mut slow = info.clone();
            slow.single_key = None;
            for argc in 1..6 {
                let args: Vec<Bytes> = (0..argc).map(|i| Bytes::from(format!("a{i}"))).collect();
                let mut fast_keys = Vec::new();
                info.for_each_key(&args, |i, how| fast_keys.push((i, how)));
                let mut slow_keys = Vec::new();
                slow.for_each_key(&args, |i, how| slow_keys.push((i, how)));
                assert_eq!(fast_keys, slow_keys, "{} with {argc} arguments", info.name);
            }
            checked += 1;
        }
        assert!(checked > 100, "{checked}");
        for name in ["get", "set", "incr", "hset", "lpush", "expire", "zadd"] {
            let info = t.get(&vec![Bytes::from(name)]).unwrap();
            assert!(info.single_key.is_some(), "{name}");
        }
        for name in ["mget", "mset", "del", "eval", "xread", "publish"] {
            let info = t.get(&vec![Bytes::from(name)]).unwrap();
            assert!(info.single_key.is_none(), "{name}");
        }
    }

    fn keys(table: &CommandTable, cmd: &str) -> Vec<String> {
        let args: Vec<Bytes> = cmd
            .split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect();
        let mut pos = Vec::new();
        table.get(&args).unwrap().key_positions(&args, &mut pos);
        pos.iter()
            .map(|&i| String::from_utf8_lossy(&args[i]).into_owned())
            .collect()
    }

    #[test]
    fn key_positions_follow_redis_key_specs() {
        let t = CommandTable::builtin();
        assert!(t.len() > 200, "{}", t.len());
        assert_eq!(keys(&t, "GET k"), ["k"]);
        assert_eq!(keys(&t, "MSET a 1 b 2"), ["a", "b"]);
        assert_eq!(keys(&t, "DEL a b c"), ["a", "b", "c"]);
        assert_eq!(keys(&t, "EVAL s 2 k1 k2 arg"), ["k1", "k2"]);
        assert_eq!(keys(&t, "EVAL s 0 arg"), Vec::<String>::new());
        assert_eq!(keys(&t, "XREAD COUNT 1 STREAMS s1 s2 0 0"), ["s1", "s2"]);
        assert_eq!(keys(&t, "XREADGROUP GROUP g c STREAMS s1 >"), ["s1"]);
        assert_eq!(
            keys(&t, "ZUNIONSTORE dst 2 a b WEIGHTS 1 2"),
            ["dst", "a", "b"]
        );
        assert_eq!(keys(&t, "BLMPOP 0 2 a b LEFT"), ["a", "b"]);
        assert_eq!(keys(&t, "OBJECT ENCODING k"), ["k"]);
        assert_eq!(keys(&t, "XINFO STREAM s"), ["s"]);
        assert_eq!(keys(&t, "LMOVE a b LEFT RIGHT"), ["a", "b"]);
        assert_eq!(keys(&t, "SET k v EX 10"), ["k"]);
        assert_eq!(keys(&t, "PING"), Vec::<String>::new());
        assert_eq!(keys(&t, "EVAL s 9223372036854775807 k"), ["k"]);
        assert_eq!(keys(&t, "EVAL s -3 k"), Vec::<String>::new());
        let get = t.get(&[Bytes::from("GeT")][..]).unwrap();
        assert!(get.has(flags::READONLY) && !get.has(flags::WRITE));
        assert!(get.categories.iter().any(|c| c == "read"));
        assert_eq!(
            t.get(&[Bytes::from("client"), Bytes::from("LIST")][..])
                .unwrap()
                .name,
            "client|list"
        );
    }

    #[test]
    fn scripts_and_functions_are_told_apart() {
        for n in [
            "EVAL",
            "evalsha",
            "Eval_Ro",
            "EVALSHA_RO",
            "fcall",
            "FCALL_RO",
        ] {
            assert!(is_script(n.as_bytes()), "{n}");
        }
        for n in [
            "", "e", "evals", "exec", "function", "fcal", "get", "script",
        ] {
            assert!(!is_script(n.as_bytes()), "{n}");
        }
        // The table flags them, whatever Redis says of them.
        let t = CommandTable::builtin();
        for n in ["eval", "evalsha_ro", "fcall"] {
            let cmd = crate::protocol::Command::from_args(&[n, "x", "0"]);
            assert!(t.resolve(&cmd).has(flags::SCRIPT), "{n}");
        }
        let get = crate::protocol::Command::from_args(&["GET", "k"]);
        assert!(!t.resolve(&get).has(flags::SCRIPT));
    }

    #[test]
    fn xread_block_detection() {
        let cmd = |s: &str| Command::from_args(&s.split(' ').collect::<Vec<_>>());
        assert!(has_block_option(&cmd("XREAD COUNT 1 BLOCK 0 STREAMS s $")));
        assert!(!has_block_option(&cmd("XREAD STREAMS block $")));
    }
}
