//! Full disks (issue #14), on real size-limited file systems made by the test (`mount -t tmpfs
//! -o size=…`; needs root, and fails saying so rather than skipping): ingest's log refuses
//! writes with `RESOURCE_EXHAUSTED` when its disk fills, loses nothing acknowledged, and resumes
//! without a restart once space is freed; ingest starts on a full disk; the aggregator's
//! checkpoint fails on a full disk without leftovers or harm, and succeeds once space is back.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use hitcounter_integration_tests::{
    connect, eventually, metric_value, now_ms, scrape, start_aggregator, start_ingest, start_query,
    LinkMode, LinkProxy, Running,
};
use hitcounter_proto::v1::{ingest_client::IngestClient, Hit, RecordHitsRequest};
use tonic::Code;

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| {
                anyhow::anyhow!("cannot run mount (this test needs root and mount(8)): {e}")
            })?;
        anyhow::ensure!(
            output.status.success(),
            "cannot mount a {size} tmpfs on {} (this test needs root, or CAP_SYS_ADMIN): {}",
            dir.path().display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left with a file; returns its path (delete it to free the space).
    fn fill(&self) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path)?;
        let block = vec![0xAAu8; 4096];
        loop {
            match file.write_all(&block) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(e.into()),
            }
        }
        // A partial block may still fit: fill byte-wise up to the end.
        while file.write_all(&[0xAA]).is_ok() {}
        Ok(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a service of a failed test may still hold files open.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn request(prefix: &str, n: u64, hits: u64) -> RecordHitsRequest {
    RecordHitsRequest {
        hits: (0..hits)
            .map(|i| Hit {
                key: format!("{prefix}-{n}-{i}-{}", "x".repeat(100)),
                timestamp_ms: now_ms(),
                count: 1,
            })
            .collect(),
        batch_id: String::new(),
    }
}

async fn ingest_client(
    ingest: &Running,
) -> anyhow::Result<IngestClient<tonic::transport::Channel>> {
    Ok(IngestClient::new(connect(ingest.addr).await?))
}

/// The window counts of `keys`, through query, 1000 keys per call.
async fn counts(query: &Running, keys: &[String]) -> anyhow::Result<Vec<u64>> {
    let mut client =
        hitcounter_proto::v1::query_client::QueryClient::new(connect(query.addr).await?);
    let mut all = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let answer = client
            .get_hits_many(hitcounter_proto::v1::GetHitsManyRequest {
                keys: chunk.to_vec(),
                window_seconds: 3600,
                at_ms: 0,
            })
            .await?
            .into_inner();
        all.extend(answer.results.into_iter().map(|r| r.count));
    }
    Ok(all)
}

/// Acknowledged requests' keys (one hit each) must all count exactly once; refused ones not.
async fn check_counts(
    query: &Running,
    acked: &[RecordHitsRequest],
    refused: &[RecordHitsRequest],
) -> anyhow::Result<()> {
    let keys = |requests: &[RecordHitsRequest]| -> Vec<String> {
        requests
            .iter()
            .flat_map(|r| r.hits.iter().map(|h| h.key.clone()))
            .collect()
    };
    let (acked, refused) = (keys(acked), keys(refused));
    let last = std::cell::RefCell::new(String::new());
    let counted = eventually(
        Duration::from_secs(60),
        "every acknowledged hit to be counted once",
        || async {
            let seen = counts(query, &acked).await.ok()?;
            let wrong: Vec<_> = acked
                .iter()
                .zip(&seen)
                .filter(|(_, n)| **n != 1)
                .take(3)
                .collect();
            *last.borrow_mut() = format!(
                "{} of {} keys not counted once, e.g. {wrong:?}",
                seen.iter().filter(|n| **n != 1).count(),
                acked.len()
            );
            wrong.is_empty().then_some(())
        },
    )
    .await;
    counted.map_err(|e| anyhow::anyhow!("{e}: {}", last.borrow()))?;
    let seen = counts(query, &refused).await?;
    anyhow::ensure!(
        seen.iter().all(|n| *n == 0),
        "refused requests were counted: {seen:?}"
    );
    Ok(())
}

