//! The worker pool: a few threads, each with its own Lua state and a single-threaded
//! tokio runtime, running many handlers as coroutines. 1000 handlers at once are 1000
//! coroutines on these few states, never 1000 Lua states.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Instant;

use async_trait::async_trait;
use queue_core::security::SecurityContext;
use queue_core::{Delivery, Error, ErrorKind, Queues, Result, Subscription, Value};
use queue_lua::{DeliveryContext, Handler, LuaHost, LuaSource, OptIn, Outcome, Settle};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::health::{WORKER_TICK, WorkerTicks};
use crate::metrics::{ConsumerMeters, names as metric};
use crate::registry::{ConsumerPlan, ProcessPlan};
use crate::telemetry;
use queue_core::retry::{Disposition, FailurePath};

/// A consumer as the workers see it.
pub struct ConsumerRuntime {
    /// What the configuration said.
    pub plan: ConsumerPlan,
    /// Where failures go.
    pub failure: FailurePath,
    /// What it counts per delivery.
    pub meters: ConsumerMeters,
    /// Its deliveries being handled right now: at shutdown, a consumer that did not
    /// stop in time with none of these was held up by another consumer's stuck
    /// handler on the same worker, and is not the one to blame.
    pub active: Busy,
    /// Its subscriptions still taking deliveries: one per worker it runs on, until its
    /// subscription ends (docs/operations.md, "Health": not ready below that).
    pub attached: Arc<AtomicUsize>,
}

/// Work for a worker thread.
pub enum Job {
    /// Consume a subscription on this worker: pull deliveries and run the consumer's
    /// handler for each, at most `slots` at once, all on this thread.
    Attach(Intake),
    /// Run one instance of a process.
    Process {
        /// The process.
        plan: Arc<ProcessPlan>,
        /// Its instance number (1-based), passed as the argument.
        instance: u32,
        /// Told how it ended.
        done: oneshot::Sender<Result<()>>,
    },
    /// Look a handler up without running it ([`Workers::find_handler`]).
    FindHandler {
        /// Its file.
        source: LuaSource,
        /// Its function.
        method: String,
        /// What its entry opts into.
        opt_in: OptIn,
        /// Told whether it was found.
        found: oneshot::Sender<Result<()>>,
    },
}

/// One worker's share of a consumer.
pub struct Intake {
    /// The consumer.
    pub consumer: Arc<ConsumerRuntime>,
    /// This worker's subscription to the consumer's queue.
    pub subscription: Box<dyn Subscription>,
    /// Handlers this worker may run at once for the consumer.
    pub slots: u32,
    /// Set when the runtime stops.
    pub stop: watch::Receiver<bool>,
    /// Set once every consumer is attached: until then no delivery is taken, so a
    /// start that fails or is cut off halfway leaves no handler mid-settlement. Its
    /// sender dropped unset means the start was abandoned.
    pub go: watch::Receiver<bool>,
    /// Counts deliveries until settled.
    pub busy: Busy,
    /// Gets the subscription back once intake stopped and running handlers finished
    /// (or `stop_timeout` passed), for the host to cancel.
    pub stopped: oneshot::Sender<Box<dyn Subscription>>,
}

/// Counts deliveries that are being handled or wait for a retry, and reports them as
/// the in-flight gauge (create it after installing the metrics recorder).
///
/// Every worker thread counts each of its deliveries in and out, so the count is
/// split in per-thread shards, each on its own cache line: one shared counter made the
/// threads take its cache line from one another twice per delivery. Reading it (at
/// shutdown, for health) adds the shards up.
#[derive(Clone)]
pub struct Busy {
    shards: Arc<[Shard; SHARDS]>,
    gauge: Option<metrics::Gauge>,
}

/// How many shards a [`Busy`] count has; threads beyond it share them.
const SHARDS: usize = 16;

