//! Reconnecting, beyond the shared fault suite: a consumer resumes by itself after a
//! cut and a restart, a delivery held across a cut says it is lost, and a subscription re-attached on a caller's short-lived runtime
//! still cancels. On private RabbitMQ nodes (never the shared node; always stopped).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use queue_amqp091::{Amqp091Config, Amqp091Driver};
use queue_core::retry::{Disposition, Exhausted, FailurePath, RetryPolicy};
use queue_core::{Backoff, ConsumeOptions, Driver, ErrorKind, QueueId, QueueSpec, Subscription};
use queue_fixtures::rabbitmq::PrivateNode;
use queue_testkit::{number_of, numbered};

/// Runs a blocking `rabbitmqctl` step without stalling the driver's tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn config(node: &PrivateNode) -> Amqp091Config {
    let mut c = Amqp091Config::new(node.amqp091_url());
    c.connection_name = Some("amqp091-reconnect".into());
    c.reconnect_delay = Duration::from_millis(200);
    c.reconnect_max_delay = Duration::from_secs(2);
    c.publish_timeout = Duration::from_secs(10);
    c
}

/// Connections the driver has opened so far.
fn connections(driver: &Amqp091Driver) -> u64 {
    driver.connection().map_or(0, |c| c.connections_opened)
}

async fn a_consumer_resumes_by_itself_after_both_faults() {
    let mut node = blocking(PrivateNode::start).expect("a private node");
    let mut c = config(&node);
    c.publish_timeout = Duration::from_secs(1);
    let driver = Amqp091Driver::connect(c).await.expect("connect");
    let id = QueueId::new("faults", "resume").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();

    let mut next_n = 0;
    let mut round = |label: &'static str| {
        let first = next_n;
        next_n += 50;
        (label, first..first + 50)
    };
    async fn publish_until_ok(driver: &Amqp091Driver, id: &QueueId, n: i64) {
        // Right after a fault the reconnect may still be under way.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match driver.publish(id, numbered(n)).await {
                Ok(()) => return,
                Err(e) if e.retryable() && tokio::time::Instant::now() < deadline => continue,
                Err(e) => panic!("publish {n}: {e}"),
            }
        }
    }
    async fn consume_all(
        sub: &mut Box<dyn queue_core::Subscription>,
        range: std::ops::Range<i64>,
        label: &str,
    ) {
        let mut want: HashSet<i64> = range.collect();
        while !want.is_empty() {
            let d = tokio::time::timeout(Duration::from_secs(60), sub.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("{label}: the consumer did not resume; still missing {want:?}")
                })
                .expect("subscription open")
                .expect("delivery");
            want.remove(&number_of(&d));
            let _ = d.ack().await;
        }
    }

    let (label, range) = round("before any fault");
    for n in range.clone() {
        publish_until_ok(&driver, &id, n).await;
    }
    consume_all(&mut sub, range, label).await;

    blocking(|| node.close_all_connections());
    let (label, range) = round("after close_all_connections");
    for n in range.clone() {
        publish_until_ok(&driver, &id, n).await;
    }
    consume_all(&mut sub, range, label).await;

    blocking(|| node.stop_app());
    // While the broker is down, a publish waits publish_timeout, then fails retryable.
    let err = driver.publish(&id, numbered(-1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.retryable(), "{err}");
    assert!(!err.to_string().contains("guest:guest"), "{err}");
    blocking(|| node.start_app());
    let (label, range) = round("after stop_app/start_app");
    for n in range.clone() {
        publish_until_ok(&driver, &id, n).await;
    }
    consume_all(&mut sub, range, label).await;
    // Two connections (publishing, consuming), each reconnected after both faults.
    assert!(
        connections(&driver) >= 6,
        "two reconnects of each connection expected"
    );
    sub.cancel().await.unwrap();
    driver.close().await.unwrap();
}

