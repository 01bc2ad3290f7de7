//! `hitctl cluster status` against a real NATS JetStream cluster (three `nats-server` 2.15.1, the
//! integration tests' harness; a one-node harness cluster never elects a JetStream leader): members announced in the real membership bucket with
//! `Membership::announce`, the real `hitctl` binary, its text and JSON output and exit codes;
//! and that it creates neither a stream nor a membership bucket that does not exist.

use std::{process::Command, time::Duration};

use hitcounter_cluster::{
    inspect::existing_membership, ClusterArgs, HitStream, MemberInfo, Members, Membership, Roster,
};
use hitcounter_integration_tests::{nats::NatsCluster, process::ClosedPort};
use serde_json::Value;

const HITCTL: &str = env!("CARGO_BIN_EXE_hitctl");
const PARTITIONS: u32 = 8;
/// Long enough that no announced member expires while the test runs.
const TTL: Duration = Duration::from_secs(600);

/// What a finished `hitctl` printed.
#[derive(Debug)]
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {self:?}"))
    }
}

async fn hitctl(args: &[&str]) -> Output {
    let mut command = Command::new(HITCTL);
    command.args(args);
    for var in [
        "HITCOUNTER_NATS",
        "HITCOUNTER_NATS_STREAM",
        "HITCOUNTER_REPLICAS",
        "HITCOUNTER_MEMBER_TTL_MS",
        "HITCOUNTER_NATS_TIMEOUT_MS",
        "HITCOUNTER_NATS_CA_CERT",
        "HITCOUNTER_NATS_TLS_CERT",
        "HITCOUNTER_NATS_TLS_KEY",
    ] {
        command.env_remove(var);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("hitctl runs");
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn cluster_args(nats: &NatsCluster, stream: &str) -> ClusterArgs {
    ClusterArgs {
        nats: nats.urls().split(',').map(str::to_owned).collect(),
        nats_stream: stream.to_owned(),
        partitions: Some(PARTITIONS),
        nats_replicas: 1,
        nats_max_bytes: 64 << 20,
        nats_timeout_ms: 5000,
        nats_ca_cert: None,
        nats_tls_cert: None,
        nats_tls_key: None,
    }
}

fn member(id: &str, ready: Vec<u32>, building: Vec<u32>, leaving: bool) -> MemberInfo {
    MemberInfo {
        node_id: id.to_owned(),
        address: format!("http://{id}.aggregator:50052"),
        ready,
        building,
        lag: 2,
        building_lag: 77,
        leaving,
    }
}

/// The partitions the placement over `ids` gives `id`, R = 2.
fn placed(ids: &[&str], id: &str) -> Vec<u32> {
    let members: Members = ids
        .iter()
        .map(|i| (i.to_string(), member(i, vec![], vec![], false)))
        .collect();
    let roster = Roster::from_members(PARTITIONS, 2, &members);
    let node = roster.node(id).expect("a member");
    roster.partitions_of(node).into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_prints_members_and_placement_and_fails_without_a_ready_replica() {
    let nats = NatsCluster::start(3).await.expect("nats-server");
    let url = nats.urls();
    let status = |stream: &'static str, json: bool| {
        let url = url.clone();
        async move {
            let mut args = vec!["cluster", "status", "--nats", &url, "--nats-stream", stream];
            if json {
                args.push("--json");
            }
            hitctl(&args).await
        }
    };

    // A stream that does not exist: a clear error, exit 1, and it is not created.
    let out = status("nosuchstream", false).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("nosuchstream") && out.stderr.contains("--nats-stream"),
        "{out:?}"
    );
    let out = status("nosuchstream", true).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.json()["error"]["code"], "CLUSTER", "{out:?}");
    assert!(
        HitStream::open_existing(&cluster_args(&nats, "nosuchstream"))
            .await
            .is_err(),
        "hitctl created the stream"
    );

    // The stream exists, nobody announced: every partition unreadable, exit 1; and the
    // membership bucket is not created either.
    let stream = HitStream::open(&cluster_args(&nats, "status"), Duration::from_secs(3600))
        .await
        .expect("stream");
    let out = status("status", false).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("no members"), "{out:?}");
    assert!(
        out.stderr
            .contains("8 of 8 partitions have no ready replica")
            && out.stderr.contains("no aggregator has announced itself"),
        "{out:?}"
    );
    assert!(
        existing_membership(&stream, TTL)
            .await
            .expect("readable")
            .is_none(),
        "hitctl created the membership bucket"
    );

    // Three members, each ready on what the placement gives it: settled.
    let membership = Membership::open(&stream, TTL, 1).await.expect("bucket");
    let three = ["aggregator-0", "aggregator-1", "aggregator-2"];
    for id in three {
        membership
            .announce(&member(id, placed(&three, id), vec![], false))
            .await
            .expect("announce");
    }
    let out = hitctl(&[
        "cluster",
        "status",
        "--nats",
        &url,
        "--nats-stream",
        "status",
        "--settled",
    ])
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stderr, "", "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[0],
        "stream status: 8 partitions, 2 replicas each, 3 members"
    );
    assert!(
        lines[2].starts_with("MEMBER")
            && lines[3].starts_with("aggregator-0  http://aggregator-0.aggregator:50052"),
        "{out:?}"
    );
    assert_eq!(
        lines.last().copied(),
        Some("partitions: 8 with 2 ready replicas, 0 with fewer, 0 with none; placement settled"),
        "{out:?}"
    );
    let json = status("status", true).await.json();
    assert_eq!(json["stream"], "status");
    assert_eq!(json["partitions"], 8);
    assert_eq!(json["members"].as_array().map(Vec::len), Some(3));
    assert_eq!(json["members"][1]["node_id"], "aggregator-1");
    assert_eq!(json["members"][1]["lag"], 2);
    assert_eq!(
        json["members"][1]["placed"],
        placed(&three, "aggregator-1").len()
    );
    assert_eq!(json["summary"]["ready"], 8);
    assert_eq!(json["summary"]["settled"], true);
    for p in json["placement"].as_array().expect("placement") {
        assert_eq!(p["ready_replicas"], 2, "{p}");
        assert_eq!(p["hosts"].as_array().map(Vec::len), Some(2), "{p}");
    }

    // A fourth member joins and builds what the placement now gives it; aggregator-0 leaves
    // and keeps serving until its partitions' new hosts are ready.
    let four = ["aggregator-1", "aggregator-2", "aggregator-3"];
    membership
        .announce(&member(
            "aggregator-3",
            vec![],
            placed(&four, "aggregator-3"),
            false,
        ))
        .await
        .expect("announce");
    membership
        .announce(&member(
            "aggregator-0",
            placed(&three, "aggregator-0"),
            vec![],
            true,
        ))
        .await
        .expect("announce");
    let out = status("status", true).await;
    assert_eq!(
        out.code,
        Some(0),
        "every partition is still readable: {out:?}"
    );
    let moving = hitctl(&[
        "cluster",
        "status",
        "--nats",
        &url,
        "--nats-stream",
        "status",
        "--settled",
    ])
    .await;
    assert_eq!(moving.code, Some(1), "{moving:?}");
    assert!(moving.stderr.contains("have not settled"), "{moving:?}");
    let json = out.json();
    assert_eq!(json["summary"]["settled"], false, "{json}");
    assert!(json["summary"]["moving"].as_u64() > Some(0), "{json}");
    let leaving = &json["members"][0];
    assert_eq!(leaving["node_id"], "aggregator-0");
    assert_eq!(leaving["leaving"], true);
    assert_eq!(leaving["placed"], 0, "a leaving member is given nothing");
    let mut building = 0;
    for p in json["placement"].as_array().expect("placement") {
        for host in p["hosts"].as_array().expect("hosts") {
            assert_ne!(host["node_id"], "aggregator-0", "{p}");
            if host["node_id"] == "aggregator-3" {
                assert_eq!(host["state"], "building", "{p}");
                assert_eq!(host["lag"], 77, "{p}");
                building += 1;
            }
        }
        // Former hosts: members that hosted it before (aggregator-0, leaving, or a member whose
        // slot aggregator-3 took), still serving it.
        let partition = p["partition"].as_u64().and_then(|p| u32::try_from(p).ok());
        for former in p["former_hosts"].as_array().expect("former hosts") {
            let id = former["node_id"].as_str().expect("an id");
            assert!(
                partition.is_some_and(|partition| placed(&three, id).contains(&partition)),
                "{p}"
            );
            assert_eq!(former["state"], "ready", "{p}");
        }
    }
    assert_eq!(building, placed(&four, "aggregator-3").len());
    let text = status("status", false).await.stdout;
    assert!(text.contains("aggregator-3 (building, lag 77)"), "{text}");
    assert!(
        text.contains("aggregator-0 (former host, ready, lag 2)"),
        "{text}"
    );
    assert!(text.contains("leaving"), "{text}");

    // Only the building member is left: no partition readable, exit 1, the partitions named.
    for id in ["aggregator-0", "aggregator-1", "aggregator-2"] {
        membership.leave(id).await.expect("leave");
    }
    let out = status("status", false).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let unreadable = PARTITIONS as usize;
    assert!(
        out.stderr.contains(&format!(
            "{unreadable} of 8 partitions have no ready replica (0, 1, 2"
        )) && out
            .stderr
            .contains("cannot be read until a replica is ready"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("aggregator-3 (not started)")
            || out.stdout.contains("aggregator-3 (building"),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_status_usage_and_unreachable_errors() {
    // No --nats: a usage error.
    let out = hitctl(&["cluster", "status"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--nats"), "{out:?}");
    // Nobody listening: exit 1, UNREACHABLE.
    let closed = ClosedPort::bind().expect("a closed port");
    let url = format!("nats://{}", closed.addr);
    let out = hitctl(&[
        "cluster",
        "status",
        "--nats",
        &url,
        "--nats-timeout-ms",
        "1000",
        "--json",
    ])
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert_eq!(out.json()["error"]["code"], "UNREACHABLE", "{out:?}");
    assert!(out.stderr.contains("cannot connect to NATS"), "{out:?}");
}
