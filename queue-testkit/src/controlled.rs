//! A memory driver whose publish confirmations a test holds, passes or refuses.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::{Notify, oneshot};

use queue_core::memory::MemoryDriver;
use queue_core::{
    Acker, Capabilities, ConsumeOptions, Delivery, Driver, Error, Message, QueueId, QueueInfo,
    QueueSpec, Result, Subscription,
};

use crate::PATIENCE;

/// A driver for tests: the memory driver, except that while publishes are *held*, each
/// publish waits until the test confirms or refuses it. Lets the Lua and runtime tests
/// prove that `publish` waits for its driver and fails when the driver refuses.
///
/// ```
/// use std::sync::Arc;
/// use queue_testkit::{ControlledDriver, numbered};
/// use queue_core::{Driver, QueueId, QueueSpec};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let driver = Arc::new(ControlledDriver::new());
/// let id = QueueId::parse("t:q").unwrap();
/// driver.declare(&QueueSpec::new(id.clone())).await.unwrap();
/// driver.hold_publishes();
/// let d = driver.clone();
/// let publish = tokio::spawn(async move { d.publish(&id, numbered(1)).await });
/// driver.wait_for_held(1).await;
/// driver.refuse_next();
/// assert!(publish.await.unwrap().is_err());
/// # });
/// ```
#[derive(Debug, Default)]
pub struct ControlledDriver {
    inner: MemoryDriver,
    holding: Mutex<bool>,
    held: Mutex<VecDeque<oneshot::Sender<bool>>>,
    arrived: Notify,
    without_delays: bool,
    /// How many of the next `info` calls fail (INTERNAL, retryable).
    failing_infos: std::sync::atomic::AtomicUsize,
    /// How many of the next `info` calls find no queue (NOT_FOUND).
    queueless_infos: std::sync::atomic::AtomicUsize,
    /// How many of the next publishes fail (INTERNAL, retryable).
    failing_publishes: std::sync::atomic::AtomicUsize,
    /// How many of the next acks fail (UNAVAILABLE, retryable), their deliveries
    /// released.
    failing_acks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Queues whose `consume` never answers.
    unanswered_consumes: Mutex<Vec<QueueId>>,
    /// Header names it reports as reserved and refuses to publish.
    reserved_headers: &'static [&'static str],
    /// What it reports as [`Capabilities::max_unsettled`].
    max_unsettled: Option<std::time::Duration>,
    /// Counts no unsettled messages in `info`, as RabbitMQ's AMQP 0-9-1 does not.
    counts_no_in_flight: bool,
    /// Refuses (`INVALID`) a message whose headers take more bytes than this
    /// ([`queue_core::Headers::byte_size`]).
    max_header_bytes: Option<usize>,
}

impl ControlledDriver {
    /// Passes publishes through until [`ControlledDriver::hold_publishes`].
    pub fn new() -> Self {
        ControlledDriver::default()
    }

    /// Reports no `delay` capability, as a broker without delayed delivery does, so
    /// that the runtime holds a failed delivery for its backoff instead.
    pub fn without_delays() -> Self {
        ControlledDriver {
            without_delays: true,
            ..ControlledDriver::default()
        }
    }

