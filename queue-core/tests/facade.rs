//! The publishing facade: every check, in the order docs/lua-api.md gives.

use std::sync::Arc;

use queue_core::memory::MemoryDriver;
use queue_core::security::{Actor, Effect, Policy, RulePolicy, SecurityContext};
use queue_core::{
    ConsumeOptions, Driver, ErrorKind, HeaderValue, Headers, PublishSettings, QueueId, QueueSpec,
    Queues, Value,
};
use queue_testkit::next;

async fn setup() -> (Queues, Arc<MemoryDriver>) {
    let queues = Queues::new();
    let driver = Arc::new(MemoryDriver::new());
    let settings = PublishSettings {
        max_message_bytes: 64,
        ..PublishSettings::default()
    };
    let spec = QueueSpec::new(QueueId::parse("app:tasks").unwrap());
    queues
        .declare(spec, settings, driver.clone())
        .await
        .unwrap();
    (queues, driver)
}

fn policies(rules: Vec<RulePolicy>) -> SecurityContext {
    let rules = rules
        .into_iter()
        .map(|r| Arc::new(r) as Arc<dyn Policy>)
        .collect();
    SecurityContext::new(Some(Actor::new("worker")), rules, false)
}

fn body() -> Value {
    Value::map([("action", Value::from("x"))])
}

async fn ready(driver: &MemoryDriver) -> u64 {
    driver
        .info(&QueueId::parse("app:tasks").unwrap())
        .await
        .unwrap()
        .ready
        .unwrap()
}

#[tokio::test]
async fn general_permission_is_checked_before_the_queue_id() {
    let (queues, driver) = setup().await;
    let deny_all = policies(vec![RulePolicy::new(["other"], ["*"], Effect::Allow)]);
    let err = queues
        .publish(&deny_all, "", body(), Headers::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(err.message().contains("queue.publish"), "{err}");
    assert_eq!(ready(&driver).await, 0);
}

#[tokio::test]
async fn queue_id_is_checked_before_the_queue_permission() {
    let (queues, _) = setup().await;
    let general_only = policies(vec![RulePolicy::new(
        ["queue.publish"],
        ["*"],
        Effect::Allow,
    )]);
    let err = queues
        .publish(&general_only, "no-colon", body(), Headers::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    let err = queues
        .publish(&general_only, "app:tasks", body(), Headers::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(
        err.message().contains("queue.publish.queue") && err.message().contains("app:tasks"),
        "{err}"
    );
}

#[tokio::test]
async fn queue_permission_is_checked_before_the_data() {
    let (queues, _) = setup().await;
    let ctx = policies(vec![RulePolicy::new(
        ["queue.publish"],
        ["*"],
        Effect::Allow,
    )]);
    let err = queues
        .publish(&ctx, "app:tasks", Value::Nil, Headers::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
}

#[tokio::test]
async fn empty_data_is_invalid_before_headers_and_existence() {
    let (queues, _) = setup().await;
    let open = SecurityContext::default();
    let bad_headers = Headers::from_pairs([("attempts", HeaderValue::Int(2))]);
    for empty in [
        Value::Nil,
        Value::from(""),
        Value::Map(Default::default()),
        Value::Array(vec![]),
    ] {
        let err = queues
            .publish(&open, "app:missing", empty, bad_headers.clone())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.message().contains("empty"), "{err}");
    }
}

#[tokio::test]
async fn headers_are_checked_before_the_queue_exists() {
    let (queues, _) = setup().await;
    let open = SecurityContext::default();
    let reserved = Headers::from_pairs([("x_dead_letter_reason", HeaderValue::from("forged"))]);
    let err = queues
        .publish(&open, "app:missing", body(), reserved)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.message().contains("x_dead_letter_reason"), "{err}");
    let err = queues
        .publish(&open, "app:missing", body(), Headers::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn size_is_checked_after_existence_and_nothing_is_published() {
    let (queues, driver) = setup().await;
    let open = SecurityContext::default();
    let big = Value::from("x".repeat(100));
    let err = queues
        .publish(&open, "app:tasks", big, Headers::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.message().contains("max_message_bytes"), "{err}");
    assert_eq!(ready(&driver).await, 0);
}

#[tokio::test]
async fn denial_of_either_check_publishes_nothing_and_allowed_publish_arrives() {
    let (queues, driver) = setup().await;
    let deny_queue = policies(vec![
        RulePolicy::new(["queue.*"], ["*"], Effect::Allow),
        RulePolicy::new(["queue.publish.queue"], ["app:tasks"], Effect::Deny),
    ]);
    assert!(
        queues
            .publish(&deny_queue, "app:tasks", body(), Headers::new())
            .await
            .is_err()
    );
    assert_eq!(ready(&driver).await, 0);

    let allowed = policies(vec![RulePolicy::new(["queue.*"], ["app:*"], Effect::Allow)]);
    let headers = Headers::from_pairs([("priority", HeaderValue::from("high"))]);
    let id = queues
        .publish(&allowed, "app:tasks", body(), headers)
        .await
        .unwrap();
    let mut sub = driver
        .consume(
            &QueueId::parse("app:tasks").unwrap(),
            ConsumeOptions::default(),
        )
        .await
        .unwrap();
    let d = next(&mut sub).await;
    assert_eq!(d.message().id, id);
    assert_eq!(
        d.message().headers.get("priority"),
        Some(&HeaderValue::from("high"))
    );
    assert!(
        matches!(d.message().headers.get("timestamp"), Some(HeaderValue::Int(t)) if *t > 1_600_000_000)
    );
    assert_eq!(d.message().decode().unwrap(), body());
}

#[tokio::test]
async fn strict_mode_without_policies_denies() {
    let (queues, _) = setup().await;
    let err = queues
        .publish(
            &SecurityContext::unrestricted(true),
            "app:tasks",
            body(),
            Headers::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
}

#[tokio::test]
async fn json_refuses_what_it_cannot_carry_suggesting_msgpack() {
    let (queues, _) = setup().await;
    let err = queues
        .publish(
            &SecurityContext::default(),
            "app:tasks",
            Value::Float(f64::NAN),
            Headers::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    assert!(err.message().contains("msgpack"), "{err}");
}
