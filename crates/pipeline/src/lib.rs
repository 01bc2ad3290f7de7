//! Bounded channels that join the stages of a service's pipeline.
//!
//! Every stage-to-stage hand-off in hitcounter goes through [`channel`], a thin wrapper over
//! `async_channel::bounded` that:
//! - is always bounded, so a slow stage makes its producer wait instead of growing memory
//!   (backpressure); there is deliberately no unbounded constructor;
//! - publishes its depth and capacity as gauges (`hitcounter_channel_depth{channel}` and
//!   `hitcounter_channel_capacity{channel}`), so an operator sees where work piles up;
//! - offers [`StageSender::send_timeout`] for edges that must answer a caller in bounded time
//!   (a unary RPC gets `RESOURCE_EXHAUSTED` instead of waiting forever).
//!
//! Closing follows `async-channel`: when every sender is dropped (or [`StageSender::close`] is
//! called) receivers still get what is queued, then `None`. Stages drain by looping on
//! [`StageReceiver::recv`] until it returns `None`.

use std::{sync::Arc, time::Duration};

use metrics::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a send did not enqueue the item; the item is handed back.
#[derive(Debug, thiserror::Error)]
pub enum SendError<T> {
    /// The channel stayed full for the whole timeout.
    #[error("channel `{channel}` stayed full for {waited:?}")]
    Full {
        /// The item that was not sent.
        item: T,
        /// The channel's name.
        channel: &'static str,
        /// How long the sender waited.
        waited: Duration,
    },
    /// Every receiver is gone or the channel was closed: the stage downstream has stopped.
    #[error("channel `{channel}` is closed")]
    Closed {
        /// The item that was not sent.
        item: T,
        /// The channel's name.
        channel: &'static str,
    },
}

/// Creates a bounded channel named `name` (the metric label) holding at most `capacity` units:
/// items sent with [`StageSender::send`] take one unit, items sent with
/// [`StageSender::send_weighted`] take their weight.
///
/// A `capacity` of 0 is raised to 1: a rendezvous channel is never what a config meant.
pub fn channel<T>(name: &'static str, capacity: usize) -> (StageSender<T>, StageReceiver<T>) {
    let capacity = capacity.max(1);
    let (tx, rx) = async_channel::bounded(capacity);
    let slots = Arc::new(Semaphore::new(capacity));
    let depth = metrics::gauge!("hitcounter_channel_depth", "channel" => name);
    metrics::gauge!("hitcounter_channel_capacity", "channel" => name).set(capacity as f64);
    (
        StageSender {
            inner: tx,
            slots: Arc::clone(&slots),
            capacity,
            name,
            depth: depth.clone(),
        },
        StageReceiver {
            inner: rx,
            slots,
            capacity,
            name,
            depth,
        },
    )
}

// Room in the channel is tracked by a semaphore with one permit per slot, and each queued item
// carries its permit. Waiting for a permit is cancel-safe (dropping the wait loses nothing),
// which is what lets `send_timeout` hand the item back on timeout without cloning it; the
// permit guarantees the `try_send` that follows finds room.
type Slot<T> = (T, OwnedSemaphorePermit);

/// The sending half of a stage channel. Cloneable; the channel closes when the last clone drops.
#[derive(Debug)]
pub struct StageSender<T> {
    inner: async_channel::Sender<Slot<T>>,
    slots: Arc<Semaphore>,
    capacity: usize,
    name: &'static str,
    depth: Gauge,
}

impl<T> Clone for StageSender<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            slots: Arc::clone(&self.slots),
            capacity: self.capacity,
            name: self.name,
            depth: self.depth.clone(),
        }
    }
}

impl<T> StageSender<T> {
    /// Sends `item`, waiting while the channel is full. This is the backpressure path.
    ///
    /// # Errors
    /// [`SendError::Closed`] when the receiving stage has stopped.
    pub async fn send(&self, item: T) -> Result<(), SendError<T>> {
        self.send_weighted(item, 1).await
    }

    /// Like [`send`](Self::send) for an item that takes `weight` units of the capacity (e.g. a
    /// batch of `weight` hits), so that the bound is on the work queued, not on the number of
    /// batches. A weight above the capacity is clamped to it.
    ///
    /// # Errors
    /// [`SendError::Closed`] when the receiving stage has stopped.
    pub async fn send_weighted(&self, item: T, weight: usize) -> Result<(), SendError<T>> {
        match Arc::clone(&self.slots)
            .acquire_many_owned(self.clamp(weight))
            .await
        {
            Ok(permit) => self.enqueue(item, permit),
            Err(_closed) => Err(self.closed(item)),
        }
    }

    /// Sends `item`, waiting at most `timeout` for room.
    ///
    /// # Errors
    /// [`SendError::Full`] when there was no room in time, [`SendError::Closed`] when the
    /// receiving stage has stopped. Either way the item comes back.
    pub async fn send_timeout(&self, item: T, timeout: Duration) -> Result<(), SendError<T>> {
        self.send_weighted_timeout(item, 1, timeout).await
    }

    /// Like [`send_timeout`](Self::send_timeout) for an item of `weight` units.
    ///
    /// # Errors
    /// As [`send_timeout`](Self::send_timeout).
    pub async fn send_weighted_timeout(
        &self,
        item: T,
        weight: usize,
        timeout: Duration,
    ) -> Result<(), SendError<T>> {
        let acquire = Arc::clone(&self.slots).acquire_many_owned(self.clamp(weight));
        match tokio::time::timeout(timeout, acquire).await {
            Ok(Ok(permit)) => self.enqueue(item, permit),
            Ok(Err(_closed)) => Err(self.closed(item)),
            Err(_elapsed) => Err(SendError::Full {
                item,
                channel: self.name,
                waited: timeout,
            }),
        }
    }

