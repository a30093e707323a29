//! Memory-driver behaviour beyond the shared contracts: full queues, returns when
//! full, expiry, close.

use std::time::Duration;

use queue_core::memory::{MemoryConfig, MemoryDriver};
use queue_core::{ConsumeOptions, Driver, ErrorKind, HeaderValue, Headers, QueueId, QueueSpec};
use queue_testkit::{next, number_of, numbered, within};

fn id() -> QueueId {
    QueueId::parse("mem:q").unwrap()
}

/// The number of the next message a new consumer takes, acked.
async fn take_one(driver: &MemoryDriver) -> i64 {
    let mut sub = driver
        .consume(&id(), ConsumeOptions::default())
        .await
        .unwrap();
    let delivery = next(&mut sub).await;
    delivery.ack().await.unwrap();
    number_of(&delivery)
}

async fn driver_with_full_queue(max_length: u64, timeout: Duration) -> MemoryDriver {
    let driver = MemoryDriver::with_config(MemoryConfig {
        publish_timeout: timeout,
        ..MemoryConfig::default()
    });
    driver
        .declare(&QueueSpec::new(id()).with_max_length(max_length))
        .await
        .unwrap();
    for n in 0..max_length as i64 {
        driver.publish(&id(), numbered(n)).await.unwrap();
    }
    driver
}