/// How long a consumer's stop waits, past its `stop_timeout`, for the handlers it
/// dropped to release their deliveries (their `__close` handlers run, 100 ms each at
/// most).
const CUT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// One thread's part of a [`Busy`] count, alone on its cache line (128 bytes: the
/// adjacent-line prefetcher of x86 pulls lines in pairs).
#[derive(Default)]
#[repr(align(128))]
struct Shard(AtomicUsize);

/// This thread's shard index, handed out round robin as threads first count.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

impl Default for Busy {
    fn default() -> Self {
        Busy {
            shards: Arc::default(),
            gauge: Some(metrics::gauge!(metric::IN_FLIGHT)),
        }
    }
}

impl Busy {
    /// A count that reports to no gauge.
    pub fn uncounted() -> Self {
        Busy {
            shards: Arc::default(),
            gauge: None,
        }
    }

    /// Marks one delivery busy until the guard drops.
    pub fn enter(&self) -> BusyGuard<'_> {
        if let Some(gauge) = &self.gauge {
            gauge.increment(1.0);
        }
        self.guard(true)
    }

    /// Marks busy what a delivery's run counts in the gauge already (its settlement,
    /// going on beside the handler that awaits it): a `msg:nack()` held through a
    /// backoff counted its delivery twice in `queue_in_flight` (review).
    fn enter_unmetered(&self) -> BusyGuard<'_> {
        self.guard(false)
    }

    fn guard(&self, metered: bool) -> BusyGuard<'_> {
        let shard = &self.shards[shard_index()];
        shard.0.fetch_add(1, Ordering::AcqRel);
        BusyGuard {
            busy: self,
            shard,
            metered,
        }
    }

    /// How many are busy.
    pub fn count(&self) -> usize {
        // A guard counts out on the shard it counted in, so no shard goes below zero
        // and the sum is exact once nothing enters or leaves.
        self.shards
            .iter()
            .map(|shard| shard.0.load(Ordering::Acquire))
            .sum()
    }
}

/// See [`Busy::enter`].
pub struct BusyGuard<'a> {
    busy: &'a Busy,
    shard: &'a Shard,
    /// Whether it counts in the gauge.
    metered: bool,
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.shard.0.fetch_sub(1, Ordering::AcqRel);
        if let Some(gauge) = self.busy.gauge.as_ref().filter(|_| self.metered) {
            gauge.decrement(1.0);
        }
    }
}

/// The pool.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
    ticks: WorkerTicks,
}

impl Workers {
    /// Starts `threads` workers (at least one), each with its own Lua state publishing
    /// through `queues`.
    pub fn start(
        threads: usize,
        queues: &Queues,
        strict: bool,
        limits: queue_lua::Limits,
        setup: Option<crate::host::LuaSetup>,
    ) -> Result<Workers> {
        let threads = threads.max(1);
        let mut senders = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        let ticks = WorkerTicks::new(threads);
        for index in 0..threads {
            let (tx, rx) = mpsc::unbounded_channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let queues = queues.clone();
            let setup = setup.clone();
            let ticking = (ticks.clone(), index);
            let handle = std::thread::Builder::new()
                .name(format!("lua-{index}"))
                .spawn(move || worker_main(rx, queues, strict, limits, setup, ticking, ready_tx))
                .map_err(|e| Error::internal(format!("cannot start a worker thread: {e}")))?;
            ready_rx
                .recv()
                .map_err(|_| Error::internal("a worker thread died while starting"))??;
            senders.push(tx);
            handles.push(handle);
        }
        metrics::gauge!(metric::LUA_STATES).set(threads as f64);
        Ok(Workers {
            senders,
            threads: handles,
            next: AtomicUsize::new(0),
            ticks,
        })
    }

    /// When each worker last had a turn on its thread (`/ready` reads them).
    pub fn ticks(&self) -> WorkerTicks {
        self.ticks.clone()
    }

    /// How many Lua states (one per worker thread).
    pub fn lua_states(&self) -> usize {
        self.threads.len()
    }

