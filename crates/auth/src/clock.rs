//! The clock the quota buckets run on: the system's monotonic clock in production, or a manual
//! clock that only moves when a test advances it, so quota tests are exact without timing.
//!
//! Both count nanoseconds from an origin (`governor`'s [`Nanos`]), so one limiter type serves
//! both and a service picks its clock at start-up (`AuthArgs::quota_clock`).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use governor::{clock::Clock, nanos::Nanos};

/// A clock for quota buckets. Cheap to clone; clones show the same time.
#[derive(Debug, Clone)]
pub struct QuotaClock(Source);

#[derive(Debug, Clone)]
enum Source {
    /// Nanoseconds since `origin`, from [`Instant`] (monotonic).
    System { origin: Instant },
    /// Nanoseconds a test has advanced it by.
    Manual(Arc<Manual>),
}

#[derive(Debug, Default)]
struct Manual {
    now: AtomicU64,
    /// Woken on every advance, so waits on this clock end when the test moves it.
    advanced: tokio::sync::Notify,
}

impl Default for QuotaClock {
    fn default() -> Self {
        Self::system()
    }
}

impl QuotaClock {
    /// The system's monotonic clock.
    pub fn system() -> Self {
        Self(Source::System {
            origin: Instant::now(),
        })
    }

    /// A clock that stands still until [`QuotaClock::advance`] moves it.
    pub fn manual() -> Self {
        Self(Source::Manual(Arc::default()))
    }

    /// Moves a manual clock forward by `by` (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Source::Manual(manual) = &self.0 {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            manual.now.fetch_add(nanos, Ordering::AcqRel);
            manual.advanced.notify_waiters();
        }
    }

    /// Waits until `duration` has passed on this clock: a tokio sleep on the system clock, or
    /// until a test has advanced a manual clock far enough.
    pub async fn sleep(&self, duration: Duration) {
        match &self.0 {
            Source::System { .. } => tokio::time::sleep(duration).await,
            Source::Manual(manual) => {
                let until = self
                    .now()
                    .as_u64()
                    .saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
                loop {
                    // Register for the wake-up before reading the time, so an advance between
                    // the read and the wait is not missed.
                    let advanced = manual.advanced.notified();
                    tokio::pin!(advanced);
                    advanced.as_mut().enable();
                    if manual.now.load(Ordering::Acquire) >= until {
                        return;
                    }
                    advanced.await;
                }
            }
        }
    }
}

impl Clock for QuotaClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match &self.0 {
            Source::System { origin } => {
                Nanos::from(u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX))
            }
            Source::Manual(manual) => Nanos::from(manual.now.load(Ordering::Acquire)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_advanced_and_wakes_its_sleepers() {
        let clock = QuotaClock::manual();
        assert_eq!(clock.now().as_u64(), 0);
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep(Duration::from_millis(100)).await }
        });
        // Let the sleeper start (this test runs on one thread) before the clock moves.
        tokio::task::yield_now().await;
        clock.advance(Duration::from_millis(60));
        assert_eq!(clock.now().as_u64(), 60_000_000);
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(40));
        sleeper
            .await
            .expect("the sleeper ends once the clock has moved 100 ms");
    }
}
