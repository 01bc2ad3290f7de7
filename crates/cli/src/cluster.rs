//! `hitctl cluster status`: the aggregators of a cluster and where its partitions live.
//!
//! It opens the cluster's stream (which must exist: a tool creates nothing), reads the
//! membership bucket once, and computes the placement the aggregators compute from the same
//! members (`Roster::from_members`: rendezvous hashing over the members that are not leaving).
//! For each partition it shows the hosts the placement picks, each with its readiness as the
//! host announces it (ready, building, or not started yet), and any other member still serving
//! it (a former host that keeps a partition until its new hosts are ready). Reads of a
//! partition go to its ready replicas, so a partition with none is one whose keys cannot be
//! read: then the exit code is 1, for scripts that wait on a cluster (with `--settled`, also
//! while any partition is still moving).

use std::collections::BTreeMap;

use hitcounter_cluster::{
    inspect::existing_membership, ClusterArgs, HitStream, MemberInfo, Members, Roster,
};
use serde_json::{json, Value};

use crate::{cli::ClusterStatusArgs, error::CliError, output::Printer, Outcome};

/// How many partition numbers a message names before it says "…".
const LISTED_PARTITIONS: usize = 10;

/// `hitctl cluster status`.
pub(crate) async fn status(args: ClusterStatusArgs, out: Printer) -> Result<Outcome, CliError> {
    let cluster = ClusterArgs {
        nats: args.nats.clone(),
        nats_stream: args.nats_stream.clone(),
        // Only for creating a stream, which `open_existing` never does.
        partitions: None,
        nats_replicas: 1,
        nats_max_bytes: 0,
        nats_timeout_ms: args.nats_timeout_ms,
        nats_ca_cert: args.nats_ca_cert.clone(),
        nats_tls_cert: args.nats_tls_cert.clone(),
        nats_tls_key: args.nats_tls_key.clone(),
    };
    let stream = HitStream::open_existing(&cluster).await?;
    let members = match existing_membership(&stream, args.membership.ttl()).await? {
        Some(membership) => membership.members().await?,
        None => Members::new(),
    };
    let status = Status::new(
        stream.name(),
        stream.partitions(),
        args.placement.replicas,
        &members,
    );
    if out.json() {
        out.document(&status.json())?;
    } else {
        for line in status.lines() {
            out.line(&line)?;
        }
    }
    let unreadable = status.unreadable();
    if unreadable.is_empty() {
        let moving = status.moving();
        if args.settled && !moving.is_empty() {
            out.problem(&format!(
                "{} of {} partitions have not settled ({}): a host is not ready yet, or a \
                 former host still serves them",
                moving.len(),
                status.partitions,
                list(&moving)
            ));
            return Ok(Outcome::Failure);
        }
        return Ok(Outcome::Success);
    }
    let why = if members.is_empty() {
        format!(
            "no aggregator has announced itself in {}_members (aggregators started with \
             --node-id do; those started with --node-index use static placement, which this \
             command cannot see)",
            status.stream
        )
    } else {
        "their keys cannot be read until a replica is ready".to_owned()
    };
    out.problem(&format!(
        "{} of {} partitions have no ready replica ({}): {why}",
        unreadable.len(),
        status.partitions,
        list(&unreadable)
    ));
    Ok(Outcome::Failure)
}

/// `0, 5, 9` or `0, 1, …, 9, … (40 in all)`.
fn list(partitions: &[u32]) -> String {
    let shown: Vec<String> = partitions
        .iter()
        .take(LISTED_PARTITIONS)
        .map(u32::to_string)
        .collect();
    if partitions.len() > LISTED_PARTITIONS {
        format!("{}, … ({} in all)", shown.join(", "), partitions.len())
    } else {
        shown.join(", ")
    }
}

/// A host's readiness for one partition, as it announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// Caught up with the log: serves reads.
    Ready,
    /// Rebuilding it from the log: no reads yet.
    Building,
    /// Placed on it, but it does not say it has started (it has not seen the new placement
    /// yet, or cannot take the partition).
    NotStarted,
}

