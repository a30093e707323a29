//! The runtime on RabbitMQ, through both broker drivers: retries and dead letters,
//! `publish` / `info`, and SIGTERM under load followed by a restart that loses nothing.
//! Skipped with a printed reason when RabbitMQ is not on 127.0.0.1:5672, unless CI=true.

mod support;

use std::time::Duration;

use support::*;

fn rabbitmq_or_skip(test: &str) -> bool {
    if std::net::TcpStream::connect("127.0.0.1:5672").is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: RabbitMQ is not reachable on 127.0.0.1:5672 in CI"
    );
    println!("skipped: {test}: RabbitMQ is not reachable on 127.0.0.1:5672");
    false
}

fn unique() -> String {
    queue_core::new_message_id().replace('-', "")[20..].to_string()
}

const DRIVERS: [(&str, &str); 2] = [
    (
        "amqp091",
        "  - name: rabbit\n    kind: queue.driver.amqp\n    url: amqp://guest:guest@127.0.0.1:5672/%2f\n",
    ),
    (
        "amqp10",
        "  - name: rabbit\n    kind: queue.driver.amqp10\n    url: amqp://guest:guest@127.0.0.1:5672\n    profile: rabbitmq-v1\n",
    ),
];

const HANDLERS: &str = r#"
function produce()
  for _, to in ipairs({ "ok@example.com", "flaky@example.com", "bounce@example.com" }) do
    assert(queue.publish("app:emails", { to = to }, { correlation_id = "c-" .. to }))
  end
end

function handle(payload)
  local msg = queue.message()
  logger:info("Processing", { to = payload.to, attempt = msg:header("attempts") })
  if payload.to == "bounce@example.com" then return nil, "mailbox unavailable" end
  if payload.to == "flaky@example.com" and msg:header("attempts") == 1 then return false end
end

function dead(payload)
  local msg = queue.message()
  logger:warn("Dead letter", { to = payload.to, from = msg:header("x_original_queue"),
    reason = msg:header("x_dead_letter_reason"), attempts = msg:header("attempts"),
    correlation_id = msg:header("correlation_id"), time = msg:header("x_dead_letter_time") })
end
"#;

