//! GetHits latency at a fixed rate, for comparing a query with and without `--tokens-file`:
//! sends `GetHits(300 s)` of keys drawn from `load/0 .. load/{keys-1}` on a fixed schedule and
//! reports p50/p99/p99.9 measured from each call's intended send time (so a stall shows up in
//! the percentiles instead of delaying the calls behind it).
//!
//! `cargo run --release -p hitcounter-client --example get_hits_latency -- ADDR QPS SECONDS [TOKEN]`
//! (the token also from `HITCOUNTER_TOKEN`; for an `https://` ADDR, the CA file from
//! `HITCOUNTER_CA_CERT`).

use std::time::Duration;

use hitcounter_client::{Client, ClientOptions};
use tokio::time::Instant;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let query = args.next().unwrap_or_else(|| "127.0.0.1:50053".into());
    let qps: u32 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let seconds: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(10);
    let token = args
        .next()
        .or_else(|| std::env::var("HITCOUNTER_TOKEN").ok());
    anyhow::ensure!(qps > 0, "QPS must be above 0");

    let ca_cert = std::env::var_os("HITCOUNTER_CA_CERT").map(Into::into);
    let client = Client::connect_with(&query, &query, ClientOptions { token, ca_cert }).await?;
    let interval = Duration::from_secs(1) / qps;
    let calls = u64::from(qps) * seconds;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel(1024);
    let start = Instant::now() + Duration::from_millis(100);
    let sender = tokio::spawn(async move {
        for i in 0..calls {
            let intended = start + interval * u32::try_from(i).unwrap_or(u32::MAX);
            tokio::time::sleep_until(intended).await;
            let client = client.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let key = format!("load/{}", i % 1000);
                let answered = client.get_hits(&key, Duration::from_secs(300)).await;
                let _ = done.send((intended.elapsed(), answered.is_ok())).await;
            });
        }
    });
    let mut latencies = Vec::with_capacity(calls as usize);
    let mut failed = 0u64;
    while let Some((latency, ok)) = done_rx.recv().await {
        if ok {
            latencies.push(latency);
        } else {
            failed += 1;
        }
        if latencies.len() as u64 + failed == calls {
            break;
        }
    }
    sender.await?;
    latencies.sort_unstable();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1);
        latencies.get(index).copied().unwrap_or_default()
    };
    println!(
        "GetHits at {qps}/s for {seconds} s: {} ok, {failed} failed; p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        latencies.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(0.999).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    Ok(())
}