impl Readiness {
    fn name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Building => "building",
            Self::NotStarted => "not started",
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Building => "building",
            Self::NotStarted => "not_started",
        }
    }
}

/// One replica of a partition: a member and its readiness and lag for it.
#[derive(Debug, Clone)]
struct Replica {
    node_id: String,
    readiness: Readiness,
    /// The member's lag for partitions in this state (`None`: not started).
    lag: Option<u64>,
}

/// One partition's placement.
#[derive(Debug, Clone)]
struct PartitionStatus {
    partition: u32,
    /// The hosts the placement picks, preferred first.
    hosts: Vec<Replica>,
    /// Other members still serving it (former hosts).
    former: Vec<Replica>,
}

impl PartitionStatus {
    /// Members that serve reads of it: ready hosts and former hosts.
    fn ready_replicas(&self) -> usize {
        self.hosts
            .iter()
            .filter(|r| r.readiness == Readiness::Ready)
            .count()
            + self.former.len()
    }

    /// Whether it is where the placement wants it and nowhere else: every host ready, no
    /// former host left.
    fn settled(&self) -> bool {
        self.former.is_empty() && self.hosts.iter().all(|r| r.readiness == Readiness::Ready)
    }
}

/// What `cluster status` prints.
#[derive(Debug, Clone)]
struct Status {
    stream: String,
    partitions: u32,
    replicas: usize,
    members: Vec<MemberInfo>,
    /// Partitions the placement gives each member, by node id.
    placed: BTreeMap<String, usize>,
    placement: Vec<PartitionStatus>,
}