/// Ingest's log fills its disk while the aggregator is away: writes are refused with a clear
/// RESOURCE_EXHAUSTED, nothing acknowledged is lost, and once the aggregator is back (the log
/// trims) writing resumes in the same process; a restart then recovers the log cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_disk_refuses_writes_then_resumes_without_a_restart() -> anyhow::Result<()> {
    hitcounter_integration_tests::init_logging();
    let disk = SmallDisk::mount("2m")?;
    let data = disk.path().join("ingest");
    let data_arg = data.display().to_string();
    let aggregator = start_aggregator(&["--checkpoint-interval-ms", "200"]).await?;
    let link = LinkProxy::start(aggregator.addr).await?;
    let ingest_args = ["--data-dir", data_arg.as_str(), "--segment-bytes", "262144"];
    let mut ingest = start_ingest(&[link.addr], &ingest_args).await?;
    let query = start_query(&[link.addr], &[]).await?;
    ingest.ready("ingest").await?;
    let mut client = ingest_client(&ingest).await?;

    // The aggregator is away: the log keeps everything until the disk is full.
    link.set(LinkMode::Refuse);
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let mut message = None;
    for n in 0..100_000 {
        let batch = request("a", n, 20);
        match client.record_hits(batch.clone()).await {
            Ok(_) => acked.push(batch),
            Err(status) => {
                anyhow::ensure!(
                    status.code() == Code::ResourceExhausted,
                    "a write on a full disk must be RESOURCE_EXHAUSTED, got {status:?}"
                );
                message.get_or_insert(status.message().to_owned());
                refused.push(batch);
                if refused.len() >= 3 {
                    break;
                }
            }
        }
    }
    let message = message.ok_or_else(|| anyhow::anyhow!("the 2 MiB disk never filled"))?;
    anyhow::ensure!(
        message.contains("the disk holding the ingest log is full")
            && message.contains("nothing of this request was counted"),
        "the refusal should say why: {message}"
    );
    anyhow::ensure!(!ingest.task.is_finished(), "ingest stopped on a full disk");
    let full = metric_value(
        &scrape(ingest.metrics_addr).await?,
        "hitcounter_ingest_log_disk_full_total",
        &[],
    );
    anyhow::ensure!(
        full.is_some_and(|n| n >= 1.0),
        "disk-full writes are counted: {full:?}"
    );

    // The aggregator comes back: the backlog drains, the log trims, and writes are taken again.
    link.set(LinkMode::Pass);
    let back = std::time::Instant::now();
    let resumed = eventually(Duration::from_secs(60), "a write to be taken again", || {
        let mut client = client.clone();
        let n = acked.len() as u64 + 1_000_000;
        async move {
            let batch = request("b", n, 20);
            client.record_hits(batch.clone()).await.ok().map(|_| batch)
        }
    })
    .await?;
    eprintln!(
        "2 MiB tmpfs: {} requests of 20 hits acknowledged before the disk was full; writes \
         taken again {:?} after the aggregator came back (no restart)",
        acked.len(),
        back.elapsed()
    );
    acked.push(resumed);
    check_counts(&query, &acked, &refused).await?;

    // A restart on that disk recovers the log (no torn record it cannot handle) and goes on.
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    let mut ingest = start_ingest(&[link.addr], &ingest_args).await?;
    ingest.ready("ingest after the full disk").await?;
    let mut client = ingest_client(&ingest).await?;
    let after = request("c", 0, 5);
    client.record_hits(after.clone()).await?;
    acked.push(after);
    check_counts(&query, &acked, &refused).await?;

    ingest.stop().await.map_err(anyhow::Error::msg)?;
    query.stop().await.map_err(anyhow::Error::msg)?;
    aggregator.stop().await.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Ingest starts on a full disk (start-up writes nothing that did not change), refuses writes
/// while it is full, and takes them again, without a restart, once space is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_starts_on_a_full_disk_and_resumes_when_space_is_freed() -> anyhow::Result<()> {
    hitcounter_integration_tests::init_logging();
    let disk = SmallDisk::mount("4m")?;
    let data = disk.path().join("ingest");
    let data_arg = data.display().to_string();
    let aggregator = start_aggregator(&["--checkpoint-interval-ms", "200"]).await?;
    let ingest_args = ["--data-dir", data_arg.as_str(), "--segment-bytes", "262144"];
    let mut ingest = start_ingest(&[aggregator.addr], &ingest_args).await?;
    let query = start_query(&[aggregator.addr], &[]).await?;
    ingest.ready("ingest").await?;
    let mut acked = vec![request("a", 0, 5)];
    ingest_client(&ingest)
        .await?
        .record_hits(acked[0].clone())
        .await?;
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    // Leftovers of an interrupted rewrite, then no space at all.
    std::fs::write(data.join("shards.tmp"), b"7")?;
    let filler = disk.fill()?;

    let mut ingest = start_ingest(&[aggregator.addr], &ingest_args).await?;
    ingest.ready("ingest on a full disk").await?;
    anyhow::ensure!(
        !data.join("shards.tmp").exists(),
        "the leftover was not removed"
    );
    let mut client = ingest_client(&ingest).await?;
    // Removing the leftover freed a little: fill again.
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&filler)?;
        while file.write_all(&[0xAA; 512]).is_ok() {}
        while file.write_all(&[0xAA]).is_ok() {}
    }
    // The log's last page may still have room for a record or two (a file system allocates
    // whole pages): those are acknowledged, rightly.
    let mut refusal = None;
    for n in 0..50 {
        let batch = request("full", n, 20);
        match client.record_hits(batch.clone()).await {
            Ok(_) => acked.push(batch),
            Err(status) => {
                refusal = Some((batch, status));
                break;
            }
        }
    }
    let (refused, status) =
        refusal.ok_or_else(|| anyhow::anyhow!("50 writes on a full disk were acknowledged"))?;
    anyhow::ensure!(
        status.code() == Code::ResourceExhausted
            && status
                .message()
                .contains("the disk holding the ingest log is full"),
        "{status:?}"
    );
    std::fs::remove_file(&filler)?;
    let after = request("b", 0, 5);
    client.record_hits(after.clone()).await?;
    acked.push(after);
    check_counts(&query, &acked, &[refused]).await?;
    ingest.stop().await.map_err(anyhow::Error::msg)?;
    query.stop().await.map_err(anyhow::Error::msg)?;
    aggregator.stop().await.map_err(anyhow::Error::msg)?;
    Ok(())
}

