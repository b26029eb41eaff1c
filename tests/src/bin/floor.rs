//! A yardstick for the benchmarks, not a product: the least work a proxy can do that still
//! multiplexes many clients onto one pipelined backend connection, as respire does.
//!
//! One thread, one level-triggered epoll, one backend connection. A client's complete RESP
//! commands are copied to the backend's output as they are, with no command table, no routing
//! and no hooks, and a FIFO remembers whose they were; the backend's replies are walked in the
//! same order and copied to their clients. Each turn of the loop makes at most one read per
//! ready socket, one write to the backend for all the clients served in the turn, and one write
//! per client with replies: the system calls respire makes, with almost nothing around them.
//! What it reaches against direct Redis on a machine is what any multiplexing proxy can reach
//! there (see BENCHMARKS.md, "The floor").
//!
//! ```text
//! floor --listen 127.0.0.1:7000 --backend 127.0.0.1:6379
//! ```
//! Multibulk requests only (what client libraries and redis-benchmark send), RESP2 replies;
//! commands whose reply count is not one per command (SUBSCRIBE, MONITOR) are not for it.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

const LISTENER: u64 = u64::MAX;
const BACKEND: u64 = u64::MAX - 1;
const READ_SIZE: usize = 64 * 1024;

struct Client {
    stream: TcpStream,
    /// An incomplete command carried over to the next read.
    input: Vec<u8>,
    /// Replies not yet written.
    output: Vec<u8>,
    generation: u32,
    /// In this turn's list of clients to write to.
    queued: bool,
    /// Registered for writability (its last write was partial).
    writing: bool,
}

/// Where the RESP value starting at `at` ends: `Ok(None)` while incomplete.
fn frame_end(buf: &[u8], at: usize) -> Result<Option<usize>> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    let line_end = at + nl + 1;
    let number = || -> Result<i64> {
        let digits = buf
            .get(at + 1..line_end.saturating_sub(2))
            .unwrap_or_default();
        Ok(std::str::from_utf8(digits)?.parse()?)
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(line_end)),
        b'$' => {
            let n = number()?;
            if n < 0 {
                return Ok(Some(line_end));
            }
            let end = line_end + n as usize + 2;
            Ok((end <= buf.len()).then_some(end))
        }
        b'*' => {
            let mut end = line_end;
            for _ in 0..number()?.max(0) {
                match frame_end(buf, end)? {
                    Some(e) => end = e,
                    None => return Ok(None),
                }
            }
            Ok(Some(end))
        }
        other => bail!("unexpected RESP type byte {other:#04x}"),
    }
}

struct Floor {
    epoll: Epoll,
    clients: Vec<Option<Client>>,
    free: Vec<usize>,
    generation: u32,
    /// (client slot, its generation, commands whose replies are due), oldest first.
    fifo: VecDeque<(usize, u32, u32)>,
    backend: TcpStream,
    backend_in: Vec<u8>,
    backend_out: Vec<u8>,
    backend_writing: bool,
    dirty: Vec<usize>,
    scratch: Vec<u8>,
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted)
}

