//! The real binary: configuration errors, the quickstart, shutdown under load,
//! retries and dead letters, permissions, metrics.

mod support;

use std::time::Duration;

use support::*;

const HANDLER: &str = "function handle(payload) end\n";

#[test]
fn check_names_file_line_and_field() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: tasks\n    source: h.lua\n    method: handle\n    concurrency: 5000\n",
        ),
        ("h.lua", HANDLER),
    ]);
    let out = run(&["check", "app.yaml"], dir.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("app.yaml:8: field `concurrency`: 5000 is out of range 1..=1000"),
        "{err}"
    );
}

#[test]
fn check_finds_every_kind_of_mistake_before_starting() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: a\n    kind: queue.consumer\n    queue: tasks\n    source: broken.lua\n    method: handle\n  - name: b\n    kind: queue.consumer\n    queue: tasks\n    source: missing.lua\n    method: handle\n  - name: c\n    kind: queue.consumer\n    queue: tasks\n    func: nowhere\n  - name: d\n    kind: queue.consumer\n    queue: tasks\n    source: h.lua\n    method: not_there\n  - name: e\n    kind: queue.consumer\n    queue: tasks\n    source: h.lua\n    method: handle\n    security:\n      policies: [no_such_policy]\n  - name: q\n    kind: queue.queue\n    driver: ghost\n  - name: f\n    kind: queue.consumer\n    queue: tasks\n    source: h.lua\n    method: handle\n    security:\n      policies: [deny_all]\n  - name: deny_all\n    kind: security.policy\n    actions: \"*\"\n    effect: deny\n",
        ),
        ("broken.lua", "function handle(payload)\n  if then\nend\n"),
        ("h.lua", HANDLER),
    ]);
    let out = run(&["check", "app.yaml"], dir.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    for expected in [
        "app.yaml:6: field `source`: Lua syntax error",
        "broken.lua:2",
        "app.yaml:11: field `source`: cannot read Lua source",
        "app.yaml:16: field `func`: app:nowhere is not a function.lua entry",
        "app.yaml:20: field `source`",
        "no function \"not_there\"",
        // Its own item's line, not the `security:` line (review).
        "app.yaml:28: field `security.policies[0]`: app:no_such_policy is not a security.policy entry",
        "app.yaml:31: field `driver`: app:ghost is not a declared driver",
        // Policies without an actor applied to nothing: the entry published anywhere.
        "app.yaml:38: field `security`: `policies` need an `actor` to apply to",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn run_refuses_a_bad_configuration_before_starting_anything() {
    let dir = app(&[(
        "app.yaml",
        "namespace: app\nentries:\n  - name: x\n    kind: queue.queue\n    colour: red\n",
    )]);
    let out = run(&["run", "--exit-when-idle", "app.yaml"], dir.path());
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("app.yaml:5: field `colour`"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stderr).contains("runtime started"));
}

#[test]
fn the_quickstart_retries_dead_letters_and_exits_when_idle() {
    let root = workspace_root();
    let out = run(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "examples/quickstart/app.yaml",
        ],
        &root,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = json_logs(&out.stderr);

    let sent: Vec<_> = lua_logs(&logs, "Sent")
        .into_iter()
        .map(|f| f["to"].as_str().unwrap_or("").to_string())
        .collect();
    for to in ["ada@example.com", "grace@example.com", "flaky@example.com"] {
        assert_eq!(
            sent.iter().filter(|s| *s == to).count(),
            1,
            "{to} sent once: {sent:?}"
        );
    }

    // The poison message: exactly max_attempts handler calls, spaced by the backoff.
    assert_attempts_spaced(
        "quickstart",
        &logs,
        "bounce@example.com",
        &[Duration::from_millis(200), Duration::from_millis(400)],
    );

    let dead = lua_logs(&logs, "Dead letter");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["from"], "app:emails");
    assert_eq!(dead[0]["attempts"], 3);
    assert_eq!(dead[0]["reason"], "Unavailable: mailbox unavailable");

    let summary = summary(&out.stdout);
    assert!(
        summary.contains(&("app:emails".into(), "7".into(), "0".into(), "0".into())),
        "{summary:?}"
    );
    assert!(
        summary.contains(&("app:emails.dlq".into(), "1".into(), "0".into(), "0".into())),
        "{summary:?}"
    );
}

