//! The host in-process, with the testkit's controllable driver: many handlers on few
//! Lua states, and handlers suspended in a publish while the host keeps working.

use std::sync::Arc;
use std::time::Duration;

use queue_core::{Driver, QueueId};
use queue_runtime::host::{Host, HostOptions};
use queue_runtime::registry::{self, DriverKinds, Plan};
use queue_testkit::{ControlledDriver, ControlledFactory, numbered, within};

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
    start_on(ControlledDriver::new(), app, lua_threads).await
}

/// Writes `app` and its handler file `h.lua` into a fresh directory and plans them
/// on `driver`.
fn planned(
    driver: ControlledDriver,
    app: &str,
    handler: &str,
) -> (tempfile::TempDir, Arc<ControlledDriver>, DriverKinds, Plan) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.yaml"), app).unwrap();
    std::fs::write(dir.path().join("h.lua"), handler).unwrap();
    let driver = Arc::new(driver);
    let mut kinds = DriverKinds::builtin();
    kinds.register(Arc::new(ControlledFactory(driver.clone())));
    let config = queue_runtime::config::load(&[dir.path().join("app.yaml")]).unwrap();
    let plan = registry::plan(&config, &kinds, false).unwrap();
    (dir, driver, kinds, plan)
}

async fn start_on(
    driver: ControlledDriver,
    app: &str,
    lua_threads: usize,
) -> (tempfile::TempDir, Arc<ControlledDriver>, Host) {
    let (dir, driver, kinds, plan) = planned(driver, app, HANDLER);
    let options = HostOptions {
        lua_threads,
        ..HostOptions::default()
    };
    let host = Host::start(plan, &kinds, options).await.unwrap();
    (dir, driver, host)
}

/// A start cut off while a later consumer attaches (a signal while its broker does
/// not answer, or its consume failing) dropped the handlers of the consumers attached
/// before it mid-run, their settlements cut in half. No consumer takes a delivery
/// until every one is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_handler_runs_before_every_consumer_is_attached() {
    let app = format!(
        "{APP}  - name: late\n    kind: queue.queue\n  - name: second\n    kind: queue.consumer\n    queue: late\n    source: h.lua\n    method: handle\n"
    );
    let (_dir, driver, kinds, plan) = planned(ControlledDriver::new(), &app, HANDLER);
    let jobs = QueueId::parse("app:jobs").unwrap();
    let spec = plan.queue(&jobs).unwrap().spec.clone();
    driver.declare(&spec).await.unwrap();
    for n in 0..5 {
        driver.publish(&jobs, numbered(n)).await.unwrap();
    }
    // A handler of `worker` that ran would wait here, in its publish.
    driver.hold_publishes();
    driver.never_answer_consumes_of(&QueueId::parse("app:late").unwrap());
    let start = Host::start(plan, &kinds, HostOptions::default());
    tokio::pin!(start);
    let ran = tokio::select! {
        started = &mut start => panic!("the start ended with a consume unanswered: {:?}", started.err()),
        held = tokio::time::timeout(Duration::from_secs(1), driver.wait_for_held(1)) => held.is_ok(),
    };
    assert!(!ran, "a handler ran before every consumer was attached");
}

