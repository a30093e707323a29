//! What the benches that run the whole runtime against a broker share: timing a
//! runtime's drain or publishes by its own metrics, and a raw fe2o3-amqp receiver.
//! Running two sides of a comparison in turns is `queue_testkit::bench`.
//!
//! Included with `#[path]` by `rabbitmq.rs` and `artemis.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fe2o3_amqp::link::CreditMode;
use fe2o3_amqp::types::messaging::{Body, Source};
use fe2o3_amqp::types::primitives::Value;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};
use queue_runtime::host::{Host, HostOptions};
use queue_runtime::metrics::names as metric;
use queue_runtime::registry::{self, DriverKinds};

/// How long one timed run (a drain, the publishes) may take before the bench fails.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Link credit of the raw receiver, the runtime's prefetch.
pub const CREDIT: u32 = 1000;

/// What the runtime counts in its metrics that the bench reads: acks, confirmed
/// publishes and deliveries, each with the time it was first counted.
#[derive(Default)]
struct Counted {
    acked: Arc<Tally>,
    published: Arc<Tally>,
    delivered: Arc<Tally>,
}

/// One counter of the runtime's, when it first counted since the last
/// [`Tally::forget_first`], and a signal when it reaches the count a bench waits for.
/// Incremented on the runtime's hot path, so after the first count an increment is
/// three atomic operations, no lock.
struct Tally {
    count: AtomicU64,
    /// Nanoseconds after [`epoch`] of the first count; 0 for none yet.
    first_ns: AtomicU64,
    /// The count [`Tally::reached`] waits for; `u64::MAX` while nobody waits.
    target: AtomicU64,
    /// Notified by the increment that reaches `target`. A signal, not a poll: a
    /// bench that woke every 200 µs to look took a tokio worker's wake-ups (5,000 a
    /// second) from the runtime it was timing, and from no raw client.
    at_target: tokio::sync::Notify,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            count: AtomicU64::new(0),
            first_ns: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            at_target: tokio::sync::Notify::new(),
        }
    }
}

/// The instant `Tally` times are measured from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Tally {
    fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    fn forget_first(&self) {
        epoch();
        self.first_ns.store(0, Ordering::Release);
    }

    /// Returns once the count is at least `target`.
    async fn reached(&self, target: u64) {
        self.target.store(target, Ordering::SeqCst);
        // A permit left by an earlier wait's last increments makes `notified`
        // return at once: the count is looked at again.
        while self.count.load(Ordering::SeqCst) < target {
            self.at_target.notified().await;
        }
        self.target.store(u64::MAX, Ordering::SeqCst);
    }

    fn first(&self) -> Option<Instant> {
        match self.first_ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(epoch() + Duration::from_nanos(ns)),
        }
    }
}

impl metrics::CounterFn for Tally {
    fn increment(&self, value: u64) {
        let count = self.count.fetch_add(value, Ordering::SeqCst) + value;
        if count >= self.target.load(Ordering::SeqCst) {
            self.at_target.notify_one();
        }
        if self.first_ns.load(Ordering::Relaxed) == 0 {
            let ns = u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX);
            let _ =
                self.first_ns
                    .compare_exchange(0, ns.max(1), Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn absolute(&self, value: u64) {
        self.count.store(value, Ordering::SeqCst);
        if value >= self.target.load(Ordering::SeqCst) {
            self.at_target.notify_one();
        }
    }
}

impl metrics::Recorder for Counted {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match key.name() {
            metric::ACKED => Counter::from_arc(Arc::clone(&self.acked)),
            metric::PUBLISHED => Counter::from_arc(Arc::clone(&self.published)),
            metric::DELIVERED => Counter::from_arc(Arc::clone(&self.delivered)),
            _ => Counter::noop(),
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// The counters of the recorder installed for this process.
fn counted() -> &'static Counted {
    static COUNTED: std::sync::OnceLock<&'static Counted> = std::sync::OnceLock::new();
    COUNTED.get_or_init(|| {
        let recorder: &'static Counted = Box::leak(Box::default());
        metrics::set_global_recorder(recorder).expect("the bench's metrics recorder");
        recorder
    })
}

/// Which of the runtime's counts ends a timed run.
#[derive(Clone, Copy)]
pub enum Until {
    Acked,
    /// Only `rabbitmq.rs` has a publish pair; the other benches include this file too.
    #[allow(dead_code)]
    Published,
}

/// Starts the runtime, waits until it acked or published `n` more messages, and
/// returns how long that took, from its first delivery (a drain) or its first
/// confirmed publish, as the raw clients are timed: starting the runtime (connecting,
/// declaring, the Lua states) is left out, as opening the raw clients' connection is.
/// Then stops it (untimed).
pub async fn run_host_until(path: &std::path::Path, until: Until, n: usize) -> Duration {
    let counted = counted();
    let (count, first) = match until {
        Until::Acked => (&counted.acked, &counted.delivered),
        Until::Published => (&counted.published, &counted.published),
    };
    first.forget_first();
    let target = count.count() + n as u64;
    let kinds = DriverKinds::builtin();
    let config = queue_runtime::config::load(&[path.to_path_buf()]).expect("config");
    let plan = registry::plan(&config, &kinds, false).expect("plan");
    let host = Host::start(plan, &kinds, HostOptions::default())
        .await
        .expect("start");
    let reached = tokio::time::timeout(DRAIN_TIMEOUT, count.reached(target)).await;
    assert!(
        reached.is_ok(),
        "the runtime got {} of {n} within {DRAIN_TIMEOUT:?}",
        n as u64 + count.count() - target
    );
    let elapsed = first.first().expect("counted at least once").elapsed();
    host.shutdown().await;
    elapsed
}

/// Receives `n` messages on a new session and receiver of `connection` and accepts
/// them, 100 per disposition (as raw lapin acks with `multiple` every 100); returns
/// the time from the first delivery to the last accept.
pub async fn raw_fe2o3_receive(
    connection: &mut fe2o3_amqp::connection::ConnectionHandle<()>,
    source: Source,
    n: usize,
) -> Duration {
    let mut session = fe2o3_amqp::Session::begin(connection)
        .await
        .expect("AMQP 1.0 session");
    let mut receiver = fe2o3_amqp::Receiver::builder()
        .name("bench-raw-receive")
        .source(source)
        .credit_mode(CreditMode::Auto(CREDIT))
        .attach(&mut session)
        .await
        .expect("AMQP 1.0 receiver");
    let mut batch = Vec::with_capacity(100);
    let mut first = None;
    for _ in 0..n {
        let delivery = receiver.recv::<Body<Value>>().await.expect("recv");
        first.get_or_insert_with(Instant::now);
        batch.push(delivery);
        if batch.len() == 100 {
            receiver.accept_all(batch.drain(..)).await.expect("accept");
        }
    }
    if !batch.is_empty() {
        receiver.accept_all(batch.drain(..)).await.expect("accept");
    }
    let drained = first.expect("n > 0").elapsed();
    // Every delivery is settled by now; fe2o3 reports `IllegalState` when closing a
    // link on RabbitMQ 3.10's plugin, so, as the driver and the send bench do, detach
    // without minding the answer, and drop the session rather than await its end
    // (docs/drivers/amqp10.md, "Closing").
    let _ = receiver.detach().await;
    drop(session);
    drained
}

/// Waits (up to 5 s: settlements reach the queue asynchronously) until `left`, the
/// queue's message count, is 0, and fails the bench if it stays above: a drain that
/// did not settle.
pub async fn assert_drained<F: std::future::Future<Output = u64>>(
    queue: &str,
    mut left: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = left().await;
        if left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{queue} still has {left} messages after the drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
