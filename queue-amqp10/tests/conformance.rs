//! The conformance suite through AMQP 1.0, on every broker this driver knows:
//! `rabbitmq::<contract>` (RabbitMQ 3.x's AMQP 1.0 plugin on the machine's shared node,
//! profile `rabbitmq-v1`), `proton::<contract>` (a small broker on Qpid Proton started
//! per test, profile `generic`: a protocol-level smoke test), and `artemis::<contract>`
//! (ActiveMQ Artemis, the shared instance `cargo xtask brokers up` starts on 6672,
//! profile `artemis`).

mod support;

use std::sync::Arc;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_fixtures::proton::ProtonBroker;
use queue_fixtures::rabbitmq::shared_unavailable;
use queue_testkit::{Backend, TestContext};

fn main() {
    let rabbitmq = Backend::new("rabbitmq", Profile::RabbitmqV1.capabilities(), || async {
        Ok(TestContext::new(Arc::new(
            support::rabbit_driver(Profile::RabbitmqV1).await,
        )))
    })
    .unavailable_if(shared_unavailable());
    let proton = Backend::new("proton", Profile::Generic.capabilities(), || async {
        let broker = ProtonBroker::start()?;
        let driver = Amqp10Driver::connect(Amqp10Config::new(broker.url(), Profile::Generic))
            .await
            .map_err(|e| format!("connecting to the proton broker: {e}"))?;
        // The context owns the broker: it stops when the test ends, pass or fail.
        Ok(TestContext::new(Arc::new(driver)).keeping(broker))
    })
    .unavailable_if(ProtonBroker::unavailable());
    let artemis = Backend::new("artemis", Profile::Artemis.capabilities(), || async {
        let driver = Amqp10Driver::connect(Amqp10Config::new(
            queue_fixtures::artemis::shared_url(),
            Profile::Artemis,
        ))
        .await
        .map_err(|e| format!("connecting to Artemis: {e}"))?;
        Ok(TestContext::new(Arc::new(driver)))
    })
    .unavailable_if(queue_fixtures::artemis::shared_unavailable());
    queue_testkit::run(queue_testkit::conformance::trials(&[
        rabbitmq, proton, artemis,
    ]));
}
