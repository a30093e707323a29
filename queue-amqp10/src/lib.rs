//! # queue-amqp10
//!
//! The AMQP 1.0 driver of the queue workspace, on [fe2o3-amqp]: ActiveMQ Artemis,
//! RabbitMQ 3.x (`rabbitmq_amqp1_0` plugin) and 4.x, and other AMQP 1.0 peers.
//!
//! - [`Amqp10Driver`] implements [`queue_core::Driver`]; `queue_core::Factory::<Amqp10Config>`
//!   builds it from a `queue.driver.amqp10` YAML entry ([`Amqp10Config`]).
//! - [`Profile`] says how queue names become addresses and what the broker can do
//!   (its [`queue_core::Capabilities`]).
//! - Publishing waits for the `accepted` outcome, pipelined over a bounded window of
//!   unsettled transfers (`confirm_window`); consuming uses link credit = prefetch.
//! - The driver reconnects by itself (fe2o3-amqp does not): lost links are re-attached
//!   with backoff, publishes waiting on a lost link fail, consumers keep yielding.
//!
//! ```no_run
//! use queue_amqp10::{Amqp10Config, Amqp10Driver, Profile};
//! use queue_core::{Codec, Driver, Headers, Message, QueueId, QueueSpec, Value};
//!
//! # async fn demo() -> queue_core::Result<()> {
//! let driver = Amqp10Driver::connect(Amqp10Config::new(
//!     "amqp://guest:guest@127.0.0.1:5672",
//!     Profile::RabbitmqV1,
//! ))
//! .await?;
//! let tasks = QueueId::parse("app:tasks")?;
//! driver.declare(&QueueSpec::new(tasks.clone())).await?;
//! let message = Message::encode(&Value::from("hello"), Headers::new(), Codec::Json)?;
//! driver.publish(&tasks, message).await?; // returns once the broker accepted it
//!
//! let mut consumer = driver.consume(&tasks, Default::default()).await?;
//! if let Some(delivery) = consumer.next().await {
//!     let delivery = delivery?;
//!     println!("{:?}", delivery.message().decode()?);
//!     delivery.ack().await?;
//! }
//! consumer.cancel().await?;
//! driver.close().await
//! # }
//! ```
//!
//! [fe2o3-amqp]: https://docs.rs/fe2o3-amqp
#![warn(missing_docs)]

mod address;
mod body;
mod config;
mod connection;
mod consume;
mod error;
mod guard;
mod management;
mod mapping;
mod publish;
mod raw_value;
#[cfg(feature = "tls")]
mod tls;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use queue_core::{
    Capabilities, ConnectionReport, ConsumeOptions, Driver, DriverConfig, Error, Message, QueueId,
    QueueInfo, QueueSpec, Result, Subscription,
};

pub use address::Profile;
pub use config::{Amqp10Config, KIND, TlsConfig};

use connection::Connector;
use consume::{Amqp10Subscription, ReceiverSpec};
use publish::{QueueSender, SenderSpec};

/// The driver's short name, used in messages (`the amqp10 driver cannot ...`).
pub const NAME: &str = "amqp10";

struct Declared {
    spec: QueueSpec,
    address: String,
    sender: QueueSender,
}

/// The AMQP 1.0 driver: one connection, a sender link per declared queue, a receiver
/// link per subscription, each on its own session.
pub struct Amqp10Driver {
    config: Amqp10Config,
    connector: Arc<Connector>,
    queues: RwLock<HashMap<QueueId, Arc<Declared>>>,
    declaring: tokio::sync::Mutex<()>,
    /// Queue counts, where the profile's broker has a management protocol (Artemis).
    management: Option<management::Management>,
    /// `close` was called.
    closing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Amqp10Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp10Driver")
            .field("config", &self.config)
            .finish()
    }
}

