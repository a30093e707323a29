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
    queue_testkit::run(trials(&[rabbitmq, artemis]));
}
