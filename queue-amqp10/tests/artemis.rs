//! What only ActiveMQ Artemis shows, on the shared instance (`cargo xtask brokers up`
//! starts it on 6672): its management requests, which `info` reads queue counts with.

mod support;

use std::time::Duration;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::{ConsumeOptions, Driver, HeaderValue, Headers, Message, QueueId, QueueSpec};
use queue_testkit::next;

/// A driver on the shared Artemis.
async fn artemis() -> Amqp10Driver {
    let url = queue_fixtures::artemis::shared_url();
    Amqp10Driver::connect(Amqp10Config::new(url, Profile::Artemis))
        .await
        .unwrap()
}

/// Publishes `count` one-digit text messages to `queue`.
async fn publish_digits(driver: &Amqp10Driver, queue: &QueueId, count: u8) {
    for n in 0..count {
        let message = Message::from_bytes(vec![b'0' + n], Default::default(), "text/plain");
        driver.publish(queue, message).await.unwrap();
    }
}

async fn declared(driver: &Amqp10Driver, what: &str) -> QueueId {
    let name = format!("amqp10-tests-{what}-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    driver.declare(&queue_spec(&id)).await.unwrap();
    id
}

/// A count read cut off after its request went out (a signal ending `--exit-when-idle`
/// mid-read, the summary's time limit) left the broker's reply on the management link,
/// and the next read took it for its own: another queue's counts, or another count.
/// Each read of one queue's counts, cut at a different point, is followed by a read
/// of another queue's, which must be that queue's.
async fn a_count_read_cut_off_leaves_no_reply_for_the_next() {
    let driver = artemis().await;
    let (busy, empty) = (
        declared(&driver, "busy").await,
        declared(&driver, "empty").await,
    );
    publish_digits(&driver, &busy, 3).await;
    // A consumer holding one: every count of `busy` differs from `empty`'s zeros.
    let mut subscription = driver
        .consume(&busy, ConsumeOptions { prefetch: 1 })
        .await
        .unwrap();
    let held = queue_testkit::next(&mut subscription).await;
    let counts = |q: &queue_core::QueueInfo| (q.ready, q.in_flight, q.delayed, q.consumers);
    let busy_counts = counts(&driver.info(&busy).await.unwrap());
    assert_eq!(busy_counts, (Some(2), Some(1), Some(0), Some(1)));
    for step in 0..80u64 {
        let cut = Duration::from_micros(100 * step);
        let _ = tokio::time::timeout(cut, driver.info(&busy)).await;
        let read = counts(&driver.info(&empty).await.unwrap());
        assert_eq!(
            read,
            (Some(0), Some(0), Some(0), Some(0)),
            "a read of another queue cut after {cut:?}"
        );
    }
    held.ack().await.unwrap();
    subscription.cancel().await.unwrap();
    driver.close().await.unwrap();
}

/// A close while publishes wait for their outcome closed the connection first, so
/// a publish the broker had accepted was reported failed ("link lost ... publish
/// again"), and publishing again made a duplicate. Every publish that failed must be
/// missing from the queue: the queue holds exactly the publishes reported done.
async fn publishes_waiting_at_a_close_get_their_real_outcome() {
    let driver = std::sync::Arc::new(artemis().await);
    let queue = declared(&driver, "closing").await;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let publishes: Vec<_> = (0..500)
        .map(|n: u32| {
            let (driver, queue, done) = (
                std::sync::Arc::clone(&driver),
                queue.clone(),
                done_tx.clone(),
            );
            tokio::spawn(async move {
                let body = n.to_string().into_bytes();
                let message = Message::from_bytes(body, Default::default(), "text/plain");
                let published = driver.publish(&queue, message).await;
                let _ = done.send(published.is_ok());
                published
            })
        })
        .collect();
    // Closed once the first is confirmed: the others are being sent or wait.
    while !queue_testkit::within("a first confirm", done_rx.recv())
        .await
        .unwrap_or(true)
    {}
    driver.close().await.unwrap();
    let mut confirmed = 0u64;
    for publish in publishes {
        if publish.await.unwrap().is_ok() {
            confirmed += 1;
        }
    }
    // Afterwards, a call says the driver is closed, not that its queue is unknown.
    let message = Message::from_bytes(b"late".to_vec(), Default::default(), "text/plain");
    let late = driver.publish(&queue, message).await.unwrap_err();
    assert_eq!(late.kind(), queue_core::ErrorKind::Canceled, "{late}");
    let counter = artemis().await;
    counter.declare(&queue_spec(&queue)).await.unwrap();
    let held = counter.info(&queue).await.unwrap().message_count();
    let held = held.expect("Artemis counts its queues");
    assert_eq!(
        held, confirmed,
        "the queue holds {held}, {confirmed} were confirmed"
    );
    counter.close().await.unwrap();
}

/// Deliveries a subscription had taken ahead when its driver closed went back to the
/// broker with the close, but `next()` still handed them out: a handler ran a message
/// another consumer may have, and its ack failed.
async fn next_after_a_close_hands_out_nothing_taken_ahead() {
    let driver = artemis().await;
    let queue = declared(&driver, "taken-ahead").await;
    publish_digits(&driver, &queue, 5).await;
    let mut subscription = driver
        .consume(&queue, ConsumeOptions { prefetch: 5 })
        .await
        .unwrap();
    let held = queue_testkit::next(&mut subscription).await;
    // No signal says the other four arrived: the broker's count in flight does.
    queue_testkit::within("the other four taken ahead", async {
        while driver.info(&queue).await.unwrap().in_flight != Some(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    driver.close().await.unwrap();
    let next = queue_testkit::within("next after close", subscription.next()).await;
    assert!(
        next.is_none(),
        "handed out after the close: {:?}",
        next.map(|d| d.map(|d| d.message().id.clone()))
    );
    drop(held);
}

fn queue_spec(queue: &QueueId) -> QueueSpec {
    QueueSpec::new(queue.clone())
        .with_name(queue.name())
        .with_durable(false)
}

/// The management links are attached by the first count read that needs them, and
/// fe2o3-amqp starts their session's task on the runtime of that read: in the
/// runtime, a handler's `queue.info` on a Lua worker (a single-threaded runtime of
/// its own). When that worker ended, the session went with it, and the next count
/// (the exit summary's, say) failed. Sessions are now begun on the runtime the
/// driver was connected on: here another runtime reads first and ends.
async fn a_session_begun_for_another_runtime_outlives_it() {
    let driver = std::sync::Arc::new(artemis().await);
    let queue = declared(&driver, "elsewhere").await;
    publish_digits(&driver, &queue, 1).await;
    let side = {
        let driver = std::sync::Arc::clone(&driver);
        let queue = queue.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime of its own");
            runtime.block_on(async { driver.info(&queue).await.map(|i| i.ready) })
        })
    };
    let read = queue_testkit::within(
        "the other runtime's count",
        tokio::task::spawn_blocking(move || side.join()),
    )
    .await
    .expect("the join")
    .expect("the other runtime's thread");
    assert_eq!(read.expect("a count from the other runtime"), Some(1));
    // That runtime is gone, with every task it ran.
    let info = queue_testkit::within("a count after the other runtime ended", driver.info(&queue))
        .await
        .expect("the session lived on the other runtime");
    assert_eq!(info.ready, Some(1));
}

/// A delivery larger than `max_message_size`, as on RabbitMQ (`broker.rs`).
async fn a_delivery_over_max_message_size_is_refused_and_reattaches_back_off() {
    let url = queue_fixtures::artemis::shared_url();
    support::a_delivery_over_max_message_size_is_refused(url, Profile::Artemis).await;
}

/// More links than fe2o3-amqp's default `channel_max` allows sessions, on one
/// connection, as on RabbitMQ (`broker.rs`).
async fn links_past_fe2o3s_default_channel_max_share_one_connection() {
    let url = queue_fixtures::artemis::shared_url();
    support::links_past_fe2o3s_default_channel_max_share_one_connection(url, Profile::Artemis)
        .await;
}

/// Artemis drops a message whose `_AMQ_DUPL_ID` (the duplicate-detection id a JMS or
/// core client sets) it has seen on the address, and accepts it all the same. The
/// runtime's retry copy of such a message carried the original's properties: it was
/// confirmed, the original acked, and the copy never stored (review). Artemis' own
/// `_AMQ_` properties are its bookkeeping: not shown to handlers, so never copied.
async fn a_retry_copy_of_a_message_with_a_duplicate_id_is_stored() {
    let driver = artemis().await;
    let id = declared(&driver, "duplicate-id").await;
    let headers = Headers::from_pairs([("_AMQ_DUPL_ID", HeaderValue::from("order-42"))]);
    let message = Message::from_bytes(b"1".to_vec(), headers, "text/plain");
    driver.publish(&id, message).await.unwrap();
    let mut sub = driver
        .consume(&id, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let delivery = next(&mut sub).await;
    assert!(
        !delivery.message().headers.contains("_AMQ_DUPL_ID"),
        "{:?}",
        delivery.message().headers
    );
    // The copy as the runtime's failure path makes it.
    let mut copy = delivery.message().clone();
    copy.make_republishable_noting();
    copy.headers.insert("attempts", HeaderValue::Int(2));
    driver.publish(&id, copy).await.unwrap();
    delivery.ack().await.unwrap();
    let again = next(&mut sub).await;
    assert_eq!(again.message().headers.attempts(), 2);
    again.ack().await.unwrap();
    sub.cancel().await.unwrap();
    driver.close().await.unwrap();
}

queue_testkit::broker_tests! {
    unavailable: queue_fixtures::artemis::shared_unavailable();
    async: [
        a_delivery_over_max_message_size_is_refused_and_reattaches_back_off,
        a_session_begun_for_another_runtime_outlives_it,
        a_count_read_cut_off_leaves_no_reply_for_the_next,
        publishes_waiting_at_a_close_get_their_real_outcome,
        next_after_a_close_hands_out_nothing_taken_ahead,
        links_past_fe2o3s_default_channel_max_share_one_connection,
        a_retry_copy_of_a_message_with_a_duplicate_id_is_stored,
    ];
    sync: [];
}
