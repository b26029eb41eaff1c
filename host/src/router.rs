//! Routing decisions over several shards, and merging of split replies.
//!
//! Pure functions: given a command, the command table and a topology, decide
//! where it goes ([`plan`]); given the replies of the parts, build the one
//! reply a single Redis would have given ([`merge`]). The session does the I/O.
//!
//! - Single-slot commands go to the master of their slot; keyless ones to any
//!   master. Multi-key commands whose keys hash to different slots get Redis
//!   Cluster's own `-CROSSSLOT` error, except the ones respire splits.
//! - Split and merge: `MGET`, `MSET`, `DEL`, `UNLINK`, `EXISTS`, `TOUCH` —
//!   one sub-command per slot, replies merged in key order.
//! - Fan-out with aggregation: `DBSIZE`, `KEYS`, `FLUSHALL`, `FLUSHDB`,
//!   `RANDOMKEY`, `SCRIPT LOAD|EXISTS|FLUSH`, `FUNCTION LOAD|DELETE|FLUSH|RESTORE`,
//!   `CONFIG SET|RESETSTAT|REWRITE`,
//!   `PUBSUB CHANNELS|NUMSUB|NUMPAT|SHARDCHANNELS|SHARDNUMSUB`, `INFO`.
//! - `SCAN` walks the masters one after the other behind one cursor: the low
//!   10 bits name the master (in address order), the rest is that master's cursor.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use crate::commands::CommandInfo;
use crate::protocol::{self as resp, Args, Value, parse_i64, reply_len_fast};
use crate::topology::{Topology, key_slot};

/// Redis Cluster's error for keys in different slots.
pub const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";
/// Bits of a `SCAN` cursor that name the master.
const SCAN_NODE_BITS: u32 = 10;

/// How to combine the replies of a split or fanned-out command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// `MGET`: values placed back in key order; `n` keys in all.
    Mget(usize),
    /// Every part must say `+OK`.
    AllOk,
    /// `+OK` if one part says so, the first reply otherwise (`SCRIPT KILL` on every master:
    /// one of them runs the script).
    AnyOk,
    /// Integers added up.
    SumInt,
    /// The least integer (`LASTSAVE`: when every master had saved).
    MinInt,
    /// Arrays concatenated.
    Concat,
    /// A reply that is not nil, the masters taken in turn (`RANDOMKEY`).
    FirstNonNil,
    /// The first reply (all parts did the same thing).
    First,
    /// `LATENCY HISTOGRAM`: per command, the calls added up and the cumulative bucket counts
    /// combined.
    LatencyHistogram,
    /// Arrays of 0/1 combined element-wise: 1 only where every part says 1.
    AndInts,
    /// Arrays merged without duplicates.
    Union,
    /// Flat `[name, count, …]` pairs (or maps) with counts added per name.
    SumPairs,
    /// [`Merge::SumInt`], plus a correction (a receiver count: `PUBLISH`).
    SumIntPlus(i64),
    /// [`Merge::SumPairs`], plus a correction for each name given (encoded as a bulk string):
    /// subscriber counts, `PUBSUB NUMSUB`.
    SumPairsPlus(Vec<(Bytes, i64)>),
    /// `INFO`: the first node's text with the keyspace section added up, its sections named
    /// in `replaced` left out and `ours` (respire's sections) put before the keyspace.
    Info {
        /// respire's sections, each ending with a blank line.
        ours: Arc<str>,
        /// Lower-case names of Redis's sections that `ours` replaces.
        replaced: Vec<String>,
    },
    /// `SCAN` on master `ordinal` of `total`, and the masters after it when the replies
    /// include theirs: the replies are taken in order while each master finished (cursor 0),
    /// the keys put together, and the cursor of the last one taken is re-encoded. One Redis
    /// returns a small keyspace in one call; so does respire over several masters, instead
    /// of an empty page per master that holds none of the keys matched.
    Scan {
        /// Which master (in address order) answered first.
        ordinal: usize,
        /// How many masters there are.
        total: usize,
    },
}

/// One sub-command of a split.
#[derive(Debug, Clone)]
pub struct Part {
    /// The slot its keys hash to.
    pub slot: u16,
    /// The sub-command, encoded.
    pub data: Bytes,
    /// For `MGET`: where each of its keys' values goes in the merged reply.
    pub positions: SmallVec<[u32; 8]>,
}

