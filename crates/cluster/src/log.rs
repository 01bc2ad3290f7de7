//! The cluster's replicated log of deltas: one JetStream stream.
//!
//! **Subjects.** `<stream>.p.<partition>` carries a flush's deltas of one partition, encoded as
//! an aggregator `ApplyRequest` (producer id, seq, deltas): the same batch a forwarder sends on
//! one machine. `<stream>.ids.<hash of batch id>` carries one marker per batch id (the id, the
//! hits it accepted, and which producer's flush stored it).
//!
//! **Stored whole or not at all.** A flush is published as one atomic batch (ADR-50, NATS ≥
//! 2.12): its partition messages and its markers commit together or not at all, so a request
//! whose hits fall into many partitions is never half stored.
//!
//! **Batch ids, cluster-wide.** Each marker is published with `Nats-Expected-Last-Subject-
//! Sequence: 0`, i.e. "create if absent": if any ingest instance stored the same batch id
//! before, the whole flush is refused ([`PublishError::Conflict`]), the publisher finds the
//! existing marker ([`HitStream::marker`]) and answers that request as a duplicate with the
//! first call's `accepted`. A marker carries a per-message TTL (`Nats-TTL`) of the dedup
//! horizon, so the ids the servers index stay bounded. A JetStream key-value bucket would be
//! the obvious home for the ids, but it is another stream, and no atomic batch spans two
//! streams: the id could then be stored without the hits, or the hits without the id.
//!
//! **Duplicates in the stream.** A publish whose outcome is unknown (a timeout, a leader
//! change) is retried with the same content; if the first attempt did commit, the stream holds
//! the flush twice. Aggregators skip the second by its (producer, seq), exactly as they skip a
//! forwarder's resend; and they apply each message once by its stream position, whatever
//! JetStream redelivers.
//!
//! The local write-ahead log (`hitcounter-wal`) is the other implementation of the same role;
//! ingest picks one at start-up (`hitcounter_ingest`'s `DurableLog`).

use std::{collections::HashMap, time::Duration};

use async_nats::{
    jetstream::{
        self,
        consumer::{pull, DeliverPolicy},
        message::{OutboundMessage, PublishMessage},
        stream::{self, DiscardPolicy, LastRawMessageErrorKind, StorageType},
        ErrorCode,
    },
    HeaderMap, ServerAddr,
};
use futures::{Stream, StreamExt};
use hitcounter_proto::{aggregator::v1::ApplyRequest, ingest::v1::LoggedBatchId};
use jetstream_extra::batch_publish::{BatchPublishErrorKind, BatchPublishExt};
use prost::Message as _;
use sha2::{Digest, Sha256};

use crate::{args::ClusterArgs, error::ClusterError};

/// The stream metadata entry that fixes the partition count.
const PARTITIONS_METADATA: &str = "hitcounter.partitions";
/// The marker header naming the producer whose flush stored a batch id.
const PRODUCER_HEADER: &str = "Hitcounter-Producer";
/// The marker header naming that flush.
const FLUSH_HEADER: &str = "Hitcounter-Flush";
/// How far in the future an event time may be, for services that do not take ingest's
/// `--max-future-skew-seconds` (the aggregators and query, when they create the stream).
pub const ASSUMED_FUTURE_SKEW_SECONDS: u32 = 600;

/// How long the stream must keep a delta: as long as an aggregator rebuilding from the log
/// needs it, i.e. the retention, plus how far in the future an event time may be, plus ten
/// minutes for clocks.
pub fn max_age(retention_seconds: u32, future_skew_seconds: u32) -> Duration {
    Duration::from_secs(u64::from(retention_seconds) + u64::from(future_skew_seconds) + 600)
}

/// How long a starting service waits for the NATS servers and the stream.
const START_WAIT: Duration = Duration::from_secs(60);
/// The most messages in one atomic batch (a server limit).
pub const MAX_BATCH_MESSAGES: usize = 1000;

/// The stream of deltas, opened and checked.
#[derive(Clone)]
pub struct HitStream {
    js: jetstream::Context,
    stream: stream::Stream,
    name: String,
    partitions: u32,
    timeout: Duration,
}