impl Amqp10Driver {
    /// Connects (failing fast when the broker is unreachable or refuses the login).
    /// Errors show the URL without its password.
    pub async fn connect(config: Amqp10Config) -> Result<Amqp10Driver> {
        let connector = Connector::connect(&config).await?;
        let management = (config.profile == Profile::Artemis).then(management::Management::new);
        Ok(Amqp10Driver {
            config,
            connector,
            queues: RwLock::new(HashMap::new()),
            declaring: tokio::sync::Mutex::new(()),
            management,
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The profile in use.
    pub fn profile(&self) -> Profile {
        self.config.profile
    }

    fn declared(&self, queue: &QueueId) -> Result<Arc<Declared>> {
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(error::closed(&format!("queue {queue}")));
        }
        let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
        queues.get(queue).cloned().ok_or_else(|| {
            Error::not_found(format!(
                "queue {queue} is not declared on the {NAME} driver"
            ))
        })
    }

    /// The message for the wire. One larger than `max_message_size` as it travels is
    /// refused: no receiver of this driver would take it, and the queue would wait
    /// behind it for good (docs/drivers/amqp10.md, "Limits"). It is measured only when
    /// its body and headers come near the limit: below, no message can pass it.
    fn prepare(&self, declared: &Declared, message: Message) -> Result<mapping::Outgoing> {
        let limit = usize::try_from(self.config.max_message_size).unwrap_or(usize::MAX);
        let near = message
            .body
            .len()
            .saturating_add(mapping::most_overhead(&message))
            > limit;
        let id = near.then(|| message.id.clone());
        let outgoing = mapping::to_amqp(message, declared.spec.durable, self.config.profile)?;
        if let Some(id) = id {
            let size = mapping::encoded_size(&outgoing).unwrap_or(usize::MAX);
            if size > limit {
                return Err(Error::invalid(format!(
                    "publish to {}: message {id} is {size} bytes as it travels, larger than max_message_size {limit}: no receiver would take it",
                    declared.spec.id
                )));
            }
        }
        Ok(outgoing)
    }
}

#[async_trait]
impl Driver for Amqp10Driver {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        self.config.capabilities()
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<()> {
        let address = self.config.profile.address(&spec.name)?;
        let arrived = std::time::Instant::now();
        let _serial = self.declaring.lock().await;
        if let Ok(existing) = self.declared(&spec.id) {
            if existing.spec == *spec {
                return Ok(());
            }
            return Err(Error::new(
                queue_core::ErrorKind::AlreadyExists,
                format!(
                    "queue {} is already declared on the {NAME} driver with other settings",
                    spec.id
                ),
            ));
        }
        // Declares wait for one another: one that waited while the one before it found
        // the broker unreachable fails with it, instead of waiting out its own limit.
        if let Some(failure) = self.connector.failed_since(arrived) {
            return Err(failure.context(format!("declare {}", spec.id)));
        }
        // Attaching the sender is the declaration: RabbitMQ 3.x creates `/queue/NAME`,
        // Artemis auto-creates the anycast queue, RabbitMQ 4.x refuses a missing one.
        let sender = QueueSender::start(
            Arc::clone(&self.connector),
            SenderSpec {
                queue: spec.id.to_string(),
                address: address.clone(),
                durable: spec.durable,
                profile: self.config.profile,
                window: self.config.confirm_window,
                publish_timeout: self.config.publish_timeout,
            },
        )
        .await?;
        let declared = Arc::new(Declared {
            spec: spec.clone(),
            address,
            sender,
        });
        self.queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.id.clone(), declared);
        Ok(())
    }

    async fn publish(&self, queue: &QueueId, message: Message) -> Result<()> {
        let declared = self.declared(queue)?;
        let outgoing = self.prepare(&declared, message)?;
        declared.sender.send(outgoing).await
    }

    async fn publish_batch(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let declared = self.declared(queue)?;
        let outgoing = messages
            .into_iter()
            .map(|m| self.prepare(&declared, m))
            .collect::<Result<Vec<_>>>()?;
        declared.sender.send_all(outgoing).await
    }

    async fn consume(
        &self,
        queue: &QueueId,
        options: ConsumeOptions,
    ) -> Result<Box<dyn Subscription>> {
        let declared = self.declared(queue)?;
        let subscription = Amqp10Subscription::start(
            Arc::clone(&self.connector),
            ReceiverSpec {
                queue: queue.to_string(),
                address: declared.address.clone(),
                durable: declared.spec.durable,
                profile: self.config.profile,
                prefetch: options.prefetch.max(1),
            },
        )
        .await?;
        Ok(Box::new(subscription))
    }

    async fn info(&self, queue: &QueueId) -> Result<QueueInfo> {
        let declared = self.declared(queue)?;
        match &self.management {
            Some(management) => management.info(&self.connector, &declared.spec.name).await,
            // RabbitMQ 3.x tells an AMQP 1.0 client no counts (4.x would, through its
            // HTTP-over-AMQP management): every count is unknown.
            None => Ok(QueueInfo::default()),
        }
    }

    fn connection(&self) -> Option<ConnectionReport> {
        Some(ConnectionReport {
            connected: self.connector.is_connected(),
            connections_opened: self.connector.connections_opened(),
            links_attached: self.connector.links_attached(),
            node: self.connector.node().to_string(),
        })
    }

    async fn close(&self) -> Result<()> {
        // From now on a call says the driver is closed, not that its queue is unknown.
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        let declared: Vec<Arc<Declared>> = self
            .queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, d)| d)
            .collect();
        // What was sent gets its outcome before the connection goes, all queues side
        // by side and within one CLOSE_TIMEOUT; what was not sent yet is held back and
        // fails with the close.
        let mut settling = tokio::task::JoinSet::new();
        // Not while the connection is down: no outcome can arrive, and the close
        // itself already waits its own limit on a broker that does not answer.
        let connected = self.connector.is_connected();
        for d in declared.iter().filter(|_| connected) {
            let d = Arc::clone(d);
            settling.spawn(async move { d.sender.settle_sent(connection::CLOSE_TIMEOUT).await });
        }
        let held = settling.join_all().await;
        self.connector.close().await;
        drop(held);
        for d in declared {
            if let Ok(d) = Arc::try_unwrap(d) {
                d.sender.stop().await;
            }
        }
        Ok(())
    }
}

/// `queue.driver.amqp10` entries build [`Amqp10Driver`]s with the capabilities of
/// their profile: register `queue_core::Factory::<Amqp10Config>::new()`.
///
/// ```
/// use queue_core::{DriverFactory, Factory};
/// let factory = Factory::<queue_amqp10::Amqp10Config>::new();
/// assert_eq!(factory.kind(), "queue.driver.amqp10");
/// let caps = factory.validate(&serde_json::json!({"url": "amqp://127.0.0.1", "profile": "artemis"})).unwrap();
/// assert!(caps.priority && caps.delay);
/// assert!(factory.validate(&serde_json::json!({"url": "amqp://h", "heartbeat": "5s"})).is_err());
/// ```
#[async_trait]
impl DriverConfig for Amqp10Config {
    const KIND: &'static str = KIND;

    fn validate(&self) -> Result<Capabilities> {
        Amqp10Config::validate(self).map(|()| self.capabilities())
    }

    async fn connect(self) -> Result<Arc<dyn Driver>> {
        Ok(Arc::new(Amqp10Driver::connect(self).await?))
    }
}