    /// Hands a job to the next worker, round robin.
    pub fn dispatch(&self, job: Job) {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.dispatch_to(i, job);
    }

    /// Takes the next `n` workers of the round robin and returns the first one's
    /// index: a consumer spread over `n` workers starts where the last job ended, so
    /// consumers (and processes) are spread over all workers, not piled on the first.
    pub fn reserve(&self, n: usize) -> usize {
        self.next.fetch_add(n, Ordering::Relaxed)
    }

    /// Has worker `index` load `source` (with `opt_in`) and look `method` up in it,
    /// without running it: the start looks up every handler this way, on the workers
    /// that will run it, before any subscription is made (docs/configuration.md,
    /// "Where a consumer's method is found").
    pub fn find_handler(
        &self,
        index: usize,
        source: &LuaSource,
        method: &str,
        opt_in: OptIn,
    ) -> oneshot::Receiver<Result<()>> {
        let (found, lookup) = oneshot::channel();
        self.dispatch_to(
            index,
            Job::FindHandler {
                source: source.clone(),
                method: method.to_string(),
                opt_in,
                found,
            },
        );
        lookup
    }

    /// Hands a job to worker `index` (modulo the number of workers).
    pub fn dispatch_to(&self, index: usize, job: Job) {
        if self.senders[index % self.senders.len()].send(job).is_err() {
            // The worker is stopping: dropping the job returns what it holds.
            tracing::debug!("job dropped: worker stopped");
        }
    }

    /// Stops the workers. Handlers still running are dropped, which returns their
    /// deliveries to the queue.
    pub fn stop(self) {
        drop(self.senders);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn worker_main(
    mut rx: mpsc::UnboundedReceiver<Job>,
    queues: Queues,
    strict: bool,
    limits: queue_lua::Limits,
    setup: Option<crate::host::LuaSetup>,
    (ticks, index): (WorkerTicks, usize),
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    // With the I/O driver, so that functions embedded with `lua_setup` can use tokio's
    // sockets: without it the workers ran no faster (docs/performance.md, "Lua threads
    // without tokio's I/O driver").
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(Error::internal(format!("worker runtime: {e}"))));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let host = match LuaHost::with_limits(queues, SecurityContext::unrestricted(strict), limits)
            .and_then(|host| {
                if let Some(setup) = &setup {
                    setup(&host).map_err(|e| e.context("lua_setup"))?;
                }
                Ok(host)
            }) {
            Ok(h) => Rc::new(h),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        // A turn of this thread's own: it stops when the thread is held.
        tokio::task::spawn_local(async move {
            loop {
                ticks.tick(index);
                tokio::time::sleep(WORKER_TICK).await;
            }
        });
        while let Some(job) = rx.recv().await {
            tokio::task::spawn_local(run_job(Rc::clone(&host), job));
        }
        host.closing();
    });
    // What still runs (a process, a handler past its stop) is dropped with the set:
    // inside the runtime, whose timers a `__close` that publishes needs. Outside it,
    // such a publish panicked the thread ("there is no reactor running") halfway
    // through the `__close` (review).
    let _inside = runtime.enter();
    drop(local);
}

