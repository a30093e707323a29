//! What `/health` and `/ready` answer (docs/operations.md, "Metrics and health"):
//! alive as long as the process serves; ready only once every driver is created and
//! connected, and not while one reconnects.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use queue_core::Driver;

/// The drivers of a runtime, by entry id.
type Drivers = BTreeMap<String, Arc<dyn Driver>>;

/// The drivers the runtime runs on, once it has them; shared with the HTTP server,
/// which starts before the drivers exist (it answers while `run` waits for brokers).
#[derive(Clone, Default)]
pub struct Readiness {
    drivers: Arc<RwLock<Option<Drivers>>>,
}

impl Readiness {
    /// The runtime started with these drivers.
    pub fn started(&self, drivers: Drivers) {
        *self.drivers.write().unwrap_or_else(|p| p.into_inner()) = Some(drivers);
    }

    /// Whether the runtime is ready, and a JSON body that says what is and is not:
    /// `{"status": "ready" | "starting" | "reconnecting", "drivers": {id: {...}}}`.
    pub fn report(&self) -> (bool, serde_json::Value) {
        let drivers = self.drivers.read().unwrap_or_else(|p| p.into_inner());
        let Some(drivers) = drivers.as_ref() else {
            return (
                false,
                serde_json::json!({"status": "starting", "drivers": {}}),
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
        let status = if ready { "ready" } else { "reconnecting" };
        (
            ready,
            serde_json::json!({"status": status, "drivers": shown}),
        )
    }
}
