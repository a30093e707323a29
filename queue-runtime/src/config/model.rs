//! The typed entry kinds of docs/configuration.md, read from YAML with the line of every field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// A driver entry's fields, for its factory. `Debug` shows their names, not their
/// values: a URL holds a password (docs/security.md, "Secrets").
///
/// ```
/// let fields = queue_runtime::config::DriverFields(serde_json::json!({"url": "amqp://u:s3cret@h"}));
/// assert_eq!(format!("{fields:?}"), r#"DriverFields(["url"])"#);
/// assert_eq!(fields["url"], "amqp://u:s3cret@h");
/// ```
#[derive(Clone, PartialEq)]
pub struct DriverFields(pub serde_json::Value);

impl std::fmt::Debug for DriverFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = match &self.0 {
            serde_json::Value::Object(fields) => fields.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        f.debug_tuple("DriverFields").field(&names).finish()
    }
}

impl std::ops::Deref for DriverFields {
    type Target = serde_json::Value;
    fn deref(&self) -> &serde_json::Value {
        &self.0
    }
}

/// A list written as one string or as a YAML list (`actions: queue.*`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged, expecting = "expected a string or a list of strings")]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A field that is there, even as null: `Some(None)`, where a missing one is `None`.
fn written<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

fn default_true() -> bool {
    true
}

/// `queue.queue`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueEntry {
    /// The driver entry (required when several are declared).
    pub driver: Option<String>,
    /// The broker's name (default: the full queue id).
    pub queue_name: Option<String>,
    /// `json` (default) or `msgpack`.
    #[serde(default)]
    pub codec: CodecName,
    /// Survives a broker restart (true).
    #[serde(default = "default_true")]
    pub durable: bool,
    /// At most this many ready messages.
    pub max_length: Option<u64>,
    /// Priorities 0..=max_priority.
    pub max_priority: Option<u8>,
    /// Messages older than this are dropped.
    #[serde(
        default,
        deserialize_with = "queue_core::config::option_duration::deserialize"
    )]
    pub message_ttl: Option<Duration>,
    /// `classic` (default) or `quorum` (replicated over a cluster's nodes).
    #[serde(default)]
    pub queue_type: QueueTypeName,
    /// Largest encoded body (1 MiB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Retry policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Dead-letter queue: absent or `true` = `<id>.dlq`, a queue id, or `false`.
    pub dead_letter: Option<DeadLetterConfig>,
    /// Options only one driver understands.
    #[serde(default)]
    pub driver_options: BTreeMap<String, serde_json::Value>,
}

fn default_max_message_bytes() -> usize {
    queue_core::DEFAULT_MAX_MESSAGE_BYTES
}

/// `codec:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodecName {
    /// JSON.
    #[default]
    Json,
    /// MessagePack.
    Msgpack,
}

impl From<CodecName> for queue_core::Codec {
    fn from(c: CodecName) -> Self {
        match c {
            CodecName::Json => queue_core::Codec::Json,
            CodecName::Msgpack => queue_core::Codec::MsgPack,
        }
    }
}

/// `queue_type:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueTypeName {
    /// A classic queue.
    #[default]
    Classic,
    /// A quorum queue.
    Quorum,
}

impl From<QueueTypeName> for queue_core::QueueType {
    fn from(t: QueueTypeName) -> Self {
        match t {
            QueueTypeName::Classic => queue_core::QueueType::Classic,
            QueueTypeName::Quorum => queue_core::QueueType::Quorum,
        }
    }
}

/// `dead_letter:`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "expected true (the queue's own .dlq), false (none) or a queue id"
)]
pub enum DeadLetterConfig {
    /// `true` (the default queue) or `false` (none).
    Enabled(bool),
    /// Another queue id.
    Queue(String),
}

/// `retry:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Deliveries before dead-lettering (10).
    pub max_attempts: u32,
    /// Waits between attempts.
    pub backoff: BackoffConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 10,
            backoff: BackoffConfig::default(),
        }
    }
}

/// `retry.backoff:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// First wait (1s).
    #[serde(deserialize_with = "queue_core::config::duration::deserialize")]
    pub initial: Duration,
    /// Growth per attempt (2).
    pub multiplier: f64,
    /// Longest wait (60s).
    #[serde(deserialize_with = "queue_core::config::duration::deserialize")]
    pub max: Duration,
    /// Shortens each wait by up to 20% at random, so failed messages spread out.
    pub jitter: bool,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max: Duration::from_secs(60),
            jitter: true,
        }
    }
}