impl Status {
    fn new(stream: &str, partitions: u32, replicas: usize, members: &Members) -> Self {
        let roster = Roster::from_members(partitions, replicas, members);
        let by_id: BTreeMap<&str, &MemberInfo> =
            members.values().map(|m| (m.node_id.as_str(), m)).collect();
        let replica = |node: usize, partition: u32| {
            let id = roster.nodes[node].id.clone();
            let info = by_id.get(id.as_str());
            let (readiness, lag) = match info {
                Some(m) if m.ready.contains(&partition) => (Readiness::Ready, Some(m.lag)),
                Some(m) if m.building.contains(&partition) => {
                    (Readiness::Building, Some(m.building_lag))
                }
                _ => (Readiness::NotStarted, None),
            };
            Replica {
                node_id: id,
                readiness,
                lag,
            }
        };
        let placement: Vec<PartitionStatus> = (0..roster.partitions)
            .map(|p| {
                let hosts = roster.hosts(p);
                PartitionStatus {
                    partition: p,
                    hosts: hosts.iter().map(|&n| replica(n, p)).collect(),
                    former: roster
                        .readers(p)
                        .into_iter()
                        .filter(|n| !hosts.contains(n))
                        .map(|n| replica(n, p))
                        .collect(),
                }
            })
            .collect();
        let placed = roster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| (node.id.clone(), roster.partitions_of(i).len()))
            .collect();
        Self {
            stream: stream.to_owned(),
            partitions: roster.partitions,
            replicas: roster.replicas,
            members: members.values().cloned().collect(),
            placed,
            placement,
        }
    }

    /// Partitions with no ready replica.
    fn unreadable(&self) -> Vec<u32> {
        self.placement
            .iter()
            .filter(|p| p.ready_replicas() == 0)
            .map(|p| p.partition)
            .collect()
    }

    /// Partitions not settled (a host not ready, or a former host still serving).
    fn moving(&self) -> Vec<u32> {
        self.placement
            .iter()
            .filter(|p| !p.settled())
            .map(|p| p.partition)
            .collect()
    }

    /// (with at least R ready replicas, with fewer, with none, not settled).
    fn summary(&self) -> (usize, usize, usize, usize) {
        let ready = |p: &&PartitionStatus| p.ready_replicas();
        let full = self
            .placement
            .iter()
            .filter(|p| ready(p) >= self.replicas)
            .count();
        let none = self.placement.iter().filter(|p| ready(p) == 0).count();
        let moving = self.moving().len();
        (full, self.placement.len() - full - none, none, moving)
    }

    fn json(&self) -> Value {
        let replica = |r: &Replica| json!({"node_id": r.node_id, "state": r.readiness.json_name(), "lag": r.lag});
        let (full, fewer, none, moving) = self.summary();
        json!({
            "stream": self.stream,
            "partitions": self.partitions,
            "replicas": self.replicas,
            "members": self.members.iter().map(|m| json!({
                "node_id": m.node_id,
                "address": m.address,
                "ready": m.ready,
                "building": m.building,
                "lag": m.lag,
                "building_lag": m.building_lag,
                "leaving": m.leaving,
                "placed": self.placed.get(&m.node_id).copied().unwrap_or(0),
            })).collect::<Vec<_>>(),
            "placement": self.placement.iter().map(|p| json!({
                "partition": p.partition,
                "ready_replicas": p.ready_replicas(),
                "hosts": p.hosts.iter().map(replica).collect::<Vec<_>>(),
                "former_hosts": p.former.iter().map(replica).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "summary": {
                "ready": full,
                "fewer": fewer,
                "none": none,
                "moving": moving,
                "settled": moving == 0,
            },
        })
    }

    fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "stream {}: {} partitions, {} replicas each, {} {}",
            self.stream,
            self.partitions,
            self.replicas,
            self.members.len(),
            if self.members.len() == 1 {
                "member"
            } else {
                "members"
            }
        )];
        lines.push(String::new());
        let mut rows = vec![[
            "MEMBER",
            "ADDRESS",
            "PLACED",
            "READY",
            "BUILDING",
            "LAG",
            "BUILD LAG",
            "STATE",
        ]
        .map(str::to_owned)];
        for m in &self.members {
            let state = if m.leaving {
                "leaving"
            } else if !m.building.is_empty() {
                "building"
            } else {
                "serving"
            };
            rows.push([
                m.node_id.clone(),
                m.address.clone(),
                self.placed
                    .get(&m.node_id)
                    .copied()
                    .unwrap_or(0)
                    .to_string(),
                m.ready.len().to_string(),
                m.building.len().to_string(),
                m.lag.to_string(),
                m.building_lag.to_string(),
                state.to_owned(),
            ]);
        }
        if self.members.is_empty() {
            lines.push("no members".to_owned());
        } else {
            // Names left-aligned, numbers right-aligned.
            lines.extend(table(
                &rows,
                &[false, false, true, true, true, true, true, false],
            ));
        }
        lines.push(String::new());
        let describe = |r: &Replica, former: bool| {
            let what = if former { "former host, " } else { "" };
            match r.lag {
                Some(lag) => format!("{} ({what}{}, lag {lag})", r.node_id, r.readiness.name()),
                None => format!("{} ({what}{})", r.node_id, r.readiness.name()),
            }
        };
        let mut rows = vec![["PARTITION", "READY", "REPLICAS"].map(str::to_owned)];
        for p in &self.placement {
            let replicas: Vec<String> = p
                .hosts
                .iter()
                .map(|r| describe(r, false))
                .chain(p.former.iter().map(|r| describe(r, true)))
                .collect();
            rows.push([
                p.partition.to_string(),
                format!("{}/{}", p.ready_replicas(), self.replicas),
                if replicas.is_empty() {
                    "no host".to_owned()
                } else {
                    replicas.join(", ")
                },
            ]);
        }
        lines.extend(table(&rows, &[true, true, false]));
        let (full, fewer, none, moving) = self.summary();
        lines.push(String::new());
        let settled = if moving == 0 {
            "placement settled".to_owned()
        } else {
            format!("{moving} moving (a host not ready yet, or a former host still serving)")
        };
        lines.push(format!(
            "partitions: {full} with {} ready {}, {fewer} with fewer, {none} with none; {settled}",
            self.replicas,
            if self.replicas == 1 {
                "replica"
            } else {
                "replicas"
            }
        ));
        lines
    }
}