/// Where a command goes.
#[derive(Debug, Clone)]
pub enum Plan {
    /// To the master of `slot`, or any master when `None` (keyless).
    Single(Option<u16>),
    /// Refused with this error.
    Error(String),
    /// One sub-command per slot (or per shard over standalone servers), merged; the parts'
    /// data lie back to back, in order, in the third field, so that a node's consecutive
    /// parts can go to it as one request. Over a cluster the parts come grouped by shard.
    Split(Merge, Vec<Part>, Bytes),
    /// The same command to every master, merged.
    FanOut(Merge),
    /// `SCAN`: master `ordinal` with this (rewritten) command.
    Scan {
        /// Which master, in address order.
        ordinal: usize,
        /// The command with the master's own cursor.
        data: Bytes,
        /// The cursor starts that master: the masters after it get the same command (cursor
        /// 0 for them too), so that a master finished in one call is followed by the next
        /// in the same reply (see [`Merge::Scan`]).
        chain: bool,
    },
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Whether a command every master runs goes to the replicas too, their replies not waited
/// for: `CONFIG SET`, so that a replica a failover promotes has the settings made through
/// respire (Redis does not replicate them).
pub fn replicas_too<A: Args + ?Sized>(args: &A) -> bool {
    args.argv(0).is_some_and(|n| eq(n, "config")) && args.argv(1).is_some_and(|s| eq(s, "set"))
}

/// The merge of a keyless command that every master must run, if it is one.
fn fan_out(name: &[u8], sub: &[u8]) -> Option<Merge> {
    if eq(name, "dbsize") {
        Some(Merge::SumInt)
    } else if eq(name, "keys") {
        Some(Merge::Concat)
    } else if eq(name, "flushall") || eq(name, "flushdb") {
        Some(Merge::AllOk)
    } else if eq(name, "randomkey") {
        Some(Merge::FirstNonNil)
    } else if eq(name, "bgsave") || eq(name, "bgrewriteaof") {
        // Persistence is each master's, of its own keys: all of them save (and `DEBUG
        // LOADAOF`, which every master runs, needs each one's AOF).
        Some(Merge::First)
    } else if eq(name, "save") {
        Some(Merge::AllOk)
    } else if eq(name, "lastsave") {
        Some(Merge::MinInt)
    } else if eq(name, "info") {
        Some(Merge::Info {
            ours: Arc::from(""),
            replaced: Vec::new(),
        })
    } else if eq(name, "script") {
        if eq(sub, "load") {
            Some(Merge::First)
        } else if eq(sub, "exists") {
            Some(Merge::AndInts)
        } else if eq(sub, "flush") {
            Some(Merge::AllOk)
        } else {
            None
        }
    } else if eq(name, "config") {
        // Settings hold for the whole keyspace (encodings, limits, the slow log): every master.
        if eq(sub, "set") || eq(sub, "resetstat") || eq(sub, "rewrite") {
            Some(Merge::AllOk)
        } else {
            None
        }
    } else if eq(name, "function") {
        if eq(sub, "load") || eq(sub, "delete") || eq(sub, "restore") {
            Some(Merge::First)
        } else if eq(sub, "flush") {
            Some(Merge::AllOk)
        } else {
            None
        }
    } else if eq(name, "latency") {
        if eq(sub, "histogram") {
            Some(Merge::LatencyHistogram)
        } else if eq(sub, "latest") {
            // Each master's latest events, one after the other.
            Some(Merge::Concat)
        } else if eq(sub, "reset") {
            Some(Merge::SumInt)
        } else {
            None
        }
    } else if eq(name, "debug") {
        // Settings and reloads: every master's keyspace.
        let all = [
            "set-active-expire",
            "quicklist-packed-threshold",
            "set-skip-checksum-validation",
            "set-disable-deny-scripts",
            "replybuffer",
            "pause-cron",
            "reload",
            "loadaof",
        ];
        all.iter().any(|a| eq(sub, a)).then_some(Merge::AllOk)
    } else if eq(name, "pubsub") {
        if eq(sub, "channels") || eq(sub, "shardchannels") {
            Some(Merge::Union)
        } else if eq(sub, "numsub") || eq(sub, "shardnumsub") {
            Some(Merge::SumPairs)
        } else if eq(sub, "numpat") {
            Some(Merge::SumInt)
        } else {
            None
        }
    } else {
        None
    }
}

/// `DEBUG` subcommands about keys go to the keys' node (`OBJECT`, `SDSLEN`, `LISTPACK`,
/// `QUICKLIST`, `DIGEST-VALUE`); the others run anywhere (`None`), except the settings that
/// hold for the whole keyspace, which every master takes (see [`fan_out`]).
fn plan_debug<A: Args + ?Sized>(args: &A) -> Option<Plan> {
    let sub = args.argv(1)?;
    let keyed = ["object", "sdslen", "listpack", "quicklist", "digest-value"];
    if !keyed.iter().any(|k| eq(sub, k)) || args.argc() < 3 {
        return None;
    }
    let first = key_slot(args.argv(2)?);
    if (3..args.argc()).any(|i| key_slot(args.argv(i).unwrap_or_default()) != first) {
        return Some(Plan::Error(CROSSSLOT.to_string()));
    }
    Some(Plan::Single(Some(first)))
}

/// Decides where `args` go over a topology with several masters (or a cluster); `info` is
/// the command's description from the command table, if it has one.
pub fn plan<A: Args + ?Sized>(args: &A, info: Option<&CommandInfo>, topo: &Topology) -> Plan {
    // The commonest case first: one key, at argument 1.
    if let Some((key, _)) = info.and_then(|i| i.only_key(args)) {
        return Plan::Single(Some(key_slot(key)));
    }
    let name = args.argv(0).unwrap_or_default();
    let masters = topo.shards.len();
    // Key-based routing: the common case, decided from the key positions alone.
    // Sixteen inline: an `MGET` or `DEL` of ten keys needs no allocation.
    let mut keys: SmallVec<[(usize, u16); 16]> = SmallVec::new();
    let mut same = true;
    if let Some(info) = info {
        let mut first = None;
        info.for_each_key(args, |p, _| {
            let slot = key_slot(args.argv(p).unwrap_or_default());
            same &= *first.get_or_insert(slot) == slot;
            keys.push((p, slot));
        });
    }
    if let Some(&(_, first)) = keys.first() {
        if same {
            return Plan::Single(Some(first));
        }
        // Keys in several slots: split the commands a single Redis would run key by key.
        if eq(name, "mget") {
            return split_keys(args, &keys, Merge::Mget(keys.len()), 1, topo);
        }
        if eq(name, "del") || eq(name, "unlink") || eq(name, "exists") || eq(name, "touch") {
            return split_keys(args, &keys, Merge::SumInt, 1, topo);
        }
        if eq(name, "mset") && args.argc() % 2 == 1 {
            return split_keys(args, &keys, Merge::AllOk, 2, topo);
        }
        return Plan::Error(CROSSSLOT.to_string());
    }
    // `DEBUG`: Redis's table gives it no keys, but some subcommands take some.
    if eq(name, "debug") {
        if let Some(plan) = plan_debug(args) {
            return plan;
        }
    }
    // Keyless: fan-out commands go to every master.
    if let Some(m) = fan_out(name, args.argv(1).unwrap_or_default()) {
        return if masters > 1 {
            Plan::FanOut(m)
        } else {
            Plan::Single(None)
        };
    }
    if eq(name, "scan") {
        return plan_scan(args, masters);
    }
    Plan::Single(None)
}

/// Groups keys (each followed by `width - 1` values) into sub-commands: one per slot over a
/// Redis Cluster (which refuses keys of several slots in one command, even on one node), one
/// per shard over standalone servers (which do not care about slots: fewer commands for
/// Redis to run and fewer replies to merge). `keys` are the keys' positions and slots.
/// Every sub-command is encoded into one buffer and split off it (one allocation); the parts
/// are built in place, with their data filled in once it is encoded.
fn split_keys<A: Args + ?Sized>(
    args: &A,
    keys: &[(usize, u16)],
    merge: Merge,
    width: usize,
    topo: &Topology,
) -> Plan {
    let arg = |i: usize| args.argv(i).unwrap_or_default();
    let by_slot = topo.kind == crate::topology::BackendKind::Cluster;
    // The group of a slot: over a cluster the slot, with the shard above it (sorted by it,
    // a shard's parts come together); over standalone servers the shard.
    let group_of = |slot: u16| -> u32 {
        let shard = topo.slots.get(usize::from(slot)).copied();
        if by_slot {
            u32::from(shard.unwrap_or(u16::MAX)) << 16 | u32::from(slot)
        } else {
            shard.map_or(u32::from(slot) | 1 << 20, u32::from)
        }
    };
    // Room for every part at once: at most one per key, and over standalone servers one per
    // server.
    let most = if by_slot {
        keys.len()
    } else {
        keys.len().min(topo.shards.len() + 1)
    };
    let mut parts: Vec<Part> = Vec::with_capacity(most);
    // Each group's part: found by a scan among a few, through a map among many (over a
    // cluster an `MGET` of thousands of keys has thousands of slots).
    let mut groups: SmallVec<[u32; 16]> = SmallVec::new();
    let mut index: Option<rustc_hash::FxHashMap<u32, usize>> = (most > 32)
        .then(|| rustc_hash::FxHashMap::with_capacity_and_hasher(most, Default::default()));
    let mut size = 0;
    for (i, &(p, slot)) in keys.iter().enumerate() {
        size += (0..width).map(|w| arg(p + w).len() + 16).sum::<usize>();
        let group = group_of(slot);
        let at = match &index {
            Some(map) => map.get(&group).copied(),
            None => groups.iter().position(|&g| g == group),
        };
        match at.and_then(|at| parts.get_mut(at)) {
            Some(part) => part.positions.push(i as u32),
            None => {
                match &mut index {
                    Some(map) => {
                        map.insert(group, parts.len());
                    }
                    None => groups.push(group),
                }
                parts.push(Part {
                    slot,
                    data: Bytes::new(),
                    positions: SmallVec::from_slice(&[i as u32]),
                });
            }
        }
    }
    if by_slot {
        parts.sort_unstable_by_key(|part| group_of(part.slot));
    }
    let name = arg(0);
    let mut out = BytesMut::with_capacity(size + parts.len() * (name.len() + 32));
    let mut ends: SmallVec<[usize; 16]> = SmallVec::with_capacity(parts.len());
    for part in &parts {
        resp::array_header(&mut out, 1 + part.positions.len() * width);
        resp::bulk(&mut out, name);
        for &i in &part.positions {
            let p = keys.get(i as usize).map_or(0, |k| k.0);
            for w in 0..width {
                resp::bulk(&mut out, arg(p + w));
            }
        }
        ends.push(out.len());
    }
    let all = out.freeze();
    let mut start = 0;
    for (part, end) in parts.iter_mut().zip(ends) {
        part.data = all.slice(start..end);
        start = end;
    }
    Plan::Split(merge, parts, all)
}

fn plan_scan<A: Args + ?Sized>(args: &A, masters: usize) -> Plan {
    let Some(cursor) = args.argv(1) else {
        return Plan::Error("ERR wrong number of arguments for 'scan' command".into());
    };
    let Some(cursor) = std::str::from_utf8(cursor)
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
    else {
        return Plan::Error("ERR invalid cursor".into());
    };
    let ordinal = (cursor & ((1 << SCAN_NODE_BITS) - 1)) as usize;
    let node_cursor = cursor >> SCAN_NODE_BITS;
    if ordinal >= masters {
        return Plan::Error("ERR invalid cursor".into());
    }
    let mut sub: Vec<&[u8]> = (0..args.argc())
        .map(|i| args.argv(i).unwrap_or_default())
        .collect();
    let c = node_cursor.to_string();
    sub[1] = c.as_bytes();
    let mut out = BytesMut::new();
    resp::encode_args(&mut out, &sub);
    Plan::Scan {
        ordinal,
        data: out.freeze(),
        chain: node_cursor == 0,
    }
}

/// Where the elements of an array reply of `n` elements start (`None` if it is not one).
fn array_body(frame: &[u8], n: usize) -> Option<usize> {
    if !matches!(frame.first(), Some(b'*' | b'~')) {
        return None;
    }
    let eol = frame.iter().position(|&b| b == b'\r')?;
    (parse_i64(&frame[1..eol])? == n as i64).then_some(eol + 2)
}

/// Splits an aggregate reply into its raw elements; `None` for non-aggregates.
/// Map entries count as two elements.
pub fn elements(frame: &Bytes) -> Option<(u8, Vec<Bytes>)> {
    let kind = *frame.first()?;
    if !matches!(kind, b'*' | b'~' | b'%' | b'>') {
        return None;
    }
    let eol = frame.iter().position(|&b| b == b'\r')?;
    let n = parse_i64(&frame[1..eol])?;
    let n = if kind == b'%' { n * 2 } else { n };
    let mut out = Vec::with_capacity(n.max(0) as usize);
    let mut pos = eol + 2;
    for _ in 0..n.max(0) {
        let len = reply_len_fast(&frame[pos..]).ok()??;
        out.push(frame.slice(pos..pos + len));
        pos += len;
    }
    Some((kind, out))
}

fn is_error(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b'-') | Some(b'!'))
}