/// `sandbox:` of a consumer, process or function entry (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// What the entry's Lua file may use beyond the safe library: `io`, `os`,
    /// `require`.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// `security:` of a consumer or process.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySecurity {
    /// Who the code runs as.
    pub actor: Option<ActorConfig>,
    /// `security.policy` entries that apply.
    #[serde(default)]
    pub policies: Vec<String>,
}

/// An actor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorConfig {
    /// Its id.
    pub id: String,
    /// Metadata policy conditions match on.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// `queue.consumer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerEntry {
    /// The queue it reads.
    pub queue: String,
    /// A `function.lua` entry.
    pub func: Option<String>,
    /// Or a Lua file...
    pub source: Option<String>,
    /// ...and the function in it.
    pub method: Option<String>,
    /// Handlers running at once (1..=1000).
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Unsettled deliveries held (1..=10000, default 10).
    #[serde(default = "ten")]
    pub prefetch: u32,
    /// How long shutdown waits for running handlers (10s).
    #[serde(
        default = "ten_seconds",
        deserialize_with = "queue_core::config::duration::deserialize"
    )]
    pub stop_timeout: Duration,
    /// How long one handler run may take (none by default): past it, the run fails
    /// with a retryable timeout error (docs/consumers.md, "Handler time limits").
    #[serde(
        default,
        deserialize_with = "queue_core::config::option_duration::deserialize"
    )]
    pub timeout: Option<Duration>,
    /// Retry errors that say they are not retryable too (false by default: such an
    /// error is dead-lettered on its first failure; docs/consumers.md, "Errors that
    /// are not retried").
    #[serde(default)]
    pub retry_all_errors: bool,
    /// Actor and policies the handler runs with.
    #[serde(default)]
    pub security: EntrySecurity,
    /// What the handler's file may use beyond the safe library.
    #[serde(default)]
    pub sandbox: SandboxConfig,
    /// Options only one driver understands.
    #[serde(default)]
    pub driver_options: BTreeMap<String, serde_json::Value>,
}

fn one() -> u32 {
    1
}
fn ten() -> u32 {
    10
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

/// `function.lua`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionEntry {
    /// The Lua file, relative to the YAML file.
    pub source: String,
    /// The function in it.
    pub method: String,
    /// What the file may use beyond the safe library.
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

/// `process.lua`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessEntry {
    /// The Lua file, relative to the YAML file.
    pub source: String,
    /// The function in it.
    pub method: String,
    /// How many coroutines run it (1); each gets its index.
    #[serde(default = "one")]
    pub instances: u32,
    /// Actor and policies it runs with.
    #[serde(default)]
    pub security: EntrySecurity,
    /// What its file may use beyond the safe library.
    #[serde(default)]
    pub sandbox: SandboxConfig,
}

/// `security.policy`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// Action patterns.
    pub actions: OneOrMany,
    /// Resource patterns: `None` when absent (`*`), `Some(None)` when written empty
    /// (`resources: ~`, or a `${V}` that is empty), which `check` refuses: read as
    /// absent, it allowed every queue.
    #[serde(default, deserialize_with = "written")]
    pub resources: Option<Option<OneOrMany>>,
    /// `allow` or `deny`.
    pub effect: EffectName,
    /// Actor metadata that must match.
    #[serde(default)]
    pub conditions: BTreeMap<String, String>,
}

/// `effect:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EffectName {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryKind {
    /// `queue.driver.*`: the kind and the fields for its factory.
    Driver {
        /// `queue.driver.memory`, ...
        kind: String,
        /// Every field but `name`/`id`/`kind`.
        config: DriverFields,
    },
    /// `queue.queue`.
    Queue(Box<QueueEntry>),
    /// `queue.consumer`.
    Consumer(Box<ConsumerEntry>),
    /// `function.lua`.
    Function(FunctionEntry),
    /// `process.lua`.
    Process(ProcessEntry),
    /// `security.policy`.
    Policy(PolicyEntry),
}

impl EntryKind {
    /// The kind as written in YAML.
    pub fn name(&self) -> &str {
        match self {
            EntryKind::Driver { kind, .. } => kind,
            EntryKind::Queue(_) => "queue.queue",
            EntryKind::Consumer(_) => "queue.consumer",
            EntryKind::Function(_) => "function.lua",
            EntryKind::Process(_) => "process.lua",
            EntryKind::Policy(_) => "security.policy",
        }
    }
}
