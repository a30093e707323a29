//! The failure path's crash-loop guard: a message the broker delivered `max_attempts`
//! times before without it being settled is given up on, whatever its `attempts`.

use std::sync::Arc;
use std::time::Duration;

use queue_core::memory::MemoryDriver;
use queue_core::retry::{Disposition, Exhausted, FailurePath, RetryPolicy};
use queue_core::{
    Backoff, ConsumeOptions, Delivery, Driver, HeaderValue, Message, QueueId, QueueSpec,
    Subscription, names,
};
use queue_testkit::ControlledDriver;

async fn world() -> (Arc<MemoryDriver>, FailurePath, QueueId, QueueId) {
    let driver = Arc::new(MemoryDriver::new());
    let (queue, dlq) = (
        QueueId::parse("app:jobs").unwrap(),
        QueueId::parse("app:jobs.dlq").unwrap(),
    );
    for id in [&queue, &dlq] {
        driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    }
    let (_stop, stop) = tokio::sync::watch::channel(false);
    let path = FailurePath {
        queue: queue.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_millis(10), 2.0, Duration::from_millis(40)),
        },
        exhausted: Exhausted::DeadLetter(dlq.clone(), driver.clone()),
        is_dead_letter_queue: false,
        stop,
    };
    (driver, path, queue, dlq)
}

async fn publish_with(driver: &MemoryDriver, queue: &QueueId, headers: &[(&str, HeaderValue)]) {
    let mut message = Message::from_bytes(b"{}".to_vec(), Default::default(), "application/json");
    for (k, v) in headers {
        message.headers.insert(*k, v.clone());
    }
    driver.publish(queue, message).await.unwrap();
}

async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("a delivery within 5 s")
        .expect("the subscription is open")
        .expect("a delivery")
}