    /// Reports `names` as its [`Capabilities::reserved_headers`] and refuses (`INVALID`)
    /// to publish a message that carries one, as AMQP 0-9-1 does `CC` and `BCC`.
    pub fn reserving(names: &'static [&'static str]) -> Self {
        ControlledDriver {
            reserved_headers: names,
            ..ControlledDriver::default()
        }
    }

    /// Reports `limit` as its [`Capabilities::max_unsettled`], as a RabbitMQ driver
    /// reports the broker's `consumer_timeout` (it takes nothing back itself).
    pub fn taking_back_after(self, limit: std::time::Duration) -> Self {
        ControlledDriver {
            max_unsettled: Some(limit),
            ..self
        }
    }

    /// Refuses (`INVALID`) to publish a message whose headers take more than `bytes`,
    /// as AMQP 0-9-1 does headers past one frame on a connection with a small
    /// `frame_max`.
    pub fn refusing_headers_over(self, bytes: usize) -> Self {
        ControlledDriver {
            max_header_bytes: Some(bytes),
            ..self
        }
    }

    /// Counts no unsettled messages in `info` (`in_flight: None`), as the AMQP 0-9-1
    /// driver cannot: what is idle must then be told by the runtime's own count.
    pub fn counting_no_in_flight(self) -> Self {
        ControlledDriver {
            counts_no_in_flight: true,
            ..self
        }
    }

    /// The next `n` `info` calls fail INTERNAL, retryable, as counts do while a
    /// broker reconnects.
    pub fn fail_next_infos(&self, n: usize) {
        self.failing_infos
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// The next `n` `info` calls fail NOT_FOUND, as counts do while a queue the
    /// broker lost (a Redis `FLUSHALL`, a queue deleted by hand) is declared again.
    pub fn lose_queues_for_next_infos(&self, n: usize) {
        self.queueless_infos
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// The next `n` publishes fail INTERNAL, retryable, at once, as they do while a
    /// broker's publishing is down (an alarm, a lost connection).
    pub fn fail_next_publishes(&self, n: usize) {
        self.failing_publishes
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// Fails the next `n` acks of deliveries from any subscription (UNAVAILABLE, as
    /// from a connection lost): each such delivery goes back to its queue.
    pub fn fail_next_acks(&self, n: usize) {
        self.failing_acks
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// From now on, a `consume` of `queue` never answers, as on a broker that hangs:
    /// what waits for it waits until it is dropped.
    pub fn never_answer_consumes_of(&self, queue: &QueueId) {
        self.unanswered_consumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(queue.clone());
    }

    /// The memory driver underneath.
    pub fn inner(&self) -> &MemoryDriver {
        &self.inner
    }

    /// From now on, every publish waits for [`confirm_next`](Self::confirm_next) or
    /// [`refuse_next`](Self::refuse_next).
    pub fn hold_publishes(&self) {
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Stops holding and confirms every held publish.
    pub fn pass_publishes(&self) {
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = false;
        while self.settle_next(true) {}
    }

    /// How many publishes are waiting.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// How many held publishes their callers gave up (dropped their futures): a
    /// publish left waiting for good holds its caller's resources, and a driver's
    /// (a confirm window's slot), until it is dropped.
    pub fn abandoned(&self) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().filter(|waiter| waiter.is_closed()).count()
    }

    /// Waits until at least `n` publishes are held, panicking after [`PATIENCE`]: a
    /// publish that never reaches the driver is a failing test, not a hung one.
    pub async fn wait_for_held(&self, n: usize) {
        let arrivals = async {
            loop {
                let arrived = self.arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if self.held() >= n {
                    return;
                }
                arrived.await;
            }
        };
        if tokio::time::timeout(PATIENCE, arrivals).await.is_err() {
            panic!(
                "{} publishes held after {PATIENCE:?}, waiting for {n}",
                self.held()
            );
        }
    }

    /// Lets the oldest held publish through; false if none was held.
    pub fn confirm_next(&self) -> bool {
        self.settle_next(true)
    }

    /// Fails the oldest held publish with `INTERNAL` (retryable); false if none was held.
    pub fn refuse_next(&self) -> bool {
        self.settle_next(false)
    }

    fn settle_next(&self, confirm: bool) -> bool {
        let next = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        match next {
            Some(tx) => {
                let _ = tx.send(confirm);
                true
            }
            None => false,
        }
    }
}

#[async_trait]
impl Driver for ControlledDriver {
    fn name(&self) -> &str {
        "controlled"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            delay: !self.without_delays && self.inner.capabilities().delay,
            reserved_headers: self.reserved_headers,
            max_unsettled: self.max_unsettled,
            info_in_flight: !self.counts_no_in_flight,
            ..self.inner.capabilities()
        }
    }
    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        self.inner.declare(spec).await
    }
    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        if let Some(name) = self
            .reserved_headers
            .iter()
            .find(|name| message.headers.contains(name))
        {
            return Err(Error::invalid(format!(
                "header {name:?} is reserved by the controlled driver"
            )));
        }
        if let Some(max) = self.max_header_bytes
            && message.headers.byte_size() > max
        {
            return Err(Error::invalid(format!(
                "the headers take {} bytes, more than the controlled driver's {max}",
                message.headers.byte_size()
            )));
        }
        if take_one(&self.failing_publishes) {
            return Err(Error::internal(format!(
                "the controlled driver failed a publish to {queue}"
            )));
        }
        let wait = {
            let holding = *self.holding.lock().unwrap_or_else(|p| p.into_inner());
            holding.then(|| {
                let (tx, rx) = oneshot::channel();
                self.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(tx);
                rx
            })
        };
        if let Some(rx) = wait {
            self.arrived.notify_waiters();
            if !rx.await.unwrap_or(false) {
                return Err(Error::internal(format!(
                    "the controlled driver refused to confirm a publish to {queue}"
                )));
            }
        }
        self.inner.publish(queue, message).await
    }
    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let unanswered = self
            .unanswered_consumes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(queue);
        if unanswered {
            std::future::pending::<()>().await;
        }
        let inner = self.inner.consume(queue, options).await?;
        Ok(Box::new(ControlledSubscription {
            inner,
            failing_acks: self.failing_acks.clone(),
        }))
    }
    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        if take_one(&self.failing_infos) {
            return Err(Error::internal(format!(
                "the controlled driver failed a count of {queue}"
            )));
        }
        if take_one(&self.queueless_infos) {
            return Err(Error::not_found(format!(
                "the controlled driver lost {queue}"
            )));
        }
        let mut info = self.inner.info(queue).await?;
        if self.counts_no_in_flight {
            info.in_flight = None;
        }
        Ok(info)
    }
    fn acked_total(&self, queue: &QueueId) -> Option<u64> {
        self.inner.acked_total(queue)
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// A memory subscription whose deliveries' acks fail while the driver says so.
struct ControlledSubscription {
    inner: Box<dyn Subscription>,
    failing_acks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl Subscription for ControlledSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let delivery = match self.inner.next().await? {
            Ok(delivery) => delivery,
            Err(e) => return Some(Err(e)),
        };
        let message = delivery.shared_message();
        let acker = ControlledAcker {
            delivery,
            failing_acks: self.failing_acks.clone(),
        };
        Some(Ok(Delivery::shared(message, Box::new(acker))))
    }
    async fn cancel(self: Box<Self>) -> Result<()> {
        self.inner.cancel().await
    }
}

