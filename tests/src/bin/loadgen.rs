//! A small Redis load generator for respire's benchmarks: a SET/GET mix over many
//! connections, closed loop (as fast as replies come) or open loop (a fixed rate; when the
//! server's replies hold a connection up past the next request's due time, latency counts
//! from that due time, so a stall is not hidden), with exact latency percentiles (HDR
//! histograms). Open loop runs a single-threaded runtime per `--threads` and paces requests
//! with a 250 µs timerfd tick (tokio's own timers would release them in millisecond bursts).
//!
//! ```text
//! loadgen --port 6380 --clients 50 --requests 200000 --ratio 1:4 --keys 100000 --size 32 --pipeline 1
//! loadgen --port 6380 --clients 50 --rate 40000 --seconds 10        # open loop at 40k ops/s
//! loadgen --port 6380 --idle 10000 --seconds 5    # 10,000 connections that PING once, then sit idle
//! loadgen --port 6380 --subscribers 50 --publish-port 6379 --requests 200000 --size 64
//! ```
//! Prints one line: `ops=… p50_us=… p99_us=… p999_us=… max_us=… errors=… seconds=…`
//! (`--idle`: `idle=N` once every connection has answered its PING, then `closed` at the end).
//!
//! `--subscribers N`: pub/sub fan-out. N clients of `--port` SUBSCRIBE to one channel; one
//! publisher on `--publish-port` (Redis itself, so that only delivery goes through the target)
//! PUBLISHes `--requests` messages of `--size` bytes, `--pipeline` at a time, staying at most
//! 1,000 messages ahead of the slowest subscriber (no output-buffer limit is reached). `ops` is
//! messages per second each subscriber received, `requests` the deliveries (messages ×
//! subscribers), latencies from PUBLISH to delivery, `errors` messages that never arrived.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

#[derive(Clone)]
struct Args {
    host: String,
    port: u16,
    clients: usize,
    requests: u64,
    seconds: f64,
    rate: f64,
    sets: u32,
    gets: u32,
    keys: u64,
    size: usize,
    pipeline: usize,
    threads: usize,
    idle: usize,
    subscribers: usize,
    publish_port: u16,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        host: "127.0.0.1".into(),
        port: 6379,
        clients: 50,
        requests: 100_000,
        seconds: 0.0,
        rate: 0.0,
        sets: 1,
        gets: 4,
        keys: 100_000,
        size: 32,
        pipeline: 1,
        threads: 1,
        idle: 0,
        subscribers: 0,
        publish_port: 6379,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--host" => a.host = val()?,
            "--port" => a.port = val()?.parse()?,
            "--clients" => a.clients = val()?.parse()?,
            "--requests" => a.requests = val()?.parse()?,
            "--seconds" => a.seconds = val()?.parse()?,
            "--rate" => a.rate = val()?.parse()?,
            "--ratio" => {
                let v = val()?;
                let (s, g) = v.split_once(':').context("--ratio SETS:GETS, e.g. 1:4")?;
                (a.sets, a.gets) = (s.parse()?, g.parse()?);
            }
            "--keys" => a.keys = val()?.parse()?,
            "--size" => a.size = val()?.parse()?,
            "--pipeline" => a.pipeline = val()?.parse()?,
            "--threads" => a.threads = val()?.parse()?,
            "--idle" => a.idle = val()?.parse()?,
            "--subscribers" => a.subscribers = val()?.parse()?,
            "--publish-port" => a.publish_port = val()?.parse()?,
            "--help" | "-h" => {
                println!("see the module documentation at the top of tests/src/bin/loadgen.rs");
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if a.clients == 0 || a.pipeline == 0 || a.sets + a.gets == 0 || a.keys == 0 {
        bail!("clients, pipeline, keys and the ratio must be above zero");
    }
    if a.subscribers > 0 && a.size < 20 {
        bail!("--subscribers needs --size of at least 20 (messages carry their send time)");
    }
    if a.rate > 0.0 && a.seconds <= 0.0 {
        a.seconds = 10.0;
    }
    Ok(a)
}

/// Counts complete RESP replies at the start of `buf`; returns (replies, errors, bytes used).
fn scan_replies(buf: &[u8], want: usize) -> (usize, usize, usize) {
    let (mut n, mut errors, mut at) = (0, 0, 0);
    while n < want {
        let Some(line_end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            break;
        };
        let line = &buf[at..at + line_end];
        let mut end = at + line_end + 2;
        match line.first() {
            Some(b'$') => {
                let len: i64 = std::str::from_utf8(&line[1..])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(-1);
                if len >= 0 {
                    end += len as usize + 2;
                    if end > buf.len() {
                        break;
                    }
                }
            }
            Some(b'-') => errors += 1,
            _ => {}
        }
        at = end;
        n += 1;
    }
    (n, errors, at)
}

struct Outcome {
    hist: Histogram<u64>,
    done: u64,
    errors: u64,
}

impl Outcome {
    fn new() -> Result<Outcome> {
        Ok(Outcome {
            hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
            done: 0,
            errors: 0,
        })
    }

