//! Micro-benchmarks of the request path: framing, slot hashing, the command table,
//! routing a multi-key command and merging its replies, and plugin hook calls (one plugin,
//! a chain, a response).
//!
//!   cargo bench -p respire-tests --bench micro
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::rc::Rc;
use std::sync::Arc;

use bytes::BytesMut;
use criterion::{Criterion, criterion_group, criterion_main};
use respire::commands::CommandTable;
use respire::plugin::{
    ChainRequest, ChainResponse, Client, ClientHandle, Decision, PluginSet, ResponseChain, Runtime,
    WorkerPlugins, WorkerSet,
};
use respire::protocol::{Command, RequestLimits, RequestParser, reply_len};
use respire::topology::{Topology, key_slot};

fn args(parts: &[&str]) -> Command {
    Command::from_args(parts)
}

fn framing(c: &mut Criterion) {
    let limits = RequestLimits {
        max_args: 1 << 20,
        max_bulk: 512 << 20,
    };
    let mut one = Vec::new();
    let value = "x".repeat(32);
    for i in 0..16 {
        let key = format!("key:{i:06}");
        one.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n$32\r\n{value}\r\n",
                key.len()
            )
            .as_bytes(),
        );
    }
    c.bench_function("parse 16 pipelined SETs", |b| {
        let mut parser = RequestParser::new();
        b.iter(|| {
            let mut buf = BytesMut::from(&one[..]);
            let mut n = 0;
            while let Ok(Some(cmd)) = parser.parse(&mut buf, &limits, true) {
                n += cmd.len();
            }
            assert_eq!(n, 48);
        })
    });
    let reply = format!(
        "*10\r\n{}",
        "$32\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n".repeat(10)
    );
    c.bench_function("measure a 10-element array reply", |b| {
        b.iter(|| {
            assert_eq!(
                reply_len(std::hint::black_box(reply.as_bytes())).unwrap(),
                Some(reply.len())
            )
        })
    });
}

fn routing(c: &mut Criterion) {
    c.bench_function("key_slot plain key", |b| {
        b.iter(|| key_slot(std::hint::black_box(b"user:1000:profile")))
    });
    c.bench_function("key_slot hash tag", |b| {
        b.iter(|| key_slot(std::hint::black_box(b"{user:1000}:profile")))
    });
    let table = CommandTable::builtin();
    let get = args(&["GET", "user:1000"]);
    c.bench_function("command table: GET info and keys", |b| {
        let mut keys = Vec::new();
        b.iter(|| {
            keys.clear();
            let info = table.get(std::hint::black_box(&get)).unwrap();
            info.key_positions(&get, &mut keys);
            assert_eq!(keys.len(), 1);
        })
    });
    c.bench_function(
        "command table: resolve GET (handling and description)",
        |b| b.iter(|| assert!(table.resolve(std::hint::black_box(&get)).info.is_some())),
    );
    let shard = |a: &str| (a.to_string(), Vec::new(), Vec::new());
    let topo = Topology::shards(&[
        shard("127.0.0.1:7001"),
        shard("127.0.0.1:7002"),
        shard("127.0.0.1:7003"),
    ])
    .unwrap();
    // An MGET of `n` keys, and the benchmark of planning it over `topo`.
    let mget_of = |n: usize| {
        let names: Vec<String> = std::iter::once("MGET".to_string())
            .chain((0..n).map(|i| format!("key:{i}")))
            .collect();
        Command::from_args(&names)
    };
    let bench_plan = |c: &mut Criterion, name: &str, cmd: &Command, topo: &Topology| {
        c.bench_function(name, |b| {
            b.iter(|| {
                std::hint::black_box(respire::router::plan(
                    std::hint::black_box(cmd),
                    table.get(cmd),
                    topo,
                ))
            })
        });
    };
    let mget = mget_of(10);
    bench_plan(c, "plan MGET of 10 keys over 3 shards", &mget, &topo);
    // A big MGET over a Redis Cluster: a part per slot, thousands of them.
    let mut cluster = topo.clone();
    cluster.kind = respire::topology::BackendKind::Cluster;
    bench_plan(
        c,
        "plan MGET of 10,000 keys over a 3-master cluster",
        &mget_of(10_000),
        &cluster,
    );
    // The shards' replies to that plan's parts (32-byte values), merged into the client's.
    let respire::router::Plan::Split(how, parts, _) =
        respire::router::plan(&mget, table.get(&mget), &topo)
    else {
        panic!("MGET of 10 keys over 3 shards is not split");
    };
    let value = format!("$32\r\n{}\r\n", "x".repeat(32));
    let replies: Vec<bytes::Bytes> = parts
        .iter()
        .map(|p| {
            format!(
                "*{}\r\n{}",
                p.positions.len(),
                value.repeat(p.positions.len())
            )
            .into()
        })
        .collect();
    c.bench_function(
        "merge the replies of an MGET of 10 keys over 3 shards",
        |b| {
            b.iter(|| {
                let merged = respire::router::merge(&how, std::hint::black_box(&replies), &parts);
                assert_eq!(merged.len(), 5 + 10 * value.len());
            })
        },
    );
}

