//! Fault tests: connection loss under load, against a PRIVATE RabbitMQ node the
//! harness (`queue_core::testkit::rabbitmq::PrivateNode`) starts on its own ports and
//! data directory (never the shared 5672 node), one at a time, and always stops.
//!
//! Each load test prints `published / confirmed / consumed / duplicates / lost`,
//! counted here from what the driver returned and delivered.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use queue_amqp091::{AmqpConfig, AmqpDriver};
use queue_core::testkit::rabbitmq::PrivateNode;
use queue_core::testkit::{Tally, number_of, numbered};
use queue_core::{Driver, ErrorKind, QueueId, QueueSpec};

/// Runs a blocking `rabbitmqctl` step without stalling the driver's tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn config(node: &PrivateNode) -> AmqpConfig {
    let mut c = AmqpConfig::new(node.amqp091_url());
    c.connection_name = Some("amqp091-faults".into());
    c.reconnect_delay = Duration::from_millis(200);
    c.reconnect_max_delay = Duration::from_secs(2);
    c.publish_timeout = Duration::from_secs(10);
    c.confirm_window = 500;
    c
}

const TOTAL: i64 = 20_000;
const PUBLISHERS: i64 = 16;

/// What strikes once 1,000 of the 20,000 publishes are confirmed.
#[derive(Debug, Clone, Copy)]
enum Fault {
    CloseAllConnections,
    StopAppStartApp,
}

/// 20,000 confirmed publishes from 16 tasks and a running consumer; `fault` strikes
/// once 1,000 are confirmed. Every publish that returned Ok must be consumed at least
/// once.
async fn survive(label: &str, node: &mut PrivateNode, fault: Fault) {
    let driver = Arc::new(AmqpDriver::connect(config(node)).await.expect("connect"));
    let id = QueueId::new("faults", label).unwrap();
    // Durable queue, persistent messages: they survive stop_app / start_app.
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let tally = Arc::new(Tally::new());
    let ack_failures = Arc::new(AtomicU64::new(0));

    let mut sub = driver
        .consume(&id, queue_core::ConsumeOptions { prefetch: 200 })
        .await
        .unwrap();
    let consumer = {
        let (tally, ack_failures) = (Arc::clone(&tally), Arc::clone(&ack_failures));
        tokio::spawn(async move {
            while let Some(next) = sub.next().await {
                let Ok(d) = next else { continue };
                tally.consumed(number_of(&d));
                // An ack lost with the connection: the broker delivers the message again.
                if d.ack().await.is_err() {
                    ack_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (driver, id, tally) = (Arc::clone(&driver), id.clone(), Arc::clone(&tally));
        publishers.push(tokio::spawn(async move {
            let mut n = p;
            while n < TOTAL {
                tally.publishing(n);
                match driver.publish(&id, numbered(n)).await {
                    Ok(()) => {
                        tally.confirmed(n);
                        n += PUBLISHERS;
                    }
                    Err(e) => {
                        assert_eq!(e.kind(), ErrorKind::Internal, "{e}");
                        assert!(e.retryable(), "{e}");
                        tally.publish_failed();
                    }
                }
            }
        }));
    }

    assert!(
        tally.wait_confirmed(1_000, Duration::from_secs(120)).await,
        "{label}: 1,000 publishes were not confirmed within 120 s"
    );
    let generation_before = driver.connection_generation();
    match fault {
        Fault::CloseAllConnections => blocking(|| node.close_all_connections()),
        Fault::StopAppStartApp => blocking(|| node.stop_app_then_start(Duration::from_secs(2))),
    }
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(300), p)
            .await
            .expect("publishers finish")
            .expect("publisher task");
    }
    let generation_after_publishing = driver.connection_generation();
    assert!(
        generation_after_publishing > generation_before,
        "{label}: the fault did not strike while publishing (generation {generation_before} -> {generation_after_publishing})"
    );
    assert_eq!(tally.confirmed_count(), TOTAL as usize);
    let all_seen = tally.wait_all_consumed(Duration::from_secs(180)).await;
    let counts = tally.counts();
    println!(
        "{label} (amqp091 x RabbitMQ): {counts}; {} failed acks, {} connections",
        ack_failures.load(Ordering::Relaxed),
        driver.connection_generation(),
    );
    let missing = tally.missing();
    assert!(
        all_seen && missing.is_empty() && counts.lost == 0,
        "{label}: {} confirmed messages never consumed, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    consumer.abort();
    driver.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_all_connections_under_load_loses_no_confirmed_message() {
    let test = "close_all_connections_under_load_loses_no_confirmed_message";
    let Some(mut node) = blocking(|| PrivateNode::start_or_skip(test)) else {
        return;
    };
    survive("close-all", &mut node, Fault::CloseAllConnections).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_app_start_app_under_load_loses_no_confirmed_message() {
    let test = "stop_app_start_app_under_load_loses_no_confirmed_message";
    let Some(mut node) = blocking(|| PrivateNode::start_or_skip(test)) else {
        return;
    };
    survive("stop-start", &mut node, Fault::StopAppStartApp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_by_itself_after_both_faults() {
    let test = "a_consumer_resumes_by_itself_after_both_faults";
    let Some(mut node) = blocking(|| PrivateNode::start_or_skip(test)) else {
        return;
    };
    let mut c = config(&node);
    c.publish_timeout = Duration::from_secs(1);
    let driver = AmqpDriver::connect(c).await.expect("connect");
    let id = QueueId::new("faults", "resume").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let mut sub = driver.consume(&id, Default::default()).await.unwrap();

    let mut next_n = 0;
    let mut round = |label: &'static str| {
        let first = next_n;
        next_n += 50;
        (label, first..first + 50)
    };
    async fn publish_until_ok(driver: &AmqpDriver, id: &QueueId, n: i64) {
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
    assert!(
        driver.connection_generation() >= 3,
        "two reconnects expected"
    );
    sub.cancel().await.unwrap();
    driver.close().await.unwrap();
}

/// The queue runtime's workers each drive a subscription from a current-thread runtime
/// of their own, which ends when the worker stops. A subscription that re-attached
/// inside `next()` there (after a connection loss) must still cancel afterwards: its
/// ack flusher and channel close live on the driver's runtime, not the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_reattached_on_a_callers_runtime_still_cancels() {
    let test = "a_subscription_reattached_on_a_callers_runtime_still_cancels";
    let Some(node) = blocking(|| PrivateNode::start_or_skip(test)) else {
        return;
    };
    let driver = Arc::new(AmqpDriver::connect(config(&node)).await.expect("connect"));
    let id = QueueId::new("faults", "worker-runtime").unwrap();
    driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
    let sub = driver.consume(&id, Default::default()).await.unwrap();
    driver.publish(&id, numbered(1)).await.unwrap();

    let (consumed_first, first) = std::sync::mpsc::channel::<()>();
    let (fault_done_tx, fault_done) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("worker runtime");
        rt.block_on(async move {
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
        })
        // The worker's runtime ends here, with whatever was spawned on it.
    });
    blocking(|| first.recv_timeout(Duration::from_secs(60)))
        .expect("the worker consumed the first message");
    let generation = driver.connection_generation();
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
    let sub = blocking(|| worker.join()).expect("worker thread");
    assert!(driver.connection_generation() > generation, "no reconnect");
    tokio::time::timeout(Duration::from_secs(10), sub.cancel())
        .await
        .expect("cancel finishes after the caller's runtime is gone")
        .expect("cancel");
    tokio::time::timeout(Duration::from_secs(10), driver.close())
        .await
        .expect("close finishes")
        .expect("close");
}