    fn add(&mut self, o: Outcome) -> Result<()> {
        self.hist.add(&o.hist)?;
        self.done += o.done;
        self.errors += o.errors;
        Ok(())
    }
}

/// When a load starts and stops: at `deadline`, or after `quota` requests per connection.
#[derive(Clone, Copy)]
struct Run {
    start: Instant,
    deadline: Option<Instant>,
    quota: u64,
}

/// Runs the connections `streams` (numbered) on the current runtime, paced (open loop) or
/// not, and adds up what they measured.
async fn clients(
    args: Args,
    streams: Vec<(usize, std::net::TcpStream)>,
    run: Run,
    paced: bool,
) -> Result<Outcome> {
    let pacer = paced.then(Pacer::start).transpose()?;
    let mut tasks = Vec::with_capacity(streams.len());
    for (i, s) in streams {
        let s = TcpStream::from_std(s)?;
        tasks.push(tokio::spawn(client(args.clone(), s, i, run, pacer.clone())));
    }
    let mut total = Outcome::new()?;
    for t in tasks {
        total.add(t.await??)?;
    }
    Ok(total)
}

async fn client(
    args: Args,
    mut s: TcpStream,
    id: usize,
    run: Run,
    pacer: Option<Arc<Pacer>>,
) -> Result<Outcome> {
    let Run {
        start,
        deadline,
        quota,
    } = run;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let value = vec![b'x'; args.size];
    let value_header = format!("${}\r\n", value.len()).into_bytes();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ (id as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Open loop: this client's share of the rate, requests evenly spaced from `start`.
    let interval = pacer.map(|p| {
        (
            p,
            Duration::from_secs_f64(args.clients as f64 * args.pipeline as f64 / args.rate),
        )
    });
    let mut out = Vec::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0usize;
    let (mut done, mut errors, mut batch_no) = (0u64, 0u64, 0u64);
    loop {
        if quota > 0 && done >= quota {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let due = match interval {
            Some((ref pacer, iv)) => {
                let due = start + iv.mul_f64(batch_no as f64 + (id as f64 / args.clients as f64));
                if Instant::now() >= due {
                    // Held up by the server's previous replies: the wait counts (no
                    // coordinated omission).
                    due
                } else {
                    // On time: the pacer's tick may wake this connection up to `PACER_TICK`
                    // late, which must not count.
                    pacer.sleep_until(due).await;
                    Instant::now()
                }
            }
            None => Instant::now(),
        };
        batch_no += 1;
        out.clear();
        for _ in 0..args.pipeline {
            // "key:" and 12 digits, written without allocating.
            let mut key = *b"key:000000000000";
            let mut k = next() % args.keys;
            for d in key[4..].iter_mut().rev() {
                *d = b'0' + (k % 10) as u8;
                k /= 10;
            }
            if (next() % u64::from(args.sets + args.gets)) < u64::from(args.sets) {
                out.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$16\r\n");
                out.extend_from_slice(&key);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&value_header);
                out.extend_from_slice(&value);
                out.extend_from_slice(b"\r\n");
            } else {
                out.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$16\r\n");
                out.extend_from_slice(&key);
                out.extend_from_slice(b"\r\n");
            }
        }
        s.write_all(&out).await?;
        let mut got = 0;
        while got < args.pipeline {
            let (n, e, used) = scan_replies(&buf[..have], args.pipeline - got);
            got += n;
            errors += e as u64;
            buf.copy_within(used..have, 0);
            have -= used;
            if got == args.pipeline {
                break;
            }
            if have == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            let r = s.read(&mut buf[have..]).await?;
            if r == 0 {
                bail!("connection closed");
            }
            have += r;
        }
        let us = due.elapsed().as_micros().max(1) as u64;
        for _ in 0..args.pipeline {
            hist.saturating_record(us);
        }
        done += args.pipeline as u64;
    }
    Ok(Outcome { hist, done, errors })
}

/// Open-loop pacing. tokio's timers round up to the next millisecond, so every connection
/// due within one millisecond would send at the same instant: bursts of dozens of requests
/// whose queueing, not the server, would make the latency. A pacer is a task on a periodic
/// timerfd (exact, no timer slack) that wakes, every `PACER_TICK`, the connections that are
/// due; each thread has its own, so a wake-up never crosses threads.
struct Pacer {
    waiting: Mutex<Vec<(Instant, Waker)>>,
}

const PACER_TICK: Duration = Duration::from_micros(250);

/// A timerfd as tokio's reactor takes it (nix's `TimerFd` gives only `AsFd`).
struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl Pacer {
    /// Starts a pacer on the current runtime.
    fn start() -> Result<Arc<Pacer>> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        timer.set(
            Expiration::Interval(TimeSpec::from_duration(PACER_TICK)),
            TimerSetTimeFlags::empty(),
        )?;
        // SAFETY: the timerfd is owned by the `Timer` the `AsyncFd` owns, so the descriptor
        // stays open, and the same, until the `AsyncFd` is dropped.
        #[allow(unsafe_code)]
        let timer = unsafe { AsyncFd::register_with_interest(Timer(timer), Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("timerfd: {e}"))?;
        let pacer = Arc::new(Pacer {
            waiting: Mutex::new(Vec::new()),
        });
        let weak = Arc::downgrade(&pacer);
        tokio::spawn(async move {
            loop {
                let Ok(mut ready) = timer.readable().await else {
                    return;
                };
                // The expiry count (EAGAIN when the readiness was stale); either way the timer
                // is not readable now, until its next expiry.
                let fired = ready.get_inner().0.wait().is_ok();
                ready.clear_ready();
                if !fired {
                    continue;
                }
                let Some(pacer) = weak.upgrade() else { return };
                let now = Instant::now();
                let Ok(mut waiting) = pacer.waiting.lock() else {
                    return;
                };
                let mut i = 0;
                while i < waiting.len() {
                    if waiting[i].0 <= now {
                        waiting.swap_remove(i).1.wake();
                    } else {
                        i += 1;
                    }
                }
            }
        });
        Ok(pacer)
    }

    /// Returns at the first tick at or after `due` (at once if it has passed).
    async fn sleep_until(&self, due: Instant) {
        let mut registered = false;
        std::future::poll_fn(|cx| {
            if Instant::now() >= due {
                return Poll::Ready(());
            }
            if !registered && let Ok(mut waiting) = self.waiting.lock() {
                waiting.push((due, cx.waker().clone()));
                registered = true;
            }
            Poll::Pending
        })
        .await
    }
}

/// Opens `n` connections that each PING once, reports them, holds them for `seconds`.
async fn idle(args: &Args) -> Result<()> {
    let mut conns = Vec::with_capacity(args.idle);
    for chunk in 0..args.idle.div_ceil(500) {
        let n = (args.idle - chunk * 500).min(500);
        let opened: Vec<_> = (0..n)
            .map(|_| TcpStream::connect((args.host.as_str(), args.port)))
            .collect();
        for c in opened {
            let mut s = c.await.context("connect")?;
            s.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
            conns.push(s);
        }
        for s in conns.iter_mut().skip(chunk * 500) {
            let mut b = [0u8; 7];
            s.read_exact(&mut b).await?;
            if &b != b"+PONG\r\n" {
                bail!("unexpected reply {:?}", String::from_utf8_lossy(&b));
            }
        }
    }
    println!("idle={}", conns.len());
    tokio::time::sleep(Duration::from_secs_f64(args.seconds.max(1.0))).await;
    drop(conns);
    println!("closed");
    Ok(())
}

/// How far the publisher may run ahead of the slowest subscriber, in messages.
const PUBLISH_WINDOW: u64 = 1000;

/// One subscriber: reads messages until `messages` arrived or `deadline`, recording each one's
/// latency from the send time it carries. Returns (histogram, messages received).
async fn subscriber(
    mut s: TcpStream,
    messages: u64,
    epoch: Instant,
    deadline: Instant,
    seen: std::sync::Arc<AtomicU64>,
) -> Result<(Histogram<u64>, u64)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut have, mut got) = (0usize, 0u64);
    while got < messages {
        let r = match tokio::time::timeout_at(deadline.into(), s.read(&mut buf[have..])).await {
            Ok(r) => r?,
            Err(_) => break,
        };
        if r == 0 {
            bail!("subscriber connection closed after {got} messages");
        }
        have += r;
        let now = epoch.elapsed().as_nanos() as u64;
        let mut at = 0;
        // `*3\r\n$7\r\nmessage\r\n$<n>\r\n<channel>\r\n$<n>\r\n<send time, 20 digits>…\r\n`
        while let Some(end) = message_end(&buf[at..have]) {
            let body = &buf[at..at + end];
            if let Some(sent) = send_time(body) {
                hist.saturating_record((now.saturating_sub(sent) / 1000).max(1));
                got += 1;
            }
            at += end;
        }
        buf.copy_within(at..have, 0);
        have -= at;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        seen.store(got, Ordering::Relaxed);
    }
    Ok((hist, got))
}

