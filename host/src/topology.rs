//! Where keys live: the slot map and the nodes behind respire.
//!
//! Keys are placed by Redis Cluster hash slots (`crc16(key) mod 16384`,
//! honouring `{hash tags}`) in every mode, so data placement over standalone
//! shards is the same scheme as over a real cluster. The map is an immutable
//! [`Topology`] snapshot behind an `ArcSwap`; sessions read it without locks
//! and notice a new one through a version counter.
//!
//! For a Redis Cluster, a manager thread discovers the map from any reachable
//! node with `CLUSTER SHARDS` (falling back to `CLUSTER SLOTS`), refreshes it
//! on a timer and whenever a session reports a redirection or a broken
//! connection (rate-limited). A `MOVED` reply patches the one slot at once so
//! the next command goes to the right node before the full refresh lands.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::backend::{self, ConnKey, NodeSettings};
use crate::protocol::{self, Value};

/// Number of hash slots.
pub const SLOTS: usize = 16384;
/// Marks a slot no shard serves.
pub const NO_SHARD: u16 = u16::MAX;

/// The hash slot of a key, as Redis Cluster computes it.
pub fn key_slot(key: &[u8]) -> u16 {
    // Keys are mostly short: a plain scan costs less than `memchr`'s set-up for them.
    let find = |b: u8, s: &[u8]| {
        if s.len() <= 32 {
            s.iter().position(|&c| c == b)
        } else {
            memchr::memchr(b, s)
        }
    };
    let hashed = match find(b'{', key) {
        Some(open) => match find(b'}', &key[open + 1..]) {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    SLOT_CRC.checksum(hashed) % SLOTS as u16
}

/// Redis Cluster's CRC16 (CCITT/XMODEM), with the `crc` crate's 16-bytes-at-a-step tables
/// (8 KiB, built at compile time): a key of 16 bytes costs ≈70 instructions instead of ≈140
/// a byte at a time (the `crc16` crate's way; callgrind, GET over a 3-master cluster).
static SLOT_CRC: crc::Crc<u16, crc::Table<16>> =
    crc::Crc::<u16, crc::Table<16>>::new(&crc::CRC_16_XMODEM);

/// A static shard: master address, replica addresses, slot ranges (inclusive).
pub type ShardParts = (String, Vec<String>, Vec<(u16, u16)>);

/// What kind of backend respire is in front of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// One standalone Redis.
    Standalone,
    /// A Redis Cluster.
    Cluster,
    /// Standalone Redis servers, keys placed by hash slot.
    Shards,
}

/// A master and its replicas (indexes into [`Topology::nodes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// The master.
    pub master: usize,
    /// Its replicas.
    pub replicas: Vec<usize>,
}

/// One immutable view of the backends.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Increases with every change.
    pub version: u64,
    /// The backend kind.
    pub kind: BackendKind,
    /// Node addresses ("host:port").
    pub nodes: Vec<Arc<str>>,
    /// Shards, masters sorted by address (stable order for `SCAN` cursors).
    pub shards: Vec<Shard>,
    /// Shard of every slot, or [`NO_SHARD`].
    pub slots: Vec<u16>,
    /// Masters can change under respire (Redis Cluster, Sentinel): requests that meet a failed
    /// or changing master wait for the new one (up to `failover_timeout`) instead of failing.
    pub managed: bool,
}

impl Topology {
    /// The address of node `i` (empty for an index it does not have).
    pub fn node_addr(&self, i: usize) -> Arc<str> {
        self.nodes.get(i).cloned().unwrap_or_else(|| Arc::from(""))
    }

    /// One standalone server owning every slot.
    pub fn standalone(addr: &str) -> Topology {
        Topology {
            version: 1,
            kind: BackendKind::Standalone,
            nodes: vec![Arc::from(addr)],
            shards: vec![Shard {
                master: 0,
                replicas: Vec::new(),
            }],
            slots: vec![0; SLOTS],
            managed: false,
        }
    }