async fn run_job(host: Rc<LuaHost>, job: Job) {
    match job {
        Job::Attach(intake) => run_intake(host, intake).await,
        Job::FindHandler {
            source,
            method,
            opt_in,
            found,
        } => {
            let _ = found.send(host.handler_in(&source, &method, opt_in).map(drop));
        }
        Job::Process {
            plan,
            instance,
            done,
        } => {
            let run = async {
                let result = match host.handler_in(&plan.source, &plan.method, plan.opt_in) {
                    Ok(handler) => {
                        host.run_process(
                            &handler,
                            vec![Value::Int(i64::from(instance))],
                            plan.security.clone(),
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = &result {
                    telemetry::record_failure(e.message());
                }
                result
            };
            // With tracing on, what the process publishes starts a trace.
            let result = if telemetry::enabled() {
                run.instrument(telemetry::process_span(&plan.id, instance))
                    .await
            } else {
                run.await
            };
            let _ = done.send(result);
        }
    }
}

/// Runs a worker's share of a consumer: `slots` runners on this thread take turns at
/// the subscription, and each runs one delivery at a time from handler to settlement.
/// The runner holding the subscription keeps it while its handlers finish without
/// suspending, and passes it on when one suspends (see [`run_in_turn`]): nothing is
/// spawned, and no task is woken, per message.
async fn run_intake(host: Rc<LuaHost>, intake: Intake) {
    let Intake {
        consumer,
        subscription,
        slots,
        mut stop,
        mut go,
        busy,
        stopped,
    } = intake;
    // Found on this worker before the subscription was made (`Workers::find_handler`);
    // here it comes from the state's loaded files.
    let handler = match host.handler_in(
        &consumer.plan.source,
        &consumer.plan.method,
        consumer.plan.opt_in,
    ) {
        Ok(handler) => Rc::new(handler),
        Err(e) => {
            tracing::error!(consumer = %consumer.plan.id, error = %e, "the consumer's handler is gone from this worker; it takes no deliveries here");
            consumer.attached.fetch_sub(1, Ordering::AcqRel);
            return;
        }
    };
    // On a clone: `wait_for` marks what it saw as seen, and the runners' copy of
    // `stop` (below) must still see a stop that came before they started.
    let mut stop_before_go = stop.clone();
    let start_went_through = tokio::select! {
        biased;
        go = go.wait_for(|go| *go) => go.is_ok(),
        _ = stop_before_go.wait_for(|s| *s) => true,
    };
    if !start_went_through {
        // Nothing was taken: the deliveries it prefetched go back with it.
        drop(subscription);
        return;
    }
    let runners = TaskTracker::new();
    let shared = Rc::new(Runners {
        host,
        handler,
        consumer,
        busy,
        tasks: runners.clone(),
        subscription: RefCell::new(Some(subscription)),
        turn_free: tokio::sync::Notify::new(),
        stopped_yet: stop.clone(),
        stop_signal: tokio::sync::Notify::new(),
        cut: Cell::new(false),
        cut_signal: tokio::sync::Notify::new(),
    });
    for _ in 0..slots.max(1) {
        runners.spawn_local(run_in_turn(Rc::clone(&shared)));
    }
    runners.close();
    // Until the stop signal, or until the subscription ended and every runner with it.
    // A stop that came while a handler computed on this thread finds both ready once
    // the thread is free (the runners end on the stop too): the stop is looked at
    // first, and the runners' end is an error only without it.
    tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => {}
        _ = runners.wait() => {
            if !shared.stopping() {
                tracing::error!(queue = %shared.consumer.plan.queue, consumer = %shared.consumer.plan.id, "the consumer's subscription ended; it takes no more deliveries on this worker");
            }
        }
    }
    shared.consumer.attached.fetch_sub(1, Ordering::AcqRel);
    shared.stop_signal.notify_waiters();
    // A runner settles its delivery before it looks at the stop signal again, so this
    // waits for settlements too: no ack or retry copy is cut in half.
    let finished = tokio::time::timeout(shared.consumer.plan.stop_timeout, runners.wait()).await;
    if finished.is_err() {
        tracing::warn!(queue = %shared.consumer.plan.queue, timeout = ?shared.consumer.plan.stop_timeout, "handlers still running at stop_timeout; their messages go back to the queue");
        // Their runs are dropped now, as at a handler's `timeout`: each releases its
        // delivery. Left running, they went on until the longest `stop_timeout` of the
        // runtime's consumers, and acked what this said went back (review). A
        // settlement under way is not cut: a retry copy published and its original
        // released would be a duplicate.
        shared.cut.set(true);
        shared.cut_signal.notify_waiters();
        let _ = tokio::time::timeout(CUT_GRACE, runners.wait()).await;
    }
    // Runners still busy are inside a suspended handler, never holding the
    // subscription: a runner gives it back before it waits for anything but a delivery.
    let subscription = shared.subscription.borrow_mut().take();
    if let Some(subscription) = subscription {
        let _ = stopped.send(subscription);
    }
}

/// What the runners of one intake share.
struct Runners {
    host: Rc<LuaHost>,
    handler: Rc<Handler>,
    consumer: Arc<ConsumerRuntime>,
    busy: Busy,
    /// The runners, and the settlements handlers start themselves (`msg:ack()`,
    /// `msg:nack()`): shutdown waits for both.
    tasks: TaskTracker,
    /// Here while no runner holds it (see [`Turn`]); taken back by the intake when it
    /// stops.
    subscription: RefCell<Option<Box<dyn Subscription>>>,
    /// Signalled when a runner puts the subscription back.
    turn_free: tokio::sync::Notify,
    /// Read before each delivery: `has_changed` is one atomic load, where waiting on
    /// the watch channel once per delivery made the worker threads fight over its
    /// lock. Stop is only ever sent once.
    stopped_yet: watch::Receiver<bool>,
    /// The stop signal relayed on this thread, for runners waiting for a delivery.
    stop_signal: tokio::sync::Notify,
    /// Set at the consumer's `stop_timeout`: handlers still running are dropped.
    cut: Cell<bool>,
    /// Signalled with `cut`, for the handlers running then.
    cut_signal: tokio::sync::Notify,
}

impl Runners {
    fn stopping(&self) -> bool {
        !matches!(self.stopped_yet.has_changed(), Ok(false))
    }

    /// Resolves once the consumer's `stop_timeout` has passed in a stop.
    async fn past_stop_timeout(&self) {
        if !self.cut.get() {
            self.cut_signal.notified().await;
        }
    }

    /// Waits until the subscription is free and takes it; `None` once the runtime
    /// stops.
    async fn take_turn(&self) -> Option<Turn<'_>> {
        loop {
            if self.stopping() {
                return None;
            }
            let subscription = self.subscription.borrow_mut().take();
            if let Some(subscription) = subscription {
                return Some(Turn {
                    runners: self,
                    subscription: Some(subscription),
                });
            }
            // A put-back between the look above and this wait leaves a permit.
            tokio::select! {
                biased;
                _ = self.stop_signal.notified() => return None,
                _ = self.turn_free.notified() => {}
            }
        }
    }
}

/// A runner's hold on the subscription; dropping it puts the subscription back and
/// wakes one runner waiting for it.
struct Turn<'a> {
    runners: &'a Runners,
    subscription: Option<Box<dyn Subscription>>,
}

