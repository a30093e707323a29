//! Turns fuzz bytes into a message as another client might send it (any id, content
//! type, body and headers, well-known names with any value), and runs it through the
//! runtime's path: decode, a Lua handler that reads every header and fails, then the
//! failure path. What must hold: the handler never crashes, and the failed message
//! always moves (to its retry or its dead-letter queue) as exactly one copy a strict
//! broker accepts, never going back for an immediate redelivery. Shared by the
//! `outside_message` fuzz target and the test that replays its corpus.

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use queue_core::retry::{Disposition, Exhausted, FailurePath, RetryPolicy};
use queue_core::security::SecurityContext;
use queue_core::{
    Acker, Backoff, Capabilities, ConsumeOptions, Delivery, Driver, HeaderValue, Headers, Message,
    QueueId, QueueInfo, QueueSpec, Queues, Result, Subscription,
};
use queue_lua::{DeliveryContext, LuaHost, Outcome, Settle};

/// Well-known header names, so fuzzing reaches the checks behind them.
const NAMES: [&str; 12] = [
    "priority",
    "expiration",
    "ttl",
    "delay",
    "attempts",
    "message_id",
    "timestamp",
    "correlation_id",
    "x_dead_letter_reason",
    "x_original_queue",
    "content_type",
    "",
];

/// One content type of each reading (docs/core-model.md, "Bodies from other clients").
const CONTENT_TYPES: [&str; 8] = [
    "application/json",
    "application/msgpack",
    "application/x-msgpack; charset=binary",
    "text/plain",
    "",
    "application/octet-stream",
    "application/vnd.x+json",
    "application/xml",
];

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn text(&mut self, max: usize) -> String {
        let len = usize::from(self.byte()) % (max + 1);
        let bytes: Vec<u8> = (0..len).map(|_| self.byte()).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn long(&mut self) -> i64 {
        i64::from_le_bytes(std::array::from_fn(|_| self.byte()))
    }
}

/// The message `data` describes.
fn message(data: &[u8]) -> Message {
    let mut input = Input { data, pos: 0 };
    let mut headers = Headers::new();
    for _ in 0..input.byte() % 8 {
        let choice = input.byte();
        let name = if choice.is_multiple_of(3) {
            input.text(300)
        } else {
            NAMES[usize::from(choice) % NAMES.len()].to_string()
        };
        let value = match input.byte() % 5 {
            0 => HeaderValue::Int(input.long()),
            1 => HeaderValue::Float(f64::from_bits(input.long() as u64)),
            2 => HeaderValue::Bool(input.byte().is_multiple_of(2)),
            3 => HeaderValue::String("v".repeat(usize::from(input.byte()) * 600)),
            _ => HeaderValue::String(input.text(64)),
        };
        headers.insert(name, value);
    }
    let id = match input.byte() % 4 {
        0 => String::new(),
        1 => "i".repeat(300),
        _ => input.text(40),
    };
    // One of each reading, or any text, which reaches how a content type is parsed.
    let choice = usize::from(input.byte());
    let content_type = match CONTENT_TYPES.get(choice % (CONTENT_TYPES.len() + 1)) {
        Some(known) => known.to_string(),
        None => input.text(40),
    };
    let body = data
        .get(input.pos.min(data.len())..)
        .unwrap_or_default()
        .to_vec();
    Message {
        id,
        headers,
        content_type,
        body,
    }
}

/// One fuzz input as a run: its first byte chooses the attempts (1 to 3) and whether
/// the driver refuses the retry copy (then the dead letter's reason names why, at
/// length); the rest is the message.
pub struct Case {
    /// The message as another client sent it.
    pub message: Message,
    /// The queue's `max_attempts`.
    pub max_attempts: u32,
    /// Whether the driver refuses a copy for another attempt, as it refuses one it
    /// cannot carry.
    pub refuse_retries: bool,
}

/// The run `data` describes.
pub fn case(data: &[u8]) -> Case {
    let first = data.first().copied().unwrap_or(0);
    Case {
        message: message(data.get(1..).unwrap_or_default()),
        max_attempts: u32::from(first % 3) + 1,
        refuse_retries: (first / 3) % 2 == 1,
    }
}

/// Records how a delivery was settled.
struct Recorder(Arc<Mutex<Option<&'static str>>>);

#[async_trait::async_trait]
impl Acker for Recorder {
    async fn ack(self: Box<Self>) -> Result<()> {
        *self.0.lock().unwrap() = Some("ack");
        Ok(())
    }
    async fn release(self: Box<Self>) -> Result<()> {
        *self.0.lock().unwrap() = Some("release");
        Ok(())
    }
    fn release_on_drop(self: Box<Self>) {
        *self.0.lock().unwrap() = Some("dropped");
    }
}

struct NoSettle;

#[async_trait::async_trait(?Send)]
impl Settle for NoSettle {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }
    async fn nack(&self, _reason: &str, _retryable: bool) -> Result<()> {
        Ok(())
    }
}

const HANDLER: &str = r#"
function handle(payload)
  local msg = queue.message()
  local seen = 0
  for k, v in pairs(msg:headers()) do seen = seen + 1 end
  local attempts = msg:header("attempts")
  assert(math.type(attempts) == "integer" and attempts >= 1, "attempts is not a number")
  return nil, "failed on purpose after reading " .. seen .. " headers"
end
"#;

/// A driver that checks every copy it is asked to publish the way a strict broker
/// would, and remembers where it went.
#[derive(Default)]
struct StrictDriver {
    published: Mutex<Vec<(QueueId, Message)>>,
    /// A queue whose copies it refuses, with an error longer than a reason may be.
    refusing: Mutex<Option<QueueId>>,
}

