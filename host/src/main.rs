//! The `respire` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use respire::config::Config;
use respire::server::Server;

/// mimalloc: the request path allocates and frees small objects in bursts (a reply cell
/// per request, a pipelined batch at a time), which overflows glibc's per-thread cache;
/// measured ≈270 instructions per request for malloc plus free with glibc.
#[global_allocator]
static ALLOC: alloc::Allocator = alloc::Allocator;

/// mimalloc as the global allocator, asked for an aligned block only when the alignment is
/// more than it gives every block anyway.
///
/// The `mimalloc` crate passes every allocation to `mi_malloc_aligned`, whose fast path in
/// mimalloc 3 covers blocks of at most 1 KiB: a bigger block whose size is not a power of two
/// (a batch of commands for the plugins, a vector of decisions) goes to its over-allocating
/// path, ≈100 instructions more per allocation (callgrind, GET at pipeline 16 with the four
/// shipped plugins: one such allocation per request). mimalloc rounds blocks of more than one
/// word to two words and starts pages at 16 bytes, so a block of at least `align` bytes is
/// aligned to `align` up to 16 — the rule Rust's own `System` allocator follows with `malloc`.
#[allow(unsafe_code)]
mod alloc {
    use std::alloc::{GlobalAlloc, Layout};
    use std::ffi::c_void;

    use libmimalloc_sys::{mi_free, mi_malloc, mi_realloc, mi_zalloc};

    /// The alignment every mimalloc block of at least this size has.
    const MIN_ALIGN: usize = 16;

    pub struct Allocator;

    /// Whether a plain mimalloc block is aligned enough for a block of `size` bytes.
    fn plain(align: usize, size: usize) -> bool {
        align <= MIN_ALIGN && align <= size
    }

    // SAFETY: every path returns a mimalloc block of at least `layout.size()` bytes aligned to
    // `layout.align()` (plain blocks only where `plain` holds, see above; otherwise mimalloc's
    // aligned functions), or null; all of them are freed with `mi_free`, which takes both.
    unsafe impl GlobalAlloc for Allocator {
        #[inline]
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            if plain(layout.align(), layout.size()) {
                // SAFETY: mimalloc's malloc, any size.
                unsafe { mi_malloc(layout.size()).cast() }
            } else {
                // SAFETY: the caller's contract, passed on.
                unsafe { mimalloc::MiMalloc.alloc(layout) }
            }
        }

        #[inline]
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            if plain(layout.align(), layout.size()) {
                // SAFETY: mimalloc's zeroing malloc, any size.
                unsafe { mi_zalloc(layout.size()).cast() }
            } else {
                // SAFETY: the caller's contract, passed on.
                unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
            }
        }

        #[inline]
        unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
            // SAFETY: `ptr` came from this allocator, so from mimalloc.
            unsafe { mi_free(ptr.cast::<c_void>()) }
        }

        #[inline]
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            if plain(layout.align(), new_size) {
                // SAFETY: `ptr` came from mimalloc; the new block keeps the old contents.
                unsafe { mi_realloc(ptr.cast::<c_void>(), new_size).cast() }
            } else {
                // SAFETY: the caller's contract, passed on.
                unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Every size up to 9 KiB (past mimalloc's small and medium bins) at every alignment up
        /// to 64: the block is aligned, holds its bytes, and keeps them when it grows or shrinks.
        #[test]
        fn blocks_are_aligned_and_keep_their_bytes() {
            for align in [1, 2, 4, 8, 16, 32, 64] {
                for size in (1..9 * 1024).step_by(7) {
                    let Ok(layout) = Layout::from_size_align(size, align) else {
                        continue;
                    };
                    // SAFETY: a non-zero size; the block is written within its size and freed
                    // with its layout.
                    unsafe {
                        let p = Allocator.alloc(layout);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "size {size} align {align}");
                        std::ptr::write_bytes(p, 0xa5, size);
                        // Grown, then shrunk below the first size.
                        let mut block = (p, layout);
                        for new_size in [size * 3, size / 2 + 1] {
                            let q = Allocator.realloc(block.0, block.1, new_size);
                            assert_eq!(
                                q as usize % align,
                                0,
                                "realloc to {new_size}, align {align}"
                            );
                            let kept = size.min(new_size);
                            assert!(
                                std::slice::from_raw_parts(q, kept)
                                    .iter()
                                    .all(|&b| b == 0xa5)
                            );
                            block = (
                                q,
                                Layout::from_size_align(new_size, align).unwrap_or(layout),
                            );
                        }
                        Allocator.dealloc(block.0, block.1);
                        let z = Allocator.alloc_zeroed(layout);
                        assert_eq!(z as usize % align, 0);
                        assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                        Allocator.dealloc(z, layout);
                    }
                }
            }
        }
    }
}

