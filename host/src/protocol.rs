//! RESP framing: client requests in, replies out.
//!
//! Requests are parsed the way Redis parses them (`processMultibulkBuffer` and
//! `processInlineBuffer`): arrays of bulk strings or inline commands, with the
//! same limits and the same `Protocol error: …` messages, so a client sees
//! exactly what it would see talking to Redis. Parsing is check-then-slice:
//! a complete frame is split off the read buffer and its arguments are
//! `Bytes` views into it (no copy); an incomplete frame is a normal outcome
//! and its progress is remembered, so a frame arriving in many reads is never
//! rescanned from the start.
//!
//! Replies from backends are only *measured* ([`reply_len`]): their bytes pass
//! through untouched. [`Value`] parses a reply when respire itself needs to
//! read one (handshakes, topology, merges).
//!
//! We chose a hand-written parser over `redis-protocol` here because the client
//! side must reproduce Redis's exact error texts and limits (unauthenticated
//! limits, inline quoting rules), and the reply side only needs a frame's
//! length, which is cheaper than building frames.

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;
use thiserror::Error;

/// Longest inline command or header line accepted, as in Redis (`PROTO_INLINE_MAX_SIZE`).
pub const MAX_INLINE: usize = 64 * 1024;
/// Bulk length above which Redis pre-allocates the argument (`PROTO_MBULK_BIG_ARG`).
const BIG_ARG: usize = 32 * 1024;
/// Most room made ahead of a big argument's data before it arrives.
const MAX_RESERVE_AHEAD: usize = 256 * 1024;
/// Longest request accepted (arguments are located by 32-bit offsets).
const MAX_FRAME: usize = u32::MAX as usize;
/// Limits that apply before a client has authenticated (as in Redis).
const UNAUTH_MAX_ARGS: i64 = 10;
const UNAUTH_MAX_BULK: i64 = 16 * 1024;

/// A malformed request: the client gets `-ERR Protocol error: …` and the connection is closed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A request line longer than [`MAX_INLINE`] without a newline.
    #[error("too big inline request")]
    TooBigInline,
    /// A `*N` header line longer than [`MAX_INLINE`].
    #[error("too big mbulk count string")]
    TooBigMbulkCount,
    /// A `$N` header line longer than [`MAX_INLINE`].
    #[error("too big bulk count string")]
    TooBigBulkCount,
    /// The `*N` count is not a number or exceeds the argument limit.
    #[error("invalid multibulk length")]
    InvalidMultibulkLength,
    /// More than 10 arguments before authentication.
    #[error("unauthenticated multibulk length")]
    UnauthMultibulkLength,
    /// The `$N` length is not a number, negative, or over the bulk limit.
    #[error("invalid bulk length")]
    InvalidBulkLength,
    /// A bulk over 16 KiB before authentication.
    #[error("unauthenticated bulk length")]
    UnauthBulkLength,
    /// An array element that is not a bulk string.
    #[error("expected '$', got '{0}'")]
    ExpectedBulk(char),
    /// Inline command with an unterminated quote.
    #[error("unbalanced quotes in request")]
    UnbalancedQuotes,
    /// A reply from a backend that is not valid RESP.
    #[error("invalid reply from backend")]
    InvalidReply,
}

impl ProtocolError {
    /// The error reply Redis sends for this error (without the leading `-`).
    pub fn reply_text(&self) -> String {
        format!("ERR Protocol error: {self}")
    }
}

/// Limits on what a request may contain.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Maximum number of arguments in one command.
    pub max_args: usize,
    /// Maximum length of one argument in bytes (`proto-max-bulk-len`).
    pub max_bulk: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_args: 1024 * 1024,
            max_bulk: 512 * 1024 * 1024,
        }
    }
}

/// Where one argument lies in a command's frame.
type Span = (u32, u32);

/// One client command: the frame as received (or encoded) and where each argument lies
/// in it. Arguments are read as slices of the frame, so parsing a command allocates
/// nothing for up to [`INLINE_ARGS`] arguments and touches no reference count per argument.
#[derive(Debug)]
pub struct Command {
    /// The complete RESP frame (for inline commands and rewrites: the arguments encoded).
    raw: Bytes,
    /// Where each argument lies in `raw`; `spans[0]` is the command name.
    spans: SmallVec<[Span; INLINE_ARGS]>,
}

impl Clone for Command {
    /// The spans copied as a block (`SmallVec`'s own `clone` goes through `extend`, an
    /// element at a time; a command's response chain holds a copy of it).
    fn clone(&self) -> Self {
        Command {
            raw: self.raw.clone(),
            spans: SmallVec::from_slice(&self.spans),
        }
    }
}

/// Arguments a [`Command`] holds without a heap allocation.
pub const INLINE_ARGS: usize = 6;

impl Command {
    /// Builds a command from arguments (encoded as a RESP array of bulk strings).
    pub fn from_args<A: AsRef<[u8]>>(args: &[A]) -> Self {
        let mut out =
            BytesMut::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
        let mut spans = SmallVec::with_capacity(args.len());
        array_header(&mut out, args.len());
        for a in args {
            let a = a.as_ref();
            header(&mut out, b'$', a.len() as i64);
            let start = out.len();
            out.extend_from_slice(a);
            spans.push((start as u32, (start + a.len()) as u32));
            out.extend_from_slice(b"\r\n");
        }
        Command {
            raw: out.freeze(),
            spans,
        }
    }

