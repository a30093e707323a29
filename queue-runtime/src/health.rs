//! What `/health` and `/ready` answer (docs/operations.md, "Metrics and health"):
//! alive as long as the process serves; ready only once every driver is created and
//! connected and every consumer takes deliveries, and not while a driver reconnects
//! nor once the runtime is stopping.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

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

/// What the runtime runs on, once it has it; shared with the HTTP server, which
/// starts before the drivers exist (it answers while `run` waits for brokers).
#[derive(Clone, Default)]
pub struct Readiness {
    running: Arc<RwLock<Option<(Drivers, Consumers)>>>,
    stopping: Arc<AtomicBool>,
}

impl Readiness {
    /// The runtime started with these drivers and consumers.
    pub fn started(&self, drivers: Drivers, consumers: Consumers) {
        *self.running.write().unwrap_or_else(|p| p.into_inner()) = Some((drivers, consumers));
    }

    /// The runtime began to stop: it takes nothing more, whatever its drivers and
    /// consumers say while they wind down. A probe read `ready` through a whole stop
    /// held up by a handler, or `detached`, which says a subscription failed (review).
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Whether the runtime is ready, and a JSON body that says what is and is not:
    /// `{"status": "ready" | "starting" | "reconnecting" | "detached" | "stopping", "drivers": {id:
    /// {...}}, "consumers": {id: {"attached": n, "of": m}}}`.
    pub fn report(&self) -> (bool, serde_json::Value) {
        let running = self.running.read().unwrap_or_else(|p| p.into_inner());
        let Some((drivers, consumers)) = running.as_ref() else {
            return (
                false,
                serde_json::json!({"status": "starting", "drivers": {}, "consumers": {}}),
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
        let stopping = self.stopping.load(Ordering::Acquire);
        let status = match (stopping, ready, all_attached) {
            (true, _, _) => "stopping",
            (false, false, _) => "reconnecting",
            (false, true, false) => "detached",
            (false, true, true) => "ready",
        };
        (
            !stopping && ready && all_attached,
            serde_json::json!({"status": status, "drivers": shown, "consumers": attachments}),
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
        readiness.started(
            drivers,
            BTreeMap::from([("app:worker".to_string(), consumer.clone())]),
        );
        let (ready, body) = readiness.report();
        assert!(ready, "{body}");
        assert_eq!(body["consumers"]["app:worker"]["attached"], 2);

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
}
