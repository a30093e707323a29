//! The driver conformance suite with the `artemis` profile against an ActiveMQ Artemis
//! broker named by `ARTEMIS_URL` (e.g. `amqp://artemis:artemis@127.0.0.1:5672`).
//! Artemis cannot be installed on the project's machines, so without the variable every
//! contract prints "skipped: no Artemis here (set ARTEMIS_URL)" — a skip, also in CI.

use std::sync::Arc;

use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
use queue_core::testkit::TestContext;

async fn artemis() -> Option<TestContext> {
    let Ok(url) = std::env::var("ARTEMIS_URL") else {
        println!("skipped: no Artemis here (set ARTEMIS_URL)");
        return None;
    };
    let driver = Amqp10Driver::connect(Amqp10Config::new(url, Profile::Artemis))
        .await
        .unwrap_or_else(|e| panic!("ARTEMIS_URL is set but connecting failed: {e}"));
    Some(TestContext::new(Arc::new(driver)))
}

queue_core::conformance_suite!(artemis);