#[async_trait::async_trait]
impl Driver for StrictDriver {
    fn name(&self) -> &str {
        "strict"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            confirms: true,
            delay: true,
            priority: true,
            max_priority: 9,
            message_ttl: true,
            ..Capabilities::default()
        }
    }

    async fn declare(&self, _spec: &QueueSpec) -> Result<()> {
        Ok(())
    }

    async fn publish(&self, queue: &QueueId, copy: Message) -> Result<()> {
        if self.refusing.lock().unwrap().as_ref() == Some(queue) {
            return Err(queue_core::Error::invalid(format!(
                "this copy cannot be carried: {}",
                "why ".repeat(5_000)
            )));
        }
        let headers = &copy.headers;
        assert!(headers.byte_size() <= queue_core::MAX_HEADER_BYTES);
        assert!(headers.iter().all(|(k, _)| !k.is_empty() && k.len() <= 255));
        assert!(!copy.id.is_empty() && copy.id.len() <= 255);
        headers.priority_level().expect("priority");
        headers.delay().expect("delay");
        headers.ttl().expect("ttl");
        self.published.lock().unwrap().push((queue.clone(), copy));
        Ok(())
    }

    async fn consume(&self, _: &QueueId, _: ConsumeOptions) -> Result<Box<dyn Subscription>> {
        Err(queue_core::Error::internal("not consumed"))
    }

    async fn info(&self, _queue: &QueueId) -> Result<QueueInfo> {
        Ok(QueueInfo::default())
    }

    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// The world one run works in: a Lua host with the handler, and a strict driver.
pub struct World {
    host: LuaHost,
    driver: Arc<StrictDriver>,
    queue: QueueId,
    dead_letters: QueueId,
    source: RemovedOnDrop,
}

/// The handler's source file, removed with the world.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl World {
    /// Loads the handler.
    pub async fn new() -> World {
        let host = LuaHost::new(Queues::new(), SecurityContext::default()).expect("host");
        let path = std::env::temp_dir().join(format!(
            "outside-message-{}-{:?}.lua",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, HANDLER).expect("write handler");
        host.handler(&path, "handle").expect("handler");
        World {
            host,
            driver: Arc::default(),
            queue: QueueId::parse("fuzz:in").expect("id"),
            dead_letters: QueueId::parse("fuzz:in.dlq").expect("id"),
            source: RemovedOnDrop(path),
        }
    }

    /// Runs one outside message through decode, handler and failure path, checking
    /// what must hold; panics when it does not.
    pub async fn run(&self, case: Case) {
        let Case {
            message,
            max_attempts,
            refuse_retries,
        } = case;
        *self.driver.refusing.lock().unwrap() = refuse_retries.then(|| self.queue.clone());
        let payload = self.host.decode_payload(&message);
        let reason = match payload {
            Err(e) => {
                assert_eq!(e.kind(), queue_core::ErrorKind::Invalid, "{e}");
                format!("the body cannot be decoded: {}", e.message())
            }
            Ok(payload) => {
                let mut seen = message.clone();
                let attempts = seen.headers.attempts();
                seen.headers.insert("attempts", i64::from(attempts));
                let context = DeliveryContext {
                    message: std::sync::Arc::new(seen),
                    settle: Rc::new(NoSettle),
                };
                let handler = self
                    .host
                    .handler(&self.source.0, "handle")
                    .expect("handler");
                match self
                    .host
                    .run_handler(&handler, payload, context, SecurityContext::default())
                    .await
                {
                    Outcome::Nack { reason, .. } => {
                        assert!(reason.contains("failed on purpose"), "{reason}");
                        reason
                    }
                    other => panic!("the handler did not fail as written: {other:?}"),
                }
            }
        };
        let settled = Arc::new(Mutex::new(None));
        let delivery = Delivery::new(message, Box::new(Recorder(Arc::clone(&settled))));
        let (_stop, stop) = tokio::sync::watch::channel(false);
        let driver = self.driver.clone() as Arc<dyn Driver>;
        let path = FailurePath {
            queue: self.queue.clone(),
            driver: Arc::clone(&driver),
            retry: RetryPolicy {
                max_attempts,
                backoff: Backoff::new(Duration::ZERO, 1.0, Duration::ZERO),
            },
            exhausted: Exhausted::DeadLetter(self.dead_letters.clone(), driver),
            is_dead_letter_queue: false,
            stop,
        };
        let disposition = path.fail(&delivery, &reason).await.expect("fail");
        assert!(
            matches!(
                disposition,
                Disposition::Retried | Disposition::DeadLettered | Disposition::Kept
            ),
            "a failed message went back instead of moving: {disposition:?}"
        );
        assert_eq!(*settled.lock().unwrap(), Some("ack"));
        let published = std::mem::take(&mut *self.driver.published.lock().unwrap());
        assert_eq!(published.len(), 1, "one copy per failure");
        let expected = if disposition == Disposition::DeadLettered {
            &self.dead_letters
        } else {
            &self.queue
        };
        assert_eq!(&published[0].0, expected);
        if disposition == Disposition::DeadLettered {
            // The reason the runtime wrote, however long the driver's refusal was.
            let reason = published[0]
                .1
                .headers
                .get(queue_core::names::X_DEAD_LETTER_REASON);
            let reason = reason.and_then(|r| r.as_str()).expect("a reason");
            assert!(
                reason.len() <= queue_core::retry::MAX_REASON_BYTES,
                "{}",
                reason.len()
            );
        }
    }
}
