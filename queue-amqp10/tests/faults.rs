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
use queue_core::{ConsumeOptions, Headers, Message};
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
    queue_testkit::run(all);
}