#[test]
fn retries_and_dead_letters_on_rabbitmq_through_both_drivers() {
    if !rabbitmq_or_skip("retries_and_dead_letters_on_rabbitmq") {
        return;
    }
    for (name, driver) in DRIVERS {
        let id = unique();
        let yaml = format!(
            "namespace: app\nentries:\n{driver}  - name: emails\n    kind: queue.queue\n    queue_name: it-{name}-{id}\n    durable: false\n    retry:\n      max_attempts: 3\n      backoff: {{ initial: 100ms, multiplier: 2, max: 1s, jitter: false }}\n  - name: w\n    kind: queue.consumer\n    queue: emails\n    source: h.lua\n    method: handle\n    concurrency: 4\n  - name: d\n    kind: queue.consumer\n    queue: emails.dlq\n    source: h.lua\n    method: dead\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n"
        );
        let dir = app(&[("app.yaml", &yaml), ("h.lua", HANDLERS)]);
        let child = spawn(
            &[
                "run",
                "--exit-when-idle",
                "--log-format",
                "json",
                "app.yaml",
            ],
            dir.path(),
        );
        let out = wait_with_timeout(child, Duration::from_secs(90));
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let logs = json_logs(&out.stderr);
        let bounce: Vec<i64> = lua_logs(&logs, "Processing")
            .iter()
            .filter(|f| f["to"] == "bounce@example.com")
            .map(|f| f["attempt"].as_i64().unwrap_or(0))
            .collect();
        assert_eq!(bounce, vec![1, 2, 3], "{name}: one call per attempt");
        let flaky = lua_logs(&logs, "Processing")
            .iter()
            .filter(|f| f["to"] == "flaky@example.com")
            .count();
        assert_eq!(flaky, 2, "{name}: flaky is retried once");
        let dead = lua_logs(&logs, "Dead letter");
        assert_eq!(dead.len(), 1, "{name}: {dead:?}");
        assert_eq!(dead[0]["from"], "app:emails", "{name}");
        assert_eq!(dead[0]["reason"], "mailbox unavailable", "{name}");
        assert_eq!(dead[0]["attempts"], 3, "{name}");
        assert_eq!(dead[0]["correlation_id"], "c-bounce@example.com", "{name}");
        assert!(
            dead[0]["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{name}: {dead:?}"
        );
    }
}

#[test]
fn publish_and_info_work_on_a_broker_queue() {
    if !rabbitmq_or_skip("publish_and_info_work_on_a_broker_queue") {
        return;
    }
    let id = unique();
    let yaml = format!(
        "namespace: app\nentries:\n{}  - name: jobs\n    kind: queue.queue\n    queue_name: it-cli-{id}\n    durable: false\n  - name: locked\n    kind: queue.queue\n    queue_name: it-cli-locked-{id}\n    durable: false\n    max_message_bytes: 100\n",
        DRIVERS[0].1
    );
    let dir = app(&[("app.yaml", &yaml)]);
    let out = run(
        &[
            "publish",
            "app:jobs",
            "{\"action\":\"send\"}",
            "-H",
            "priority=high",
            "--config",
            "app.yaml",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("published "),
        "{}",
        text(&out.stdout)
    );
    let out = run(&["info", "app:jobs", "--config", "app.yaml"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("ready=1"),
        "{}",
        text(&out.stdout)
    );
    // Strict mode with no policy: denied, and nothing reaches the broker.
    let out = run(
        &[
            "publish",
            "app:locked",
            "{\"a\":1}",
            "--strict",
            "--actor",
            "cli",
            "--config",
            "app.yaml",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PermissionDenied"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["info", "app:locked", "--config", "app.yaml"], dir.path());
    assert!(
        text(&out.stdout).contains("ready=0"),
        "{}",
        text(&out.stdout)
    );
    // Oversized messages are refused before the broker.
    let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(200));
    let out = run(
        &["publish", "app:locked", &big, "--config", "app.yaml"],
        dir.path(),
    );
    assert!(
        text(&out.stderr).contains("max_message_bytes"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["info", "app:locked", "--config", "app.yaml"], dir.path());
    assert!(
        text(&out.stdout).contains("ready=0"),
        "{}",
        text(&out.stdout)
    );
}

const LOAD_LUA: &str = r#"
function produce()
  for i = 1, 3000 do
    local ok, err = queue.publish("app:load", { n = i })
    if err then error(err) end
  end
end

function handle(payload)
  local x = 0
  for i = 1, 20000 do x = x + i end
  assert(queue.publish("app:done", { n = payload.n }))
end
"#;

/// Publishes 3000 messages, interrupts the runtime with `signal` while it works
/// through them, restarts it and drains; counts what the handlers passed on.
fn interrupt_under_load_then_restart(signal_name: &str) {
    let id = unique();
    let base = format!(
        "namespace: app\nentries:\n{}  - name: load\n    kind: queue.queue\n    queue_name: it-load-{id}\n  - name: done\n    kind: queue.queue\n    queue_name: it-done-{id}\n  - name: w\n    kind: queue.consumer\n    queue: load\n    source: h.lua\n    method: handle\n    concurrency: 8\n    prefetch: 50\n",
        DRIVERS[0].1
    );
    let first = format!(
        "{base}  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n"
    );
    let dir = app(&[
        ("first.yaml", &first),
        ("second.yaml", &base),
        ("h.lua", LOAD_LUA),
    ]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = spawn(&["run", "--metrics-addr", &addr, "first.yaml"], dir.path());
    wait_for_metrics(port, "all published and some handled", |m| {
        metric(m, "queue_published_total{queue=\"app:load\"}") == Some(3000.0)
            && metric(m, "queue_acked_total{queue=\"app:load\"}").unwrap_or(0.0) >= 100.0
    });
    signal(&child, signal_name);
    let out = wait_with_timeout(child, Duration::from_secs(60));
    if signal_name == "TERM" {
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    // Restart without the producer and drain.
    let child = spawn(&["run", "--exit-when-idle", "second.yaml"], dir.path());
    let out = wait_with_timeout(child, Duration::from_secs(120));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ready = |queue: &str| -> u64 {
        let info = run(&["info", queue, "--config", "second.yaml"], dir.path());
        let line = text(&info.stdout);
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix("ready="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"))
    };
    let done = ready("app:done");
    let duplicates = done.saturating_sub(3000);
    println!(
        "SIG{signal_name} under load, then restart: published 3000, confirmed 3000, consumed {done}, duplicates {duplicates}, lost {}",
        3000u64.saturating_sub(done)
    );
    assert!(done >= 3000, "lost {} messages", 3000 - done);
    assert_eq!(ready("app:load"), 0);
}

#[test]
fn sigterm_under_load_then_restart_loses_nothing_on_rabbitmq() {
    if rabbitmq_or_skip("sigterm_under_load_then_restart_loses_nothing_on_rabbitmq") {
        interrupt_under_load_then_restart("TERM");
    }
}

#[test]
fn sigkill_under_load_then_restart_loses_nothing_on_rabbitmq() {
    if rabbitmq_or_skip("sigkill_under_load_then_restart_loses_nothing_on_rabbitmq") {
        interrupt_under_load_then_restart("KILL");
    }
}

/// Forwards every connection on `listener` to RabbitMQ, both ways, until the test ends.
fn forward_to_rabbitmq(listener: std::net::TcpListener) {
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect("127.0.0.1:5672") else {
                continue;
            };
            let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            let pipe = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            pipe(client, server2);
            pipe(server, client2);
        }
    });
}

#[test]
fn a_runtime_started_before_its_broker_waits_for_it() {
    if !rabbitmq_or_skip("a_runtime_started_before_its_broker_waits_for_it") {
        return;
    }
    let port = free_port();
    let id = unique();
    let yaml = format!(
        "namespace: app\nentries:\n  - name: rabbit\n    kind: queue.driver.amqp\n    url: amqp://guest:guest@127.0.0.1:{port}/%2f\n    connection_timeout: 2s\n  - name: jobs\n    kind: queue.queue\n    queue_name: it-late-{id}\n    durable: false\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: produce\n"
    );
    let lua = "function produce() for i = 1, 5 do assert(queue.publish('app:jobs', { n = i })) end end\nfunction handle(p) logger:info('handled', { n = p.n }) end\n";
    let dir = app(&[("app.yaml", &yaml), ("h.lua", lua)]);
    let (child, lines_rx) = spawn_with_lines(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir.path(),
    );
    let mut logs = wait_for_line(&lines_rx, "broker unreachable; waiting for it");
    // The broker "comes up": its port starts answering.
    forward_to_rabbitmq(
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the broker port"),
    );
    let out = wait_with_timeout(child, Duration::from_secs(90));
    assert!(out.status.success(), "{}", logs.join("\n"));
    // The reader ends when the runtime closes stderr, so this collects every line.
    logs.extend(lines_rx.iter());
    let parsed: Vec<serde_json::Value> = logs
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(lua_logs(&parsed, "handled").len(), 5, "{}", logs.join("\n"));
    assert!(
        !logs.iter().any(|l| l.contains("guest:guest@")),
        "the password never shows"
    );
}
