//! A hello-world respire plugin: refuses `FLUSHALL` and `FLUSHDB`, counts the `GET`s it saw,
//! and answers `PING` with a greeting when its config says so.
use respire_sdk::{Client, Command, Effects, Manifest, Plugin, RequestAction, reply};

struct Hello {
    greeting: Option<String>,
    gets: u64,
}

impl Plugin for Hello {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        // `greeting = "…"` in the plugin's [config] table, if present.
        let greeting = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("greeting = "))
            .map(|v| v.trim_matches('"').to_string());
        let manifest =
            Manifest::new("hello", "0.1.0").commands(&["flushall", "flushdb", "get", "ping"]);
        Ok((Hello { greeting, gets: 0 }, manifest))
    }

    fn on_request(&mut self, _client: &Client, cmd: &Command, _fx: &mut Effects) -> RequestAction {
        match cmd.name {
            "flushall" | "flushdb" => RequestAction::Deny(format!(
                "NOPERM '{}' is disabled by the hello plugin",
                cmd.name
            )),
            "ping" if cmd.is_empty() => match &self.greeting {
                Some(g) => RequestAction::Respond(reply::simple(g)),
                None => RequestAction::Continue,
            },
            "get" if cmd.arg(0) == Some(b"hello:gets") => {
                self.gets += 1;
                RequestAction::Respond(reply::int(self.gets as i64))
            }
            _ => RequestAction::Continue,
        }
    }
}

respire_sdk::export_plugin!(Hello);
