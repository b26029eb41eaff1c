//! Client requests: arbitrary bytes, fed in two pieces, never panic, loop or grow without
//! bound, and every command parsed consumes input.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use respire::protocol::{RequestLimits, RequestParser};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else { return };
    let cut = usize::from(cut).min(input.len());
    let limits = RequestLimits { max_args: 1024, max_bulk: 1 << 20 };
    let mut parser = RequestParser::new();
    let mut buf = BytesMut::new();
    let mut commands = 0usize;
    for piece in [&input[..cut], &input[cut..]] {
        buf.extend_from_slice(piece);
        loop {
            match parser.parse(&mut buf, &limits, true) {
                Ok(Some(cmd)) => {
                    commands += 1;
                    assert!(commands <= input.len(), "more commands than bytes");
                    assert!(cmd.iter().count() >= 1);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
