//! `CLUSTER …` over shards: respire presents itself as one node that owns every
//! slot, at the address the client connected to, so cluster-aware clients
//! (redis-py `RedisCluster`, ioredis `Cluster`, Lettuce) use the one endpoint.

use super::{Session, Use};
use crate::protocol::{self as resp, Command, parse_i64};
use crate::topology::{SLOTS, key_slot};

impl Session {
    pub(super) fn cluster(&mut self, cmd: Command) {
        let args = cmd.to_args();
        let Some(sub) = cmd.arg(1).map(|s| s.to_ascii_lowercase()) else {
            return self.wrong_args("cluster");
        };
        let argc = args.len();
        let id = self.worker.shared.node_id.clone();
        // Where clients reach respire: as configured (`announce`: an IP address, or a hostname
        // that becomes the endpoint, as Redis's `cluster-preferred-endpoint-type hostname`),
        // or where this client connected.
        let local = self.info.laddr.ip().to_string();
        let (endpoint, port, hostname) = match self.worker.shared.config.announced() {
            Some((host, port)) => {
                let name = host.parse::<std::net::IpAddr>().is_err();
                (
                    host.to_string(),
                    i64::from(port),
                    name.then(|| host.to_string()),
                )
            }
            None => (local.clone(), i64::from(self.info.laddr.port()), None),
        };
        let ip = if hostname.is_some() {
            local
        } else {
            endpoint.clone()
        };
        let last = SLOTS as i64 - 1;
        match (sub.as_slice(), argc) {
            (b"info", 2) => {
                let text = format!(
                    "cluster_state:ok\r\ncluster_slots_assigned:{SLOTS}\r\ncluster_slots_ok:{SLOTS}\r\ncluster_slots_pfail:0\r\n\
                     cluster_slots_fail:0\r\ncluster_known_nodes:1\r\ncluster_size:1\r\ncluster_current_epoch:1\r\n\
                     cluster_my_epoch:1\r\ncluster_stats_messages_sent:0\r\ncluster_stats_messages_received:0\r\n\
                     total_cluster_links_buffer_limit_exceeded:0\r\n"
                );
                self.reply_with(|o, p| resp::verbatim(o, text.as_bytes(), p));
            }
            (b"myid", 2) => self.reply_with(|o, _| resp::bulk(o, id.as_bytes())),
            (b"slots", 2) => self.reply_with(|o, p| {
                resp::array_header(o, 1);
                resp::array_header(o, 3);
                resp::int(o, 0);
                resp::int(o, last);
                resp::array_header(o, 4);
                resp::bulk(o, endpoint.as_bytes());
                resp::int(o, port);
                resp::bulk(o, id.as_bytes());
                if hostname.is_some() {
                    resp::map_header(o, 1, p);
                    resp::bulk(o, b"ip");
                    resp::bulk(o, ip.as_bytes());
                } else {
                    resp::map_header(o, 0, p);
                }
            }),
            (b"shards", 2) => self.reply_with(|o, p| {
                resp::array_header(o, 1);
                resp::map_header(o, 2, p);
                resp::bulk(o, b"slots");
                resp::array_header(o, 2);
                resp::int(o, 0);
                resp::int(o, last);
                resp::bulk(o, b"nodes");
                resp::array_header(o, 1);
                resp::map_header(o, 7 + usize::from(hostname.is_some()), p);
                resp::bulk(o, b"id");
                resp::bulk(o, id.as_bytes());
                resp::bulk(o, b"port");
                resp::int(o, port);
                resp::bulk(o, b"ip");
                resp::bulk(o, ip.as_bytes());
                resp::bulk(o, b"endpoint");
                resp::bulk(o, endpoint.as_bytes());
                if let Some(h) = &hostname {
                    resp::bulk(o, b"hostname");
                    resp::bulk(o, h.as_bytes());
                }
                resp::bulk(o, b"role");
                resp::bulk(o, b"master");
                resp::bulk(o, b"replication-offset");
                resp::int(o, 0);
                resp::bulk(o, b"health");
                resp::bulk(o, b"online");
            }),
            (b"nodes", 2) => {
                let name = hostname
                    .as_deref()
                    .map(|h| format!(",{h}"))
                    .unwrap_or_default();
                let line =
                    format!("{id} {ip}:{port}@0{name} myself,master - 0 0 1 connected 0-{last}\n");
                self.reply_with(|o, p| resp::verbatim(o, line.as_bytes(), p));
            }
            // One node has no links to others.
            (b"links", 2) => self.reply_with(|o, _| resp::array_header(o, 0)),
            (b"keyslot", 3) => {
                let slot = i64::from(key_slot(&args[2]));
                self.reply_with(|o, _| resp::int(o, slot));
            }
            (b"countkeysinslot", 3) | (b"getkeysinslot", 4) => {
                let Some(slot) = parse_i64(&args[2]).filter(|s| (0..SLOTS as i64).contains(s))
                else {
                    return self.reply_error("ERR Invalid slot");
                };
                // Route by a key of that slot: the command goes to the slot's owner.
                match self.topo.master_of(slot as u16) {
                    Some(node) => {
                        let w = self.worker.clone();
                        let res = w.shared.commands.resolve(&cmd);
                        self.send(cmd, res, node, Use::Shared, Some(slot as u16));
                    }
                    None => self.reply_error(super::CLUSTERDOWN),
                }
            }
            (
                b"info" | b"myid" | b"slots" | b"shards" | b"nodes" | b"links" | b"keyslot"
                | b"countkeysinslot" | b"getkeysinslot",
                _,
            ) => {
                let s = String::from_utf8_lossy(&sub).into_owned();
                self.wrong_args(&format!("cluster|{s}"));
            }
            _ => {
                let s = String::from_utf8_lossy(&args[1]).to_uppercase();
                self.reply_error(&format!(
                    "ERR respire: CLUSTER {s} is not supported through the proxy"
                ));
            }
        }
    }
}
