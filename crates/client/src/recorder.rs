//! The batching recorder: hits go into a bounded queue, a background task packs them into
//! batches (flushing at `max_batch` hits or after `max_delay`) and sends them over one
//! `StreamHits` stream, counting the acks.
//!
//! Backpressure reaches the caller: when the server slows the stream down, the task stops
//! draining the queue and [`Recorder::record`] waits.

use std::time::Duration;

use tokio::{sync::oneshot, task::JoinHandle, time::Instant};

use crate::{
    proto::{ingest_client::IngestClient, Hit, RecordHitsRequest},
    AuthChannel, ClientError,
};

/// How a [`Recorder`] batches.
#[derive(Debug, Clone)]
pub struct RecorderOptions {
    /// Hits per batch (at most 10,000, the server's limit).
    pub max_batch: usize,
    /// Longest time a hit waits before its batch is sent.
    pub max_delay: Duration,
    /// Hits queued in the recorder before `record` waits.
    pub queue: usize,
    /// Batches sent but not yet acknowledged before sending waits.
    pub in_flight: usize,
}

impl Default for RecorderOptions {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_delay: Duration::from_millis(50),
            queue: 10_000,
            in_flight: 8,
        }
    }
}

/// What a closed recorder delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecorderSummary {
    /// Hits acknowledged by the server.
    pub accepted: u64,
    /// Batches acknowledged by the server.
    pub batches: u64,
}

enum Command {
    Hit(Hit),
    Flush(oneshot::Sender<()>),
}

/// Records hits in batches over one stream. Cheap to share by reference across tasks.
#[derive(Debug)]
pub struct Recorder {
    commands: async_channel::Sender<Command>,
    task: JoinHandle<Result<RecorderSummary, ClientError>>,
}

impl Recorder {
    pub(crate) async fn start(
        mut ingest: IngestClient<AuthChannel>,
        options: RecorderOptions,
    ) -> Result<Self, ClientError> {
        let (commands, commands_rx) = async_channel::bounded(options.queue.max(1));
        let (requests, requests_rx) = async_channel::bounded(options.in_flight.max(1));
        let responses = ingest.stream_hits(requests_rx).await?.into_inner();
        let task = tokio::spawn(run(commands_rx, requests, responses, options));
        Ok(Self { commands, task })
    }

    /// Queues `count` hits of `key` now; waits while the queue is full.
    ///
    /// # Errors
    /// [`ClientError::RecorderStopped`] when the stream failed; [`Recorder::close`] tells why.
    pub async fn record(&self, key: &str, count: u64) -> Result<(), ClientError> {
        self.record_hit(Hit {
            key: key.to_owned(),
            timestamp_ms: 0,
            count,
        })
        .await
    }

    /// Queues one hit as given.
    ///
    /// # Errors
    /// As [`Recorder::record`].
    pub async fn record_hit(&self, hit: Hit) -> Result<(), ClientError> {
        self.commands.send(Command::Hit(hit)).await.map_err(|_| {
            ClientError::RecorderStopped("stream closed; call close() for the cause".into())
        })
    }

    /// Sends what is queued and waits until every batch sent so far is acknowledged.
    ///
    /// # Errors
    /// As [`Recorder::record`].
    pub async fn flush(&self) -> Result<(), ClientError> {
        let (done, wait) = oneshot::channel();
        let stopped =
            || ClientError::RecorderStopped("stream closed; call close() for the cause".into());
        self.commands
            .send(Command::Flush(done))
            .await
            .map_err(|_| stopped())?;
        wait.await.map_err(|_| stopped())
    }

    /// Sends what is queued, waits for every ack and ends the stream.
    ///
    /// # Errors
    /// The status that broke the stream, if any.
    pub async fn close(self) -> Result<RecorderSummary, ClientError> {
        self.commands.close();
        self.task
            .await
            .map_err(|e| ClientError::RecorderStopped(e.to_string()))?
    }
}

async fn run(
    commands: async_channel::Receiver<Command>,
    requests: async_channel::Sender<RecordHitsRequest>,
    mut responses: tonic::Streaming<crate::proto::RecordHitsResponse>,
    options: RecorderOptions,
) -> Result<RecorderSummary, ClientError> {
    let max_batch = options.max_batch.clamp(1, 10_000);
    let mut batch: Vec<Hit> = Vec::with_capacity(max_batch);
    let mut deadline: Option<Instant> = None;
    let mut sent = 0u64;
    let mut summary = RecorderSummary {
        accepted: 0,
        batches: 0,
    };
    let mut flushes: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
    let mut open = true;
    let stopped = |why: &str| ClientError::RecorderStopped(why.to_owned());

    loop {
        let send_now = batch.len() >= max_batch
            || (!batch.is_empty() && (!open || deadline.is_some_and(|d| d <= Instant::now())));
        if send_now {
            let hits = std::mem::replace(&mut batch, Vec::with_capacity(max_batch));
            deadline = None;
            // Waits while `in_flight` batches are unacknowledged, reading acks meanwhile.
            let request = RecordHitsRequest {
                hits,
                batch_id: String::new(),
            };
            let mut send = std::pin::pin!(requests.send(request));
            loop {
                tokio::select! {
                    result = &mut send => {
                        result.map_err(|_| stopped("request stream closed"))?;
                        break;
                    }
                    ack = responses.message() => {
                        let ack = ack?.ok_or_else(|| stopped("server ended the stream"))?;
                        summary.accepted += ack.accepted;
                        summary.batches += 1;
                    }
                }
            }
            sent += 1;
            continue;
        }
        let mut i = 0;
        while i < flushes.len() {
            if flushes[i].0 <= summary.batches {
                let (_, done) = flushes.swap_remove(i);
                let _ = done.send(());
            } else {
                i += 1;
            }
        }
        if !open && batch.is_empty() {
            if summary.batches >= sent {
                break;
            }
            let ack = responses
                .message()
                .await?
                .ok_or_else(|| stopped("server ended the stream"))?;
            summary.accepted += ack.accepted;
            summary.batches += 1;
            continue;
        }
        let sleep_until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            command = commands.recv(), if open => match command {
                Ok(Command::Hit(hit)) => {
                    if batch.is_empty() {
                        deadline = Some(Instant::now() + options.max_delay);
                    }
                    batch.push(hit);
                }
                Ok(Command::Flush(done)) => {
                    // Send the partial batch now, then wait for every ack up to it.
                    deadline = Some(Instant::now());
                    let target = sent + u64::from(!batch.is_empty());
                    flushes.push((target, done));
                }
                Err(_) => open = false,
            },
            ack = responses.message(), if summary.batches < sent => {
                let ack = ack?.ok_or_else(|| stopped("server ended the stream"))?;
                summary.accepted += ack.accepted;
                summary.batches += 1;
            }
            _ = tokio::time::sleep_until(sleep_until) => {}
        }
    }
    drop(requests);
    // Drain the end of the stream so that the server's status, if any, is seen.
    while let Some(ack) = responses.message().await? {
        summary.accepted += ack.accepted;
        summary.batches += 1;
    }
    Ok(summary)
}
