//! Who the aggregators are and what each can serve: membership in a JetStream key-value bucket.
//!
//! An aggregator started with `--node-id` announces itself in the bucket `<stream>_members`
//! under its id: its gRPC address, the partitions it can serve reads for (`ready`: caught up
//! with the log), the ones it is building, how far its readers are behind, and whether it is
//! leaving. It announces again every fifth of the member TTL and whenever that changes; the
//! bucket keeps an entry for one TTL after its last announcement (`max_age`), and with limit
//! markers the servers tell every watcher when an entry ages out, so a member that stopped
//! heartbeating (killed, cut off) leaves everyone's view one TTL later; a member that stops
//! cleanly deletes its entry and leaves at once.
//!
//! Every service that needs the membership watches the bucket ([`Membership::watch`]) and gets
//! the live members in a `tokio::sync::watch` channel. As a second line, a watcher also drops a
//! member it has not heard from for a TTL of its own clock, so a missed expiry marker (a watcher
//! reconnecting while the marker aged out) cannot keep a dead member in its view.
//!
//! Why a key-value bucket and not a protocol of our own: JetStream already replicates it (R3 like
//! the stream), orders its updates, and expires what is not refreshed; the membership is small
//! (a few hundred bytes per aggregator) and changes rarely, so its cost does not matter.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use async_nats::jetstream::{
    kv::{self, Operation},
    stream::StorageType,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{error::ClusterError, log::HitStream};

/// Heartbeats per TTL: a member is dropped only after it missed this many in a row.
const HEARTBEATS_PER_TTL: u32 = 5;

/// Pause before watching again after the watch failed.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);

/// The most bytes of one member's entry (a few hundred bytes per member even with 512
/// partitions; anything larger is not ours).
const MAX_ENTRY_BYTES: i32 = 64 * 1024;

/// What one aggregator announces about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Its stable id (`--node-id`, e.g. the pod name): the key of its entry and the name the
    /// placement ranks.
    pub node_id: String,
    /// The gRPC address query reads it at (`--advertise`).
    pub address: String,
    /// Partitions it serves reads for: caught up with the log.
    pub ready: Vec<u32>,
    /// Partitions it is building (rebuilding from the log); not readable yet.
    pub building: Vec<u32>,
    /// Messages its reader of the ready partitions has yet to apply (0: caught up).
    pub lag: u64,
    /// Messages its reader of the building partitions has yet to apply.
    #[serde(default)]
    pub building_lag: u64,
    /// It is leaving: the placement no longer gives it partitions, and it goes on serving what
    /// it holds until their new hosts are ready.
    #[serde(default)]
    pub leaving: bool,
}

/// The membership flags (aggregators, query, `hitctl cluster status`).
#[derive(Debug, Clone, clap::Args)]
pub struct MembershipArgs {
    /// How long after its last heartbeat an aggregator leaves the membership (and the
    /// placement), in milliseconds. Members heartbeat five times per TTL. Fixed for the bucket
    /// when the first service creates it.
    #[arg(long, env = "HITCOUNTER_MEMBER_TTL_MS", default_value_t = 10_000)]
    pub member_ttl_ms: u64,
}

impl MembershipArgs {
    /// The member TTL.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(self.member_ttl_ms.max(1000))
    }
}

/// The live members, by node id.
pub type Members = BTreeMap<String, MemberInfo>;

/// Whether `node_id` can be a member's id: the characters a key of the bucket (and a NATS
/// subject token) may hold, at most 128 of them.
pub fn check_node_id(node_id: &str) -> Result<(), ClusterError> {
    let valid = !node_id.is_empty()
        && node_id.len() <= 128
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
        && !node_id.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(ClusterError::Config(format!(
            "--node-id {node_id:?}: use 1 to 128 of the characters a-z A-Z 0-9 - _ = (e.g. the pod name)"
        )))
    }
}

/// The membership bucket of a cluster's stream.
#[derive(Clone)]
pub struct Membership {
    kv: kv::Store,
    bucket: String,
    ttl: Duration,
}