/// A batch id's marker: who stored it and what it accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The client's batch id.
    pub batch_id: String,
    /// Hits the first call accepted.
    pub accepted: u64,
    /// The producer (ingest publisher) whose flush stored it.
    pub producer: u64,
    /// That flush's number.
    pub flush: u64,
}

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A marker's subject is taken: some batch id of the flush was stored before. Nothing of
    /// the flush was stored.
    #[error("a batch id of this flush is already stored")]
    Conflict,
    /// The stream is at `--nats-max-bytes`. Nothing of the flush was stored.
    #[error("the cluster's log is full (--nats-max-bytes): aggregators are not keeping up or the limit is too low")]
    Full,
    /// The servers refused the flush for a reason retrying cannot fix (a stream configured
    /// without atomic batches, a header the servers do not take). Nothing was stored.
    #[error("the cluster's log refused the flush: {0}")]
    Refused(String),
    /// The outcome is unknown (timeout, no responders, connection lost): the flush may or may
    /// not be stored.
    #[error("the cluster's log did not answer: {0}")]
    Unknown(String),
}

/// One partition message read back from the stream.
#[derive(Debug, Clone)]
pub struct LoggedBatch {
    /// Its stream sequence: its position, by which an aggregator applies it once.
    pub sequence: u64,
    /// Its partition.
    pub partition: u32,
    /// Messages after it that the consumer has not delivered yet (0: caught up).
    pub pending: u64,
    /// The producer's batch: producer id, seq, deltas.
    pub batch: ApplyRequest,
}

impl HitStream {
    /// Connects to the NATS servers and opens the stream, creating it (with `max_age`) if it
    /// does not exist yet.
    ///
    /// # Errors
    /// Fails when the servers cannot be reached, the stream cannot be created, or it exists
    /// with a different partition count.
    pub async fn open(args: &ClusterArgs, max_age: Duration) -> Result<Self, ClusterError> {
        Self::open_retrying(args, Some(max_age)).await
    }

    /// Connects to the NATS servers and opens the stream, which must exist (for tools that
    /// look at a cluster, such as `hitctl cluster status`: they must never create it).
    ///
    /// # Errors
    /// Fails when the servers cannot be reached or the stream does not exist.
    pub async fn open_existing(args: &ClusterArgs) -> Result<Self, ClusterError> {
        let tls = tls_config(args)?;
        Self::open_once(args, None, tls.as_ref()).await
    }