/// Turns transparent huge pages off for this process, as Redis does for itself (`disable-thp`).
/// mimalloc asks for huge pages on its regions and returns freed parts of them to the system;
/// touching such a part again makes the kernel zero a whole 2 MiB page. Measured with a
/// subscriber that does not read while 64 KiB messages arrive: 95% of the worker's time went to
/// zeroing pages and it relayed ≈30 MB/s; without huge pages it keeps up with Redis.
#[allow(unsafe_code)]
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// A Redis proxy programmable with WebAssembly plugins.
#[derive(Parser, Debug)]
#[command(
    name = "respire",
    version,
    about,
    args_conflicts_with_subcommands = false
)]
struct Cli {
    #[command(flatten)]
    opts: Opts,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Args, Debug, Clone)]
struct Opts {
    /// Configuration file (TOML). Flags override its values.
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on for clients, e.g. 127.0.0.1:6380.
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Address respire gives for itself in CLUSTER SLOTS|SHARDS|NODES, host:port (behind NAT,
    /// a port mapping or a load balancer).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    announce: Option<String>,
    /// One standalone Redis server, host:port.
    #[arg(long, global = true, value_name = "ADDR", conflicts_with_all = ["cluster", "shards", "sentinel"])]
    backend: Option<String>,
    /// Redis Cluster seed nodes, comma-separated.
    #[arg(long, global = true, value_name = "ADDRS", value_delimiter = ',', conflicts_with_all = ["shards", "sentinel"])]
    cluster: Option<Vec<String>>,
    /// Standalone Redis shards, comma-separated.
    #[arg(
        long,
        global = true,
        value_name = "ADDRS",
        value_delimiter = ',',
        conflicts_with = "sentinel"
    )]
    shards: Option<Vec<String>>,
    /// Redis Sentinel addresses, comma-separated (with --master-name).
    #[arg(
        long,
        global = true,
        value_name = "ADDRS",
        value_delimiter = ',',
        requires = "master_name"
    )]
    sentinel: Option<Vec<String>>,
    /// Master name(s) the sentinels monitor, comma-separated (several: shards by hash slot).
    #[arg(
        long,
        global = true,
        value_name = "NAMES",
        value_delimiter = ',',
        requires = "sentinel"
    )]
    master_name: Option<Vec<String>>,
    /// Folder of Wasm plugins to load and watch.
    #[arg(long, global = true, value_name = "DIR")]
    plugins: Option<PathBuf>,
    /// Folder of compiled plugins kept across restarts ("" turns it off).
    #[arg(long, global = true, value_name = "DIR", value_parser = clap::builder::OsStringValueParser::new())]
    plugin_cache: Option<std::ffi::OsString>,
    /// Address for the Prometheus metrics endpoint, e.g. 127.0.0.1:9379.
    #[arg(long, global = true, value_name = "ADDR")]
    metrics: Option<String>,
    /// Worker threads (0: one per core).
    #[arg(long, global = true, value_name = "N")]
    workers: Option<usize>,
    /// Connections from one client address kept on one worker, up to N on it (0: spread).
    #[arg(long, global = true, value_name = "N")]
    worker_affinity: Option<usize>,
    /// Password clients must give with AUTH.
    #[arg(
        long,
        global = true,
        value_name = "PASS",
        env = "RESPIRE_REQUIREPASS",
        hide_env_values = true
    )]
    requirepass: Option<String>,
    /// "yes" (the default) refuses to listen on a non-loopback address while clients need no
    /// password, as Redis's protected mode; "no" allows it.
    #[arg(long, global = true, value_name = "yes|no", value_parser = yes_no)]
    protected_mode: Option<bool>,
    /// Password respire uses to authenticate to the backends.
    #[arg(
        long,
        global = true,
        value_name = "PASS",
        env = "RESPIRE_BACKEND_PASSWORD",
        hide_env_values = true
    )]
    backend_password: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate the configuration and exit (non-zero with the reason when invalid).
    Check,
    /// Plugin tools.
    Plugin {
        #[command(subcommand)]
        action: PluginCmd,
    },
}

#[derive(Subcommand, Debug)]
enum PluginCmd {
    /// Load a plugin, run its init, print its manifest; exit non-zero with the reason when
    /// it is invalid. Its settings come from FILE.toml beside it, or from --config.
    Check {
        /// The plugin (`.wasm` component).
        file: PathBuf,
    },
}

