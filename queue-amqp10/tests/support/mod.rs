//! What the broker tests share: a driver on the machine's shared RabbitMQ.
#![allow(dead_code)]

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};

/// The shared RabbitMQ's AMQP 1.0 endpoint.
pub const RABBIT_URL: &str = queue_fixtures::rabbitmq::SHARED_AMQP10_URL;

/// A driver on the shared node (its availability is checked before any test runs).
pub async fn rabbit_driver(profile: Profile) -> Amqp10Driver {
    let mut config = Amqp10Config::new(RABBIT_URL, profile);
    config.container_id = Some(format!("queue-amqp10-tests-{}", std::process::id()));
    Amqp10Driver::connect(config)
        .await
        .expect("the shared RabbitMQ's AMQP 1.0 endpoint")
}

/// Checks that a delivery larger than `max_message_size` is refused before it is held
/// whole in memory, on the broker at `url` (the RabbitMQ and the Artemis tests run
/// it). fe2o3-amqp refuses it by detaching the link and the broker offers it again at
/// every attach: the re-attaches back off (before, the receiver attached again over a
/// hundred times a second, for ever).
pub async fn a_delivery_over_max_message_size_is_refused(url: String, profile: Profile) {
    use queue_core::{ConsumeOptions, Driver, QueueId, QueueSpec};
    use std::time::Duration;
    const WATCHED: Duration = Duration::from_secs(3);
    let publisher = Amqp10Driver::connect(Amqp10Config::new(url.clone(), profile))
        .await
        .unwrap();
    let mut config = Amqp10Config::new(url.clone(), profile);
    config.max_message_size = 64 * 1024;
    config.reconnect_delay = Duration::from_millis(100);
    config.reconnect_max_delay = Duration::from_secs(1);
    let consumer = Amqp10Driver::connect(config).await.unwrap();
    let name = format!("amqp10-tests-too-large-{}", queue_core::new_message_id());
    let id = QueueId::new("amqp10-tests", &name).unwrap();
    let spec = QueueSpec::new(id.clone())
        .with_name(name)
        .with_durable(false);
    publisher.declare(&spec).await.unwrap();
    consumer.declare(&spec).await.unwrap();
    let body = vec![b'x'; 200_000];
    let too_large = queue_core::Message::from_bytes(body, Default::default(), "text/plain");
    publisher.publish(&id, too_large.clone()).await.unwrap();
    // A driver refuses to send what none of its receivers would take (`INVALID`,
    // never sent); the publisher above, at the default limit, sent it.
    let err = consumer
        .publish(&id, too_large)
        .await
        .expect_err("a body over the driver's max_message_size");
    assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
    assert!(err.message().contains("max_message_size"), "{err}");
    // Its body under the limit, its headers over it: measured as it travels (the
    // body alone was measured, and such a message was sent: review).
    let mut near = queue_core::Message::from_bytes(
        vec![b'x'; 64 * 1024 - 100],
        Default::default(),
        "text/plain",
    );
    near.headers.insert("note", "y".repeat(1024));
    let err = consumer
        .publish(&id, near)
        .await
        .expect_err("a message over max_message_size as it travels");
    assert_eq!(err.kind(), queue_core::ErrorKind::Invalid, "{err}");
    let before = consumer.connection().unwrap().links_attached;
    let mut subscription = consumer
        .consume(&id, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    if let Ok(next) = tokio::time::timeout(WATCHED, subscription.next()).await {
        let what = next.map(|d| d.map(|d| d.message().body.len()));
        panic!("{profile:?}: the receiver handed over {what:?}");
    }
    let attaches = consumer.connection().unwrap().links_attached - before;
    // 100 ms doubling up to 1 s gives about 6 in 3 s.
    assert!(
        (2..=15).contains(&attaches),
        "{profile:?}: {attaches} attaches in {WATCHED:?}"
    );
    subscription.cancel().await.unwrap();
    consumer.close().await.unwrap();
    publisher.close().await.unwrap();
}

/// Checks that a driver keeps more links than fe2o3-amqp's default `channel_max`
/// (255) allows sessions on one connection, on the broker at `url` (the RabbitMQ and
/// the Artemis tests run it). Every link has a session of its own: with the default,
/// beginning the 257th failed, the driver took the connection for broken and reopened
/// it, which dropped every other link, and attaching them again hit the limit again.
pub async fn links_past_fe2o3s_default_channel_max_share_one_connection(
    url: String,
    profile: Profile,
) {
    use queue_core::{ConsumeOptions, Driver, QueueId, QueueSpec};
    use queue_testkit::numbered;
    const QUEUES: usize = 300;
    let driver = Amqp10Driver::connect(Amqp10Config::new(url, profile))
        .await
        .unwrap();
    let run = queue_core::new_message_id();
    let mut ids = Vec::new();
    for n in 0..QUEUES {
        let name = format!("amqp10-tests-many-links-{run}-{n}");
        let id = QueueId::new("amqp10-tests", &name).unwrap();
        let spec = QueueSpec::new(id.clone())
            .with_name(name)
            .with_durable(false);
        driver
            .declare(&spec)
            .await
            .unwrap_or_else(|e| panic!("declare {n}: {e}"));
        ids.push(id);
    }
    let mut consumer = driver
        .consume(&ids[0], ConsumeOptions { prefetch: 10 })
        .await
        .expect("a receiver past the sessions of every sender");
    for id in [&ids[0], &ids[QUEUES - 1]] {
        driver.publish(id, numbered(1)).await.expect("publish");
    }
    let delivery = queue_testkit::within("a delivery", consumer.next())
        .await
        .expect("the subscription is open")
        .expect("a delivery");
    delivery.ack().await.expect("ack");
    let report = driver.connection().expect("a report");
    assert_eq!(report.connections_opened, 1, "{report:?}");
    assert!(report.links_attached > QUEUES as u64, "{report:?}");
    let _ = driver.close().await;
}
