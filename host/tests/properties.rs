//! Property tests for the pieces hostile input reaches first: request framing, reply
//! framing, slot hashing, and `MGET` split and merge. `PROPTEST_CASES` raises the number of
//! cases (`examples/fuzz.sh` runs them for a set time).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use respire::commands::CommandTable;
use respire::protocol::{Command, RequestLimits, RequestParser, reply_len};
use respire::router::{Merge, Plan, merge, plan};
use respire::topology::{Topology, key_slot};

/// Feeds `input` to a parser in pieces cut at `cuts`; returns the commands and whether it
/// ended with an error.
fn parse_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<Vec<Vec<u8>>>, bool) {
    let limits = RequestLimits {
        max_args: 1024,
        max_bulk: 1 << 20,
    };
    let mut parser = RequestParser::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort_unstable();
    let mut from = 0;
    for to in cuts {
        buf.extend_from_slice(&input[from..to]);
        from = to;
        loop {
            match parser.parse(&mut buf, &limits, true) {
                Ok(Some(cmd)) => {
                    // Every command consumes bytes: more commands than bytes is a parser that
                    // does not advance.
                    assert!(
                        got.len() < input.len(),
                        "more commands than input bytes: {:?}",
                        String::from_utf8_lossy(input)
                    );
                    got.push(cmd.iter().map(<[u8]>::to_vec).collect())
                }
                Ok(None) => break,
                Err(_) => return (got, true),
            }
        }
    }
    (got, false)
}

/// A RESP3 reply of bounded depth.
fn reply() -> impl Strategy<Value = Vec<u8>> {
    let leaf = prop_oneof![
        "[a-zA-Z ]{0,12}".prop_map(|s| format!("+{s}\r\n").into_bytes()),
        "[A-Z]{1,8} [a-z ]{0,12}".prop_map(|s| format!("-{s}\r\n").into_bytes()),
        any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| [
            format!("${}\r\n", b.len()).into_bytes(),
            b,
            b"\r\n".to_vec()
        ]
        .concat()),
        Just(b"$-1\r\n".to_vec()),
        Just(b"*-1\r\n".to_vec()),
        Just(b"_\r\n".to_vec()),
        Just(b"#t\r\n".to_vec()),
        any::<f64>().prop_map(|f| format!(",{f}\r\n").into_bytes()),
        "[0-9]{1,30}".prop_map(|s| format!("({s}\r\n").into_bytes()),
        "[a-z]{0,10}".prop_map(|s| format!("={}\r\ntxt:{s}\r\n", s.len() + 4).into_bytes()),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        (
            prop_oneof![Just('*'), Just('~'), Just('>'), Just('%')],
            proptest::collection::vec(inner, 0..6),
        )
            .prop_map(|(kind, items)| {
                let n = if kind == '%' {
                    items.len() / 2
                } else {
                    items.len()
                };
                let take = if kind == '%' { n * 2 } else { n };
                [
                    format!("{kind}{n}\r\n").into_bytes(),
                    items[..take].concat(),
                ]
                .concat()
            })
    })
}