impl Membership {
    /// Opens the membership bucket of `stream`, creating it if it does not exist (with `ttl`,
    /// on `replicas` servers, in memory: it is rewritten every few seconds, and a member lost
    /// with every server's memory announces itself again within a heartbeat).
    ///
    /// # Errors
    /// Fails when the bucket cannot be created or read.
    pub async fn open(
        stream: &HitStream,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Self, ClusterError> {
        let js = stream.jetstream();
        let bucket = format!("{}_members", stream.name());
        let error = |message: String| ClusterError::Stream {
            stream: format!("KV_{bucket}"),
            message,
        };
        let ttl = ttl.max(Duration::from_secs(1));
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "hitcounter aggregators: address, readiness, heartbeat".into(),
                    history: 1,
                    max_age: ttl,
                    max_value_size: MAX_ENTRY_BYTES,
                    // Bounded like everything else: room for 256 members at the largest entry.
                    max_bytes: i64::from(MAX_ENTRY_BYTES) * 256,
                    storage: StorageType::Memory,
                    num_replicas: replicas.max(1),
                    // The servers leave a marker when an entry ages out, so watchers learn
                    // that a member stopped heartbeating; the marker itself lives one TTL.
                    limit_markers: Some(ttl),
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                // Two services created it at once: take the winner's.
                Err(created) => js
                    .get_key_value(&bucket)
                    .await
                    .map_err(|_| error(format!("cannot create it: {created}")))?,
            },
        };
        let configured = kv
            .status()
            .await
            .map_err(|e| error(format!("cannot read its configuration: {e}")))?
            .max_age();
        if configured != ttl {
            tracing::warn!(bucket = %bucket, bucket_ttl = ?configured, member_ttl = ?ttl, "the membership bucket was created with another member TTL; the bucket's holds for expiry");
        }
        Ok(Self { kv, bucket, ttl })
    }

    /// The member TTL this service uses (heartbeats, and its own expiry of silent members).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often a member announces itself.
    pub fn heartbeat_interval(&self) -> Duration {
        self.ttl / HEARTBEATS_PER_TTL
    }

    /// Announces (or refreshes) `info` under its node id.
    ///
    /// # Errors
    /// Fails when the bucket cannot be written.
    pub async fn announce(&self, info: &MemberInfo) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(info).map_err(|e| self.error(e.to_string()))?;
        self.kv
            .put(&info.node_id, value.into())
            .await
            .map(|_| ())
            .map_err(|e| self.error(format!("cannot announce {}: {e}", info.node_id)))
    }

    /// Removes `node_id` from the membership at once (a clean leave).
    ///
    /// # Errors
    /// Fails when the bucket cannot be written.
    pub async fn leave(&self, node_id: &str) -> Result<(), ClusterError> {
        self.kv
            .delete(node_id)
            .await
            .map_err(|e| self.error(format!("cannot remove {node_id}: {e}")))
    }

    /// The members as the bucket holds them now (one read, for tools such as `hitctl`).
    ///
    /// # Errors
    /// Fails when the bucket cannot be read.
    pub async fn members(&self) -> Result<Members, ClusterError> {
        let mut members = Members::new();
        let mut keys = match self.kv.keys().await {
            Ok(keys) => keys,
            Err(error) => return Err(self.error(format!("cannot list the members: {error}"))),
        };
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| self.error(format!("cannot list the members: {e}")))?;
            let value = self
                .kv
                .get(&key)
                .await
                .map_err(|e| self.error(format!("cannot read member {key}: {e}")))?;
            if let Some(info) = value.as_deref().and_then(decode) {
                members.insert(key, info);
            }
        }
        Ok(members)
    }

    /// Watches the membership: the returned channel holds the live members and changes when
    /// one joins, leaves, expires or announces something new. The watch runs until every
    /// receiver is dropped, and resumes by itself after a failure.
    ///
    /// The channel starts with the members the bucket holds now (one read), so a service
    /// starting up sees the cluster as it is rather than empty.
    pub async fn watch(&self) -> watch::Receiver<Members> {
        let current = match self.members().await {
            Ok(members) => members,
            Err(error) => {
                tracing::warn!(%error, "cannot read the membership yet; watching it");
                Members::new()
            }
        };
        let (sender, receiver) = watch::channel(current);
        tokio::spawn(watch_members(self.clone(), sender));
        receiver
    }

    fn error(&self, message: String) -> ClusterError {
        ClusterError::Stream {
            stream: format!("KV_{}", self.bucket),
            message,
        }
    }
}

fn decode(value: &[u8]) -> Option<MemberInfo> {
    match serde_json::from_slice(value) {
        Ok(info) => Some(info),
        Err(error) => {
            tracing::warn!(%error, "a membership entry that is not a member's; ignored");
            None
        }
    }
}

/// The watch task behind [`Membership::watch`].
async fn watch_members(membership: Membership, members: watch::Sender<Members>) {
    // When each member was last heard from, on this process's clock.
    let mut heard: BTreeMap<String, Instant> = members
        .borrow()
        .keys()
        .map(|id| (id.clone(), Instant::now()))
        .collect();
    let mut expire = tokio::time::interval(membership.heartbeat_interval());
    expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !members.is_closed() {
        let mut updates = match membership.kv.watch_all().await {
            Ok(updates) => updates,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the membership; trying again");
                tokio::time::sleep(REWATCH_PAUSE).await;
                continue;
            }
        };
        loop {
            tokio::select! {
                update = updates.next() => match update {
                    Some(Ok(entry)) => {
                        let key = entry.key.clone();
                        let info = match entry.operation {
                            Operation::Put => decode(&entry.value),
                            Operation::Delete | Operation::Purge => None,
                        };
                        members.send_if_modified(|members| match info {
                            Some(info) => {
                                heard.insert(key.clone(), Instant::now());
                                members.insert(key, info.clone()) != Some(info)
                            }
                            None => {
                                heard.remove(&key);
                                members.remove(&key).is_some()
                            }
                        });
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "watching the membership failed; watching again");
                        break;
                    }
                    None => break,
                },
                _ = expire.tick() => {
                    let ttl = membership.ttl;
                    let silent: Vec<String> = heard
                        .iter()
                        .filter(|(_, at)| at.elapsed() > ttl)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in silent {
                        heard.remove(&id);
                        tracing::info!(node = %id, "no heartbeat from a member for a TTL: leaving it out");
                        members.send_if_modified(|members| members.remove(&id).is_some());
                    }
                    if members.is_closed() {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(REWATCH_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_checked() {
        for good in ["aggregator-0", "a", "node_1", "pod=x"] {
            assert!(check_node_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a b", "-x", "ä", &"x".repeat(129)] {
            let error = check_node_id(bad).expect_err(bad).to_string();
            assert!(error.contains("--node-id"), "{error}");
        }
    }

    #[test]
    fn an_entry_round_trips() {
        let info = MemberInfo {
            node_id: "aggregator-1".into(),
            address: "http://aggregator-1.aggregator:50052".into(),
            ready: vec![1, 2, 5],
            building: vec![7],
            lag: 12,
            building_lag: 3,
            leaving: false,
        };
        let bytes = serde_json::to_vec(&info).expect("encodes");
        assert_eq!(decode(&bytes), Some(info));
        assert_eq!(decode(b"not json"), None);
    }
}