const LOAD_APP: &str = r#"namespace: app
entries:
  - name: load
    kind: queue.queue
  - name: worker
    kind: queue.consumer
    queue: load
    source: handlers.lua
    method: handle
    concurrency: 4
    prefetch: 50
    stop_timeout: 5s
  - name: producer
    kind: process.lua
    source: handlers.lua
    method: produce
"#;

const LOAD_HANDLERS: &str = r#"
function produce()
  for i = 1, 10000 do
    local ok, err = queue.publish("app:load", { n = i })
    if err then error(err) end
  end
end

function handle(payload)
  -- some work, so SIGTERM lands while the queue is still being drained
  local x = 0
  for i = 1, 20000 do x = x + i end
end
"#;

#[test]
fn sigterm_under_load_acks_or_returns_every_message() {
    let dir = app(&[("app.yaml", LOAD_APP), ("handlers.lua", LOAD_HANDLERS)]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = spawn(&["run", "--metrics-addr", &addr, "app.yaml"], dir.path());
    wait_for_metrics(port, "all 10,000 published and some acked", |m| {
        metric(m, "queue_published_total{queue=\"app:load\"}") == Some(10000.0)
            && metric(m, "queue_acked_total{queue=\"app:load\"}").unwrap_or(0.0) >= 100.0
    });
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "exit code {:?}\n{}",
        out.status,
        text(&out.stderr)
    );
    let summary = summary(&out.stdout);
    assert_eq!(summary.len(), 1, "{}", text(&out.stdout));
    let (queue, acked, ready, in_flight) = &summary[0];
    assert_eq!(queue, "app:load");
    let acked: u64 = acked.parse().unwrap();
    let ready: u64 = ready.parse().unwrap();
    assert_eq!(in_flight, "0", "nothing left unsettled");
    assert_eq!(acked + ready, 10_000, "acked {acked} + ready {ready}");
    assert!(ready > 0, "SIGTERM came in the middle of the load");
}

