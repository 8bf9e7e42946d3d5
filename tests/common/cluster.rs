//! A Redis Cluster of the test's own: six `redis-server --cluster-enabled yes` on free ports
//! (three masters, each with a replica), joined by `redis-cli --cluster create`, each node
//! stopped on drop. `cluster-node-timeout` is one second, so a replica takes over from a
//! killed master in about two; `cluster-require-full-coverage no`, so the other masters
//! serve meanwhile.

use std::{
    ops::RangeInclusive,
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::Redis;

/// How long a node may be silent before the others hold it failed (`cluster-node-timeout`).
pub const NODE_TIMEOUT: Duration = Duration::from_secs(1);

/// One node: a [`Redis`] (for its `command`) started in cluster mode.
pub struct Node {
    pub redis: Redis,
    /// The cluster bus port, given explicitly: port + 10000 may be past 65535.
    bus: u16,
}

/// Six nodes, three masters with one replica each.
pub struct RedisCluster {
    pub nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts the six nodes, creates the cluster, and waits until every node sees it whole
    /// (all slots served, every replica in sync with its master).
    pub fn start() -> RedisCluster {
        // A port found free may be taken before the node binds it (tests run in parallel):
        // then the node exits, and the cluster starts again on other ports.
        for _ in 0..3 {
            if let Some(cluster) = Self::try_start() {
                return cluster;
            }
        }
        panic!("six redis-server nodes did not start, three times");
    }

    fn try_start() -> Option<RedisCluster> {
        let dir = tempfile::tempdir().unwrap();
        // Twelve distinct free ports: each node's and its cluster bus's.
        let ports = super::free_ports(12);
        let nodes: Vec<Node> = ports
            .chunks(2)
            .map(|pair| Node {
                redis: Redis {
                    port: pair[0],
                    child: Mutex::new(None),
                },
                bus: pair[1],
            })
            .collect();
        let cluster = RedisCluster { nodes, dir };
        for node in &cluster.nodes {
            if !cluster.launch(node) {
                return None;
            }
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.redis.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("redis-cli is installed (it comes with redis-server)");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        cluster.wait_until_whole();
        Some(cluster)
    }

    /// Starts `node` and waits until it answers PING; false if it exited (its port taken).
    fn launch(&self, node: &Node) -> bool {
        let port = node.redis.port.to_string();
        let conf = self.dir.path().join(format!("nodes-{port}.conf"));
        let log = self.dir.path().join(format!("redis-{port}.log"));
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &node.bus.to_string(),
            ])
            .args(["--cluster-config-file", conf.to_str().unwrap()])
            .args([
                "--cluster-node-timeout",
                &NODE_TIMEOUT.as_millis().to_string(),
            ])
            // The masters that are up keep serving their slots while one is away (Redis's
            // default refuses every query until the replica has taken over).
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--dir", self.dir.path().to_str().unwrap()])
            .args(["--logfile", log.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        *node.redis.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.redis.ping() {
            let exited = node
                .redis
                .child
                .lock()
                .unwrap()
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Waits until every live node says `cluster_state:ok` and sees three masters each with
    /// a replica whose link to it is up.
    pub fn wait_until_whole(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let live: Vec<&Node> = self.nodes.iter().filter(|n| n.is_running()).collect();
            let ok = live.iter().all(|n| {
                n.redis
                    .command(&["CLUSTER", "INFO"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            }) && live.iter().all(|n| {
                n.info("replication").is_some_and(|i| {
                    !i.contains("role:slave") || i.contains("master_link_status:up")
                })
            }) && self.masters().len() == 3;
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The seed nodes as `rate_limit.redis_url` takes them: a TOML list of every node.
    pub fn redis_url_toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"redis://127.0.0.1:{}\"", n.redis.port))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// The live nodes that are masters now.
    pub fn masters(&self) -> Vec<&Node> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .filter(|n| {
                n.info("replication")
                    .is_some_and(|i| i.contains("role:master"))
            })
            .collect()
    }

    /// The master serving `key` now, by its own view of its slots.
    pub fn master_of(&self, key: &str) -> &Node {
        let slot = self.slot(key);
        self.masters()
            .into_iter()
            .find(|m| m.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// `key`'s slot, as the cluster computes it.
    pub fn slot(&self, key: &str) -> u16 {
        let node = self.nodes.iter().find(|n| n.is_running()).unwrap();
        let reply = node.redis.command(&["CLUSTER", "KEYSLOT", key]).unwrap();
        reply.trim().trim_start_matches(':').parse().unwrap()
    }
}

impl Node {
    pub fn port(&self) -> u16 {
        self.redis.port
    }

    pub fn is_running(&self) -> bool {
        self.redis.child.lock().unwrap().is_some()
    }

    /// Kills the node (SIGKILL: no goodbye to the cluster), as a crashed master goes.
    pub fn kill(&self) {
        self.redis.stop();
    }

    /// `INFO section`'s text.
    pub fn info(&self, section: &str) -> Option<String> {
        self.redis.command(&["INFO", section])
    }

    /// How many of its keys match `pattern`.
    pub fn keys(&self, pattern: &str) -> u64 {
        let reply = self.redis.command(&["KEYS", pattern]).unwrap();
        let count = reply.lines().next().unwrap_or_default();
        count.trim_start_matches('*').parse().unwrap()
    }

    /// How many keys it holds.
    pub fn dbsize(&self) -> u64 {
        let reply = self.redis.command(&["DBSIZE"]).unwrap();
        reply.trim().trim_start_matches(':').parse().unwrap()
    }

    /// Does this master's own view give it `slot`?
    pub fn serves(&self, slot: u16) -> bool {
        self.slots().iter().any(|r| r.contains(&slot))
    }

    /// The slots this node serves, by its own view (`CLUSTER NODES`' `myself` line).
    pub fn slots(&self) -> Vec<RangeInclusive<u16>> {
        let Some(nodes) = self.redis.command(&["CLUSTER", "NODES"]) else {
            return Vec::new();
        };
        let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
            return Vec::new();
        };
        me.split_whitespace()
            .skip(8)
            .filter_map(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                Some(a.parse::<u16>().ok()?..=b.parse::<u16>().ok()?)
            })
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.redis.stop();
        }
    }
}