    /// Static shards: `(master, replicas, slot ranges)`; shards without ranges share the rest evenly.
    pub fn shards(specs: &[ShardParts]) -> Result<Topology, String> {
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut shards = Vec::new();
        let index = |addr: &str, nodes: &mut Vec<Arc<str>>| -> usize {
            match nodes.iter().position(|n| &**n == addr) {
                Some(i) => i,
                None => {
                    nodes.push(Arc::from(addr));
                    nodes.len() - 1
                }
            }
        };
        for (master, replicas, _) in specs {
            let m = index(master, &mut nodes);
            let r = replicas.iter().map(|a| index(a, &mut nodes)).collect();
            shards.push(Shard {
                master: m,
                replicas: r,
            });
        }
        let mut slots = vec![NO_SHARD; SLOTS];
        let explicit = specs.iter().any(|(_, _, ranges)| !ranges.is_empty());
        if explicit {
            for (i, (_, _, ranges)) in specs.iter().enumerate() {
                for &(a, b) in ranges {
                    for s in a..=b {
                        if slots[s as usize] != NO_SHARD {
                            return Err(format!("slot {s} is assigned to two shards"));
                        }
                        slots[s as usize] = i as u16;
                    }
                }
            }
            if let Some(s) = slots.iter().position(|&s| s == NO_SHARD) {
                return Err(format!("slot {s} is not assigned to any shard"));
            }
        } else {
            let n = specs.len();
            for (s, slot) in slots.iter_mut().enumerate() {
                *slot = (s * n / SLOTS) as u16;
            }
        }
        Ok(Topology {
            version: 1,
            kind: BackendKind::Shards,
            nodes,
            shards,
            slots,
            managed: false,
        })
    }

    /// The master address serving `slot`.
    pub fn master_of(&self, slot: u16) -> Option<usize> {
        let shard = *self.slots.get(slot as usize)?;
        self.shards.get(shard as usize).map(|s| s.master)
    }

    /// The master where respire subscribes to channels and patterns, and so where `PUBLISH`
    /// goes: the first. Standalone shards do not pass messages on to each other (a Redis
    /// Cluster carries `PUBLISH` to every node, where any master would do).
    pub fn channels_master(&self) -> Option<usize> {
        self.shards.first().map(|s| s.master)
    }

