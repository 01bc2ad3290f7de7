//! Tests of the client stack against a scripted inner service: the circuit breaker (fail fast,
//! one half-open probe, close or re-open on its outcome), retries (attempts, which errors, the
//! budget) and the concurrency limit.
//!
//! Tokio's clock is paused, so the per-attempt timeout and the retry backoff cost no real time and
//! "nothing happens for an hour" is an event (the runtime ran out of work), not a guess. The
//! breaker's cool-down is measured by the breaker crate with `std::time::Instant`, which the
//! paused clock does not move: the tests either use a cool-down that cannot pass during the test
//! (an hour) or wait one out for certain with `std::thread::sleep` (never shorter than asked).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::{mpsc, Semaphore};
use tonic::{Code, Status};
use tower::ServiceExt;

use super::{build, BreakerHandle, ClientStack, StackConfig};
use crate::StackError;

/// What the scripted shard does with the next calls.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Answers at once.
    Succeed,
    /// Fails at once with this code.
    Fail(Code),
    /// Reports that it was entered, then waits for a permit of the gate before answering.
    Hold,
}

/// A shard whose behaviour the test sets, counting the calls that reach it.
#[derive(Clone)]
struct Shard {
    behaviour: Arc<Mutex<Behaviour>>,
    calls: Arc<AtomicUsize>,
    entered: mpsc::Sender<()>,
    gate: Arc<Semaphore>,
}

struct Harness {
    shard: Shard,
    entered: mpsc::Receiver<()>,
    stack: ClientStack<(), ()>,
    breaker: BreakerHandle,
}

impl Harness {
    fn new(config: StackConfig) -> Self {
        // Room for every entry a test makes before it reads them (at most 3).
        let (entered_tx, entered) = mpsc::channel(16);
        let shard = Shard {
            behaviour: Arc::new(Mutex::new(Behaviour::Succeed)),
            calls: Arc::default(),
            entered: entered_tx,
            gate: Arc::new(Semaphore::new(0)),
        };
        let inner = {
            let shard = shard.clone();
            tower::service_fn(move |(): ()| {
                let shard = shard.clone();
                async move {
                    shard.calls.fetch_add(1, Ordering::SeqCst);
                    let behaviour = *shard.behaviour.lock().expect("behaviour lock");
                    match behaviour {
                        Behaviour::Succeed => Ok(()),
                        Behaviour::Fail(code) => Err(Status::new(code, "scripted failure")),
                        Behaviour::Hold => {
                            let _ = shard.entered.try_send(());
                            shard
                                .gate
                                .acquire()
                                .await
                                .map_err(|_| Status::internal("gate closed"))?
                                .forget();
                            Ok(())
                        }
                    }
                }
            })
        };
        let (stack, breaker) = build("test", 0, &config, inner).expect("valid stack settings");
        Self {
            shard,
            entered,
            stack,
            breaker,
        }
    }

    fn set(&self, behaviour: Behaviour) {
        *self.shard.behaviour.lock().expect("behaviour lock") = behaviour;
    }

    fn calls(&self) -> usize {
        self.shard.calls.load(Ordering::SeqCst)
    }

    async fn call(&self) -> Result<(), StackError> {
        self.stack.clone().oneshot(()).await
    }
}