#[test]
fn a_handler_cannot_publish_where_its_consumers_policies_deny() {
    let yaml = r#"namespace: app
entries:
  - name: allow_app
    kind: security.policy
    actions: "queue.*"
    resources: "app:*"
    effect: allow
  - name: deny_secret
    kind: security.policy
    actions: queue.publish.queue
    resources: app:secret
    effect: deny
  - name: secret
    kind: queue.queue
  - name: jobs
    kind: queue.queue
  - name: worker
    kind: queue.consumer
    queue: jobs
    source: h.lua
    method: handle
    security:
      actor: { id: worker, meta: { role: worker } }
      policies: [allow_app, deny_secret]
  - name: secret_reader
    kind: queue.consumer
    queue: secret
    source: h.lua
    method: handle
  - name: producer
    kind: process.lua
    source: h.lua
    method: produce
"#;
    let lua = r#"
function produce() assert(queue.publish("app:jobs", { go = true })) end
function handle(payload)
  if payload.go then
    local ok, err = queue.publish("app:secret", { leaked = true })
    logger:info("publish result", { kind = err and err:kind() or "none", message = err and err:message() or "" })
    local ok2, err2 = queue.publish("app:other", { fine = true })
    logger:info("other result", { kind = err2 and err2:kind() or "none" })
  end
end
"#;
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let out = run(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = json_logs(&out.stderr);
    let denied = lua_logs(&logs, "publish result");
    assert_eq!(denied[0]["kind"], "PermissionDenied", "{denied:?}");
    assert!(
        denied[0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("app:secret")
    );
    // Allowed by policy, then NOT_FOUND: the permission checks come first.
    assert_eq!(lua_logs(&logs, "other result")[0]["kind"], "NotFound");
    let summary = summary(&out.stdout);
    assert!(
        summary.contains(&("app:secret".into(), "0".into(), "0".into(), "0".into())),
        "nothing reached app:secret: {summary:?}"
    );
}

/// A handler's failure reason went into the text log as it was: a newline in it began
/// a line of the handler's making that read as the runtime's own (review). Every
/// field of a text log line has its control characters escaped, as the Lua logger's
/// messages have, and the fields of a line are cut at 160 KiB.
#[test]
fn a_failure_reason_cannot_forge_a_log_line() {
    let yaml = "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n    retry:\n      max_attempts: 1\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n";
    let lua = "function produce() assert(queue.publish('app:jobs', { n = 1 })) end\nfunction handle(p) return nil, 'no\\n2026-12-06T10:00:00Z ERROR queue_runtime: FORGED ' .. string.rep('x', 200000) end\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let out = run(&["run", "--exit-when-idle", "app.yaml"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = text(&out.stderr);
    assert!(log.contains("FORGED"), "the reason was logged: {log}");
    assert!(
        log.lines()
            .all(|line| !line.starts_with("2026-12-06T10:00:00Z")),
        "{log}"
    );
    assert!(
        log.lines().all(|line| line.len() < 200 * 1024),
        "a line of {} bytes",
        log.lines().map(str::len).max().unwrap_or(0)
    );
}

#[test]
fn strict_mode_denies_a_handler_without_policies() {
    let yaml = "namespace: app\nsecurity:\n  strict_mode: true\nentries:\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n  - name: q\n    kind: queue.queue\n";
    let lua = "function produce()\n  local ok, err = queue.publish('app:q', { a = 1 })\n  logger:info('result', { kind = err and err:kind() or 'none' })\nend\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let out = run(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        lua_logs(&json_logs(&out.stderr), "result")[0]["kind"],
        "PermissionDenied"
    );
}

#[test]
fn metrics_and_health_report_known_traffic() {
    let yaml = "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n    concurrency: 1000\n    prefetch: 1000\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n";
    let lua = "function produce() for i = 1, 5 do assert(queue.publish('app:jobs', { n = i })) end end\nfunction handle(p) if p.n == 5 then return false end end\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = spawn(
        &[
            "run",
            "--lua-threads",
            "2",
            "--metrics-addr",
            &addr,
            "app.yaml",
        ],
        dir.path(),
    );
    let m = wait_for_metrics(port, "5 handled", |m| {
        metric(m, "queue_acked_total{queue=\"app:jobs\"}") == Some(4.0)
            && metric(m, "queue_retried_total{queue=\"app:jobs\"}") == Some(1.0)
    });
    assert_eq!(
        metric(&m, "queue_published_total{queue=\"app:jobs\"}"),
        Some(6.0),
        "5 + 1 retry copy\n{m}"
    );
    // Registered when the queue was declared: shown before any publish failed.
    assert_eq!(
        metric(&m, "queue_publish_failed_total{queue=\"app:jobs\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "queue_delivered_total{queue=\"app:jobs\"}"),
        Some(5.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "queue_nacked_total{queue=\"app:jobs\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "queue_lua_states"),
        Some(2.0),
        "concurrency 1000 on 2 Lua states\n{m}"
    );
    assert_eq!(
        metric(
            &m,
            "queue_handler_duration_seconds_count{queue=\"app:jobs\"}"
        ),
        Some(5.0),
        "{m}"
    );
    assert_eq!(
        http_get(port, "/health").as_deref(),
        Some("{\"status\":\"ok\"}\n")
    );
    signal(&child, "INT");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn publish_and_info_explain_the_memory_driver() {
    let dir = app(&[(
        "app.yaml",
        "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n",
    )]);
    for args in [
        vec!["publish", "app:q", "{\"a\":1}", "--config", "app.yaml"],
        vec!["info", "app:q", "--config", "app.yaml"],
    ] {
        let out = run(&args, dir.path());
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("embedded memory driver") && err.contains("queue-runtime run"),
            "{err}"
        );
    }
    // A body that is no JSON is told as such, wherever it was to go: the memory
    // driver's explanation hid it (review).
    let out = run(
        &["publish", "app:q", "{\"a\": 1", "--config", "app.yaml"],
        dir.path(),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("the body"), "{err}");
}

/// `publish` took an integer past `i64::MAX` for the nearest float
/// (18446744073709551615 became 1.8446744073709552e19), a body the runtime's own
/// decoder refuses: a handler saw another id (review). It is refused, saying why,
/// before anything connects.
#[test]
fn publish_refuses_an_integer_past_what_a_body_carries() {
    let dir = app(&[(
        "app.yaml",
        "namespace: app\nentries:\n  - name: mq\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1:1\n  - name: q\n    kind: queue.queue\n",
    )]);
    let out = run(
        &[
            "publish",
            "app:q",
            "{\"id\":18446744073709551615}",
            "--config",
            "app.yaml",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("body") && err.contains("does not fit"),
        "{err}"
    );
    assert!(!err.contains("127.0.0.1:1"), "it connected first: {err}");
}

#[test]
fn a_failing_process_is_logged_with_its_traceback_and_fails_an_idle_run() {
    let yaml = "namespace: app\nentries:\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: main\n";
    let lua =
        "local function inner()\n  error('the producer broke')\nend\nfunction main() inner() end\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let out = run(&["run", "--exit-when-idle", "app.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("the producer broke") && err.contains("h.lua:2") && err.contains("traceback"),
        "{err}"
    );
}

/// On the memory driver, what waits in a queue nobody consumes (a dead-letter queue,
/// an outbox another program would read) is lost as the process exits: that went
/// without a word, where the summary names only the consumed queues (review). Each
/// such queue is named, with what it held.
#[test]
fn memory_queues_nobody_consumes_are_named_with_what_they_lose_at_exit() {
    let yaml = "namespace: app\nentries:\n  - name: work\n    kind: queue.queue\n    retry:\n      max_attempts: 1\n  - name: outbox\n    kind: queue.queue\n  - name: quiet\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: app:work\n    source: h.lua\n    method: handle\n  - name: producer\n    kind: process.lua\n    source: h.lua\n    method: main\n";
    let lua = "function handle(p)\n  if p.n % 2 == 0 then return nil, errors.new({ message = 'bad', kind = errors.INVALID }) end\nend\nfunction main()\n  for i = 1, 6 do assert(queue.publish('app:work', { n = i })) end\n  for i = 1, 5 do assert(queue.publish('app:outbox', { n = i })) end\nend\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let out = run(&["run", "--exit-when-idle", "app.yaml"], dir.path());
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lost: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("lost as the process exits"))
        .collect();
    assert_eq!(lost.len(), 2, "{err}");
    assert!(
        lost.iter()
            .any(|l| l.contains("queue=app:outbox") && l.contains("ready=5")),
        "{err}"
    );
    assert!(
        lost.iter()
            .any(|l| l.contains("queue=app:work.dlq") && l.contains("ready=3")),
        "{err}"
    );
}

/// A process that returned a failure as a handler does (`nil, err`, `false`, an error
/// value alone) ended as a success: nothing logged, `--exit-when-idle` exited 0, its
/// publish's refusal dropped (review). It fails as a raise does, and a raised error
/// of 5 MB is logged cut to the 4 KiB a handler's reason gets (it was 160 KB).
#[test]
fn a_process_that_returns_a_failure_fails() {
    for (body, said) in [
        (
            "return queue.publish('app:nowhere', { a = 1 })",
            "not declared",
        ),
        (
            "return nil, errors.new({ message = 'upstream down', kind = errors.UNAVAILABLE })",
            "upstream down",
        ),
        (
            "return errors.new({ message = 'alone', kind = errors.INTERNAL })",
            "alone",
        ),
        ("return false", "returned false"),
        ("error(string.rep('x', 5 * 1024 * 1024))", "truncated from"),
    ] {
        let yaml = "namespace: app\nentries:\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: main\n";
        let lua = format!("function main()\n  {body}\nend\n");
        let dir = app(&[("app.yaml", yaml), ("h.lua", &lua)]);
        let out = run(&["run", "--exit-when-idle", "app.yaml"], dir.path());
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{body}: {err}");
        assert!(
            err.contains("process failed") && err.contains(said),
            "{body}: {err}"
        );
        assert!(
            err.lines().all(|l| l.len() <= 8192),
            "{body}: a line of {} bytes",
            err.lines().map(str::len).max().unwrap_or(0)
        );
    }
    // What a handler returns for success is a process's success too.
    let yaml = "namespace: app\nentries:\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: main\n";
    let dir = app(&[
        ("app.yaml", yaml),
        ("h.lua", "function main() return true, nil end\n"),
    ]);
    let out = run(&["run", "--exit-when-idle", "app.yaml"], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// A process that fails while the runtime runs on (its consumers serving) shows on
/// `/ready` and `/metrics`: only its ERROR line said so before, and a producer that
/// died left a runtime that read ready for good (review).
#[test]
fn a_failed_process_shows_on_ready_and_metrics() {
    let yaml = "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: main\n    instances: 2\n";
    let lua = "function handle(p) end\nfunction main(instance)\n  if instance == 2 then error('the export failed') end\nend\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = spawn(&["run", "--metrics-addr", &addr, "app.yaml"], dir.path());
    wait_for_metrics(port, "the process's failure counted", |m| {
        metric(m, "queue_process_failures_total{process=\"app:p\"}") == Some(1.0)
            && metric(m, "queue_processes_running{process=\"app:p\"}") == Some(0.0)
    });
    let (status, body) = http_get_with_status(port, "/ready").expect("/ready answers");
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["status"], "process_failed", "{body}");
    assert_eq!(
        body["processes"]["app:p"],
        serde_json::json!({"running": 0, "failed": 1, "of": 2})
    );
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Started with SIGHUP and SIGINT ignored (`nohup` ignores the first, a shell starts
/// a background job with the second ignored), the runtime leaves them ignored: it
/// listened to them anyway, so a hang-up, or a Ctrl-C meant for the foreground,
/// stopped it (review). The kernel's record of the process's signals says it.
#[test]
fn signals_ignored_by_whoever_started_the_runtime_stay_ignored() {
    let yaml = "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", "function handle(p) end\n")]);
    let port = free_port();
    let script =
        format!("trap '' HUP INT; exec \"$0\" run --metrics-addr 127.0.0.1:{port} app.yaml");
    let runtime = assert_cmd::cargo::cargo_bin!("queue-runtime");
    let child = std::process::Command::new("bash")
        .args(["-c", &script])
        .arg(runtime)
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    // Ready once started, and it listens for signals before it starts.
    wait_ready_status(port, 200, String::new);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("status");
    let mask = |field: &str| {
        let line = status.lines().find(|l| l.starts_with(field)).expect(field);
        u64::from_str_radix(line[field.len()..].trim(), 16).expect("a hex mask")
    };
    let bit = |signal: u32| 1u64 << (signal - 1);
    let (hup, int, term) = (bit(1), bit(2), bit(15));
    assert_eq!(mask("SigIgn:") & (hup | int), hup | int, "{status}");
    assert_eq!(mask("SigCgt:") & (hup | int | term), term, "{status}");
    signal(&child, "HUP");
    signal(&child, "INT");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let said = text(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("SIGTERM"), "{said}");
    assert!(
        !said.contains("SIGHUP") && !said.contains("SIGINT"),
        "{said}"
    );
}

/// A handler that never returns from a function Lua called from C (a `table.sort`
/// comparator that loops: no time slice can yield it, and it has no `timeout`) holds
/// its worker's thread, and every consumer on that worker stops: `/ready` said
/// `ready` (review). Its worker no longer ticks, so `/ready` says `stalled`.
#[test]
fn a_worker_held_by_a_handler_makes_the_runtime_not_ready() {
    let yaml = "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: main\n";
    let lua = "function handle(p)\n  logger:info('sorting')\n  table.sort({3, 2, 1}, function(a, b) while true do end end)\nend\nfunction main()\n  assert(queue.publish('app:jobs', { n = 1 }))\nend\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (child, lines) =
        spawn_with_lines(&["run", "--metrics-addr", &addr, "app.yaml"], dir.path());
    wait_for_line(&lines, "sorting");
    // Stalled once its worker has missed its ticks for a while (5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = wait_ready_status(port, 503, String::new);
        if body["status"] == "stalled" {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        body["stalled_workers"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
    // Nothing ends the loop: the process is killed.
    signal(&child, "KILL");
    let _ = wait_with_timeout(child, Duration::from_secs(30));
}

/// Processes run on while a stop lets the handlers finish, and may fail then: the
/// exit code of `--exit-when-idle` read the count of failed processes before the
/// stop, and said 0 (review).
#[test]
fn a_process_that_fails_during_the_stop_fails_an_idle_run() {
    let yaml = "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n    stop_timeout: 10s\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: main\n";
    let lua = "function handle(p)\n  logger:info('handling')\n  local t = os.clock()\n  while os.clock() < t + 4 do end\nend\nfunction main()\n  assert(queue.publish('app:jobs', { n = 1 }))\n  local t = os.clock()\n  while os.clock() < t + 1 do coroutine.yield() end\n  error('the upstream export failed')\nend\n";
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let (child, lines) = spawn_with_lines(&["run", "--exit-when-idle", "app.yaml"], dir.path());
    wait_for_line(&lines, "handling");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let log = rest_of_lines(&lines).join("\n");
    assert!(log.contains("the upstream export failed"), "{log}");
    assert_eq!(out.status.code(), Some(1), "{log}");
}

/// A process's `__close` may publish when a shutdown stops it (docs/consumers.md),
/// but a publish that had to wait (its queue full) panicked the Lua thread: the
/// process was dropped outside its thread's runtime, whose timers the publish needs
/// (review). The publish raises (nothing can wait where a dropped process is
/// closed), and the `__close` goes on.
#[test]
fn a_process_close_handler_may_publish_when_a_shutdown_stops_it() {
    let yaml = "namespace: app\nentries:\n  - name: mem\n    kind: queue.driver.memory\n    publish_timeout: 1s\n  - name: jobs\n    kind: queue.queue\n    driver: app:mem\n    max_length: 1\n  - name: p\n    kind: process.lua\n    source: p.lua\n    method: main\n";
    let lua = "function main()\n  local t <close> = setmetatable({}, {__close = function()\n    local ok, err = pcall(queue.publish, 'app:jobs', {bye = true})\n    logger:info('close publish', {ok = tostring(ok), err = tostring(err)})\n  end})\n  assert(queue.publish('app:jobs', {n = 0}))\n  logger:info('full')\n  while true do coroutine.yield() end\nend\n";
    let dir = app(&[("app.yaml", yaml), ("p.lua", lua)]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
    wait_for_line(&lines, "full");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let log = format!(
        "{}\n{}",
        rest_of_lines(&lines).join("\n"),
        text(&out.stderr)
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("close publish"), "{log}");
    assert!(out.status.success(), "{log}");
}

const STUCK_APP: &str = "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n    stop_timeout: STOP\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n";
/// Loops where Lua cannot yield (in a comparator `table.sort` calls from C), so time
/// slices cannot take it off its thread.
const STUCK_LUA: &str = "function produce() assert(queue.publish('app:jobs', { n = 1 })) end\nfunction handle(p)\n  logger:info('looping forever')\n  table.sort({ 3, 2, 1 }, function(a, b) while true do end end)\nend\n";

#[test]
fn a_handler_that_never_yields_does_not_hang_shutdown() {
    let dir = app(&[
        ("app.yaml", &STUCK_APP.replace("STOP", "1s")),
        ("h.lua", STUCK_LUA),
    ]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
    wait_for_line(&lines, "looping forever");
    signal(&child, "TERM");
    let seen = wait_for_line(&lines, "a handler is stuck and does not yield");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success(), "{}", seen.join("\n"));
}

/// A SIGTERM while stopping is one stop request sent twice (GNU `timeout` signals the
/// process, then its group): it exited at once with 130, cutting settlements short
/// (review). It is logged and the stop goes on; a SIGINT (Ctrl-C again) exits at once.
#[test]
fn a_sigint_while_stopping_exits_at_once_and_a_sigterm_does_not() {
    let dir = app(&[
        ("app.yaml", &STUCK_APP.replace("STOP", "60s")),
        ("h.lua", STUCK_LUA),
    ]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
    wait_for_line(&lines, "looping forever");
    signal(&child, "TERM");
    wait_for_line(&lines, "stopping");
    signal(&child, "TERM");
    wait_for_line(&lines, "SIGINT (Ctrl-C) now exits at once");
    // Had the SIGTERM ended the run, nothing would say so below.
    signal(&child, "INT");
    let seen = wait_for_line(&lines, "SIGINT while stopping: exiting now");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(130), "{}", seen.join("\n"));
}

/// A reader that went away (`| head`, a `tee` killed by the same Ctrl-C) is no
/// failure of the command: its work is done, and the exit code must say so, or a
/// script that retries on failure publishes twice. Rust ignores SIGPIPE, so a
/// `println!` to a closed pipe panicked and exited 101.
#[test]
fn a_closed_stdout_does_not_change_the_exit_code() {
    let root = workspace_root();
    for args in [
        &["check", "examples/quickstart/app.yaml"][..],
        &["run", "--exit-when-idle", "examples/quickstart/app.yaml"][..],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader); // closed before the command starts: its first write fails
        let child = binary()
            .args(args)
            .current_dir(&root)
            .stdin(std::process::Stdio::null())
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawns");
        let out = wait_with_timeout(child, Duration::from_secs(120));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    // Nor a closed stderr: a refused configuration still exits 1.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let child = binary()
        .args(["check", "no-such-file.yaml"])
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .stderr(writer)
        .spawn()
        .expect("spawns");
    let out = wait_with_timeout(child, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1));
}

/// `--lua-threads 0` ran one thread without a word; a count in the thousands would
/// start as many Lua states. Both are usage errors, before anything starts.
#[test]
fn lua_threads_outside_one_to_256_are_refused() {
    let root = workspace_root();
    for count in ["0", "257"] {
        let out = run(
            &[
                "run",
                "--lua-threads",
                count,
                "examples/quickstart/app.yaml",
            ],
            &root,
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("1..=256"),
            "{}",
            text(&out.stderr)
        );
    }
}

/// The command-line reference in docs/operations.md names every flag of every command,
/// and nothing clap does not know: checked against clap's own `--help`.
#[test]
fn the_cli_reference_matches_clap() {
    let page = "docs/operations.md";
    let doc = std::fs::read_to_string(workspace_root().join(page)).unwrap();
    let heading = doc
        .lines()
        .position(|l| l == "## Command-line reference")
        .unwrap_or_else(|| panic!("{page} has no `## Command-line reference`"))
        + 1;
    let blocks = queue_lua::examples::blocks(&doc).unwrap_or_else(|e| panic!("{page}: {e}"));
    let reference = blocks
        .iter()
        .find(|b| b.line > heading && b.lang == "text")
        .map(|b| b.code.as_str())
        .unwrap_or_else(|| panic!("{page}: no text block under the reference heading"));
    let flags = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| {
            c.is_whitespace() || c == '[' || c == ']' || c == ',' || c == '|' || c == '`'
        })
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_alphanumeric())
                .to_string()
        })
        .filter(|w| w != "--help" && w != "--version")
        .collect()
    };
    // Every command clap knows, nested ones (`queue peek`) included, read off the
    // `Commands:` section of each help: a command added later cannot go unlisted.
    let subcommands = |path: &[String]| -> Vec<String> {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = text(&run(&args, &workspace_root()).stdout);
        help.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| *c != "help")
            .map(str::to_string)
            .collect()
    };
    let mut from_clap = std::collections::BTreeSet::new();
    let mut pending: Vec<Vec<String>> = vec![vec![]];
    let mut leaves = 0;
    while let Some(path) = pending.pop() {
        let children = subcommands(&path);
        if !path.is_empty() && children.is_empty() {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            let out = run(&args, &workspace_root());
            assert!(out.status.success(), "{args:?}");
            let command = path.join(" ");
            assert!(
                reference.contains(&format!("queue-runtime {command} ")),
                "`{command}` is missing from {page}"
            );
            from_clap.extend(flags(&text(&out.stdout)));
            leaves += 1;
        }
        for child in children {
            let mut deeper = path.clone();
            deeper.push(child);
            pending.push(deeper);
        }
    }
    assert!(leaves >= 7, "only {leaves} commands found in clap's help");
    let documented = flags(reference);
    assert_eq!(
        documented, from_clap,
        "{page}'s reference and clap disagree"
    );
}
