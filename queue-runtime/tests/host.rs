//! The host in-process, with the testkit's controllable driver: many handlers on few
//! Lua states, and handlers suspended in a publish while the host keeps working.

use std::sync::Arc;

use queue_core::testkit::{ControlledDriver, ControlledFactory, numbered};
use queue_core::{Driver, QueueId};
use queue_runtime::host::{Host, HostOptions};
use queue_runtime::registry::{self, DriverKinds};

const APP: &str = r#"namespace: app
entries:
  - name: held
    kind: queue.driver.controlled
  - name: jobs
    kind: queue.queue
    max_length: 5000
  - name: out
    kind: queue.queue
    max_length: 5000
  - name: worker
    kind: queue.consumer
    queue: jobs
    source: h.lua
    method: handle
    concurrency: 1000
    prefetch: 1000
"#;

const HANDLER: &str = r#"
function handle(payload)
  local ok, err = queue.publish("app:out", payload)
  if err then return nil, err end
end
"#;

/// Starts a host for `app` (with the handler file) on a fresh controlled driver.
async fn start(app: &str, lua_threads: usize) -> (tempfile::TempDir, Arc<ControlledDriver>, Host) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.yaml"), app).unwrap();
    std::fs::write(dir.path().join("h.lua"), HANDLER).unwrap();
    let driver = Arc::new(ControlledDriver::new());
    let mut kinds = DriverKinds::builtin();
    kinds.register(Arc::new(ControlledFactory(driver.clone())));
    let config = queue_runtime::config::load(&[dir.path().join("app.yaml")]).unwrap();
    let plan = registry::plan(&config, &kinds, false).unwrap();
    let options = HostOptions {
        lua_threads,
        wait_for_brokers: false,
    };
    let host = Host::start(plan, &kinds, options).await.unwrap();
    (dir, driver, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_handlers_suspend_in_publish_on_two_lua_states() {
    let (_dir, driver, host) = start(APP, 2).await;

    driver.hold_publishes();
    let jobs = QueueId::parse("app:jobs").unwrap();
    for n in 0..1000 {
        driver.inner().publish(&jobs, numbered(n)).await.unwrap();
    }
    // Every handler is now suspended inside queue.publish, waiting for the driver.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        driver.wait_for_held(1000),
    )
    .await
    .unwrap();
    assert_eq!(
        host.lua_states(),
        2,
        "1000 concurrent handlers, 2 Lua states"
    );
    assert!(!host.is_idle().await.unwrap());

    driver.pass_publishes();
    tokio::time::timeout(std::time::Duration::from_secs(60), host.wait_idle())
        .await
        .unwrap()
        .unwrap();
    let out = host.queues().info("app:out").await.unwrap();
    assert_eq!(out.ready, Some(1000));
    let summary = host.shutdown().await;
    assert_eq!(summary[0].acked, Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_fails_the_handler_and_the_message_is_retried() {
    let app = APP.replace("    max_length: 5000\n  - name: out", "    max_length: 5000\n    retry:\n      backoff:\n        initial: 10ms\n        jitter: false\n  - name: out");
    let (_dir, driver, host) = start(&app, 1).await;

    driver.hold_publishes();
    driver
        .inner()
        .publish(&QueueId::parse("app:jobs").unwrap(), numbered(7))
        .await
        .unwrap();
    driver.wait_for_held(1).await;
    assert!(driver.refuse_next(), "the handler's publish is refused");
    // The runtime's retry copy is itself a publish through the same driver.
    driver.wait_for_held(1).await;
    driver.pass_publishes();
    tokio::time::timeout(std::time::Duration::from_secs(60), host.wait_idle())
        .await
        .unwrap()
        .unwrap();
    let out = host.queues().info("app:out").await.unwrap();
    assert_eq!(out.ready, Some(1), "the second attempt published");
    host.shutdown().await;
}