    /// The command name, as sent.
    pub fn name(&self) -> &[u8] {
        self.arg(0).unwrap_or_default()
    }

    /// How many arguments, the name included.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are no arguments (never true for a parsed command).
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Argument `i` (0 is the name), if present.
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        let &(s, e) = self.spans.get(i)?;
        self.raw.get(s as usize..e as usize)
    }

    /// Argument `i` as a zero-copy `Bytes` view of the frame.
    pub fn arg_bytes(&self, i: usize) -> Option<Bytes> {
        let &(s, e) = self.spans.get(i)?;
        (e as usize <= self.raw.len()).then(|| self.raw.slice(s as usize..e as usize))
    }

    /// The arguments in order, the name first.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &[u8]> + ExactSizeIterator + '_ {
        self.spans
            .iter()
            .map(|&(s, e)| self.raw.get(s as usize..e as usize).unwrap_or_default())
    }

    /// The arguments as owned views, the name first.
    pub fn to_args(&self) -> Vec<Bytes> {
        (0..self.len()).filter_map(|i| self.arg_bytes(i)).collect()
    }

    /// Writes the command as RESP.
    pub fn encode_into(&self, out: &mut BytesMut) {
        out.extend_from_slice(&self.raw);
    }

    /// The command as RESP bytes (the received frame when there is one; no copy).
    pub fn to_resp(&self) -> Bytes {
        self.raw.clone()
    }

    /// The command as RESP bytes, taken out of the command (no copy, no count taken).
    pub fn into_resp(self) -> Bytes {
        self.raw
    }

    /// The command as RESP bytes, borrowed.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// Arguments that key positions and routing read: a parsed [`Command`], or a plain list.
pub trait Args {
    /// How many arguments, the name included.
    fn argc(&self) -> usize;
    /// Argument `i` (0 is the name).
    fn argv(&self, i: usize) -> Option<&[u8]>;
}

impl Args for Command {
    fn argc(&self) -> usize {
        self.len()
    }
    fn argv(&self, i: usize) -> Option<&[u8]> {
        self.arg(i)
    }
}

impl<A: AsRef<[u8]>> Args for [A] {
    fn argc(&self) -> usize {
        self.len()
    }
    fn argv(&self, i: usize) -> Option<&[u8]> {
        self.get(i).map(|a| a.as_ref())
    }
}

impl<A: AsRef<[u8]>> Args for Vec<A> {
    fn argc(&self) -> usize {
        self.len()
    }
    fn argv(&self, i: usize) -> Option<&[u8]> {
        self.get(i).map(|a| a.as_ref())
    }
}

/// Writes arguments as a RESP array of bulk strings.
pub fn encode_args<A: AsRef<[u8]>>(out: &mut BytesMut, args: &[A]) {
    array_header(out, args.len());
    for a in args {
        bulk(out, a.as_ref());
    }
}

/// Progress through a multibulk request that has not fully arrived yet.
#[derive(Debug, Default)]
pub struct RequestParser {
    /// Arguments still expected (0 when no multibulk is in progress).
    remaining: usize,
    /// Offset in the buffer where the next unparsed header starts.
    pos: usize,
    /// Argument spans found so far, as (start, end) offsets into the buffer.
    ranges: SmallVec<[Span; INLINE_ARGS]>,
    /// Bulk length announced by a header whose payload has not fully arrived.
    pending_bulk: Option<usize>,
}

impl RequestParser {
    /// Creates a parser with no request in progress.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of the buffer the parser still needs before a pending bulk completes (a hint for reads).
    pub fn wanted(&self, buf_len: usize) -> usize {
        match self.pending_bulk {
            Some(len) => (self.pos + len + 2).saturating_sub(buf_len),
            None => 0,
        }
    }

