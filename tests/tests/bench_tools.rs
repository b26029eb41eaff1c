//! The benchmarks' yardstick, checked against a real Redis: the floor proxy
//! (`tests/src/bin/floor.rs`), the least a multiplexing proxy can do, which BENCHMARKS.md
//! reads respire's ratios against. A yardstick that mixed up replies would measure nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use respire_tests::{Raw, RedisServer, free_port, resp};

struct Floor {
    child: Child,
    port: u16,
}

impl Floor {
    fn start(backend: &str) -> Floor {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_floor"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--backend",
                backend,
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("start the floor proxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the floor proxy did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Floor { child, port }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

#[test]
fn the_floor_proxy_gives_each_client_its_own_replies_in_order() {
    let redis = RedisServer::start();
    let floor = Floor::start(&redis.addr());
    let port = floor.port;

    // 16 clients at once, each 150 pipelined SET/GET pairs of its own keys, sent in pieces
    // that cut commands in the middle; one value per client is 200 KB, so its reply spans
    // several of the proxy's reads from Redis.
    let workers: Vec<_> = (0..16)
        .map(|c| {
            std::thread::spawn(move || {
                let mut client = Raw::connect(port);
                let (mut request, mut expected) = (Vec::new(), Vec::new());
                for i in 0..150 {
                    let key = format!("floor:{c}:{i}");
                    let value = if i == 75 {
                        vec![b'a' + c as u8; 200_000]
                    } else {
                        format!("v{c}.{i}").into_bytes()
                    };
                    request.extend(resp(&[b"SET", key.as_bytes(), &value]));
                    request.extend(resp(&[b"GET", key.as_bytes()]));
                    expected.extend_from_slice(b"+OK\r\n");
                    expected.extend(bulk(&value));
                }
                for piece in request.chunks(997) {
                    client.send(piece);
                }
                let got = client.read_replies(300);
                assert!(
                    got == expected,
                    "client {c} got replies that are not its own ({} bytes, {} expected)",
                    got.len(),
                    expected.len()
                );
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a client thread failed");
    }

    // A client that leaves with replies still due takes nothing from the next client.
    let mut leaver = Raw::connect(port);
    leaver.send(&resp(&[b"DEBUG", b"SLEEP", b"0.2"]).repeat(2));
    drop(leaver);
    let mut next = Raw::connect(port);
    assert_eq!(
        next.roundtrip(&resp(&[b"GET", b"floor:3:7"]), 1),
        bulk(b"v3.7")
    );
    assert_eq!(
        next.roundtrip(&resp(&[b"INCR", b"floor:counter"]), 1),
        b":1\r\n"
    );
}