impl Floor {
    fn accept(&mut self, listener: &TcpListener) -> Result<()> {
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return Ok(()),
                Err(e) => {
                    eprintln!("accept: {e}");
                    return Ok(());
                }
            };
            stream.set_nonblocking(true)?;
            stream.set_nodelay(true)?;
            let slot = self.free.pop().unwrap_or(self.clients.len());
            self.epoll
                .add(&stream, EpollEvent::new(EpollFlags::EPOLLIN, slot as u64))?;
            self.generation = self.generation.wrapping_add(1);
            let client = Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                generation: self.generation,
                queued: false,
                writing: false,
            };
            if slot == self.clients.len() {
                self.clients.push(Some(client));
            } else {
                self.clients[slot] = Some(client);
            }
        }
    }

    fn close(&mut self, slot: usize) {
        if let Some(c) = self.clients[slot].take() {
            let _ = self.epoll.delete(&c.stream);
            self.free.push(slot);
        }
    }

    fn client_readable(&mut self, slot: usize) -> Result<()> {
        let Some(c) = self.clients[slot].as_mut() else {
            return Ok(());
        };
        let n = match c.stream.read(&mut self.scratch) {
            Ok(0) => {
                self.close(slot);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if would_block(&e) => return Ok(()),
            Err(_) => {
                self.close(slot);
                return Ok(());
            }
        };
        let mut owned = Vec::new();
        let buf = with_carry(&mut c.input, &self.scratch[..n], &mut owned);
        let (mut at, mut commands) = (0, 0u32);
        loop {
            match frame_end(buf, at) {
                Ok(Some(end)) => {
                    at = end;
                    commands += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("client {slot}: {e}");
                    self.close(slot);
                    return Ok(());
                }
            }
        }
        self.backend_out.extend_from_slice(&buf[..at]);
        c.input.extend_from_slice(&buf[at..]);
        if commands > 0 {
            self.fifo.push_back((slot, c.generation, commands));
        }
        Ok(())
    }

    fn backend_readable(&mut self) -> Result<()> {
        let n = match self.backend.read(&mut self.scratch) {
            Ok(0) => bail!("the backend closed the connection"),
            Ok(n) => n,
            Err(e) if would_block(&e) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut owned = Vec::new();
        let buf = with_carry(&mut self.backend_in, &self.scratch[..n], &mut owned);
        let mut at = 0;
        'replies: while at < buf.len() {
            let Some(front) = self.fifo.front_mut() else {
                bail!("a reply nobody asked for")
            };
            // The run of replies owed to the front client, copied in one piece.
            let start = at;
            while front.2 > 0 {
                match frame_end(buf, at)? {
                    Some(end) => {
                        at = end;
                        front.2 -= 1;
                    }
                    None => break,
                }
            }
            let (slot, generation, left) = *front;
            if left == 0 {
                self.fifo.pop_front();
            }
            if at > start
                && let Some(c) = self.clients[slot]
                    .as_mut()
                    .filter(|c| c.generation == generation)
            {
                c.output.extend_from_slice(&buf[start..at]);
                if !c.queued {
                    c.queued = true;
                    self.dirty.push(slot);
                }
            }
            if left > 0 {
                break 'replies;
            }
        }
        self.backend_in.extend_from_slice(&buf[at..]);
        Ok(())
    }

    fn flush_backend(&mut self) -> Result<()> {
        while !self.backend_out.is_empty() {
            match self.backend.write(&self.backend_out) {
                Ok(n) => drop(self.backend_out.drain(..n)),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        let want = !self.backend_out.is_empty();
        if want != self.backend_writing {
            self.backend_writing = want;
            watch(&self.epoll, &self.backend, want, BACKEND)?;
        }
        Ok(())
    }

    fn flush_client(&mut self, slot: usize) -> Result<()> {
        let Some(c) = self.clients[slot].as_mut() else {
            return Ok(());
        };
        c.queued = false;
        while !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(n) => drop(c.output.drain(..n)),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close(slot);
                    return Ok(());
                }
            }
        }
        let want = !c.output.is_empty();
        if want != c.writing {
            c.writing = want;
            watch(&self.epoll, &c.stream, want, slot as u64)?;
        }
        Ok(())
    }
}

/// What to parse: the bytes just read alone or, after an incomplete rest carried over from
/// the last read, both (the rest moved out of `carry` into `owned`).
fn with_carry<'a>(carry: &mut Vec<u8>, fresh: &'a [u8], owned: &'a mut Vec<u8>) -> &'a [u8] {
    if carry.is_empty() {
        return fresh;
    }
    carry.extend_from_slice(fresh);
    *owned = std::mem::take(carry);
    owned
}

/// Waits for `stream` to be readable, and writable too while `writing` (output is left).
fn watch(epoll: &Epoll, stream: &TcpStream, writing: bool, data: u64) -> Result<()> {
    let flags = if writing {
        EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT
    } else {
        EpollFlags::EPOLLIN
    };
    epoll.modify(stream, &mut EpollEvent::new(flags, data))?;
    Ok(())
}

fn main() -> Result<()> {
    let (mut listen, mut backend) = (
        String::from("127.0.0.1:7000"),
        String::from("127.0.0.1:6379"),
    );
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value?,
            "--backend" => backend = value?,
            other => bail!("unknown flag {other} (floor --listen ADDR --backend ADDR)"),
        }
    }
    let listener = TcpListener::bind(&listen).with_context(|| format!("listening on {listen}"))?;
    listener.set_nonblocking(true)?;
    let upstream =
        TcpStream::connect(&backend).with_context(|| format!("connecting to {backend}"))?;
    upstream.set_nonblocking(true)?;
    upstream.set_nodelay(true)?;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
    epoll.add(&upstream, EpollEvent::new(EpollFlags::EPOLLIN, BACKEND))?;
    let mut floor = Floor {
        epoll,
        clients: Vec::new(),
        free: Vec::new(),
        generation: 0,
        fifo: VecDeque::new(),
        backend: upstream,
        backend_in: Vec::new(),
        backend_out: Vec::new(),
        backend_writing: false,
        dirty: Vec::new(),
        scratch: vec![0; READ_SIZE],
    };
    let mut events = vec![EpollEvent::empty(); 1024];
    loop {
        let n = match floor.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => floor.accept(&listener)?,
                BACKEND => {
                    if ev.events().intersects(
                        EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                    ) {
                        floor.backend_readable()?;
                    }
                }
                slot => {
                    let slot = slot as usize;
                    if ev.events().contains(EpollFlags::EPOLLOUT) {
                        floor.flush_client(slot)?;
                    }
                    if ev.events().intersects(
                        EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                    ) {
                        floor.client_readable(slot)?;
                    }
                }
            }
        }
        floor.flush_backend()?;
        let dirty = std::mem::take(&mut floor.dirty);
        for &slot in &dirty {
            floor.flush_client(slot)?;
        }
        floor.dirty = dirty;
        floor.dirty.clear();
    }
}