    /// Parses the next complete command from `buf`, splitting it off.
    ///
    /// Returns `Ok(None)` when more bytes are needed. Empty requests (`*0`,
    /// blank inline lines) are consumed silently, as Redis does.
    pub fn parse(
        &mut self,
        buf: &mut BytesMut,
        limits: &RequestLimits,
        authenticated: bool,
    ) -> Result<Option<Command>, ProtocolError> {
        loop {
            if buf.is_empty() {
                return Ok(None);
            }
            if self.remaining == 0 && self.ranges.is_empty() && self.pos == 0 {
                if buf[0] != b'*' {
                    match parse_inline(buf)? {
                        Inline::Incomplete => return Ok(None),
                        Inline::Empty => continue,
                        Inline::Command(cmd) => return Ok(Some(cmd)),
                    }
                }
                // Most requests arrive whole and plainly written: one pass over them.
                if let Some((spans, end)) = plain_request(buf, limits, authenticated) {
                    let raw = buf.split_to(end).freeze();
                    return Ok(Some(Command { raw, spans }));
                }
                // Multibulk header.
                let (count, eol) = match int_line(buf, 1) {
                    Line::Int(n, eol) => (n, eol),
                    Line::Bad(_) => return Err(ProtocolError::InvalidMultibulkLength),
                    Line::Incomplete => {
                        if buf.len() > MAX_INLINE {
                            return Err(ProtocolError::TooBigMbulkCount);
                        }
                        return Ok(None);
                    }
                };
                if count > i64::from(i32::MAX) || count > limits.max_args as i64 {
                    return Err(ProtocolError::InvalidMultibulkLength);
                }
                if count > UNAUTH_MAX_ARGS && !authenticated {
                    return Err(ProtocolError::UnauthMultibulkLength);
                }
                if count <= 0 {
                    let _ = buf.split_to(eol + 2);
                    continue;
                }
                self.remaining = count as usize;
                self.pos = eol + 2;
                if self.remaining > INLINE_ARGS {
                    self.ranges.reserve(self.remaining.min(1024));
                }
            }
            while self.remaining > 0 {
                let len = match self.pending_bulk {
                    Some(len) => len,
                    None => {
                        if self.pos >= buf.len() {
                            return Ok(None);
                        }
                        let line = int_line(buf, self.pos + 1);
                        if matches!(line, Line::Incomplete) {
                            if buf.len() - self.pos > MAX_INLINE {
                                return Err(ProtocolError::TooBigBulkCount);
                            }
                            return Ok(None);
                        }
                        if buf[self.pos] != b'$' {
                            return Err(ProtocolError::ExpectedBulk(buf[self.pos] as char));
                        }
                        let Line::Int(len, eol) = line else {
                            return Err(ProtocolError::InvalidBulkLength);
                        };
                        if len < 0 || len as u64 > limits.max_bulk as u64 {
                            return Err(ProtocolError::InvalidBulkLength);
                        }
                        if len > UNAUTH_MAX_BULK && !authenticated {
                            return Err(ProtocolError::UnauthBulkLength);
                        }
                        self.pos = eol + 2;
                        let len = len as usize;
                        if self.pos + len + 2 > MAX_FRAME {
                            // Arguments are located by 32-bit offsets within their request.
                            return Err(ProtocolError::InvalidBulkLength);
                        }
                        self.pending_bulk = Some(len);
                        if len >= BIG_ARG {
                            // Make room for the argument once instead of growing repeatedly, but
                            // never more than a few MiB ahead of what has arrived: a declared
                            // size is only a claim (a client that declares 512 MiB and sends
                            // nothing must not cost 512 MiB); beyond that the buffer doubles.
                            let need = (self.pos + len + 2).saturating_sub(buf.len());
                            buf.reserve(need.min(MAX_RESERVE_AHEAD));
                        }
                        len
                    }
                };
                if buf.len() < self.pos + len + 2 {
                    return Ok(None);
                }
                self.ranges.push((self.pos as u32, (self.pos + len) as u32));
                // Like Redis, the two bytes after the payload are skipped unchecked.
                self.pos += len + 2;
                self.pending_bulk = None;
                self.remaining -= 1;
            }
            let raw = buf.split_to(self.pos).freeze();
            self.pos = 0;
            return Ok(Some(Command {
                raw,
                spans: std::mem::take(&mut self.ranges),
            }));
        }
    }
}

/// Most arguments a request read by [`plain_request`] has.
const PLAIN_MAX_ARGS: usize = 1024;

/// A request at the start of `buf` that has fully arrived and is plainly written: at most
/// [`PLAIN_MAX_ARGS`] arguments, every length canonical digits within the limits and below
/// [`BIG_ARG`]. Its arguments' spans and its length; `None` for anything else, which the
/// state machine of [`RequestParser::parse`] then reads (and refuses, when it must).
#[inline]
fn plain_request(
    buf: &[u8],
    limits: &RequestLimits,
    authenticated: bool,
) -> Option<(SmallVec<[Span; INLINE_ARGS]>, usize)> {
    let (count, mut pos) = plain_number(buf, 1)?;
    if count == 0
        || count > PLAIN_MAX_ARGS
        || count > limits.max_args
        || (count as i64 > UNAUTH_MAX_ARGS && !authenticated)
    {
        return None;
    }
    // A request cannot have more arguments than bytes left (each takes at least 6).
    if count > buf.len() / 6 {
        return None;
    }
    let mut spans = SmallVec::new();
    if count > INLINE_ARGS {
        spans.reserve_exact(count);
    }
    for _ in 0..count {
        if *buf.get(pos)? != b'$' {
            return None;
        }
        let (len, start) = plain_number(buf, pos + 1)?;
        if len >= BIG_ARG
            || len > limits.max_bulk
            || (len as i64 > UNAUTH_MAX_BULK && !authenticated)
        {
            return None;
        }
        let end = start + len;
        // Like Redis, the two bytes after the payload are skipped unchecked.
        if end + 2 > buf.len() || end + 2 > MAX_FRAME {
            return None;
        }
        spans.push((start as u32, end as u32));
        pos = end + 2;
    }
    Some((spans, pos))
}

