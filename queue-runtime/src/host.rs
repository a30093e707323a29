//! The consumer host: creates drivers, declares queues, attaches consumers, runs
//! processes, detects idleness from the drivers' counts, and shuts down without
//! losing a message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use queue_core::{Backoff, ConsumeOptions, Driver, Error, QueueId, Queues, Result, Subscription};
use tokio::sync::{oneshot, watch};

use crate::health::{Attachment, ProcessState, WorkerTicks};
use crate::metrics::Metered;
use crate::registry::{DriverKinds, Plan, ProcessPlan};
use crate::workers::{Busy, ConsumerRuntime, Intake, Job, Workers};
use queue_core::retry::{Exhausted, FailurePath};

/// How long shutdown waits, beyond the longest `stop_timeout`, for the workers to hand
/// their consumers back and end.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long shutdown waits for a queue's counts for its summary.
const SUMMARY_TIMEOUT: Duration = Duration::from_secs(5);
/// The shutdown's deadline, beyond its grace, when there is no consumer to take the
/// longest `stop_timeout` from: how long a worker that does not yield (a process in
/// a loop Lua cannot yield from) may hold the stop. Processes are not waited for:
/// they stop with the workers (docs/consumers.md, "Shutdown").
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `--exit-when-idle` reads counts that keep failing before it gives up
/// (a broker reconnecting comes back well within it; docs/consumers.md).
const COUNTS_PATIENCE: Duration = Duration::from_secs(300);

/// Embeds more into each worker's Lua state, once, before any handler runs (see
/// [`HostOptions::lua_setup`]).
pub type LuaSetup = Arc<dyn Fn(&queue_lua::LuaHost) -> Result<()> + Send + Sync>;

/// How to run.
#[derive(Clone)]
pub struct HostOptions {
    /// Worker threads, each with one Lua state.
    pub lua_threads: usize,
    /// Keep trying to connect a driver whose broker is unreachable (with backoff from
    /// 1 s to 30 s) instead of failing; `run` does, one-off commands do not.
    pub wait_for_brokers: bool,
    /// Refuse to start when a consumed queue's driver cannot count its ready messages:
    /// `run --exit-when-idle` reads idleness from those counts and would otherwise end
    /// with messages still waiting.
    pub needs_queue_counts: bool,
    /// Run on every worker's Lua state when it starts: the place to embed modules of
    /// your own (set them in [`queue_lua::LuaHost::globals`]). A setup that fails
    /// fails the start.
    pub lua_setup: Option<LuaSetup>,
}

impl std::fmt::Debug for HostOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostOptions")
            .field("lua_threads", &self.lua_threads)
            .field("wait_for_brokers", &self.wait_for_brokers)
            .field("needs_queue_counts", &self.needs_queue_counts)
            .field("lua_setup", &self.lua_setup.as_ref().map(|_| "set"))
            .finish()
    }
}

impl Default for HostOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        HostOptions {
            lua_threads: cores.clamp(1, 8),
            wait_for_brokers: false,
            needs_queue_counts: false,
            lua_setup: None,
        }
    }
}

/// Creates a driver; while its broker is unreachable (a retryable error) and waiting
/// is on, tries again with a doubling delay.
async fn create_driver(
    factory: &Arc<dyn queue_core::DriverFactory>,
    id: &str,
    config: &serde_json::Value,
    wait: bool,
) -> Result<Arc<dyn Driver>> {
    let backoff = Backoff::new(Duration::from_secs(1), 2.0, Duration::from_secs(30));
    let mut attempt = 1;
    loop {
        match factory.create(config.clone()).await {
            Ok(driver) => return Ok(driver),
            Err(e) if wait && e.retryable() => {
                let delay = backoff.delay(attempt);
                tracing::warn!(driver = %id, error = %e, retry_in = ?delay, "broker unreachable; waiting for it");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e.context(format!("driver {id}"))),
        }
    }
}

fn refuse_uncounted_queues(plan: &Plan, drivers: &BTreeMap<String, Arc<dyn Driver>>) -> Result<()> {
    for c in &plan.consumers {
        let Some(q) = plan.queue(&c.queue) else {
            continue;
        };
        if drivers
            .get(&q.driver)
            .is_some_and(|d| !d.capabilities().info_ready)
        {
            return Err(Error::invalid(format!(
                "--exit-when-idle reads idleness from queue counts, and driver {} cannot count the messages of {} (consumer {}); run without --exit-when-idle and stop the runtime with a signal",
                q.driver, c.queue, c.id
            )));
        }
    }
    Ok(())
}

