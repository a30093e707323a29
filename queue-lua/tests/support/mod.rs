//! Shared test harness: a Lua host publishing through a controllable memory driver,
//! with queues declared and a recorder for handler settlements.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use async_trait::async_trait;
use queue_core::security::SecurityContext;
use queue_core::{
    ConsumeOptions, Driver, Message, PublishSettings, QueueId, QueueSpec, Queues, Result, Value,
};
use queue_lua::{DeliveryContext, LuaHost, Outcome, Settle};
use queue_testkit::{ControlledDriver, next};

pub const QUEUES: [&str; 4] = ["app:tasks", "app:emails", "app:notifications", "app:raw"];

pub struct Harness {
    pub queues: Queues,
    pub driver: Arc<ControlledDriver>,
    pub host: LuaHost,
}

impl Harness {
    pub async fn new() -> Harness {
        Harness::with_security(SecurityContext::default()).await
    }

    pub async fn with_security(security: SecurityContext) -> Harness {
        let queues = Queues::new();
        let driver = Arc::new(ControlledDriver::new());
        for q in QUEUES {
            let settings = if q == "app:raw" {
                PublishSettings {
                    codec: queue_core::Codec::MsgPack,
                    max_message_bytes: 4096,
                }
            } else {
                PublishSettings::default()
            };
            let spec = QueueSpec::new(QueueId::parse(q).unwrap());
            queues
                .declare(spec, settings, driver.clone())
                .await
                .unwrap();
        }
        let host = LuaHost::new(queues.clone(), security).unwrap();
        Harness {
            queues,
            driver,
            host,
        }
    }

    /// The next message published to a queue (fails if there is none).
    pub async fn take(&self, queue: &str) -> Message {
        let id = QueueId::parse(queue).unwrap();
        let mut sub = self
            .driver
            .consume(&id, ConsumeOptions { prefetch: 1 })
            .await
            .unwrap();
        let info = self.driver.info(&id).await.unwrap();
        assert!(info.ready.unwrap() > 0, "nothing was published to {queue}");
        let d = next(&mut sub).await;
        d.ack().await.unwrap();
        d.message().clone()
    }

    pub async fn ready(&self, queue: &str) -> u64 {
        self.queues.info(queue).await.unwrap().ready.unwrap()
    }

    /// Runs `method` of a Lua file under tests/lua as a handler for a delivery of
    /// `payload` with `headers`; returns the outcome and what the handler settled itself.
    pub async fn handle(
        &self,
        file: &str,
        method: &str,
        message: Message,
    ) -> (Outcome, Vec<String>) {
        self.handle_as(file, method, message, SecurityContext::default())
            .await
    }

    pub async fn handle_as(
        &self,
        file: &str,
        method: &str,
        message: Message,
        security: SecurityContext,
    ) -> (Outcome, Vec<String>) {
        let handler = self.host.handler(&lua_file(file), method).unwrap();
        let recorder = Rc::new(Recorder::default());
        let payload = self.host.decode_payload(&message).unwrap();
        let context = DeliveryContext {
            message: std::sync::Arc::new(message),
            settle: recorder.clone(),
        };
        let outcome = self
            .host
            .run_handler(&handler, payload, context, security)
            .await;
        let settled = recorder.calls.borrow().clone();
        (outcome, settled)
    }
}

pub fn lua_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/lua")
        .join(name)
}

pub fn json_message(body: Value, headers: queue_core::Headers) -> Message {
    Message::encode(&body, headers, queue_core::Codec::Json).unwrap()
}

/// Records the handler's own `msg:ack()` / `msg:nack()` calls.
#[derive(Default)]
pub struct Recorder {
    pub calls: RefCell<Vec<String>>,
}

#[async_trait(?Send)]
impl Settle for Recorder {
    async fn ack(&self) -> Result<()> {
        self.calls.borrow_mut().push("ack".into());
        Ok(())
    }
    async fn nack(&self, reason: &str, retryable: bool) -> Result<()> {
        let retried = if retryable { "" } else { " (not retryable)" };
        self.calls
            .borrow_mut()
            .push(format!("nack: {reason}{retried}"));
        Ok(())
    }
}

impl Harness {
    /// A harness whose Lua state has other limits.
    pub async fn with_limits(limits: queue_lua::Limits) -> Harness {
        let mut h = Harness::new().await;
        h.host =
            LuaHost::with_limits(h.queues.clone(), SecurityContext::default(), limits).unwrap();
        h
    }

    /// Runs a handler of a file under tests/lua as `security`, for a delivery of `{}`;
    /// returns the outcome.
    pub async fn run_as(&self, file: &str, method: &str, security: SecurityContext) -> Outcome {
        let message = json_message(
            Value::map([("n", Value::Int(1))]),
            queue_core::Headers::new(),
        );
        self.handle_as(file, method, message, security).await.0
    }

    /// The body of the next message on a queue, decoded.
    pub async fn take_body(&self, queue: &str) -> Value {
        self.take(queue).await.decode().unwrap()
    }
}