/// The length of the complete three-element array at the start of `b`, if it is all there.
fn message_end(b: &[u8]) -> Option<usize> {
    let mut at = b.windows(2).position(|w| w == b"\r\n")? + 2;
    for _ in 0..3 {
        let line = b.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let len: usize = std::str::from_utf8(b.get(at + 1..at + line)?)
            .ok()?
            .parse()
            .ok()?;
        at += line + 2 + len + 2;
        if at > b.len() {
            return None;
        }
    }
    Some(at)
}

/// The send time (nanoseconds since the run's epoch) a message's payload starts with.
fn send_time(message: &[u8]) -> Option<u64> {
    // The payload is the last bulk string: after its `$<len>\r\n`.
    let payload_at = message
        .windows(2)
        .enumerate()
        .filter(|(_, w)| *w == b"\r\n")
        .nth(5)?
        .0
        + 2;
    std::str::from_utf8(message.get(payload_at..payload_at + 20)?)
        .ok()?
        .parse()
        .ok()
}

/// Pub/sub fan-out through the target (see the module documentation).
async fn fan_out(args: &Args) -> Result<(Histogram<u64>, u64, u64, f64)> {
    let channel = b"loadgen-bench";
    let mut subs = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let mut s = TcpStream::connect((args.host.as_str(), args.port))
            .await
            .context("connect")?;
        s.write_all(format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n", channel.len()).as_bytes())
            .await?;
        s.write_all(channel).await?;
        s.write_all(b"\r\n").await?;
        let mut b = [0u8; 64];
        let want =
            format!("*3\r\n$9\r\nsubscribe\r\n${}\r\n", channel.len()).len() + channel.len() + 6;
        s.read_exact(&mut b[..want])
            .await
            .context("SUBSCRIBE reply")?;
        subs.push(s);
    }
    // Each SUBSCRIBE was answered (respire answers once the backend confirmed): every message
    // published from now on reaches every subscriber.
    let mut publisher = TcpStream::connect((args.host.as_str(), args.publish_port))
        .await
        .context("connect to the publisher port")?;
    publisher.set_nodelay(true)?;
    let messages = args.requests;
    let epoch = Instant::now();
    let deadline = epoch + Duration::from_secs(120);
    let seen: Vec<_> = (0..subs.len())
        .map(|_| std::sync::Arc::new(AtomicU64::new(0)))
        .collect();
    let tasks: Vec<_> = subs
        .into_iter()
        .zip(&seen)
        .map(|(s, seen)| tokio::spawn(subscriber(s, messages, epoch, deadline, seen.clone())))
        .collect();
    let mut out = Vec::new();
    let mut replies = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < messages && Instant::now() < deadline {
        let slowest = seen
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .min()
            .unwrap_or(sent);
        if sent >= slowest + PUBLISH_WINDOW {
            tokio::time::sleep(Duration::from_micros(50)).await;
            continue;
        }
        let batch = (args.pipeline as u64).min(messages - sent);
        out.clear();
        for _ in 0..batch {
            let mut payload = format!("{:020}", epoch.elapsed().as_nanos() as u64).into_bytes();
            payload.resize(args.size, b'x');
            out.extend_from_slice(
                format!("*3\r\n$7\r\nPUBLISH\r\n${}\r\n", channel.len()).as_bytes(),
            );
            out.extend_from_slice(channel);
            out.extend_from_slice(format!("\r\n${}\r\n", payload.len()).as_bytes());
            out.extend_from_slice(&payload);
            out.extend_from_slice(b"\r\n");
        }
        publisher.write_all(&out).await?;
        // Each reply is `:<receivers>\r\n`.
        let mut lines = 0u64;
        while lines < batch {
            let n = publisher.read(&mut replies).await?;
            if n == 0 {
                bail!("publisher connection closed");
            }
            lines += replies[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
        sent += batch;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut delivered, mut lost) = (0u64, 0u64);
    for t in tasks {
        let (h, got) = t.await??;
        hist.add(&h)?;
        delivered += got;
        lost += messages - got.min(messages);
    }
    let secs = epoch.elapsed().as_secs_f64();
    Ok((hist, delivered, lost, secs))
}

fn main() -> Result<()> {
    let args = parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    if args.idle > 0 {
        return rt.block_on(idle(&args));
    }
    if args.subscribers > 0 {
        let (hist, delivered, lost, secs) = rt.block_on(fan_out(&args))?;
        println!(
            "ops={:.0} p50_us={} p99_us={} p999_us={} max_us={} errors={} requests={} seconds={:.2}",
            delivered as f64 / args.subscribers as f64 / secs,
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            hist.value_at_quantile(0.999),
            hist.max(),
            lost,
            delivered,
            secs
        );
        return Ok(());
    }
    // Every client connects first, so that connecting never delays a request that is due.
    let mut streams = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let s = std::net::TcpStream::connect((args.host.as_str(), args.port)).context("connect")?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        streams.push((i, s));
    }
    let start = Instant::now()
        + if args.rate > 0.0 {
            Duration::from_millis(20)
        } else {
            Duration::ZERO
        };
    let deadline = (args.seconds > 0.0).then(|| start + Duration::from_secs_f64(args.seconds));
    let quota = if deadline.is_some() {
        0
    } else {
        args.requests.div_ceil(args.clients as u64)
    };
    let run = Run {
        start,
        deadline,
        quota,
    };
    let total = if args.rate > 0.0 {
        // Open loop: a single-threaded runtime and a pacer per thread, so that waking a
        // connection that is due never crosses threads.
        drop(rt);
        let threads = args.threads.max(1);
        let mut shares: Vec<Vec<_>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, s) in streams {
            shares[i % threads].push((i, s));
        }
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                let args = args.clone();
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?
                        .block_on(clients(args, share, run, true))
                })
            })
            .collect();
        let mut total = Outcome::new()?;
        for h in handles {
            let o = h
                .join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
            total.add(o)?;
        }
        total
    } else {
        rt.block_on(clients(args.clone(), streams, run, false))?
    };
    let (hist, done, errors) = (total.hist, total.done, total.errors);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ops={:.0} p50_us={} p99_us={} p999_us={} max_us={} errors={} requests={} seconds={:.2}",
        done as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        errors,
        done,
        secs
    );
    Ok(())
}
