//! Token buckets (GCRA, from `governor`) on a [`QuotaClock`]: a rate per second and a burst.
//!
//! A request of `n` units (hits for ingest, requests for query) either fits whole and is taken
//! from the bucket, or takes nothing and says how long until it would fit. GCRA keeps one
//! timestamp per bucket and updates it with one compare-and-swap, so a check costs tens of
//! nanoseconds on the request path.

use std::{num::NonZeroU32, time::Duration};

use governor::{
    clock::Clock,
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::{InMemoryState, NotKeyed},
    Quota, RateLimiter,
};

use crate::clock::QuotaClock;

/// A rate and a burst: `per_second` units refill per second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units added per second.
    pub per_second: NonZeroU32,
    /// Most units available at once (the bucket's size).
    pub burst: NonZeroU32,
}

impl Rate {
    /// `per_second` with a burst of `burst`, or of one second's worth when `burst` is `None`.
    /// `None` when `per_second` or `burst` is 0 (no limit).
    pub fn new(per_second: u32, burst: Option<u32>) -> Option<Self> {
        let per_second = NonZeroU32::new(per_second)?;
        let burst = match burst {
            Some(burst) => NonZeroU32::new(burst)?,
            None => per_second,
        };
        Some(Self { per_second, burst })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s (burst {})", self.per_second, self.burst)
    }
}

/// Why a bucket did not take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// It would fit after this long (rounded up to whole milliseconds by the status).
    RetryAfter(Duration),
    /// It can never fit: more units than the whole burst.
    LargerThanBurst,
}

/// One token bucket.
#[derive(Debug)]
pub struct Bucket {
    rate: Rate,
    limiter: RateLimiter<NotKeyed, InMemoryState, QuotaClock, NoOpMiddleware<Nanos>>,
    clock: QuotaClock,
}

impl Bucket {
    /// A full bucket of `rate` on `clock`.
    pub fn new(rate: Rate, clock: QuotaClock) -> Self {
        let quota = Quota::per_second(rate.per_second).allow_burst(rate.burst);
        Self {
            rate,
            limiter: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
        }
    }

    /// The bucket's rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `units` if they all fit now; otherwise takes nothing.
    ///
    /// # Errors
    /// [`Shortfall`]: when they would fit, or that they never will.
    pub fn take(&self, units: u64) -> Result<(), Shortfall> {
        let Ok(units) = u32::try_from(units) else {
            return Err(Shortfall::LargerThanBurst);
        };
        let Some(units) = NonZeroU32::new(units) else {
            return Ok(());
        };
        match self.limiter.check_n(units) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Shortfall::RetryAfter(
                not_until.wait_time_from(self.clock.now()),
            )),
            Err(_insufficient) => Err(Shortfall::LargerThanBurst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_second: u32, burst: u32) -> (Bucket, QuotaClock) {
        let clock = QuotaClock::manual();
        let rate = Rate::new(per_second, Some(burst)).expect("a rate");
        (Bucket::new(rate, clock.clone()), clock)
    }

    #[test]
    fn a_burst_fits_the_next_unit_waits_one_interval_and_fits_after_it() {
        let (bucket, clock) = bucket(2, 3);
        for _ in 0..3 {
            assert_eq!(bucket.take(1), Ok(()));
        }
        assert_eq!(
            bucket.take(1),
            Err(Shortfall::RetryAfter(Duration::from_millis(500)))
        );
        clock.advance(Duration::from_millis(499));
        assert_eq!(
            bucket.take(1),
            Err(Shortfall::RetryAfter(Duration::from_millis(1)))
        );
        clock.advance(Duration::from_millis(1));
        assert_eq!(bucket.take(1), Ok(()));
        assert_eq!(
            bucket.take(1),
            Err(Shortfall::RetryAfter(Duration::from_millis(500)))
        );
    }

    #[test]
    fn many_units_fit_whole_or_not_at_all() {
        let (bucket, clock) = bucket(10, 20);
        assert_eq!(bucket.take(20), Ok(()));
        // Five more need five refills of 100 ms; a refused take takes nothing.
        assert_eq!(
            bucket.take(5),
            Err(Shortfall::RetryAfter(Duration::from_millis(500)))
        );
        clock.advance(Duration::from_millis(300));
        assert_eq!(bucket.take(3), Ok(()));
        assert_eq!(bucket.take(21), Err(Shortfall::LargerThanBurst));
        assert_eq!(bucket.take(u64::MAX), Err(Shortfall::LargerThanBurst));
        assert_eq!(bucket.take(0), Ok(()));
    }

    #[test]
    fn rates_of_zero_mean_no_limit_and_the_burst_defaults_to_one_second() {
        assert_eq!(Rate::new(0, Some(5)), None);
        assert_eq!(Rate::new(5, Some(0)), None);
        let rate = Rate::new(7, None).expect("a rate");
        assert_eq!(rate.burst.get(), 7);
    }
}