proptest! {
    #[test]
    fn the_request_parser_never_panics_on_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
        let _ = parse_in_pieces(&input, &cuts);
    }

    #[test]
    fn commands_come_out_as_they_went_in_however_the_bytes_are_cut(
        cmds in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..48), 1..6), 1..12),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let input: Vec<u8> = cmds.iter().flat_map(|c| Command::from_args(c).raw().to_vec()).collect();
        let (got, failed) = parse_in_pieces(&input, &cuts);
        prop_assert!(!failed);
        prop_assert_eq!(got, cmds);
    }

    #[test]
    fn whole_or_byte_by_byte_the_same_commands_and_the_same_failure(
        cmds in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 1..9), 1..6),
        edits in proptest::collection::vec((any::<usize>(), proptest::sample::select(b"*$-0123456789\r\nx ".to_vec())), 0..4),
    ) {
        // Requests read whole take a shortcut that requests arriving in pieces do not: both
        // must read near-valid input (a few bytes changed) alike, and refuse it at the same
        // command.
        let mut input: Vec<u8> = cmds.iter().flat_map(|c| Command::from_args(c).raw().to_vec()).collect();
        for (at, b) in edits {
            let i = at % input.len();
            input[i] = b;
        }
        let every: Vec<usize> = (0..input.len()).collect();
        prop_assert_eq!(parse_in_pieces(&input, &[]), parse_in_pieces(&input, &every));
    }

    #[test]
    fn a_reply_is_measured_exactly_and_no_prefix_passes_for_whole(r in reply(), junk in proptest::collection::vec(any::<u8>(), 0..16)) {
        prop_assert_eq!(reply_len(&r).unwrap(), Some(r.len()));
        let followed = [r.clone(), junk].concat();
        prop_assert_eq!(reply_len(&followed).unwrap(), Some(r.len()));
        for cut in 0..r.len() {
            prop_assert_eq!(reply_len(&r[..cut]).unwrap(), None, "prefix of {} bytes", cut);
        }
    }

    #[test]
    fn reply_measuring_never_panics_on_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = reply_len(&input);
    }

    #[test]
    fn a_hash_tag_decides_the_slot(tag in "[a-z0-9:]{1,12}", before in "[a-z]{0,6}", after in "[a-z{}]{0,6}") {
        let key = format!("{before}{{{tag}}}{after}");
        prop_assert_eq!(key_slot(key.as_bytes()), key_slot(tag.as_bytes()));
        prop_assert!(key_slot(key.as_bytes()) < 16384);
    }

    #[test]
    fn mget_split_over_shards_and_merged_gives_what_one_server_would(
        keys in proptest::collection::vec("[a-z]{1,3}|\\{[a-z]{1,2}\\}[a-z]{0,2}", 1..24),
        present in proptest::collection::hash_map("[a-z]{1,3}", proptest::collection::vec(any::<u8>(), 0..8), 0..20),
    ) {
        let shard = |a: &str| (a.to_string(), Vec::new(), Vec::new());
        let mut topo = Topology::shards(&[shard("127.0.0.1:7001"), shard("127.0.0.1:7002"), shard("127.0.0.1:7003")]).unwrap();
        // Standalone servers (a part per server), then the same map as a Redis Cluster (a part
        // per slot, a server's parts together).
        for cluster in [false, true] {
            if cluster {
                topo.kind = respire::topology::BackendKind::Cluster;
            }
            let table = CommandTable::builtin();
            let args: Vec<Vec<u8>> = std::iter::once(b"MGET".to_vec()).chain(keys.iter().map(|k| k.as_bytes().to_vec())).collect();
            let cmd = Command::from_args(&args);
            let store: HashMap<Vec<u8>, Vec<u8>> = present.iter().map(|(k, v)| (k.clone().into_bytes(), v.clone())).collect();
            let value_reply = |k: &[u8]| match store.get(k) {
                Some(v) => [format!("${}\r\n", v.len()).into_bytes(), v.clone(), b"\r\n".to_vec()].concat(),
                None => b"$-1\r\n".to_vec(),
            };
            let want: Vec<u8> = [format!("*{}\r\n", keys.len()).into_bytes(), keys.iter().flat_map(|k| value_reply(k.as_bytes())).collect()].concat();
            match plan(&cmd, table.get(&cmd), &topo) {
                Plan::Split(how, parts, all) => {
                    prop_assert_eq!(&how, &Merge::Mget(keys.len()));
                    // The parts lie back to back in `all`, each master's one after another.
                    prop_assert_eq!(parts.iter().flat_map(|p| p.data.to_vec()).collect::<Vec<u8>>(), all.to_vec());
                    let owners: Vec<Option<usize>> = parts.iter().map(|p| topo.master_of(p.slot)).collect();
                    for (i, o) in owners.iter().enumerate() {
                        prop_assert!(!owners[..i].contains(o) || owners[i - 1] == *o, "{:?}", owners);
                    }
                    let mut replies = Vec::new();
                    for p in &parts {
                        // Each part is an MGET of keys that one master holds.
                        let mut buf = BytesMut::from(&p.data[..]);
                        let sub = RequestParser::new().parse(&mut buf, &RequestLimits::default(), true).unwrap().unwrap();
                        prop_assert!(sub.name().eq_ignore_ascii_case(b"MGET"));
                        let owner = topo.master_of(p.slot);
                        let sub_keys: Vec<&[u8]> = sub.iter().skip(1).collect();
                        for k in &sub_keys {
                            prop_assert_eq!(topo.master_of(key_slot(k)), owner);
                            if cluster {
                                prop_assert_eq!(key_slot(k), p.slot);
                            }
                        }
                        let body: Vec<u8> = sub_keys.iter().flat_map(|k| value_reply(k)).collect();
                        replies.push(Bytes::from([format!("*{}\r\n", sub_keys.len()).into_bytes(), body].concat()));
                    }
                    prop_assert_eq!(merge(&how, &replies, &parts).to_vec(), want);
                }
                // All keys on one master: sent whole, and one server answers it as is.
                Plan::Single(Some(slot)) => {
                    let owner = topo.master_of(slot);
                    for k in &keys {
                        prop_assert_eq!(topo.master_of(key_slot(k.as_bytes())), owner);
                    }
                }
                other => prop_assert!(false, "unexpected plan {:?}", other),
            }
        }
    }
}

