//! The worker pool: a few threads, each with its own Lua state and a single-threaded
//! tokio runtime, running many handlers as coroutines. 1000 handlers at once are 1000
//! coroutines on these few states, never 1000 Lua states.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use queue_core::security::SecurityContext;
use queue_core::{Delivery, Error, Queues, Result, Subscription, Value};
use queue_lua::{DeliveryContext, LuaHost, Outcome, Settle};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::metrics::names as metric;
use crate::registry::{ConsumerPlan, ProcessPlan};
use crate::retry::FailurePath;

/// A consumer as the workers see it.
pub struct ConsumerRuntime {
    /// What the configuration said.
    pub plan: ConsumerPlan,
    /// Where failures go.
    pub failure: FailurePath,
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
    /// Counts deliveries until settled.
    pub busy: Busy,
    /// Gets the subscription back once intake stopped and running handlers finished
    /// (or `stop_timeout` passed), for the host to cancel.
    pub stopped: oneshot::Sender<Box<dyn Subscription>>,
}

/// Counts deliveries that are being handled or wait for a retry.
#[derive(Clone, Default)]
pub struct Busy(Arc<(AtomicUsize, tokio::sync::Notify)>);

impl Busy {
    /// Marks one delivery busy until the guard drops.
    pub fn enter(&self) -> BusyGuard {
        self.0.0.fetch_add(1, Ordering::AcqRel);
        metrics::gauge!(metric::IN_FLIGHT).increment(1.0);
        BusyGuard(self.clone())
    }

    /// How many are busy.
    pub fn count(&self) -> usize {
        self.0.0.load(Ordering::Acquire)
    }
}

/// See [`Busy::enter`].
pub struct BusyGuard(Busy);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.0.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(metric::IN_FLIGHT).decrement(1.0);
        self.0.0.1.notify_waiters();
    }
}

/// The pool.
pub struct Workers {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `threads` workers (at least one), each with its own Lua state publishing
    /// through `queues`.
    pub fn start(threads: usize, queues: &Queues, strict: bool) -> Result<Workers> {
        let threads = threads.max(1);
        let mut senders = Vec::with_capacity(threads);
        let mut handles = Vec::with_capacity(threads);
        for index in 0..threads {
            let (tx, rx) = mpsc::unbounded_channel();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let queues = queues.clone();
            let handle = std::thread::Builder::new()
                .name(format!("lua-{index}"))
                .spawn(move || worker_main(rx, queues, strict, ready_tx))
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
        })
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
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
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
        let host = match LuaHost::new(queues, SecurityContext::unrestricted(strict)) {
            Ok(h) => Rc::new(h),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        while let Some(job) = rx.recv().await {
            tokio::task::spawn_local(run_job(Rc::clone(&host), job));
        }
    });
}

async fn run_job(host: Rc<LuaHost>, job: Job) {
    match job {
        Job::Attach(intake) => run_intake(host, intake).await,
        Job::Process {
            plan,
            instance,
            done,
        } => {
            let result = match host.handler(&plan.source, &plan.method) {
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
            let _ = done.send(result);
        }
    }
}

/// Pulls deliveries while a slot is free and runs each handler as a local task: a
/// delivery never leaves this thread, so no thread is woken per message.
async fn run_intake(host: Rc<LuaHost>, intake: Intake) {
    let Intake {
        consumer,
        mut subscription,
        slots,
        mut stop,
        busy,
        stopped,
    } = intake;
    let semaphore = Arc::new(Semaphore::new(slots as usize));
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            permit = Arc::clone(&semaphore).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = subscription.next() => next,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(queue = %consumer.plan.queue, error = %e, "consumer error");
            }
            Some(Ok(delivery)) => {
                let guard = busy.enter();
                let host = Rc::clone(&host);
                let consumer = Arc::clone(&consumer);
                tokio::task::spawn_local(async move {
                    handle_delivery(&host, delivery, consumer, permit).await;
                    drop(guard);
                });
            }
        }
    }
    let finished =
        tokio::time::timeout(consumer.plan.stop_timeout, semaphore.acquire_many(slots)).await;
    if finished.is_err() {
        tracing::warn!(queue = %consumer.plan.queue, timeout = ?consumer.plan.stop_timeout, "handlers still running at stop_timeout; their messages go back to the queue");
    }
    let _ = stopped.send(subscription);
}

async fn handle_delivery(
    host: &LuaHost,
    delivery: Delivery,
    consumer: Arc<ConsumerRuntime>,
    permit: OwnedSemaphorePermit,
) {
    let label = consumer.plan.queue.to_string();
    metrics::counter!(metric::DELIVERED, "queue" => label.clone()).increment(1);
    let delivery = Arc::new(delivery);
    let started = Instant::now();
    let outcome = match delivery.message().decode() {
        Err(e) => Outcome::Nack {
            reason: format!("the body cannot be decoded: {}", e.message()),
        },
        Ok(payload) => match host.handler(&consumer.plan.source, &consumer.plan.method) {
            Err(e) => Outcome::Nack {
                reason: e.message().to_string(),
            },
            Ok(handler) => {
                let settle = Rc::new(RuntimeSettle {
                    delivery: Arc::clone(&delivery),
                    consumer: Arc::clone(&consumer),
                });
                let context = DeliveryContext {
                    message: delivery.message().clone(),
                    settle,
                };
                host.run_handler(&handler, &payload, context, consumer.plan.security.clone())
                    .await
            }
        },
    };
    metrics::histogram!(metric::HANDLER_SECONDS, "queue" => label.clone())
        .record(started.elapsed().as_secs_f64());
    drop(permit);
    let settled = match outcome {
        Outcome::Ack => ack(&delivery, &label).await,
        Outcome::Nack { reason } => consumer.failure.fail(&delivery, &reason).await.map(|_| ()),
        Outcome::Settled => Ok(()),
    };
    if let Err(e) = settled {
        tracing::warn!(queue = %label, id = %delivery.message().id, error = %e, "could not settle a delivery; the broker will redeliver it");
    }
}

async fn ack(delivery: &Delivery, label: &str) -> Result<()> {
    delivery.ack().await?;
    metrics::counter!(metric::ACKED, "queue" => label.to_string()).increment(1);
    Ok(())
}

/// Settles for a handler that calls `msg:ack()` / `msg:nack()` itself.
struct RuntimeSettle {
    delivery: Arc<Delivery>,
    consumer: Arc<ConsumerRuntime>,
}

#[async_trait(?Send)]
impl Settle for RuntimeSettle {
    async fn ack(&self) -> Result<()> {
        ack(&self.delivery, self.consumer.plan.queue.as_str()).await
    }

    async fn nack(&self, reason: &str) -> Result<()> {
        self.consumer
            .failure
            .fail(&self.delivery, reason)
            .await
            .map(|_| ())
    }
}