    /// Master node indexes, in shard order.
    pub fn masters(&self) -> impl Iterator<Item = usize> + '_ {
        self.shards.iter().map(|s| s.master)
    }

    /// Index of a node by address.
    pub fn node_index(&self, addr: &str) -> Option<usize> {
        self.nodes.iter().position(|n| &**n == addr)
    }

    /// The slot ranges (inclusive) each shard serves, in shard order.
    pub fn ranges(&self) -> Vec<Vec<(u16, u16)>> {
        let mut out = vec![Vec::new(); self.shards.len()];
        let mut start = 0usize;
        while start < SLOTS {
            let owner = self.slots[start];
            let mut end = start;
            while end + 1 < SLOTS && self.slots[end + 1] == owner {
                end += 1;
            }
            if let Some(r) = out.get_mut(owner as usize) {
                r.push((start as u16, end as u16));
            }
            start = end + 1;
        }
        out
    }

    /// A slot served by shard `shard` (to re-route a request meant for that shard).
    pub fn slot_of_shard(&self, shard: usize) -> Option<u16> {
        self.slots
            .iter()
            .position(|&s| s as usize == shard)
            .map(|s| s as u16)
    }

    /// Whether every slot has a master.
    pub fn complete(&self) -> bool {
        self.slots.iter().all(|&s| s != NO_SHARD)
    }

    /// Same placement as `other` (ignoring the version).
    fn same_as(&self, other: &Topology) -> bool {
        self.nodes == other.nodes && self.shards == other.shards && self.slots == other.slots
    }

    /// Builds a cluster topology from a `CLUSTER SHARDS` reply; with `tls`, the nodes' TLS
    /// ports (`CLUSTER SHARDS` gives both ports of a TLS cluster; `CLUSTER SLOTS` and
    /// redirections give the one of the asking connection's kind).
    pub fn from_cluster_shards(reply: &Value, tls: bool) -> Option<Topology> {
        let Value::Array(shards) = reply else {
            return None;
        };
        let mut builder = Builder::default();
        for shard in shards {
            let Some(Value::Array(slots)) = shard.get("slots") else {
                continue;
            };
            let Some(Value::Array(nodes)) = shard.get("nodes") else {
                continue;
            };
            let mut master = None;
            let mut replicas = Vec::new();
            for n in nodes {
                let (first, second) = if tls {
                    ("tls-port", "port")
                } else {
                    ("port", "tls-port")
                };
                let port = n
                    .get(first)
                    .or_else(|| n.get(second))
                    .and_then(Value::as_int);
                let host = n
                    .get("endpoint")
                    .and_then(|v| v.as_bytes())
                    .filter(|e| !e.is_empty() && e.as_ref() != b"?")
                    .or_else(|| n.get("ip").and_then(|v| v.as_bytes()));
                let (Some(port), Some(host)) = (port, host) else {
                    continue;
                };
                let addr = format!("{}:{port}", String::from_utf8_lossy(host));
                let role = n
                    .get("role")
                    .and_then(|v| v.as_bytes())
                    .map(|b| b.to_ascii_lowercase())
                    .unwrap_or_default();
                let health = n
                    .get("health")
                    .and_then(|v| v.as_bytes())
                    .map(|b| b.to_ascii_lowercase())
                    .unwrap_or_default();
                if role == b"master" {
                    master = Some(addr);
                } else if health == b"online" {
                    replicas.push(addr);
                }
            }
            let Some(master) = master else { continue };
            let mut ranges = Vec::new();
            for pair in slots.chunks(2) {
                if let [a, b] = pair {
                    if let (Some(a), Some(b)) = (a.as_int(), b.as_int()) {
                        ranges.push((a, b));
                    }
                }
            }
            if ranges.is_empty() {
                // A master without slots serves nothing (and Redis 7.0 briefly lists fresh
                // replicas this way): leave it out so fan-out never counts it.
                continue;
            }
            builder.add(master, replicas, &ranges);
        }
        builder.build()
    }

    /// Builds a cluster topology from a `CLUSTER SLOTS` reply.
    pub fn from_cluster_slots(reply: &Value) -> Option<Topology> {
        let Value::Array(entries) = reply else {
            return None;
        };
        let mut builder = Builder::default();
        for e in entries {
            let Value::Array(f) = e else { continue };
            let (Some(a), Some(b)) = (
                f.first().and_then(Value::as_int),
                f.get(1).and_then(Value::as_int),
            ) else {
                continue;
            };
            let addr = |v: &Value| -> Option<String> {
                let Value::Array(n) = v else { return None };
                let host = n.first()?.as_bytes()?;
                let port = n.get(1)?.as_int()?;
                Some(format!("{}:{port}", String::from_utf8_lossy(host)))
            };
            let Some(master) = f.get(2).and_then(addr) else {
                continue;
            };
            let replicas = f.iter().skip(3).filter_map(addr).collect();
            builder.add(master, replicas, &[(a, b)]);
        }
        builder.build()
    }
}

/// A discovered shard: master, replicas, slot ranges.
type Discovered = (String, Vec<String>, Vec<(i64, i64)>);

#[derive(Default)]
struct Builder {
    shards: Vec<Discovered>,
}

impl Builder {
    fn add(&mut self, master: String, replicas: Vec<String>, ranges: &[(i64, i64)]) {
        match self.shards.iter_mut().find(|s| s.0 == master) {
            Some(s) => {
                s.2.extend_from_slice(ranges);
                for r in replicas {
                    if !s.1.contains(&r) {
                        s.1.push(r);
                    }
                }
            }
            None => self.shards.push((master, replicas, ranges.to_vec())),
        }
    }