    /// Sends `item` only if there is room now.
    ///
    /// # Errors
    /// [`SendError::Full`] (with a zero wait) or [`SendError::Closed`]; the item comes back.
    pub fn try_send(&self, item: T) -> Result<(), SendError<T>> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => self.enqueue(item, permit),
            Err(tokio::sync::TryAcquireError::NoPermits) => Err(SendError::Full {
                item,
                channel: self.name,
                waited: Duration::ZERO,
            }),
            Err(tokio::sync::TryAcquireError::Closed) => Err(self.closed(item)),
        }
    }

    fn clamp(&self, weight: usize) -> u32 {
        weight
            .clamp(1, self.capacity)
            .try_into()
            .unwrap_or(u32::MAX)
    }

    fn enqueue(&self, item: T, permit: OwnedSemaphorePermit) -> Result<(), SendError<T>> {
        let result = self.inner.try_send((item, permit));
        self.depth.set(self.used() as f64);
        result.map_err(|e| self.closed(e.into_inner().0))
    }

    fn closed(&self, item: T) -> SendError<T> {
        SendError::Closed {
            item,
            channel: self.name,
        }
    }

    /// Closes the channel for every sender; queued items can still be received.
    pub fn close(&self) {
        self.inner.close();
        self.slots.close();
    }

    /// Units of capacity in use now (items, or their weights).
    pub fn used(&self) -> usize {
        self.capacity.saturating_sub(self.slots.available_permits())
    }

    /// The channel's capacity in units.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// The receiving half of a stage channel.
#[derive(Debug)]
pub struct StageReceiver<T> {
    inner: async_channel::Receiver<Slot<T>>,
    slots: Arc<Semaphore>,
    capacity: usize,
    name: &'static str,
    depth: Gauge,
}

impl<T> Clone for StageReceiver<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            slots: Arc::clone(&self.slots),
            capacity: self.capacity,
            name: self.name,
            depth: self.depth.clone(),
        }
    }
}

impl<T> Drop for StageReceiver<T> {
    fn drop(&mut self) {
        // The last receiver going away means nobody will free a slot again: wake and fail any
        // sender waiting for room instead of leaving it parked forever.
        if self.inner.receiver_count() == 1 {
            self.inner.close();
            self.slots.close();
        }
    }
}

impl<T> StageReceiver<T> {
    /// Receives the next item; `None` once the channel is closed and drained.
    pub async fn recv(&self) -> Option<T> {
        let (item, permit) = self.inner.recv().await.ok()?;
        // Dropping the permit frees the slot for a waiting sender.
        drop(permit);
        self.depth.set(self.used() as f64);
        Some(item)
    }

    /// Receives an item if one is queued, without waiting.
    pub fn try_recv(&self) -> Option<T> {
        let (item, permit) = self.inner.try_recv().ok()?;
        drop(permit);
        self.depth.set(self.used() as f64);
        Some(item)
    }

    /// The channel's name, as used in metrics.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Turns the receiver into a `Stream`, e.g. the response stream of a streaming RPC.
    pub fn into_stream(self) -> impl futures::Stream<Item = T> + Send + 'static
    where
        T: Send + 'static,
    {
        futures::stream::unfold(self, |rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        })
    }

    /// Items queued now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    fn used(&self) -> usize {
        self.capacity.saturating_sub(self.slots.available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn send_timeout_reports_full_and_returns_the_item() {
        let (tx, rx) = channel::<u32>("test_full", 1);
        tx.send(1).await.unwrap();
        match tx.send_timeout(2, Duration::from_millis(20)).await {
            Err(SendError::Full { item, .. }) => assert_eq!(item, 2),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(rx.recv().await, Some(1));
        tx.send_timeout(3, Duration::from_millis(20)).await.unwrap();
        assert_eq!(rx.recv().await, Some(3));
    }

    #[tokio::test]
    async fn send_timeout_succeeds_when_room_appears() {
        let (tx, rx) = channel::<u32>("test_room", 1);
        tx.send(1).await.unwrap();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let first = rx.recv().await;
            let second = rx.recv().await;
            (first, second)
        });
        tx.send_timeout(2, Duration::from_secs(5)).await.unwrap();
        assert_eq!(reader.await.unwrap(), (Some(1), Some(2)));
    }

    #[tokio::test]
    async fn weighted_sends_bound_the_units_queued() {
        let (tx, rx) = channel::<&str>("test_weight", 10);
        tx.send_weighted("six", 6).await.unwrap();
        assert_eq!(tx.used(), 6);
        assert!(matches!(
            tx.send_weighted_timeout("five", 5, Duration::from_millis(20))
                .await,
            Err(SendError::Full { item: "five", .. })
        ));
        tx.send_weighted_timeout("four", 4, Duration::from_millis(20))
            .await
            .unwrap();
        assert_eq!(rx.recv().await, Some("six"));
        // An item heavier than the whole channel is clamped rather than stuck forever.
        tx.send_weighted_timeout("huge", 100, Duration::from_millis(200))
            .await
            .expect_err("4 units still queued");
        assert_eq!(rx.recv().await, Some("four"));
        tx.send_weighted("huge", 100).await.unwrap();
        assert_eq!(tx.used(), 10);
    }

    #[tokio::test]
    async fn receivers_drain_after_close() {
        let (tx, rx) = channel::<u32>("test_close", 4);
        tx.send(1).await.unwrap();
        tx.send(2).await.unwrap();
        tx.close();
        assert!(matches!(
            tx.send(3).await,
            Err(SendError::Closed { item: 3, .. })
        ));
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, None);
    }
}