/// The queue runtime's workers each drive a subscription from a current-thread runtime
/// of their own, which ends when the worker stops. A subscription that re-attached
/// inside `next()` there (after a connection loss) must still cancel afterwards: its
/// ack flusher and channel close live on the driver's runtime, not the caller's.
async fn a_subscription_reattached_on_a_callers_runtime_still_cancels() {
    let node = blocking(PrivateNode::start).expect("a private node");
    let driver = Arc::new(
        Amqp091Driver::connect(config(&node))
            .await
            .expect("connect"),
    );
    let id = QueueId::new("faults", "worker-runtime").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let sub = driver.consume(&id, Default::default()).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();

    let (consumed_first, first) = std::sync::mpsc::channel::<()>();
    let (fault_done_tx, fault_done) = std::sync::mpsc::channel::<()>();
    // The worker hands its subscription back on a channel, not by join: a worker stuck
    // in next() fails the test at the time limit instead of hanging it.
    let (ended_tx, ended) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("worker runtime");
        let sub = rt.block_on(async move {
            let mut sub = sub;
            let d = sub.next().await.expect("open").expect("delivery");
            d.ack().await.expect("ack");
            consumed_first.send(()).expect("main waits");
            fault_done.recv().expect("main signals");
            // After the fault: this next() re-attaches on the new connection, here.
            loop {
                let d = tokio::time::timeout(Duration::from_secs(60), sub.next())
                    .await
                    .expect("a delivery after the reconnect")
                    .expect("open")
                    .expect("delivery");
                let n = number_of(&d);
                d.ack().await.expect("ack");
                if n == 2 {
                    return sub;
                }
            }
        });
        // The worker's runtime ends here, with whatever was spawned on it.
        drop(rt);
        // Fails only when the main thread gave up waiting: nothing left to tell.
        let _ = ended_tx.send(sub);
    });
    blocking(|| first.recv_timeout(Duration::from_secs(60)))
        .expect("the worker consumed the first message");
    let generation = connections(&driver);
    blocking(|| node.close_all_connections());
    fault_done_tx.send(()).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match driver.publish(&id, numbered(2)).await {
            Ok(()) => break,
            Err(e) if e.retryable() && tokio::time::Instant::now() < deadline => continue,
            Err(e) => panic!("publish after the fault: {e}"),
        }
    }
    let sub = blocking(|| ended.recv_timeout(Duration::from_secs(120)))
        .expect("the worker ends with its subscription (it panicked if disconnected)");
    // It has sent its last value: the join is immediate, and shows a panic if any.
    blocking(|| worker.join()).expect("worker thread");
    assert!(connections(&driver) > generation, "no reconnect");
    tokio::time::timeout(Duration::from_secs(10), sub.cancel())
        .await
        .expect("cancel finishes after the caller's runtime is gone")
        .expect("cancel");
    tokio::time::timeout(Duration::from_secs(10), driver.close())
        .await
        .expect("close finishes")
        .expect("close");
}

