//! What the clustered tests send and read: random batches with batch ids, window counts of
//! many keys through query, and a wait until query answers exactly what was acknowledged.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use hitcounter_proto::v1::{query_client::QueryClient, GetHitsManyRequest, Hit, RecordHitsRequest};
use rand::{rngs::StdRng, Rng};

use crate::{connect, now_ms};

/// The stream's size limit (`--nats-max-bytes`) for clustered tests: the default (8 GiB) is
/// reserved on each of the three NATS servers' disk, all on the test machine's one disk, and a
/// machine with less free space than that refuses to create the stream.
pub const STREAM_BYTES: &str = "1073741824";

/// Command-line arguments from string slices.
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Window counts (the last hour) of `keys` through query, in order.
///
/// # Errors
/// When query cannot be reached or refuses the read.
pub async fn counts(query: SocketAddr, keys: &[String]) -> anyhow::Result<Vec<u64>> {
    let mut client = QueryClient::new(connect(query).await?);
    let response = client
        .get_hits_many(GetHitsManyRequest {
            keys: keys.to_vec(),
            window_seconds: 3600,
            at_ms: 0,
        })
        .await?
        .into_inner();
    Ok(response.results.into_iter().map(|r| r.count).collect())
}

/// Waits until query answers exactly `want` for `keys` (a hang guard, not a timing goal: the
/// aggregators may still be reading the log's tail).
///
/// # Errors
/// After `within`, naming the last answer.
pub async fn until_counts(
    query: SocketAddr,
    keys: &[String],
    want: &[u64],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let last = match counts(query, keys).await {
            Ok(got) if got == want => return Ok(()),
            Ok(got) => format!("counts {got:?}, want {want:?}"),
            Err(error) => format!("read failed: {error:#}"),
        };
        anyhow::ensure!(Instant::now() < deadline, "after {within:?}: {last}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A batch of 1 to 19 hits of random `keys` in the last 5 seconds, with batch id `id`.
pub fn batch(keys: &[String], rng: &mut StdRng, id: String) -> RecordHitsRequest {
    let now = now_ms();
    let hits = (0..rng.random_range(1..20))
        .map(|_| Hit {
            key: keys[rng.random_range(0..keys.len())].clone(),
            timestamp_ms: now - rng.random_range(0..5_000),
            count: rng.random_range(1..5),
        })
        .collect();
    RecordHitsRequest { hits, batch_id: id }
}