    async fn open_retrying(
        args: &ClusterArgs,
        max_age: Option<Duration>,
    ) -> Result<Self, ClusterError> {
        // Services and NATS servers start in any order (compose, Kubernetes, by hand), and a
        // fresh JetStream cluster needs a few seconds to elect its meta leader: keep trying
        // for a while, saying so, before giving up with the last error. The TLS files are
        // read once: a bad one stops the start-up at once, naming its flag.
        let tls = tls_config(args)?;
        let deadline = tokio::time::Instant::now() + START_WAIT;
        loop {
            match Self::open_once(args, max_age, tls.as_ref()).await {
                Ok(stream) => return Ok(stream),
                Err(
                    error @ (ClusterError::PartitionMismatch { .. }
                    | ClusterError::Config(_)
                    | ClusterError::Tls { .. }),
                ) => return Err(error),
                Err(error) if tokio::time::Instant::now() < deadline => {
                    tracing::warn!(%error, "the cluster's log is not ready; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn open_once(
        args: &ClusterArgs,
        max_age: Option<Duration>,
        tls: Option<&rustls::ClientConfig>,
    ) -> Result<Self, ClusterError> {
        let urls = args.nats.join(",");
        let addrs = args
            .nats
            .iter()
            .map(|url| url.parse::<ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClusterError::Config(format!("--nats {urls}: {e}")))?;
        let mut options = async_nats::ConnectOptions::new()
            .name("hitcounter")
            .connection_timeout(args.timeout())
            // A server cut off the network is noticed by missed pings (two in a row), and the
            // client moves to another server: every 5 s, not the default minute, so a cut
            // costs seconds of publishes, not minutes.
            .ping_interval(Duration::from_secs(5));
        if let Some(tls) = tls {
            // TLS to every server, plain text refused, with only the CA of --nats-ca-cert
            // trusted (not the system's roots).
            options = options.require_tls(true).tls_client_config(tls.clone());
        }
        let client =
            options
                .connect(addrs)
                .await
                .map_err(|source| match tls_failure(args, &source) {
                    Some(reason) => ClusterError::Tls {
                        urls: urls.clone(),
                        reason,
                        source,
                    },
                    None => ClusterError::Connect {
                        urls: urls.clone(),
                        source,
                    },
                })?;
        let js = jetstream::ContextBuilder::new()
            .timeout(args.timeout())
            .build(client);
        let name = args.nats_stream.clone();
        let stream_error = |message: String| ClusterError::Stream {
            stream: name.clone(),
            message,
        };
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.p.*"), format!("{name}.ids.*")],
            num_replicas: args.nats_replicas.max(1),
            storage: StorageType::File,
            max_age: max_age.unwrap_or_default(),
            max_bytes: args.nats_max_bytes,
            discard: DiscardPolicy::New,
            allow_atomic_publish: true,
            allow_message_ttl: true,
            metadata: HashMap::from([(
                PARTITIONS_METADATA.to_owned(),
                args.partitions
                    .unwrap_or(crate::args::DEFAULT_PARTITIONS)
                    .to_string(),
            )]),
            ..Default::default()
        };
        // Every service may be the first to start: create-or-get, and if two create at once
        // the loser finds the winner's stream.
        let mut stream = match js.get_stream(&name).await {
            Ok(stream) => stream,
            Err(missing) if max_age.is_none() => {
                return Err(stream_error(format!(
                    "cannot open it ({missing}): is --nats-stream right, and has a hitcounter service started?"
                )))
            }
            Err(_) => match js.create_stream(config).await {
                Ok(stream) => {
                    tracing::info!(stream = %name, partitions = ?args.partitions, replicas = args.nats_replicas, max_age = ?max_age, "created the cluster's log");
                    stream
                }
                Err(created) => js
                    .get_stream(&name)
                    .await
                    .map_err(|_| {
                        let hint = if created.to_string().contains("insufficient") {
                            format!(
                                " (each of the {} NATS servers must be able to reserve \
                                 --nats-max-bytes {} on its disk: free space there or lower it)",
                                args.nats_replicas, args.nats_max_bytes
                            )
                        } else {
                            String::new()
                        };
                        stream_error(format!("cannot create it: {created}{hint}"))
                    })?,
            },
        };
        let info = stream
            .info()
            .await
            .map_err(|e| stream_error(format!("cannot read its configuration: {e}")))?;
        let existing = info
            .config
            .metadata
            .get(PARTITIONS_METADATA)
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or_else(|| {
                stream_error(format!(
                    "it exists but was not created by hitcounter (no {PARTITIONS_METADATA} metadata)"
                ))
            })?;
        if let Some(configured) = args.partitions.filter(|&p| p != existing) {
            return Err(ClusterError::PartitionMismatch {
                stream: name,
                existing,
                configured,
            });
        }
        if existing > crate::topology::MAX_PARTITIONS {
            return Err(stream_error(format!(
                "it has {existing} partitions; hitcounter handles at most {}",
                crate::topology::MAX_PARTITIONS
            )));
        }
        let max_age = max_age.unwrap_or(info.config.max_age);
        if info.config.max_age != Duration::ZERO && info.config.max_age < max_age {
            tracing::warn!(stream = %name, stream_max_age = ?info.config.max_age, needed = ?max_age, "the stream keeps deltas for less than the retention needs: an aggregator rebuilding from the log would miss the oldest");
        }
        Ok(Self {
            js,
            stream,
            name,
            partitions: existing,
            timeout: args.timeout(),
        })
    }

    /// The partition count of the stream.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The JetStream context of the stream's connection (the membership bucket shares it).
    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The message carrying `batch` for `partition`.
    pub fn partition_message(&self, partition: u32, batch: &ApplyRequest) -> OutboundMessage {
        PublishMessage::build()
            .payload(batch.encode_to_vec().into())
            .outbound_message(format!("{}.p.{partition}", self.name))
    }

    /// The marker of `marker.batch_id`, published only if no marker of that id exists, kept
    /// for `ttl`.
    pub fn marker_message(&self, marker: &Marker, ttl: Duration) -> OutboundMessage {
        let payload = LoggedBatchId {
            batch_id: marker.batch_id.clone(),
            accepted: marker.accepted,
        };
        let mut headers = HeaderMap::new();
        headers.insert(PRODUCER_HEADER, marker.producer.to_string().as_str());
        headers.insert(FLUSH_HEADER, marker.flush.to_string().as_str());
        PublishMessage::build()
            .headers(headers)
            .expected_last_subject_sequence(0)
            .ttl(ttl.max(Duration::from_secs(1)))
            .payload(payload.encode_to_vec().into())
            .outbound_message(self.marker_subject(&marker.batch_id))
    }

    fn marker_subject(&self, batch_id: &str) -> String {
        // Batch ids are arbitrary strings; subjects take only some characters. 128 bits of
        // SHA-256 keep two different ids from sharing a subject.
        let digest = Sha256::digest(batch_id.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}.ids.{hex}", self.name)
    }

    /// Publishes `messages` as one atomic batch; returns the stream sequence of the last.
    ///
    /// # Errors
    /// See [`PublishError`]: whether anything was stored is known except for `Unknown`.
    pub async fn publish(&self, messages: &[OutboundMessage]) -> Result<u64, PublishError> {
        // Each attempt sends its own copies (payloads are shared `Bytes`, so this is cheap).
        let messages: Vec<OutboundMessage> = messages
            .iter()
            .map(|m| OutboundMessage {
                subject: m.subject.clone(),
                payload: m.payload.clone(),
                headers: m.headers.clone(),
            })
            .collect();
        let published = self
            .js
            .batch_publish_all()
            .ack_first(false)
            .timeout(self.timeout)
            .publish(futures::stream::iter(messages))
            .await;
        match published {
            Ok(ack) => Ok(ack.sequence),
            Err(error) => Err(classify(error)),
        }
    }

    /// The marker of `batch_id`, if one is stored.
    ///
    /// # Errors
    /// Fails when the stream cannot be read.
    pub async fn marker(&self, batch_id: &str) -> Result<Option<Marker>, ClusterError> {
        let subject = self.marker_subject(batch_id);
        let message = match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {
                return Ok(None)
            }
            Err(error) => {
                return Err(ClusterError::Stream {
                    stream: self.name.clone(),
                    message: format!("cannot read the marker of batch id {batch_id:?}: {error}"),
                })
            }
        };
        let stored = LoggedBatchId::decode(message.payload.as_ref()).map_err(|source| {
            ClusterError::Decode {
                sequence: message.sequence,
                source,
            }
        })?;
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok(Some(Marker {
            batch_id: stored.batch_id,
            accepted: stored.accepted,
            producer: header(PRODUCER_HEADER),
            flush: header(FLUSH_HEADER),
        }))
    }

    /// The sequence of the newest message in the stream (0 when empty).
    ///
    /// # Errors
    /// Fails when the stream cannot be read.
    pub async fn last_sequence(&self) -> Result<u64, ClusterError> {
        let mut stream = self.stream.clone();
        let info = stream.info().await.map_err(|e| ClusterError::Stream {
            stream: self.name.clone(),
            message: format!("cannot read its state: {e}"),
        })?;
        Ok(info.state.last_sequence)
    }

    /// Reads `partitions` in stream order from sequence `from` (1 or less: from the start).
    /// An ordered consumer: the client recreates it after a server or leader change, so the
    /// reader sees every message once and in order, or an error.
    ///
    /// Also returns how many messages the reader had to deliver when it was created (0: the
    /// reader starts caught up).
    ///
    /// # Errors
    /// Fails when the consumer cannot be created; the returned stream yields an error when a
    /// message cannot be read or decoded (the caller reopens from its position).
    pub async fn read(
        &self,
        partitions: &[u32],
        from: u64,
    ) -> Result<
        (
            u64,
            impl Stream<Item = Result<LoggedBatch, ClusterError>> + Send,
        ),
        ClusterError,
    > {
        let deliver_policy = if from <= 1 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: from,
            }
        };
        let filter_subjects = partitions
            .iter()
            .map(|p| format!("{}.p.{p}", self.name))
            .collect();
        let stream_error = |message: String| ClusterError::Stream {
            stream: self.name.clone(),
            message,
        };
        let consumer = self
            .stream
            .create_consumer(pull::OrderedConfig {
                filter_subjects,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| stream_error(format!("cannot create a consumer: {e}")))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| stream_error(format!("cannot read: {e}")))?;
        let name = self.name.clone();
        let prefix = format!("{name}.p.");
        Ok((
            pending,
            messages.map(move |message| {
                let stream_error = |message: String| ClusterError::Stream {
                    stream: name.clone(),
                    message,
                };
                let message = message.map_err(|e| stream_error(format!("read failed: {e}")))?;
                let info = message
                    .info()
                    .map_err(|e| stream_error(format!("a message without its position: {e}")))?;
                let (sequence, pending) = (info.stream_sequence, info.pending);
                let partition = message
                    .subject
                    .strip_prefix(prefix.as_str())
                    .and_then(|p| p.parse::<u32>().ok())
                    .ok_or_else(|| {
                        stream_error(format!(
                            "unexpected subject {} at {sequence}",
                            message.subject
                        ))
                    })?;
                let batch = ApplyRequest::decode(message.payload.as_ref())
                    .map_err(|source| ClusterError::Decode { sequence, source })?;
                Ok(LoggedBatch {
                    sequence,
                    partition,
                    pending,
                    batch,
                })
            }),
        ))
    }
}

