//! What `/health` and `/ready` answer (docs/operations.md, "Metrics and health"):
//! alive as long as the process serves; ready only once every driver is created and
//! connected and every consumer takes deliveries, and not while a driver reconnects,
//! a Lua worker is stalled, nor once the runtime is stopping.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use queue_core::Driver;

/// The drivers of a runtime, by entry id.
type Drivers = BTreeMap<String, Arc<dyn Driver>>;

/// The consumers of a runtime, by entry id.
type Consumers = BTreeMap<String, Attachment>;

/// A consumer's subscriptions (one per worker it runs on) and how many of them still
/// take deliveries.
#[derive(Clone, Debug, Default)]
pub struct Attachment {
    /// The subscriptions it started with.
    pub subscriptions: usize,
    /// Those whose subscription has not ended.
    pub attached: Arc<AtomicUsize>,
}

/// The instances of one `process.lua` entry: how many still run, and how many
/// failed (raised, or returned a failure).
#[derive(Clone, Debug, Default)]
pub struct ProcessState {
    /// The instances it started.
    pub instances: usize,
    /// Those still running.
    pub running: Arc<AtomicUsize>,
    /// Those that failed.
    pub failed: Arc<AtomicUsize>,
    /// Those a stop ended before they finished (said once for all at the stop).
    pub stopped: Arc<AtomicUsize>,
}

/// The processes of a runtime, by entry id.
type Processes = BTreeMap<String, ProcessState>;

/// When each Lua worker last had a turn on its thread: each ticks every
/// [`WORKER_TICK`]. A worker held by a function Lua called from C (a `table.sort`
/// comparator that never returns, where no time slice can yield) ticks no more, and
/// every consumer and process on it stops; `/ready` said `ready` (review).
#[derive(Clone, Debug)]
pub struct WorkerTicks {
    /// Each worker's last tick, in milliseconds since `origin`.
    last: Arc<[AtomicU64]>,
    origin: Instant,
}

/// How often a Lua worker ticks.
pub const WORKER_TICK: Duration = Duration::from_secs(1);

/// How long a worker may go without a tick before it counts as stalled: a handler
/// or process that computes yields at the end of each time slice, so a tick waits
/// at most for its worker's other coroutines' slices.
pub const STALLED_AFTER: Duration = Duration::from_secs(5);