impl Turn<'_> {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        self.subscription.as_mut()?.next().await
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if let Some(subscription) = self.subscription.take() {
            *self.runners.subscription.borrow_mut() = Some(subscription);
            self.runners.turn_free.notify_one();
        }
    }
}

/// One runner. With the subscription held, it takes a delivery and polls its handling
/// once: a handler that finishes without suspending (the common case) leaves the
/// runner holding the subscription for the next delivery, so no other runner is woken;
/// one that suspends (a publish, a sleep) makes the runner pass the subscription on
/// before it waits, so up to `slots` handlers run at once. Handing the subscription
/// from runner to runner per message, as a fair lock does, cost a task switch each.
async fn run_in_turn(runners: Rc<Runners>) {
    while let Some(mut turn) = runners.take_turn().await {
        loop {
            if runners.stopping() {
                return;
            }
            let next = tokio::select! {
                biased;
                _ = runners.stop_signal.notified() => return,
                next = turn.next() => next,
            };
            let delivery = match next {
                // Returning puts the subscription back (the turn's drop), so the
                // other runners find the end too.
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(queue = %runners.consumer.plan.queue, error = %e, "consumer error");
                    continue;
                }
                Some(Ok(delivery)) => delivery,
            };
            let mut handling = std::pin::pin!(run_delivery(&runners, delivery));
            let first = std::future::poll_fn(|cx| Poll::Ready(handling.as_mut().poll(cx))).await;
            if first.is_ready() {
                // Lets the worker's other tasks run now and then: a consumer whose
                // queue stays full never waits on anything else.
                tokio::task::coop::consume_budget().await;
                continue;
            }
            drop(turn);
            handling.await;
            break;
        }
    }
}