/// A number of at most 9 canonical digits at `buf[from..]` ended by `\r\n`, and where the
/// next line starts. [`count_line`] reads the same lines, signs and checked fallback included;
/// this narrower loop is what makes the one-pass read pay (with `count_line` in its place a
/// GET at pipeline 16 cost 104 instructions more under callgrind).
#[inline(always)]
fn plain_number(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let digits = buf.get(from..)?;
    let mut v = 0usize;
    let mut i = 0;
    while let Some(&c) = digits.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v * 10 + usize::from(c - b'0');
        i += 1;
        if i > 9 {
            return None;
        }
    }
    let canonical = i > 0 && (digits[0] != b'0' || i == 1);
    (canonical && digits.get(i) == Some(&b'\r') && digits.get(i + 1) == Some(&b'\n'))
        .then_some((v, from + i + 2))
}

enum Inline {
    Incomplete,
    Empty,
    Command(Command),
}

fn parse_inline(buf: &mut BytesMut) -> Result<Inline, ProtocolError> {
    // Redis looks for the newline with `strchr`, which stops at a NUL byte: a line with a NUL
    // before its newline never completes, until it is too big.
    let Some(nl) = memchr::memchr2(b'\n', 0, buf).filter(|&i| buf[i] == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err(ProtocolError::TooBigInline);
        }
        return Ok(Inline::Incomplete);
    };
    let line = buf.split_to(nl + 1).freeze();
    let mut end = nl;
    if end > 0 && line[end - 1] == b'\r' {
        end -= 1;
    }
    let args = split_args(&line[..end]).ok_or(ProtocolError::UnbalancedQuotes)?;
    if args.is_empty() {
        return Ok(Inline::Empty);
    }
    Ok(Inline::Command(Command::from_args(&args)))
}

/// Splits an inline command line the way Redis's `sdssplitargs` does:
/// whitespace separates arguments; double quotes allow `\n \r \t \b \a \\ \" \xHH`
/// escapes; single quotes allow `\'`; a closing quote must be followed by
/// whitespace or the end. Returns `None` on unbalanced quotes.
///
/// A NUL byte ends the line, as it ends the C string Redis splits (an argument stops there,
/// and inside quotes it leaves them unbalanced).
pub fn split_args(line: &[u8]) -> Option<Vec<Bytes>> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = memchr(0, line).unwrap_or(line.len());
    loop {
        while i < n && is_space(line[i]) {
            i += 1;
        }
        if i >= n {
            return Some(args);
        }
        let mut cur = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            if in_dq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\'
                    && i + 3 < n
                    && line[i + 1] == b'x'
                    && is_hex(line[i + 2])
                    && is_hex(line[i + 3])
                {
                    cur.push(hex_val(line[i + 2]) * 16 + hex_val(line[i + 3]));
                    i += 3;
                } else if c == b'\\' && i + 1 < n {
                    i += 1;
                    cur.push(match line[i] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                } else if c == b'"' {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else if in_sq {
                if i >= n {
                    return None;
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    i += 1;
                    cur.push(b'\'');
                } else if c == b'\'' {
                    if i + 1 < n && !is_space(line[i + 1]) {
                        return None;
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                }
            } else {
                if i >= n {
                    break;
                }
                match line[i] {
                    b' ' | b'\n' | b'\r' | b'\t' => break,
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
            }
            i += 1;
        }
        args.push(Bytes::from(cur));
    }
}

fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn is_hex(c: u8) -> bool {
    c.is_ascii_hexdigit()
}

fn hex_val(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

fn memchr(needle: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr(needle, hay)
}

/// Position of the `\r` of the first `\r\n` at or after `from`.
fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    // Header lines are a few bytes long: scan those directly, then hand over to memchr.
    let short = buf.len().min(from.saturating_add(16));
    let mut i = from;
    while i + 1 < short {
        if buf[i] == b'\r' && buf[i + 1] == b'\n' {
            return Some(i);
        }
        i += 1;
    }
    while i + 1 < buf.len() {
        match memchr(b'\r', &buf[i..buf.len() - 1]) {
            Some(p) => {
                let at = i + p;
                if buf[at + 1] == b'\n' {
                    return Some(at);
                }
                i = at + 1;
            }
            None => return None,
        }
    }
    None
}

/// A header line's number (`$12\r\n` from its first digit).
enum Line {
    /// The number and where its line's `\r\n` starts.
    Int(i64, usize),
    /// A complete line that is not a number (its `\r\n` starts here).
    #[allow(dead_code)]
    Bad(usize),
    /// The line has not fully arrived.
    Incomplete,
}

/// Reads the number of a header line starting at `buf[from]` in one pass (the common case:
/// plain digits then `\r\n`), falling back to [`find_crlf`] and [`parse_i64`] for anything
/// else, so the result is exactly theirs.
#[inline(always)]
fn int_line(buf: &[u8], from: usize) -> Line {
    // Inlined into each parser (the call itself cost as much as reading a short number);
    // anything but plain digits and `\r\n` goes to the out-of-line checked path.
    let mut i = from;
    let neg = buf.get(i) == Some(&b'-');
    if neg {
        i += 1;
    }
    let start = i;
    let mut v: i64 = 0;
    // At most 18 digits here: no overflow; longer numbers take the checked path.
    while let Some(&c) = buf.get(i) {
        if !c.is_ascii_digit() || i - start >= 18 {
            break;
        }
        v = v * 10 + i64::from(c - b'0');
        i += 1;
    }
    let digits = i - start;
    let canonical = digits > 0 && (buf[start] != b'0' || (digits == 1 && !neg));
    if canonical && buf.get(i) == Some(&b'\r') && buf.get(i + 1) == Some(&b'\n') {
        return Line::Int(if neg { -v } else { v }, i);
    }
    int_line_checked(buf, from)
}

/// A line holding a number of at least zero at `buf[from..]`, read as the parsers read
/// header lines: the number and where the next line starts. `None` for a negative number,
/// anything else, or a line not fully arrived.
#[inline]
pub(crate) fn count_line(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    match int_line(buf, from) {
        Line::Int(n, eol) => Some((usize::try_from(n).ok()?, eol + 2)),
        _ => None,
    }
}

/// [`int_line`] for lines that are not plain digits (or have not fully arrived).
#[cold]
#[inline(never)]
fn int_line_checked(buf: &[u8], from: usize) -> Line {
    match find_crlf(buf, from) {
        None => Line::Incomplete,
        Some(eol) => match parse_i64(&buf[from..eol]) {
            Some(n) => Line::Int(n, eol),
            None => Line::Bad(eol),
        },
    }
}

/// Parses a decimal integer strictly (like Redis's `string2ll`): optional `-`, no `+`, no spaces, no leading zeros.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (neg, digits) = if s[0] == b'-' {
        (true, &s[1..])
    } else {
        (false, s)
    };
    if digits.is_empty() || digits[0] == b'0' {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        let d = i64::from(c - b'0');
        v = if neg {
            v.checked_mul(10)?.checked_sub(d)?
        } else {
            v.checked_mul(10)?.checked_add(d)?
        };
    }
    Some(v)
}