fn plugin_check(
    file: &std::path::Path,
    settings: Option<&std::path::Path>,
    cache: Option<&std::path::Path>,
) -> ExitCode {
    let cache = match cache {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p.to_path_buf()),
        None => respire::plugin::default_cache_dir(),
    };
    let rt = match respire::plugin::Runtime::new(cache) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("respire: {e}");
            return ExitCode::from(1);
        }
    };
    // With settings given, the plugin is staged next to a copy of them in a directory of its
    // own, removed when the check ends (`staging` is dropped on every return).
    let staging;
    let staged;
    let path = match settings {
        Some(s) => {
            let name = file.file_name().map(|n| n.to_owned()).unwrap_or_default();
            let copied = tempfile::Builder::new()
                .prefix("respire-plugin-check-")
                .tempdir()
                .and_then(|dir| {
                    std::fs::copy(file, dir.path().join(&name))?;
                    std::fs::copy(s, dir.path().join(&name).with_extension("toml"))?;
                    Ok(dir)
                });
            match copied {
                Ok(dir) => staging = dir,
                Err(e) => {
                    eprintln!("respire: {e}");
                    return ExitCode::from(1);
                }
            }
            staged = staging.path().join(name);
            staged.as_path()
        }
        None => file,
    };
    match rt.load(path) {
        Ok(p) => {
            let m = &p.manifest;
            println!("plugin {} {}", m.name, m.version);
            println!(
                "  commands:   {}",
                if m.commands.is_empty() {
                    "-".into()
                } else {
                    m.commands.join(" ")
                }
            );
            println!(
                "  categories: {}",
                if m.categories.is_empty() {
                    "-".into()
                } else {
                    m.categories.join(" ")
                }
            );
            if !m.key_prefixes.is_empty() {
                println!("  keys under: {}", m.key_prefixes.join(" "));
            }
            println!(
                "  hooks:      {}{}",
                if m.on_request { "request " } else { "" },
                if m.on_response { "response" } else { "" }
            );
            if let Some(r) = p.response_summary() {
                println!("  responses:  {r}");
            }
            for t in p.traffic_summary() {
                println!("  traffic:    {t}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("respire: {e}");
            ExitCode::from(1)
        }
    }
}

/// Redis's spelling of a boolean setting.
fn yes_no(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" | "on" => Ok(true),
        "no" | "false" | "off" => Ok(false),
        _ => Err(format!("{s:?}: expected yes or no")),
    }
}

fn build_config(o: &Opts) -> Result<Config, String> {
    let mut c = match &o.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(v) = &o.announce {
        c.announce = Some(v.clone());
    }
    if let Some(v) = &o.listen {
        c.listen = v.clone();
    }
    if o.backend.is_some() || o.cluster.is_some() || o.shards.is_some() || o.sentinel.is_some() {
        c.backend.address = o.backend.clone();
        c.backend.cluster = o.cluster.clone().unwrap_or_default();
        c.backend.sentinel = o.sentinel.clone().unwrap_or_default();
        c.backend.master_names = o.master_name.clone().unwrap_or_default();
        c.backend.shards = o
            .shards
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(respire::config::ShardSpec::Address)
            .collect();
    }
    if let Some(v) = o.workers {
        c.workers = v;
    }
    if let Some(v) = o.worker_affinity {
        c.worker_affinity = v;
    }
    if let Some(v) = &o.requirepass {
        c.requirepass = Some(v.clone());
    }
    if let Some(v) = o.protected_mode {
        c.protected_mode = v;
    }
    if let Some(v) = &o.backend_password {
        c.backend.password = Some(v.clone());
    }
    if let Some(p) = &o.plugin_cache {
        c.plugin_cache = Some(PathBuf::from(p));
    }
    if let Some(p) = &o.plugins {
        c.plugins = Some(p.clone());
    }
    if let Some(m) = &o.metrics {
        c.metrics = Some(m.clone());
    }
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(Cmd::Plugin {
        action: PluginCmd::Check { file },
    }) = &cli.command
    {
        return plugin_check(
            file,
            cli.opts.config.as_deref(),
            cli.opts.plugin_cache.as_deref().map(std::path::Path::new),
        );
    }
    let config = match build_config(&cli.opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("respire: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Cmd::Check) = cli.command {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    // Every client and backend connection is a file descriptor: raise the soft limit as Redis does.
    let wanted = config.max_clients as u64 + 1024;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => {
            tracing::warn!(
                limit = got,
                wanted,
                "open file limit is lower than max_clients needs"
            );
        }
        _ => {}
    }
    let server = match Server::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("respire: {e}");
            return ExitCode::from(1);
        }
    };
    match server.run_until_signal() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("respire: {e}");
            ExitCode::from(1)
        }
    }
}
