//! The driver conformance suite with the `generic` profile against a second,
//! independent AMQP 1.0 implementation: a queue broker on Qpid Proton's reactor
//! (tests/support/proton_broker.py), started per test on its own port.

mod support;

use std::sync::Arc;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::testkit::TestContext;
use support::proton::ProtonBroker;

async fn proton() -> Option<TestContext> {
    let broker = match ProtonBroker::start() {
        Ok(broker) => broker,
        Err(reason) => {
            assert!(!support::in_ci(), "{reason} (CI=true)");
            println!("skipped: {reason}");
            return None;
        }
    };
    let driver = Amqp10Driver::connect(Amqp10Config::new(broker.url(), Profile::Generic))
        .await
        .unwrap_or_else(|e| panic!("connecting to the proton broker: {e}"));
    // The context owns the broker: it is stopped when the test ends, pass or fail.
    let ctx = TestContext::new(Arc::new(driver)).with_spec_hook(move |spec| {
        let _keep_alive = &broker;
        spec
    });
    Some(ctx)
}

queue_core::conformance_suite!(proton);
