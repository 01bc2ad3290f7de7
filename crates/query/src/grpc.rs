//! The gRPC edge of query: the public `hitcounter.v1.Query` service.
//!
//! Each handler resolves the request's defaults (window 0 → 300 s, `at_ms` 0 → now, step 0 →
//! 1 s, limit 0 → 10), checks it against the contract, converts milliseconds to the seconds the
//! aggregators index by, checks the caller's role, key scope and quota (the principal the
//! authentication layer attached; see `hitcounter_auth::Principal`), and asks the shards (see
//! `crate::shards`). TopKeys searches only the caller's key prefixes: without a prefix, all of
//! them (one search per prefix, merged); with one, it must lie within one of them.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt};
use hitcounter_auth::principal_of;
use hitcounter_proto::v1::{
    query_server::Query, GetHitsManyRequest, GetHitsManyResponse, GetHitsRequest, GetHitsResponse,
    GetSeriesRequest, GetSeriesResponse, KeyCount, SeriesPoint, TopKeysRequest, TopKeysResponse,
    WatchHitsRequest,
};
use hitcounter_telemetry::{rpc, CancellationToken};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{error::QueryError, shards::Shards};

/// Window used when a request says 0.
pub const DEFAULT_WINDOW_SECONDS: u32 = 300;
/// Most keys in one GetHitsMany.
pub const MAX_MANY_KEYS: usize = 1000;
/// Most points in one GetSeries.
pub const MAX_SERIES_POINTS: i64 = 10_000;
/// TopKeys limit used when a request says 0.
pub const DEFAULT_TOP_LIMIT: u32 = 10;
/// Largest TopKeys limit; larger ones are lowered to it.
pub const MAX_TOP_LIMIT: u32 = 1000;
/// WatchHits interval used when a request says 0, in milliseconds.
pub const DEFAULT_WATCH_INTERVAL_MS: u32 = 1000;
/// Shortest WatchHits interval; shorter ones are raised to it.
pub const MIN_WATCH_INTERVAL_MS: u32 = 100;
/// Longest key, in bytes (the same rule as ingest).
const MAX_KEY_BYTES: usize = 256;

