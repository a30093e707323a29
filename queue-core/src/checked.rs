//! The capability checks, applied once above every driver (as OpenDAL's correctness
//! check is): a driver implements what it claims in [`Capabilities`] and never checks
//! its own inputs against them. The runtime, the [`Queues`](crate::Queues) facade
//! and the conformance suite put every driver behind this layer.

use std::sync::Arc;

use async_trait::async_trait;

use crate::driver::refuse_unsupported_headers;
use crate::{
    Capabilities, ConnectionReport, ConsumeOptions, Driver, Message, QueueId, QueueInfo, QueueSpec,
    Result, Subscription,
};

/// A driver behind the capability checks: a queue option or a header the driver
/// cannot honour is `INVALID`, naming the driver, before the driver sees it.
///
/// ```
/// use std::sync::Arc;
/// use queue_core::{Checked, Driver, QueueId, QueueSpec};
/// use queue_core::memory::MemoryDriver;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let driver = Checked::layer(Arc::new(MemoryDriver::new()));
/// let spec = QueueSpec::new(QueueId::parse("app:q").unwrap()).with_max_priority(10);
/// let err = driver.declare(&spec).await.unwrap_err();
/// assert!(err.message().contains("max_priority 10"), "{err}");
/// # });
/// ```
pub struct Checked {
    inner: Arc<dyn Driver>,
}

impl Checked {
    /// Puts `driver` behind the checks.
    pub fn layer(driver: Arc<dyn Driver>) -> Arc<dyn Driver> {
        Arc::new(Checked { inner: driver })
    }
}

#[async_trait]
impl Driver for Checked {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        spec.check_supported(self.name(), &self.capabilities())?;
        self.inner.declare(spec).await
    }

    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        refuse_unsupported_headers(self.name(), &self.capabilities(), &message)?;
        self.inner.publish(queue, message).await
    }

    /// An error says how far the batch got ([`crate::Error::in_batch`]): none of it,
    /// when it was refused before anything was sent.
    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let (caps, total) = (self.capabilities(), messages.len());
        for message in &messages {
            refuse_unsupported_headers(self.name(), &caps, message)
                .map_err(|e| e.in_batch(0, total))?;
        }
        self.inner
            .publish_batch(queue, messages)
            .await
            .map_err(|e| e.in_batch(0, total))
    }

    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        self.inner.consume(queue, options).await
    }

    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        self.inner.info(queue).await
    }

    fn acked_total(&self, queue: &QueueId) -> Option<u64> {
        self.inner.acked_total(queue)
    }

    fn connection(&self) -> Option<ConnectionReport> {
        self.inner.connection()
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