/// Settles the memory driver's delivery it wraps, but for the acks it is told to fail.
struct ControlledAcker {
    delivery: Delivery,
    failing_acks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl Acker for ControlledAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        if take_one(&self.failing_acks) {
            // Dropped unsettled: back to its queue, as a lost connection gives it back.
            return Err(Error::new(
                queue_core::ErrorKind::Unavailable,
                format!(
                    "the controlled driver failed the ack of {}",
                    self.delivery.message().id
                ),
            ));
        }
        self.delivery.ack().await
    }
    async fn release(self: Box<Self>) -> Result<()> {
        self.delivery.release().await
    }
    fn release_on_drop(self: Box<Self>) {
        // Dropping the wrapped delivery releases it.
    }
}

/// Counts one down from `failures`; false once none is left.
fn take_one(failures: &std::sync::atomic::AtomicUsize) -> bool {
    use std::sync::atomic::Ordering;
    failures
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// A factory handing out one shared [`ControlledDriver`] under the kind
/// `queue.driver.controlled`, so a test can put it behind a configuration and keep
/// steering it.
#[derive(Debug, Clone)]
pub struct ControlledFactory(pub std::sync::Arc<ControlledDriver>);

#[async_trait]
impl queue_core::DriverFactory for ControlledFactory {
    fn kind(&self) -> &'static str {
        "queue.driver.controlled"
    }

    fn validate(&self, _config: &serde_json::Value) -> Result<Capabilities> {
        Ok(self.0.capabilities())
    }

    async fn create(&self, _config: serde_json::Value) -> Result<std::sync::Arc<dyn Driver>> {
        Ok(self.0.clone())
    }
}