#[tokio::test]
async fn a_message_delivered_max_attempts_times_is_dead_lettered_without_an_attempt() {
    let (driver, path, queue, dlq) = world().await;
    publish_with(&driver, &queue, &[]).await;
    publish_with(&driver, &queue, &[(names::X_DELIVERY_COUNT, 2.into())]).await;
    publish_with(
        &driver,
        &queue,
        &[
            (names::X_DELIVERY_COUNT, HeaderValue::Int(3)),
            (names::ATTEMPTS, HeaderValue::Int(1)),
        ],
    )
    .await;
    let mut sub = driver
        .consume(&queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    for _ in 0..2 {
        let below = next(&mut sub).await;
        assert_eq!(path.redelivered_too_often(&below), None);
        below.ack().await.unwrap();
    }
    let looping = next(&mut sub).await;
    assert_eq!(path.redelivered_too_often(&looping), Some(3));
    let disposition = path
        .give_up(&looping, "redelivered too often")
        .await
        .unwrap();
    assert_eq!(disposition, Disposition::DeadLettered);
    assert_eq!(
        driver.info(&queue).await.unwrap().message_count(),
        Some(0),
        "acked"
    );

    let mut dead_letters = driver
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let dead = next(&mut dead_letters).await;
    let headers = &dead.message().headers;
    assert_eq!(
        headers.get(names::X_DEAD_LETTER_REASON),
        Some(&HeaderValue::from("redelivered too often"))
    );
    assert_eq!(
        headers.get(names::X_ORIGINAL_ATTEMPTS),
        Some(&HeaderValue::Int(1))
    );
}

#[tokio::test]
async fn a_dead_letter_that_keeps_coming_back_stays_in_its_queue() {
    let (driver, mut path, _queue, dlq) = world().await;
    // The dead-letter queue's own consumer, as the runtime sets it up.
    path.queue = dlq.clone();
    path.exhausted = Exhausted::Drop;
    path.is_dead_letter_queue = true;
    publish_with(
        &driver,
        &dlq,
        &[
            (names::X_DELIVERY_COUNT, HeaderValue::Int(7)),
            (names::X_DEAD_LETTER_REASON, "boom".into()),
        ],
    )
    .await;
    let mut sub = driver
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let looping = next(&mut sub).await;
    assert_eq!(path.redelivered_too_often(&looping), Some(7));
    let disposition = path
        .give_up(&looping, "redelivered too often")
        .await
        .unwrap();
    assert_eq!(
        disposition,
        Disposition::Kept,
        "a dead letter is never dropped"
    );
    let kept = next(&mut sub).await;
    assert!(
        !kept.message().headers.contains(names::X_DELIVERY_COUNT),
        "the copy starts uncounted"
    );
}

/// A message put straight into a dead-letter queue has no dead-letter headers; past
/// its last attempt there it is kept like a dead letter, not dropped.
#[tokio::test]
async fn a_message_without_dead_letter_headers_is_kept_in_a_dead_letter_queue() {
    let (driver, mut path, _queue, dlq) = world().await;
    path.queue = dlq.clone();
    path.exhausted = Exhausted::Drop;
    path.is_dead_letter_queue = true;
    publish_with(&driver, &dlq, &[(names::ATTEMPTS, HeaderValue::Int(3))]).await;
    let mut sub = driver
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let last = next(&mut sub).await;
    let disposition = path.fail(&last, "still broken").await.unwrap();
    assert_eq!(disposition, Disposition::Kept);
    let kept = next(&mut sub).await;
    assert_eq!(
        kept.message().headers.get(names::ATTEMPTS),
        Some(&HeaderValue::Int(3))
    );
}

/// A message another client put straight into a dead-letter queue with a TTL is kept
/// there past its last attempt without it: the kept copy carried its `expiration`,
/// and a broker dropped it once that ran out (review). As a dead-letter copy does, it
/// keeps the TTL only as `x_original_expiration`.
#[tokio::test]
async fn a_kept_message_keeps_no_ttl() {
    let (driver, mut path, _queue, dlq) = world().await;
    path.queue = dlq.clone();
    path.exhausted = Exhausted::Drop;
    path.is_dead_letter_queue = true;
    publish_with(
        &driver,
        &dlq,
        &[
            (names::ATTEMPTS, HeaderValue::Int(3)),
            (names::EXPIRATION, HeaderValue::Int(60_000)),
        ],
    )
    .await;
    let mut sub = driver
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let last = next(&mut sub).await;
    assert_eq!(
        path.fail(&last, "still broken").await.unwrap(),
        Disposition::Kept
    );
    let kept = next(&mut sub).await;
    let headers = &kept.message().headers;
    assert!(!headers.contains(names::EXPIRATION), "{headers:?}");
    assert_eq!(
        headers.get(names::X_ORIGINAL_EXPIRATION),
        Some(&HeaderValue::Int(60_000))
    );
}

/// Headers a broker acts on when a copy arrives: Artemis drops a message whose
/// `_AMQ_DUPL_ID` it has seen (a copy, once its original was acked), whichever driver
/// the original came from. Copies leave Artemis' properties out, named in
/// `x_dropped_headers`; other headers stay.
#[tokio::test]
async fn copies_leave_out_the_headers_brokers_act_on() {
    let (driver, path, queue, _dlq) = world().await;
    publish_with(
        &driver,
        &queue,
        &[
            ("CC", HeaderValue::from("boss@example.com")),
            ("_AMQ_DUPL_ID", HeaderValue::from("order-42")),
            ("kept", HeaderValue::Int(1)),
        ],
    )
    .await;
    let mut sub = driver
        .consume(&queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert_eq!(
        path.fail(&first, "boom").await.unwrap(),
        Disposition::Retried
    );
    let copy = next(&mut sub).await;
    let headers = &copy.message().headers;
    assert!(!headers.contains("_AMQ_DUPL_ID"), "{headers:?}");
    assert_eq!(headers.get("kept"), Some(&HeaderValue::Int(1)));
    assert_eq!(
        headers.get("CC"),
        Some(&HeaderValue::from("boss@example.com"))
    );
    let note = headers
        .get(names::X_DROPPED_HEADERS)
        .and_then(HeaderValue::as_str)
        .unwrap_or_default();
    assert!(note.contains("_AMQ_DUPL_ID"), "{note}");
}

/// A dead letter moved back to the queue it failed in with its headers (a broker's
/// "move messages" shovel keeps them, and so does another client) is dead-lettered
/// again when it fails past its last attempt there: its queue's dead-letter queue is
/// where it belongs, not a retry after the longest backoff forever.
#[tokio::test]
async fn a_dead_letter_moved_back_with_its_headers_is_dead_lettered_again() {
    let (driver, path, queue, dlq) = world().await;
    publish_with(
        &driver,
        &queue,
        &[
            (names::ATTEMPTS, HeaderValue::Int(3)),
            (names::X_DEAD_LETTER_REASON, "the first failure".into()),
            (names::X_ORIGINAL_QUEUE, "app:jobs".into()),
        ],
    )
    .await;
    let mut sub = driver
        .consume(&queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let last = next(&mut sub).await;
    let disposition = path.fail(&last, "the second failure").await.unwrap();
    assert_eq!(disposition, Disposition::DeadLettered);
    assert_eq!(driver.info(&queue).await.unwrap().message_count(), Some(0));
    let mut dead_letters = driver
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let dead = next(&mut dead_letters).await;
    assert_eq!(
        dead.message().headers.get(names::X_DEAD_LETTER_REASON),
        Some(&HeaderValue::from("the second failure"))
    );
}

/// With `dead_letter: false` a queue drops what fails past its last attempt, but not
/// what carries the dead-letter headers: it may be another configuration's dead
/// letter, and a dead letter is never dropped.
#[tokio::test]
async fn a_dead_letter_is_kept_where_failures_are_dropped() {
    let (driver, mut path, queue, _dlq) = world().await;
    path.exhausted = Exhausted::Drop;
    assert_eq!(
        last_failures(&driver, &path, &queue).await,
        (Disposition::Kept, Disposition::Dropped)
    );
}

/// Fails, past their last attempt, a dead letter and then a message without the
/// dead-letter headers, both in `queue`: what became of each.
async fn last_failures(
    driver: &MemoryDriver,
    path: &FailurePath,
    queue: &QueueId,
) -> (Disposition, Disposition) {
    let dead_letter = [
        (names::ATTEMPTS, HeaderValue::Int(3)),
        (names::X_DEAD_LETTER_REASON, "boom".into()),
    ];
    publish_with(driver, queue, &dead_letter).await;
    publish_with(driver, queue, &[(names::ATTEMPTS, HeaderValue::Int(3))]).await;
    let mut sub = driver
        .consume(queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let letter = next(&mut sub).await;
    let letter = path.fail(&letter, "again").await.unwrap();
    let plain = next(&mut sub).await;
    let plain = path.fail(&plain, "again").await.unwrap();
    (letter, plain)
}

/// A dead-letter queue with a dead-letter queue of its own (declared, so it has the
/// implicit `.dlq`) keeps its dead letters past their last attempt, and moves on only
/// what came without the dead-letter headers.
#[tokio::test]
async fn a_dead_letter_queue_with_its_own_keeps_dead_letters_and_moves_the_rest() {
    let (driver, mut path, _queue, dlq) = world().await;
    let onward = QueueId::parse("app:jobs.dlq.dlq").unwrap();
    driver
        .declare(&QueueSpec::new(onward.clone()))
        .await
        .unwrap();
    path.queue = dlq.clone();
    path.exhausted = Exhausted::DeadLetter(onward.clone(), driver.clone());
    path.is_dead_letter_queue = true;
    assert_eq!(
        last_failures(&driver, &path, &dlq).await,
        (Disposition::Kept, Disposition::DeadLettered)
    );
    assert_eq!(driver.info(&onward).await.unwrap().message_count(), Some(1));
}

/// A kept message waits the longest backoff, and never less than the shortest wait of
/// a message going back: `backoff.max: 0s` must not make a failing message loop hot.
#[tokio::test]
async fn a_kept_message_never_comes_back_at_once() {
    let (driver, mut path, _queue, dlq) = world().await;
    path.queue = dlq.clone();
    path.exhausted = Exhausted::Drop;
    path.is_dead_letter_queue = true;
    path.retry.backoff = Backoff::new(Duration::ZERO, 1.0, Duration::ZERO);
    publish_with(&driver, &dlq, &[(names::ATTEMPTS, HeaderValue::Int(3))]).await;
    let mut sub = driver
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let last = next(&mut sub).await;
    assert_eq!(
        path.fail(&last, "still broken").await.unwrap(),
        Disposition::Kept
    );
    let kept = next(&mut sub).await;
    let delay = kept
        .message()
        .headers
        .get(names::DELAY)
        .and_then(|d| d.as_int());
    assert!(delay.is_some_and(|ms| ms >= 100), "delay {delay:?}");
}

/// A message that can be neither retried nor dead-lettered goes back to its queue
/// after at least the shortest wait, even where the backoff is zero: it came back at
/// once before, and a broker in trouble saw it in a hot loop.
#[tokio::test(start_paused = true)]
async fn a_message_that_cannot_move_never_comes_back_at_once() {
    let (driver, mut path, queue, _dlq) = world().await;
    path.retry.backoff = Backoff::new(Duration::ZERO, 1.0, Duration::ZERO);
    // A dead-letter queue the driver does not know: the move is refused.
    let nowhere = QueueId::parse("app:nowhere").unwrap();
    path.exhausted = Exhausted::DeadLetter(nowhere, driver.clone());
    // A runtime that is not stopping (a dropped sender reads as stopping).
    let (_running, stop) = tokio::sync::watch::channel(false);
    path.stop = stop;
    publish_with(&driver, &queue, &[(names::ATTEMPTS, HeaderValue::Int(3))]).await;
    let mut sub = driver
        .consume(&queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let last = next(&mut sub).await;
    let started = tokio::time::Instant::now();
    assert_eq!(
        path.fail(&last, "still broken").await.unwrap(),
        Disposition::Returned
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(100),
        "given back after {waited:?}"
    );
}

/// A backoff capped at `Duration::MAX` ("wait as long as it takes"): its wait was cast
/// to an i64 number of milliseconds, -1, and the retry copy was refused as `INVALID`,
/// so the message was dead-lettered at its first failure (review). The copy waits the
/// longest delay a broker carries instead.
#[tokio::test(start_paused = true)]
async fn a_backoff_without_a_cap_retries_at_the_longest_delay() {
    let (driver, mut path, queue, _dlq) = world().await;
    path.retry.max_attempts = 100;
    path.retry.backoff = Backoff::new(Duration::from_secs(1), 2.0, Duration::MAX);
    publish_with(&driver, &queue, &[(names::ATTEMPTS, HeaderValue::Int(80))]).await;
    let mut sub = driver
        .consume(&queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let failing = next(&mut sub).await;
    assert_eq!(
        path.fail(&failing, "still broken").await.unwrap(),
        Disposition::Retried
    );
    let info = driver.info(&queue).await.unwrap();
    assert_eq!(info.delayed, Some(1), "{info:?}");
}

/// Another client's `CC` (from AMQP 1.0, or another driver's queue) on a message whose
/// copies go to a driver that refuses it (as AMQP 0-9-1 does): each copy to that driver
/// leaves it out, named in `x_dropped_headers`, and the message is retried and then
/// dead-lettered; a copy to another driver keeps it. Before, every copy was refused and
/// the message went back to its queue for ever.
#[tokio::test]
async fn copies_leave_out_the_headers_their_driver_reserves() {
    let (memory, mut path, queue, dlq) = world().await;
    let reserving = Arc::new(ControlledDriver::reserving(&["CC", "BCC"]));
    for id in [&queue, &dlq] {
        reserving
            .declare(&QueueSpec::new(id.clone()))
            .await
            .unwrap();
    }
    let with_cc = |attempts: i64| {
        let mut message =
            Message::from_bytes(b"{}".to_vec(), Default::default(), "application/json");
        message.headers.insert("CC", "boss@example.com");
        message.headers.insert("BCC", "audit@example.com");
        message
            .headers
            .insert(names::ATTEMPTS, HeaderValue::Int(attempts));
        message
    };
    let note_of = |delivery: &Delivery| {
        let headers = &delivery.message().headers;
        assert!(
            !headers.contains("CC") && !headers.contains("BCC"),
            "{headers:?}"
        );
        headers
            .get(names::X_DROPPED_HEADERS)
            .and_then(HeaderValue::as_str)
            .unwrap_or_default()
            .to_string()
    };

    // The queue and its dead-letter queue on the driver that reserves them.
    path.driver = reserving.clone();
    path.exhausted = Exhausted::DeadLetter(dlq.clone(), reserving.clone());
    reserving.inner().publish(&queue, with_cc(2)).await.unwrap();
    let mut sub = reserving
        .consume(&queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert_eq!(
        path.fail(&first, "boom").await.unwrap(),
        Disposition::Retried
    );
    let retry = next(&mut sub).await;
    let note = note_of(&retry);
    assert!(note.contains(r#""CC"="boss@example.com""#), "{note}");
    assert!(note.contains(r#""BCC"="audit@example.com""#), "{note}");
    assert_eq!(
        path.fail(&retry, "boom").await.unwrap(),
        Disposition::DeadLettered
    );
    let mut dead_letters = reserving
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    next(&mut dead_letters).await.ack().await.unwrap();

    // From a queue on the reserving driver to a dead-letter queue elsewhere: kept.
    path.exhausted = Exhausted::DeadLetter(dlq.clone(), memory.clone());
    reserving.inner().publish(&queue, with_cc(3)).await.unwrap();
    let last = next(&mut sub).await;
    assert_eq!(
        path.fail(&last, "boom").await.unwrap(),
        Disposition::DeadLettered
    );
    let mut elsewhere = memory
        .consume(&dlq, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let kept = next(&mut elsewhere).await;
    assert_eq!(
        kept.message().headers.get("CC"),
        Some(&HeaderValue::from("boss@example.com"))
    );

    // From a queue elsewhere to a dead-letter queue on the reserving driver: left out.
    path.driver = memory.clone();
    path.exhausted = Exhausted::DeadLetter(dlq.clone(), reserving.clone());
    memory.publish(&queue, with_cc(3)).await.unwrap();
    let mut on_memory = memory
        .consume(&queue, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let last = next(&mut on_memory).await;
    assert_eq!(
        path.fail(&last, "boom").await.unwrap(),
        Disposition::DeadLettered
    );
    let note = note_of(&next(&mut dead_letters).await);
    assert!(note.contains(r#""CC"="boss@example.com""#), "{note}");
}
