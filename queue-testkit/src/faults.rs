//! The fault contract: confirmed messages survive an outage of the broker, and the
//! test proves the outage landed (docs/reliability.md).
//!
//! A broker fixture implements [`Outage`] (cut every connection, stop and start the
//! broker, kill and restart it); [`trials`] runs [`no_confirmed_message_lost`] for
//! every fault a backend's outage can inflict. After the fault, a case must show that
//! (a) work was outstanding when it struck (publishes in flight, or confirmed
//! messages not yet consumed), (b) the client saw it (a failed and retried publish, a
//! reconnect or a re-attached link), and (c) nothing confirmed was lost. A case whose
//! fault did not land fails; it does not pass.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use libtest_mimic::Trial;
use queue_core::{ConnectionReport, ConsumeOptions, Driver, QueueId};

use crate::{Backend, FaultCounts, PATIENCE, Tally, TestContext, number_of, numbered};

/// How long a fault test waits for its own broker to start and accept connections.
const START_LIMIT: Duration = Duration::from_secs(180);

/// What an [`Outage`] does to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The broker closes every client connection (and stays up).
    CutConnections,
    /// The broker stops gracefully and starts again, its data kept.
    StopStart,
    /// The broker is killed (SIGKILL) and started again from its data.
    Kill,
}

impl Fault {
    /// Its name in test names (`cut_connections`, `stop_start`, `kill`).
    pub fn name(self) -> &'static str {
        match self {
            Fault::CutConnections => "cut_connections",
            Fault::StopStart => "stop_start",
            Fault::Kill => "kill",
        }
    }

    /// Whether the broker restarts, so that what it had must come back from disk.
    pub fn restarts(self) -> bool {
        !matches!(self, Fault::CutConnections)
    }
}

/// A broker of the test's own that the test can strike. Blocking: the fault contract
/// calls it from a blocking section.
pub trait Outage: Send {
    /// Inflicts the fault and returns once the broker is back (for a restart: once it
    /// accepts connections again).
    fn inflict(&mut self, fault: Fault) -> Result<(), String>;

    /// What the broker itself says of its queues, for the message of a failed case.
    fn describe(&self) -> String {
        String::new()
    }
}

/// How much load the contract puts on the broker.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Publishes in flight at once.
    pub window: usize,
    /// The fault strikes once this many publishes are confirmed...
    pub strike_at: usize,
    /// ...and the publisher goes on for this many more after it struck.
    pub after_fault: i64,
    /// How long the consumers get, once publishing is done, to bring every confirmed
    /// message out (a lost one is noticed only when this runs out).
    pub drain_limit: Duration,
    /// How long one message may take to be confirmed, tries included: a driver that
    /// never comes back fails the case when this runs out.
    pub publish_limit: Duration,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            window: 256,
            strike_at: 2_000,
            after_fault: 3_000,
            drain_limit: Duration::from_secs(180),
            publish_limit: Duration::from_secs(180),
        }
    }
}

/// What a fault case measured.
#[derive(Debug, Clone)]
pub struct FaultReport {
    /// The end-to-end counts.
    pub counts: FaultCounts,
    /// Publishes in flight when the fault struck.
    pub in_flight_at_fault: usize,
    /// Confirmed but not yet consumed when the fault struck.
    pub unconsumed_at_fault: usize,
    /// The driver's connection report before the fault and at the end.
    pub connection: (Option<ConnectionReport>, Option<ConnectionReport>),
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; at the fault {} publishes in flight, {} confirmed not yet consumed",
            self.counts, self.in_flight_at_fault, self.unconsumed_at_fault
        )?;
        if let (Some(before), Some(after)) = &self.connection {
            write!(
                f,
                "; connections opened {} -> {}, links attached {} -> {}",
                before.connections_opened,
                after.connections_opened,
                before.links_attached,
                after.links_attached
            )?;
        }
        Ok(())
    }
}

