//! The tower stack around every call from ingest or query to one aggregator shard.
//!
//! Composed here and nowhere else, outermost first:
//!
//! 1. **concurrency limit**: at most `concurrency` calls in flight per shard, so a slow shard
//!    makes callers wait (and, upstream, fills the bounded channels) instead of piling up RPCs;
//! 2. **retry with a budget**: timeouts and `UNAVAILABLE` are retried a few times with a short
//!    backoff, but only while retries stay under a percentage of recent successes
//!    (`TpsBudget`), so a struggling shard is not hammered by retry storms. An open circuit is
//!    never retried: the caller fails fast;
//! 3. **circuit breaker** (`tower-resilience-circuitbreaker`): after `breaker_failures`
//!    consecutive transient failures the breaker opens and calls fail at once with
//!    [`StackError::CircuitOpen`]; after `breaker_cooldown` one probe call is let through
//!    (half-open) and its outcome closes or re-opens the breaker. Every transition is logged and
//!    published as `hitcounter_<service>_breaker_state{shard}` (0 closed, 1 half-open, 2 open);
//! 4. **timeout**: the deadline of one attempt, so a hung shard counts as a failure.
//!
//! The stack is generic over the request type so that query's unary reads and ingest's
//! stream-backed apply calls share it.

use std::{sync::Arc, time::Duration};

use tonic::Status;
use tower::{
    limit::ConcurrencyLimitLayer,
    retry::{
        budget::{Budget, TpsBudget},
        Policy, RetryLayer,
    },
    timeout::{error::Elapsed, TimeoutLayer},
    util::BoxCloneSyncService,
    BoxError, Service, ServiceBuilder, ServiceExt,
};
use tower_resilience_circuitbreaker::{
    CircuitBreakerError, CircuitBreakerLayer, CircuitState, FailureClassifier,
};

use crate::{error::is_transient_code, StackError};

/// A call path to one shard with the whole stack applied; cheap to clone, one clone per call.
pub type ClientStack<Req, Res> = BoxCloneSyncService<Req, Res, StackError>;

/// Settings of the stack (see [`crate::ClientArgs`] for their meaning and defaults).
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Deadline of one attempt.
    pub timeout: Duration,
    /// Most calls in flight per shard.
    pub concurrency: usize,
    /// Retries per call, budget permitting.
    pub retry_attempts: u32,
    /// Retries as a percentage of recent successes.
    pub retry_budget_percent: f32,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: usize,
    /// Time an open breaker waits before a half-open probe.
    pub breaker_cooldown: Duration,
}

/// Reads the state of one shard's circuit breaker.
#[derive(Clone)]
pub struct BreakerHandle {
    inner: tower_resilience_circuitbreaker::CircuitBreakerHandle<Classifier>,
}

impl std::fmt::Debug for BreakerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("open", &self.is_open())
            .finish()
    }
}

impl BreakerHandle {
    /// True while the breaker is open (calls fail at once).
    pub fn is_open(&self) -> bool {
        self.inner.is_open()
    }

    /// The state as the metric encodes it: 0 closed, 1 half-open, 2 open.
    pub fn state_code(&self) -> u8 {
        state_code(self.inner.state())
    }
}

/// Counts transient failures only (see [`is_transient_box`]): a bad request (INVALID_ARGUMENT
/// and the like) says nothing about the aggregator's health.
#[derive(Debug, Clone, Copy)]
struct Classifier;

impl<Res> FailureClassifier<Res, BoxError> for Classifier {
    fn classify(&self, result: &Result<Res, BoxError>) -> bool {
        match result {
            Ok(_) => false,
            Err(error) => is_transient_box(error),
        }
    }
}

fn state_code(state: CircuitState) -> u8 {
    match state {
        CircuitState::Closed => 0,
        CircuitState::HalfOpen => 1,
        CircuitState::Open => 2,
    }
}

