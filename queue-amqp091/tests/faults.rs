//! The fault suite on private RabbitMQ nodes (their own ports and data directories,
//! never the shared node; always stopped): `rabbitmq::faults::<fault>` for a cut of
//! every connection, `stop_app`/`start_app`, and SIGKILL with a restart.

use std::sync::Arc;
use std::time::Duration;

use queue_amqp091::{Amqp091Config, Amqp091Driver, CAPABILITIES};
use queue_fixtures::rabbitmq::PrivateNode;
use queue_testkit::faults::{FaultBackend, trials};
use queue_testkit::{Fault, Outage, TestContext};

async fn start() -> Result<(TestContext, Box<dyn Outage>), String> {
    let node = tokio::task::spawn_blocking(PrivateNode::start)
        .await
        .map_err(|e| e.to_string())??;
    let mut config = Amqp091Config::new(node.amqp091_url());
    config.connection_name = Some("amqp091-faults".into());
    config.reconnect_delay = Duration::from_millis(200);
    config.reconnect_max_delay = Duration::from_secs(2);
    config.publish_timeout = Duration::from_secs(10);
    config.confirm_window = 500;
    let driver = Amqp091Driver::connect(config)
        .await
        .map_err(|e| e.to_string())?;
    Ok((TestContext::new(Arc::new(driver)), Box::new(node)))
}

fn main() {
    let faults = [Fault::CutConnections, Fault::StopStart, Fault::Kill];
    let rabbitmq = FaultBackend::new("rabbitmq", CAPABILITIES, &faults, start)
        .unavailable_if(PrivateNode::unavailable());
    queue_testkit::run(trials(&[rabbitmq]));
}