fn checkpoint_files(dir: &Path) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut done = Vec::new();
    let mut tmp = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".ckpt") {
            done.push(name);
        } else if name.ends_with(".ckpt.tmp") {
            tmp.push(name);
        }
    }
    done.sort();
    Ok((done, tmp))
}

/// The aggregator's checkpoint on a full disk: it keeps serving, counts the failure, keeps the
/// previous checkpoint, leaves no `.tmp` behind, ingest trims nothing it would have covered, and
/// the next checkpoint after space is back holds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_on_a_full_disk_fails_cleanly_and_succeeds_once_space_is_back(
) -> anyhow::Result<()> {
    hitcounter_integration_tests::init_logging();
    let disk = SmallDisk::mount("2m")?;
    let data = disk.path().join("aggregator");
    let data_arg = data.display().to_string();
    let aggregator_args = [
        "--data-dir",
        data_arg.as_str(),
        "--checkpoint-interval-ms",
        "200",
    ];
    let mut aggregator = start_aggregator(&aggregator_args).await?;
    aggregator.ready("aggregator").await?;
    let link = LinkProxy::start(aggregator.addr).await?;
    let ingest = start_ingest(&[link.addr], &[]).await?;
    let query = start_query(&[link.addr], &[]).await?;
    let mut client = ingest_client(&ingest).await?;
    let mut acked = vec![request("a", 0, 10)];
    client.record_hits(acked[0].clone()).await?;
    check_counts(&query, &acked, &[]).await?;
    let first = eventually(Duration::from_secs(30), "a first checkpoint", || async {
        let (done, _) = checkpoint_files(&data).ok()?;
        (!done.is_empty()).then_some(done)
    })
    .await?;

    let filler = disk.fill()?;
    // Enough state that a new checkpoint cannot fit in what removing a leftover could free.
    for n in 1..40 {
        let batch = request("a", n, 20);
        client.record_hits(batch.clone()).await?;
        acked.push(batch);
    }
    check_counts(&query, &acked, &[]).await?;
    let metrics = aggregator.metrics_addr;
    eventually(
        Duration::from_secs(30),
        "failed checkpoints to be counted",
        || async {
            let failures = metric_value(
                &scrape(metrics).await.ok()?,
                "hitcounter_aggregator_checkpoint_failures_total",
                &[],
            )?;
            (failures >= 2.0).then_some(())
        },
    )
    .await?;
    // Without the clean-up a failed write's `.tmp` stays until a checkpoint succeeds.
    eventually(
        Duration::from_secs(30),
        "no .tmp left by a failed checkpoint",
        || async {
            let (done, tmp) = checkpoint_files(&data).ok()?;
            (tmp.is_empty() && done == first).then_some(())
        },
    )
    .await?;
    anyhow::ensure!(!aggregator.task.is_finished(), "the aggregator stopped");

    std::fs::remove_file(&filler)?;
    eventually(
        Duration::from_secs(30),
        "a checkpoint once space is back",
        || async {
            let (done, _) = checkpoint_files(&data).ok()?;
            (done.len() == 1 && done != first).then_some(())
        },
    )
    .await?;
    // What that checkpoint holds survives a restart from it (ingest resends the rest).
    let addr = aggregator.addr;
    link.set(LinkMode::Refuse);
    aggregator.shutdown.cancel();
    let _ = (&mut aggregator.task).await;
    let restarted =
        hitcounter_integration_tests::start_aggregator_on(addr, &aggregator_args).await?;
    link.set(LinkMode::Pass);
    check_counts(&query, &acked, &[]).await?;

    ingest.stop().await.map_err(anyhow::Error::msg)?;
    query.stop().await.map_err(anyhow::Error::msg)?;
    restarted.stop().await.map_err(anyhow::Error::msg)?;
    Ok(())
}
