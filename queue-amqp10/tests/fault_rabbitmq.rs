//! Connection loss in the middle of confirmed sends with a running receiver, on
//! a PRIVATE RabbitMQ node (`queue_core::testkit::rabbitmq::PrivateNode`: its own port
//! and data directory, always stopped): every send that returned `Ok` is received at
//! least once. Each case prints `published / confirmed / consumed / duplicates / lost`,
//! counted here from what the driver returned and delivered.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::testkit::rabbitmq::PrivateNode;
use queue_core::testkit::{Tally, number_of, numbered};
use queue_core::{ConsumeOptions, Driver, QueueId, QueueSpec};

/// Sends in flight at once.
const WINDOW: usize = 500;
/// The fault strikes once this many sends are confirmed...
const STRIKE_AT: usize = 2_000;
/// ...and the publisher keeps going until it has struck, then sends this many more, so
/// the fault always lands in the middle of the load however fast the sends are.
const AFTER_FAULT: i64 = 5_000;

/// Runs a blocking `rabbitmqctl` step without stalling the driver's tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    CloseAllConnections,
    StopAppStartApp,
}

async fn survive(label: &str, node: &mut PrivateNode, fault: Fault) {
    let mut config = Amqp10Config::new(node.amqp10_url(), Profile::RabbitmqV1);
    config.reconnect_delay = Duration::from_millis(100);
    config.reconnect_max_delay = Duration::from_secs(1);
    config.publish_timeout = Duration::from_secs(10);
    let driver = Arc::new(Amqp10Driver::connect(config).await.unwrap());
    let queue = QueueId::new("fault", label).unwrap();
    // Durable queue (the terminus) and durable messages: they survive stop_app.
    driver
        .declare(&QueueSpec::new(queue.clone()))
        .await
        .unwrap();
    let tally = Arc::new(Tally::new());

    // The receiver: counts what arrives, acks (an ack may fail across the loss; the
    // message then comes again).
    let mut sub = driver
        .consume(&queue, ConsumeOptions { prefetch: 500 })
        .await
        .unwrap();
    let receiver = {
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            while let Some(delivery) = sub.next().await {
                let Ok(delivery) = delivery else { continue };
                tally.consumed(number_of(&delivery));
                let _ = delivery.ack().await;
            }
        })
    };

    // The publisher: WINDOW sends at a time until `total` (set once the fault has
    // struck); a failed send is tried again until it is confirmed (a broker that is
    // down for a while fails many tries).
    let total = Arc::new(AtomicI64::new(i64::MAX));
    let sent = Arc::new(AtomicI64::new(0));
    let publisher = {
        let (driver, queue, tally) = (Arc::clone(&driver), queue.clone(), Arc::clone(&tally));
        let (total, sent) = (Arc::clone(&total), Arc::clone(&sent));
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut next = 0i64;
            loop {
                while in_flight.len() < WINDOW && next < total.load(Ordering::Relaxed) {
                    let (driver, queue, tally) =
                        (Arc::clone(&driver), queue.clone(), Arc::clone(&tally));
                    let n = next;
                    tally.publishing(n);
                    in_flight.push(async move {
                        let deadline = Instant::now() + Duration::from_secs(180);
                        loop {
                            match driver.publish(&queue, numbered(n)).await {
                                Ok(()) => return tally.confirmed(n),
                                Err(e) => {
                                    assert!(e.retryable(), "{e}");
                                    assert!(
                                        Instant::now() < deadline,
                                        "send {n} never succeeded: {e}"
                                    );
                                    tally.publish_failed();
                                }
                            }
                        }
                    });
                    next += 1;
                    sent.store(next, Ordering::Relaxed);
                }
                if in_flight.next().await.is_none() {
                    break;
                }
            }
        })
    };

    assert!(
        tally
            .wait_confirmed(STRIKE_AT, Duration::from_secs(120))
            .await,
        "{label}: {STRIKE_AT} sends were not confirmed within 120 s"
    );
    let connections_before = driver.connections_opened();
    let links_before = driver.links_attached();
    match fault {
        Fault::CloseAllConnections => blocking(|| node.close_all_connections()),
        Fault::StopAppStartApp => blocking(|| node.stop_app_then_start(Duration::from_secs(2))),
    }
    let total = {
        let end = sent.load(Ordering::Relaxed) + AFTER_FAULT;
        total.store(end, Ordering::Relaxed);
        end
    };
    tokio::time::timeout(Duration::from_secs(300), publisher)
        .await
        .expect("the publisher finishes")
        .expect("publisher task");
    assert_eq!(tally.confirmed_count(), total as usize);
    // The fault must have reached the driver. stop_app drops the TCP connection, so
    // the driver reconnects. RabbitMQ 3.10's close_all_connections does not: it ends
    // one session of the AMQP 1.0 connection (measured: `Closed 1 connections`, socket
    // still ESTABLISHED), the sender's or the receiver's, and that link re-attaches
    // (when it was the sender's, the sends in flight failed and were retried).
    let reconnected = driver.connections_opened() > connections_before;
    let reattached = driver.links_attached() > links_before;
    match fault {
        Fault::StopAppStartApp => assert!(reconnected, "{label}: the driver never reconnected"),
        Fault::CloseAllConnections => assert!(
            reconnected || reattached,
            "{label}: no link re-attached and no reconnect: the fault did not reach the driver"
        ),
    }

    let all = tally.wait_all_consumed(Duration::from_secs(180)).await;
    let counts = tally.counts();
    println!(
        "{label} (amqp10 x RabbitMQ): {counts}; {} connections, {} link attaches",
        driver.connections_opened(),
        driver.links_attached()
    );
    let missing = tally.missing();
    assert!(
        all && missing.is_empty() && counts.lost == 0,
        "{label}: {} confirmed sends never arrived, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    receiver.abort();
    driver.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_closed_connection_loses_no_confirmed_send() {
    let test = "force_closed_connection_loses_no_confirmed_send";
    let Some(mut node) = blocking(|| PrivateNode::start_or_skip(test)) else {
        return;
    };
    survive("close-all", &mut node, Fault::CloseAllConnections).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_app_start_app_under_load_loses_no_confirmed_send() {
    let test = "stop_app_start_app_under_load_loses_no_confirmed_send";
    let Some(mut node) = blocking(|| PrivateNode::start_or_skip(test)) else {
        return;
    };
    survive("stop-start", &mut node, Fault::StopAppStartApp).await;
}