impl WorkerTicks {
    /// The ticks of `workers` workers, each ticked now.
    pub fn new(workers: usize) -> Self {
        WorkerTicks {
            last: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            origin: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Worker `index` has a turn.
    pub fn tick(&self, index: usize) {
        if let Some(last) = self.last.get(index) {
            last.store(self.now(), Ordering::Release);
        }
    }

    /// The workers without a tick for `STALLED_AFTER` or longer.
    pub fn stalled(&self) -> Vec<usize> {
        let now = self.now();
        let limit = u64::try_from(STALLED_AFTER.as_millis()).unwrap_or(u64::MAX);
        self.last
            .iter()
            .enumerate()
            .filter(|(_, last)| now.saturating_sub(last.load(Ordering::Acquire)) >= limit)
            .map(|(index, _)| index)
            .collect()
    }
}

/// What the runtime runs, once it has it.
struct Running {
    drivers: Drivers,
    consumers: Consumers,
    processes: Processes,
    workers: WorkerTicks,
}

/// What the runtime runs on, once it has it; shared with the HTTP server, which
/// starts before the drivers exist (it answers while `run` waits for brokers).
#[derive(Clone, Default)]
pub struct Readiness {
    running: Arc<RwLock<Option<Running>>>,
    stopping: Arc<AtomicBool>,
}

impl Readiness {
    /// The runtime started with these drivers, consumers and processes.
    pub fn started(
        &self,
        drivers: Drivers,
        consumers: Consumers,
        processes: Processes,
        workers: WorkerTicks,
    ) {
        *self.running.write().unwrap_or_else(|p| p.into_inner()) = Some(Running {
            drivers,
            consumers,
            processes,
            workers,
        });
    }

    /// The runtime began to stop: it takes nothing more, whatever its drivers and
    /// consumers say while they wind down. A probe read `ready` through a whole stop
    /// held up by a handler, or `detached`, which says a subscription failed (review).
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Whether the runtime is ready, and a JSON body that says what is and is not:
    /// `{"status": "ready" | "starting" | "reconnecting" | "stalled" | "detached" |
    /// "process_failed" | "stopping", "drivers": {id: {...}}, "consumers": {id:
    /// {"attached": n, "of": m}}, "processes": {id: {"running": n, "failed": n, "of":
    /// m}}, "stalled_workers": [index, ...]}`.
    pub fn report(&self) -> (bool, serde_json::Value) {
        let running = self.running.read().unwrap_or_else(|p| p.into_inner());
        let Some(Running {
            drivers,
            consumers,
            processes,
            workers,
        }) = running.as_ref()
        else {
            return (
                false,
                serde_json::json!({"status": "starting", "drivers": {}, "consumers": {}, "processes": {}}),
            );
        };
        let mut ready = true;
        let mut shown = serde_json::Map::new();
        for (id, driver) in drivers {
            let entry = match driver.connection() {
                None => serde_json::json!({"connected": true}),
                Some(c) => {
                    ready &= c.connected;
                    serde_json::json!({
                        "connected": c.connected,
                        "node": c.node,
                        "connections_opened": c.connections_opened,
                        "links_attached": c.links_attached,
                    })
                }
            };
            shown.insert(id.clone(), entry);
        }
        let mut all_attached = true;
        let mut attachments = serde_json::Map::new();
        for (id, consumer) in consumers {
            let attached = consumer.attached.load(Ordering::Acquire);
            all_attached &= attached >= consumer.subscriptions;
            attachments.insert(
                id.clone(),
                serde_json::json!({"attached": attached, "of": consumer.subscriptions}),
            );
        }
        // A process that failed stays failed: its work (a producer's loop) is not
        // done by anyone until the runtime is restarted, which only its ERROR line
        // said before (docs/operations.md, "Metrics and health").
        let mut none_failed = true;
        let mut process_states = serde_json::Map::new();
        for (id, process) in processes {
            let failed = process.failed.load(Ordering::Acquire);
            none_failed &= failed == 0;
            process_states.insert(
                id.clone(),
                serde_json::json!({
                    "running": process.running.load(Ordering::Acquire),
                    "failed": failed,
                    "of": process.instances,
                }),
            );
        }
        let stalled = workers.stalled();
        let stopping = self.stopping.load(Ordering::Acquire);
        let status = if stopping {
            "stopping"
        } else if !ready {
            "reconnecting"
        } else if !stalled.is_empty() {
            "stalled"
        } else if !all_attached {
            "detached"
        } else if !none_failed {
            "process_failed"
        } else {
            "ready"
        };
        (
            status == "ready",
            serde_json::json!({
                "status": status,
                "drivers": shown,
                "consumers": attachments,
                "processes": process_states,
                "stalled_workers": stalled,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_once_started_with_every_consumer_attached() {
        let readiness = Readiness::default();
        let (ready, body) = readiness.report();
        assert!(!ready);
        assert_eq!(body["status"], "starting");

        let consumer = Attachment {
            subscriptions: 2,
            attached: Arc::new(AtomicUsize::new(2)),
        };
        let drivers: Drivers = BTreeMap::from([(
            "app:memory".to_string(),
            Arc::new(queue_core::memory::MemoryDriver::new()) as Arc<dyn Driver>,
        )]);
        let process = ProcessState {
            instances: 2,
            running: Arc::new(AtomicUsize::new(2)),
            ..ProcessState::default()
        };
        readiness.started(
            drivers,
            BTreeMap::from([("app:worker".to_string(), consumer.clone())]),
            BTreeMap::from([("app:producer".to_string(), process.clone())]),
            WorkerTicks::new(2),
        );
        let (ready, body) = readiness.report();
        assert!(ready, "{body}");
        assert_eq!(body["consumers"]["app:worker"]["attached"], 2);

        // One instance of the process finished, the other failed: not ready until
        // the runtime is restarted.
        process.running.store(0, Ordering::Release);
        let (ready, body) = readiness.report();
        assert!(ready, "a process that finished is no fault: {body}");
        process.failed.store(1, Ordering::Release);
        let (ready, body) = readiness.report();
        assert!(!ready);
        assert_eq!(body["status"], "process_failed");
        assert_eq!(
            body["processes"]["app:producer"],
            serde_json::json!({"running": 0, "failed": 1, "of": 2})
        );
        process.failed.store(0, Ordering::Release);

        // One of its two subscriptions ended.
        consumer.attached.fetch_sub(1, Ordering::AcqRel);
        let (ready, body) = readiness.report();
        assert!(!ready);
        assert_eq!(body["status"], "detached");
        assert_eq!(body["consumers"]["app:worker"]["attached"], 1);
        assert_eq!(body["consumers"]["app:worker"]["of"], 2);

        // Attached again, then stopping: not ready, and saying why.
        consumer.attached.fetch_add(1, Ordering::AcqRel);
        assert!(readiness.report().0);
        readiness.stopping();
        let (ready, body) = readiness.report();
        assert!(!ready);
        assert_eq!(body["status"], "stopping");
        assert_eq!(body["consumers"]["app:worker"]["attached"], 2);
    }

    /// A worker whose thread is held (a function Lua called from C that never
    /// returns) stops ticking: not ready, naming it, until it ticks again.
    #[test]
    fn a_worker_without_a_tick_for_a_while_is_stalled() {
        // Never passes without looking: a machine up for less than that has nothing
        // to backdate to, and fails here.
        let origin = Instant::now()
            .checked_sub(STALLED_AFTER)
            .expect("a monotonic clock older than STALLED_AFTER to backdate the ticks to");
        let workers = WorkerTicks {
            last: (0..2).map(|_| AtomicU64::new(0)).collect(),
            origin,
        };
        let readiness = Readiness::default();
        readiness.started(
            BTreeMap::new(),
            BTreeMap::new(),
            BTreeMap::new(),
            workers.clone(),
        );
        workers.tick(0);
        let (ready, body) = readiness.report();
        assert!(!ready);
        assert_eq!(body["status"], "stalled");
        assert_eq!(body["stalled_workers"], serde_json::json!([1]));
        workers.tick(1);
        let (ready, body) = readiness.report();
        assert!(ready, "{body}");
        assert_eq!(body["stalled_workers"], serde_json::json!([]));
    }
}
