//! Connection loss in the middle of 10,000 confirmed sends with a running receiver, on
//! a private RabbitMQ node: every send that returned `Ok` is received at least once.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::testkit::{number_of, numbered};
use queue_core::{ConsumeOptions, Driver, QueueId, QueueSpec};
use support::rabbit_node::RabbitNode;
use tokio::sync::mpsc;

const TOTAL: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_closed_connection_loses_no_confirmed_send() {
    if !RabbitNode::available() {
        assert!(
            !support::in_ci(),
            "rabbitmq-server is not installed (CI=true)"
        );
        println!("skipped: rabbitmq-server is not installed");
        return;
    }
    let node = tokio::task::spawn_blocking(RabbitNode::start)
        .await
        .unwrap()
        .expect("starting a private RabbitMQ node");

    let mut config = Amqp10Config::new(node.url(), Profile::RabbitmqV1);
    config.reconnect_delay = Duration::from_millis(100);
    config.reconnect_max_delay = Duration::from_secs(1);
    config.publish_timeout = Duration::from_secs(10);
    let driver = Arc::new(Amqp10Driver::connect(config).await.unwrap());
    let queue = QueueId::parse("fault:sends").unwrap();
    driver
        .declare(&QueueSpec::new(queue.clone()))
        .await
        .unwrap();

    // The receiver: counts what arrives, acks (an ack may fail across the loss; the
    // message then comes again).
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let mut sub = driver
        .consume(&queue, ConsumeOptions { prefetch: 500 })
        .await
        .unwrap();
    let receiver = tokio::spawn(async move {
        while let Some(delivery) = sub.next().await {
            let Ok(delivery) = delivery else { continue };
            let _ = seen_tx.send(number_of(&delivery));
            let _ = delivery.ack().await;
        }
    });

    // The publisher: 10,000 sends, 500 at a time; a failed send is tried again.
    let (ok_tx, mut ok_rx) = mpsc::unbounded_channel::<i64>();
    let publisher = {
        let driver = Arc::clone(&driver);
        let queue = queue.clone();
        tokio::spawn(async move {
            let mut failures = 0u64;
            let mut in_flight = FuturesUnordered::new();
            let mut next = 0i64;
            loop {
                while in_flight.len() < 500 && next < TOTAL {
                    let (driver, queue) = (Arc::clone(&driver), queue.clone());
                    let n = next;
                    in_flight.push(async move {
                        let mut attempt = 0;
                        loop {
                            attempt += 1;
                            match driver.publish(&queue, numbered(n)).await {
                                Ok(()) => return (n, attempt - 1),
                                Err(e) => {
                                    assert!(e.retryable(), "{e}");
                                    assert!(attempt < 50, "send {n} never succeeded: {e}");
                                }
                            }
                        }
                    });
                    next += 1;
                }
                match in_flight.next().await {
                    Some((n, failed)) => {
                        failures += failed;
                        let _ = ok_tx.send(n);
                    }
                    None => break,
                }
            }
            failures
        })
    };

    // Half way through the confirmed sends, the broker drops every connection.
    let mut confirmed = HashSet::new();
    while confirmed.len() < (TOTAL / 2) as usize {
        confirmed.insert(ok_rx.recv().await.expect("publisher alive"));
    }
    let closed = tokio::task::spawn_blocking({
        let node_name = node.node.clone();
        move || {
            std::process::Command::new("rabbitmqctl")
                .args(["-n", &node_name, "close_all_connections", "fault test"])
                .output()
        }
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        closed.status.success(),
        "close_all_connections: {}",
        String::from_utf8_lossy(&closed.stderr)
    );
    while let Some(n) = ok_rx.recv().await {
        confirmed.insert(n);
    }
    let failures = publisher.await.unwrap();
    assert_eq!(confirmed.len(), TOTAL as usize);

    // Every confirmed send arrives (at least once).
    let mut received = HashSet::new();
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        while received.len() < confirmed.len() {
            match seen_rx.recv().await {
                Some(n) => {
                    received.insert(n);
                }
                None => break,
            }
        }
    })
    .await;
    let missing: Vec<_> = confirmed.difference(&received).take(10).collect();
    assert!(
        all.is_ok() && missing.is_empty(),
        "{} confirmed sends never arrived, e.g. {missing:?}",
        confirmed.len() - received.len()
    );
    println!("fault test: {failures} sends failed across the connection loss and were retried");
    receiver.abort();
    driver.close().await.unwrap();
    drop(node);
}
