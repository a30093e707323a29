//! The driver conformance suite (feature `testkit`), and a driver tests can steer.
//!
//! Every driver crate runs the whole suite against its driver with one line:
//!
//! ```text
//! async fn context() -> Option<queue_core::testkit::TestContext> {
//!     Some(queue_core::testkit::TestContext::new(std::sync::Arc::new(MyDriver::connect().await?)))
//! }
//! queue_core::conformance_suite!(context);
//! ```
//!
//! Each contract is one public async function taking a [`TestContext`]; the macro makes
//! one `#[tokio::test]` of each. Contracts a driver's [`Capabilities`] rule out print
//! `skipped: ...` and return; the factory returns `None` (after printing why) when the
//! backend is unreachable outside CI.
//!
//! For fault tests: [`rabbitmq::PrivateNode`] (a RabbitMQ node of the test's own, to
//! cut and stop), [`Tally`] (end-to-end counts of numbered messages) and
//! [`tls::UntrustedTlsServer`] (a TLS endpoint no trust store accepts).

mod contracts;
mod controlled;
pub mod rabbitmq;
mod tally;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use contracts::*;
pub use controlled::{ControlledDriver, ControlledFactory};
pub use tally::{FaultCounts, Tally};

use crate::{
    Capabilities, Codec, Delivery, Driver, Headers, Message, QueueId, QueueSpec, Subscription,
    Value,
};

/// How long a contract waits for something that should happen before failing.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A driver under test, and fresh queue names for each contract.
#[derive(Clone)]
pub struct TestContext {
    driver: Arc<dyn Driver>,
    run: String,
    spec_hook: Arc<dyn Fn(QueueSpec) -> QueueSpec + Send + Sync>,
}

impl std::fmt::Debug for TestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContext")
            .field("driver", &self.driver.name())
            .field("run", &self.run)
            .finish()
    }
}

static NEXT_QUEUE: AtomicU64 = AtomicU64::new(0);

impl TestContext {
    /// A context around a driver; queue names are unique to this process run.
    pub fn new(driver: Arc<dyn Driver>) -> Self {
        let run = crate::new_message_id().replace('-', "");
        TestContext {
            driver,
            run: run[run.len() - 12..].to_string(),
            spec_hook: Arc::new(|spec| spec),
        }
    }

    /// Adjusts every queue spec the suite declares (a broker name prefix, say).
    pub fn with_spec_hook(
        mut self,
        hook: impl Fn(QueueSpec) -> QueueSpec + Send + Sync + 'static,
    ) -> Self {
        self.spec_hook = Arc::new(hook);
        self
    }

    /// The driver.
    pub fn driver(&self) -> &dyn Driver {
        self.driver.as_ref()
    }

    /// The driver, shared.
    pub fn driver_arc(&self) -> Arc<dyn Driver> {
        Arc::clone(&self.driver)
    }

    /// The driver's capabilities.
    pub fn caps(&self) -> Capabilities {
        self.driver.capabilities()
    }

    /// A fresh, not yet declared queue spec named after `label`.
    pub fn spec(&self, label: &str) -> QueueSpec {
        let n = NEXT_QUEUE.fetch_add(1, Ordering::Relaxed);
        let id = QueueId::new("conformance", &format!("{label}-{}-{n}", self.run))
            .expect("labels are valid queue names");
        (self.spec_hook)(QueueSpec::new(id).with_durable(false))
    }

    /// Declares a fresh queue and returns its id.
    pub async fn declared(&self, label: &str) -> QueueId {
        self.declare(self.spec(label)).await
    }

    /// Declares a spec, failing the test on error.
    pub async fn declare(&self, spec: QueueSpec) -> QueueId {
        within("declare", self.driver.declare(&spec))
            .await
            .unwrap_or_else(|e| panic!("declare {}: {e}", spec.id));
        spec.id
    }

    /// Prints why a contract does not apply to this driver.
    pub fn skip(&self, contract: &str, capability: &str) {
        println!(
            "skipped: {contract} on the {} driver: no {capability} capability",
            self.driver.name()
        );
    }

    /// Publishes one message, failing the test on error.
    pub async fn publish(&self, queue: &QueueId, message: Message) {
        within("publish", self.driver.publish(queue, message))
            .await
            .unwrap_or_else(|e| panic!("publish to {queue}: {e}"));
    }

    /// Starts a consumer, failing the test on error.
    pub async fn consume(&self, queue: &QueueId, prefetch: u32) -> Box<dyn Subscription> {
        within(
            "consume",
            self.driver
                .consume(queue, crate::ConsumeOptions { prefetch }),
        )
        .await
        .unwrap_or_else(|e| panic!("consume {queue}: {e}"))
    }
}

/// A JSON message with this body and headers.
pub fn message(body: Value, headers: Headers) -> Message {
    Message::encode(&body, headers, Codec::Json).expect("test bodies encode")
}

/// A JSON message whose body is `{"n": n}`.
pub fn numbered(n: i64) -> Message {
    message(Value::map([("n", Value::Int(n))]), Headers::new())
}

/// The `n` of a [`numbered`] message.
pub fn number_of(delivery: &Delivery) -> i64 {
    match delivery
        .message()
        .decode()
        .expect("test bodies decode")
        .get("n")
    {
        Some(Value::Int(n)) => *n,
        other => panic!("not a numbered message: {other:?}"),
    }
}

/// Every text an error shows a user or a log: Display, Debug and its whole source
/// chain. Tests of password redaction search this.
pub fn everything_said(err: &crate::Error) -> String {
    use std::error::Error as _;
    let mut said = format!("{err} {err:?}");
    let mut source = err.source();
    while let Some(s) = source {
        said.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    said
}

/// Awaits a future for at most [`PATIENCE`], panicking with `what` on timeout.
pub async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what} did not finish within {PATIENCE:?}"),
    }
}

/// The next delivery, failing the test if none arrives within [`PATIENCE`].
pub async fn next(sub: &mut Box<dyn Subscription>) -> Delivery {
    match within("waiting for a delivery", sub.next()).await {
        Some(Ok(d)) => d,
        Some(Err(e)) => panic!("consumer failed: {e}"),
        None => panic!("consumer closed while a delivery was expected"),
    }
}

/// Runs every contract as its own `#[tokio::test]`, given an async factory
/// `fn() -> Option<TestContext>` (return `None` to skip, after printing why).
#[macro_export]
macro_rules! conformance_suite {
    ($factory:path) => {
        $crate::conformance_suite!(@each $factory;
            declare_twice_is_fine,
            round_trip_keeps_id_body_and_headers,
            every_value_type_round_trips,
            three_messages_are_delivered_exactly_once,
            release_redelivers_the_same_message,
            dropping_a_delivery_releases_it,
            undeclared_queue_is_not_found,
            batch_publish_delivers_all,
            neutral_headers_round_trip,
            attempts_header_round_trips,
            queues_are_isolated,
            info_counts_ready_and_in_flight,
            cancel_stops_delivery_and_returns_unsettled,
            publish_before_any_consumer,
            new_consumer_after_cancel,
            rapid_consume_cancel_cycles,
            driver_assigned_ids_are_unique,
            competing_consumers_share_without_duplicates,
            eight_concurrent_publishers,
            ten_thousand_messages,
            second_settlement_is_an_error,
            prefetch_bounds_unsettled_deliveries,
            priority_orders_delivery,
            delay_is_honoured_or_refused
        );
    };
    (@each $factory:path; $($contract:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $contract() {
                let Some(ctx) = $factory().await else { return };
                $crate::testkit::$contract(&ctx).await;
            }
        )*
    };
}