struct RunningConsumer {
    id: String,
    queue: QueueId,
    stop_timeout: Duration,
    /// Its deliveries being handled.
    active: Busy,
    /// One per worker the consumer runs on; each yields its subscription back once that
    /// worker stopped taking deliveries and its handlers finished.
    stopped: Vec<oneshot::Receiver<Box<dyn Subscription>>>,
    /// Its subscriptions and how many still take deliveries, for `/ready`.
    attachment: Attachment,
}

/// The counts of one consumed queue at shutdown, from its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSummary {
    /// The queue.
    pub queue: QueueId,
    /// Acknowledged since start, where the driver counts it.
    pub acked: Option<u64>,
    /// Ready in the queue.
    pub ready: Option<u64>,
    /// Still unsettled.
    pub in_flight: Option<u64>,
    /// Waiting out a delay (a retry's backoff): on the memory driver, lost when the
    /// process ends.
    pub delayed: Option<u64>,
}

impl std::fmt::Display for QueueSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<u64>| v.map_or_else(|| "unknown".to_string(), |n| n.to_string());
        write!(
            f,
            "queue={} acked={} ready={} in_flight={}",
            self.queue,
            show(self.acked),
            show(self.ready),
            show(self.in_flight)
        )?;
        // Only when some are: most queues never hold delayed messages.
        match self.delayed {
            Some(delayed) if delayed > 0 => write!(f, " delayed={delayed}"),
            _ => Ok(()),
        }
    }
}

/// A running runtime.
pub struct Host {
    plan: Plan,
    queues: Queues,
    drivers: BTreeMap<String, Arc<dyn Driver>>,
    workers: Option<Workers>,
    consumers: Vec<RunningConsumer>,
    stop: watch::Sender<bool>,
    busy: Busy,
    /// Each process's instances, running and failed: the runtime's counts of both are
    /// their sums.
    process_states: BTreeMap<String, ProcessState>,
    /// The tasks that hear how each process instance ended.
    process_reports: Vec<tokio::task::JoinHandle<()>>,
}