/// Handles one delivery, counted busy (for the host and for its consumer) until it is
/// settled.
async fn run_delivery(runners: &Rc<Runners>, delivery: Delivery) {
    let _busy = runners.busy.enter();
    let _active = runners.consumer.active.enter();
    if telemetry::enabled() {
        // Handled, settled and retried in a span whose parent is the
        // context the message carries.
        let span = telemetry::delivery_span(
            runners.consumer.failure.driver.name(),
            &runners.consumer.plan.queue,
            delivery.message(),
        );
        handle_delivery(runners, delivery).instrument(span).await;
    } else {
        handle_delivery(runners, delivery).await;
    }
}

async fn handle_delivery(runners: &Rc<Runners>, delivery: Delivery) {
    let Runners {
        host,
        handler,
        consumer,
        ..
    } = &**runners;
    consumer.meters.delivered.increment(1);
    let delivery = Arc::new(delivery);
    if let Some(count) = consumer.failure.redelivered_too_often(&delivery) {
        give_up_on_crash_loop(runners, &delivery, count).await;
        return;
    }
    let started = Instant::now();
    let outcome = match host.decode_payload(delivery.message()) {
        // A body that cannot be decoded now never will be.
        Err(e) if e.kind() == ErrorKind::Invalid => Outcome::Nack {
            reason: format!("the body cannot be decoded: {}", e.message()),
            retryable: false,
        },
        Err(e) => Outcome::Nack {
            reason: e.to_string(),
            retryable: true,
        },
        Ok(payload) => {
            let settle = Rc::new(RuntimeSettle {
                delivery: Arc::clone(&delivery),
                runners: Rc::clone(runners),
            });
            let context = DeliveryContext {
                message: delivery.shared_message(),
                settle,
            };
            let run = host.run_handler_within(
                handler,
                payload,
                context,
                consumer.plan.security.clone(),
                consumer.plan.timeout,
            );
            tokio::select! {
                outcome = run => outcome,
                // Dropping the run releases its delivery (as at its `timeout`).
                () = runners.past_stop_timeout() => return,
            }
        }
    };
    consumer
        .meters
        .handler_seconds
        .record(started.elapsed().as_secs_f64());
    if let Outcome::Nack { reason, .. } = &outcome {
        telemetry::record_failure(reason);
    }
    let failed = |retry: bool, reason: String| {
        let (delivery, runners) = (Arc::clone(&delivery), Rc::clone(runners));
        async move {
            let consumer = &runners.consumer;
            match retry {
                true => fail(&delivery, consumer, &reason).await,
                false => give_up(&delivery, consumer, &format!("not retryable: {reason}")).await,
            }
        }
    };
    let settled = match outcome {
        Outcome::Ack => ack(&delivery, consumer).await,
        Outcome::Nack { reason, retryable } => {
            let retry = retryable || consumer.plan.retry_all_errors;
            leaving_the_slot(runners, &delivery, failed(retry, reason)).await
        }
        Outcome::Settled => Ok(()),
    };
    if let Err(e) = settled {
        not_settled(&consumer.plan.queue, &delivery, &e);
    }
}

/// Says that a delivery could not be settled, and what becomes of it
/// ([`what_becomes_of`]).
fn not_settled(queue: &queue_core::QueueId, delivery: &Delivery, e: &Error) {
    let fate = what_becomes_of(delivery);
    tracing::warn!(%queue, id = %delivery.message().id, error = %e, "could not settle a delivery; {fate}");
}

