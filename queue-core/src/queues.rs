//! The publishing facade: the registry of declared queues and the one place where
//! publish checks happen, in the order docs/lua-api.md gives.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::message::names;
use crate::security::{ACTION_INFO, ACTION_PUBLISH, ACTION_PUBLISH_QUEUE, SecurityContext};
use crate::{
    Checked, Codec, Driver, Error, HeaderValue, Headers, Message, QueueId, QueueInfo, QueueSpec,
    Result, Value,
};

/// The default `max_message_bytes`: 1 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// How a queue's messages are published: its codec and size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishSettings {
    /// The body codec.
    pub codec: Codec,
    /// Encoded bodies larger than this are `INVALID`.
    pub max_message_bytes: usize,
}

impl Default for PublishSettings {
    fn default() -> Self {
        PublishSettings {
            codec: Codec::Json,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// A declared queue: its spec, publish settings and driver.
#[derive(Clone)]
pub struct RegisteredQueue {
    /// How it was declared.
    pub spec: QueueSpec,
    /// Codec and size limit.
    pub settings: PublishSettings,
    /// The driver it lives on.
    pub driver: Arc<dyn Driver>,
}

impl RegisteredQueue {
    /// `INVALID` when an encoded message of `len` bytes is more than the queue takes
    /// (`max_message_bytes`): what a publish checks, and `dlq replay` of a copy.
    pub fn check_size(&self, len: usize) -> Result<()> {
        let limit = self.settings.max_message_bytes;
        if len > limit {
            return Err(Error::invalid(format!(
                "message is {len} bytes, more than the {limit} bytes queue {} allows (max_message_bytes)",
                self.spec.id
            )));
        }
        Ok(())
    }
}

impl std::fmt::Debug for RegisteredQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisteredQueue")
            .field("spec", &self.spec)
            .field("settings", &self.settings)
            .field("driver", &self.driver.name())
            .finish()
    }
}

/// The registry of declared queues, and publishing with every check.
///
/// ```
/// use std::sync::Arc;
/// use queue_core::{Headers, Queues, QueueSpec, QueueId, Value, PublishSettings};
/// use queue_core::memory::MemoryDriver;
/// use queue_core::security::SecurityContext;
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let queues = Queues::new();
/// let driver = Arc::new(MemoryDriver::new());
/// let id = QueueId::parse("app:tasks").unwrap();
/// queues.declare(QueueSpec::new(id), PublishSettings::default(), driver).await.unwrap();
/// let ctx = SecurityContext::default();
/// let body = Value::map([("action", Value::from("send_email"))]);
/// let id = queues.publish(&ctx, "app:tasks", body, Headers::new()).await.unwrap();
/// assert!(!id.is_empty());
/// let err = queues.publish(&ctx, "app:nope", Value::from("x"), Headers::new()).await.unwrap_err();
/// assert_eq!(err.kind(), queue_core::ErrorKind::NotFound);
/// # });
/// ```
#[derive(Clone, Default, Debug)]
pub struct Queues {
    /// Each queue behind an `Arc`: a publish holds its queue's entry, and cloning the
    /// spec's strings cost each one its allocations.
    registry: Arc<RwLock<HashMap<QueueId, Arc<RegisteredQueue>>>>,
}

impl Queues {
    /// An empty registry.
    pub fn new() -> Self {
        Queues::default()
    }

    /// Declares a queue on its driver, behind the capability checks ([`Checked`]),
    /// and registers it.
    pub async fn declare(
        &self,
        spec: QueueSpec,
        settings: PublishSettings,
        driver: Arc<dyn Driver>,
    ) -> Result<()> {
        let driver = Checked::layer(driver);
        driver.declare(&spec).await?;
        self.registry
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                spec.id.clone(),
                Arc::new(RegisteredQueue {
                    spec,
                    settings,
                    driver,
                }),
            );
        Ok(())
    }

    /// A declared queue.
    pub fn get(&self, id: &QueueId) -> Option<Arc<RegisteredQueue>> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Every declared queue.
    pub fn all(&self) -> Vec<Arc<RegisteredQueue>> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Looks a queue up, `NOT_FOUND` if it is not declared.
    pub fn require(&self, id: &QueueId) -> Result<Arc<RegisteredQueue>> {
        self.get(id).ok_or_else(|| not_declared(id))
    }