/// Every handler is looked up before any subscription is made: a subscription made
/// first had taken deliveries by the time the start was refused, and given them back
/// as redeliveries (a higher delivery count on a quorum queue, entries pending on a
/// Redis stream). Here the consume never answers: a start that made it hung there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_handler_fails_the_start_before_any_subscription() {
    let app = APP.replace(
        "    method: handle\n",
        "    method: handle\n    sandbox:\n      allow: [os]\n",
    );
    let handler = "local home = os.getenv('HOME')\nfunction handel(payload) end\n";
    let (_dir, driver, kinds, plan) = planned(ControlledDriver::new(), &app, handler);
    driver.never_answer_consumes_of(&QueueId::parse("app:jobs").unwrap());
    let started = within(
        "the start",
        Host::start(plan, &kinds, HostOptions::default()),
    )
    .await;
    let err = started.err().expect("a start without its handler");
    let said = err.to_string();
    assert!(
        said.contains("consumer app:worker") && said.contains("defines no function \"handle\""),
        "{said}"
    );
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
    driver.wait_for_held(1000).await;
    assert_eq!(
        host.lua_states(),
        2,
        "1000 concurrent handlers, 2 Lua states"
    );
    assert!(!host.is_idle().await.unwrap());

    driver.pass_publishes();
    tokio::time::timeout(Duration::from_secs(60), host.wait_idle())
        .await
        .expect("idle within 60 s")
        .unwrap();
    let out = host.queues().info("app:out").await.unwrap();
    assert_eq!(out.ready, Some(1000));
    let summary = within("shutdown", host.shutdown()).await;
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
    tokio::time::timeout(Duration::from_secs(60), host.wait_idle())
        .await
        .expect("idle within 60 s")
        .unwrap();
    let out = host.queues().info("app:out").await.unwrap();
    assert_eq!(out.ready, Some(1), "the second attempt published");
    within("shutdown", host.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_retry_publish_begun_before_it() {
    let app = APP.replace(
        "    concurrency: 1000\n    prefetch: 1000\n",
        "    concurrency: 1\n    prefetch: 1\n    stop_timeout: 30s\n",
    );
    let (_dir, driver, host) = start(&app, 1).await;
    let jobs = QueueId::parse("app:jobs").unwrap();

    driver.hold_publishes();
    driver.inner().publish(&jobs, numbered(7)).await.unwrap();
    driver.wait_for_held(1).await;
    assert!(driver.refuse_next(), "the handler's publish is refused");
    // The handler has returned; its retry copy is held in the driver.
    driver.wait_for_held(1).await;
    let stopping = tokio::spawn(host.shutdown());
    // A shutdown that cancelled the consumer now would return the original to the
    // queue while its copy is on the way. A correct one shows nothing while it waits
    // (no signal marks "now waiting for the copy"), so watch for each sign of the
    // wrong one instead of sleeping blind: the consumer gone, the original back in
    // its queue, or shutdown over. The first sign fails at once; the window only
    // gives the wrong one its time.
    let went_wrong = async {
        loop {
            let info = driver.inner().info(&jobs).await.unwrap();
            if info.consumers != Some(1) || info.ready != Some(0) || stopping.is_finished() {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if let Ok(info) = tokio::time::timeout(Duration::from_millis(300), went_wrong).await {
        panic!(
            "the original must stay with the runtime until its retry copy is confirmed; \
             before that: {info:?}, shutdown over: {}",
            stopping.is_finished()
        );
    }
    assert!(driver.confirm_next(), "the retry copy is confirmed");
    let summary = within("shutdown after the retry copy is confirmed", stopping)
        .await
        .expect("shutdown does not panic");
    assert_eq!(
        (summary[0].acked, summary[0].ready, summary[0].in_flight),
        (Some(1), Some(0), Some(0)),
        "the original is acked, not returned: its copy is the only one left"
    );
    // The copy waits out its backoff in the memory driver, which ends with the
    // process: the summary says so, where it read as an empty queue.
    assert_eq!(summary[0].delayed, Some(1), "{summary:?}");
    assert!(
        summary[0].to_string().ends_with(" delayed=1"),
        "{}",
        summary[0]
    );
}

/// A publish that waits for its confirm inside a coroutine the handler created returns
/// `true` once confirmed: the coroutine waits with the handler, where it used to hand
/// mlua's "pending" marker back as if it were the result, the publish never finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_waits_for_its_confirm_inside_a_coroutine_the_handler_made() {
    let app = APP.replace(
        "    concurrency: 1000\n    prefetch: 1000\n",
        "    concurrency: 1\n    prefetch: 1\n",
    );
    let in_a_coroutine = r#"
function handle(payload)
  local ok, err = coroutine.wrap(function() return queue.publish("app:out", payload) end)()
  assert(ok == true and err == nil, "publish in a coroutine gave " .. tostring(ok) .. ", " .. tostring(err))
end
"#;
    let one_thread = HostOptions {
        lua_threads: 1,
        ..HostOptions::default()
    };
    let (_dir, driver, host) = start_with(&app, in_a_coroutine, one_thread).await;
    let host = host.unwrap();
    let (jobs, out) = (
        QueueId::parse("app:jobs").unwrap(),
        QueueId::parse("app:out").unwrap(),
    );
    driver.hold_publishes();
    driver.inner().publish(&jobs, numbered(7)).await.unwrap();
    driver.wait_for_held(1).await;
    driver.pass_publishes();
    wait_for_acks(
        &driver,
        &jobs,
        1,
        "the handler acked after its publish was confirmed",
    )
    .await;
    assert_eq!(driver.inner().info(&out).await.unwrap().ready, Some(1));
    let summary = within("shutdown", host.shutdown()).await;
    assert_eq!(
        summary[0].ready,
        Some(0),
        "the message was retried: {summary:?}"
    );
}

/// A handler's `timeout` ends its run, not the settlement it started: a `msg:nack()`
/// whose retry copy is still on its way when the handler is stopped goes on, so the
/// message is retried, where before it was neither retried nor returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_under_way_outlives_its_handlers_timeout() {
    let app = APP.replace(
        "    concurrency: 1000\n    prefetch: 1000\n",
        "    concurrency: 1\n    prefetch: 2\n    timeout: 200ms\n",
    );
    let nack_first_attempts = r#"
function handle(payload)
  local msg = queue.message()
  if msg:header("attempts") == 1 then msg:nack("not yet") end
end
"#;
    let one_thread = HostOptions {
        lua_threads: 1,
        ..HostOptions::default()
    };
    let (_dir, driver, host) = start_with(&app, nack_first_attempts, one_thread).await;
    let host = host.unwrap();
    let jobs = QueueId::parse("app:jobs").unwrap();
    driver.hold_publishes();
    for n in [7, 8] {
        driver.inner().publish(&jobs, numbered(n)).await.unwrap();
    }
    // With one runner, the second message's retry copy is only published once the
    // first handler's run has ended at its timeout, its own copy still held.
    driver.wait_for_held(2).await;
    driver.pass_publishes();
    // Both copies arrive, are handled and acked: four acks in all.
    wait_for_acks(&driver, &jobs, 4, "both messages retried and handled").await;
    let summary = within("shutdown", host.shutdown()).await;
    assert_eq!((summary[0].ready, summary[0].in_flight), (Some(0), Some(0)));
}

/// A `msg:nack()` still republishing when its handler's timeout ends the run goes
/// on as a task of its own, which counted as nothing: on a driver that does not count
/// unsettled messages (AMQP 0-9-1), the host read idle while the retry copy waited for
/// its confirm, and `--exit-when-idle` could begin its shutdown (review). It counts
/// busy until it settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_under_way_past_its_handlers_timeout_keeps_the_host_busy() {
    let app = APP.replace(
        "    concurrency: 1000\n    prefetch: 1000\n",
        "    concurrency: 1\n    prefetch: 1\n    timeout: 200ms\n",
    );
    let nack = "function handle(payload)\n  local msg = queue.message()\n  if msg:header(\"attempts\") == 1 then msg:nack(\"not yet\") end\nend\n";
    let driver = ControlledDriver::new().counting_no_in_flight();
    let (_dir, driver, kinds, plan) = planned(driver, &app, nack);
    let one_thread = HostOptions {
        lua_threads: 1,
        ..HostOptions::default()
    };
    let host = Host::start(plan, &kinds, one_thread).await.unwrap();
    let jobs = QueueId::parse("app:jobs").unwrap();
    driver.hold_publishes();
    driver.inner().publish(&jobs, numbered(7)).await.unwrap();
    driver.wait_for_held(1).await;
    // Watched for five handler timeouts: the run ends at the first, its copy held.
    let read_idle = tokio::time::timeout(Duration::from_secs(1), async {
        while !host.is_idle().await.unwrap() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        read_idle.is_err(),
        "the host read idle while the nack's copy waited for its confirm"
    );
    driver.pass_publishes();
    within("idle once the copy is handled", host.wait_idle())
        .await
        .unwrap();
    within("shutdown", host.shutdown()).await;
}

/// Starts [`APP`] on one Lua state and a driver without delays, its queue's backoff a
/// minute, its consumer's `concurrency` and `prefetch` lines replaced by `consumer`.
async fn start_holding_for_a_minute(
    consumer: &str,
) -> (tempfile::TempDir, Arc<ControlledDriver>, Host) {
    start_on(
        ControlledDriver::without_delays(),
        &backoff_of_a_minute(consumer),
        1,
    )
    .await
}

/// [`APP`] with a backoff of a minute on `app:jobs`, and `consumer`'s settings.
fn backoff_of_a_minute(consumer: &str) -> String {
    APP.replace(
        "    max_length: 5000\n  - name: out",
        "    max_length: 5000\n    retry:\n      backoff:\n        initial: 60s\n  - name: out",
    )
    .replace("    concurrency: 1000\n    prefetch: 1000\n", consumer)
}

/// On a driver with delays, a failed message whose retry copy cannot be published
/// (the broker's publishing down, a full queue) goes back to its queue after its
/// backoff. That wait leaves the handler's slot to the next delivery: it held it, and
/// with `concurrency: 1` a full queue whose producer took every freed place stopped
/// the consumer for good, the message handled again and again (review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_waiting_to_go_back_leaves_its_handler_slot_to_the_next() {
    let app = backoff_of_a_minute("    concurrency: 1\n    prefetch: 2\n");
    let (_dir, driver, host) = start_on(ControlledDriver::new(), &app, 1).await;
    // The handler fails, then its retry copy is not published.
    the_next_delivery_is_handled_while_the_first_waits(&driver, host, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_a_delivery_held_for_its_backoff_at_once() {
    // Without delayed delivery the runtime holds a failed delivery for its backoff
    // (here a minute); stopping must not wait that out, nor the 30 s stop_timeout.
    let consumer = "    concurrency: 1\n    prefetch: 1\n    stop_timeout: 30s\n";
    let (_dir, driver, host) = start_holding_for_a_minute(consumer).await;
    let jobs = QueueId::parse("app:jobs").unwrap();
    driver.hold_publishes();
    driver.inner().publish(&jobs, numbered(7)).await.unwrap();
    driver.wait_for_held(1).await;
    assert!(driver.refuse_next(), "the handler fails");
    let summary = tokio::time::timeout(Duration::from_secs(20), host.shutdown())
        .await
        .expect("shutdown does not wait out the backoff");
    assert_eq!(
        (summary[0].acked, summary[0].ready),
        (Some(0), Some(1)),
        "the held delivery is back in its queue, unacked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_for_its_backoff_leaves_its_handler_slot_to_the_next() {
    // Without delayed delivery a failed message is held unacked through its backoff
    // (here a minute). Its handler's slot goes on with the next delivery meanwhile:
    // with `concurrency: 1`, one failing message held the consumer for every wait of
    // its retries (about four minutes with the default backoff), and a poison message
    // per slot stopped it.
    let consumer = "    concurrency: 1\n    prefetch: 2\n";
    let (_dir, driver, host) = start_holding_for_a_minute(consumer).await;
    the_next_delivery_is_handled_while_the_first_waits(&driver, host, 1).await;
}

/// Publishes two messages to `app:jobs` of a `concurrency: 1` host, refuses the first
/// `refusals` publishes (the first handler's, then what its failure publishes), and
/// checks that the second message is handled and acked while the first waits, and
/// that the first is back in its queue, unacked, at the stop.
async fn the_next_delivery_is_handled_while_the_first_waits(
    driver: &ControlledDriver,
    host: Host,
    refusals: usize,
) {
    let jobs = QueueId::parse("app:jobs").unwrap();
    driver.hold_publishes();
    for n in [7, 8] {
        driver.inner().publish(&jobs, numbered(n)).await.unwrap();
    }
    for _ in 0..refusals {
        driver.wait_for_held(1).await;
        assert!(driver.refuse_next(), "a publish of the first message's run");
    }
    within(
        "the next delivery's handler, while the failed one waits",
        driver.wait_for_held(1),
    )
    .await;
    assert!(driver.confirm_next(), "the second handler publishes");
    wait_for_acks(driver, &jobs, 1, "the second message handled and acked").await;
    let summary = within("shutdown", host.shutdown()).await;
    assert_eq!(
        (summary[0].acked, summary[0].ready),
        (Some(1), Some(1)),
        "the failed delivery is back in its queue, unacked, at the stop"
    );
}

/// A queue count that fails for a while (a broker reconnecting) is read again: the
/// wait for idleness goes on and ends once the counts read idle. Before, the first
/// failed count ended `--exit-when-idle` with an error and no orderly stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_that_fails_for_a_while_does_not_end_the_wait_for_idleness() {
    let (_dir, driver, host) = start(APP, 1).await;
    driver.fail_next_infos(3);
    within("idle", host.wait_idle()).await.unwrap();
    within("shutdown", host.shutdown()).await;
}

/// A queue the broker lost while the runtime waits for idleness (a Redis `FLUSHALL`,
/// a queue deleted by hand) is declared again by its consumer: counts that find no
/// queue meanwhile are read again. The first ended `--exit-when-idle` with an error
/// (review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_lost_for_a_while_does_not_end_the_wait_for_idleness() {
    let (_dir, driver, host) = start(APP, 1).await;
    driver.lose_queues_for_next_infos(3);
    within("idle", host.wait_idle()).await.unwrap();
    within("shutdown", host.shutdown()).await;
}

/// Waits (bounded) until the driver has counted `acks` acks on `queue`; the memory
/// driver signals nothing per ack, so it looks every 10 ms.
async fn wait_for_acks(driver: &ControlledDriver, queue: &QueueId, acks: u64, what: &str) {
    within(what, async {
        while driver.inner().acked_total(queue) != Some(acks) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Starts a host for `app` whose handler file is `handler`, with `options`.
async fn start_with(
    app: &str,
    handler: &str,
    options: HostOptions,
) -> (
    tempfile::TempDir,
    Arc<ControlledDriver>,
    queue_core::Result<Host>,
) {
    let (dir, driver, kinds, plan) = planned(ControlledDriver::new(), app, handler);
    let host = Host::start(plan, &kinds, options).await;
    (dir, driver, host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_setup_embeds_a_function_every_worker_state_can_call() {
    let setups = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let setup: queue_runtime::host::LuaSetup = {
        let (setups, seen) = (Arc::clone(&setups), Arc::clone(&seen));
        Arc::new(move |host: &queue_lua::LuaHost| {
            setups.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let seen = Arc::clone(&seen);
            let record = host
                .lua()
                .create_function(move |_, n: i64| {
                    seen.lock().unwrap().push(n);
                    Ok(())
                })
                .map_err(|e| queue_core::Error::internal(e.to_string()))?;
            host.embed("record", record)
        })
    };
    let options = HostOptions {
        lua_threads: 2,
        lua_setup: Some(setup),
        ..HostOptions::default()
    };
    let handler = "function handle(payload) record(payload.n) end\n";
    let (_dir, driver, host) = start_with(APP, handler, options).await;
    let host = host.expect("the host starts");
    assert_eq!(
        setups.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the setup ran once per Lua state"
    );
    let jobs = QueueId::parse("app:jobs").unwrap();
    for n in 0..20 {
        driver.inner().publish(&jobs, numbered(n)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), host.wait_idle())
        .await
        .expect("idle within 60 s")
        .unwrap();
    let summary = within("shutdown", host.shutdown()).await;
    assert_eq!(summary[0].acked, Some(20));
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..20).collect::<Vec<_>>(),
        "every handler run called it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_lua_setup_fails_the_start_and_says_so() {
    let options = HostOptions {
        lua_threads: 1,
        lua_setup: Some(Arc::new(|_: &queue_lua::LuaHost| {
            Err(queue_core::Error::internal("no clock here"))
        })),
        ..HostOptions::default()
    };
    let (_dir, _driver, host) = start_with(APP, HANDLER, options).await;
    let err = host.err().expect("the start fails");
    assert!(
        err.message().contains("lua_setup") && err.message().contains("no clock here"),
        "{err}"
    );
}

/// The text each Lua state runs is the one `plan` read and checked: a file rewritten
/// between planning and start (an editor saving, a deploy copying) never reaches a
/// worker half-written, and every worker runs one version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_runs_the_source_text_the_plan_checked() {
    let app = format!(
        "{APP}  - name: seed\n    kind: process.lua\n    source: h.lua\n    method: seed\n"
    );
    let handler =
        format!("{HANDLER}\nfunction seed() queue.publish(\"app:jobs\", {{n = -1}}) end\n");
    let (dir, driver, kinds, plan) = planned(ControlledDriver::new(), &app, &handler);
    // Caught mid-write: the file is empty when the workers start.
    std::fs::write(dir.path().join("h.lua"), "").unwrap();
    let options = HostOptions {
        lua_threads: 2,
        ..HostOptions::default()
    };
    let host = Host::start(plan, &kinds, options).await.unwrap();

    let jobs = QueueId::parse("app:jobs").unwrap();
    for n in 0..200 {
        driver.inner().publish(&jobs, numbered(n)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), host.wait_idle())
        .await
        .expect("idle within 60 s")
        .unwrap();
    assert_eq!(
        host.process_failures(),
        0,
        "the process ran the planned text"
    );
    let out = host.queues().info("app:out").await.unwrap();
    assert_eq!(
        out.ready,
        Some(201),
        "every delivery, and the process's, ran the planned handler"
    );
    within("shutdown", host.shutdown()).await;
}