/// Publishes numbered messages (each retried until confirmed) to two durable queues
/// while `outage` strikes with `fault`: one is consumed all along (its consumer must
/// ride the fault out), the other only after the fault (what it held must survive
/// it, from disk when the broker restarts). Returns what it measured, or why the case
/// failed: the fault did not land, or a confirmed message was lost.
pub async fn no_confirmed_message_lost(
    ctx: &TestContext,
    outage: &mut dyn Outage,
    fault: Fault,
    load: Load,
) -> Result<FaultReport, String> {
    let driver = ctx.driver_arc();
    let mut queues = Vec::new();
    for role in ["consumed", "held"] {
        // Durable, so what was confirmed survives a restart of the broker.
        let spec = ctx
            .spec(&format!("{}-{role}", fault.name()))
            .with_durable(true);
        tokio::time::timeout(PATIENCE, driver.declare(&spec))
            .await
            .map_err(|_| format!("declare did not finish within {PATIENCE:?}"))?
            .map_err(|e| format!("declare: {e}"))?;
        queues.push(spec.id);
    }
    let tally = Arc::new(Tally::new());
    let receiver = start_receiver(&driver, &queues[0], &tally, load.window as u32).await?;

    let total = Arc::new(AtomicI64::new(i64::MAX));
    let sent = Arc::new(AtomicI64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let publisher = tokio::spawn(publish_until(
        Arc::clone(&driver),
        queues.clone(),
        Arc::clone(&tally),
        load,
        Arc::clone(&total),
        Arc::clone(&sent),
        Arc::clone(&in_flight),
    ));

    if !tally
        .wait_confirmed(load.strike_at, Duration::from_secs(120))
        .await
    {
        return Err(format!(
            "{} publishes were not confirmed within 120 s",
            load.strike_at
        ));
    }
    let before = driver.connection();
    let failed_before = tally.counts().failed_publishes;
    let in_flight_at_fault = in_flight.load(Ordering::Relaxed) as usize;
    let unconsumed_at_fault = tally
        .confirmed_count()
        .saturating_sub(tally.consumed_count());
    tokio::task::block_in_place(|| outage.inflict(fault))?;
    let late_receiver = start_receiver(&driver, &queues[1], &tally, load.window as u32).await?;
    let end = sent.load(Ordering::Relaxed) + load.after_fault;
    total.store(end, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(300), publisher)
        .await
        .map_err(|_| "the publisher did not finish within 300 s".to_string())?
        .map_err(|e| format!("publisher: {e}"))??;
    let all_consumed = tally.wait_all_consumed(load.drain_limit).await;
    receiver.abort();
    late_receiver.abort();
    let report = FaultReport {
        counts: tally.counts(),
        in_flight_at_fault,
        unconsumed_at_fault,
        connection: (before, driver.connection()),
    };

    // (a) Work was outstanding when the fault struck.
    if in_flight_at_fault == 0 && unconsumed_at_fault == 0 {
        return Err(format!(
            "nothing was outstanding when the fault struck: {report}"
        ));
    }
    // (b) The client saw the fault.
    let failed_across = report.counts.failed_publishes > failed_before;
    let (reconnected, reattached) = match &report.connection {
        // The late receiver attaches one link of its own: it is not a re-attach.
        (Some(b), Some(a)) => (
            a.connections_opened > b.connections_opened,
            a.links_attached > b.links_attached + 1,
        ),
        _ => (false, false),
    };
    let saw = match fault {
        // A restarted broker drops every connection: the driver must have come back.
        Fault::StopStart | Fault::Kill => reconnected,
        Fault::CutConnections => reconnected || reattached || failed_across,
    };
    if !saw {
        return Err(format!(
            "the fault did not reach the driver (no reconnect, no re-attached link, no failed publish): {report}"
        ));
    }
    // (c) Nothing confirmed was lost.
    let missing = tally.missing();
    if !all_consumed || report.counts.lost > 0 {
        let broker = tokio::task::block_in_place(|| outage.describe());
        return Err(format!(
            "{} confirmed messages never came out, e.g. {:?}: {report}\nthe broker says:\n{broker}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if report.counts.confirmed != end as u64 {
        return Err(format!("{end} were to be confirmed: {report}"));
    }
    Ok(report)
}

async fn start_receiver(
    driver: &Arc<dyn Driver>,
    queue: &QueueId,
    tally: &Arc<Tally>,
    prefetch: u32,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut sub =
        tokio::time::timeout(PATIENCE, driver.consume(queue, ConsumeOptions { prefetch }))
            .await
            .map_err(|_| format!("consume did not finish within {PATIENCE:?}"))?
            .map_err(|e| format!("consume: {e}"))?;
    let tally = Arc::clone(tally);
    Ok(tokio::spawn(async move {
        while let Some(delivery) = sub.next().await {
            let Ok(delivery) = delivery else { continue };
            tally.consumed(number_of(&delivery));
            // An ack lost with the connection: the message comes again.
            let _ = delivery.ack().await;
        }
    }))
}

/// Keeps `window` publishes in flight until `total` are confirmed, taking turns
/// between the queues; each is tried again until it is (a broker that is down for a
/// while fails many tries).
async fn publish_until(
    driver: Arc<dyn Driver>,
    queues: Vec<QueueId>,
    tally: Arc<Tally>,
    load: Load,
    total: Arc<AtomicI64>,
    sent: Arc<AtomicI64>,
    in_flight: Arc<AtomicU64>,
) -> Result<(), String> {
    let mut pending = FuturesUnordered::new();
    let mut next = 0i64;
    loop {
        while pending.len() < load.window && next < total.load(Ordering::Relaxed) {
            let (driver, queue, tally, in_flight) = (
                Arc::clone(&driver),
                queues[next as usize % queues.len()].clone(),
                Arc::clone(&tally),
                Arc::clone(&in_flight),
            );
            let n = next;
            tally.publishing(n);
            in_flight.fetch_add(1, Ordering::Relaxed);
            pending.push(async move {
                let deadline = Instant::now() + load.publish_limit;
                let result = loop {
                    // A publish that never returns would hold the case until the
                    // publisher's 300 s limit: it fails at the deadline instead.
                    let Ok(published) = tokio::time::timeout_at(
                        deadline.into(),
                        driver.publish(&queue, numbered(n)),
                    )
                    .await
                    else {
                        break Err(format!(
                            "publish {n} did not return within {:?}",
                            load.publish_limit
                        ));
                    };
                    match published {
                        Ok(()) => {
                            tally.confirmed(n);
                            break Ok(());
                        }
                        Err(e) if !e.retryable() => {
                            break Err(format!("publish {n} failed for good: {e}"));
                        }
                        Err(e) if Instant::now() > deadline => {
                            break Err(format!("publish {n} never succeeded: {e}"));
                        }
                        Err(_) => {
                            tally.publish_failed();
                            // Paces the tries of a driver that fails at once while
                            // it is down.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                };
                in_flight.fetch_sub(1, Ordering::Relaxed);
                result
            });
            next += 1;
            sent.store(next, Ordering::Relaxed);
        }
        match pending.next().await {
            None => return Ok(()),
            Some(result) => result?,
        }
    }
}

type Start = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<(TestContext, Box<dyn Outage>), String>> + Send>>
        + Send
        + Sync,
>;

/// A backend that can be struck: how to start a broker of the test's own (and
/// connect to it), and which faults it can inflict.
#[derive(Clone)]
pub struct FaultBackend {
    backend: Backend,
    faults: Vec<Fault>,
    start: Start,
    load: Load,
}

impl FaultBackend {
    /// A backend named `name` (the first part of its test names) whose driver claims
    /// `capabilities` there (checked against the connected driver's), whose fault tests
    /// each start their own broker, and connect to it, with `start`.
    pub fn new<F, Fut>(
        name: &str,
        capabilities: queue_core::Capabilities,
        faults: &[Fault],
        start: F,
    ) -> FaultBackend
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(TestContext, Box<dyn Outage>), String>> + Send + 'static,
    {
        let backend = Backend::new(name, capabilities, || async {
            Err("a fault test connects through its own start".to_string())
        });
        FaultBackend {
            backend,
            faults: faults.to_vec(),
            start: Arc::new(move || Box::pin(start())),
            load: Load::default(),
        }
    }

    /// Marks the backend as one that cannot run here, and why (see
    /// [`Backend::unavailable_if`]).
    pub fn unavailable_if(mut self, reason: Option<String>) -> FaultBackend {
        self.backend = self.backend.unavailable_if(reason);
        self
    }

    /// Another load.
    pub fn with_load(mut self, load: Load) -> FaultBackend {
        self.load = load;
        self
    }
}

/// The fault contract against every backend, once per fault: `<backend>::faults::<fault>`,
/// printing its counts. The restarts are the persistence contract: they run on a
/// backend that claims `persistent` (and a fixture that cannot restart its broker fails
/// them, since the claim would go unproven); elsewhere they show as ignored, `lacks
/// persistent`, as does a fault the fixture cannot inflict.
pub fn trials(backends: &[FaultBackend]) -> Vec<Trial> {
    let mut trials = Vec::new();
    for fb in backends {
        let persistent = fb.backend.capabilities().persistent;
        for &fault in &[Fault::CutConnections, Fault::StopStart, Fault::Kill] {
            let name = format!("faults::{}", fault.name());
            let can_inflict = fb.faults.contains(&fault);
            let lacks = match (fault.restarts(), persistent, can_inflict) {
                (true, false, _) => Some("persistent"),
                (false, _, false) => Some("a fixture that cuts connections"),
                _ => None,
            };
            let (start, load, label, claimed) = (
                Arc::clone(&fb.start),
                fb.load,
                fb.backend.name().to_string(),
                fb.backend.capabilities(),
            );
            trials.push(fb.backend.fault_trial(&name, lacks, move || async move {
                if !can_inflict {
                    return Err(format!(
                        "the backend claims `persistent`, but its fixture cannot {}: the claim is unproven",
                        fault.name().replace('_', " ")
                    ));
                }
                // Starting a broker of the test's own waits for it to accept connections.
                let (ctx, mut outage) = tokio::time::timeout(START_LIMIT, start())
                    .await
                    .map_err(|_| format!("starting the broker did not finish within {START_LIMIT:?}"))??;
                if ctx.caps() != claimed {
                    return Err(format!(
                        "the driver claims {:?} on this backend, the suite was told {claimed:?}",
                        ctx.caps()
                    ));
                }
                let report = no_confirmed_message_lost(&ctx, outage.as_mut(), fault, load).await?;
                println!("{label} {}: {report}", fault.name());
                Ok(())
            }));
        }
    }
    trials
}