    /// Starts a publish: checks the general permission, the queue id and the
    /// queue-specific permission (checks 1–3 of docs/lua-api.md, "queue.publish"). The caller converts its data
    /// and headers next, then calls [`PublishRequest::send`].
    pub fn begin_publish(&self, ctx: &SecurityContext, queue_id: &str) -> Result<PublishRequest> {
        ctx.check(ACTION_PUBLISH, None)?;
        let queue = QueueId::parse(queue_id)?;
        ctx.check(ACTION_PUBLISH_QUEUE, Some(queue.as_str()))?;
        // Looked up once for the whole publish; that it is not declared is said in
        // its turn, after the headers' check (`send`).
        let registered = self.get(&queue);
        Ok(PublishRequest { queue, registered })
    }

    /// Publishes with every check, returning the message id once the driver has it.
    pub async fn publish(
        &self,
        ctx: &SecurityContext,
        queue_id: &str,
        body: Value,
        headers: Headers,
    ) -> Result<String> {
        let request = self.begin_publish(ctx, queue_id)?;
        request.check_body(&body)?;
        request.send(body, headers).await
    }

    /// Counts of a declared queue, for the operator (no permission is checked: the
    /// `info` command, the runtime's own summaries). Code that runs as an actor reads
    /// them with [`Queues::info_as`].
    pub async fn info(&self, queue_id: &str) -> Result<QueueInfo> {
        let id = QueueId::parse(queue_id)?;
        self.require(&id)?.driver.info(&id).await
    }

    /// Counts of a declared queue, read under `ctx`: the queue id must be valid, then
    /// `queue.info` is checked with the queue id as the resource, before the queue is
    /// looked up, so that a denied actor cannot learn which queues are declared either
    /// (docs/security.md, "Reading a queue's counts").
    pub async fn info_as(&self, ctx: &SecurityContext, queue_id: &str) -> Result<QueueInfo> {
        let id = QueueId::parse(queue_id)?;
        ctx.check(ACTION_INFO, Some(id.as_str()))?;
        self.require(&id)?.driver.info(&id).await
    }
}

/// A publish whose permissions and queue id were checked.
#[derive(Debug)]
pub struct PublishRequest {
    queue: QueueId,
    registered: Option<Arc<RegisteredQueue>>,
}

impl PublishRequest {
    /// The checked queue id.
    pub fn queue(&self) -> &QueueId {
        &self.queue
    }

    /// The most bytes a message to this queue may take encoded (`max_message_bytes`;
    /// the default for a queue that is not declared, which publishing then refuses).
    pub fn max_message_bytes(&self) -> usize {
        self.registered
            .as_ref()
            .map_or(DEFAULT_MAX_MESSAGE_BYTES, |r| r.settings.max_message_bytes)
    }

    /// Check 4: the data must not be empty (`nil`, `""`, `{}`).
    pub fn check_body(&self, body: &Value) -> Result<()> {
        if body.is_empty_data() {
            return Err(Error::invalid(format!(
                "message data is empty ({}): publish needs a non-empty table, string, number or boolean",
                describe_empty(body)
            )));
        }
        Ok(())
    }

    /// Checks headers, that the queue exists and the size, then publishes; returns the
    /// message id once the driver confirmed it.
    pub async fn send(self, body: Value, mut headers: Headers) -> Result<String> {
        self.check_body(&body)?;
        headers.validate_for_publish()?;
        let registered = self
            .registered
            .as_ref()
            .ok_or_else(|| not_declared(&self.queue))?;
        let bytes = registered.settings.codec.encode(&body)?;
        // Not held while the driver confirms: a body of shared Lua tables is small in
        // Lua and may be large here, outside Lua's memory limit (review).
        drop(body);
        registered.check_size(bytes.len())?;
        if !headers.contains(names::TIMESTAMP) {
            headers.insert(names::TIMESTAMP, HeaderValue::Int(unix_now()));
        }
        let message = Message::from_bytes(bytes, headers, registered.settings.codec.content_type());
        let id = message.id.clone();
        registered
            .driver
            .publish(&self.queue, message)
            .await
            .map_err(|e| e.context(format!("publish to {}", self.queue)))?;
        Ok(id)
    }
}

fn not_declared(id: &QueueId) -> Error {
    Error::not_found(format!("queue {id} is not declared"))
}

fn describe_empty(body: &Value) -> &'static str {
    match body {
        Value::Nil => "nil",
        Value::String(_) | Value::Bytes(_) => "empty string",
        _ => "empty table",
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
