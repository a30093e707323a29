//! The fault contract itself: it passes an honest driver, and fails a driver that
//! loses confirmed messages, one the fault never reaches, and one that never comes
//! back after a restart. Drivers here are the
//! memory driver behind a wrapper that plays a connection: a cut makes the next
//! publishes fail (retryable) and counts a reconnect.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use queue_core::memory::MemoryDriver;
use queue_core::{
    Capabilities, ConnectionReport, ConsumeOptions, Driver, Error, Message, QueueId, QueueInfo,
    QueueSpec, Result, Subscription,
};
use queue_testkit::faults::{Load, no_confirmed_message_lost};
use queue_testkit::{Fault, Outage, TestContext};

/// How the wrapper misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Flaw {
    None,
    /// Every tenth publish returns Ok without publishing.
    DropsEveryTenth,
    /// A cut does not reach it: no failure, no reconnect.
    NeverSeesTheFault,
    /// After a restart of the broker it never connects again.
    NeverReconnects,
}

struct Wrapped {
    inner: MemoryDriver,
    flaw: Flaw,
    failing: AtomicU64,
    opened: AtomicU64,
    published: AtomicU64,
}

#[async_trait]
impl Driver for Wrapped {
    fn name(&self) -> &str {
        "wrapped"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        self.inner.declare(spec).await
    }
    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        if self
            .failing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::internal("connection lost"));
        }
        let n = self.published.fetch_add(1, Ordering::Relaxed);
        if self.flaw == Flaw::DropsEveryTenth && n % 10 == 9 {
            return Ok(());
        }
        self.inner.publish(queue, message).await
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
    fn connection(&self) -> Option<ConnectionReport> {
        Some(ConnectionReport {
            connected: true,
            connections_opened: self.opened.load(Ordering::Relaxed),
            links_attached: 0,
            node: "memory".into(),
        })
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// Cuts the wrapper's "connection" (a restart of its "broker" keeps the messages, as
/// the memory driver is not touched, and drops the connection all the same).
struct Cut(Arc<Wrapped>);

impl Outage for Cut {
    fn inflict(&mut self, _fault: Fault) -> std::result::Result<(), String> {
        match self.0.flaw {
            Flaw::NeverSeesTheFault => {}
            Flaw::NeverReconnects => self.0.failing.store(u64::MAX, Ordering::Release),
            Flaw::None | Flaw::DropsEveryTenth => {
                self.0.failing.store(50, Ordering::Release);
                self.0.opened.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

async fn run(flaw: Flaw) -> std::result::Result<String, String> {
    run_fault(flaw, Fault::CutConnections).await
}

async fn run_fault(flaw: Flaw, fault: Fault) -> std::result::Result<String, String> {
    let driver = Arc::new(Wrapped {
        inner: MemoryDriver::new(),
        flaw,
        failing: AtomicU64::new(0),
        opened: AtomicU64::new(1),
        published: AtomicU64::new(0),
    });
    let ctx = TestContext::new(driver.clone());
    let mut outage = Cut(driver);
    let load = Load {
        window: 32,
        strike_at: 200,
        after_fault: 300,
        drain_limit: std::time::Duration::from_secs(5),
        publish_limit: std::time::Duration::from_secs(3),
    };
    no_confirmed_message_lost(&ctx, &mut outage, fault, load)
        .await
        .map(|report| report.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_driver_passes() {
    let report = run(Flaw::None).await.expect("passes");
    assert!(report.contains("lost 0"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_drops_confirmed_messages_fails() {
    let err = run(Flaw::DropsEveryTenth).await.unwrap_err();
    assert!(err.contains("never came out"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_that_never_reaches_the_driver_fails() {
    let err = run(Flaw::NeverSeesTheFault).await.unwrap_err();
    assert!(err.contains("did not reach the driver"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_driver_passes_a_restart() {
    let report = run_fault(Flaw::None, Fault::StopStart)
        .await
        .expect("passes");
    assert!(report.contains("lost 0"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_never_reconnects_after_a_restart_fails() {
    for fault in [Fault::StopStart, Fault::Kill] {
        let err = run_fault(Flaw::NeverReconnects, fault).await.unwrap_err();
        assert!(err.contains("never succeeded"), "{fault:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_that_never_reaches_the_driver_fails() {
    let err = run_fault(Flaw::NeverSeesTheFault, Fault::Kill)
        .await
        .unwrap_err();
    assert!(err.contains("did not reach the driver"), "{err}");
}
