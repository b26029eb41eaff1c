//! Fails on purpose when asked: `GET plugin:loop` spins forever, `GET plugin:bomb` allocates
//! far more memory than allowed, `GET plugin:panic` panics, `GET plugin:huge` answers with an
//! 8 MiB reply, `GET plugin:garbage` answers with bytes that are not a RESP reply. Everything
//! else continues. With `deny_all = true` in its `[config]`, it refuses every command.
use respire_sdk::{Client, Command, Effects, Manifest, Plugin, RequestAction};

struct Misbehave {
    deny_all: bool,
}

/// Size of the reply to `GET plugin:huge`.
const HUGE: usize = 8 << 20;

impl Plugin for Misbehave {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        let deny_all = config
            .lines()
            .any(|l| l.replace(' ', "") == "deny_all=true");
        let manifest = if deny_all {
            Manifest::new("deny-all", "0.1.0").categories(&["all"])
        } else {
            Manifest::new("misbehave", "0.1.0").commands(&["get"])
        };
        Ok((Misbehave { deny_all }, manifest))
    }

    fn on_request(&mut self, _client: &Client, cmd: &Command, _fx: &mut Effects) -> RequestAction {
        if self.deny_all {
            return RequestAction::Deny(format!("NOPERM misbehave refuses '{}'", cmd.name));
        }
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
            Some(b"plugin:huge") => {
                let head = format!("${HUGE}\r\n");
                let mut r = Vec::with_capacity(head.len() + HUGE + 2);
                r.extend_from_slice(head.as_bytes());
                r.resize(head.len() + HUGE, b'h');
                r.extend_from_slice(b"\r\n");
                RequestAction::Respond(r)
            }
            Some(b"plugin:garbage") => RequestAction::Respond(b"$5\r\nab".to_vec()),
            _ => RequestAction::Continue,
        }
    }
}

respire_sdk::export_plugin!(Misbehave);