#[tokio::test]
async fn a_full_queue_makes_publish_fail_internal_retryable_after_the_wait() {
    let driver = driver_with_full_queue(2, Duration::from_millis(50)).await;
    let err = driver.publish(&id(), numbered(9)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(err.retryable());
    assert!(err.message().contains("full"), "{err}");
}

/// Delayed messages take room as the ready ones do: before, a `delay` header got past
/// a full queue, and a producer could fill memory without bound.
#[tokio::test]
async fn delayed_messages_count_against_max_length() {
    let driver = MemoryDriver::with_config(MemoryConfig {
        publish_timeout: Duration::from_millis(50),
        ..MemoryConfig::default()
    });
    driver
        .declare(&QueueSpec::new(id()).with_max_length(2))
        .await
        .unwrap();
    let later = |n| {
        let mut message = numbered(n);
        message.headers.insert("delay", HeaderValue::Int(60_000));
        message
    };
    driver.publish(&id(), later(1)).await.unwrap();
    driver.publish(&id(), numbered(2)).await.unwrap();
    for refused in [later(3), numbered(4)] {
        let err = driver.publish(&id(), refused).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
        assert!(err.message().contains("full"), "{err}");
    }
    let info = driver.info(&id()).await.unwrap();
    assert_eq!((info.ready, info.delayed), (Some(1), Some(1)));
}

#[tokio::test]
async fn a_waiting_publish_enters_once_a_consumer_makes_room() {
    let driver = driver_with_full_queue(1, Duration::from_secs(20)).await;
    let publisher = {
        let driver = driver.clone();
        tokio::spawn(async move { driver.publish(&id(), numbered(1)).await })
    };
    let mut sub = driver
        .consume(&id(), ConsumeOptions { prefetch: 1 })
        .await
        .unwrap();
    let first = next(&mut sub).await;
    within("the waiting publish", publisher)
        .await
        .expect("the publisher does not panic")
        .unwrap();
    first.ack().await.unwrap();
    let second = next(&mut sub).await;
    assert_eq!(number_of(&second), 1);
    second.ack().await.unwrap();
}

#[tokio::test]
async fn returns_are_never_lost_even_when_the_queue_is_full() {
    let driver = driver_with_full_queue(2, Duration::from_millis(10)).await;
    let mut sub = driver
        .consume(&id(), ConsumeOptions { prefetch: 2 })
        .await
        .unwrap();
    let a = next(&mut sub).await;
    let b = next(&mut sub).await;
    driver.publish(&id(), numbered(10)).await.unwrap();
    driver.publish(&id(), numbered(11)).await.unwrap();
    assert!(
        driver.publish(&id(), numbered(12)).await.is_err(),
        "queue is full again"
    );
    a.release().await.unwrap();
    drop(b);
    let info = driver.info(&id()).await.unwrap();
    assert_eq!(info.ready, Some(4), "both returns entered the full queue");
    let mut order = Vec::new();
    for _ in 0..4 {
        let d = next(&mut sub).await;
        order.push(number_of(&d));
        d.ack().await.unwrap();
    }
    assert_eq!(order, vec![1, 0, 10, 11], "returns go to the front");
    assert_eq!(driver.acked_total(&id()), Some(4), "releases are not acks");
}

#[tokio::test(start_paused = true)]
async fn expired_messages_are_not_delivered() {
    let driver = MemoryDriver::new();
    driver.declare(&QueueSpec::new(id())).await.unwrap();
    let mut short = numbered(1);
    short.headers.insert("expiration", HeaderValue::Int(1));
    driver.publish(&id(), short).await.unwrap();
    driver.publish(&id(), numbered(2)).await.unwrap();
    tokio::time::advance(Duration::from_millis(5)).await;
    assert_eq!(take_one(&driver).await, 2);
}

/// A delayed message's time to live starts when it enters the queue, as on RabbitMQ:
/// a retry copy delayed past the queue's `message_ttl` is delivered, not dropped.
#[tokio::test]
async fn a_delayed_message_lives_its_ttl_from_when_it_enters_the_queue() {
    let driver = MemoryDriver::new();
    let spec = QueueSpec::new(id()).with_message_ttl(Duration::from_secs(2));
    driver.declare(&spec).await.unwrap();
    let mut later = numbered(1);
    later.headers = Headers::from_pairs([("delay", HeaderValue::Int(3_000))]);
    driver.publish(&id(), later).await.unwrap();
    let mut sub = driver
        .consume(&id(), ConsumeOptions::default())
        .await
        .unwrap();
    // Counted from the publish, its time to live would be over when it enters.
    let d = next(&mut sub).await;
    assert_eq!(number_of(&d), 1);
    d.ack().await.unwrap();
}

/// A delayed message waits on the driver's own timer, not on a task of the runtime
/// that published it: dropped with that runtime (an embedder's short-lived one, a
/// Lua worker's at a host's restart), it was lost, its publish confirmed, and
/// `delayed` counted it for ever; and a publisher's runtime held up by a handler that
/// cannot yield held up every delayed message it had published (review).
#[test]
fn a_delayed_message_outlives_the_runtime_that_published_it() {
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let driver = MemoryDriver::new();
    runtime().block_on(async {
        driver.declare(&QueueSpec::new(id())).await.unwrap();
        let mut later = numbered(1);
        later.headers = Headers::from_pairs([("delay", HeaderValue::Int(50))]);
        driver.publish(&id(), later).await.unwrap();
    });
    runtime().block_on(async {
        assert_eq!(take_one(&driver).await, 1);
        let info = driver.info(&id()).await.unwrap();
        assert_eq!((info.ready, info.delayed), (Some(0), Some(0)), "{info:?}");
    });
}

/// Expired messages at the head of a full queue make room for a publish, with no
/// consumer to take them, as RabbitMQ drops them at the head of its queue. Before,
/// they took room until a consumer's take dropped them: the publish waited out its
/// limit and failed "full" with nothing live in the queue.
#[tokio::test(start_paused = true)]
async fn expired_messages_make_room_without_a_consumer() {
    let driver = MemoryDriver::with_config(MemoryConfig {
        publish_timeout: Duration::from_secs(20),
        ..MemoryConfig::default()
    });
    let spec = QueueSpec::new(id())
        .with_max_length(2)
        .with_message_ttl(Duration::from_secs(1));
    driver.declare(&spec).await.unwrap();
    for n in 0..2 {
        driver.publish(&id(), numbered(n)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // both expire (paused clock)
    let started = tokio::time::Instant::now();
    driver
        .publish(&id(), numbered(9))
        .await
        .expect("the expired messages made room");
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "the publish waited for room"
    );
    let info = driver.info(&id()).await.unwrap();
    assert_eq!(info.ready, Some(1), "{info:?}");
    assert_eq!(take_one(&driver).await, 9);
}

/// A publisher that began to wait for room before the messages at the head expired
/// gets in as they expire, not at the end of its wait: nothing else signals room
/// with nobody consuming, and it failed "full" at `publish_timeout`.
#[tokio::test(start_paused = true)]
async fn a_waiting_publisher_gets_in_when_the_head_expires() {
    let driver = MemoryDriver::with_config(MemoryConfig {
        publish_timeout: Duration::from_secs(20),
        ..MemoryConfig::default()
    });
    let spec = QueueSpec::new(id())
        .with_max_length(1)
        .with_message_ttl(Duration::from_secs(1));
    driver.declare(&spec).await.unwrap();
    driver.publish(&id(), numbered(0)).await.unwrap();
    let started = tokio::time::Instant::now();
    driver
        .publish(&id(), numbered(1))
        .await
        .expect("the expired head made room");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(2),
        "waited {waited:?} (paused clock)"
    );
}

/// A delivery put back (released, or returned by its consumer's cancel) keeps when it
/// expires, as on RabbitMQ. Before, it came back with no time to live and never
/// expired.
#[tokio::test(start_paused = true)]
async fn a_message_put_back_keeps_its_time_to_live() {
    let driver = MemoryDriver::new();
    let spec = QueueSpec::new(id()).with_message_ttl(Duration::from_secs(1));
    driver.declare(&spec).await.unwrap();
    for n in 0..2 {
        driver.publish(&id(), numbered(n)).await.unwrap();
    }
    let mut sub = driver
        .consume(&id(), ConsumeOptions { prefetch: 2 })
        .await
        .unwrap();
    let released = next(&mut sub).await;
    let returned = next(&mut sub).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // both expire (paused clock)
    released.release().await.unwrap();
    // Returned by the cancel (detach), not by its own drop (a release).
    sub.cancel().await.unwrap();
    drop(returned);
    driver.publish(&id(), numbered(9)).await.unwrap();
    let mut sub = driver
        .consume(&id(), ConsumeOptions::default())
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(number_of(&d), 9, "an expired message came back");
    d.ack().await.unwrap();
}

/// A message's time to live starts when it enters the queue, not when its publish
/// began to wait for room: a retry copy that waited longer than its TTL for a full
/// queue was confirmed, then dropped unseen, its original already acked.
#[tokio::test(start_paused = true)]
async fn a_publish_that_waited_for_room_lives_its_ttl_from_when_it_got_in() {
    let driver = MemoryDriver::with_config(MemoryConfig {
        publish_timeout: Duration::from_secs(10),
        ..MemoryConfig::default()
    });
    driver
        .declare(&QueueSpec::new(id()).with_max_length(1))
        .await
        .unwrap();
    driver.publish(&id(), numbered(0)).await.unwrap();
    let mut waiting = numbered(1);
    waiting
        .headers
        .insert("expiration", HeaderValue::Int(1_000));
    let publisher = {
        let driver = driver.clone();
        tokio::spawn(async move { driver.publish(&id(), waiting).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await; // paused clock
    assert!(!publisher.is_finished(), "the queue had room");
    let mut sub = driver
        .consume(&id(), ConsumeOptions::default())
        .await
        .unwrap();
    let filler = next(&mut sub).await;
    assert_eq!(number_of(&filler), 0);
    filler.ack().await.unwrap();
    publisher
        .await
        .unwrap()
        .expect("the waiting publish got in");
    let d = next(&mut sub).await;
    assert_eq!(number_of(&d), 1);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn info_counts_delayed_messages() {
    let driver = MemoryDriver::new();
    driver.declare(&QueueSpec::new(id())).await.unwrap();
    let mut later = numbered(1);
    later.headers = Headers::from_pairs([("delay", HeaderValue::Int(60_000))]);
    driver.publish(&id(), later).await.unwrap();
    let info = driver.info(&id()).await.unwrap();
    assert_eq!((info.ready, info.delayed), (Some(0), Some(1)));
    assert_eq!(info.message_count(), Some(1));
}

#[tokio::test]
async fn closing_ends_consumers_and_refuses_publishes() {
    let driver = MemoryDriver::new();
    driver.declare(&QueueSpec::new(id())).await.unwrap();
    let mut sub = driver
        .consume(&id(), ConsumeOptions::default())
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { sub.next().await.is_none() });
    driver.close().await.unwrap();
    assert!(
        within("the waiting consumer", waiting)
            .await
            .expect("the consumer does not panic"),
        "a waiting consumer ends when the driver closes"
    );
    assert_eq!(
        driver.publish(&id(), numbered(1)).await.unwrap_err().kind(),
        ErrorKind::Canceled
    );
    // A declaration too: it succeeded, and made a queue no call could reach.
    let other = QueueSpec::new(QueueId::parse("app:later").unwrap());
    assert_eq!(
        driver.declare(&other).await.unwrap_err().kind(),
        ErrorKind::Canceled
    );
}

/// A consumer held at its prefetch, waiting for one of its deliveries to be settled,
/// ends at a close too: it waited for the settlement, which an embedder that waits
/// for the consume loop to end before settling never makes (review).
#[tokio::test]
async fn a_consumer_held_at_its_prefetch_ends_when_the_driver_closes() {
    let driver = MemoryDriver::new();
    driver.declare(&QueueSpec::new(id())).await.unwrap();
    driver.publish(&id(), numbered(1)).await.unwrap();
    driver.publish(&id(), numbered(2)).await.unwrap();
    let mut sub = driver
        .consume(&id(), ConsumeOptions { prefetch: 1 })
        .await
        .unwrap();
    let held = within("the first delivery", sub.next())
        .await
        .unwrap()
        .unwrap();
    let waiting = tokio::spawn(async move { sub.next().await.is_none() });
    // On this test's one thread, the yield runs the consumer until it waits; closed
    // before, it would see the close at once and prove nothing.
    tokio::task::yield_now().await;
    assert!(
        !waiting.is_finished(),
        "the consumer is held at its prefetch"
    );
    driver.close().await.unwrap();
    assert!(
        within("the consumer held at its prefetch", waiting)
            .await
            .expect("the consumer does not panic"),
        "a consumer held at its prefetch ends when the driver closes"
    );
    drop(held);
}

#[tokio::test]
async fn redeclaring_with_other_options_is_already_exists() {
    let driver = MemoryDriver::new();
    driver
        .declare(&QueueSpec::new(id()).with_max_priority(5))
        .await
        .unwrap();
    let err = driver
        .declare(&QueueSpec::new(id()).with_max_priority(9))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
}

#[tokio::test]
async fn a_batch_larger_than_the_room_keeps_its_order_as_consumers_make_room() {
    let driver = MemoryDriver::new();
    driver
        .declare(&QueueSpec::new(id()).with_max_length(3))
        .await
        .unwrap();
    let publisher = {
        let driver = driver.clone();
        tokio::spawn(async move {
            driver
                .publish_batch(&id(), (0..10).map(numbered).collect())
                .await
        })
    };
    let mut sub = driver
        .consume(&id(), ConsumeOptions { prefetch: 1 })
        .await
        .unwrap();
    for expected in 0..10 {
        let delivery = next(&mut sub).await;
        assert_eq!(number_of(&delivery), expected);
        delivery.ack().await.unwrap();
    }
    within("the batch publish", publisher)
        .await
        .expect("the publisher does not panic")
        .unwrap();
}

#[tokio::test]
async fn a_batch_with_one_bad_header_queues_nothing() {
    let driver = MemoryDriver::new();
    driver.declare(&QueueSpec::new(id())).await.unwrap();
    let mut bad = numbered(2);
    bad.headers = Headers::from_pairs([("priority", HeaderValue::from("urgent"))]);
    let batch = vec![numbered(1), bad, numbered(3)];
    let err = driver.publish_batch(&id(), batch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    assert_eq!(driver.info(&id()).await.unwrap().ready, Some(0));
}

/// `Duration::MAX` is how Rust writes "wait for ever"; the driver built without the
/// configuration's checks took it, then every publish panicked adding it to now.
#[tokio::test]
async fn the_longest_durations_wait_for_ever_instead_of_panicking() {
    let driver = MemoryDriver::with_config(MemoryConfig {
        publish_timeout: Duration::MAX,
        ..MemoryConfig::default()
    });
    let spec = QueueSpec::new(id()).with_message_ttl(Duration::MAX);
    driver.declare(&spec).await.unwrap();
    within(
        "a publish to a queue with room",
        driver.publish(&id(), numbered(1)),
    )
    .await
    .unwrap();
    assert_eq!(take_one(&driver).await, 1);
}

/// A batch that fails part way says how far it got: before, the first messages were
/// queued and the error said nothing of them, so a caller that retried the batch
/// published them twice.
#[tokio::test]
async fn a_batch_that_fails_part_way_says_how_many_were_published() {
    let driver = driver_with_full_queue(1, Duration::from_millis(50)).await;
    let mut sub = driver
        .consume(&id(), ConsumeOptions::default())
        .await
        .unwrap();
    let first = next(&mut sub).await;
    first.ack().await.unwrap();
    let batch = vec![numbered(10), numbered(11), numbered(12)];
    drop(sub);
    let err = driver.publish_batch(&id(), batch).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    let detail = |key: &str| err.details().get(key).cloned();
    assert_eq!(detail("confirmed").as_deref(), Some("1"), "{err}");
    assert_eq!(detail("batch_size").as_deref(), Some("3"), "{err}");
    assert_eq!(driver.info(&id()).await.unwrap().ready, Some(1));
}