/// Rows as columns separated by two spaces; `right[i]` right-aligns column i. The last column
/// is not padded (no trailing spaces).
fn table<const N: usize>(rows: &[[String; N]], right: &[bool; N]) -> Vec<String> {
    let mut widths = [0usize; N];
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    let width = widths[i];
                    match (right[i], i + 1 == N) {
                        (true, _) => format!("{cell:>width$}"),
                        (false, false) => format!("{cell:<width$}"),
                        (false, true) => cell.clone(),
                    }
                })
                .collect();
            cells.join("  ")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, ready: &[u32], building: &[u32], leaving: bool) -> MemberInfo {
        MemberInfo {
            node_id: id.into(),
            address: format!("http://{id}:50052"),
            ready: ready.to_vec(),
            building: building.to_vec(),
            lag: 3,
            building_lag: 40,
            leaving,
        }
    }

    fn members(list: Vec<MemberInfo>) -> Members {
        list.into_iter().map(|m| (m.node_id.clone(), m)).collect()
    }

    #[test]
    fn a_settled_cluster_has_every_partition_on_r_ready_hosts() {
        // Each member announces what the placement gives it, all ready.
        let ids = ["a", "b", "c"];
        let empty = members(ids.iter().map(|id| member(id, &[], &[], false)).collect());
        let roster = Roster::from_members(8, 2, &empty);
        let settled = members(
            ids.iter()
                .enumerate()
                .map(|(i, id)| {
                    let ready: Vec<u32> = roster.partitions_of(i).into_iter().collect();
                    member(id, &ready, &[], false)
                })
                .collect(),
        );
        let status = Status::new("s", 8, 2, &settled);
        assert_eq!(status.summary(), (8, 0, 0, 0));
        assert!(status.unreadable().is_empty());
        let lines = status.lines();
        assert_eq!(
            lines[0],
            "stream s: 8 partitions, 2 replicas each, 3 members"
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some(
                "partitions: 8 with 2 ready replicas, 0 with fewer, 0 with none; placement settled"
            )
        );
        // No line ends in padding.
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{lines:#?}");
    }

    #[test]
    fn a_move_shows_building_hosts_and_former_hosts() {
        // "old" is leaving and still serves every partition; "new" builds them all.
        let status = Status::new(
            "s",
            4,
            1,
            &members(vec![
                member("new", &[], &[0, 1, 2, 3], false),
                member("old", &[0, 1, 2, 3], &[], true),
            ]),
        );
        assert_eq!(status.summary(), (4, 0, 0, 4));
        let json = status.json();
        let p0 = &json["placement"][0];
        assert_eq!(p0["hosts"][0]["node_id"], "new");
        assert_eq!(p0["hosts"][0]["state"], "building");
        assert_eq!(p0["hosts"][0]["lag"], 40);
        assert_eq!(p0["former_hosts"][0]["node_id"], "old");
        assert_eq!(p0["former_hosts"][0]["lag"], 3);
        assert_eq!(p0["ready_replicas"], 1);
        assert_eq!(json["summary"]["settled"], false);
        let text = status.lines().join("\n");
        assert!(
            text.contains("new (building, lag 40), old (former host, ready, lag 3)"),
            "{text}"
        );
    }

    #[test]
    fn partitions_without_a_ready_replica_are_named() {
        let status = Status::new("s", 3, 2, &members(vec![member("a", &[1], &[0], false)]));
        assert_eq!(status.unreadable(), vec![0, 2]);
        // Partition 1 is where the placement wants it (its one host, ready): not moving.
        assert_eq!(status.summary(), (0, 1, 2, 2));
        let text = status.lines().join("\n");
        assert!(text.contains("a (not started)"), "{text}");
        assert_eq!(
            Status::new("s", 2, 2, &Members::new()).unreadable(),
            vec![0, 1]
        );
        assert_eq!(
            list(&(0..12).collect::<Vec<_>>()),
            "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, … (12 in all)"
        );
    }
}