/// Wraps `inner` (one shard's raw client) in the stack.
///
/// `service` and `shard` label the breaker's metric and logs (e.g. `"query"`, `0`).
///
/// # Errors
/// [`StackError::Other`] when the breaker settings are invalid.
pub fn build<S, Req, Res>(
    service: &'static str,
    shard: usize,
    config: &StackConfig,
    inner: S,
) -> Result<(ClientStack<Req, Res>, BreakerHandle), StackError>
where
    S: Service<Req, Response = Res, Error = Status> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    Req: Clone + Send + Sync + 'static,
    Res: Send + 'static,
{
    let gauge = metrics::gauge!(
        format!("hitcounter_{service}_breaker_state"),
        "shard" => shard.to_string()
    );
    gauge.set(0.0);
    let (breaker, handle) = CircuitBreakerLayer::builder()
        .name(format!("{service}->aggregator[{shard}]"))
        .consecutive_failures(config.breaker_failures)
        .wait_duration_in_open(config.breaker_cooldown)
        .permitted_calls_in_half_open(1)
        .failure_classifier_type(Classifier)
        .on_state_transition(move |from, to| {
            gauge.set(f64::from(state_code(to)));
            match to {
                CircuitState::Open => tracing::warn!(
                    service,
                    shard,
                    ?from,
                    "aggregator circuit breaker opened: failing calls fast"
                ),
                CircuitState::HalfOpen => {
                    tracing::info!(
                        service,
                        shard,
                        "aggregator circuit breaker half-open: probing"
                    )
                }
                CircuitState::Closed => {
                    tracing::info!(
                        service,
                        shard,
                        "aggregator circuit breaker closed: recovered"
                    )
                }
            }
        })
        .build_with_handle()
        .map_err(|e| StackError::Other(e.to_string()))?;

    let policy = RetryPolicy {
        attempts_left: config.retry_attempts,
        budget: Arc::new(TpsBudget::new(
            Duration::from_secs(10),
            10,
            config.retry_budget_percent / 100.0,
        )),
        backoff: Duration::from_millis(25),
    };
    let timeout = config.timeout;

    let stack = ServiceBuilder::new()
        // Outermost: turn the layered error types into our one error enum.
        .map_err(move |error: CircuitBreakerError<BoxError>| classify(error, timeout))
        // Bound in-flight calls per shard: callers wait here, which is backpressure.
        .layer(ConcurrencyLimitLayer::new(config.concurrency))
        // Retry transient failures, within the budget; never retry an open circuit.
        .layer(RetryLayer::new(policy))
        // Fail fast while the shard keeps failing.
        .layer(breaker)
        // Each attempt has its own deadline, which the breaker counts as a failure.
        .layer(TimeoutLayer::new(timeout))
        .service(inner.map_err(BoxError::from));
    Ok((
        BoxCloneSyncService::new(stack),
        BreakerHandle { inner: handle },
    ))
}

fn is_transient_box(error: &BoxError) -> bool {
    if error.is::<Elapsed>() {
        return true;
    }
    match error.downcast_ref::<Status>() {
        Some(status) => is_transient_code(status.code()),
        // Transport errors surface as non-Status errors: count them.
        None => true,
    }
}

fn classify(error: CircuitBreakerError<BoxError>, timeout: Duration) -> StackError {
    match error {
        CircuitBreakerError::OpenCircuit => StackError::CircuitOpen,
        CircuitBreakerError::Inner(error) => {
            if error.is::<Elapsed>() {
                return StackError::Timeout(timeout);
            }
            match error.downcast::<Status>() {
                Ok(status) => StackError::Status(*status),
                Err(other) => StackError::Other(other.to_string()),
            }
        }
    }
}

/// Retries transient failures, a bounded number of times and within a shared budget.
#[derive(Clone)]
struct RetryPolicy {
    attempts_left: u32,
    budget: Arc<TpsBudget>,
    backoff: Duration,
}

impl<Req: Clone, Res> Policy<Req, Res, CircuitBreakerError<BoxError>> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Req,
        result: &mut Result<Res, CircuitBreakerError<BoxError>>,
    ) -> Option<Self::Future> {
        match result {
            Ok(_) => {
                self.budget.deposit();
                None
            }
            // An open circuit means "do not call": retrying would defeat it.
            Err(CircuitBreakerError::OpenCircuit) => None,
            Err(CircuitBreakerError::Inner(error)) => {
                if self.attempts_left == 0 || !is_transient_box(error) || !self.budget.withdraw() {
                    return None;
                }
                self.attempts_left -= 1;
                Some(tokio::time::sleep(self.backoff))
            }
        }
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        Some(request.clone())
    }
}

#[cfg(test)]
mod tests;
