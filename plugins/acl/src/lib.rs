//! Redis-style access control in front of Redis: who may run which commands on which keys
//! and channels. Identity is respire's (`AUTH` / `HELLO AUTH` against respire's `[[users]]`);
//! the rules are Redis ACL rules (`+@read -@dangerous +get ~cache:* %R~logs:* &events:*`).
//! Denials read exactly as Redis's own.
//!
//! ```toml
//! [config]
//! default = "+@all -@dangerous ~* &*"      # unauthenticated clients and users without rules
//!
//! [config.users]
//! alice = "+@read +@connection ~cache:*"
//! ops = { rules = "+@all ~* &*", from = ["10.0.0.0/8"] }
//!
//! [[config.networks]]                       # unauthenticated clients from here get these rules
//! cidr = "127.0.0.0/8"
//! rules = "+@all ~* &*"
//! ```
use std::collections::HashMap;
use std::net::IpAddr;

use respire_sdk::{Category, Client, Command, Effects, KeyAccess, Manifest, Plugin, RequestAction};
use serde::Deserialize;

pub mod rules;

use rules::{Cidr, Rules};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_rules")]
    default: String,
    #[serde(default)]
    users: HashMap<String, UserConfig>,
    #[serde(default)]
    networks: Vec<NetworkConfig>,
}