/// Runs the request chain on one command.
fn run_one(
    w: &mut WorkerPlugins,
    set: &WorkerSet,
    table: &CommandTable,
    client: &ClientHandle,
    cmd: &Command,
) -> (Decision, Option<Box<ResponseChain>>) {
    let batch = [ChainRequest {
        client,
        cmd,
        info: table.get(cmd),
    }];
    w.on_requests(set, table, &batch).pop().unwrap()
}

/// A plugin folder with the probe plugin as `NAME.wasm` per (name, config) pair.
fn plugin_set(rt: &Runtime, probes: &[(&str, &str)]) -> (tempfile::TempDir, WorkerSet) {
    let dir = tempfile::tempdir().unwrap();
    for (name, config) in probes {
        std::fs::copy(
            respire_tests::probe_plugin(),
            dir.path().join(format!("{name}.wasm")),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{name}.toml")), config).unwrap();
    }
    let (plugins, errors) = rt.load_dir(dir.path());
    assert!(errors.is_empty(), "{errors:?}");
    (
        dir,
        Rc::new(Arc::new(PluginSet {
            version: 1,
            plugins,
        })),
    )
}

fn plugins(c: &mut Criterion) {
    let rt = Runtime::new(None).unwrap();
    let table = CommandTable::builtin();
    let details = Client {
        id: 7,
        addr: "127.0.0.1:50000".into(),
        user: "default".into(),
        db: 0,
        name: String::new(),
        protocol: 2,
    };
    let client = ClientHandle {
        details: Arc::new(details.clone()),
        generation: 1,
    };
    let get = args(&["GET", "user:1000"]);
    let pass = "[config]\ncategories = \"all\"\ncount = false\n";

    let (_d1, one) = plugin_set(&rt, &[("pass", pass)]);
    let mut w = WorkerPlugins::default();
    c.bench_function("plugin: one pass-through request hook", |b| {
        b.iter(|| std::hint::black_box(run_one(&mut w, &one, &table, &client, &get)))
    });

    // A client whose details changed since the last call: the plugin fetches them.
    let mut changed = ClientHandle {
        details: Arc::new(details),
        generation: 1,
    };
    c.bench_function(
        "plugin: one pass-through request hook, client details fetched",
        |b| {
            b.iter(|| {
                changed.generation = changed.generation.wrapping_add(1);
                std::hint::black_box(run_one(&mut w, &one, &table, &changed, &get))
            })
        },
    );
    let ping = args(&["PING"]);
    c.bench_function("plugin: one pass-through request hook, no arguments", |b| {
        b.iter(|| std::hint::black_box(run_one(&mut w, &one, &table, &client, &ping)))
    });
    let (_d0, other) = plugin_set(
        &rt,
        &[("other", "[config]\ncommands = \"set\"\ncount = false\n")],
    );
    c.bench_function("plugin: chain with no plugin for the command", |b| {
        b.iter(|| std::hint::black_box(run_one(&mut w, &other, &table, &client, &get)))
    });

    let (_d2, four) = plugin_set(
        &rt,
        &[("p1", pass), ("p2", pass), ("p3", pass), ("p4", pass)],
    );
    let mut w = WorkerPlugins::default();
    c.bench_function("plugin: chain of four request hooks", |b| {
        b.iter(|| std::hint::black_box(run_one(&mut w, &four, &table, &client, &get)))
    });

    let (_d3, effects) = plugin_set(
        &rt,
        &[(
            "count",
            "[config]\ncommands = \"get\"\nrate = 1000000\nburst = 1000000\n",
        )],
    );
    let mut w = WorkerPlugins::default();
    c.bench_function(
        "plugin: request hook with a host call, a metric and a token take",
        |b| b.iter(|| std::hint::black_box(run_one(&mut w, &effects, &table, &client, &get))),
    );

    let (_d4, resp) = plugin_set(
        &rt,
        &[(
            "resp",
            "[config]\ncommands = \"get\"\ncount = false\nresponses = true\n",
        )],
    );
    let mut w = WorkerPlugins::default();
    let reply = b"$32\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n";
    c.bench_function("plugin: request and response hooks (reply replaced)", |b| {
        b.iter(|| {
            let (_, chain) = run_one(&mut w, &resp, &table, &client, &get);
            let mut chain = chain.unwrap();
            w.on_reply(&mut chain, reply, std::time::Instant::now());
            std::hint::black_box(w.on_responses(
                &[ChainResponse {
                    client: &client,
                    chain: &chain,
                    reply,
                }],
                true,
            ))
        })
    });

    // A pipeline of 16 GETs through the chain of four: one call per plugin for all 16.
    let gets: Vec<Command> = (0..16)
        .map(|i| args(&["GET", &format!("user:{i}")]))
        .collect();
    let mut w = WorkerPlugins::default();
    c.bench_function(
        "plugin: chain of four request hooks, batch of 16 (per batch)",
        |b| {
            b.iter(|| {
                let batch: Vec<ChainRequest<'_>> = gets
                    .iter()
                    .map(|g| ChainRequest {
                        client: &client,
                        cmd: g,
                        info: table.get(g),
                    })
                    .collect();
                std::hint::black_box(w.on_requests(&four, &table, &batch))
            })
        },
    );
    let mut w = WorkerPlugins::default();
    let mut chains: Vec<Box<ResponseChain>> = gets
        .iter()
        .map(|g| run_one(&mut w, &resp, &table, &client, g).1.unwrap())
        .collect();
    for chain in &mut chains {
        w.on_reply(chain, reply, std::time::Instant::now());
    }
    c.bench_function(
        "plugin: response hook replacing the reply, batch of 16 (per batch)",
        |b| {
            b.iter(|| {
                let batch: Vec<ChainResponse<'_>> = chains
                    .iter()
                    .map(|chain| ChainResponse {
                        client: &client,
                        chain,
                        reply,
                    })
                    .collect();
                std::hint::black_box(w.on_responses(&batch, true))
            })
        },
    );

    // Traffic metrics: five series per reply, recorded by respire without a call.
    let (_d5, traffic) = plugin_set(
        &rt,
        &[(
            "t",
            "[config]\ncommands = \"get\"\ntraffic = true\nrequests = false\n",
        )],
    );
    let mut w = WorkerPlugins::default();
    let mut chain = run_one(&mut w, &traffic, &table, &client, &get).1.unwrap();
    c.bench_function("plugin: traffic metrics of one reply (no call)", |b| {
        b.iter(|| std::hint::black_box(w.on_reply(&mut chain, reply, std::time::Instant::now())))
    });
}

criterion_group!(benches, framing, routing, plugins);
criterion_main!(benches);
