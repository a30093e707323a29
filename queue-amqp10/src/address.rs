//! Address profiles: how a queue name becomes an AMQP 1.0 node address, which terminus
//! capabilities the links carry, and what each broker family can honestly do.

use std::fmt;

use fe2o3_amqp::types::primitives::Symbol;
use queue_core::{Capabilities, Error, Result};
use serde::Deserialize;

/// Which broker family the driver talks to (config field `profile`).
///
/// AMQP 1.0 says nothing about how addresses map to queues, so each broker family
/// needs its own convention. The profile picks it, and with it the capabilities the
/// driver reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
pub enum Profile {
    /// RabbitMQ 3.x with the `rabbitmq_amqp1_0` plugin: address `/queue/NAME`, which
    /// declares the queue if it is missing. The plugin sets no queue arguments, reports
    /// no counts and has no delivery count, so priority queues, `max_length`,
    /// `message_ttl`, `delay` and `info` counts are not available.
    #[serde(rename = "rabbitmq-v1")]
    RabbitmqV1,
    /// RabbitMQ 4.x native AMQP 1.0: address `/queues/NAME` (percent-encoded). Queues
    /// must exist already (declared by definitions, the management API or an operator);
    /// declaring a missing one is `NOT_FOUND`.
    #[serde(rename = "rabbitmq-v2")]
    RabbitmqV2,
    /// ActiveMQ Artemis: the queue name is the address, and both link termini carry the
    /// `queue` capability so Artemis auto-creates an ANYCAST queue (competing consumers)
    /// instead of a MULTICAST subscription per receiver. Delays use the
    /// `x-opt-delivery-delay` message annotation; priorities use the header priority,
    /// which Artemis queues always honour.
    #[serde(rename = "artemis")]
    Artemis,
    /// Any other AMQP 1.0 peer: the queue name is the address, nothing else is assumed.
    #[default]
    #[serde(rename = "generic")]
    Generic,
}

/// RabbitMQ's own default `consumer_timeout`.
const RABBITMQ_CONSUMER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

impl Profile {
    /// The name used in configuration (`rabbitmq-v1`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::RabbitmqV1 => "rabbitmq-v1",
            Profile::RabbitmqV2 => "rabbitmq-v2",
            Profile::Artemis => "artemis",
            Profile::Generic => "generic",
        }
    }

    /// What the driver can do with this profile. Data, not behaviour: the conformance
    /// suite and the runtime select by it.
    pub fn capabilities(self) -> Capabilities {
        let base = Capabilities {
            confirms: true,
            ..Capabilities::default()
        };
        match self {
            Profile::RabbitmqV1 | Profile::RabbitmqV2 => Capabilities {
                persistent: true,
                // RabbitMQ's `consumer_timeout` as it ships: past it the plugin ends
                // the session (`PRECONDITION_FAILED - delivery acknowledgement on
                // channel 1 timed out`, measured on 3.10).
                max_unsettled: Some(RABBITMQ_CONSUMER_TIMEOUT),
                // RabbitMQ keeps them for itself, as over AMQP 0-9-1.
                reserved_queue_name_prefixes: &["amq."],
                ..base
            },
            Profile::Artemis => Capabilities {
                persistent: true,
                priority: true,
                max_priority: 9,
                delay: true,
                // Read through the `activemq.management` address.
                info_ready: true,
                info_in_flight: true,
                info_consumers: true,
                ..base
            },
            Profile::Generic => base,
        }
    }

    /// The node address of a queue, or `INVALID` for a name the profile cannot carry.
    ///
    /// ```
    /// use queue_amqp10::Profile;
    /// assert_eq!(Profile::RabbitmqV1.address("jobs").unwrap(), "/queue/jobs");
    /// assert_eq!(Profile::RabbitmqV2.address("a b").unwrap(), "/queues/a%20b");
    /// assert_eq!(Profile::Artemis.address("jobs").unwrap(), "jobs");
    /// assert!(Profile::RabbitmqV1.address("a/b").is_err());
    /// assert!(Profile::RabbitmqV1.address("a%2Fb").is_err());
    /// ```
    pub fn address(self, queue_name: &str) -> Result<String> {
        if queue_name.is_empty() {
            return Err(Error::invalid("the queue name is empty"));
        }
        match self {
            Profile::RabbitmqV1 => {
                // The 3.x plugin splits addresses at '/', so a name containing one
                // would address another node; and it reads `%2F` (upper case only,
                // measured on 3.10) as a '/': `a%2Fb` declared and filled queue `a/b`.
                if queue_name.contains('/') || queue_name.contains("%2F") {
                    return Err(Error::invalid(format!(
                        "queue name {queue_name:?} contains '/' or '%2F', which the rabbitmq-v1 profile cannot address"
                    )));
                }
                Ok(format!("/queue/{queue_name}"))
            }
            Profile::RabbitmqV2 => Ok(format!("/queues/{}", percent_encode(queue_name))),
            Profile::Artemis | Profile::Generic => Ok(queue_name.to_string()),
        }
    }

    /// Capabilities put on the source (receivers) and target (senders) terminus.
    pub(crate) fn terminus_capabilities(self) -> Option<Vec<Symbol>> {
        match self {
            // Artemis reads "queue" as ANYCAST routing; "topic" would be MULTICAST.
            Profile::Artemis => Some(vec![Symbol::from("queue")]),
            _ => None,
        }
    }

    /// Whether the broker may send more than the credit it was given when a flow
    /// crosses deliveries in flight (RabbitMQ 3.x's plugin computes credit without
    /// the deliveries it has not written yet). The receiver then grants credit only
    /// when all it granted has arrived.
    pub(crate) fn credit_overshoots(self) -> bool {
        matches!(self, Profile::RabbitmqV1)
    }

    /// Whether the broker accepts a transfer that reaches no queue, and drops it
    /// (RabbitMQ 3.x's plugin publishes without `mandatory`): a queue deleted on the
    /// broker is then declared again by its sender every so often.
    pub(crate) fn accepts_unroutable(self) -> bool {
        matches!(self, Profile::RabbitmqV1)
    }

    /// Whether a delay travels as the `x-opt-delivery-delay` message annotation.
    pub(crate) fn delay_annotation(self) -> bool {
        matches!(self, Profile::Artemis)
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters (RabbitMQ 4.x
/// address format v2).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_from_their_config_names() {
        for p in [
            Profile::RabbitmqV1,
            Profile::RabbitmqV2,
            Profile::Artemis,
            Profile::Generic,
        ] {
            let parsed: Profile = serde_json::from_value(serde_json::json!(p.as_str())).unwrap();
            assert_eq!(parsed, p);
        }
        assert!(serde_json::from_value::<Profile>(serde_json::json!("rabbitmq")).is_err());
    }

    #[test]
    fn v2_addresses_are_percent_encoded() {
        assert_eq!(
            Profile::RabbitmqV2.address("app:tasks/ü").unwrap(),
            "/queues/app%3Atasks%2F%C3%BC"
        );
    }

    #[test]
    fn capabilities_are_honest_per_profile() {
        let v1 = Profile::RabbitmqV1.capabilities();
        assert!(v1.confirms && v1.persistent);
        assert!(!v1.priority && !v1.delay && !v1.max_length && !v1.message_ttl);
        assert!(!v1.info_ready && !v1.info_in_flight && !v1.info_consumers);
        let artemis = Profile::Artemis.capabilities();
        assert!(artemis.delay && artemis.priority);
        let generic = Profile::Generic.capabilities();
        assert!(generic.confirms && !generic.persistent && !generic.delay);
    }
}
