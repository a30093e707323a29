//! The fault suite through AMQP 1.0 on brokers of the tests' own (their own ports and
//! data directories, never the shared ones; always stopped): `rabbitmq::faults::<fault>`
//! on private RabbitMQ nodes and `artemis::faults::<fault>` on private Artemis
//! instances, for a cut of every connection (`close_all_connections`; Artemis'
//! management `closeConnectionsForAddress`), a graceful stop and start, and SIGKILL
//! with a restart from the broker's journal.
//! RabbitMQ 3.x does not list AMQP 1.0 connections: the cut ends the internal
//! connection behind each session instead, which ends the sessions, not the socket;
//! the suite accepts a re-attached link as the client seeing that fault.

use std::sync::Arc;
use std::time::Duration;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::{ConsumeOptions, Driver, Headers, Message};
use queue_fixtures::artemis::ArtemisNode;
use queue_fixtures::rabbitmq::PrivateNode;
use queue_testkit::faults::{FaultBackend, Load, trials};
use queue_testkit::{Fault, Outage, TestContext};

async fn start() -> Result<(TestContext, Box<dyn Outage>), String> {
    let node = tokio::task::spawn_blocking(PrivateNode::start)
        .await
        .map_err(|e| e.to_string())??;
    let mut config = Amqp10Config::new(node.amqp10_url(), Profile::RabbitmqV1);
    config.reconnect_delay = Duration::from_millis(100);
    config.reconnect_max_delay = Duration::from_secs(1);
    config.publish_timeout = Duration::from_secs(10);
    let driver = Amqp10Driver::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    Ok((TestContext::new(Arc::new(driver)), Box::new(node)))
}

async fn start_artemis() -> Result<(TestContext, Box<dyn Outage>), String> {
    let node = tokio::task::spawn_blocking(ArtemisNode::start)
        .await
        .map_err(|e| e.to_string())??;
    let mut config = Amqp10Config::new(node.url(), Profile::Artemis);
    config.reconnect_delay = Duration::from_millis(100);
    config.reconnect_max_delay = Duration::from_secs(1);
    config.publish_timeout = Duration::from_secs(10);
    let driver = Amqp10Driver::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    Ok((TestContext::new(Arc::new(driver)), Box::new(node)))
}

/// Deliveries that waited in a subscription while their link was lost are not handed
/// to the consumer: the broker has them back and delivers them again on the new link
/// (docs/drivers/amqp10.md, "Receiving"). Handed over, each one's handler would run
/// for nothing, its ack refused.
async fn deliveries_waiting_when_their_link_is_lost_are_not_handed_over() {
    const COUNT: usize = 20;
    let (ctx, mut node) = start().await.expect("a private RabbitMQ node");
    let driver = ctx.driver_arc();
    let spec = ctx.spec("stale").with_durable(true);
    driver.declare(&spec).await.expect("declare");
    let messages = (0..COUNT)
        .map(|n| Message::from_bytes(format!("{n}").into_bytes(), Headers::new(), "text/plain"))
        .collect();
    driver
        .publish_batch(&spec.id, messages)
        .await
        .expect("publish");
    let mut subscription = driver
        .consume(
            &spec.id,
            ConsumeOptions {
                prefetch: COUNT as u32,
            },
        )
        .await
        .expect("consume");
    let next = async |subscription: &mut Box<dyn queue_core::Subscription>| {
        tokio::time::timeout(Duration::from_secs(30), subscription.next())
            .await
            .expect("a delivery within 30 s")
            .expect("the subscription is open")
            .expect("a delivery, not an error")
    };
    // The rest wait in the subscription (prefetch covers them all).
    let first = next(&mut subscription).await;
    first.ack().await.expect("ack before the cut");
    let links_before = driver.connection().expect("a report").links_attached;
    tokio::task::block_in_place(|| node.inflict(Fault::CutConnections)).expect("cut");
    // The fault landed once the receiver attached a new link.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while driver.connection().expect("a report").links_attached <= links_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no link re-attached within 30 s of the cut"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 1..COUNT {
        let delivery = next(&mut subscription).await;
        delivery
            .ack()
            .await
            .unwrap_or_else(|e| panic!("delivery {n} after the cut came from the lost link: {e}"));
    }
    drop(node);
}