/// Length of the complete RESP2/RESP3 reply frame starting at `buf[0]`, or
/// `Ok(None)` if it has not fully arrived. Attributes (`|`) are counted with
/// the reply they precede.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    let mut pos = 0usize;
    // Saturating: a declared count beyond what the buffer could hold only means "incomplete"
    // (each element takes at least three bytes), and must not wrap into a short count.
    let mut remaining: usize = 1;
    while remaining > 0 {
        let Some(&kind) = buf.get(pos) else {
            return Ok(None);
        };
        remaining -= 1;
        if matches!(kind, b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(') {
            let Some(eol) = find_crlf(buf, pos) else {
                return Ok(None);
            };
            pos = eol + 2;
            continue;
        }
        if !matches!(kind, b'$' | b'!' | b'=' | b'*' | b'~' | b'>' | b'%' | b'|') {
            return Err(ProtocolError::InvalidReply);
        }
        let n = match int_line(buf, pos + 1) {
            Line::Int(n, eol) => {
                pos = eol + 2;
                n
            }
            Line::Bad(_) => return Err(ProtocolError::InvalidReply),
            Line::Incomplete => return Ok(None),
        };
        match kind {
            b'$' | b'!' | b'=' => {
                if n >= 0 {
                    pos += n as usize + 2;
                    if pos > buf.len() {
                        return Ok(None);
                    }
                } else if n != -1 {
                    return Err(ProtocolError::InvalidReply);
                }
            }
            b'*' | b'~' | b'>' => {
                if n > 0 {
                    remaining = remaining.saturating_add(n as usize);
                } else if n < -1 {
                    return Err(ProtocolError::InvalidReply);
                }
            }
            b'%' => {
                if n < 0 {
                    return Err(ProtocolError::InvalidReply);
                }
                remaining = remaining.saturating_add((n as usize).saturating_mul(2));
            }
            b'|' => {
                if n < 0 {
                    return Err(ProtocolError::InvalidReply);
                }
                // The attribute map, then the reply it annotates.
                remaining = remaining
                    .saturating_add((n as usize).saturating_mul(2))
                    .saturating_add(1);
            }
            _ => return Err(ProtocolError::InvalidReply),
        }
    }
    Ok(Some(pos))
}

/// [`reply_len`], with bulk strings, nil and `+OK` (most replies, and most elements of an
/// array reply) read inline: the call and the general loop's set-up cost more than the
/// header itself.
#[inline(always)]
pub fn reply_len_fast(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if buf.first() == Some(&b'$') {
        if let Line::Int(n, eol) = int_line(buf, 1) {
            if n >= 0 {
                let end = eol + 4 + n as usize;
                return Ok((end <= buf.len()).then_some(end));
            }
            if n == -1 {
                // The nil bulk string (a missing key).
                return Ok(Some(eol + 2));
            }
        }
    } else if buf.starts_with(b"+OK\r\n") {
        return Ok(Some(5));
    }
    reply_len(buf)
}

/// Splits the next complete reply frame off `buf` (`Ok(None)` until one has fully arrived).
pub fn next_reply(buf: &mut BytesMut) -> Result<Option<Bytes>, ProtocolError> {
    Ok(reply_len_fast(buf)?.map(|n| buf.split_to(n).freeze()))
}