impl Host {
    /// Creates the drivers, declares every queue, attaches every consumer, then starts
    /// the processes.
    pub async fn start(plan: Plan, kinds: &DriverKinds, options: HostOptions) -> Result<Host> {
        let mut drivers = BTreeMap::new();
        for d in &plan.drivers {
            let factory = kinds
                .get(&d.kind)
                .ok_or_else(|| Error::invalid(format!("unknown driver kind {}", d.kind)))?;
            let driver = create_driver(factory, &d.id, &d.config, options.wait_for_brokers).await?;
            drivers.insert(
                d.id.clone(),
                crate::telemetry::Traced::layer(Metered::layer(driver)),
            );
        }
        let driver_of = |id: &str| -> Result<Arc<dyn Driver>> {
            drivers
                .get(id)
                .cloned()
                .ok_or_else(|| Error::internal(format!("driver {id} was not created")))
        };
        if options.needs_queue_counts {
            refuse_uncounted_queues(&plan, &drivers)?;
        }
        let queues = Queues::new();
        for q in &plan.queues {
            queues
                .declare(q.spec.clone(), q.settings, driver_of(&q.driver)?)
                .await
                .map_err(|e| e.context(format!("declare {}", q.spec.id)))?;
        }
        let workers = Workers::start(
            options.lua_threads,
            &queues,
            plan.strict,
            plan.lua_limits,
            options.lua_setup.clone(),
        )?;
        let (stop, _) = watch::channel(false);
        // Set once every consumer is attached (see `Intake::go`).
        let (go, _) = watch::channel(false);
        let busy = Busy::default();
        // Every handler is looked up first, on the workers that will run it, with its
        // entry's opt-ins: one that is not there would fail every delivery until each
        // is dead-lettered (or its process at once), so the start is refused instead,
        // before any subscription is made (one made had taken deliveries, and given
        // them back as redeliveries).
        let mut lookups = Vec::new();
        let mut placements = Vec::with_capacity(plan.consumers.len());
        for c in &plan.consumers {
            // The consumer runs on up to `concurrency` workers, each with its own
            // subscription and share of the slots and prefetch, so that a delivery is
            // pulled, handled and settled on one thread.
            let shares = workers.lua_states().min(c.concurrency as usize).max(1) as u32;
            let first_worker = workers.reserve(shares as usize);
            for share in 0..shares as usize {
                let lookup =
                    workers.find_handler(first_worker + share, &c.source, &c.method, c.opt_in);
                lookups.push((format!("consumer {}", c.id), lookup));
            }
            placements.push((shares, first_worker));
        }
        // A process runs on any worker, after `go`: its handler is looked up on one.
        let processes: Vec<Arc<ProcessPlan>> =
            plan.processes.iter().cloned().map(Arc::new).collect();
        for p in &processes {
            let lookup = workers.find_handler(0, &p.source, &p.method, p.opt_in);
            lookups.push((format!("process {}", p.id), lookup));
        }
        for (entry, lookup) in lookups {
            match lookup.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.context(entry)),
                Err(_) => {
                    return Err(Error::internal(format!(
                        "{entry}: its Lua worker stopped before it found the handler"
                    )));
                }
            }
        }
        let mut consumers = Vec::new();
        let dead_letter_queues = plan.dead_letter_queues();
        for (c, (shares, first_worker)) in plan.consumers.iter().zip(placements) {
            let q = plan
                .queue(&c.queue)
                .ok_or_else(|| Error::internal(format!("{} has no queue plan", c.id)))?;
            let driver = driver_of(&q.driver)?;
            let exhausted = match &q.dead_letter {
                Some(dlq) => {
                    let dlq_plan = plan
                        .queue(dlq)
                        .ok_or_else(|| Error::internal(format!("{dlq} has no queue plan")))?;
                    Exhausted::DeadLetter(dlq.clone(), driver_of(&dlq_plan.driver)?)
                }
                None => Exhausted::Drop,
            };
            let runtime = Arc::new(ConsumerRuntime {
                plan: c.clone(),
                failure: FailurePath {
                    queue: c.queue.clone(),
                    driver: Arc::clone(&driver),
                    retry: q.retry.clone(),
                    exhausted,
                    is_dead_letter_queue: dead_letter_queues.contains(&c.queue),
                    stop: stop.subscribe(),
                },
                meters: crate::metrics::ConsumerMeters::of(&c.queue),
                active: Busy::uncounted(),
                attached: Arc::default(),
            });
            let mut stopped = Vec::new();
            for share in 0..shares {
                let slots = c.concurrency / shares + u32::from(share < c.concurrency % shares);
                let prefetch = c.prefetch.div_ceil(shares).max(slots);
                let subscription = driver
                    .consume(&c.queue, ConsumeOptions { prefetch })
                    .await
                    .map_err(|e| e.context(format!("consumer {}", c.id)))?;
                runtime.attached.fetch_add(1, Ordering::AcqRel);
                let (done, back) = oneshot::channel();
                workers.dispatch_to(
                    first_worker + share as usize,
                    Job::Attach(Intake {
                        consumer: Arc::clone(&runtime),
                        subscription,
                        slots,
                        stop: stop.subscribe(),
                        go: go.subscribe(),
                        busy: busy.clone(),
                        stopped: done,
                    }),
                );
                stopped.push(back);
            }
            consumers.push(RunningConsumer {
                id: c.id.clone(),
                queue: c.queue.clone(),
                stop_timeout: c.stop_timeout,
                stopped,
                active: runtime.active.clone(),
                attachment: Attachment {
                    subscriptions: shares as usize,
                    attached: Arc::clone(&runtime.attached),
                },
            });
            tracing::info!(consumer = %c.id, queue = %c.queue, concurrency = c.concurrency, prefetch = c.prefetch, "consumer attached");
        }
        // Every consumer is attached: deliveries may be taken.
        go.send_replace(true);
        let mut process_states = BTreeMap::new();
        let mut process_reports = Vec::new();
        for p in processes {
            let state = ProcessState {
                instances: p.instances as usize,
                ..ProcessState::default()
            };
            let meters = crate::metrics::ProcessMeters::new(&p.id);
            for instance in 1..=p.instances {
                let (done, result) = tokio::sync::oneshot::channel();
                state.running.fetch_add(1, Ordering::AcqRel);
                meters.running.increment(1);
                workers.dispatch(Job::Process {
                    plan: Arc::clone(&p),
                    instance,
                    done,
                });
                let (state, meters) = (state.clone(), meters.clone());
                let id = p.id.clone();
                process_reports.push(tokio::spawn(async move {
                    match result.await {
                        Ok(Ok(())) => tracing::info!(process = %id, instance, "process finished"),
                        Ok(Err(e)) => {
                            state.failed.fetch_add(1, Ordering::AcqRel);
                            meters.failures.increment(1);
                            tracing::error!(process = %id, instance, error = %e, "process failed");
                        }
                        // Only a stop drops an instance: said once for them all
                        // ([`Host::shutdown`]), not in a line each (10,000 lines).
                        Err(_) => {
                            state.stopped.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    state.running.fetch_sub(1, Ordering::AcqRel);
                    meters.running.decrement(1);
                }));
            }
            process_states.insert(p.id.clone(), state);
        }
        Ok(Host {
            plan,
            queues,
            drivers,
            workers: Some(workers),
            consumers,
            stop,
            busy,
            process_states,
            process_reports,
        })
    }

    /// The processes with instances still running, as `app:feeder (3)`, or `none`:
    /// the suspects when a worker does not stop.
    fn processes_running(&self) -> String {
        let running: Vec<String> = self
            .process_states
            .iter()
            .map(|(id, state)| (id, state.running.load(Ordering::Acquire)))
            .filter(|(_, n)| *n > 0)
            .map(|(id, n)| format!("{id} ({n})"))
            .collect();
        if running.is_empty() {
            "none".to_string()
        } else {
            running.join(", ")
        }
    }

    /// One line per process whose instances the stop ended before they finished.
    fn say_processes_stopped(&self) {
        for (id, state) in &self.process_states {
            let stopped = state.stopped.load(Ordering::Acquire);
            if stopped > 0 {
                tracing::warn!(process = %id, instances = stopped, "process stopped before it finished");
            }
        }
    }

    /// The publishing facade of this runtime's queues.
    pub fn queues(&self) -> &Queues {
        &self.queues
    }

    /// The plan it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The drivers, by entry id.
    pub fn drivers(&self) -> &BTreeMap<String, Arc<dyn Driver>> {
        &self.drivers
    }

    /// Each consumer's subscriptions and how many still take deliveries, by id.
    pub fn attachments(&self) -> BTreeMap<String, Attachment> {
        self.consumers
            .iter()
            .map(|c| (c.id.clone(), c.attachment.clone()))
            .collect()
    }

    /// Each process's instances, how many still run and how many failed, by id.
    pub fn processes(&self) -> BTreeMap<String, ProcessState> {
        self.process_states.clone()
    }

    /// When each Lua worker last had a turn on its thread (`/ready` reads them).
    pub fn worker_ticks(&self) -> WorkerTicks {
        self.workers
            .as_ref()
            .map_or_else(|| WorkerTicks::new(0), Workers::ticks)
    }

    /// How many Lua states run handlers.
    pub fn lua_states(&self) -> usize {
        self.workers.as_ref().map_or(0, Workers::lua_states)
    }

    /// Processes that raised an error.
    pub fn process_failures(&self) -> usize {
        total(&self.process_states, |p| &p.failed)
    }

    /// [`Host::process_failures`] as it will be at any later time, after
    /// [`Host::shutdown`] too: processes run on while handlers finish during a stop,
    /// and may fail then.
    pub fn process_failures_later(&self) -> impl Fn() -> usize + use<> {
        let processes = self.process_states.clone();
        move || total(&processes, |p| &p.failed)
    }

    /// Whether there is nothing left to do: every process finished, no delivery is
    /// being handled or waiting for a retry, and every consumed queue's driver reports
    /// no ready, in-flight or delayed message.
    pub async fn is_idle(&self) -> Result<bool> {
        if total(&self.process_states, |p| &p.running) > 0 || self.busy.count() > 0 {
            return Ok(false);
        }
        for c in &self.consumers {
            let info = self.queues.info(c.queue.as_str()).await?;
            if info.ready.unwrap_or(0) + info.in_flight.unwrap_or(0) + info.delayed.unwrap_or(0) > 0
            {
                return Ok(false);
            }
        }
        Ok(self.busy.count() == 0)
    }

    /// Waits until [`Host::is_idle`] holds on two reads of the counts in a row, 50 ms
    /// apart. One read is not enough on a broker: RabbitMQ counts neither deliveries
    /// on their way to this process nor a retry copy that is moving out of its delay
    /// queue, and either shows up in a count (or in the runtime's own) by the next read.
    /// A count that fails for a while (a broker reconnecting, a queue the broker lost
    /// and its consumer declares again) is read again: only one that cannot come back
    /// (the driver closed, a refused login) ends the wait, with its error, and the
    /// caller still shuts down in order. A lost queue ended it at once, though the
    /// drivers declare it again (review).
    /// Counts that keep failing for [`COUNTS_PATIENCE`] end the wait too: a broker gone
    /// for good must not hold a batch job for ever.
    pub async fn wait_idle(&self) -> Result<()> {
        let mut idle_reads = 0;
        let mut failing_since: Option<tokio::time::Instant> = None;
        loop {
            match self.is_idle().await {
                Ok(idle) => {
                    if failing_since.take().is_some() {
                        tracing::info!("the queue counts can be read again");
                    }
                    idle_reads = if idle { idle_reads + 1 } else { 0 };
                    if idle_reads == 2 {
                        return Ok(());
                    }
                }
                Err(e) if e.retryable() || e.is(queue_core::ErrorKind::NotFound) => {
                    idle_reads = 0;
                    let since = *failing_since.get_or_insert_with(|| {
                        tracing::warn!(error = %e, "a queue count failed; reading it again");
                        tokio::time::Instant::now()
                    });
                    if since.elapsed() >= COUNTS_PATIENCE {
                        return Err(e.context(format!(
                            "the queue counts could not be read for {COUNTS_PATIENCE:?}"
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops taking deliveries, lets running handlers finish for up to each consumer's
    /// `stop_timeout`, returns every unfinished or prefetched delivery to its queue,
    /// reports the consumed queues' counts and closes the drivers.
    pub async fn shutdown(mut self) -> Vec<QueueSummary> {
        let _ = self.stop.send(true);
        // One deadline for everything: consumers stop side by side, and a handler or
        // process that never yields (a Lua loop holds its worker thread) is left
        // behind at the deadline instead of holding up the exit.
        let longest = self
            .consumers
            .iter()
            .map(|c| c.stop_timeout)
            .max()
            .unwrap_or(DEFAULT_STOP_TIMEOUT);
        let deadline = queue_core::deadline_after(longest.saturating_add(STOP_GRACE));
        let returns = std::mem::take(&mut self.consumers).into_iter().map(|c| async move {
            let mut subscriptions = Vec::new();
            let mut late = 0;
            for back in c.stopped {
                match tokio::time::timeout_at(deadline, back).await {
                    Ok(Ok(sub)) => subscriptions.push(sub),
                    Ok(Err(_)) => {
                        tracing::warn!(consumer = %c.id, queue = %c.queue, "a worker stopped before handing its consumer back")
                    }
                    Err(_) => late += 1,
                }
            }
            (c.id, c.queue, c.active, subscriptions, late)
        });
        let mut subscriptions = Vec::new();
        let mut stuck_workers = false;
        for (id, queue, active, subs, late) in futures_util::future::join_all(returns).await {
            subscriptions.extend(subs);
            if late == 0 {
                continue;
            }
            stuck_workers = true;
            if active.count() > 0 {
                tracing::error!(consumer = %id, queue = %queue, "a handler is stuck and does not yield; its worker is left behind, and its deliveries return to the queue when the connection closes");
            } else {
                tracing::warn!(consumer = %id, queue = %queue, "did not stop in time: it shares a worker with a stuck handler or process; its deliveries return to the queue when the connection closes");
            }
        }
        if let Some(workers) = self.workers.take() {
            let grace = if stuck_workers {
                Duration::ZERO
            } else {
                STOP_GRACE
            };
            let until = deadline.max(tokio::time::Instant::now() + grace);
            match stop_on_a_thread(workers) {
                Ok(stopping) => {
                    if tokio::time::timeout_at(until, stopping).await.is_err() {
                        let running = self.processes_running();
                        tracing::error!(
                            processes_running = %running,
                            "a process or handler still runs without yielding; leaving its worker behind"
                        );
                    } else {
                        // Every instance's end is told once its worker is gone.
                        let reports = std::mem::take(&mut self.process_reports);
                        let heard = futures_util::future::join_all(reports);
                        let _ = tokio::time::timeout(STOP_GRACE, heard).await;
                    }
                    self.say_processes_stopped();
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a thread to stop the Lua workers; leaving them behind")
                }
            }
        }
        // Side by side: each waits for the broker (up to its driver's limits), and a
        // broker that hangs would otherwise make the waits add up.
        let cancels = subscriptions.into_iter().map(|sub| async move {
            if let Err(e) = sub.cancel().await {
                tracing::warn!(error = %e, "cancelling a consumer failed; the broker returns its messages when the connection closes");
            }
        });
        futures_util::future::join_all(cancels).await;
        let counts = self.plan.consumers.iter().filter_map(|c| {
            let registered = self.queues.get(&c.queue)?;
            Some(async move {
                // Counts are for the summary: a broker that does not answer leaves
                // them unknown rather than holding up the exit.
                let info = tokio::time::timeout(SUMMARY_TIMEOUT, registered.driver.info(&c.queue))
                    .await
                    .ok()
                    .and_then(|info| info.ok())
                    .unwrap_or_default();
                QueueSummary {
                    queue: c.queue.clone(),
                    acked: registered.driver.acked_total(&c.queue),
                    ready: info.ready,
                    in_flight: info.in_flight,
                    delayed: info.delayed,
                }
            })
        });
        let summary = futures_util::future::join_all(counts).await;
        self.say_what_exit_loses().await;
        let closes = self.drivers.iter().map(|(id, driver)| async move {
            if let Err(e) = driver.close().await {
                tracing::warn!(driver = %id, error = %e, "closing the driver failed");
            }
        });
        futures_util::future::join_all(closes).await;
        summary
    }

    /// Names each queue nobody consumes whose driver keeps messages in this process
    /// only (the memory driver) and that still holds some: a dead-letter queue, an
    /// outbox. The summary names consumed queues only, and these went without a word
    /// (docs/drivers/memory.md, "What it does not do").
    async fn say_what_exit_loses(&self) {
        let consumed: std::collections::HashSet<&QueueId> =
            self.plan.consumers.iter().map(|c| &c.queue).collect();
        let in_process = self
            .queues
            .all()
            .into_iter()
            .filter(|q| !q.driver.capabilities().persistent && !consumed.contains(&q.spec.id));
        let said = in_process.map(|q| async move {
            let info = tokio::time::timeout(SUMMARY_TIMEOUT, q.driver.info(&q.spec.id))
                .await
                .ok()
                .and_then(|info| info.ok())
                .unwrap_or_default();
            let (ready, in_flight, delayed) = (
                info.ready.unwrap_or(0),
                info.in_flight.unwrap_or(0),
                info.delayed.unwrap_or(0),
            );
            if ready + in_flight + delayed > 0 {
                tracing::warn!(queue = %q.spec.id, ready, in_flight, delayed, "messages nobody consumes here are lost as the process exits (the memory driver keeps them in this process only)");
            }
        });
        futures_util::future::join_all(said).await;
    }
}

/// Joins the Lua workers on a thread of its own, with a small stack: every other
/// thread takes `RUST_MIN_STACK` (sized for lapin's parser), and under an
/// address-space limit close to what the runtime uses, the pool's next thread could
/// not start, and the stop panicked.
fn stop_on_a_thread(workers: Workers) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (stopped, stopping) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("queue-stop".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            workers.stop();
            let _ = stopped.send(());
        })?;
    Ok(stopping)
}

/// The sum of one of the processes' counts (`running` or `failed`) over all of them.
fn total(
    processes: &BTreeMap<String, ProcessState>,
    count: impl Fn(&ProcessState) -> &Arc<AtomicUsize>,
) -> usize {
    processes
        .values()
        .map(|p| count(p).load(Ordering::Acquire))
        .sum()
}