/// The TLS configuration of the connections to NATS (`--nats-ca-cert`, and the client
/// certificate of `--nats-tls-cert`/`--nats-tls-key`); `None` without `--nats-ca-cert`.
fn tls_config(args: &ClusterArgs) -> Result<Option<rustls::ClientConfig>, ClusterError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

    let Some(ca) = &args.nats_ca_cert else {
        return match args.nats_tls_cert {
            Some(_) => Err(ClusterError::Config(
                "--nats-tls-cert needs --nats-ca-cert (the CA of the NATS servers)".into(),
            )),
            None => Ok(None),
        };
    };
    let bad_file = |flag: &str, path: &std::path::Path, what: String| {
        ClusterError::Config(format!("{flag} {}: {what}", path.display()))
    };
    let certificates = |flag: &str, path: &std::path::Path| {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad_file(flag, path, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad_file(flag, path, "holds no PEM certificate".into()));
        }
        Ok(certs)
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates("--nats-ca-cert", ca)? {
        roots
            .add(cert)
            .map_err(|e| bad_file("--nats-ca-cert", ca, e.to_string()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClusterError::Config(format!("TLS to NATS: {e}")))?
    .with_root_certificates(roots);
    let config = match (&args.nats_tls_cert, &args.nats_tls_key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = certificates("--nats-tls-cert", cert_path)?;
            let key = PrivateKeyDer::from_pem_file(key_path)
                .map_err(|e| bad_file("--nats-tls-key", key_path, e.to_string()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                bad_file(
                    "--nats-tls-key",
                    key_path,
                    format!("does not fit --nats-tls-cert {}: {e}", cert_path.display()),
                )
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(ClusterError::Config(
                "--nats-tls-cert and --nats-tls-key go together".into(),
            ))
        }
    };
    Ok(Some(config))
}

/// What went wrong, naming the flag to look at, when a connection to NATS failed in its TLS:
/// a certificate refused or not trusted is not fixed by waiting, unlike a server still starting.
/// `None` for every other failure.
fn tls_failure(args: &ClusterArgs, error: &async_nats::ConnectError) -> Option<String> {
    if error.kind() == async_nats::ConnectErrorKind::Tls {
        return Some(format!(
            "{error}: check --nats-ca-cert, --nats-tls-cert and --nats-tls-key"
        ));
    }
    // The handshake's errors come as an io::Error wrapping rustls' own, somewhere in the chain.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let tls = loop {
        let current = cause?;
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            break tls;
        }
        if let Some(tls) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            break tls;
        }
        cause = current.source();
    };
    Some(match tls {
        rustls::Error::AlertReceived(alert) if args.nats_tls_cert.is_none() => format!(
            "the servers ended the handshake ({alert:?}): they require a client certificate; \
             give --nats-tls-cert and --nats-tls-key"
        ),
        rustls::Error::AlertReceived(alert) => format!(
            "the servers refused this service's client certificate ({alert:?}): is \
             --nats-tls-cert signed by the CA of their tls {{ ca_file }}, and still valid?"
        ),
        rustls::Error::InvalidCertificate(why) if args.nats_ca_cert.is_none() => format!(
            "the servers require TLS and their certificate is not trusted ({why:?}): give \
             --nats-ca-cert, the CA that signs their certificates"
        ),
        rustls::Error::InvalidCertificate(why) => format!(
            "the servers' certificate is not accepted ({why:?}): is it signed by \
             --nats-ca-cert, valid now, and for the host name or address given in --nats?"
        ),
        other => format!(
            "{other}: do the servers speak TLS (a tls block in their configuration), and is \
             --nats-ca-cert their CA?"
        ),
    })
}

/// Sorts a failed batch publish into what the publisher can do about it.
fn classify(error: jetstream_extra::batch_publish::BatchPublishError) -> PublishError {
    use std::error::Error as _;
    let code = error
        .source()
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .map(|api| api.error_code());
    match (error.kind(), code) {
        (_, Some(ErrorCode::STREAM_WRONG_LAST_SEQUENCE)) => PublishError::Conflict,
        (_, Some(ErrorCode::STORAGE_RESOURCES_EXCEEDED | ErrorCode::STREAM_STORE_FAILED)) => {
            PublishError::Full
        }
        (
            BatchPublishErrorKind::BatchPublishNotEnabled
            | BatchPublishErrorKind::BatchPublishUnsupportedHeader
            | BatchPublishErrorKind::MaxMessagesExceeded
            | BatchPublishErrorKind::BatchPublishMirror
            | BatchPublishErrorKind::EmptyBatch,
            _,
        ) => PublishError::Refused(error.to_string()),
        _ => PublishError::Unknown(error.to_string()),
    }
}
