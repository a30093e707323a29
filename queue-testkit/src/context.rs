//! The context a contract runs in: a driver under test, fresh queue names, and the
//! helpers every contract uses.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use queue_core::{
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
    /// What must live as long as the context (a broker started for this test).
    kept: Vec<Arc<dyn Any + Send + Sync>>,
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
    /// A context around a driver, behind the capability checks every driver runs
    /// behind ([`queue_core::Checked`]); queue names are unique to this process run.
    pub fn new(driver: Arc<dyn Driver>) -> Self {
        let run = queue_core::new_message_id().replace('-', "");
        TestContext {
            driver: queue_core::Checked::layer(driver),
            run: run[run.len() - 12..].to_string(),
            spec_hook: Arc::new(|spec| spec),
            kept: Vec::new(),
        }
    }

    /// Keeps `guard` (a broker started for this test, say) alive as long as the
    /// context: it is dropped, and the broker stopped, when the test ends, pass or fail.
    pub fn keeping(mut self, guard: impl Any + Send + Sync) -> Self {
        self.kept.push(Arc::new(guard));
        self
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
                .consume(queue, queue_core::ConsumeOptions { prefetch }),
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
pub fn everything_said(err: &queue_core::Error) -> String {
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