fn is_nil(frame: &[u8]) -> bool {
    frame == b"$-1\r\n" || frame == b"*-1\r\n" || frame == b"_\r\n"
}

fn int_of(frame: &[u8]) -> Option<i64> {
    if frame.first() != Some(&b':') {
        return None;
    }
    parse_i64(frame.get(1..frame.len().checked_sub(2)?)?)
}

fn header(kind: u8, n: usize) -> BytesMut {
    let mut out = BytesMut::new();
    out.extend_from_slice(format!("{}{}\r\n", kind as char, n).as_bytes());
    out
}

/// Combines the parts' replies (in part order) into one reply; a part's error
/// reply becomes the whole reply, as a cluster client would report it.
pub fn merge(how: &Merge, replies: &[Bytes], parts: &[Part]) -> Bytes {
    // An error from one part is the reply (but for `AnyOk`, where the others' errors are
    // expected, and `Scan`, where only the pages taken count).
    if !matches!(how, Merge::AnyOk | Merge::Scan { .. })
        && let Some(e) = replies.iter().find(|r| is_error(r))
    {
        return e.clone();
    }
    let bad =
        || Bytes::from_static(b"-ERR respire: unexpected reply from a backend while merging\r\n");
    match how {
        Merge::Mget(n) => {
            // Where each value lies: (reply, start, end), by key position.
            let mut at: SmallVec<[(u32, u32, u32); 16]> = SmallVec::from_elem((u32::MAX, 0, 0), *n);
            let mut total = 16;
            for (ri, (r, part)) in replies.iter().zip(parts).enumerate() {
                let Some(mut pos) = array_body(r, part.positions.len()) else {
                    return bad();
                };
                for &k in &part.positions {
                    let Some(len) = reply_len_fast(r.get(pos..).unwrap_or_default())
                        .ok()
                        .flatten()
                    else {
                        return bad();
                    };
                    let Some(slot) = at.get_mut(k as usize) else {
                        return bad();
                    };
                    *slot = (ri as u32, pos as u32, (pos + len) as u32);
                    total += len;
                    pos += len;
                }
            }
            let mut out = BytesMut::with_capacity(total);
            resp::array_header(&mut out, *n);
            for &(ri, s, e) in &at {
                match replies
                    .get(ri as usize)
                    .and_then(|r| r.get(s as usize..e as usize))
                {
                    Some(v) => out.extend_from_slice(v),
                    None => return bad(),
                }
            }
            out.freeze()
        }
        Merge::AllOk => match replies.iter().find(|r| r.as_ref() != b"+OK\r\n") {
            Some(r) => r.clone(),
            None => Bytes::from_static(b"+OK\r\n"),
        },
        Merge::SumInt | Merge::SumIntPlus(_) => {
            let mut sum = 0i64;
            for r in replies {
                match int_of(r) {
                    Some(n) => sum = sum.saturating_add(n),
                    None => return bad(),
                }
            }
            if let Merge::SumIntPlus(d) = how {
                sum = sum.saturating_add(*d).max(0);
            }
            let mut out = BytesMut::new();
            resp::int(&mut out, sum);
            out.freeze()
        }
        Merge::MinInt => {
            let mut least: Option<i64> = None;
            for r in replies {
                match int_of(r) {
                    Some(n) => least = Some(least.map_or(n, |l| l.min(n))),
                    None => return bad(),
                }
            }
            let mut out = BytesMut::new();
            resp::int(&mut out, least.unwrap_or(0));
            out.freeze()
        }
        Merge::Concat | Merge::Union => {
            let mut all: Vec<Bytes> = Vec::new();
            let mut kind = b'*';
            for r in replies {
                let Some((k, elems)) = elements(r) else {
                    return bad();
                };
                kind = k;
                for e in elems {
                    if *how == Merge::Concat || !all.contains(&e) {
                        all.push(e);
                    }
                }
            }
            let mut out = header(kind, all.len());
            for e in all {
                out.extend_from_slice(&e);
            }
            out.freeze()
        }
        Merge::FirstNonNil => {
            // Starting from another master each time: a key of every master can come up.
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let start = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let n = replies.len().max(1);
            (0..replies.len())
                .filter_map(|i| replies.get((start + i) % n))
                .find(|r| !is_nil(r))
                .or(replies.first())
                .cloned()
                .unwrap_or_else(bad)
        }
        Merge::First => replies.first().cloned().unwrap_or_else(bad),
        Merge::AnyOk => replies
            .iter()
            .find(|r| r.as_ref() == b"+OK\r\n")
            .or(replies.first())
            .cloned()
            .unwrap_or_else(bad),
        Merge::AndInts => {
            let mut acc: Option<Vec<i64>> = None;
            for r in replies {
                let Some((_, elems)) = elements(r) else {
                    return bad();
                };
                let ints: Option<Vec<i64>> = elems.iter().map(|e| int_of(e)).collect();
                let Some(ints) = ints else { return bad() };
                acc = Some(match acc {
                    None => ints,
                    Some(a) => a.iter().zip(&ints).map(|(x, y)| (*x).min(*y)).collect(),
                });
            }
            let acc = acc.unwrap_or_default();
            let mut out = header(b'*', acc.len());
            for v in acc {
                resp::int(&mut out, v);
            }
            out.freeze()
        }
        Merge::SumPairs | Merge::SumPairsPlus(_) => {
            let mut pairs: Vec<(Bytes, i64)> = Vec::new();
            let mut kind = b'*';
            for r in replies {
                let Some((k, elems)) = elements(r) else {
                    return bad();
                };
                kind = k;
                for c in elems.chunks(2) {
                    let [name, count] = c else { return bad() };
                    let Some(n) = int_of(count) else { return bad() };
                    match pairs.iter_mut().find(|p| p.0 == name) {
                        Some(p) => p.1 += n,
                        None => pairs.push((name.clone(), n)),
                    }
                }
            }
            if let Merge::SumPairsPlus(plus) = how {
                for (name, n) in &mut pairs {
                    if let Some((_, d)) = plus.iter().find(|p| p.0 == *name) {
                        *n = (*n + d).max(0);
                    }
                }
            }
            let mut out = if kind == b'%' {
                header(b'%', pairs.len())
            } else {
                header(kind, pairs.len() * 2)
            };
            for (name, n) in pairs {
                out.extend_from_slice(&name);
                resp::int(&mut out, n);
            }
            out.freeze()
        }
        Merge::Info { ours, replaced } => merge_info(replies, ours, replaced).unwrap_or_else(bad),
        Merge::LatencyHistogram => merge_latency_histograms(replies).unwrap_or_else(bad),
        Merge::Scan { ordinal, total } => {
            let mut keys: SmallVec<[Bytes; 4]> = SmallVec::new();
            let mut count = 0;
            let mut next = 0;
            for (i, r) in replies.iter().enumerate() {
                if is_error(r) {
                    return r.clone();
                }
                let Some((cursor, n, elems)) = scan_page(r) else {
                    return bad();
                };
                keys.push(elems);
                count += n;
                let ordinal = ordinal + i;
                if cursor > u64::MAX >> SCAN_NODE_BITS {
                    // Does not fit beside the master's number: an error, not a cursor that skips keys.
                    return Bytes::from_static(b"-ERR respire: a backend's SCAN cursor is too large to combine with the shard number\r\n");
                }
                if cursor != 0 {
                    // This master has more: later masters' pages wait for their turn.
                    next = (cursor << SCAN_NODE_BITS) | ordinal as u64;
                    break;
                }
                next = if ordinal + 1 < *total {
                    (ordinal + 1) as u64
                } else {
                    0
                };
            }
            let mut out = header(b'*', 2);
            resp::bulk(&mut out, next.to_string().as_bytes());
            out.extend_from_slice(&header(b'*', count));
            for k in keys {
                out.extend_from_slice(&k);
            }
            out.freeze()
        }
    }
}

/// A `SCAN` reply's cursor, its count of keys and their frames back to back.
fn scan_page(frame: &Bytes) -> Option<(u64, usize, Bytes)> {
    let (_, elems) = elements(frame)?;
    let [cursor, keys] = elems.as_slice() else {
        return None;
    };
    let text = cursor.get(
        cursor
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + 1)
            .unwrap_or(0)..cursor.len().saturating_sub(2),
    )?;
    let cursor = std::str::from_utf8(text).ok()?.parse::<u64>().ok()?;
    let eol = memchr::memchr(b'\r', keys)?;
    let n = usize::try_from(parse_i64(keys.get(1..eol)?)?).ok()?;
    let body = array_body(keys, n)?;
    Some((cursor, n, keys.slice(body..)))
}