/// Implements the public query API.
#[derive(Clone)]
pub(crate) struct QueryService {
    pub(crate) shards: Shards,
    pub(crate) retention_seconds: u32,
    pub(crate) watches: Arc<Semaphore>,
    pub(crate) max_watches: usize,
    pub(crate) watch_capacity: usize,
    pub(crate) shutdown: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<GetHitsResponse, Status>> + Send>>;

fn invalid(message: impl Into<String>) -> QueryError {
    QueryError::Invalid(message.into())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn check_key(key: &str) -> Result<(), QueryError> {
    if key.is_empty() {
        return Err(invalid("key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(invalid(format!(
            "key is {} bytes; the limit is {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

fn check_at(at_ms: i64) -> Result<i64, QueryError> {
    match at_ms {
        0 => Ok(now_ms()),
        a if a < 0 => Err(invalid(format!("at_ms {a} is negative"))),
        a => Ok(a),
    }
}

impl QueryService {
    fn window(&self, window_seconds: u32) -> Result<u32, QueryError> {
        let window = if window_seconds == 0 {
            DEFAULT_WINDOW_SECONDS
        } else {
            window_seconds
        };
        if window > self.retention_seconds {
            return Err(invalid(format!(
                "window_seconds {window} is longer than the retention of {} s",
                self.retention_seconds
            )));
        }
        Ok(window)
    }

    /// Rejects a window that reaches back before the retained history: its oldest seconds are
    /// already evicted, so the count would be silently partial instead of exact.
    fn check_retained(&self, window: u32, at_ms: i64) -> Result<(), QueryError> {
        let oldest_retained = now_ms().div_euclid(1000) - i64::from(self.retention_seconds);
        let end = at_ms.div_euclid(1000);
        if end - i64::from(window) < oldest_retained {
            return Err(invalid(format!(
                "the window of {window} s ending at at_ms {at_ms} reaches back {} s before the retained history (the last {} s): move at_ms later or shorten the window",
                oldest_retained - (end - i64::from(window)),
                self.retention_seconds
            )));
        }
        Ok(())
    }

    async fn get_hits_inner(
        &self,
        request: GetHitsRequest,
        principal: Option<&hitcounter_auth::Principal>,
    ) -> Result<GetHitsResponse, QueryError> {
        check_key(&request.key)?;
        let window = self.window(request.window_seconds)?;
        let at_ms = check_at(request.at_ms)?;
        self.check_retained(window, at_ms)?;
        // A watch's updates were admitted when it opened.
        if let Some(principal) = principal {
            principal.admit_read("key", [request.key.as_str()])?;
        }
        let counts = self
            .shards
            .count(
                std::slice::from_ref(&request.key),
                at_ms.div_euclid(1000),
                window,
            )
            .await?;
        Ok(GetHitsResponse {
            key: request.key,
            count: counts.first().copied().unwrap_or(0),
            window_seconds: window,
            at_ms,
        })
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn get_hits(
        &self,
        request: Request<GetHitsRequest>,
    ) -> Result<Response<GetHitsResponse>, Status> {
        rpc::observe("query", "GetHits", async {
            let principal = principal_of(&request)?;
            Ok(Response::new(
                self.get_hits_inner(request.into_inner(), Some(&principal))
                    .await?,
            ))
        })
        .await
    }

    async fn get_hits_many(
        &self,
        request: Request<GetHitsManyRequest>,
    ) -> Result<Response<GetHitsManyResponse>, Status> {
        rpc::observe("query", "GetHitsMany", async {
            let principal = principal_of(&request)?;
            let request = request.into_inner();
            if request.keys.is_empty() || request.keys.len() > MAX_MANY_KEYS {
                return Err(invalid(format!(
                    "GetHitsMany takes 1 to {MAX_MANY_KEYS} keys, got {}",
                    request.keys.len()
                ))
                .into());
            }
            for (i, key) in request.keys.iter().enumerate() {
                check_key(key).map_err(|e| invalid(format!("keys[{i}]: {e}")))?;
            }
            let window = self.window(request.window_seconds)?;
            let at_ms = check_at(request.at_ms)?;
            self.check_retained(window, at_ms)?;
            principal
                .admit_read("keys", request.keys.iter().map(String::as_str))
                .map_err(QueryError::from)?;
            let counts = self
                .shards
                .count(&request.keys, at_ms.div_euclid(1000), window)
                .await
                .map_err(QueryError::from)?;
            let results = request
                .keys
                .into_iter()
                .zip(counts)
                .map(|(key, count)| GetHitsResponse {
                    key,
                    count,
                    window_seconds: window,
                    at_ms,
                })
                .collect();
            Ok(Response::new(GetHitsManyResponse { results }))
        })
        .await
    }

    async fn get_series(
        &self,
        request: Request<GetSeriesRequest>,
    ) -> Result<Response<GetSeriesResponse>, Status> {
        rpc::observe("query", "GetSeries", async {
            let principal = principal_of(&request)?;
            let request = request.into_inner();
            check_key(&request.key)?;
            let step = request.step_seconds.max(1);
            let (from, to) = (request.from_ms, request.to_ms);
            if from < 0 {
                return Err(invalid(format!("from_ms {from} is negative")).into());
            }
            if to <= from {
                return Err(invalid(format!("to_ms {to} must be after from_ms {from}")).into());
            }
            let step_ms = i64::from(step) * 1000;
            let start_ms = from.div_euclid(step_ms) * step_ms;
            // Points start at start_ms, start_ms + step_ms, … while the start is before `to`.
            // (Written so it cannot overflow: 0 <= start_ms <= from < to.)
            let points = (to - start_ms - 1) / step_ms + 1;
            if points > MAX_SERIES_POINTS {
                return Err(invalid(format!(
                    "the range holds {points} points of {step} s; the limit is {MAX_SERIES_POINTS}: raise step_seconds or narrow the range"
                ))
                .into());
            }
            principal
                .admit_read("key", [request.key.as_str()])
                .map_err(QueryError::from)?;
            let counts = self
                .shards
                .series(request.key.clone(), start_ms / 1000, step, points as u32)
                .await
                .map_err(QueryError::from)?;
            let points = counts
                .into_iter()
                .enumerate()
                .map(|(i, count)| SeriesPoint {
                    start_ms: start_ms + i as i64 * step_ms,
                    count,
                })
                .collect();
            Ok(Response::new(GetSeriesResponse {
                key: request.key,
                step_seconds: step,
                points,
            }))
        })
        .await
    }

    async fn top_keys(
        &self,
        request: Request<TopKeysRequest>,
    ) -> Result<Response<TopKeysResponse>, Status> {
        rpc::observe("query", "TopKeys", async {
            let principal = principal_of(&request)?;
            let request = request.into_inner();
            let window = self.window(request.window_seconds)?;
            let at_ms = check_at(request.at_ms)?;
            self.check_retained(window, at_ms)?;
            let limit = match request.limit {
                0 => DEFAULT_TOP_LIMIT,
                l => l.min(MAX_TOP_LIMIT),
            };
            let prefixes = principal
                .admit_top(&request.prefix)
                .map_err(QueryError::from)?;
            let keys = self
                .shards
                .top(at_ms.div_euclid(1000), window, limit, &prefixes)
                .await
                .map_err(QueryError::from)?
                .into_iter()
                .map(|k| KeyCount {
                    key: k.key,
                    count: k.count,
                })
                .collect();
            Ok(Response::new(TopKeysResponse {
                keys,
                window_seconds: window,
                at_ms,
                approximate: false,
            }))
        })
        .await
    }

    type WatchHitsStream = WatchStream;

    async fn watch_hits(
        &self,
        request: Request<WatchHitsRequest>,
    ) -> Result<Response<Self::WatchHitsStream>, Status> {
        let started = std::time::Instant::now();
        let opened = (|| {
            let principal = principal_of(&request)?;
            let request = request.into_inner();
            check_key(&request.key)?;
            let window = self.window(request.window_seconds)?;
            let slot = principal.admit_watch(&request.key)?;
            let permit = Arc::clone(&self.watches)
                .try_acquire_owned()
                .map_err(|_| QueryError::TooManyWatches(self.max_watches))?;
            let interval = match request.interval_ms {
                0 => DEFAULT_WATCH_INTERVAL_MS,
                i => i.max(MIN_WATCH_INTERVAL_MS),
            };
            Ok::<_, Status>((request.key, window, interval, (permit, slot)))
        })();
        rpc::record("query", "WatchHits", &opened, started);
        let (key, window, interval, permit) = opened?;

        let (updates_tx, updates_rx) =
            hitcounter_pipeline::channel("query_watch_updates", self.watch_capacity);
        let service = self.clone();
        let open_watches = metrics::gauge!("hitcounter_query_open_watches");
        open_watches.increment(1.0);
        tokio::spawn(
            async move {
                let _permit = permit;
                let mut ticks = tokio::time::interval(Duration::from_millis(u64::from(interval)));
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                loop {
                    tokio::select! {
                        // The stream ends cleanly (status OK) when the server shuts down.
                        _ = service.shutdown.cancelled() => break,
                        _ = ticks.tick() => {}
                    }
                    let update = service
                        .get_hits_inner(
                            GetHitsRequest {
                                key: key.clone(),
                                window_seconds: window,
                                at_ms: 0,
                            },
                            None,
                        )
                        .await;
                    let update = match update {
                        Ok(update) => update,
                        // The watch lives until the client cancels: an aggregator outage skips
                        // updates (and is counted) rather than ending every open watch.
                        Err(QueryError::Aggregator(error)) => {
                            tracing::debug!(%error, "watch update skipped");
                            metrics::counter!("hitcounter_query_watch_skipped_updates_total", "reason" => "aggregator").increment(1);
                            continue;
                        }
                        Err(error) => {
                            let _ = updates_tx.try_send(Err(Status::from(error)));
                            break;
                        }
                    };
                    match updates_tx.try_send(Ok(update)) {
                        Ok(()) => {}
                        // A slow reader skips updates instead of queueing stale ones.
                        Err(hitcounter_pipeline::SendError::Full { .. }) => {
                            metrics::counter!("hitcounter_query_watch_skipped_updates_total", "reason" => "slow_reader").increment(1);
                        }
                        // The client went away.
                        Err(hitcounter_pipeline::SendError::Closed { .. }) => break,
                    }
                }
                open_watches.decrement(1.0);
            }
            .instrument(tracing::debug_span!("watch")),
        );
        Ok(Response::new(updates_rx.into_stream().boxed()))
    }
}
