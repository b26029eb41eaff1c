//! Routing: any command (arguments from the input, split at NUL bytes) is planned over a
//! 3-shard topology without panicking; keys always map to a slot below 16384.
#![no_main]
use libfuzzer_sys::fuzz_target;
use respire::commands::CommandTable;
use respire::protocol::Command;
use respire::router::plan;
use respire::topology::{Topology, key_slot};

fuzz_target!(|data: &[u8]| {
    let args: Vec<Vec<u8>> = data.split(|&b| b == 0).take(64).map(<[u8]>::to_vec).collect();
    if args.is_empty() || args[0].is_empty() {
        return;
    }
    for a in &args {
        assert!(key_slot(a) < 16384);
    }
    // Built once: building them for every input made this target 300 times slower.
    static SETUP: std::sync::OnceLock<(CommandTable, Option<Topology>)> = std::sync::OnceLock::new();
    let (table, topo) = SETUP.get_or_init(|| {
        let shard = |a: &str| (a.to_string(), Vec::new(), Vec::new());
        (CommandTable::builtin(), Topology::shards(&[shard("127.0.0.1:7001"), shard("127.0.0.1:7002"), shard("127.0.0.1:7003")]).ok())
    });
    let Some(topo) = topo else { return };
    let cmd = Command::from_args(&args);
    let _ = plan(&cmd, table.get(&cmd), topo);
});
