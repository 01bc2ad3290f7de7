//! The batch-id ledger: makes `RecordHits`/`StreamHits` batches with a non-empty `batch_id`
//! idempotent for the dedup horizon (10 minutes by default).
//!
//! A batch first *claims* its id. The first claimant gets a [`Claim::New`] guard, enqueues the
//! hits and completes the guard with the accepted count; if it fails instead (validation, full
//! buffer), dropping the guard releases the id so a retry can succeed. A concurrent claimant of
//! the same id waits for the first one to finish rather than counting the batch twice; a later
//! one gets [`Claim::Duplicate`] with the first call's `accepted`.
//!
//! Bounded: at most `capacity` ids are remembered; when the ledger is full of ids younger than
//! the horizon, new ids are refused (the caller maps it to `RESOURCE_EXHAUSTED`).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// The outcome of claiming a batch id.
pub(crate) enum Claim {
    /// First time: count the batch, then [`ClaimGuard::complete`].
    New(ClaimGuard),
    /// Seen before and counted: the first call's `accepted`.
    Duplicate(u64),
}

/// The ledger is full.
#[derive(Debug)]
pub(crate) struct LedgerFull;

/// Remembers batch ids for the horizon.
pub(crate) struct BatchLedger {
    state: Mutex<State>,
    horizon: Duration,
    capacity: usize,
}

#[derive(Default)]
struct State {
    // The id is stored once, shared by the map and the expiry queue.
    entries: HashMap<Arc<str>, Entry>,
    // Completed ids in completion order, for expiry.
    expiry: VecDeque<(Instant, Arc<str>)>,
}

enum Entry {
    Pending(watch::Receiver<Option<u64>>),
    Done(u64),
}

impl BatchLedger {
    pub(crate) fn new(horizon: Duration, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            horizon,
            capacity: capacity.max(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a map and a queue updated in single steps; a panic elsewhere while
        // holding the lock cannot leave it half-updated in a way that matters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restores a completed id recorded `age` ago (from the durable ledger log, oldest first).
    /// Ids older than the horizon are skipped.
    pub(crate) fn restore(&self, id: &str, accepted: u64, age: Duration) {
        if age >= self.horizon {
            return;
        }
        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut state = self.lock();
        let id: Arc<str> = Arc::from(id);
        state.entries.insert(Arc::clone(&id), Entry::Done(accepted));
        state.expiry.push_back((at, id));
    }

    /// True while a call holding `id` has not finished.
    pub(crate) fn is_pending(&self, id: &str) -> bool {
        matches!(self.lock().entries.get(id), Some(Entry::Pending(_)))
    }

    /// Claims `id`, waiting while another call with the same id is in flight.
    pub(crate) async fn claim(self: &Arc<Self>, id: &str) -> Result<Claim, LedgerFull> {
        loop {
            let mut pending = {
                let mut state = self.lock();
                let now = Instant::now();
                while let Some((at, _)) = state.expiry.front() {
                    if now.duration_since(*at) < self.horizon {
                        break;
                    }
                    if let Some((_, old)) = state.expiry.pop_front() {
                        state.entries.remove(&old);
                    }
                }
                metrics::gauge!("hitcounter_ingest_batch_ids").set(state.entries.len() as f64);
                match state.entries.get(id) {
                    Some(Entry::Done(accepted)) => return Ok(Claim::Duplicate(*accepted)),
                    Some(Entry::Pending(rx)) => rx.clone(),
                    None => {
                        if state.entries.len() >= self.capacity {
                            return Err(LedgerFull);
                        }
                        let (tx, rx) = watch::channel(None);
                        let id: Arc<str> = Arc::from(id);
                        state.entries.insert(Arc::clone(&id), Entry::Pending(rx));
                        return Ok(Claim::New(ClaimGuard {
                            ledger: Arc::clone(self),
                            id: Some(id),
                            tx,
                        }));
                    }
                }
            };
            // Wait for the first claimant to complete or give up, then look again.
            let _ = pending.changed().await;
        }
    }
}

/// Held by the first claimant of an id until its batch is counted.
pub(crate) struct ClaimGuard {
    ledger: Arc<BatchLedger>,
    id: Option<Arc<str>>,
    tx: watch::Sender<Option<u64>>,
}

impl std::fmt::Debug for ClaimGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGuard").field("id", &self.id).finish()
    }
}

impl ClaimGuard {
    /// The claimed id.
    pub(crate) fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// Records that the batch was counted with `accepted` hits.
    pub(crate) fn complete(mut self, accepted: u64) {
        if let Some(id) = self.id.take() {
            let mut state = self.ledger.lock();
            state.entries.insert(Arc::clone(&id), Entry::Done(accepted));
            state.expiry.push_back((Instant::now(), id));
        }
        let _ = self.tx.send(Some(accepted));
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        // Not completed: the batch was not counted, so release the id for a retry. Waiters wake
        // up when `tx` drops with this guard and claim again.
        if let Some(id) = self.id.take() {
            self.ledger.lock().entries.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_claim_is_a_duplicate_with_the_first_count() {
        let ledger = BatchLedger::new(Duration::from_secs(600), 10);
        let Claim::New(guard) = ledger.claim("b1").await.unwrap() else {
            panic!("new")
        };
        guard.complete(7);
        assert!(matches!(
            ledger.claim("b1").await.unwrap(),
            Claim::Duplicate(7)
        ));
    }

    #[tokio::test]
    async fn dropped_claim_releases_the_id_and_wakes_waiters() {
        let ledger = BatchLedger::new(Duration::from_secs(600), 10);
        let Claim::New(first) = ledger.claim("b").await.unwrap() else {
            panic!("new")
        };
        let waiter = {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                match ledger.claim("b").await.unwrap() {
                    Claim::New(guard) => {
                        guard.complete(3);
                        "new"
                    }
                    Claim::Duplicate(_) => "duplicate",
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        assert_eq!(waiter.await.unwrap(), "new");
        assert!(matches!(
            ledger.claim("b").await.unwrap(),
            Claim::Duplicate(3)
        ));
    }

    #[tokio::test]
    async fn concurrent_claim_waits_for_completion() {
        let ledger = BatchLedger::new(Duration::from_secs(600), 10);
        let Claim::New(first) = ledger.claim("b").await.unwrap() else {
            panic!("new")
        };
        let waiter = {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move { matches!(ledger.claim("b").await, Ok(Claim::Duplicate(5))) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.complete(5);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn full_ledger_refuses_new_ids_until_they_expire() {
        let ledger = BatchLedger::new(Duration::from_millis(50), 1);
        let Claim::New(guard) = ledger.claim("a").await.unwrap() else {
            panic!("new")
        };
        guard.complete(1);
        assert!(ledger.claim("b").await.is_err());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(matches!(ledger.claim("b").await, Ok(Claim::New(_))));
    }
}
