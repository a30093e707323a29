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

/// A sender may send deliveries settled unless the receiver's attach asks for them
/// unsettled (fe2o3-amqp's default, `mixed`, allows both): settled, a delivery has left
/// the queue before its handler runs, and its release, or a crash, loses it. The
/// driver asks for unsettled deliveries; the proton broker here presettles whenever a
/// consumer's attach allows it.
async fn a_sender_that_may_presettle_is_asked_for_unsettled_deliveries() {
    use queue_core::{ConsumeOptions, Driver, QueueId, QueueSpec};
    let broker = ProtonBroker::start_presettling().expect("the proton broker");
    let driver = Amqp10Driver::connect(Amqp10Config::new(broker.url(), Profile::Generic))
        .await
        .expect("connecting to the proton broker");
    let id = QueueId::new("amqp10-tests", "presettle").unwrap();
    driver
        .declare(&QueueSpec::new(id.clone()).with_durable(false))
        .await
        .unwrap();
    driver
        .publish(&id, queue_testkit::numbered(7))
        .await
        .unwrap();
    let mut consumer = driver
        .consume(&id, ConsumeOptions { prefetch: 1 })
        .await
        .unwrap();
    let next = async |consumer: &mut Box<dyn queue_core::Subscription>| {
        queue_testkit::within("a delivery", consumer.next())
            .await
            .expect("the subscription is open")
            .expect("a delivery")
    };
    let first = next(&mut consumer).await;
    assert_eq!(queue_testkit::number_of(&first), 7);
    first.release().await.expect("release");
    // Settled by the broker, the message was gone: nothing came back.
    let again = next(&mut consumer).await;
    assert_eq!(queue_testkit::number_of(&again), 7);
    again.ack().await.expect("ack");
    let _ = driver.close().await;
    drop(broker);
}

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
    let mut trials = queue_testkit::conformance::trials(&[rabbitmq, proton, artemis]);
    trials.push(queue_testkit::broker_test(
        "proton::a_sender_that_may_presettle_is_asked_for_unsettled_deliveries",
        ProtonBroker::unavailable(),
        a_sender_that_may_presettle_is_asked_for_unsettled_deliveries,
    ));
    queue_testkit::run(trials);
}
