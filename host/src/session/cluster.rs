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
        let ip = self.info.laddr.ip().to_string();
        let port = i64::from(self.info.laddr.port());
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
                resp::bulk(o, ip.as_bytes());
                resp::int(o, port);
                resp::bulk(o, id.as_bytes());
                resp::map_header(o, 0, p);
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
                resp::map_header(o, 7, p);
                resp::bulk(o, b"id");
                resp::bulk(o, id.as_bytes());
                resp::bulk(o, b"port");
                resp::int(o, port);
                resp::bulk(o, b"ip");
                resp::bulk(o, ip.as_bytes());
                resp::bulk(o, b"endpoint");
                resp::bulk(o, ip.as_bytes());
                resp::bulk(o, b"role");
                resp::bulk(o, b"master");
                resp::bulk(o, b"replication-offset");
                resp::int(o, 0);
                resp::bulk(o, b"health");
                resp::bulk(o, b"online");
            }),
            (b"nodes", 2) => {
                let line = format!("{id} {ip}:{port}@0 myself,master - 0 0 1 connected 0-{last}\n");
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