/// The pairs of a map, or of a flat array of alternating keys and values (RESP2).
fn pairs(v: &Value) -> Option<Vec<(&Value, &Value)>> {
    match v {
        Value::Map(p) => Some(p.iter().map(|(k, v)| (k, v)).collect()),
        Value::Array(items) if items.len() % 2 == 0 => {
            Some(items.chunks(2).map(|c| (&c[0], &c[1])).collect())
        }
        _ => None,
    }
}

/// `LATENCY HISTOGRAM` from every master as one: per command (in the order first seen), the
/// calls added up and each bucket's cumulative count the sum of every master's count at or
/// below that bucket.
fn merge_latency_histograms(replies: &[Bytes]) -> Option<Bytes> {
    type Buckets = Vec<(i64, i64)>;
    let proto = if replies.first()?.first() == Some(&b'%') {
        3
    } else {
        2
    };
    let mut commands: Vec<(Bytes, i64, Vec<Buckets>)> = Vec::new();
    for r in replies {
        let v = Value::parse(r).ok()?;
        for (name, details) in pairs(&v)? {
            let name = name.as_bytes()?.clone();
            let calls = details.get("calls")?.as_int()?;
            let buckets: Buckets = pairs(details.get("histogram_usec")?)?
                .into_iter()
                .map(|(b, n)| Some((b.as_int()?, n.as_int()?)))
                .collect::<Option<_>>()?;
            match commands.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, c, h)) => {
                    *c += calls;
                    h.push(buckets);
                }
                None => commands.push((name, calls, vec![buckets])),
            }
        }
    }
    let mut out = BytesMut::new();
    resp::map_header(&mut out, commands.len(), proto);
    for (name, calls, histograms) in &commands {
        let mut bounds: Vec<i64> = histograms.iter().flatten().map(|&(b, _)| b).collect();
        bounds.sort_unstable();
        bounds.dedup();
        resp::bulk(&mut out, name);
        resp::map_header(&mut out, 2, proto);
        resp::bulk(&mut out, b"calls");
        resp::int(&mut out, *calls);
        resp::bulk(&mut out, b"histogram_usec");
        resp::map_header(&mut out, bounds.len(), proto);
        for b in bounds {
            // A master's count at the highest bucket not above `b` (its buckets ascend).
            let n: i64 = histograms
                .iter()
                .map(|h| {
                    h.iter()
                        .take_while(|&&(hb, _)| hb <= b)
                        .last()
                        .map_or(0, |&(_, n)| n)
                })
                .sum();
            resp::int(&mut out, b);
            resp::int(&mut out, n);
        }
    }
    Some(out.freeze())
}

/// `INFO` persistence fields of work in progress: over several masters, the highest (in
/// progress if it is on any), so that a client waiting for a rewrite or a save to end waits
/// for all of them.
const IN_PROGRESS: &[&str] = &[
    "loading",
    "async_loading",
    "rdb_bgsave_in_progress",
    "aof_rewrite_in_progress",
    "aof_rewrite_scheduled",
    "module_fork_in_progress",
];

/// `INFO stats` counters that add up over several masters: each master counts its own
/// commands, keys and errors. The section's other fields are the first master's.
const ADDED_UP: &[&str] = &[
    "total_commands_processed",
    "instantaneous_ops_per_sec",
    "total_error_replies",
    "unexpected_error_replies",
    "expired_keys",
    "expired_time_cap_reached_count",
    "evicted_keys",
    "evicted_clients",
    "keyspace_hits",
    "keyspace_misses",
    "total_reads_processed",
    "total_writes_processed",
    "total_forks",
    "expire_cycle_cpu_milliseconds",
    "dump_payload_sanitizations",
];

/// Fields of other sections that add up over several masters, by section: each master's
/// changes since its last save, and the memory of its share of the keyspace (a client
/// watching `used_memory` after writing or freeing keys sees its own keys' memory).
const ADDED_UP_IN: &[(&str, &[&str])] = &[
    ("stats", ADDED_UP),
    ("persistence", &["rdb_changes_since_last_save"]),
    (
        "memory",
        &[
            "used_memory",
            "used_memory_rss",
            "used_memory_peak",
            "used_memory_overhead",
            "used_memory_dataset",
            "lazyfree_pending_objects",
            "lazyfreed_objects",
        ],
    ),
];

/// The name of field `k` of `section` if it adds up over masters ([`ADDED_UP_IN`]).
fn added_up(section: &str, k: &str) -> Option<&'static str> {
    ADDED_UP_IN
        .iter()
        .find(|(s, _)| *s == section)
        .and_then(|(_, fields)| fields.iter().find(|n| **n == k).copied())
}

/// `INFO memory`'s human-readable fields, made again from the sums they show.
const HUMAN: &[(&str, &str)] = &[
    ("used_memory_human", "used_memory"),
    ("used_memory_rss_human", "used_memory_rss"),
    ("used_memory_peak_human", "used_memory_peak"),
];

/// Sections that list one line per command (or error code): over several masters, every
/// master's lines, those of one name merged.
const PER_NAME: &[&str] = &["commandstats", "errorstats", "latencystats"];

/// Redis's human-readable byte count (`bytesToHuman`): `1023B`, `1.50K`, `2.00M` …
fn bytes_to_human(n: i64) -> String {
    let n = n.max(0) as f64;
    // The largest unit not above `n`: 1024 to the power of its place.
    let units = ["K", "M", "G", "T", "P", "E"];
    match (1..=units.len())
        .rev()
        .find(|&p| n >= 1024f64.powi(p as i32))
    {
        Some(p) => format!("{:.2}{}", n / 1024f64.powi(p as i32), units[p - 1]),
        None => format!("{n}B"),
    }
}

/// One command's (or error code's) line of a [`PER_NAME`] section over several masters: its
/// fields in the order first seen, counts added up, latency percentiles the highest, and the
/// mean time per call made again from the sums.
#[derive(Default)]
struct PerName {
    fields: Vec<(String, f64)>,
}

impl PerName {
    /// Adds one master's fields (`calls=3,usec=40,…`).
    fn add(&mut self, fields: &str, section: &str) {
        for f in fields.split(',') {
            let Some((k, v)) = f.split_once('=') else {
                continue;
            };
            let Ok(v) = v.trim().parse::<f64>() else {
                continue;
            };
            match self.fields.iter_mut().find(|(n, _)| n == k) {
                Some((_, total)) if section == "latencystats" => *total = total.max(v),
                Some((_, total)) => *total += v,
                None => self.fields.push((k.to_string(), v)),
            }
        }
    }