fn default_rules() -> String {
    "+@all ~* &*".into()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UserConfig {
    Rules(String),
    Full {
        rules: String,
        #[serde(default)]
        from: Vec<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkConfig {
    cidr: String,
    rules: String,
}

struct User {
    rules: Rules,
    from: Vec<Cidr>,
}

/// The plugin's state: compiled rules.
pub struct Acl {
    default: Rules,
    users: HashMap<String, User>,
    networks: Vec<(Cidr, Rules)>,
    /// The last client's rules, by its id and user (a batch is mostly one client's pipeline):
    /// saves parsing its address and looking its user up for every command.
    last: Option<(u64, String, Which)>,
}

/// Which rules apply to a client, or why none do.
#[derive(Clone)]
enum Which {
    Default,
    User(String),
    Network(usize),
    Refused(String),
}

fn client_ip(addr: &str) -> Option<IpAddr> {
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .or_else(|| addr.parse().ok())
}

impl Acl {
    /// Builds the rules from the plugin's configuration text.
    pub fn from_config(text: &str) -> Result<Acl, String> {
        let c: Config = respire_sdk::config(text)?;
        let default = Rules::parse(&c.default).map_err(|e| format!("default: {e}"))?;
        let mut users = HashMap::new();
        for (name, u) in c.users {
            let (rules, from) = match u {
                UserConfig::Rules(r) => (r, Vec::new()),
                UserConfig::Full { rules, from } => (rules, from),
            };
            let rules = Rules::parse(&rules).map_err(|e| format!("users.{name}: {e}"))?;
            let from = from
                .iter()
                .map(|c| Cidr::parse(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("users.{name}.from: {e}"))?;
            users.insert(name, User { rules, from });
        }
        let mut networks = Vec::new();
        for (i, n) in c.networks.iter().enumerate() {
            let cidr = Cidr::parse(&n.cidr).map_err(|e| format!("networks[{i}].cidr: {e}"))?;
            networks.push((
                cidr,
                Rules::parse(&n.rules).map_err(|e| format!("networks[{i}].rules: {e}"))?,
            ));
        }
        Ok(Acl {
            default,
            users,
            networks,
            last: None,
        })
    }

    fn which(&self, client: &Client) -> Which {
        let ip = client_ip(&client.addr);
        if let Some(u) = self.users.get(&client.user) {
            if !u.from.is_empty() && !ip.is_some_and(|ip| u.from.iter().any(|c| c.contains(ip))) {
                return Which::Refused(format!(
                    "NOPERM User {} is not allowed from {}",
                    client.user,
                    ip.map(|i| i.to_string()).unwrap_or_default()
                ));
            }
            return Which::User(client.user.clone());
        }
        if client.user == "default"
            && let Some(ip) = ip
            && let Some(i) = self.networks.iter().position(|(c, _)| c.contains(ip))
        {
            return Which::Network(i);
        }
        Which::Default
    }

    fn rules_of<'s>(&'s self, which: &Which) -> Result<&'s Rules, String> {
        match which {
            Which::Default => Ok(&self.default),
            Which::User(u) => Ok(self.users.get(u).map_or(&self.default, |u| &u.rules)),
            Which::Network(i) => Ok(self.networks.get(*i).map_or(&self.default, |(_, r)| r)),
            Which::Refused(e) => Err(e.clone()),
        }
    }

    /// Checks a command, remembering the last client's rules: the denial, if any, and whether
    /// the verdict holds for every command of this client with this name and these categories
    /// (it did not depend on the arguments: a subcommand, keys or channels).
    pub fn check_cached(&mut self, client: &Client, cmd: &Command) -> (Option<String>, bool) {
        let fresh = self
            .last
            .as_ref()
            .is_some_and(|(id, user, _)| *id == client.id && *user == client.user);
        if !fresh {
            let which = self.which(client);
            self.last = Some((client.id, client.user.clone(), which));
        }
        let rules = match self.last.as_ref().map(|(_, _, w)| self.rules_of(w)) {
            Some(Ok(r)) => r,
            Some(Err(e)) => return (Some(e), true),
            None => &self.default,
        };
        Self::check_rules(rules, client, cmd)
    }

    /// The rules that apply to a client, or the denial when it may not use its user from where it is.
    fn rules_for(&self, client: &Client) -> Result<&Rules, String> {
        self.rules_of(&self.which(client))
    }

    /// Checks a command (see [`Acl::check_cached`]).
    pub fn check(&self, client: &Client, cmd: &Command) -> (Option<String>, bool) {
        let rules = match self.rules_for(client) {
            Ok(r) => r,
            Err(e) => return (Some(e), true),
        };
        Self::check_rules(rules, client, cmd)
    }

    fn check_rules(rules: &Rules, client: &Client, cmd: &Command) -> (Option<String>, bool) {
        let sub = rules::container(cmd.name)
            .then(|| {
                cmd.arg(0)
                    .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
            })
            .flatten();
        // The subcommand is an argument: a verdict that looked at it is not repeatable.
        let by_name = sub.is_none();
        if !rules.allows_command(cmd.name, sub.as_deref(), cmd.categories) {
            let shown = match &sub {
                Some(s) => format!("{}|{}", cmd.name, s),
                None => cmd.name.to_string(),
            };
            return (
                Some(format!(
                    "NOPERM User {} has no permissions to run the '{shown}' command",
                    client.user
                )),
                by_name,
            );
        }
        let by_name = by_name
            && rules.allows_all_keys()
            && (rules.allows_all_channels() || !cmd.is(Category::PUBSUB));
        (Self::check_args(rules, cmd), by_name)
    }

    /// Checks a permitted command's keys and channels.
    fn check_args(rules: &Rules, cmd: &Command) -> Option<String> {
        for (key, access) in cmd.keys() {
            if !rules.allows_key(key, access) {
                return Some("NOPERM No permissions to access a key".into());
            }
        }
        if cmd.is(Category::PUBSUB) {
            let (channels, literal): (Vec<&[u8]>, bool) = match cmd.name {
                "publish" | "spublish" => (cmd.arg(0).into_iter().collect(), false),
                "subscribe" | "ssubscribe" => (cmd.args().collect(), false),
                "psubscribe" => (cmd.args().collect(), true),
                _ => (Vec::new(), false),
            };
            if channels.iter().any(|c| !rules.allows_channel(c, literal)) {
                return Some("NOPERM No permissions to access a channel".into());
            }
        }
        None
    }
}

impl Plugin for Acl {
    fn init(config: &str) -> Result<(Self, Manifest), String> {
        let acl = Acl::from_config(config)?;
        Ok((
            acl,
            Manifest::new("acl", env!("CARGO_PKG_VERSION")).categories(&["all"]),
        ))
    }

    fn on_request(&mut self, client: &Client, cmd: &Command, fx: &mut Effects) -> RequestAction {
        let (denied, repeatable) = self.check_cached(client, cmd);
        if repeatable {
            fx.repeatable();
        }
        match denied {
            Some(e) => RequestAction::Deny(e),
            None => RequestAction::Continue,
        }
    }
}

/// Access a key needs, as the rules name it.
pub fn needs(access: KeyAccess) -> (bool, bool) {
    (
        access.contains(KeyAccess::READ),
        access.contains(KeyAccess::WRITE),
    )
}

#[cfg(target_arch = "wasm32")]
respire_sdk::export_plugin!(Acl);
