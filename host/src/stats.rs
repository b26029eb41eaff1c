//! respire's own request metrics and its slow log.
//!
//! Per command: calls by result (`ok`, `error`) and a latency histogram, from respire
//! reading the command to its reply being queued for the client; per worker: bytes in and
//! out. They are counted on the request path without atomic read-modify-write: each worker
//! owns its block of counters and is its only writer (a relaxed load and store), and a
//! scrape adds the blocks of all workers up. Commands are labelled by their name in
//! respire's command table (a bounded set); anything else is `other`.
//!
//! The slow log keeps the latest commands slower than `slowlog_log_slower_than`, like
//! Redis's, with the client and the backend node they went to (`SLOWLOG GET|LEN|RESET`).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::metrics::LATENCY_BUCKETS;

/// The label of commands respire's table does not know.
pub const OTHER: u16 = u16::MAX;

/// Bucket bounds in nanoseconds (then +Inf): [`LATENCY_BUCKETS`] (checked by a test).
const BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

fn bump(a: &AtomicU64, n: u64) {
    // Only the owning worker writes: no read-modify-write needed.
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// One worker's counters.
pub struct WorkerStats {
    commands: usize,
    /// Per command: [ok, error].
    calls: Box<[AtomicU64]>,
    /// Per command: one counter per bucket (not cumulative), +Inf last.
    buckets: Box<[AtomicU64]>,
    /// Per command: total latency in nanoseconds.
    sum_ns: Box<[AtomicU64]>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl WorkerStats {
    fn new(commands: usize) -> WorkerStats {
        let zeros = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        let nb = LATENCY_BUCKETS.len() + 1;
        WorkerStats {
            commands,
            calls: zeros((commands + 1) * 2),
            buckets: zeros((commands + 1) * nb),
            sum_ns: zeros(commands + 1),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    fn slot(&self, id: u16) -> usize {
        if (id as usize) < self.commands {
            id as usize
        } else {
            self.commands
        }
    }

    /// Counts a reply to command `id` (its number in the command table, or [`OTHER`]).
    pub fn record(&self, id: u16, error: bool, elapsed: Duration) {
        self.record_n(id, error, elapsed, 1);
    }

    /// Counts `n` replies to command `id` that took the same time.
    pub fn record_n(&self, id: u16, error: bool, elapsed: Duration, n: u64) {
        let i = self.slot(id);
        bump(&self.calls[i * 2 + usize::from(error)], n);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.sum_ns[i], ns.saturating_mul(n));
        let b = BOUNDS_NS.partition_point(|&bound| bound < ns);
        bump(&self.buckets[i * (BOUNDS_NS.len() + 1) + b], n);
    }

    /// Counts bytes read from and written to clients.
    pub fn bytes(&self, read: usize, written: usize) {
        if read > 0 {
            bump(&self.bytes_in, read as u64);
        }
        if written > 0 {
            bump(&self.bytes_out, written as u64);
        }
    }
}

struct Registry {
    names: Arc<Vec<String>>,
    workers: Vec<Arc<WorkerStats>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    Mutex::new(Registry {
        names: Arc::default(),
        workers: Vec::new(),
    })
});

/// A new worker's block of counters; `names` are the command table's names by number.
pub fn register_worker(names: &Arc<Vec<String>>) -> Arc<WorkerStats> {
    let stats = Arc::new(WorkerStats::new(names.len()));
    let mut r = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    r.names = names.clone();
    r.workers.push(stats.clone());
    stats
}

/// Totals over all workers: (commands processed, errors, bytes in, bytes out).
pub fn totals() -> (u64, u64, u64, u64) {
    let r = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let mut t = (0, 0, 0, 0);
    for w in &r.workers {
        for (i, c) in w.calls.iter().enumerate() {
            let v = c.load(Ordering::Relaxed);
            t.0 += v;
            if i % 2 == 1 {
                t.1 += v;
            }
        }
        t.2 += w.bytes_in.load(Ordering::Relaxed);
        t.3 += w.bytes_out.load(Ordering::Relaxed);
    }
    t
}

/// Appends the request metrics in Prometheus's text format.
pub fn render(out: &mut String) {
    let r = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let n = r.names.len() + 1;
    let nb = BOUNDS_NS.len() + 1;
    let mut calls = vec![0u64; n * 2];
    let mut buckets = vec![0u64; n * nb];
    let mut sums = vec![0u64; n];
    let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
    for w in &r.workers {
        for (a, b) in calls.iter_mut().zip(w.calls.iter()) {
            *a += b.load(Ordering::Relaxed);
        }
        for (a, b) in buckets.iter_mut().zip(w.buckets.iter()) {
            *a += b.load(Ordering::Relaxed);
        }
        for (a, b) in sums.iter_mut().zip(w.sum_ns.iter()) {
            *a += b.load(Ordering::Relaxed);
        }
        bytes_in += w.bytes_in.load(Ordering::Relaxed);
        bytes_out += w.bytes_out.load(Ordering::Relaxed);
    }
    let name = |i: usize| r.names.get(i).map_or("other", String::as_str);
    let _ = writeln!(
        out,
        "# HELP respire_commands_total Commands answered, by command and result (ok, error)."
    );
    let _ = writeln!(out, "# TYPE respire_commands_total counter");
    for i in 0..n {
        for (k, result) in ["ok", "error"].iter().enumerate() {
            let v = calls[i * 2 + k];
            if v > 0 {
                let _ = writeln!(
                    out,
                    "respire_commands_total{{command=\"{}\",result=\"{result}\"}} {v}",
                    name(i)
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP respire_command_duration_seconds Time from respire reading a command to its reply being ready for the client, by command."
    );
    let _ = writeln!(out, "# TYPE respire_command_duration_seconds histogram");
    for i in 0..n {
        let count: u64 = buckets[i * nb..(i + 1) * nb].iter().sum();
        if count == 0 {
            continue;
        }
        let mut cumulative = 0;
        for (b, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += buckets[i * nb + b];
            let _ = writeln!(
                out,
                "respire_command_duration_seconds_bucket{{command=\"{}\",le=\"{le}\"}} {cumulative}",
                name(i)
            );
        }
        let _ = writeln!(
            out,
            "respire_command_duration_seconds_bucket{{command=\"{}\",le=\"+Inf\"}} {count}",
            name(i)
        );
        let _ = writeln!(
            out,
            "respire_command_duration_seconds_sum{{command=\"{}\"}} {}",
            name(i),
            sums[i] as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "respire_command_duration_seconds_count{{command=\"{}\"}} {count}",
            name(i)
        );
    }
    let _ = writeln!(
        out,
        "# HELP respire_client_bytes_total Bytes read from (in) and written to (out) client connections."
    );
    let _ = writeln!(out, "# TYPE respire_client_bytes_total counter");
    let _ = writeln!(
        out,
        "respire_client_bytes_total{{direction=\"in\"}} {bytes_in}"
    );
    let _ = writeln!(
        out,
        "respire_client_bytes_total{{direction=\"out\"}} {bytes_out}"
    );
}

/// One slow-log entry.
#[derive(Clone)]
pub struct SlowEntry {
    /// Increasing id.
    pub id: u64,
    /// Unix time (seconds) when the command was read.
    pub timestamp: u64,
    /// How long it took, in microseconds.
    pub duration_us: u64,
    /// The command's arguments (at most 32, each at most 128 bytes, as Redis keeps them).
    pub args: Vec<Bytes>,
    /// The client's address.
    pub client: Arc<str>,
    /// The client's name.
    pub name: Bytes,
    /// The backend node it went to (empty when none, or several).
    pub node: Arc<str>,
}

/// The slow log.
#[derive(Default)]
pub struct SlowLog {
    entries: Mutex<(u64, VecDeque<SlowEntry>)>,
    /// `slowlog_log_slower_than` in µs (negative: off), and `slowlog_max_len`; set from the
    /// configuration and by `CONFIG SET slowlog-log-slower-than|slowlog-max-len`.
    threshold: std::sync::atomic::AtomicI64,
    max_len: std::sync::atomic::AtomicUsize,
}

impl SlowLog {
    /// A slow log with these settings.
    pub fn new(threshold_us: i64, max_len: usize) -> SlowLog {
        let log = SlowLog::default();
        log.set_threshold(threshold_us);
        log.set_max_len(max_len);
        log
    }

    /// Commands slower than this (µs) are logged; negative: none.
    pub fn threshold(&self) -> i64 {
        self.threshold.load(Ordering::Relaxed)
    }

    /// See [`SlowLog::threshold`].
    pub fn set_threshold(&self, us: i64) {
        self.threshold.store(us, Ordering::Relaxed);
    }

    /// How many entries are kept.
    pub fn max_len(&self) -> usize {
        self.max_len.load(Ordering::Relaxed)
    }

    /// See [`SlowLog::max_len`]; the oldest entries beyond it go at once.
    pub fn set_max_len(&self, n: usize) {
        self.max_len.store(n, Ordering::Relaxed);
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .truncate(n);
    }

    /// Adds an entry (`max` entries are kept; the oldest go first).
    pub fn push(&self, mut e: SlowEntry, max: usize) {
        let mut g = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.id = g.0;
        g.0 += 1;
        g.1.push_front(e);
        g.1.truncate(max);
    }

    /// The newest `count` entries, newest first.
    pub fn get(&self, count: usize) -> Vec<SlowEntry> {
        let g = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter().take(count).cloned().collect()
    }

    /// How many entries are kept.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .len()
    }

    /// Whether no entry is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every entry.
    pub fn reset(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clear();
    }
}

/// Replaces the arguments Redis keeps out of its slow log and `MONITOR` with `(redacted)`, by
/// Redis's rules: `AUTH`'s user and password, `HELLO … AUTH user password`, everything after
/// `ACL SETUSER`, the values of `CONFIG SET` for credentials (`masteruser`, `masterauth`,
/// `requirepass`), and `MIGRATE … AUTH password` / `AUTH2 user password`.
pub fn redact(args: &mut [Bytes]) {
    const REDACTED: Bytes = Bytes::from_static(b"(redacted)");
    let is = |a: &Bytes, s: &str| a.eq_ignore_ascii_case(s.as_bytes());
    let Some(name) = args.first() else { return };
    if is(name, "auth") {
        for a in args.iter_mut().skip(1).take(2) {
            *a = REDACTED;
        }
    } else if is(name, "hello") {
        let mut j = 2;
        while j < args.len() {
            if is(&args[j], "auth") && j + 2 < args.len() {
                args[j + 1] = REDACTED;
                args[j + 2] = REDACTED;
                j += 3;
            } else {
                j += 1;
            }
        }
    } else if is(name, "acl") {
        if args.len() >= 3 && is(&args[1], "setuser") {
            for a in args.iter_mut().skip(2) {
                *a = REDACTED;
            }
        }
    } else if is(name, "config") {
        if args.len() >= 2 && is(&args[1], "set") {
            let mut j = 2;
            while j + 1 < args.len() {
                if ["masteruser", "masterauth", "requirepass"]
                    .iter()
                    .any(|c| is(&args[j], c))
                {
                    args[j + 1] = REDACTED;
                }
                j += 2;
            }
        }
    } else if is(name, "migrate") {
        let mut j = 6;
        while j < args.len() {
            if is(&args[j], "auth") && j + 1 < args.len() {
                args[j + 1] = REDACTED;
                j += 2;
            } else if is(&args[j], "auth2") && j + 2 < args.len() {
                args[j + 1] = REDACTED;
                args[j + 2] = REDACTED;
                j += 3;
            } else {
                j += 1;
            }
        }
    }
}

/// A command's arguments as the slow log keeps them: at most 32 (the last saying how many
/// more there were), each at most 128 bytes (saying how many more bytes there were).
pub fn slowlog_args(args: &[Bytes]) -> Vec<Bytes> {
    let mut kept: Vec<Bytes> = Vec::with_capacity(args.len().min(32));
    for (i, a) in args.iter().enumerate() {
        if i == 31 && args.len() > 32 {
            kept.push(Bytes::from(format!(
                "... ({} more arguments)",
                args.len() - 31
            )));
            break;
        }
        if a.len() > 128 {
            let mut s = a.slice(..128).to_vec();
            s.extend_from_slice(format!("... ({} more bytes)", a.len() - 128).as_bytes());
            kept.push(Bytes::from(s));
        } else {
            kept.push(a.clone());
        }
    }
    kept
}

/// Process metrics from `/proc/self` (Linux): CPU seconds, resident and virtual memory,
/// open and maximum file descriptors, start time.
pub fn render_process(out: &mut String) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports times in clock ticks (USER_HZ, 100) and memory in pages (4 KiB on
    // x86-64 and aarch64).
    let ticks = 100.0;
    let page = 4096.0;
    let (utime, stime, start, vsize, rss) = (num(11), num(12), num(19), num(20), num(21));
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("btime ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0);
    let fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    let metrics: [(&str, &str, &str, f64); 6] = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (utime + stime) / ticks,
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss * page,
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds as f64,
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max_fds,
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + start / ticks,
        ),
    ];
    for (name, kind, help, v) in metrics {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_are_the_latency_buckets() {
        let want: Vec<u64> = LATENCY_BUCKETS
            .iter()
            .map(|s| (s * 1e9).round() as u64)
            .collect();
        assert_eq!(BOUNDS_NS.to_vec(), want);
        let w = WorkerStats::new(1);
        w.record(0, false, Duration::from_micros(10));
        w.record(0, false, Duration::from_nanos(10_001));
        assert_eq!(w.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(w.buckets[1].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn credentials_are_redacted_as_redis_does() {
        let run = |cmd: &str| {
            let mut args: Vec<Bytes> = cmd.split(' ').map(|a| Bytes::from(a.to_string())).collect();
            redact(&mut args);
            args.iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(run("AUTH pw"), "AUTH (redacted)");
        assert_eq!(run("auth user pw"), "auth (redacted) (redacted)");
        assert_eq!(
            run("HELLO 3 AUTH u p SETNAME n"),
            "HELLO 3 AUTH (redacted) (redacted) SETNAME n"
        );
        assert_eq!(
            run("acl setuser u on >pw +@all"),
            "acl setuser (redacted) (redacted) (redacted) (redacted)"
        );
        assert_eq!(run("acl getuser u"), "acl getuser u");
        assert_eq!(
            run("config set masterauth x maxmemory 10 requirepass y"),
            "config set masterauth (redacted) maxmemory 10 requirepass (redacted)"
        );
        assert_eq!(run("config get masterauth"), "config get masterauth");
        assert_eq!(
            run("migrate h 1 key 9 5000 AUTH pw"),
            "migrate h 1 key 9 5000 AUTH (redacted)"
        );
        assert_eq!(
            run("migrate h 1 key 9 5000 COPY AUTH2 u pw"),
            "migrate h 1 key 9 5000 COPY AUTH2 (redacted) (redacted)"
        );
        assert_eq!(run("migrate h 1 auth 9 5000"), "migrate h 1 auth 9 5000");
    }

    #[test]
    fn slow_log_arguments_are_cut_like_redis() {
        let args: Vec<Bytes> = (0..40).map(|i| Bytes::from(format!("a{i}"))).collect();
        let kept = slowlog_args(&args);
        assert_eq!(kept.len(), 32);
        assert_eq!(kept[31], Bytes::from("... (9 more arguments)"));
        let long = [Bytes::from(vec![b'x'; 200])];
        let kept = slowlog_args(&long);
        assert!(kept[0].ends_with(b"... (72 more bytes)") && kept[0].starts_with(&[b'x'; 128]));
    }

    #[test]
    fn counts_add_up_over_workers() {
        let names = Arc::new(vec!["get".to_string(), "set".to_string()]);
        let a = WorkerStats::new(2);
        let b = WorkerStats::new(2);
        a.record(0, false, Duration::from_micros(5));
        b.record(0, true, Duration::from_millis(3));
        b.record(OTHER, false, Duration::from_secs(60));
        let mut r = REGISTRY.lock().unwrap();
        r.names = names;
        r.workers = vec![Arc::new(a), Arc::new(b)];
        drop(r);
        let mut out = String::new();
        render(&mut out);
        assert!(
            out.contains("respire_commands_total{command=\"get\",result=\"ok\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("respire_commands_total{command=\"get\",result=\"error\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("respire_commands_total{command=\"other\",result=\"ok\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains(
                "respire_command_duration_seconds_bucket{command=\"get\",le=\"0.00001\"} 1\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "respire_command_duration_seconds_bucket{command=\"get\",le=\"0.005\"} 2\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "respire_command_duration_seconds_bucket{command=\"other\",le=\"10\"} 0\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "respire_command_duration_seconds_bucket{command=\"other\",le=\"+Inf\"} 1\n"
            ),
            "{out}"
        );
        assert!(
            !out.contains("command=\"set\""),
            "unused commands have no series"
        );
    }
}