    /// The line's fields as Redis writes them: latency percentiles with three decimals, the
    /// mean per call with two, counts whole.
    fn render(&self, section: &str) -> String {
        let value = |k: &str| {
            self.fields
                .iter()
                .find(|(n, _)| n == k)
                .map_or(0.0, |f| f.1)
        };
        self.fields
            .iter()
            .map(|(k, v)| {
                if section == "latencystats" {
                    format!("{k}={v:.3}")
                } else if k == "usec_per_call" {
                    let calls = value("calls");
                    let per = if calls > 0.0 {
                        value("usec") / calls
                    } else {
                        0.0
                    };
                    format!("{k}={per:.2}")
                } else {
                    format!("{k}={}", *v as i64)
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `INFO` over several nodes (see [`Merge::Info`]): the first node's text, with the
/// `# Keyspace` lines (`db0:keys=1,expires=0,avg_ttl=0`) and the [`ADDED_UP`] counters of
/// every node added up, and respire's sections merged in.
fn merge_info(replies: &[Bytes], ours: &str, replaced: &[String]) -> Option<Bytes> {
    let texts: Vec<(bool, Bytes)> = replies
        .iter()
        .map(|r| {
            let verbatim = r.first() == Some(&b'=');
            let start = r.iter().position(|&b| b == b'\n')? + 1 + if verbatim { 4 } else { 0 };
            Some((verbatim, r.slice(start..r.len().checked_sub(2)?)))
        })
        .collect::<Option<_>>()?;
    let (verbatim, first) = texts.first()?.clone();
    let mut dbs: std::collections::BTreeMap<u32, [i64; 3]> = Default::default();
    let mut sums: std::collections::HashMap<&str, i64> = Default::default();
    let mut highs: std::collections::HashMap<&str, i64> = Default::default();
    // The PER_NAME sections' lines of every master, by section, in the order first seen.
    let mut per_name: Vec<(String, Vec<(String, PerName)>)> = Vec::new();
    for (_, t) in &texts {
        let text = String::from_utf8_lossy(t);
        let mut section = String::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("# ") {
                section = name.trim().to_ascii_lowercase();
                continue;
            }
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if let Some(name) = added_up(&section, k) {
                if let Ok(v) = v.trim().parse::<i64>() {
                    *sums.entry(name).or_default() += v;
                }
                continue;
            }
            if section == "persistence" {
                if let (Some(name), Ok(v)) = (
                    IN_PROGRESS.iter().find(|n| **n == k),
                    v.trim().parse::<i64>(),
                ) {
                    let h = highs.entry(*name).or_default();
                    *h = (*h).max(v);
                }
                continue;
            }
            if PER_NAME.contains(&section.as_str()) {
                let at = match per_name.iter().position(|(s, _)| *s == section) {
                    Some(i) => i,
                    None => {
                        per_name.push((section.clone(), Vec::new()));
                        per_name.len() - 1
                    }
                };
                let lines = &mut per_name[at].1;
                match lines.iter_mut().find(|(n, _)| n == k) {
                    Some((_, p)) => p.add(v, &section),
                    None => {
                        let mut p = PerName::default();
                        p.add(v, &section);
                        lines.push((k.to_string(), p));
                    }
                }
                continue;
            }
            if section != "keyspace" {
                continue;
            }
            let Some(n) = k.strip_prefix("db") else {
                continue;
            };
            let fields = v;
            let Ok(n) = n.parse::<u32>() else { continue };
            let e = dbs.entry(n).or_default();
            for f in fields.split(',') {
                let Some((k, v)) = f.split_once('=') else {
                    continue;
                };
                let v: i64 = v.trim().parse().unwrap_or(0);
                match k {
                    "keys" => e[0] += v,
                    "expires" => e[1] += v,
                    "avg_ttl" => e[2] = e[2].max(v),
                    _ => {}
                }
            }
        }
    }
    // respire's sections that Redis also has (`replaced`) are merged into Redis's, field by
    // field: respire's value where it has one (its clients, its counters), Redis's fields
    // otherwise, respire's other fields at the section's end. The rest go before `Keyspace`.
    // A section Redis did not send goes whole with the others.
    let text = String::from_utf8_lossy(&first);
    let sent: Vec<String> = text
        .split("\r\n")
        .filter_map(|l| l.strip_prefix("# "))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut merging: Vec<(String, Vec<(String, bool)>)> = Vec::new();
    let mut rest = String::new();
    for part in ours.split("\r\n\r\n").filter(|p| !p.is_empty()) {
        let mut lines = part.split("\r\n");
        let header = lines.next().unwrap_or_default();
        let name = header.trim_start_matches("# ").trim().to_ascii_lowercase();
        if replaced.contains(&name) && sent.contains(&name) {
            merging.push((name, lines.map(|l| (l.to_string(), false)).collect()));
        } else {
            rest.push_str(&part.replace(":+", ":"));
            rest.push_str("\r\n\r\n");
        }
    }
    let field = |l: &str| l.split_once(':').map(|(k, _)| k.to_string());
    let mut out = String::new();
    let mut in_keyspace = false;
    // The section being merged (an index into `merging`).
    let mut current: Option<usize> = None;
    let mut placed = rest.is_empty();
    let flush = |out: &mut String,
                 current: &mut Option<usize>,
                 merging: &mut Vec<(String, Vec<(String, bool)>)>| {
        if let Some(fields) = current.take().and_then(|i| merging.get_mut(i)) {
            for (line, used) in &mut fields.1 {
                if !*used {
                    out.push_str(&line.replacen(":+", ":", 1));
                    out.push_str("\r\n");
                    *used = true;
                }
            }
        }
    };
    let mut section = String::new();
    for line in text.split("\r\n") {
        if line.is_empty() {
            flush(&mut out, &mut current, &mut merging);
        }
        // A counter that adds up over masters: the sum, as if the first master had said it;
        // work in progress (a rewrite, a save, loading): in progress if it is on any master.
        let summed = line.split_once(':').and_then(|(k, _)| {
            if added_up(&section, k).is_some() {
                return sums.get(k).map(|v| format!("{k}:{v}"));
            }
            if section == "persistence" {
                return highs.get(k).map(|v| format!("{k}:{v}"));
            }
            if section == "memory" {
                let (_, from) = HUMAN.iter().find(|(h, _)| *h == k)?;
                return sums
                    .get(from)
                    .map(|v| format!("{k}:{}", bytes_to_human(*v)));
            }
            None
        });
        let line = summed.as_deref().unwrap_or(line);
        if let Some(name) = line.strip_prefix("# ") {
            flush(&mut out, &mut current, &mut merging);
            section = name.trim().to_ascii_lowercase();
            current = merging.iter().position(|(n, _)| *n == section);
            in_keyspace = section == "keyspace";
            if in_keyspace && !placed {
                out.push_str(&rest);
                placed = true;
            }
            out.push_str(line);
            out.push_str("\r\n");
            if in_keyspace {
                for (n, [k, e, t]) in &dbs {
                    out.push_str(&format!("db{n}:keys={k},expires={e},avg_ttl={t}\r\n"));
                }
            }
            // Every master's lines, merged, instead of the first master's.
            if let Some((_, lines)) = per_name.iter().find(|(s, _)| *s == section) {
                for (name, p) in lines {
                    out.push_str(&format!("{name}:{}\r\n", p.render(&section)));
                }
            }
            continue;
        }
        if in_keyspace && line.starts_with("db") {
            continue;
        }
        if !line.is_empty() && PER_NAME.contains(&section.as_str()) {
            continue;
        }
        let ours_line = current
            .and_then(|i| merging.get_mut(i))
            .and_then(|(_, fields)| {
                let k = field(line)?;
                let (l, used) = fields
                    .iter_mut()
                    .find(|(l, _)| field(l).as_deref() == Some(&k))?;
                *used = true;
                // `k:+n`: n added to Redis's value.
                match l.split_once(":+") {
                    Some((k, n)) => {
                        let theirs = line.split_once(':').map_or("0", |(_, v)| v);
                        let sum =
                            theirs.parse::<i64>().unwrap_or(0) + n.parse::<i64>().unwrap_or(0);
                        Some(format!("{k}:{sum}"))
                    }
                    None => Some(l.clone()),
                }
            });
        out.push_str(ours_line.as_deref().unwrap_or(line));
        out.push_str("\r\n");
    }
    flush(&mut out, &mut current, &mut merging);
    // `split` leaves one empty piece after the final CRLF.
    while out.ends_with("\r\n\r\n") {
        out.truncate(out.len() - 2);
    }
    if !placed {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        out.push_str(rest.trim_end_matches("\r\n"));
        out.push_str("\r\n");
    }
    let mut buf = BytesMut::new();
    resp::verbatim(&mut buf, out.as_bytes(), if verbatim { 3 } else { 2 });
    Some(buf.freeze())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::commands::CommandTable;

    fn plan(t: &CommandTable, a: &[Bytes], topo: &Topology) -> Plan {
        super::plan(a, t.get(a), topo)
    }

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn three() -> Topology {
        Topology::shards(&[
            ("a:1".into(), vec![], vec![]),
            ("b:1".into(), vec![], vec![]),
            ("c:1".into(), vec![], vec![]),
        ])
        .unwrap()
    }

    #[test]
    fn single_crossslot_and_split() {
        let t = CommandTable::builtin();
        let topo = three();
        assert!(matches!(
            plan(&t, &args("GET foo"), &topo),
            Plan::Single(Some(12182))
        ));
        assert!(matches!(plan(&t, &args("PING"), &topo), Plan::Single(None)));
        assert!(matches!(
            plan(&t, &args("RENAME {a}x {a}y"), &topo),
            Plan::Single(Some(_))
        ));
        match plan(&t, &args("RENAME a b"), &topo) {
            Plan::Error(e) => assert_eq!(e, CROSSSLOT),
            p => panic!("{p:?}"),
        }
        match plan(&t, &args("MGET a b {a}c"), &topo) {
            Plan::Split(Merge::Mget(3), parts, _) => {
                assert_eq!(parts.len(), 2);
                assert_eq!(parts[0].positions.as_slice(), &[0, 2]);
                assert_eq!(
                    &parts[0].data[..],
                    b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$4\r\n{a}c\r\n"
                );
            }
            p => panic!("{p:?}"),
        }
        match plan(&t, &args("MSET a 1 b 2"), &topo) {
            Plan::Split(Merge::AllOk, parts, _) => assert_eq!(
                &parts[1].data[..],
                b"*3\r\n$4\r\nMSET\r\n$1\r\nb\r\n$1\r\n2\r\n"
            ),
            p => panic!("{p:?}"),
        }
        assert!(matches!(
            plan(&t, &args("MSETNX a 1 b 2"), &topo),
            Plan::Error(_)
        ));
        assert!(matches!(
            plan(&t, &args("DBSIZE"), &topo),
            Plan::FanOut(Merge::SumInt)
        ));
        // CONFIG SET goes to the replicas as well; other fan-out commands do not.
        assert!(replicas_too(&args(
            "CONFIG SET maxmemory-policy noeviction"
        )));
        assert!(!replicas_too(&args("CONFIG RESETSTAT")));
        assert!(!replicas_too(&args("FLUSHALL")));
        // Persistence: every master saves its own keys.
        for (cmd, merge) in [
            ("BGSAVE", Merge::First),
            ("BGREWRITEAOF", Merge::First),
            ("SAVE", Merge::AllOk),
            ("LASTSAVE", Merge::MinInt),
        ] {
            match plan(&t, &args(cmd), &topo) {
                Plan::FanOut(m) => assert_eq!(m, merge, "{cmd}"),
                p => panic!("{cmd}: {p:?}"),
            }
        }
        let times = [
            Bytes::from_static(b":1700000300\r\n"),
            Bytes::from_static(b":1700000100\r\n"),
            Bytes::from_static(b":1700000200\r\n"),
        ];
        assert_eq!(&merge(&Merge::MinInt, &times, &[])[..], b":1700000100\r\n");
    }

    #[test]
    fn debug_goes_to_the_keys_node_or_to_every_master() {
        let t = CommandTable::builtin();
        let topo = three();
        assert!(matches!(
            plan(&t, &args("DEBUG OBJECT foo"), &topo),
            Plan::Single(Some(12182))
        ));
        assert!(matches!(
            plan(&t, &args("debug digest-value {a}x {a}y"), &topo),
            Plan::Single(Some(_))
        ));
        assert!(matches!(
            plan(&t, &args("DEBUG DIGEST-VALUE a b"), &topo),
            Plan::Error(_)
        ));
        assert!(matches!(
            plan(&t, &args("DEBUG SET-ACTIVE-EXPIRE 0"), &topo),
            Plan::FanOut(Merge::AllOk)
        ));
        assert!(matches!(
            plan(&t, &args("DEBUG SLEEP 0"), &topo),
            Plan::Single(None)
        ));
        assert!(matches!(
            plan(&t, &args("LATENCY LATEST"), &topo),
            Plan::FanOut(Merge::Concat)
        ));
        assert!(matches!(
            plan(&t, &args("latency histogram set"), &topo),
            Plan::FanOut(Merge::LatencyHistogram)
        ));
    }

    #[test]
    fn a_split_of_many_keys_puts_each_key_in_the_one_part_of_its_slot_or_shard() {
        // Beyond 32 keys the parts are found through a map: the same grouping as the scan.
        let t = CommandTable::builtin();
        // Forty hash tags: forty slots of a dozen keys each, interleaved.
        let keys: Vec<String> = (0..500).map(|i| format!("{{t{}}}:{i}", i % 40)).collect();
        let cmd = format!(
            "MSET {}",
            keys.iter()
                .map(|k| format!("{k} v-{k}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut topo = three();
        for cluster in [false, true] {
            if cluster {
                topo.kind = crate::topology::BackendKind::Cluster;
            }
            let Plan::Split(Merge::AllOk, parts, _) = plan(&t, &args(&cmd), &topo) else {
                panic!("not split")
            };
            let group = |k: &str| {
                let slot = key_slot(k.as_bytes());
                if cluster {
                    u32::from(slot)
                } else {
                    u32::from(topo.slots[slot as usize])
                }
            };
            let mut seen: Vec<u32> = Vec::new();
            let mut groups = std::collections::BTreeSet::new();
            for p in &parts {
                let first = group(&keys[p.positions[0] as usize]);
                assert!(groups.insert(first), "two parts for one group");
                let mut expect = vec!["MSET".to_string()];
                for &i in &p.positions {
                    assert_eq!(group(&keys[i as usize]), first);
                    expect.push(keys[i as usize].clone());
                    expect.push(format!("v-{}", keys[i as usize]));
                }
                let mut want = BytesMut::new();
                resp::encode_args(&mut want, &expect);
                assert_eq!(p.data, want.freeze());
                seen.extend(p.positions.iter());
            }
            seen.sort();
            assert_eq!(seen, (0..500).collect::<Vec<u32>>());
            let distinct: std::collections::BTreeSet<u32> = keys.iter().map(|k| group(k)).collect();
            assert_eq!(parts.len(), distinct.len());
            if cluster {
                let shards: Vec<u16> = parts.iter().map(|p| topo.slots[p.slot as usize]).collect();
                assert!(shards.is_sorted(), "a shard's parts one after another");
            }
        }
    }

    #[test]
    fn splits_group_keys_by_shard_over_standalone_servers_and_by_slot_over_a_cluster() {
        let t = CommandTable::builtin();
        let keys: Vec<String> = (0..10).map(|i| format!("key:{i}")).collect();
        let cmd = format!("MGET {}", keys.join(" "));
        let mut shards = three();
        let Plan::Split(Merge::Mget(10), parts, _) = plan(&t, &args(&cmd), &shards) else {
            panic!()
        };
        // Ten keys in ten slots, three servers: one MGET per server, each key exactly once.
        assert_eq!(parts.len(), 3, "{parts:?}");
        let mut seen: Vec<usize> = parts
            .iter()
            .flat_map(|p| p.positions.iter().map(|&i| i as usize))
            .collect();
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        for p in &parts {
            let shard = shards.slots[p.slot as usize];
            assert!(
                p.positions.iter().all(|&i| shards.slots
                    [key_slot(keys[i as usize].as_bytes()) as usize]
                    == shard)
            );
        }
        // The same topology as a Redis Cluster: one command per slot.
        shards.kind = crate::topology::BackendKind::Cluster;
        let Plan::Split(_, parts, all) = plan(&t, &args(&cmd), &shards) else {
            panic!()
        };
        assert_eq!(parts.len(), 10);
        // A shard's parts come one after another, back to back in `all` (sent as one request).
        let order: Vec<u16> = parts
            .iter()
            .map(|p| shards.slots[p.slot as usize])
            .collect();
        assert!(order.is_sorted(), "{order:?}");
        assert_eq!(
            order
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3
        );
        let joined: Vec<u8> = parts.iter().flat_map(|p| p.data.to_vec()).collect();
        assert_eq!(joined, all.to_vec());
        for p in &parts {
            let keys_here: Vec<&str> = p
                .positions
                .iter()
                .map(|&i| keys[i as usize].as_str())
                .collect();
            let mut expect = BytesMut::new();
            resp::encode_args(&mut expect, &[&["MGET"][..], &keys_here].concat());
            assert_eq!(p.data, expect.freeze());
        }
    }

    #[test]
    fn randomkey_comes_from_every_master_in_turn() {
        let nil = Bytes::from_static(b"$-1\r\n");
        let (a, b) = (
            Bytes::from_static(b"$1\r\na\r\n"),
            Bytes::from_static(b"$1\r\nb\r\n"),
        );
        let replies = [nil.clone(), a.clone(), b.clone()];
        let seen: std::collections::BTreeSet<Bytes> = (0..12)
            .map(|_| merge(&Merge::FirstNonNil, &replies, &[]))
            .collect();
        assert_eq!(seen, [a, b].into_iter().collect());
        assert_eq!(
            merge(&Merge::FirstNonNil, &[nil.clone(), nil.clone()], &[]),
            nil
        );
    }

    /// Subscriber counts corrected for respire's own subscribers: added to the sum, never
    /// below zero, per name for `NUMSUB` pairs (arrays and RESP3 maps).
    #[test]
    fn counts_are_corrected_after_summing() {
        let ints = [Bytes::from_static(b":2\r\n"), Bytes::from_static(b":1\r\n")];
        assert_eq!(&merge(&Merge::SumIntPlus(4), &ints, &[])[..], b":7\r\n");
        assert_eq!(&merge(&Merge::SumIntPlus(-5), &ints, &[])[..], b":0\r\n");
        let plus = vec![(Bytes::from_static(b"$2\r\nch\r\n"), 2)];
        let pairs = [
            Bytes::from_static(b"*4\r\n$2\r\nch\r\n:1\r\n$1\r\nx\r\n:0\r\n"),
            Bytes::from_static(b"*4\r\n$2\r\nch\r\n:1\r\n$1\r\nx\r\n:3\r\n"),
        ];
        assert_eq!(
            &merge(&Merge::SumPairsPlus(plus.clone()), &pairs, &[])[..],
            b"*4\r\n$2\r\nch\r\n:4\r\n$1\r\nx\r\n:3\r\n"
        );
        let map = [Bytes::from_static(b"%1\r\n$2\r\nch\r\n:1\r\n")];
        assert_eq!(
            &merge(&Merge::SumPairsPlus(plus), &map, &[])[..],
            b"%1\r\n$2\r\nch\r\n:3\r\n"
        );
    }

    #[test]
    fn any_ok_takes_the_part_that_did_it() {
        let notbusy = Bytes::from_static(b"-NOTBUSY No scripts in execution right now.\r\n");
        let ok = Bytes::from_static(b"+OK\r\n");
        let r = merge(
            &Merge::AnyOk,
            &[notbusy.clone(), ok.clone(), notbusy.clone()],
            &[],
        );
        assert_eq!(r, ok);
        let r = merge(&Merge::AnyOk, &[notbusy.clone(), notbusy.clone()], &[]);
        assert_eq!(r, notbusy);
    }

    #[test]
    fn merges() {
        let parts = vec![
            Part {
                slot: 0,
                data: Bytes::new(),
                positions: SmallVec::from_slice(&[0, 2]),
            },
            Part {
                slot: 1,
                data: Bytes::new(),
                positions: SmallVec::from_slice(&[1]),
            },
        ];
        let r = merge(
            &Merge::Mget(3),
            &[
                Bytes::from_static(b"*2\r\n$1\r\na\r\n$-1\r\n"),
                Bytes::from_static(b"*1\r\n$1\r\nb\r\n"),
            ],
            &parts,
        );
        assert_eq!(&r[..], b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n");
        let r = merge(
            &Merge::SumInt,
            &[Bytes::from_static(b":2\r\n"), Bytes::from_static(b":3\r\n")],
            &[],
        );
        assert_eq!(&r[..], b":5\r\n");
        let r = merge(
            &Merge::AllOk,
            &[
                Bytes::from_static(b"+OK\r\n"),
                Bytes::from_static(b"-ERR x\r\n"),
            ],
            &[],
        );
        assert_eq!(&r[..], b"-ERR x\r\n");
        let r = merge(
            &Merge::SumPairs,
            &[
                Bytes::from_static(b"*2\r\n$1\r\nc\r\n:1\r\n"),
                Bytes::from_static(b"*2\r\n$1\r\nc\r\n:2\r\n"),
            ],
            &[],
        );
        assert_eq!(&r[..], b"*2\r\n$1\r\nc\r\n:3\r\n");
    }

    #[test]
    fn scan_cursor_walks_every_master() {
        let topo = three();
        let t = CommandTable::builtin();
        let Plan::Scan {
            ordinal,
            data,
            chain,
        } = plan(&t, &args("SCAN 0 COUNT 10"), &topo)
        else {
            panic!()
        };
        assert_eq!(
            (ordinal, &data[..], chain),
            (
                0,
                &b"*4\r\n$4\r\nSCAN\r\n$1\r\n0\r\n$5\r\nCOUNT\r\n$2\r\n10\r\n"[..],
                true
            )
        );
        // Master 0 finished: the cursor moves to master 1.
        let r = merge(
            &Merge::Scan {
                ordinal: 0,
                total: 3,
            },
            &[Bytes::from_static(b"*2\r\n$1\r\n0\r\n*0\r\n")],
            &[],
        );
        assert_eq!(&r[..], b"*2\r\n$1\r\n1\r\n*0\r\n");
        // Starting a master, the masters after it answered too: pages are taken while their
        // master finished, up to the first that has more.
        let pages = [
            Bytes::from_static(b"*2\r\n$1\r\n0\r\n*1\r\n$1\r\na\r\n"),
            Bytes::from_static(b"*2\r\n$1\r\n0\r\n*0\r\n"),
            Bytes::from_static(b"*2\r\n$1\r\n0\r\n*2\r\n$1\r\nb\r\n$1\r\nc\r\n"),
        ];
        let r = merge(
            &Merge::Scan {
                ordinal: 0,
                total: 3,
            },
            &pages,
            &[],
        );
        assert_eq!(
            &r[..],
            b"*2\r\n$1\r\n0\r\n*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
        );
        let more = Bytes::from_static(b"*2\r\n$1\r\n7\r\n*1\r\n$1\r\nb\r\n");
        let r = merge(
            &Merge::Scan {
                ordinal: 0,
                total: 3,
            },
            &[pages[0].clone(), more, pages[2].clone()],
            &[],
        );
        let c = (7u64 << 10) | 1;
        assert_eq!(
            String::from_utf8_lossy(&r),
            format!(
                "*2\r\n${}\r\n{c}\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n",
                c.to_string().len()
            )
        );
        // An error counts only in a page taken: a master whose turn has not come cannot
        // fail the call; one whose page is taken does.
        let down = Bytes::from_static(b"-LOADING Redis is loading the dataset in memory\r\n");
        let mid = Bytes::from_static(b"*2\r\n$1\r\n7\r\n*1\r\n$1\r\nb\r\n");
        let scan = Merge::Scan {
            ordinal: 0,
            total: 3,
        };
        let r = merge(&scan, &[mid.clone(), pages[1].clone(), down.clone()], &[]);
        assert!(r.starts_with(b"*2\r\n"), "{}", String::from_utf8_lossy(&r));
        let r = merge(
            &scan,
            &[pages[0].clone(), down.clone(), pages[2].clone()],
            &[],
        );
        assert_eq!(r, down);
        // Master 1 has more: its cursor 5 is kept in the high bits.
        let r = merge(
            &Merge::Scan {
                ordinal: 1,
                total: 3,
            },
            &[Bytes::from_static(b"*2\r\n$1\r\n5\r\n*1\r\n$1\r\nk\r\n")],
            &[],
        );
        let c = (5u64 << 10) | 1;
        assert_eq!(
            String::from_utf8_lossy(&r),
            format!("*2\r\n${}\r\n{c}\r\n*1\r\n$1\r\nk\r\n", c.to_string().len())
        );
        let Plan::Scan {
            ordinal,
            data,
            chain,
        } = plan(&t, &args(&format!("SCAN {c}")), &topo)
        else {
            panic!()
        };
        // Within a master, only it is asked.
        assert_eq!(
            (ordinal, &data[..], chain),
            (1, &b"*2\r\n$4\r\nSCAN\r\n$1\r\n5\r\n"[..], false)
        );
        // The last master finishing ends the scan.
        let r = merge(
            &Merge::Scan {
                ordinal: 2,
                total: 3,
            },
            &[Bytes::from_static(b"*2\r\n$1\r\n0\r\n*0\r\n")],
            &[],
        );
        assert_eq!(&r[..], b"*2\r\n$1\r\n0\r\n*0\r\n");
    }

    #[test]
    fn info_keyspace_is_added_up() {
        let a = Bytes::from_static(b"$48\r\n# Server\r\nredis_version:7\r\n# Keyspace\r\ndb0:keys=2,expires=0,avg_ttl=0\r\n\r\n");
        let b = Bytes::from_static(b"$48\r\n# Server\r\nredis_version:7\r\n# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=5\r\n\r\n");
        let fix = |f: &Bytes| {
            let body = &f[f.iter().position(|&c| c == b'\n').unwrap() + 1..f.len() - 2];
            let mut o = BytesMut::new();
            resp::bulk(&mut o, body);
            o.freeze()
        };
        let r = merge(
            &Merge::Info {
                ours: Arc::from(""),
                replaced: Vec::new(),
            },
            &[fix(&a), fix(&b)],
            &[],
        );
        let text = String::from_utf8_lossy(&r);
        assert!(
            text.contains("db0:keys=5,expires=1,avg_ttl=5\r\n"),
            "{text}"
        );
        assert!(text.contains("redis_version:7"), "{text}");
        // Sections Redis has too are merged field by field where Redis put them: respire's
        // values win, Redis's other fields stay, respire's own come at the end. respire's
        // other sections go before the keyspace; one Redis did not send comes whole.
        let a = Bytes::from_static(b"$99\r\n# Server\r\nv:7\r\n\r\n# Clients\r\nconnected_clients:9\r\ntracking_clients:4\r\nblocked_clients:3\r\n\r\n# Keyspace\r\ndb0:keys=1\r\n\r\n");
        let ours = Arc::from(
            "# Respire\r\nworkers:2\r\n\r\n# Clients\r\nconnected_clients:2\r\nblocked_clients:1\r\nmaxclients:50\r\n\r\n# Stats\r\ntotal_error_replies:+3\r\n\r\n",
        );
        let r = merge(
            &Merge::Info {
                ours,
                replaced: vec!["clients".into(), "stats".into()],
            },
            &[fix(&a)],
            &[],
        );
        let text = String::from_utf8_lossy(&r);
        assert!(
            text.ends_with("# Server\r\nv:7\r\n\r\n# Clients\r\nconnected_clients:2\r\ntracking_clients:4\r\nblocked_clients:1\r\nmaxclients:50\r\n\r\n# Respire\r\nworkers:2\r\n\r\n# Stats\r\ntotal_error_replies:3\r\n\r\n# Keyspace\r\ndb0:keys=1,expires=0,avg_ttl=0\r\n\r\n"),
            "{text}"
        );
        // `+n`: added to Redis's own count.
        let a = Bytes::from_static(
            b"$60\r\n# Stats\r\ntotal_error_replies:5\r\nexpired_keys:2\r\n\r\n# Keyspace\r\n\r\n",
        );
        let r = merge(
            &Merge::Info {
                ours: Arc::from(
                    "# Stats\r\ntotal_error_replies:+3\r\nrespire_error_replies:4\r\n\r\n",
                ),
                replaced: vec!["stats".into()],
            },
            &[fix(&a)],
            &[],
        );
        let text = String::from_utf8_lossy(&r);
        assert!(
            text.contains("# Stats\r\ntotal_error_replies:8\r\nexpired_keys:2\r\nrespire_error_replies:4\r\n\r\n# Keyspace"),
            "{text}"
        );
    }

    /// Over several masters, `INFO`'s per-command sections list every master's commands
    /// (calls, times and errors added up, the mean made again, latency percentiles the
    /// highest), and the changes since the last save and the memory are added up.
    #[test]
    fn info_command_stats_dirty_and_memory_are_added_up() {
        let node = |body: &str| {
            let mut o = BytesMut::new();
            resp::bulk(&mut o, body.as_bytes());
            o.freeze()
        };
        let a = node(
            "# Memory\r\nused_memory:1000\r\nused_memory_human:1000B\r\nmaxmemory:0\r\n\r\n# Persistence\r\nrdb_changes_since_last_save:2\r\n\r\n# Commandstats\r\ncmdstat_set:calls=2,usec=10,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n\r\n# Errorstats\r\n\r\n# Latencystats\r\nlatency_percentiles_usec_set:p50=5.001,p99=9.001,p99.9=9.001\r\n\r\n# Keyspace\r\n",
        );
        let b = node(
            "# Memory\r\nused_memory:2000000\r\nused_memory_human:1.91M\r\nmaxmemory:0\r\n\r\n# Persistence\r\nrdb_changes_since_last_save:3\r\n\r\n# Commandstats\r\ncmdstat_geoadd:calls=1,usec=40,usec_per_call=40.00,rejected_calls=0,failed_calls=1\r\ncmdstat_set:calls=1,usec=20,usec_per_call=20.00,rejected_calls=1,failed_calls=0\r\n\r\n# Errorstats\r\nerrorstat_ERR:count=1\r\n\r\n# Latencystats\r\nlatency_percentiles_usec_set:p50=20.001,p99=20.001,p99.9=20.001\r\n\r\n# Keyspace\r\n",
        );
        let r = merge(
            &Merge::Info {
                ours: Arc::from(""),
                replaced: Vec::new(),
            },
            &[a, b],
            &[],
        );
        let text = String::from_utf8_lossy(&r);
        for want in [
            "used_memory:2001000\r\nused_memory_human:1.91M\r\nmaxmemory:0\r\n",
            "rdb_changes_since_last_save:5\r\n",
            "# Commandstats\r\ncmdstat_set:calls=3,usec=30,usec_per_call=10.00,rejected_calls=1,failed_calls=0\r\ncmdstat_geoadd:calls=1,usec=40,usec_per_call=40.00,rejected_calls=0,failed_calls=1\r\n\r\n",
            "# Errorstats\r\nerrorstat_ERR:count=1\r\n\r\n",
            "# Latencystats\r\nlatency_percentiles_usec_set:p50=20.001,p99=20.001,p99.9=20.001\r\n\r\n",
        ] {
            assert!(text.contains(want), "{want:?} in {text}");
        }
        assert_eq!(bytes_to_human(1023), "1023B");
        assert_eq!(bytes_to_human(1536), "1.50K");
        assert_eq!(bytes_to_human(3 * 1024 * 1024 * 1024), "3.00G");
    }

    /// Over several masters, the counters of `INFO stats` are added up (respire's `+n` on
    /// top); fields that do not add up are the first master's.
    #[test]
    fn info_stats_counters_are_added_up() {
        let node = |cmds: u32, hits: u32, channels: u32| {
            let body = format!(
                "# Stats\r\ntotal_commands_processed:{cmds}\r\nkeyspace_hits:{hits}\r\npubsub_channels:{channels}\r\ntotal_error_replies:1\r\n\r\n# Keyspace\r\n"
            );
            let mut o = BytesMut::new();
            resp::bulk(&mut o, body.as_bytes());
            o.freeze()
        };
        let r = merge(
            &Merge::Info {
                ours: Arc::from("# Stats\r\ntotal_error_replies:+3\r\n\r\n"),
                replaced: vec!["stats".into()],
            },
            &[node(10, 1, 3), node(5, 2, 1), node(7, 0, 1)],
            &[],
        );
        let text = String::from_utf8_lossy(&r);
        assert!(
            text.contains("# Stats\r\ntotal_commands_processed:22\r\nkeyspace_hits:3\r\npubsub_channels:3\r\ntotal_error_replies:6\r\n\r\n"),
            "{text}"
        );
    }

    /// `LATENCY HISTOGRAM` over masters: calls added up, cumulative buckets combined, in
    /// RESP2 and RESP3.
    #[test]
    fn latency_histograms_of_masters_are_combined() {
        let info = Merge::LatencyHistogram;
        let a2 = Bytes::from_static(b"*4\r\n$3\r\nset\r\n*4\r\n$5\r\ncalls\r\n:2\r\n$14\r\nhistogram_usec\r\n*4\r\n:1\r\n:1\r\n:4\r\n:2\r\n$3\r\nget\r\n*4\r\n$5\r\ncalls\r\n:1\r\n$14\r\nhistogram_usec\r\n*2\r\n:2\r\n:1\r\n");
        let b2 = Bytes::from_static(b"*2\r\n$3\r\nset\r\n*4\r\n$5\r\ncalls\r\n:3\r\n$14\r\nhistogram_usec\r\n*4\r\n:2\r\n:2\r\n:8\r\n:3\r\n");
        let got = merge(&info, &[a2, b2], &[]);
        // set: buckets 1, 2, 4, 8 → 1, 1+2, 2+2, 2+3; get only on the first master.
        assert_eq!(
            &got[..],
            &b"*4\r\n$3\r\nset\r\n*4\r\n$5\r\ncalls\r\n:5\r\n$14\r\nhistogram_usec\r\n*8\r\n:1\r\n:1\r\n:2\r\n:3\r\n:4\r\n:4\r\n:8\r\n:5\r\n$3\r\nget\r\n*4\r\n$5\r\ncalls\r\n:1\r\n$14\r\nhistogram_usec\r\n*2\r\n:2\r\n:1\r\n"[..]
        );
        let a3 = Bytes::from_static(b"%1\r\n$3\r\nset\r\n%2\r\n$5\r\ncalls\r\n:1\r\n$14\r\nhistogram_usec\r\n%1\r\n:1\r\n:1\r\n");
        let b3 = Bytes::from_static(b"%0\r\n");
        let got = merge(&info, &[a3, b3], &[]);
        assert_eq!(
            &got[..],
            &b"%1\r\n$3\r\nset\r\n%2\r\n$5\r\ncalls\r\n:1\r\n$14\r\nhistogram_usec\r\n%1\r\n:1\r\n:1\r\n"[..]
        );
    }

    /// Over several masters, a rewrite or a save is in progress while it is on any of them
    /// (a client waiting for `aof_rewrite_in_progress:0` waits for every master).
    #[test]
    fn info_work_in_progress_is_on_while_any_master_has_it() {
        let node = |rewrite: u32, save: u32| {
            let body = format!(
                "# Persistence\r\nloading:0\r\naof_enabled:1\r\naof_rewrite_in_progress:{rewrite}\r\nrdb_bgsave_in_progress:{save}\r\n\r\n# Keyspace\r\n"
            );
            let mut o = BytesMut::new();
            resp::bulk(&mut o, body.as_bytes());
            o.freeze()
        };
        let info = Merge::Info {
            ours: Arc::from(""),
            replaced: Vec::new(),
        };
        let text =
            |nodes: &[Bytes]| String::from_utf8_lossy(&merge(&info, nodes, &[])).into_owned();
        let t = text(&[node(0, 0), node(1, 0), node(0, 1)]);
        assert!(
            t.contains("loading:0\r\naof_enabled:1\r\naof_rewrite_in_progress:1\r\nrdb_bgsave_in_progress:1\r\n"),
            "{t}"
        );
        let t = text(&[node(0, 0), node(0, 0), node(0, 0)]);
        assert!(
            t.contains("aof_rewrite_in_progress:0\r\nrdb_bgsave_in_progress:0\r\n"),
            "{t}"
        );
    }
}