proptest! {
    #[test]
    fn a_scan_over_shards_visits_every_master_in_order_and_ends_at_zero(
        walks in proptest::collection::vec(proptest::collection::btree_set(1u64..(1u64 << 54), 0..6), 1..6),
        count in 1u32..1000,
    ) {
        // Each master's cursors, in the order it hands them out (then 0: done).
        let walks: Vec<Vec<u64>> = walks.into_iter().map(|w| w.into_iter().collect()).collect();
        let shards: Vec<_> = (0..walks.len()).map(|i| (format!("127.0.0.1:{}", 7001 + i), Vec::new(), Vec::new())).collect();
        let topo = Topology::shards(&shards).unwrap();
        let table = CommandTable::builtin();
        let expected: Vec<(usize, u64)> =
            walks.iter().enumerate().flat_map(|(m, w)| std::iter::once((m, 0)).chain(w.iter().map(move |&c| (m, c)))).collect();
        let mut asked = Vec::new();
        let mut cursor = 0u64;
        for _ in 0..=expected.len() {
            let args = [b"SCAN".to_vec(), cursor.to_string().into_bytes(), b"COUNT".to_vec(), count.to_string().into_bytes()];
            let cmd = Command::from_args(&args);
            let Plan::Scan { ordinal, data, chain } = plan(&cmd, table.get(&cmd), &topo) else {
                return Err(TestCaseError::fail(format!("SCAN {cursor} is not planned as a scan")));
            };
            // The master gets its own cursor, the other arguments unchanged.
            let mut buf = BytesMut::from(&data[..]);
            let sub = RequestParser::new().parse(&mut buf, &RequestLimits::default(), true).unwrap().unwrap();
            let sub: Vec<&[u8]> = sub.iter().collect();
            prop_assert_eq!(sub.len(), 4);
            let count_text = count.to_string();
            prop_assert_eq!(sub[3], count_text.as_bytes());
            let node_cursor: u64 = std::str::from_utf8(sub[1]).unwrap().parse().unwrap();
            // A call that starts a master goes to the masters after it too, with cursor 0.
            prop_assert_eq!(chain, node_cursor == 0);
            let last = if chain { walks.len() } else { ordinal + 1 };
            let mut replies = Vec::new();
            let mut taken = Vec::new();
            let mut finished = true;
            for (m, walk) in walks.iter().enumerate().take(last).skip(ordinal) {
                let c = if m == ordinal { node_cursor } else { 0 };
                let at = if c == 0 { 0 } else { walk.iter().position(|&x| x == c).map_or(usize::MAX, |i| i + 1) };
                prop_assert!(at != usize::MAX, "master {} was asked for a cursor it never gave: {}", m, c);
                let next = walk.get(at).copied().unwrap_or(0);
                // Each page holds one key naming the master and the cursor it answered.
                let key = format!("{m}:{c}");
                if finished {
                    asked.push((m, c));
                    taken.push(key.clone());
                    finished = next == 0;
                }
                replies.push(Bytes::from(format!("*2\r\n${}\r\n{next}\r\n*1\r\n${}\r\n{key}\r\n", next.to_string().len(), key.len())));
            }
            let merged = merge(&Merge::Scan { ordinal, total: walks.len() }, &replies, &[]);
            // The client sees a well-formed reply with a decimal cursor and the keys of the
            // pages taken, in order.
            prop_assert_eq!(reply_len(&merged).ok().flatten(), Some(merged.len()));
            let text = String::from_utf8_lossy(&merged).into_owned();
            let client_cursor: Vec<&str> = text.split("\r\n").collect();
            let mut keys = format!("*{}\r\n", taken.len());
            for k in &taken {
                keys.push_str(&format!("${}\r\n{k}\r\n", k.len()));
            }
            prop_assert!(text.ends_with(&keys), "{} does not end with {}", text, keys);
            cursor = client_cursor[2].parse().unwrap();
            if cursor == 0 {
                break;
            }
        }
        prop_assert_eq!(cursor, 0);
        prop_assert_eq!(asked, expected);
    }
}

#[test]
fn a_master_cursor_too_big_for_the_shared_cursor_is_an_error_not_a_wrong_cursor() {
    let too_big = (1u64 << 54).to_string();
    let reply = format!("*2\r\n${}\r\n{too_big}\r\n*0\r\n", too_big.len());
    let merged = merge(
        &Merge::Scan {
            ordinal: 1,
            total: 3,
        },
        &[Bytes::from(reply)],
        &[],
    );
    assert!(
        merged.starts_with(b"-ERR"),
        "{}",
        String::from_utf8_lossy(&merged)
    );
}