    fn build(mut self) -> Option<Topology> {
        if self.shards.is_empty() {
            return None;
        }
        self.shards.sort_by(|a, b| a.0.cmp(&b.0));
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut shards = Vec::new();
        let mut slots = vec![NO_SHARD; SLOTS];
        for (i, (master, replicas, ranges)) in self.shards.iter().enumerate() {
            nodes.push(Arc::from(master.as_str()));
            let m = nodes.len() - 1;
            let mut r = Vec::new();
            for rep in replicas {
                nodes.push(Arc::from(rep.as_str()));
                r.push(nodes.len() - 1);
            }
            shards.push(Shard {
                master: m,
                replicas: r,
            });
            for &(a, b) in ranges {
                for s in a.max(0)..=b.min(SLOTS as i64 - 1) {
                    slots[s as usize] = i as u16;
                }
            }
        }
        Some(Topology {
            version: 0,
            kind: BackendKind::Cluster,
            nodes,
            shards,
            slots,
            managed: true,
        })
    }
}

/// How often slots moving between masters are logged, at most.
const RESHARDING_LOG_EVERY: Duration = Duration::from_secs(10);

/// Slots moved between masters since resharding was last logged, and when that was.
#[derive(Default)]
struct Resharding {
    logged: Option<Instant>,
    slots: usize,
    refreshes: usize,
}

/// The current topology and how to change it.
pub struct TopologyState {
    current: crate::versioned::Versioned<Topology>,
    patch: Mutex<()>,
    /// Slot moves not logged yet (see [`TopologyState::note_resharding`]).
    resharding: Mutex<Resharding>,
    refresh: Notify,
    /// Seed addresses for cluster discovery.
    discovery: Discovery,
}

/// How the topology is learnt.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// Fixed by the configuration.
    Static,
    /// From Redis Cluster nodes, starting with these seeds.
    Cluster {
        /// Seed addresses.
        seeds: Vec<String>,
    },
    /// From Redis Sentinel: one shard per master name.
    Sentinel {
        /// Sentinel addresses.
        sentinels: Vec<String>,
        /// Master names, in shard order.
        names: Vec<String>,
        /// How to log in to the sentinels (the address is filled in per sentinel).
        settings: NodeSettings,
    },
}

impl TopologyState {
    /// Starts from `initial`, later learnt by `discovery`.
    pub fn new(initial: Topology, discovery: Discovery) -> TopologyState {
        let version = initial.version;
        TopologyState {
            current: crate::versioned::Versioned::new(initial, version),
            patch: Mutex::new(()),
            resharding: Mutex::new(Resharding::default()),
            refresh: Notify::new(),
            discovery,
        }
    }