/// During a resource alarm RabbitMQ stops reading from every connection that
/// publishes, and lapin then writes nothing on it: consumers on the publishing
/// connection could not ack, and the backlog that raised the alarm could not drain.
/// Consumers have a connection of their own, so their acks reach the broker while a
/// publish waits out the alarm, and a cancel finishes.
async fn consumers_ack_through_a_resource_alarm() {
    let node = blocking(PrivateNode::start).expect("a private node");
    let mut c = config(&node);
    c.publish_timeout = Duration::from_secs(2);
    let driver = Amqp091Driver::connect(c).await.expect("connect");
    let id = QueueId::new("faults", "alarm").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    for n in 0..3 {
        driver.publish(&id, numbered(n)).await.unwrap();
    }
    let mut sub = driver
        .consume(&id, queue_core::ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    blocking(|| node.ctl(&["set_vm_memory_high_watermark", "0.00001"]));
    // The alarm landed: a publish is not confirmed while it lasts.
    let refused = driver.publish(&id, numbered(99)).await.unwrap_err();
    assert!(refused.retryable(), "{refused}");
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a delivery within 10 s")
            .expect("open")
            .expect("a delivery");
        delivery.ack().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(15), sub.cancel())
        .await
        .expect("the cancel finished")
        .unwrap();
    // The acks reached the broker: nothing of the three is unacknowledged or back.
    let counts = blocking(|| {
        node.ctl(&[
            "-q",
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
    });
    let line = counts
        .lines()
        .find(|l| l.starts_with("faults:alarm"))
        .unwrap_or_else(|| panic!("no faults:alarm in {counts}"));
    let numbers: Vec<&str> = line.split_whitespace().skip(1).collect();
    assert_eq!(numbers, ["0", "0"], "ready, unacked: {line}");
    blocking(|| node.ctl(&["set_vm_memory_high_watermark", "0.4"]));
    driver.close().await.unwrap();
}

/// A delivery whose connection is lost while its handler runs says so
/// (`Delivery::is_lost`), and its failure then publishes no copy: RabbitMQ delivers it
/// again, and a retry copy beside that redelivery was one duplicate per loss.
async fn a_delivery_held_across_a_cut_says_it_is_lost() {
    let node = blocking(PrivateNode::start).expect("a private node");
    let driver = Arc::new(
        Amqp091Driver::connect(config(&node))
            .await
            .expect("connect"),
    );
    let id = QueueId::new("faults", "lost").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();
    let mut sub = driver
        .consume(&id, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    async fn next(sub: &mut Box<dyn Subscription>) -> queue_core::Delivery {
        tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .expect("a delivery within 60 s")
            .expect("subscription open")
            .expect("a delivery")
    }
    let held = next(&mut sub).await;
    assert!(!held.is_lost(), "nothing happened to its connection yet");

    blocking(|| node.close_all_connections());
    // The redelivery shows the cut landed: the broker took the held delivery back.
    let again = next(&mut sub).await;
    assert_eq!(number_of(&again), 1);
    assert!(held.is_lost(), "the held delivery's connection is gone");
    assert!(!again.is_lost());

    let (_stop, stop) = tokio::sync::watch::channel(false);
    let path = FailurePath {
        queue: id.clone(),
        driver: driver.clone(),
        retry: RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_secs(30), 2.0, Duration::from_secs(60)),
        },
        exhausted: Exhausted::Drop,
        is_dead_letter_queue: false,
        stop,
    };
    assert_eq!(
        path.fail(&held, "boom").await.unwrap(),
        Disposition::Returned
    );
    // No retry copy waits in a delay queue beside the redelivery.
    let info = driver.info(&id).await.unwrap();
    assert_eq!(info.ready, Some(0), "{info:?}");
    assert_eq!(info.delayed.unwrap_or(0), 0, "{info:?}");
    again.ack().await.unwrap();
    sub.cancel().await.unwrap();
    driver.close().await.unwrap();
}

/// Deliveries lapin had buffered when their channel died were handed out after it,
/// already lost (RabbitMQ had taken them back), so that their handlers ran and the
/// messages came again; and an ack of a delivery whose channel had died said `Ok`
/// until the subscription next looked, though no ack could reach the broker (review).
/// Over five cuts, each with 19 deliveries waiting in lapin's buffer: no delivery is
/// handed out lost, each held one's ack fails, and all 20 messages are there at the end.
async fn deliveries_buffered_on_a_dead_channel_are_not_handed_out() {
    let node = blocking(PrivateNode::start).expect("a private node");
    let driver = Amqp091Driver::connect(config(&node))
        .await
        .expect("connect");
    let id = QueueId::new("faults", "buffered").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    for n in 1..=20 {
        driver.publish(&id, numbered(n)).await.unwrap();
    }
    let mut sub = driver
        .consume(&id, ConsumeOptions { prefetch: 20 })
        .await
        .unwrap();
    let mut held = queue_testkit::next(&mut sub).await;
    for cut in 1..=5 {
        // Every message is out to the consumer: the rest wait in lapin's buffer.
        queue_testkit::within("all 20 out to the consumer", async {
            while driver.info(&id).await.unwrap().ready != Some(0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        blocking(|| node.close_all_connections());
        queue_testkit::within("the held delivery's channel closing", async {
            while !held.is_lost() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let err = held
            .ack()
            .await
            .expect_err("an ack on a channel that is gone");
        assert_eq!(err.kind(), ErrorKind::Internal, "cut {cut}: {err}");
        held = queue_testkit::next(&mut sub).await;
        assert!(
            !held.is_lost(),
            "cut {cut}: message {} handed out from the dead channel",
            number_of(&held)
        );
    }
    let mut seen = HashSet::new();
    loop {
        assert!(!held.is_lost(), "message {} lost", number_of(&held));
        seen.insert(number_of(&held));
        held.ack().await.unwrap();
        if seen.len() == 20 {
            break;
        }
        held = queue_testkit::next(&mut sub).await;
    }
    sub.cancel().await.unwrap();
    driver.close().await.unwrap();
}

/// Publishes during a resource alarm are not handed to lapin, which writes nothing
/// on a connection the broker blocks: it kept each one's frames after the publish
/// timed out, its confirm window slot given to the next, so that its memory grew by a
/// window of messages per `publish_timeout` for as long as the alarm lasted, and it
/// wrote every one once the alarm ended: a duplicate of each publish retried
/// meanwhile (review). They fail "not sent", and the queue gets none of them.
async fn publishes_during_a_resource_alarm_are_not_sent_later() {
    let node = blocking(PrivateNode::start).expect("a private node");
    let mut c = config(&node);
    c.publish_timeout = Duration::from_secs(1);
    c.confirm_window = 2;
    let driver = Amqp091Driver::connect(c).await.expect("connect");
    let id = QueueId::new("faults", "alarm-later").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    driver.publish(&id, numbered(0)).await.unwrap();
    blocking(|| node.ctl(&["set_vm_memory_high_watermark", "0.00001"]));
    // The first publish after the alarm may be written before the broker says it
    // blocks the connection; the broker reads it once the alarm ends.
    let mut last = None;
    for n in 1..=12 {
        last = Some(driver.publish(&id, numbered(n)).await.unwrap_err());
    }
    let last = last.expect("twelve publishes");
    assert!(last.retryable(), "{last}");
    assert!(last.message().contains("blocks publishing"), "{last}");
    blocking(|| node.ctl(&["set_vm_memory_high_watermark", "0.4"]));
    queue_testkit::within("a publish once the alarm ended", async {
        while driver.publish(&id, numbered(100)).await.is_err() {}
    })
    .await;
    let stored = blocking(|| node.queue_messages())
        .into_iter()
        .find(|(queue, _)| queue == "faults:alarm-later")
        .map(|(_, count)| count);
    // 0, 100, and at most the first publish of the alarm.
    assert!(
        stored.is_some_and(|n| (2..=3).contains(&n)),
        "stored {stored:?}: publishes given up during the alarm were written after it"
    );
    driver.close().await.unwrap();
}

queue_testkit::broker_tests! {
    unavailable: PrivateNode::unavailable();
    async: [
        a_delivery_held_across_a_cut_says_it_is_lost,
        deliveries_buffered_on_a_dead_channel_are_not_handed_out,
        a_consumer_resumes_by_itself_after_both_faults,
        a_subscription_reattached_on_a_callers_runtime_still_cancels,
        consumers_ack_through_a_resource_alarm,
        publishes_during_a_resource_alarm_are_not_sent_later,
    ];
    sync: [];
}