/// A parsed reply, for the few places where respire reads a reply itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `+OK`
    Simple(Bytes),
    /// `-ERR …`
    Error(Bytes),
    /// `:1`
    Int(i64),
    /// `$3\r\nfoo` (also verbatim strings, without their format prefix)
    Bulk(Bytes),
    /// `$-1`, `*-1`, `_`
    Nil,
    /// `*`, `~`, `>` — arrays, sets and pushes.
    Array(Vec<Value>),
    /// `%` — a map, as key/value pairs.
    Map(Vec<(Value, Value)>),
    /// `,`, `#`, `(` — doubles, booleans and big numbers, as their text.
    Other(Bytes),
}

impl Value {
    /// Parses one complete frame (as measured by [`reply_len`]).
    pub fn parse(frame: &Bytes) -> Result<Value, ProtocolError> {
        let mut pos = 0;
        parse_value(frame, &mut pos, 0)
    }

    /// The value as bytes, for simple and bulk strings.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Value::Simple(b) | Value::Bulk(b) | Value::Other(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an integer, for integers and numeric strings.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Simple(b) | Value::Bulk(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// Looks a key up in a map, or in a flat array of alternating keys and values (RESP2 maps).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.as_bytes().is_some_and(|b| b == key.as_bytes()))
                .map(|(_, v)| v),
            Value::Array(items) => items
                .chunks(2)
                .find(|c| c.len() == 2 && c[0].as_bytes().is_some_and(|b| b == key.as_bytes()))
                .map(|c| &c[1]),
            _ => None,
        }
    }
}

const MAX_DEPTH: usize = 64;

fn parse_value(buf: &Bytes, pos: &mut usize, depth: usize) -> Result<Value, ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError::InvalidReply);
    }
    let start = *pos;
    let eol = find_crlf(buf, start).ok_or(ProtocolError::InvalidReply)?;
    if eol == start {
        return Err(ProtocolError::InvalidReply);
    }
    let kind = *buf.get(start).ok_or(ProtocolError::InvalidReply)?;
    let header = buf.slice(start + 1..eol);
    *pos = eol + 2;
    let count = |h: &Bytes| parse_i64(h).ok_or(ProtocolError::InvalidReply);
    Ok(match kind {
        b'+' => Value::Simple(header),
        b'-' => Value::Error(header),
        b':' => Value::Int(count(&header)?),
        b'_' => Value::Nil,
        b',' | b'#' | b'(' => Value::Other(header),
        b'$' | b'!' | b'=' => {
            let n = count(&header)?;
            if n < 0 {
                return Ok(Value::Nil);
            }
            let s = *pos;
            let e = s + n as usize;
            if e + 2 > buf.len() {
                return Err(ProtocolError::InvalidReply);
            }
            *pos = e + 2;
            let body = buf.slice(s..e);
            match kind {
                b'!' => Value::Error(body),
                b'=' if body.len() >= 4 => Value::Bulk(body.slice(4..)),
                _ => Value::Bulk(body),
            }
        }
        b'*' | b'~' | b'>' => {
            let n = count(&header)?;
            if n < 0 {
                return Ok(Value::Nil);
            }
            let mut items = Vec::with_capacity((n as usize).min(1024));
            for _ in 0..n {
                items.push(parse_value(buf, pos, depth + 1)?);
            }
            Value::Array(items)
        }
        b'%' => {
            let n = count(&header)?;
            let mut pairs = Vec::with_capacity((n.max(0) as usize).min(1024));
            for _ in 0..n {
                let k = parse_value(buf, pos, depth + 1)?;
                let v = parse_value(buf, pos, depth + 1)?;
                pairs.push((k, v));
            }
            Value::Map(pairs)
        }
        b'|' => {
            let n = count(&header)?;
            for _ in 0..2 * n.max(0) {
                parse_value(buf, pos, depth + 1)?;
            }
            parse_value(buf, pos, depth + 1)?
        }
        _ => return Err(ProtocolError::InvalidReply),
    })
}

// ---- Reply encoders -------------------------------------------------------