/// Settings under which nothing happens by itself: no retries, a breaker that never opens, a
/// deadline of a day and an hour of cool-down. Each test changes what it is about.
fn quiet() -> StackConfig {
    StackConfig {
        timeout: Duration::from_secs(86_400),
        concurrency: 100,
        retry_attempts: 0,
        retry_budget_percent: 20.0,
        breaker_failures: 1_000_000,
        breaker_cooldown: Duration::from_secs(3600),
    }
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_after_consecutive_failures_and_then_fails_fast() {
    let harness = Harness::new(StackConfig {
        breaker_failures: 3,
        ..quiet()
    });
    harness.set(Behaviour::Fail(Code::Unavailable));
    for _ in 0..2 {
        assert!(matches!(harness.call().await, Err(StackError::Status(_))));
    }
    assert_eq!(
        harness.breaker.state_code(),
        0,
        "two failures: still closed"
    );
    // A success resets the count of consecutive failures.
    harness.set(Behaviour::Succeed);
    harness.call().await.expect("success");
    harness.set(Behaviour::Fail(Code::Unavailable));
    for _ in 0..2 {
        assert!(harness.call().await.is_err());
    }
    assert_eq!(harness.breaker.state_code(), 0, "not three in a row yet");
    assert!(harness.call().await.is_err());
    assert_eq!(harness.breaker.state_code(), 2, "three in a row: open");
    assert!(harness.breaker.is_open());

    // Open: calls fail at once without reaching the shard, even once it would answer (or hang
    // for the day-long deadline), and without waiting: not even a retry backoff passes on the
    // paused clock, which moves only when something sleeps.
    let reached = harness.calls();
    harness.set(Behaviour::Hold);
    let started = tokio::time::Instant::now();
    for _ in 0..10 {
        assert!(matches!(harness.call().await, Err(StackError::CircuitOpen)));
    }
    assert_eq!(started.elapsed(), Duration::ZERO, "an open circuit waited");
    assert_eq!(harness.calls(), reached, "a call reached the shard");
    assert_eq!(
        Status::from(StackError::CircuitOpen).code(),
        Code::Unavailable
    );
}

#[tokio::test(start_paused = true)]
async fn bad_requests_do_not_open_the_breaker() {
    let harness = Harness::new(StackConfig {
        breaker_failures: 2,
        ..quiet()
    });
    harness.set(Behaviour::Fail(Code::InvalidArgument));
    for _ in 0..10 {
        assert!(
            matches!(harness.call().await, Err(StackError::Status(s)) if s.code() == Code::InvalidArgument)
        );
    }
    assert_eq!(harness.breaker.state_code(), 0);
    assert_eq!(harness.calls(), 10);
}

/// Opens `harness`'s breaker (configured to open after one failure) and waits out its cool-down.
async fn open_and_cool_down(harness: &Harness, cooldown: Duration) {
    harness.set(Behaviour::Fail(Code::Unavailable));
    assert!(harness.call().await.is_err());
    assert_eq!(harness.breaker.state_code(), 2);
    // The breaker measures its cool-down on the real clock.
    std::thread::sleep(cooldown);
}

#[tokio::test(start_paused = true)]
async fn after_the_cool_down_one_probe_goes_through_and_its_success_closes_the_breaker() {
    let cooldown = Duration::from_millis(5);
    let mut harness = Harness::new(StackConfig {
        breaker_failures: 1,
        breaker_cooldown: cooldown,
        ..quiet()
    });
    open_and_cool_down(&harness, cooldown).await;
    let before = harness.calls();

    // The probe: let through, and held inside the shard.
    harness.set(Behaviour::Hold);
    let probe = tokio::spawn(harness.stack.clone().oneshot(()));
    harness
        .entered
        .recv()
        .await
        .expect("the probe reached the shard");
    assert_eq!(harness.breaker.state_code(), 1, "half-open while probing");
    // One probe at a time: a second call while it runs fails fast.
    assert!(matches!(harness.call().await, Err(StackError::CircuitOpen)));
    assert_eq!(
        harness.calls(),
        before + 1,
        "only the probe reached the shard"
    );

    // The probe succeeds: closed, and calls go through again.
    harness.shard.gate.add_permits(1);
    probe
        .await
        .expect("probe task")
        .expect("the probe succeeds");
    assert_eq!(harness.breaker.state_code(), 0, "closed after a good probe");
    harness.set(Behaviour::Succeed);
    harness.call().await.expect("closed: calls go through");
    assert_eq!(harness.calls(), before + 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_opens_the_breaker_again() {
    let cooldown = Duration::from_millis(5);
    let harness = Harness::new(StackConfig {
        breaker_failures: 1,
        breaker_cooldown: cooldown,
        ..quiet()
    });
    open_and_cool_down(&harness, cooldown).await;
    let before = harness.calls();
    // The probe reaches the shard and fails: open again, for another cool-down.
    assert!(matches!(harness.call().await, Err(StackError::Status(_))));
    assert_eq!(harness.calls(), before + 1, "the probe reached the shard");
    assert_eq!(
        harness.breaker.state_code(),
        2,
        "re-opened after a failed probe"
    );
    // And the next cool-down lets the next probe through, which this time succeeds.
    std::thread::sleep(cooldown);
    harness.set(Behaviour::Succeed);
    harness.call().await.expect("the second probe succeeds");
    assert_eq!(harness.breaker.state_code(), 0);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_up_to_the_attempts_and_bad_requests_never() {
    let mut harness = Harness::new(StackConfig {
        retry_attempts: 2,
        timeout: Duration::from_secs(1),
        ..quiet()
    });
    // UNAVAILABLE: one call and two retries.
    harness.set(Behaviour::Fail(Code::Unavailable));
    assert!(
        matches!(harness.call().await, Err(StackError::Status(s)) if s.code() == Code::Unavailable)
    );
    assert_eq!(harness.calls(), 3);
    // A bad request says nothing about the shard: no retry.
    harness.set(Behaviour::Fail(Code::InvalidArgument));
    assert!(harness.call().await.is_err());
    assert_eq!(harness.calls(), 4);
    // A success is not repeated.
    harness.set(Behaviour::Succeed);
    harness.call().await.expect("success");
    assert_eq!(harness.calls(), 5);
    // An attempt that hangs past its deadline counts as transient: retried, then a timeout.
    harness.set(Behaviour::Hold);
    let result = harness.call().await;
    assert!(
        matches!(result, Err(StackError::Timeout(d)) if d == Duration::from_secs(1)),
        "{result:?}"
    );
    assert_eq!(harness.calls(), 8);
    for _ in 0..3 {
        harness.entered.recv().await.expect("each attempt entered");
    }
}

#[tokio::test(start_paused = true)]
async fn the_retry_budget_caps_retries_and_successes_refill_it() {
    // A budget of 20 % over 10 s with a reserve of 10 retries a second (see `build`): 100
    // retries in reserve, and each success adds a fifth of one.
    let harness = Harness::new(StackConfig {
        retry_attempts: 2,
        retry_budget_percent: 20.0,
        ..quiet()
    });
    harness.set(Behaviour::Fail(Code::Unavailable));
    // 60 failing calls would like 120 retries; the reserve allows 100. (The paused clock moves
    // 25 ms per retry backoff, 2.5 s in all: well inside the budget's 10 s window, so no
    // withdrawal expires during the test.)
    for _ in 0..60 {
        assert!(harness.call().await.is_err());
    }
    assert_eq!(harness.calls(), 60 + 100);
    // Exhausted: failures are no longer retried.
    for _ in 0..10 {
        assert!(harness.call().await.is_err());
    }
    assert_eq!(harness.calls(), 170);
    // 50 successes earn 10 retries.
    harness.set(Behaviour::Succeed);
    for _ in 0..50 {
        harness.call().await.expect("success");
    }
    assert_eq!(harness.calls(), 220);
    harness.set(Behaviour::Fail(Code::Unavailable));
    for _ in 0..20 {
        assert!(harness.call().await.is_err());
    }
    assert_eq!(harness.calls(), 220 + 20 + 10);
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_is_never_retried() {
    let harness = Harness::new(StackConfig {
        retry_attempts: 2,
        breaker_failures: 2,
        ..quiet()
    });
    harness.set(Behaviour::Fail(Code::Unavailable));
    // The first attempt and the first retry fail and open the breaker; the second retry meets
    // the open circuit and stops there.
    assert!(harness.call().await.is_err());
    assert_eq!(harness.calls(), 2);
    assert_eq!(harness.breaker.state_code(), 2);
    // Open: no retry, so no backoff either (the paused clock does not move).
    let started = tokio::time::Instant::now();
    assert!(matches!(harness.call().await, Err(StackError::CircuitOpen)));
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "an open circuit was retried"
    );
    assert_eq!(harness.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_holds_further_calls_until_one_finishes() {
    let mut harness = Harness::new(StackConfig {
        concurrency: 2,
        ..quiet()
    });
    harness.set(Behaviour::Hold);
    let calls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(harness.stack.clone().oneshot(())))
        .collect();
    for _ in 0..2 {
        harness.entered.recv().await.expect("a call entered");
    }
    // The third waits in the limit: with the clock paused, the hour below passes only once every
    // task is idle, so the third call had every chance to enter.
    let third = tokio::time::timeout(Duration::from_secs(3600), harness.entered.recv()).await;
    assert!(third.is_err(), "a third call entered past a limit of 2");
    assert_eq!(harness.calls(), 2);
    // One finishes: the third enters.
    harness.shard.gate.add_permits(1);
    harness
        .entered
        .recv()
        .await
        .expect("the third call entered");
    assert_eq!(harness.calls(), 3);
    harness.shard.gate.add_permits(2);
    for call in calls {
        call.await.expect("call task").expect("call succeeds");
    }
}