    /// The version of the current snapshot (cheap: compare before loading).
    pub fn version(&self) -> u64 {
        self.current.version()
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Topology> {
        self.current.load()
    }

    fn publish(&self, mut t: Topology) {
        let v = self.current.version() + 1;
        t.version = v;
        self.current.store(t, v);
    }

    /// Asks the manager for a refresh soon.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Records a `MOVED slot addr` redirection: the slot now belongs to `addr`.
    pub fn moved(&self, slot: u16, addr: &str) {
        let Ok(_guard) = self.patch.lock() else {
            return;
        };
        let cur = self.load();
        if let Some(m) = cur.master_of(slot) {
            if &*cur.nodes[m] == addr {
                return;
            }
        }
        let mut t = (*cur).clone();
        let shard = match t.shards.iter().position(|s| &*t.nodes[s.master] == addr) {
            Some(i) => i,
            None => {
                let node = match t.node_index(addr) {
                    Some(i) => i,
                    None => {
                        t.nodes.push(Arc::from(addr));
                        t.nodes.len() - 1
                    }
                };
                // A replica promoted, or a new master: give it a shard of its own.
                for s in t.shards.iter_mut() {
                    s.replicas.retain(|&r| r != node);
                }
                t.shards.push(Shard {
                    master: node,
                    replicas: Vec::new(),
                });
                t.shards.len() - 1
            }
        };
        t.slots[slot as usize] = shard as u16;
        debug!(slot, addr, "slot moved");
        crate::metrics::backend_stats()
            .topology_updates
            .with_label_values(&["moved"])
            .inc();
        self.publish(t);
        self.request_refresh();
    }

    /// Learns the topology once (cluster nodes or sentinels); publishes it if it changed.
    pub async fn refresh_once(&self, settings: &NodeSettings) -> Result<(), String> {
        match &self.discovery {
            Discovery::Static => Ok(()),
            Discovery::Cluster { seeds } => self.refresh_cluster(settings, seeds).await,
            Discovery::Sentinel {
                sentinels,
                names,
                settings: s,
            } => {
                let mut last_err = String::from("no sentinels to ask");
                for addr in sentinels {
                    match fetch_from_sentinel(s, addr, names).await {
                        Ok(t) => {
                            self.publish_if_changed(t, addr);
                            return Ok(());
                        }
                        Err(e) => last_err = format!("sentinel {addr}: {e}"),
                    }
                }
                Err(last_err)
            }
        }
    }

    /// Logs slots moving between masters: the first move of an episode at once, later ones
    /// summed up at most every [`RESHARDING_LOG_EVERY`] (the metrics count every move).
    fn note_resharding(&self, source: &str, slots: usize) {
        let Ok(mut r) = self.resharding.lock() else {
            return;
        };
        r.slots += slots;
        r.refreshes += 1;
        let now = Instant::now();
        if r.logged
            .is_none_or(|at| now.duration_since(at) >= RESHARDING_LOG_EVERY)
        {
            info!(
                source,
                slots = r.slots,
                refreshes = r.refreshes,
                "slots moved between masters (resharding)"
            );
            *r = Resharding {
                logged: Some(now),
                slots: 0,
                refreshes: 0,
            };
        }
    }

    fn publish_if_changed(&self, t: Topology, source: &str) {
        let cur = self.load();
        if !t.same_as(&cur) {
            // Masters that now serve slots another node served: failovers (and resharding).
            let master = |topo: &Topology, s: u16| {
                topo.master_of(s).and_then(|m| topo.nodes.get(m)).cloned()
            };
            let mut taken_over = std::collections::HashSet::new();
            let mut moved = 0usize;
            for s in 0..SLOTS as u16 {
                if let (Some(a), Some(b)) = (master(&cur, s), master(&t, s))
                    && a != b
                {
                    taken_over.insert(b);
                    moved += 1;
                }
            }
            let masters = |topo: &Topology| {
                topo.masters()
                    .filter_map(|m| topo.nodes.get(m).cloned())
                    .collect::<std::collections::HashSet<_>>()
            };
            // The same masters with slots moved between them: resharding, which refreshes the
            // topology after every batch of migrated slots — logged once per episode, then at
            // most every RESHARDING_LOG_EVERY with what moved in between.
            let resharding = masters(&cur) == masters(&t);
            if !taken_over.is_empty() {
                crate::metrics::backend_stats()
                    .failovers
                    .inc_by(taken_over.len() as u64);
                if resharding {
                    self.note_resharding(source, moved);
                } else {
                    warn!(
                        source,
                        nodes = taken_over.len(),
                        "slots changed master (a failover, a lost or a new master)"
                    );
                }
            }
            let listed = || {
                t.masters()
                    .map(|m| t.nodes[m].to_string())
                    .collect::<Vec<_>>()
            };
            if resharding && moved > 0 {
                debug!(source, shards = t.shards.len(), masters = ?listed(), "topology updated");
            } else {
                info!(source, shards = t.shards.len(), masters = ?listed(), "topology updated");
            }
            if let Ok(_guard) = self.patch.lock() {
                crate::metrics::backend_stats()
                    .topology_updates
                    .with_label_values(&["refresh"])
                    .inc();
                self.publish(t);
            }
        }
    }

    async fn refresh_cluster(
        &self,
        settings: &NodeSettings,
        seeds: &[String],
    ) -> Result<(), String> {
        let cur = self.load();
        let mut candidates: Vec<String> = cur.masters().map(|m| cur.nodes[m].to_string()).collect();
        for n in cur.nodes.iter() {
            if !candidates.iter().any(|c| c == &**n) {
                candidates.push(n.to_string());
            }
        }
        for s in seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        // Ask up to three nodes and publish the view at least two agree on, so one node with a
        // stale view (common in the middle of a failover) does not flip the map back and forth.
        let mut last_err = String::from("no nodes to ask");
        let mut views: Vec<(String, Topology)> = Vec::new();
        for addr in candidates {
            match fetch_topology(settings, &addr).await {
                Ok(t) => {
                    if !t.complete() {
                        debug!(node = %addr, "cluster map from this node is incomplete");
                    }
                    if let Some((src, agreed)) = views.iter().find(|(_, v)| v.same_as(&t)) {
                        let src = format!("{src} and {addr}");
                        let agreed = agreed.clone();
                        self.publish_if_changed(agreed, &src);
                        return Ok(());
                    }
                    views.push((addr, t));
                    if views.len() >= 3 {
                        break;
                    }
                }
                Err(e) => {
                    debug!(node = %addr, error = %e, "topology query failed");
                    last_err = format!("{addr}: {e}");
                }
            }
        }
        // No two agree (or only one answered): take the first answer and look again soon.
        let disagree = views.len() > 1;
        if let Some((src, t)) = views.into_iter().next() {
            self.publish_if_changed(t, &src);
            if disagree {
                self.request_refresh();
            }
            return Ok(());
        }
        Err(last_err)
    }

    /// Keeps the topology fresh: on a timer, when asked (at most every `min_gap`), and on
    /// Sentinel's `+switch-master` announcements.
    pub async fn manage(&self, settings: NodeSettings, interval: Duration, min_gap: Duration) {
        tokio::join!(
            self.refresh_loop(settings, interval, min_gap),
            self.watch_sentinels()
        );
    }

    /// Listens for `+switch-master` on any reachable sentinel and refreshes at once when one comes.
    async fn watch_sentinels(&self) {
        let Discovery::Sentinel {
            sentinels,
            settings,
            ..
        } = &self.discovery
        else {
            return;
        };
        let mut i = 0usize;
        loop {
            let addr = &sentinels[i % sentinels.len()];
            i += 1;
            let node = NodeSettings {
                addr: Arc::from(addr.as_str()),
                ..settings.clone()
            };
            if let Ok(mut stream) = backend::connect_internal(&node, ConnKey::new(0, 2)).await {
                let mut out = BytesMut::new();
                protocol::encode_args(&mut out, &["SUBSCRIBE", "+switch-master"]);
                if stream.send(&out).await.is_ok() {
                    let mut buf = BytesMut::new();
                    while let Ok(frame) = backend::read_frame(&mut stream, &mut buf).await {
                        if frame.windows(b"message".len()).any(|w| w == b"message") {
                            info!(sentinel = %addr, "sentinel announced a new master");
                            self.request_refresh();
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn refresh_loop(&self, settings: NodeSettings, interval: Duration, min_gap: Duration) {
        let mut failures = 0u32;
        loop {
            match self.refresh_once(&settings).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures % 30 == 0 {
                        warn!(error = %e, "cannot discover the topology");
                    }
                }
            }
            tokio::time::sleep(min_gap).await;
            let _ = tokio::time::timeout(interval, self.refresh.notified()).await;
        }
    }
}

/// Asks one sentinel for the master (and healthy replicas) of every name.
async fn fetch_from_sentinel(
    settings: &NodeSettings,
    addr: &str,
    names: &[String],
) -> Result<Topology, String> {
    let node = NodeSettings {
        addr: Arc::from(addr),
        ..settings.clone()
    };
    let mut stream = backend::connect_internal(&node, ConnKey::new(0, 2)).await?;
    let mut out = BytesMut::new();
    for name in names {
        protocol::encode_args(&mut out, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", name]);
        protocol::encode_args(&mut out, &["SENTINEL", "REPLICAS", name]);
    }
    let io = async {
        stream.send(&out).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::new();
        let mut specs: Vec<ShardParts> = Vec::new();
        for name in names {
            let master = Value::parse(&backend::read_frame(&mut stream, &mut buf).await?)
                .map_err(|e| e.to_string())?;
            let replicas = Value::parse(&backend::read_frame(&mut stream, &mut buf).await?)
                .map_err(|e| e.to_string())?;
            let Value::Array(m) = master else {
                return Err(format!("sentinel does not know master {name:?}"));
            };
            let (Some(host), Some(port)) = (
                m.first().and_then(|v| v.as_bytes()),
                m.get(1).and_then(Value::as_int),
            ) else {
                return Err(format!("unexpected reply for master {name:?}"));
            };
            let mut reps = Vec::new();
            if let Value::Array(list) = replicas {
                for r in &list {
                    let flags = r
                        .get("flags")
                        .and_then(|f| f.as_bytes())
                        .map(|f| String::from_utf8_lossy(f).into_owned())
                        .unwrap_or_default();
                    if flags.contains("s_down")
                        || flags.contains("o_down")
                        || flags.contains("disconnected")
                    {
                        continue;
                    }
                    if let (Some(h), Some(p)) = (
                        r.get("ip").and_then(|v| v.as_bytes()),
                        r.get("port").and_then(Value::as_int),
                    ) {
                        reps.push(format!("{}:{p}", String::from_utf8_lossy(h)));
                    }
                }
            }
            specs.push((
                format!("{}:{port}", String::from_utf8_lossy(host)),
                reps,
                Vec::new(),
            ));
        }
        let mut t = Topology::shards(&specs)?;
        t.kind = if names.len() == 1 {
            BackendKind::Standalone
        } else {
            BackendKind::Shards
        };
        t.managed = true;
        Ok(t)
    };
    match tokio::time::timeout(settings.command_timeout, io).await {
        Ok(r) => r,
        Err(_) => Err("no reply".into()),
    }
}

async fn fetch_topology(settings: &NodeSettings, addr: &str) -> Result<Topology, String> {
    let node = NodeSettings {
        addr: Arc::from(addr),
        ..settings.clone()
    };
    let mut stream = backend::connect_internal(&node, ConnKey::new(0, 2)).await?;
    let mut buf = BytesMut::new();
    let ask = |args: &[&str]| {
        let mut out = BytesMut::new();
        protocol::encode_args(&mut out, args);
        out
    };
    let req = ask(&["CLUSTER", "SHARDS"]);
    let io = async {
        stream.send(&req).await.map_err(|e| e.to_string())?;
        let frame = backend::read_frame(&mut stream, &mut buf).await?;
        let v = Value::parse(&frame).map_err(|e| e.to_string())?;
        if let Some(t) = Topology::from_cluster_shards(&v, settings.tls.is_some()) {
            return Ok(t);
        }
        if let Value::Error(e) = &v {
            if e.starts_with(b"ERR This instance has cluster support disabled") {
                return Err("cluster support is disabled on this node".to_string());
            }
        }
        let req = ask(&["CLUSTER", "SLOTS"]);
        stream.send(&req).await.map_err(|e| e.to_string())?;
        let frame = backend::read_frame(&mut stream, &mut buf).await?;
        let v = Value::parse(&frame).map_err(|e| e.to_string())?;
        Topology::from_cluster_slots(&v).ok_or_else(|| "no slots in the reply".to_string())
    };
    match tokio::time::timeout(settings.command_timeout, io).await {
        Ok(r) => r,
        Err(_) => Err("no reply".into()),
    }
}

/// Node indexes by address for the current topology (used when rebuilding caches).
pub fn index_by_addr(t: &Topology) -> HashMap<Arc<str>, usize> {
    t.nodes
        .iter()
        .enumerate()
        .map(|(i, a)| (a.clone(), i))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use bytes::Bytes;

    #[test]
    fn slots_match_redis() {
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"123456789"), 12739);
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b""), 0);
        // Past 32 bytes the braces are found the other way: same answers.
        let long = format!("{}{{user1000}}{}", "x".repeat(40), "y".repeat(40));
        assert_eq!(key_slot(long.as_bytes()), key_slot(b"user1000"));
        let tail = format!("{{{}}}", "z".repeat(50));
        assert_eq!(
            key_slot(tail.as_bytes()),
            key_slot("z".repeat(50).as_bytes())
        );
        assert_eq!(
            key_slot(&[b'a'; 64]),
            SLOT_CRC.checksum(&[b'a'; 64]) % SLOTS as u16
        );
        // What `CLUSTER KEYSLOT` answers (Redis 7.0): keys longer than one 16-byte step of
        // the table, and braces that make no tag.
        for (key, slot) in [
            (&b"key:000000012345"[..], 12533),
            (b"user:1234:profile:settings:long-key-name-here", 1956),
            (b"session:9f8e7d6c5b4a39281706f5e4d3c2b1a0", 3560),
            (b"{}abc", 5980),
            (b"abc{", 3048),
            (b"a{b}c{d}", 3300),
            (b"{{x}}", 11068),
        ] {
            assert_eq!(key_slot(key), slot, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn even_split_and_explicit_ranges() {
        let t = Topology::shards(&[
            ("a:1".into(), vec![], vec![]),
            ("b:1".into(), vec![], vec![]),
            ("c:1".into(), vec![], vec![]),
        ])
        .unwrap();
        assert_eq!(
            t.ranges(),
            vec![vec![(0, 5461)], vec![(5462, 10922)], vec![(10923, 16383)]]
        );
        let e = Topology::shards(&[
            ("a:1".into(), vec![], vec![(0, 100)]),
            ("b:1".into(), vec![], vec![(101, 16383)]),
        ])
        .unwrap();
        assert_eq!(e.master_of(100), Some(0));
        assert!(Topology::shards(&[("a:1".into(), vec![], vec![(0, 100)])]).is_err());
    }

    #[test]
    fn parses_cluster_slots() {
        let raw = Bytes::from_static(
            b"*2\r\n*4\r\n:0\r\n:8191\r\n*3\r\n$9\r\n127.0.0.1\r\n:7001\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7004\r\n$2\r\nid\r\n*3\r\n:8192\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n",
        );
        let t = Topology::from_cluster_slots(&Value::parse(&raw).unwrap()).unwrap();
        assert!(t.complete());
        assert_eq!(&*t.nodes[t.master_of(0).unwrap()], "127.0.0.1:7001");
        assert_eq!(&*t.nodes[t.master_of(9000).unwrap()], "127.0.0.1:7000");
        // Masters sorted by address.
        assert_eq!(&*t.nodes[t.shards[0].master], "127.0.0.1:7000");
        assert_eq!(t.shards[1].replicas.len(), 1);
    }

    #[test]
    fn moved_patches_one_slot() {
        let t = Topology::shards(&[
            ("a:1".into(), vec![], vec![]),
            ("b:1".into(), vec![], vec![]),
        ])
        .unwrap();
        let st = TopologyState::new(t, Discovery::Static);
        let v = st.version();
        st.moved(0, "b:1");
        assert_eq!(&*st.load().nodes[st.load().master_of(0).unwrap()], "b:1");
        assert!(st.version() > v);
        st.moved(1, "c:1");
        assert_eq!(&*st.load().nodes[st.load().master_of(1).unwrap()], "c:1");
        assert_eq!(
            st.load()
                .master_of(2)
                .map(|m| st.load().nodes[m].to_string())
                .as_deref(),
            Some("a:1")
        );
    }
}