/// `+s\r\n`
pub fn simple(out: &mut BytesMut, s: &str) {
    out.reserve(s.len() + 3);
    out.put_u8(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `-msg\r\n`; `msg` starts with the error code (`ERR`, `NOAUTH`, …). Newlines are replaced by spaces.
pub fn error(out: &mut BytesMut, msg: &str) {
    out.reserve(msg.len() + 3);
    out.put_u8(b'-');
    for &b in msg.as_bytes() {
        out.put_u8(if b == b'\r' || b == b'\n' { b' ' } else { b });
    }
    out.extend_from_slice(b"\r\n");
}

/// `:n\r\n`
pub fn int(out: &mut BytesMut, n: i64) {
    header(out, b':', n);
}

/// `$len\r\ndata\r\n`
pub fn bulk(out: &mut BytesMut, data: &[u8]) {
    out.reserve(data.len() + 16);
    header(out, b'$', data.len() as i64);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A null: `$-1` in RESP2, `_` in RESP3.
pub fn null(out: &mut BytesMut, proto: u8) {
    if proto >= 3 {
        out.extend_from_slice(b"_\r\n");
    } else {
        out.extend_from_slice(b"$-1\r\n");
    }
}

/// `*n\r\n`
pub fn array_header(out: &mut BytesMut, n: usize) {
    header(out, b'*', n as i64);
}

/// A map of `n` pairs: `%n` in RESP3, a flat `*2n` array in RESP2.
pub fn map_header(out: &mut BytesMut, n: usize, proto: u8) {
    if proto >= 3 {
        header(out, b'%', n as i64);
    } else {
        header(out, b'*', 2 * n as i64);
    }
}

/// A push frame header: `>n` in RESP3, `*n` in RESP2.
pub fn push_header(out: &mut BytesMut, n: usize, proto: u8) {
    header(out, if proto >= 3 { b'>' } else { b'*' }, n as i64);
}

/// A verbatim text string in RESP3 (`=len\r\ntxt:…`), a bulk string in RESP2.
pub fn verbatim(out: &mut BytesMut, text: &[u8], proto: u8) {
    if proto >= 3 {
        header(out, b'=', text.len() as i64 + 4);
        out.extend_from_slice(b"txt:");
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    } else {
        bulk(out, text);
    }
}

fn header(out: &mut BytesMut, kind: u8, n: i64) {
    // Counts and lengths below 100 (most of them) written in one go.
    if (0..100).contains(&n) {
        let n = n as u8;
        if n < 10 {
            out.extend_from_slice(&[kind, b'0' + n, b'\r', b'\n']);
        } else {
            out.extend_from_slice(&[kind, b'0' + n / 10, b'0' + n % 10, b'\r', b'\n']);
        }
        return;
    }
    let mut tmp = [0u8; 24];
    let s = fmt_i64(&mut tmp, n);
    out.reserve(s.len() + 3);
    out.put_u8(kind);
    out.extend_from_slice(s);
    out.extend_from_slice(b"\r\n");
}

fn fmt_i64(tmp: &mut [u8; 24], n: i64) -> &[u8] {
    let mut i = tmp.len();
    let neg = n < 0;
    let mut v = n.unsigned_abs();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        i -= 1;
        tmp[i] = b'-';
    }
    &tmp[i..]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn headers_are_written_as_decimal_for_every_size() {
        for n in (-20..=1_200).chain([i64::MAX, i64::MIN + 1, -1, 99, 100, 999_999]) {
            let mut out = BytesMut::new();
            header(&mut out, b'$', n);
            assert_eq!(&out[..], format!("${n}\r\n").as_bytes());
        }
        let mut out = BytesMut::new();
        array_header(&mut out, 7);
        bulk(&mut out, b"value-of-12-");
        assert_eq!(&out[..], b"*7\r\n$12\r\nvalue-of-12-\r\n");
    }

    /// Found by the cargo-fuzz target `reply_framing`: nested aggregates declaring huge counts
    /// overflowed the count of elements still to read (a panic with overflow checks, a wrapped
    /// and too short reply length without).
    #[test]
    fn huge_declared_counts_do_not_wrap_the_reply_length() {
        let huge = i64::MAX;
        for head in [
            format!("*{huge}\r\n"),
            format!("%{huge}\r\n"),
            format!("|{huge}\r\n"),
            format!("~{huge}\r\n"),
        ] {
            let input = [head.repeat(3).as_bytes(), b":1\r\n+OK\r\n"].concat();
            assert_eq!(
                reply_len(&input).unwrap(),
                None,
                "{head:?}: incomplete, not a short length"
            );
        }
        let crash = b"*3\r\n*4\r\n*3\r\n-*3\r\n*3\r\n(3*4\r\n*28333331666666666665\r\n*4\r\n*2833333166666666665\r\n";
        assert!(!matches!(reply_len(crash), Ok(Some(_))));
    }

    fn parse_all(input: &[u8], authed: bool) -> (Vec<Vec<Bytes>>, Result<(), ProtocolError>) {
        let mut p = RequestParser::new();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match p.parse(&mut buf, &RequestLimits::default(), authed) {
                Ok(Some(c)) => out.push(c.to_args()),
                Ok(None) => return (out, Ok(())),
                Err(e) => return (out, Err(e)),
            }
        }
    }

    #[test]
    fn a_nul_byte_ends_an_inline_line_as_in_redis() {
        let args =
            |b: &[u8]| split_args(b).map(|v| v.iter().map(|a| a.to_vec()).collect::<Vec<_>>());
        assert_eq!(
            args(b"GET a\0b c"),
            Some(vec![b"GET".to_vec(), b"a".to_vec()])
        );
        assert_eq!(args(b"\0GET"), Some(vec![]));
        assert_eq!(args(b"GET \"a\0\""), None);
    }

    #[test]
    fn multibulk_and_inline() {
        let (cmds, r) = parse_all(
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n  set  \"a b\" 'c\\'d'\r\n\r\n*0\r\n",
            true,
        );
        assert!(r.is_ok());
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0], vec![Bytes::from("GET"), Bytes::from("k")]);
        assert_eq!(cmds[1], vec![Bytes::from("PING")]);
        assert_eq!(
            cmds[2],
            vec![Bytes::from("set"), Bytes::from("a b"), Bytes::from("c'd")]
        );
    }

    #[test]
    fn byte_by_byte_is_same_as_whole() {
        let input = b"*3\r\n$3\r\nSET\r\n$5\r\nhello\r\n$10\r\n0123456789\r\nPING\r\n";
        let mut p = RequestParser::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in input.iter() {
            buf.put_u8(b);
            while let Some(c) = p.parse(&mut buf, &RequestLimits::default(), true).unwrap() {
                got.push(c);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].arg(2), Some(&b"0123456789"[..]));
        assert_eq!(&got[0].raw()[..], &input[..input.len() - 6]);
        // An inline command is encoded as RESP, its arguments found the same way.
        assert_eq!(got[1].raw(), &Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
        assert_eq!(got[1].iter().collect::<Vec<_>>(), vec![&b"PING"[..]]);
    }

    #[test]
    fn redis_error_texts() {
        assert_eq!(
            parse_all(b"*x\r\n", true).1,
            Err(ProtocolError::InvalidMultibulkLength)
        );
        assert_eq!(
            parse_all(b"*1\r\n:1\r\n", true).1,
            Err(ProtocolError::ExpectedBulk(':'))
        );
        assert_eq!(
            parse_all(b"*1\r\n$-5\r\n", true).1,
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse_all(b"*20\r\n", false).1,
            Err(ProtocolError::UnauthMultibulkLength)
        );
        assert_eq!(
            parse_all(b"*1\r\n$20000\r\n", false).1,
            Err(ProtocolError::UnauthBulkLength)
        );
        assert_eq!(
            parse_all(b"*1\r\n$10000000000\r\n", true).1,
            Err(ProtocolError::InvalidBulkLength)
        );
        assert_eq!(
            parse_all(b"set \"a\r\n", true).1,
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse_all(b"set \"a\"b\r\n", true).1,
            Err(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse_all(&[b'a'; MAX_INLINE + 1], true).1,
            Err(ProtocolError::TooBigInline)
        );
        assert_eq!(
            ProtocolError::ExpectedBulk('x').reply_text(),
            "ERR Protocol error: expected '$', got 'x'"
        );
    }

    #[test]
    fn inline_escapes() {
        let args = split_args(b"\"\\x41\\n\" b").unwrap();
        assert_eq!(args, vec![Bytes::from("A\n"), Bytes::from("b")]);
    }

    #[test]
    fn reply_lengths() {
        for frame in [
            &b"+OK\r\n"[..],
            b"$-1\r\n",
            b"$3\r\nfoo\r\n",
            b"*2\r\n$1\r\na\r\n*1\r\n:1\r\n",
            b"%1\r\n+a\r\n,1.5\r\n",
            b"|1\r\n+k\r\n+v\r\n:3\r\n",
            b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
            b"=8\r\ntxt:abcd\r\n",
            b"*-1\r\n",
            b"_\r\n",
        ] {
            assert_eq!(
                reply_len(frame).unwrap(),
                Some(frame.len()),
                "{:?}",
                String::from_utf8_lossy(frame)
            );
            for cut in 0..frame.len() {
                assert_eq!(reply_len(&frame[..cut]).unwrap(), None);
            }
        }
        assert!(reply_len(b"?\r\n").is_err());
        // The bulk strings' inline path answers as the general one, whole, cut or malformed.
        for frame in [
            &b"$3\r\nfoo\r\n"[..],
            b"$0\r\n\r\n",
            b"$-1\r\n",
            b"$-2\r\n",
            b"$03\r\nfoo\r\n",
            b"$-0\r\n",
            b"$12345678901234567890123\r\n",
            b"$3x\r\nfoo\r\n",
            b"$32\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n+OK\r\n",
            b"+OK\r\n$-1\r\n",
            b"+OKAY\r\n",
            b"+OK\n",
        ] {
            for cut in 0..=frame.len() {
                let f = &frame[..cut];
                assert_eq!(
                    reply_len_fast(f),
                    reply_len(f),
                    "{:?}",
                    String::from_utf8_lossy(f)
                );
            }
        }
        // Malformed backend replies are errors, never panics.
        assert!(reply_len(b"\r\n").is_err());
        assert!(reply_len(b"*2\r\n:1\r\n\r\n").is_err());
        assert!(Value::parse(&Bytes::from_static(b"*1\r\n\r\n")).is_err());
    }

    #[test]
    fn values() {
        let v = Value::parse(&Bytes::from_static(
            b"%2\r\n+server\r\n+redis\r\n+version\r\n$5\r\n7.0.1\r\n",
        ))
        .unwrap();
        assert_eq!(
            v.get("version").and_then(|v| v.as_bytes()).unwrap(),
            &Bytes::from("7.0.1")
        );
        let v = Value::parse(&Bytes::from_static(b"*2\r\n$5\r\nproto\r\n:2\r\n")).unwrap();
        assert_eq!(v.get("proto").and_then(|v| v.as_int()), Some(2));
    }

    #[test]
    fn integers() {
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"012"), None);
        assert_eq!(parse_i64(b"+1"), None);
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        let mut b = BytesMut::new();
        int(&mut b, i64::MIN);
        assert_eq!(&b[..], b":-9223372036854775808\r\n");
    }
}