/// What becomes of a delivery that could not be settled. One the broker has taken
/// back comes again; of another, only the driver's error can say: a queue deleted on
/// the broker took its deliveries with it, where the log said they would come again
/// (review).
fn what_becomes_of(delivery: &Delivery) -> &'static str {
    if delivery.is_lost() {
        "the broker delivers it again"
    } else {
        "the error says what becomes of it"
    }
}

async fn ack(delivery: &Delivery, consumer: &ConsumerRuntime) -> Result<()> {
    delivery.ack().await?;
    consumer.meters.acked.increment(1);
    Ok(())
}

/// A message the broker delivered `max_attempts` times already without it being
/// settled: its handler most likely killed the runtime each time (SIGKILL, out of
/// memory). It is dead-lettered without running the handler again.
async fn give_up_on_crash_loop(runners: &Rc<Runners>, delivery: &Arc<Delivery>, count: u64) {
    let queue = &runners.consumer.plan.queue;
    let reason = format!(
        "redelivered too often: delivered {count} times before without being settled (the runtime stopped or crashed while handling it)"
    );
    tracing::error!(%queue, id = %delivery.message().id, delivered_before = count, "a message keeps coming back unsettled; giving up on it without running its handler");
    let giving_up = {
        let (delivery, runners) = (Arc::clone(delivery), Rc::clone(runners));
        async move { give_up(&delivery, &runners.consumer, &reason).await }
    };
    if let Err(e) = leaving_the_slot(runners, delivery, giving_up).await {
        not_settled(queue, delivery, &e);
    }
}

/// Dead-letters a delivery without another attempt: its handler failed with an error
/// that says another attempt cannot succeed (docs/consumers.md, "Errors that are not
/// retried"), or it keeps crashing the runtime.
async fn give_up(delivery: &Delivery, consumer: &ConsumerRuntime, reason: &str) -> Result<()> {
    consumer.meters.nacked.increment(1);
    let disposition = consumer.failure.give_up(delivery, reason).await?;
    consumer.meters.count(disposition);
    Ok(())
}

/// Runs a failed delivery's settlement (`settling`: its retry, its dead letter). A
/// settlement can hold the delivery through a wait (on a driver without delays its
/// backoff, or a dead letter's longest one; on any driver, the backoff before a
/// message whose copy could not be published goes back: docs/consumers.md, "Retries
/// and dead letters"): one not done at once goes on as a task of its own, counted
/// busy and awaited by shutdown like the runners, so that the handler's slot takes
/// the next delivery meanwhile. A slot that waited held its consumer for every wait
/// (a poison message per slot stopped it; on a full queue, a message whose copy found
/// no room, for good).
async fn leaving_the_slot(
    runners: &Rc<Runners>,
    delivery: &Arc<Delivery>,
    settling: impl Future<Output = Result<()>> + 'static,
) -> Result<()> {
    let held_by = Rc::clone(runners);
    let mut settling = Box::pin(
        async move {
            let _busy = held_by.busy.enter();
            let _active = held_by.consumer.active.enter();
            settling.await
        }
        .in_current_span(),
    );
    // Polled once here, so that it counts busy before this delivery's run stops
    // counting (an idle moment between the two would let `--exit-when-idle` stop).
    let first = std::future::poll_fn(|cx| Poll::Ready(settling.as_mut().poll(cx))).await;
    if let Poll::Ready(settled) = first {
        return settled;
    }
    let (queue, delivery) = (runners.consumer.plan.queue.clone(), Arc::clone(delivery));
    runners.tasks.spawn_local(async move {
        if let Err(e) = settling.await {
            not_settled(&queue, &delivery, &e);
        }
    });
    Ok(())
}

/// Runs the failure path for a delivery and counts what became of it.
async fn fail(delivery: &Delivery, consumer: &ConsumerRuntime, reason: &str) -> Result<()> {
    consumer.meters.nacked.increment(1);
    let disposition: Disposition = consumer.failure.fail(delivery, reason).await?;
    consumer.meters.count(disposition);
    Ok(())
}