/// During a resource alarm RabbitMQ stops reading from every AMQP 0-9-1 connection
/// that publishes, which is why that driver's consumers have a connection of their
/// own. This driver has one connection: its consumers must still ack through an
/// alarm, or the backlog that raised it could not drain. (RabbitMQ 3.10's AMQP 1.0
/// plugin takes the publish made during the alarm: measured, not relied on.)
async fn consumers_ack_through_a_resource_alarm() {
    let node = tokio::task::spawn_blocking(PrivateNode::start)
        .await
        .expect("join")
        .expect("a private RabbitMQ node");
    let mut config = Amqp10Config::new(node.amqp10_url(), Profile::RabbitmqV1);
    config.publish_timeout = Duration::from_secs(2);
    let driver = Amqp10Driver::connect(config).await.expect("connect");
    let id = queue_core::QueueId::new("faults", "alarm").unwrap();
    driver
        .declare(&queue_core::QueueSpec::new(id.clone()))
        .await
        .unwrap();
    for n in 0..3 {
        driver
            .publish(&id, queue_testkit::numbered(n))
            .await
            .unwrap();
    }
    let mut sub = driver
        .consume(&id, ConsumeOptions { prefetch: 10 })
        .await
        .unwrap();
    let ctl = |args: &'static [&'static str]| {
        let node = &node;
        move || node.ctl(args)
    };
    tokio::task::block_in_place(ctl(&["set_vm_memory_high_watermark", "0.00001"]));
    let during = driver.publish(&id, queue_testkit::numbered(99)).await;
    for _ in 0..3 {
        queue_testkit::next(&mut sub).await.ack().await.unwrap();
    }
    queue_testkit::within("the cancel", sub.cancel())
        .await
        .unwrap();
    let counts = tokio::task::block_in_place(ctl(&[
        "-q",
        "list_queues",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]));
    tokio::task::block_in_place(ctl(&["set_vm_memory_high_watermark", "0.4"]));
    let line = counts
        .lines()
        .find(|l| l.contains("alarm"))
        .unwrap_or_else(|| panic!("no alarm queue in {counts}"));
    let numbers: Vec<&str> = line.split_whitespace().skip(1).collect();
    let ready = if during.is_ok() { "1" } else { "0" };
    assert_eq!(numbers, [ready, "0"], "ready, unacked: {line}");
    driver.close().await.unwrap();
}

fn main() {
    let faults = [Fault::CutConnections, Fault::StopStart, Fault::Kill];
    let rabbitmq = FaultBackend::new(
        "rabbitmq",
        Profile::RabbitmqV1.capabilities(),
        &faults,
        start,
    )
    .unavailable_if(PrivateNode::unavailable());
    // Artemis' faults strike in the middle of 20,000 confirmed sends (its journal
    // must give back every accepted message), as docs/reliability.md reports.
    let artemis = FaultBackend::new(
        "artemis",
        Profile::Artemis.capabilities(),
        &faults,
        start_artemis,
    )
    .unavailable_if(queue_fixtures::artemis::unavailable())
    .with_load(Load {
        strike_at: 10_000,
        after_fault: 10_000,
        ..Load::default()
    });
    let mut all = trials(&[rabbitmq, artemis]);
    all.push(queue_testkit::broker_test(
        "rabbitmq::deliveries_waiting_when_their_link_is_lost_are_not_handed_over",
        PrivateNode::unavailable(),
        deliveries_waiting_when_their_link_is_lost_are_not_handed_over,
    ));
    all.push(queue_testkit::broker_test(
        "rabbitmq::consumers_ack_through_a_resource_alarm",
        PrivateNode::unavailable(),
        consumers_ack_through_a_resource_alarm,
    ));
    queue_testkit::run(all);
}
