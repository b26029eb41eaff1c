//! Write respire plugins in Rust.
//!
//! A plugin is a type implementing [`Plugin`]: `init` reads the plugin's
//! configuration and says what it wants to see; the hooks it does not
//! override let every command through. [`export_plugin!`] turns it into the
//! component respire loads. Build it for `wasm32-wasip2` and drop the `.wasm`
//! file into respire's plugin folder.
//!
//! ```ignore
//! use respire_sdk::{Client, Command, Manifest, Plugin, RequestAction};
//!
//! struct NoFlush;
//!
//! impl Plugin for NoFlush {
//!     fn init(_config: &str) -> Result<(Self, Manifest), String> {
//!         Ok((NoFlush, Manifest::new("no-flush", "0.1.0").commands(&["flushall", "flushdb"])))
//!     }
//!     fn on_request(&mut self, _client: &Client, cmd: &Command) -> RequestAction {
//!         RequestAction::Deny(format!("NOPERM '{}' is disabled here", cmd.name))
//!     }
//! }
//!
//! respire_sdk::export_plugin!(NoFlush);
//! ```
#![warn(missing_docs)]

/// The bindings generated from respire's WIT contract (`wit/plugin.wit`).
#[doc(hidden)]
#[allow(clippy::too_many_arguments, missing_docs)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export_component",
        default_bindings_module: "respire_sdk::bindings",
    });
}

pub use bindings::respire::plugin::host::Level;
pub use bindings::respire::plugin::types::{Client, Manifest, RequestAction, ResponseAction};

/// A command as a plugin sees it: the lower-case name and zero-copy views of the arguments.
pub struct Command {
    /// The command name in lower case.
    pub name: String,
    data: Vec<u8>,
    ends: Vec<u32>,
}

impl Command {
    #[doc(hidden)]
    pub fn from_wit(c: bindings::respire::plugin::types::Command) -> Command {
        Command { name: c.name, data: c.data, ends: c.ends }
    }

    /// Number of arguments after the name.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the command has no arguments.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Argument `i` (0 is the first argument after the name).
    pub fn arg(&self, i: usize) -> Option<&[u8]> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { *self.ends.get(i - 1)? as usize };
        self.data.get(start..end)
    }

    /// Every argument after the name.
    pub fn args(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.len()).filter_map(|i| self.arg(i))
    }
}

impl Manifest {
    /// A manifest that asks for nothing yet.
    pub fn new(name: &str, version: &str) -> Manifest {
        Manifest {
            name: name.to_string(),
            version: version.to_string(),
            commands: Vec::new(),
            categories: Vec::new(),
            on_request: true,
            on_response: false,
        }
    }

    /// Run the hooks for these commands (lower case).
    pub fn commands(mut self, names: &[&str]) -> Manifest {
        self.commands.extend(names.iter().map(|n| n.to_ascii_lowercase()));
        self
    }

    /// Run the hooks for commands in these ACL categories (`read`, `write`, …, or `all`).
    pub fn categories(mut self, names: &[&str]) -> Manifest {
        self.categories.extend(names.iter().map(|n| n.to_ascii_lowercase()));
        self
    }

    /// Also call `on_response`.
    pub fn with_responses(mut self) -> Manifest {
        self.on_response = true;
        self
    }
}

/// A respire plugin. Only `init` is required; every hook lets the command through by default.
pub trait Plugin: Sized + 'static {
    /// Reads the plugin's configuration (TOML text, possibly empty) and says what the plugin
    /// wants to see. An error keeps the plugin from loading, with this reason.
    fn init(config: &str) -> Result<(Self, Manifest), String>;

    /// Runs before a matching command goes to Redis. Default: continue.
    fn on_request(&mut self, _client: &Client, _command: &Command) -> RequestAction {
        RequestAction::Continue
    }

    /// Runs with the reply (complete RESP) to a matching command. Default: continue.
    fn on_response(&mut self, _client: &Client, _command: &Command, _reply: &[u8]) -> ResponseAction {
        ResponseAction::Continue
    }
}

/// Writes a line to respire's log, tagged with the plugin's name.
pub fn log(level: Level, message: &str) {
    bindings::respire::plugin::host::log(level, message);
}

/// Milliseconds since the Unix epoch, from the host.
pub fn now_ms() -> u64 {
    bindings::respire::plugin::host::now_ms()
}

/// Encoders for replies a plugin answers with (`RequestAction::Respond`, `ResponseAction::Replace`).
pub mod reply {
    /// `+text`
    pub fn simple(text: &str) -> Vec<u8> {
        format!("+{text}\r\n").into_bytes()
    }

    /// `-text` (text starts with the error code, e.g. `ERR …`).
    pub fn error(text: &str) -> Vec<u8> {
        format!("-{text}\r\n").into_bytes()
    }

    /// `:n`
    pub fn int(n: i64) -> Vec<u8> {
        format!(":{n}\r\n").into_bytes()
    }

    /// `$len\r\ndata`
    pub fn bulk(data: &[u8]) -> Vec<u8> {
        let mut out = format!("${}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Exports a [`Plugin`] type as the component's implementation. Use once per plugin crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        thread_local! {
            static __RESPIRE_STATE: ::std::cell::RefCell<Option<$plugin>> = const { ::std::cell::RefCell::new(None) };
        }

        struct __RespireExport;

        impl $crate::bindings::Guest for __RespireExport {
            fn init(config: String) -> Result<$crate::Manifest, String> {
                let (state, manifest) = <$plugin as $crate::Plugin>::init(&config)?;
                __RESPIRE_STATE.with(|s| *s.borrow_mut() = Some(state));
                Ok(manifest)
            }

            fn on_request(
                client: $crate::Client,
                command: $crate::bindings::respire::plugin::types::Command,
            ) -> $crate::RequestAction {
                let command = $crate::Command::from_wit(command);
                __RESPIRE_STATE.with(|s| match s.borrow_mut().as_mut() {
                    Some(p) => <$plugin as $crate::Plugin>::on_request(p, &client, &command),
                    None => $crate::RequestAction::Continue,
                })
            }

            fn on_response(
                client: $crate::Client,
                command: $crate::bindings::respire::plugin::types::Command,
                reply: Vec<u8>,
            ) -> $crate::ResponseAction {
                let command = $crate::Command::from_wit(command);
                __RESPIRE_STATE.with(|s| match s.borrow_mut().as_mut() {
                    Some(p) => <$plugin as $crate::Plugin>::on_response(p, &client, &command, &reply),
                    None => $crate::ResponseAction::Continue,
                })
            }
        }

        $crate::bindings::export_component!(__RespireExport with_types_in $crate::bindings);
    };
}
