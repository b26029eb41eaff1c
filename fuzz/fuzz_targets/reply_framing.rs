//! Backend replies: `reply_len` never panics, a measured reply is a prefix of the input, and
//! splitting frames with `next_reply` agrees with it; `Value::parse` of a frame never panics.
#![no_main]
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use respire::protocol::{Value, next_reply, reply_len};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(n)) = reply_len(data) {
        assert!(n > 0 && n <= data.len());
        let mut buf = BytesMut::from(data);
        let frame = next_reply(&mut buf).ok().flatten().expect("next_reply agrees with reply_len");
        assert_eq!(frame.len(), n);
        let _ = Value::parse(&Bytes::copy_from_slice(&data[..n]));
    }
});
