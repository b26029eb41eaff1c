//! Fails on purpose when asked: `GET plugin:loop` spins forever, `GET plugin:bomb` allocates
//! far more memory than allowed, `GET plugin:panic` panics. Everything else continues.
use respire_sdk::{Client, Command, Effects, Manifest, Plugin, RequestAction};

struct Misbehave;

impl Plugin for Misbehave {
    fn init(_config: &str) -> Result<(Self, Manifest), String> {
        Ok((Misbehave, Manifest::new("misbehave", "0.1.0").commands(&["get"])))
    }

    fn on_request(&mut self, _client: &Client, cmd: &Command, _fx: &mut Effects) -> RequestAction {
        match cmd.arg(0) {
            Some(b"plugin:loop") => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Some(b"plugin:bomb") => {
                let v = vec![7u8; 1 << 30];
                std::hint::black_box(&v);
                RequestAction::Continue
            }
            Some(b"plugin:panic") => panic!("boom"),
            _ => RequestAction::Continue,
        }
    }
}

respire_sdk::export_plugin!(Misbehave);
