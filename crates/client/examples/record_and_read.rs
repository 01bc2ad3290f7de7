//! A typical use of `hitcounter-client`: record hits through a batching recorder, then read the
//! count of the last five minutes back.
//!
//! With hitcounter running (`cargo run --release` from the repository root, or `docker compose up`):
//! `cargo run -p hitcounter-client --example record_and_read -- /checkout 5000`

use std::time::Duration;

use hitcounter_client::{Client, RecorderOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let key = args.next().unwrap_or_else(|| "/example".to_owned());
    let hits: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let ingest =
        std::env::var("HITCOUNTER_INGEST_ADDR").unwrap_or_else(|_| "127.0.0.1:50051".into());
    let query = std::env::var("HITCOUNTER_QUERY_ADDR").unwrap_or_else(|_| "127.0.0.1:50053".into());

    let client = Client::connect(&ingest, &query).await?;
    let before = client.get_hits(&key, Duration::from_secs(300)).await?;
    let recorder = client.recorder(RecorderOptions::default()).await?;
    for _ in 0..hits {
        recorder.record(&key, 1).await?;
    }
    let summary = recorder.close().await?;
    println!(
        "recorded {} hits of {key} in {} batches",
        summary.accepted, summary.batches
    );

    // Acknowledged hits become visible within a second (usually a few milliseconds).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let now = client.get_hits(&key, Duration::from_secs(300)).await?;
        if now >= before + summary.accepted || tokio::time::Instant::now() > deadline {
            println!("{key}: {now} hits in the last 5 minutes");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
