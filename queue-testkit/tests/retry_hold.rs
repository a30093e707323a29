//! The failure path and deliveries that were lost (their connection or link gone, so
//! the broker delivers the original again): on a driver without delays, which holds
//! the original through its backoff and publishes the copy after, a delivery lost
//! meanwhile gets no copy; on any driver, nor does one lost before it failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use queue_core::retry::{Disposition, Exhausted, FailurePath, RetryPolicy};
use queue_core::{Acker, Backoff, Delivery, Driver, Message, QueueId, QueueSpec, Result};
use queue_testkit::ControlledDriver;

/// An acker whose delivery is lost from its `lost_from`th look on (or never), counting
/// the settlements tried on it.
struct LostOrHeld {
    lost_from: Option<usize>,
    looks: AtomicUsize,
    settled: Arc<AtomicUsize>,
}

#[async_trait]
impl Acker for LostOrHeld {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn release(self: Box<Self>) -> Result<()> {
        self.settled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn release_on_drop(self: Box<Self>) {}
    fn is_lost(&self) -> bool {
        let look = self.looks.fetch_add(1, Ordering::SeqCst) + 1;
        self.lost_from.is_some_and(|from| look >= from)
    }
}

/// Fails one message on a driver without delays, its delivery lost (when `lost`) only
/// after the failure path first looked: while it was held through its backoff.
async fn fail_one(lost: bool) -> (Disposition, u64, usize) {
    fail_one_on(
        ControlledDriver::without_delays(),
        lost.then_some(2),
        TWO_SECONDS,
    )
    .await
}

/// A backoff of two seconds at every attempt.
const TWO_SECONDS: Backoff = Backoff::new(Duration::from_secs(2), 2.0, Duration::from_secs(2));

async fn fail_one_on(
    driver: ControlledDriver,
    lost_from: Option<usize>,
    backoff: Backoff,
) -> (Disposition, u64, usize) {
    let driver = Arc::new(driver);
    let queue = QueueId::parse("app:jobs").unwrap();
    driver
        .declare(&QueueSpec::new(queue.clone()))
        .await
        .unwrap();
    let (_running, stop) = tokio::sync::watch::channel(false);
    let path = FailurePath {
        queue: queue.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 3,
            backoff,
        },
        exhausted: Exhausted::Drop,
        is_dead_letter_queue: false,
        stop,
    };
    let settled = Arc::new(AtomicUsize::new(0));
    let acker = LostOrHeld {
        lost_from,
        looks: AtomicUsize::new(0),
        settled: Arc::clone(&settled),
    };
    let message = Message::from_bytes(b"{}".to_vec(), Default::default(), "application/json");
    let delivery = Delivery::new(message, Box::new(acker));
    let disposition = path.fail(&delivery, "broken").await.unwrap();
    // The copy, waiting out its delay or ready.
    let queued = driver
        .inner()
        .info(&queue)
        .await
        .unwrap()
        .message_count()
        .unwrap();
    (disposition, queued, settled.load(Ordering::SeqCst))
}

#[tokio::test(start_paused = true)]
async fn a_delivery_lost_during_its_backoff_gets_no_copy() {
    // Held, then copied and acked.
    assert_eq!(fail_one(false).await, (Disposition::Retried, 1, 1));
    // Lost while held: the broker has the original back; a copy would be a duplicate.
    assert_eq!(fail_one(true).await, (Disposition::Returned, 0, 0));
}

/// On a driver with delays the copy was published at once, the link already lost
/// while the handler ran: the broker delivered the original again beside it, a
/// duplicate for every loss (review). A delivery known lost gets no copy.
#[tokio::test(start_paused = true)]
async fn a_delivery_lost_before_it_failed_gets_no_copy() {
    assert_eq!(
        fail_one_on(ControlledDriver::new(), None, TWO_SECONDS).await,
        (Disposition::Retried, 1, 1)
    );
    assert_eq!(
        fail_one_on(ControlledDriver::new(), Some(1), TWO_SECONDS).await,
        (Disposition::Returned, 0, 0)
    );
}

/// A copy that cannot be published after the original was held through its backoff
/// (a driver without delays) gives the original back at once: it waited the backoff
/// again first, so that a failing delivery stayed unsettled for twice its backoff,
/// past a broker's limit on unsettled deliveries sooner than `check` allows for
/// (review).
#[tokio::test(start_paused = true)]
async fn a_copy_that_cannot_be_published_after_the_hold_gives_the_original_back_at_once() {
    let driver = ControlledDriver::without_delays();
    driver.fail_next_publishes(1);
    let started = tokio::time::Instant::now();
    let (disposition, queued, settled) = fail_one_on(driver, None, TWO_SECONDS).await;
    assert_eq!(
        (disposition, queued, settled),
        (Disposition::Returned, 0, 1)
    );
    let held = started.elapsed();
    assert!(
        held < Duration::from_secs(3),
        "held for {held:?}: the backoff (2s) twice"
    );
}

/// A driver with delays still holds the original when its copy cannot be published
/// (the broker in trouble), for the backoff, before it gives it back: a backoff past
/// the broker's limit on unsettled deliveries (RabbitMQ's `consumer_timeout`) had
/// the broker take it back and end the channel, its other deliveries coming back too
/// (review). The hold stays under half that limit.
#[tokio::test(start_paused = true)]
async fn a_copy_that_cannot_be_published_is_held_under_the_brokers_limit() {
    let limit = Duration::from_secs(600);
    let driver = ControlledDriver::new().taking_back_after(limit);
    driver.fail_next_publishes(1);
    let hour = Duration::from_secs(3600);
    let started = tokio::time::Instant::now();
    let (disposition, queued, settled) =
        fail_one_on(driver, None, Backoff::new(hour, 2.0, hour)).await;
    assert_eq!(
        (disposition, queued, settled),
        (Disposition::Returned, 0, 1)
    );
    let held = started.elapsed();
    assert!(
        held <= limit / 2,
        "held for {held:?}, past half the broker's {limit:?}"
    );
}

/// A program whose stop sender is gone (dropped, never to send a stop) still holds a
/// failed delivery through its backoff: the hold read the dropped sender as a stop,
/// and gave the message back at once, in a hot loop.
#[tokio::test(start_paused = true)]
async fn a_dropped_stop_sender_does_not_end_the_hold() {
    let driver = Arc::new(ControlledDriver::without_delays());
    let queue = QueueId::parse("app:jobs").unwrap();
    driver
        .declare(&QueueSpec::new(queue.clone()))
        .await
        .unwrap();
    let (running, stop) = tokio::sync::watch::channel(false);
    drop(running);
    let path = FailurePath {
        queue: queue.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 3,
            backoff: TWO_SECONDS,
        },
        exhausted: Exhausted::Drop,
        is_dead_letter_queue: false,
        stop,
    };
    let settled = Arc::new(AtomicUsize::new(0));
    let acker = LostOrHeld {
        lost_from: None,
        looks: AtomicUsize::new(0),
        settled: Arc::clone(&settled),
    };
    let message = Message::from_bytes(b"{}".to_vec(), Default::default(), "application/json");
    let delivery = Delivery::new(message, Box::new(acker));
    let started = tokio::time::Instant::now();
    let disposition = path.fail(&delivery, "broken").await.unwrap();
    assert_eq!(disposition, Disposition::Retried);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "held {:?}, not its backoff",
        started.elapsed()
    );
}