/// Settles for a handler that calls `msg:ack()` / `msg:nack()` itself. It reaches the
/// consumer through this worker's `Runners` (a count on this thread only), not a clone
/// of the `Arc` every worker shares, whose count the threads would pull back and forth
/// per delivery.
struct RuntimeSettle {
    delivery: Arc<Delivery>,
    runners: Rc<Runners>,
}

impl RuntimeSettle {
    /// Runs a settlement so that it outlives the handler that awaits it: one that
    /// cannot finish at once goes on as a task of its own. A handler ended at its
    /// `timeout` while its `msg:nack()` was republishing would otherwise drop the
    /// failure path half way, with the message already marked settled, so that it was
    /// neither retried nor returned until Lua collected it.
    async fn apart<F>(&self, settlement: F) -> Result<()>
    where
        F: Future<Output = Result<()>> + 'static,
    {
        // Polled once here first: most settlements finish at once (the memory driver,
        // an ack that joins a batch), and only one that must wait becomes a task, so
        // an explicit ack does not suspend the handler and hand its runner's turn on.
        let mut settlement = Box::pin(settlement.in_current_span());
        let first = std::future::poll_fn(|cx| Poll::Ready(settlement.as_mut().poll(cx))).await;
        if let Poll::Ready(settled) = first {
            return settled;
        }
        // Counted busy and active as the runs are, since it may outlive its handler
        // (ended at its timeout): the host read idle while a retry copy waited for its
        // confirm. Its failure is logged here, where no handler may be left to see it.
        let held_by = Rc::clone(&self.runners);
        let delivery = Arc::clone(&self.delivery);
        let task = self.runners.tasks.spawn_local(async move {
            let _busy = held_by.busy.enter_unmetered();
            let _active = held_by.consumer.active.enter();
            let settled = settlement.await;
            if let Err(e) = &settled {
                not_settled(&held_by.consumer.plan.queue, &delivery, e);
            }
            settled
        });
        match task.await {
            Ok(settled) => settled,
            Err(e) => Err(Error::internal(format!("the settlement stopped: {e}"))),
        }
    }
}

#[async_trait(?Send)]
impl Settle for RuntimeSettle {
    async fn ack(&self) -> Result<()> {
        let (delivery, runners) = (Arc::clone(&self.delivery), Rc::clone(&self.runners));
        self.apart(async move { ack(&delivery, &runners.consumer).await })
            .await
    }

    async fn nack(&self, reason: &str, retryable: bool) -> Result<()> {
        telemetry::record_failure(reason);
        let (delivery, runners) = (Arc::clone(&self.delivery), Rc::clone(&self.runners));
        let reason = reason.to_string();
        // As a handler that returned the same error (`handle_delivery`).
        self.apart(async move {
            let consumer = &runners.consumer;
            if retryable || consumer.plan.retry_all_errors {
                fail(&delivery, consumer, &reason).await
            } else {
                give_up(&delivery, consumer, &format!("not retryable: {reason}")).await
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Taken(bool);

    #[async_trait::async_trait]
    impl queue_core::Acker for Taken {
        async fn ack(self: Box<Self>) -> Result<()> {
            Ok(())
        }
        async fn release(self: Box<Self>) -> Result<()> {
            Ok(())
        }
        fn release_on_drop(self: Box<Self>) {}
        fn is_lost(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn only_a_delivery_the_broker_took_back_is_said_to_come_again() {
        let delivery = |lost| {
            Delivery::new(
                queue_core::Message::from_bytes(
                    b"1".to_vec(),
                    Default::default(),
                    "application/json",
                ),
                Box::new(Taken(lost)),
            )
        };
        assert_eq!(
            what_becomes_of(&delivery(true)),
            "the broker delivers it again"
        );
        assert!(!what_becomes_of(&delivery(false)).contains("again"));
    }
}
