//! The shared store on a Redis Cluster (`rate_limit.redis_url` a list of seed nodes).
//!
//! The same check as on one Redis ([`super::redis`]): ONE `EVALSHA` of the window script
//! per check, which touches one key (`key_prefix:IP`), so one slot, so one node; the
//! cluster client (redis-rs `cluster-async`) sends it to the master that serves the slot
//! and follows MOVED and ASK when slots move. The key layout is the single Redis's, so
//! budgets spread over the cluster's slots by IP.
//!
//! What the breaker needs to keep its circuits per master: the slot of a key (computed
//! here as Redis does: CRC16 of the key, or of its `{hash tag}`, modulo 16384), the
//! cluster's slot table (`CLUSTER SLOTS`) and a probe that asks about a key through the
//! very routing the checks use. Each worker has its own cluster client (a multiplexed
//! connection per node), made and driven on its thread. Nothing here blocks, and nothing
//! decides what a failure means.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use redis::{
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
    Value,
};

use super::{
    redis::{check, key, on, WINDOW_SCRIPT},
    ClientKey, Hit, Shard, Store, StoreError,
};

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// A worker's store on a Redis Cluster.
pub struct ClusterStore {
    conn: ClusterConnection,
    script: Arc<redis::Script>,
    prefix: Arc<str>,
    /// The worker's runtime, where its cluster client runs, whoever asks.
    runtime: tokio::runtime::Handle,
}

impl ClusterStore {
    /// The cluster client for `seeds`: the nodes are found from them. A seed the client
    /// cannot use is refused here, at start.
    pub fn client(seeds: &[String]) -> Result<ClusterClient, redis::RedisError> {
        ClusterClient::builder(seeds.iter().map(String::as_str))
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(500))
            // A check waits 50 ms at most; a retry after a moved slot or a reconnect is
            // worth it only soon.
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
    }

    /// A worker's cluster client, made on the calling (worker) thread, which runs it. It
    /// connects in the background, so the balancer starts while the cluster is away.
    pub fn new(client: &ClusterClient, prefix: Arc<str>) -> Self {
        Self {
            conn: client.get_pending_async_connection_with_config(ClusterConfig::default()),
            script: Arc::new(redis::Script::new(WINDOW_SCRIPT)),
            prefix,
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl Store for ClusterStore {
    fn hit(
        &self,
        client: ClientKey,
        scope: Option<&str>,
        limit: u64,
        window: Duration,
        _now: Instant,
    ) -> Hit {
        check(
            self.conn.clone(),
            self.script.clone(),
            key(&self.prefix, scope, client),
            limit,
            window,
        )
    }

    fn slot(&self, client: ClientKey, scope: Option<&str>) -> Option<u16> {
        Some(slot(key(&self.prefix, scope, client).as_bytes()))
    }

    /// `PTTL` of the client's key: a read that only the master serving its slot answers (a
    /// replica, before it has taken over, answers MOVED to the master that is away), sent
    /// through this worker's client exactly as its checks are.
    fn ping(
        &self,
        client: ClientKey,
        scope: Option<&str>,
    ) -> Option<BoxFuture<'static, Result<(), StoreError>>> {
        let mut conn = self.conn.clone();
        let key = key(&self.prefix, scope, client);
        Some(on(&self.runtime, Ok(()), async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .map(drop)
                .map_err(StoreError::Redis)
        }))
    }

    fn shards(&self) -> Option<BoxFuture<'static, Result<Vec<Shard>, StoreError>>> {
        let mut conn = self.conn.clone();
        let gone = Err(StoreError::Timeout(Duration::ZERO));
        Some(on(&self.runtime, gone, async move {
            let table = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn)
                .await?;
            Ok(shards(&table))
        }))
    }
}

/// The slot a key lives in, as Redis computes it: CRC16 (XMODEM) of the key, or of the
/// part between the first `{` and the next `}` when that is not empty, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial 0), the one Redis Cluster uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The masters and their slots from a `CLUSTER SLOTS` answer: entries of `[first, last,
/// [host, port, id], replicas...]`, grouped by master. Entries it cannot read are skipped
/// (their slots then fall to the whole-cluster circuit).
fn shards(table: &Value) -> Vec<Shard> {
    let mut shards: Vec<Shard> = Vec::new();
    let Value::Array(entries) = table else {
        return shards;
    };
    for entry in entries {
        let Value::Array(fields) = entry else {
            continue;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        let (Ok(first), Ok(last)) = (u16::try_from(*first), u16::try_from(*last)) else {
            continue;
        };
        if first > last || last >= SLOTS {
            continue;
        }
        let host = match master.first() {
            Some(Value::BulkString(h)) if !h.is_empty() => String::from_utf8_lossy(h).into(),
            _ => "?".to_string(),
        };
        let port = match master.get(1) {
            Some(Value::Int(p)) => p.to_string(),
            _ => "?".to_string(),
        };
        let name = format!("{host}:{port}");
        match shards.iter_mut().find(|s| s.master == name) {
            Some(shard) => shard.slots.push(first..=last),
            None => shards.push(Shard {
                master: name,
                slots: vec![first..=last],
            }),
        }
    }
    for shard in &mut shards {
        shard.slots.sort_by_key(|r| *r.start());
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // The CRC16 check value, and slots that `CLUSTER KEYSLOT` gives (Redis 7.0).
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"roundabout:rl:10.0.0.1"), 16347);
        // A hash tag counts alone; an empty one does not.
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b""), 0);
    }

    #[test]
    fn the_slot_table_is_grouped_by_master() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let entry = |first, last, master: i64, replica: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                node(master),
                node(replica),
            ])
        };
        let table = Value::Array(vec![
            entry(5461, 10922, 7001, 7004),
            entry(10923, 16383, 7002, 7005),
            entry(0, 5460, 7000, 7003),
            entry(20000, 1, 7000, 7003),
            Value::Nil,
        ]);
        assert_eq!(
            shards(&table),
            [
                Shard {
                    master: "127.0.0.1:7001".into(),
                    slots: vec![5461..=10922]
                },
                Shard {
                    master: "127.0.0.1:7002".into(),
                    slots: vec![10923..=16383]
                },
                Shard {
                    master: "127.0.0.1:7000".into(),
                    slots: vec![0..=5460]
                },
            ]
        );
    }
}
