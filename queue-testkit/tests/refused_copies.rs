//! The failure path and copies its driver refuses as they are (`INVALID`): a dead
//! letter whose headers the driver cannot take (more than one AMQP 0-9-1 frame holds
//! on a connection with a small `frame_max`) is sent bare, so that it is never sent
//! back to its queue at every failure for ever.

use std::sync::Arc;

use queue_core::retry::{BARE_TEXT_BYTES, Disposition, Exhausted, FailurePath, RetryPolicy};
use queue_core::{
    Backoff, Delivery, Driver, HeaderValue, Headers, Message, QueueId, QueueSpec, Subscription,
    names,
};
use queue_testkit::ControlledDriver;

/// Fails, for the last time, a message with `headers` on `driver`, dead-lettering to
/// `app:jobs.dlq`: its disposition and what reached the dead-letter queue.
async fn fail_for_the_last_time(
    driver: ControlledDriver,
    headers: Headers,
    reason: &str,
) -> (Disposition, Option<Message>) {
    let driver = Arc::new(driver);
    let queue = QueueId::parse("app:jobs").unwrap();
    let dlq = QueueId::parse("app:jobs.dlq").unwrap();
    for id in [&queue, &dlq] {
        driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    }
    let (_running, stop) = tokio::sync::watch::channel(false);
    let path = FailurePath {
        queue: queue.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 1,
            backoff: Backoff::new(
                std::time::Duration::from_secs(1),
                2.0,
                std::time::Duration::from_secs(1),
            ),
        },
        exhausted: Exhausted::DeadLetter(dlq.clone(), driver.clone()),
        is_dead_letter_queue: false,
        stop,
    };
    let message = Message::from_bytes(b"{}".to_vec(), headers, "application/json");
    driver.inner().publish(&queue, message).await.unwrap();
    let mut jobs = driver
        .inner()
        .consume(&queue, Default::default())
        .await
        .unwrap();
    let delivery = next_of(&mut jobs).await.expect("the message");
    let disposition = path.give_up(&delivery, reason).await.unwrap();
    let mut letters = driver
        .inner()
        .consume(&dlq, Default::default())
        .await
        .unwrap();
    let letter = next_of(&mut letters).await.map(|d| d.message().clone());
    (disposition, letter)
}

/// The next delivery of `sub`, if one is there.
async fn next_of(sub: &mut Box<dyn Subscription>) -> Option<Delivery> {
    match tokio::time::timeout(std::time::Duration::from_millis(100), sub.next()).await {
        Ok(Some(Ok(delivery))) => Some(delivery),
        _ => None,
    }
}

fn headers_of(count: usize, bytes: usize) -> Headers {
    Headers::from_pairs((0..count).map(|n| (format!("h{n}"), HeaderValue::from("x".repeat(bytes)))))
}

/// A dead letter refused for its headers goes without them, each named, and with its
/// record of where and why it failed. Before, it went back to its queue at every
/// failure, for ever (review: 16 attempts in 15 s on RabbitMQ with `frame_max=4096`).
#[tokio::test(start_paused = true)]
async fn a_dead_letter_refused_for_its_headers_goes_without_them() {
    let driver = ControlledDriver::new().refusing_headers_over(4_000);
    let reason = "r".repeat(4_000);
    let (disposition, letter) = fail_for_the_last_time(driver, headers_of(3, 1_000), &reason).await;
    assert_eq!(disposition, Disposition::DeadLettered);
    let letter = letter.expect("the dead letter in its queue");
    let headers = &letter.headers;
    for n in 0..3 {
        assert!(
            !headers.contains(&format!("h{n}")),
            "h{n} kept: {headers:?}"
        );
    }
    let note = headers
        .get(names::X_DROPPED_HEADERS)
        .and_then(HeaderValue::as_str);
    let note = note.expect("a note of what was left out");
    assert!(note.contains("\"h0\", \"h1\", \"h2\""), "{note}");
    assert!(note.contains("controlled driver's 4000"), "{note}");
    let said = headers
        .get(names::X_DEAD_LETTER_REASON)
        .and_then(HeaderValue::as_str)
        .expect("a reason");
    assert!(
        said.starts_with("rrr") && said.len() <= BARE_TEXT_BYTES,
        "{said}"
    );
    assert_eq!(
        headers
            .get(names::X_ORIGINAL_QUEUE)
            .and_then(HeaderValue::as_str),
        Some("app:jobs")
    );
}

/// A dead letter the driver takes as it is keeps every header: the bare one is only
/// for a refusal.
#[tokio::test(start_paused = true)]
async fn a_dead_letter_the_driver_takes_keeps_its_headers() {
    let driver = ControlledDriver::new().refusing_headers_over(16_000);
    let (disposition, letter) =
        fail_for_the_last_time(driver, headers_of(3, 1_000), "broken").await;
    assert_eq!(disposition, Disposition::DeadLettered);
    let letter = letter.expect("the dead letter in its queue");
    assert!(letter.headers.contains("h2"), "{:?}", letter.headers);
    assert!(!letter.headers.contains(names::X_DROPPED_HEADERS));
}

/// A dead letter refused only for its long texts (a 4 KiB reason) goes with them cut
/// and every header of the message kept: bare was for headers that cannot fit (review:
/// small headers were lost needlessly).
#[tokio::test(start_paused = true)]
async fn a_dead_letter_refused_for_its_reason_keeps_its_headers() {
    let driver = ControlledDriver::new().refusing_headers_over(4_000);
    let reason = "r".repeat(4_000);
    let (disposition, letter) = fail_for_the_last_time(driver, headers_of(3, 500), &reason).await;
    assert_eq!(disposition, Disposition::DeadLettered);
    let letter = letter.expect("the dead letter in its queue");
    assert!(letter.headers.contains("h2"), "{:?}", letter.headers);
    let said = letter
        .headers
        .get(names::X_DEAD_LETTER_REASON)
        .and_then(HeaderValue::as_str)
        .expect("a reason");
    assert!(said.len() <= BARE_TEXT_BYTES, "{said}");
}

/// A message in a dead-letter queue whose retry copy is refused cannot move: its
/// `attempts` cannot grow, so it goes back to its queue after the longest backoff, as
/// a dead letter kept there does. It went back after the first backoff, and came
/// again five times a second for ever (review: 116 runs in 24 s).
#[tokio::test(start_paused = true)]
async fn a_message_no_copy_of_which_is_taken_waits_the_longest_backoff() {
    let driver = Arc::new(ControlledDriver::new().refusing_headers_over(1_000));
    let dlq = QueueId::parse("app:jobs.dlq").unwrap();
    driver.declare(&QueueSpec::new(dlq.clone())).await.unwrap();
    let (_running, stop) = tokio::sync::watch::channel(false);
    let path = FailurePath {
        queue: dlq.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(
                std::time::Duration::from_millis(200),
                2.0,
                std::time::Duration::from_secs(5),
            ),
        },
        exhausted: Exhausted::Drop,
        is_dead_letter_queue: true,
        stop,
    };
    let message = Message::from_bytes(b"{}".to_vec(), headers_of(1, 2_000), "application/json");
    driver.inner().publish(&dlq, message).await.unwrap();
    let mut letters = driver
        .inner()
        .consume(&dlq, Default::default())
        .await
        .unwrap();
    let delivery = next_of(&mut letters).await.expect("the letter");
    let started = tokio::time::Instant::now();
    let disposition = path.fail(&delivery, "broken").await.unwrap();
    assert_eq!(disposition, Disposition::Returned);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(5),
        "went back after {waited:?}, not the longest backoff (5s)"
    );
}
