//! The real binary against hostile or careless applications on the memory driver
//! (docs/reliability.md, "Hardening"): a handler cannot step around its policies or
//! out of the sandbox, cannot take the process down with memory, a stuck handler or a
//! spinning process stalls only itself, dead letters are never dropped or cycled,
//! and `check` runs nothing with side effects.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// One queue `app:jobs` whose consumer runs `method` of h.lua, a process `start`
/// publishing one job, and whatever `extra` YAML adds.
fn one_job_app(method: &str, lua: &str, extra: &str) -> tempfile::TempDir {
    let yaml = format!(
        "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n    retry:\n      max_attempts: 2\n      backoff: {{ initial: 50ms, multiplier: 1, max: 50ms, jitter: false }}\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: {method}\n  - name: d\n    kind: queue.consumer\n    queue: jobs.dlq\n    source: h.lua\n    method: dead\n  - name: start\n    kind: process.lua\n    source: h.lua\n    method: start\n{extra}"
    );
    let lua = format!(
        "function start() assert(queue.publish(\"app:jobs\", {{ n = 1 }})) end\nfunction dead(p) logger:warn(\"Dead letter\", {{ reason = queue.message():header(\"x_dead_letter_reason\") }}) end\n{lua}"
    );
    app(&[("app.yaml", &yaml), ("h.lua", &lua)])
}

fn run_json(dir: &std::path::Path) -> (std::process::Output, Vec<serde_json::Value>) {
    let child = spawn(
        &[
            "run",
            "--exit-when-idle",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir,
    );
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let logs = json_logs(&out.stderr);
    (out, logs)
}

#[test]
fn a_coroutine_in_a_handler_publishes_under_the_handlers_policies() {
    let extra = "  - name: app_only\n    kind: security.policy\n    actions: \"queue.*\"\n    resources: \"app:*\"\n    effect: allow\n  - name: billing:invoices\n    kind: queue.queue\n  - name: biller\n    kind: queue.consumer\n    queue: billing:invoices\n    source: h.lua\n    method: billed\n";
    let lua = r#"
function sneak(p)
  local ok, err = coroutine.wrap(function()
    return queue.publish("billing:invoices", { amount = 100 })
  end)()
  logger:info("Sneaked", { ok = ok == true, kind = err and err:kind() })
end
function billed(p) logger:error("Billed", {}) end
"#;
    let dir = one_job_app("sneak", lua, extra);
    let yaml = std::fs::read_to_string(dir.path().join("app.yaml")).unwrap();
    let yaml = yaml.replace(
        "    method: sneak\n",
        "    method: sneak\n    security:\n      actor: { id: worker }\n      policies: [app_only]\n",
    );
    std::fs::write(dir.path().join("app.yaml"), yaml).unwrap();
    let (out, logs) = run_json(dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sneaked = lua_logs(&logs, "Sneaked");
    assert_eq!(sneaked.len(), 1, "{}", text(&out.stderr));
    assert_eq!(sneaked[0]["ok"], false);
    assert_eq!(sneaked[0]["kind"], "PermissionDenied");
    assert!(
        lua_logs(&logs, "Billed").is_empty(),
        "the coroutine published"
    );
    assert!(
        summary(&out.stdout).contains(&(
            "billing:invoices".into(),
            "0".into(),
            "0".into(),
            "0".into()
        )),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn os_exit_in_a_handler_fails_the_handler_not_the_runtime() {
    let lua = "function leave(p) os.exit(0) end\n";
    let dir = one_job_app("leave", lua, "");
    let (out, logs) = run_json(dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Both attempts failed (os is not there), then the dead letter ran.
    let dead = lua_logs(&logs, "Dead letter");
    assert_eq!(dead.len(), 1, "{}", text(&out.stderr));
    assert!(
        dead[0]["reason"].as_str().unwrap_or("").contains("exit"),
        "{dead:?}"
    );
    assert!(text(&out.stdout).contains("summary: queue=app:jobs"));
}

#[test]
fn a_handler_past_the_memory_limit_is_retried_and_dead_lettered_while_others_run() {
    let lua = r#"
function hog(p)
  local s = "x"
  while true do s = s .. s end
end
function fine(p) logger:info("Fine", {}) end
function more() for i = 1, 3 do assert(queue.publish("app:others", { i = i })) end end
"#;
    let extra = "  - name: o\n    kind: queue.consumer\n    queue: others\n    source: h.lua\n    method: fine\n  - name: more\n    kind: process.lua\n    source: h.lua\n    method: more\n";
    let dir = one_job_app("hog", lua, extra);
    let yaml = std::fs::read_to_string(dir.path().join("app.yaml")).unwrap();
    let yaml = yaml.replace(
        "namespace: app\n",
        "namespace: app\nlua:\n  memory_limit: 32MiB\n",
    );
    std::fs::write(dir.path().join("app.yaml"), yaml).unwrap();
    let (out, logs) = run_json(dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dead = lua_logs(&logs, "Dead letter");
    assert_eq!(dead.len(), 1, "{}", text(&out.stderr));
    assert!(
        dead[0]["reason"].as_str().unwrap_or("").contains("memory"),
        "{dead:?}"
    );
    assert_eq!(lua_logs(&logs, "Fine").len(), 3);
}

/// One Lua state: while a handler spins past its `timeout`, the others on the state
/// keep running; the spinning one fails with a timeout, is retried, then
/// dead-lettered.
#[test]
fn a_handler_past_its_timeout_is_retried_and_dead_lettered_while_others_on_its_state_run() {
    let lua = r#"
function spin(p)
  while true do pcall(function() while true do end end) end
end
function fine(p) logger:info("Fine", {}) end
function more() for i = 1, 3 do assert(queue.publish("app:others", { i = i })) end end
"#;
    let extra = "  - name: o\n    kind: queue.consumer\n    queue: others\n    source: h.lua\n    method: fine\n  - name: more\n    kind: process.lua\n    source: h.lua\n    method: more\n";
    let dir = one_job_app("spin", lua, extra);
    let yaml = std::fs::read_to_string(dir.path().join("app.yaml")).unwrap();
    let yaml = yaml.replace(
        "    method: spin\n",
        "    method: spin\n    timeout: 300ms\n",
    );
    std::fs::write(dir.path().join("app.yaml"), yaml).unwrap();
    let child = spawn(
        &[
            "run",
            "--exit-when-idle",
            "--lua-threads",
            "1",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir.path(),
    );
    let out = wait_with_timeout(child, Duration::from_secs(60));
    let logs = json_logs(&out.stderr);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dead = lua_logs(&logs, "Dead letter");
    assert_eq!(dead.len(), 1, "{}", text(&out.stderr));
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("ran longer than its timeout of 300ms"),
        "{dead:?}"
    );
    assert_eq!(lua_logs(&logs, "Fine").len(), 3);
}

/// A handler that settled its message itself and then failed: the settlement stands
/// (no retry, no dead letter), and the failure is logged. It vanished without a trace:
/// neither the error nor its traceback showed anywhere.
#[test]
fn an_error_after_the_handler_settled_its_message_is_logged_and_the_settlement_stands() {
    let lua = r#"
function settles_then_fails(p)
  logger:info("Tried", {})
  assert(queue.message():ack())
  error("the audit write failed")
end
"#;
    let dir = one_job_app("settles_then_fails", lua, "");
    let (out, logs) = run_json(dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lua_logs(&logs, "Tried").len(), 1, "{}", text(&out.stderr));
    assert!(lua_logs(&logs, "Dead letter").is_empty());
    let told = logs.iter().any(|l| {
        l["level"] == "WARN"
            && l["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("the audit write failed"))
    });
    assert!(told, "the failure is logged: {}", text(&out.stderr));
}

/// Input that can never be valid is not retried: an `INVALID` error goes to the
/// dead-letter queue on its first failure, unless the consumer says to retry all;
/// raised, or given to `msg:nack(err)` (which retried it `max_attempts` times).
#[test]
fn a_non_retryable_error_is_dead_lettered_at_once_unless_the_consumer_retries_all() {
    let raised = r#"
function strict(p)
  logger:info("Tried", {})
  error(errors.new({ kind = errors.INVALID, message = "n must be a string" }))
end
"#;
    let nacked = r#"
function strict(p)
  logger:info("Tried", {})
  queue.message():nack(errors.new({ kind = errors.INVALID, message = "n must be a string" }))
end
"#;
    for (lua, retry_all, tries) in [
        (raised, false, 1),
        (raised, true, 2),
        (nacked, false, 1),
        (nacked, true, 2),
    ] {
        let dir = one_job_app("strict", lua, "");
        let yaml = std::fs::read_to_string(dir.path().join("app.yaml")).unwrap();
        let yaml = yaml.replace(
            "    method: strict
",
            &format!(
                "    method: strict
    retry_all_errors: {retry_all}
"
            ),
        );
        std::fs::write(dir.path().join("app.yaml"), yaml).unwrap();
        let (out, logs) = run_json(dir.path());
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(
            lua_logs(&logs, "Tried").len(),
            tries,
            "retry_all_errors: {retry_all}"
        );
        let dead = lua_logs(&logs, "Dead letter");
        assert_eq!(dead.len(), 1, "{}", text(&out.stderr));
        let reason = dead[0]["reason"].as_str().unwrap_or("");
        assert!(reason.contains("Invalid: n must be a string"), "{reason}");
        assert_eq!(reason.contains("not retryable"), !retry_all, "{reason}");
    }
}

#[test]
fn check_runs_no_top_level_side_effect_and_gives_up_on_endless_top_levels() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: touch.lua\n    method: handle\n    sandbox:\n      allow: [os]\n  - name: l\n    kind: queue.consumer\n    queue: jobs\n    source: loop.lua\n    method: handle\n",
        ),
        (
            "touch.lua",
            "os.execute('touch marker')\nfunction handle() end\n",
        ),
        ("loop.lua", "while true do end\nfunction handle() end\n"),
    ]);
    let started = Instant::now();
    let out = run(&["check", "app.yaml"], dir.path());
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("app.yaml:13: field `source`") && err.contains("longer than"),
        "{err}"
    );
    assert!(
        err.contains("WARN") && err.contains("not verified") && err.contains("touch.lua"),
        "{err}"
    );
    assert!(!dir.path().join("marker").exists(), "check ran os.execute");
}

#[test]
fn check_refuses_dead_letter_cycles_and_unknown_opt_ins() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: a\n    kind: queue.queue\n    dead_letter: b\n  - name: b\n    kind: queue.queue\n    dead_letter: a\n  - name: w\n    kind: queue.consumer\n    queue: a\n    source: h.lua\n    method: handle\n    sandbox:\n      allow: [debug]\n",
        ),
        ("h.lua", "function handle() end\n"),
    ]);
    let out = run(&["check", "app.yaml"], dir.path());
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("app.yaml:5: field `dead_letter`: dead-letter queues form a cycle: app:a -> app:b -> app:a"),
        "{err}"
    );
    assert!(
        err.contains("app.yaml:15: field `sandbox`: \"debug\" cannot be allowed"),
        "{err}"
    );
}

/// Runs the app in `dir` until its dead-letter consumer logged `Dead letter try`
/// `tries` times, failing if anything is dropped meanwhile; then stops it cleanly and
/// returns the lines it logged.
fn tries_of_a_dead_letter(dir: &std::path::Path, tries: usize) -> Vec<String> {
    let (child, lines) = spawn_with_lines(&["run", "--log-format", "json", "app.yaml"], dir);
    let mut seen: Vec<String> = Vec::new();
    while seen
        .iter()
        .filter(|l| l.contains("Dead letter try"))
        .count()
        < tries
    {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no more tries:\n{}", seen.join("\n")));
        assert!(!line.contains("dropped"), "{line}");
        seen.push(line);
    }
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success());
    seen
}

#[test]
fn a_dead_letter_whose_consumer_fails_stays_in_its_queue() {
    let extra = "  - name: jobs.dlq\n    kind: queue.queue\n    retry:\n      max_attempts: 2\n      backoff: { initial: 50ms, multiplier: 1, max: 100ms, jitter: false }\n";
    let lua = r#"
function fail(p) return nil, "broken" end
function dead(p)
  local msg = queue.message()
  logger:warn("Dead letter try", { attempts = msg:header("attempts"),
    original = msg:header("x_original_attempts") })
  return nil, "the dead-letter consumer is broken too"
end
"#;
    let dir = one_job_app("fail", lua, extra);
    // `dead` is defined twice; the later one (failing) wins.
    // Two attempts in the dead-letter queue, kept, then tried again: never dropped.
    let seen = tries_of_a_dead_letter(dir.path(), 4);
    let logs: Vec<serde_json::Value> = seen
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let tries = lua_logs(&logs, "Dead letter try");
    let attempts: Vec<i64> = tries
        .iter()
        .map(|t| t["attempts"].as_i64().unwrap_or(0))
        .collect();
    // Its own policy (2 attempts), then kept at the last attempt.
    assert_eq!(attempts, vec![1, 2, 2, 2], "{tries:?}");
    assert!(tries.iter().all(|t| t["original"] == 2), "{tries:?}");
    assert!(
        seen.iter()
            .any(|l| l.contains("stays in its dead-letter queue")),
        "{}",
        seen.join("\n")
    );
}

/// A message the application (or another client) put straight into a dead-letter
/// queue carries none of the dead-letter headers; when its consumer fails it past the
/// queue's attempts it stays there like any dead letter. It was dropped, logged as if
/// the queue had `dead_letter: false`.
#[test]
fn a_message_put_straight_into_a_dead_letter_queue_is_never_dropped() {
    let lua = r#"
function ok(p) end
function start() assert(queue.publish("app:jobs.dlq", { parked = true })) end
function dead(p)
  logger:warn("Dead letter try", { attempts = queue.message():header("attempts") })
  return nil, "the dead-letter consumer is broken"
end
"#;
    // `start` and `dead` are defined twice; the later ones win.
    let dir = one_job_app("ok", lua, "");
    let seen = tries_of_a_dead_letter(dir.path(), 3);
    assert!(
        seen.iter()
            .any(|l| l.contains("stays in its dead-letter queue")),
        "{}",
        seen.join("\n")
    );
}

#[test]
fn a_spinning_handler_stalls_only_its_own_consumer_and_shutdown_names_it() {
    // Six concurrency-1 consumers on two Lua threads; one spins forever.
    let mut yaml = String::from("namespace: app\nentries:\n");
    for i in 0..6 {
        let method = if i == 0 { "spin" } else { "work" };
        yaml.push_str(&format!(
            "  - name: c{i}\n    kind: queue.consumer\n    queue: q{i}\n    source: h.lua\n    method: {method}\n    stop_timeout: 1s\n"
        ));
    }
    yaml.push_str("  - name: start\n    kind: process.lua\n    source: h.lua\n    method: start\n");
    let lua = r#"
function start()
  assert(queue.publish("app:q0", { n = 0 }))
  for i = 1, 5 do assert(queue.publish("app:q" .. i, { n = i })) end
end
function spin(p) logger:info("Spinning", {}) while true do end end
function work(p) logger:info("Worked", { n = p.n }) end
"#;
    let dir = app(&[("app.yaml", &yaml), ("h.lua", lua)]);
    let (child, lines) = spawn_with_lines(
        &[
            "run",
            "--lua-threads",
            "2",
            "--log-format",
            "json",
            "app.yaml",
        ],
        dir.path(),
    );
    // The consumers on the other worker keep working while one spins.
    let mut seen = wait_for_line(&lines, "Spinning");
    let mut worked = seen.iter().filter(|l| l.contains("\"Worked\"")).count();
    while worked < 2 {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the others stalled:\n{}", seen.join("\n")));
        worked += usize::from(line.contains("\"Worked\""));
        seen.push(line);
    }
    let stopping = Instant::now();
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    // One deadline for all: the longest stop_timeout (1 s) plus the 2 s grace, not
    // one per consumer in turn.
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopping.elapsed()
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rest = rest_of_lines(&lines);
    // The spinning handler yields in time slices, so shutdown ends it at its
    // stop_timeout like any other and its message goes back to the queue.
    let abandoned: Vec<&String> = rest
        .iter()
        .filter(|l| l.contains("handlers still running at stop_timeout"))
        .collect();
    assert_eq!(abandoned.len(), 1, "{}", rest.join("\n"));
    assert!(abandoned[0].contains("app:q0"), "{}", abandoned[0]);
}

/// A consumer's own `stop_timeout` ends its handlers even while another consumer's
/// longer one still runs: the warning said their messages went back to the queue,
/// but the handlers ran on until the longest `stop_timeout` and acked (review). Both
/// handlers wait 3 s on a publish to a full queue; `a` stops after 1 s, `b` after 10.
#[test]
fn each_consumer_stops_its_handlers_at_its_own_stop_timeout() {
    let yaml = "namespace: app\nentries:\n  - name: local\n    kind: queue.driver.memory\n    publish_timeout: 3s\n  - name: a\n    kind: queue.queue\n    driver: app:local\n  - name: b\n    kind: queue.queue\n    driver: app:local\n  - name: full\n    kind: queue.queue\n    driver: app:local\n    max_length: 1\n  - name: ca\n    kind: queue.consumer\n    queue: app:a\n    source: h.lua\n    method: wait\n    stop_timeout: 1s\n  - name: cb\n    kind: queue.consumer\n    queue: app:b\n    source: h.lua\n    method: wait\n    stop_timeout: 10s\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: start\n";
    let lua = r#"
function start()
  assert(queue.publish("app:full", { n = 0 }))
  assert(queue.publish("app:a", { name = "a" }))
  assert(queue.publish("app:b", { name = "b" }))
end
function wait(p)
  logger:info("Waiting", { name = p.name })
  queue.publish("app:full", { n = 1 })
  logger:info("Done waiting", { name = p.name })
end
"#;
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
    let mut seen = wait_for_line(&lines, "Waiting");
    if seen.iter().filter(|l| l.contains("Waiting")).count() < 2 {
        seen.extend(wait_for_line(&lines, "Waiting"));
    }
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = format!(
        "{}\n{}",
        rest_of_lines(&lines).join("\n"),
        text(&out.stdout)
    );
    let done: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("Done waiting"))
        .collect();
    assert_eq!(done.len(), 1, "{said}");
    assert!(done[0].contains(r#"\"b\""#), "{said}");
    assert!(
        said.contains("summary: queue=app:a acked=0 ready=1"),
        "{said}"
    );
    assert!(said.contains("summary: queue=app:b acked=1"), "{said}");
}

/// Lua's pattern matcher backtracks in C, where no time limit reached it: a handler
/// searching 3,000 bytes for `a-` twelve times held its worker past its `timeout`
/// and through the shutdown, which left the worker behind (outsider attack). Its
/// `timeout` ends it now, and a process, which has no `timeout`, gets an error once
/// the search has taken its steps.
#[test]
fn a_backtracking_pattern_ends_at_the_handlers_timeout() {
    let yaml = "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    retry:\n      max_attempts: 1\n  - name: c\n    kind: queue.consumer\n    queue: q\n    source: h.lua\n    method: handle\n    timeout: 1s\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: start\n";
    let lua = r#"
local function search() return string.find(string.rep("a", 3000), string.rep("a-", 12) .. "b") end
function start()
  assert(queue.publish("app:q", { n = 1 }))
  local ok, err = pcall(search)
  logger:info("The process's search", { ok = ok, err = tostring(err) })
end
function handle(p) search() end
"#;
    let dir = app(&[("app.yaml", yaml), ("h.lua", lua)]);
    let started = Instant::now();
    let out = run(&["run", "--exit-when-idle", "app.yaml"], dir.path());
    let err = text(&out.stderr);
    assert!(started.elapsed() < Duration::from_secs(60), "{err}");
    assert!(
        err.contains("dead-lettered") && err.contains("timeout"),
        "{err}"
    );
    assert!(
        err.contains("pattern too complex for a subject of 3000 bytes"),
        "{err}"
    );
    assert!(!err.contains("stuck"), "{err}");
}

#[test]
fn sigterm_ends_a_runtime_whose_process_spins_without_yielding() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: busy\n    kind: process.lua\n    source: h.lua\n    method: spin\n",
        ),
        (
            "h.lua",
            "function spin() logger:info('Spinning', {}) while true do end end\n",
        ),
    ]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
    wait_for_line(&lines, "Spinning");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success());
}

#[test]
fn sighup_stops_gracefully() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n",
        ),
        ("h.lua", "function handle() end\n"),
    ]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
    wait_for_line(&lines, "runtime started");
    signal(&child, "HUP");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success(), "{:?}", out.status);
    assert!(
        text(&out.stdout).contains("summary: queue=app:jobs"),
        "{}",
        text(&out.stdout)
    );
    let rest = rest_of_lines(&lines);
    assert!(
        rest.iter().any(|l| l.contains("SIGHUP")),
        "{}",
        rest.join("\n")
    );
}

#[test]
fn configuration_errors_point_at_the_right_line() {
    let cases: [(&str, &[u8], &str); 9] = [
        (
            "the memory driver's priority range, at check time",
            b"namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    max_priority: 10\n",
            "app.yaml:5: field `max_priority`: queue app:q: max_priority 10 is more than",
        ),
        (
            "a file that is not UTF-8",
            b"namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    queue_name: caf\xe9\n",
            "app.yaml:5: not UTF-8 text",
        ),
        (
            "a driver option",
            b"namespace: app\nentries:\n  - name: r\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1\n    confirm_window: 0\n",
            "app.yaml:6: field `confirm_window`",
        ),
        (
            "a duplicate key, without the parser's advice to programmers",
            b"namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    name: r\n",
            "app.yaml:5: duplicate mapping key: name (column 5)",
        ),
        (
            "a lines-long environment value before the mistake",
            b"namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    queue_name: \"${MULTI}\"\n    colour: red\n",
            "app.yaml:6: field `colour`",
        ),
        (
            "a url of the wrong type",
            b"namespace: app\nentries:\n  - name: r\n    kind: queue.driver.amqp10\n    url: {host: a}\n",
            "app.yaml:5: field `url`: expected a URL or a list of URLs",
        ),
        (
            "a bad url in a list names its place",
            b"namespace: app\nentries:\n  - name: r\n    kind: queue.driver.amqp10\n    url:\n      - amqp://a\n      - http://b\n",
            "app.yaml:7: field `url[1]`",
        ),
        (
            "a duration of the wrong type",
            b"namespace: app\nentries:\n  - name: r\n    kind: queue.driver.amqp10\n    url: amqp://a\n    reconnect_delay: [1]\n",
            "app.yaml:6: field `reconnect_delay`: expected a duration",
        ),
        (
            "dead_letter of the wrong type",
            b"namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    dead_letter: [1]\n",
            "app.yaml:5: field `dead_letter`: expected true",
        ),
    ];
    for (what, yaml, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.yaml"), yaml).unwrap();
        let out = run_with_env(
            &["check", "app.yaml"],
            dir.path(),
            &[("MULTI", "one\ntwo\nthree\nfour")],
        );
        assert!(!out.status.success(), "{what}");
        let err = text(&out.stderr);
        assert!(err.contains(expected), "{what}: {err}");
        for leak in ["from_str", "DuplicateKeyPolicy", "Options", "untagged"] {
            assert!(!err.contains(leak), "{what}: {err}");
        }
    }
}

#[test]
fn nested_defaults_and_huge_ids_read_as_users_mean_them() {
    let port = free_port().to_string();
    let dir = app(&[(
        "app.yaml",
        "namespace: app\nentries:\n  - name: r\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1:${NOPE:-${PORT:-1}}/\n  - name: q\n    kind: queue.queue\n",
    )]);
    let out = run_with_env(
        &["info", "app:q", "-c", "app.yaml"],
        dir.path(),
        &[("PORT", &port)],
    );
    assert!(!out.status.success());
    // The inner reference was read: the driver tried the port from the environment.
    assert!(
        text(&out.stderr).contains(&format!("127.0.0.1:{port}")),
        "{}",
        text(&out.stderr)
    );
    // As long as one command-line argument may be.
    let huge = format!("app:{}", "x".repeat(100_000));
    let out = run(&["info", &huge, "-c", "app.yaml"], dir.path());
    assert!(!out.status.success());
    assert!(
        out.stderr.len() < 1000,
        "the id is echoed: {} bytes",
        out.stderr.len()
    );
}

/// Sends a raw request, optionally in two writes apart; returns the status line.
fn raw_request(port: u16, parts: &[&str]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            // Two TCP packets: the server must read on until the head is whole.
            std::thread::sleep(Duration::from_millis(100));
        }
        stream.write_all(part.as_bytes()).expect("write");
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.lines().next().unwrap_or("").to_string()
}

/// A SIGTERM while a handler computes without yielding: the worker thread sees the stop
/// and its runners' end at once, and picked either; taking the runners' end, it logged
/// an ERROR that the subscription had ended, on a clean stop (3 runs in 4, review).
#[test]
fn a_stop_while_a_handler_computes_logs_no_ended_subscription() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n  - name: c\n    kind: queue.consumer\n    queue: q\n    source: h.lua\n    method: sortspin\n    stop_timeout: 2s\n    timeout: 1s\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: start\n",
        ),
        (
            "h.lua",
            "function start() for i = 1, 5 do queue.publish('app:q', { i = i }) end end\nfunction sortspin(p)\n  logger:info('Computing')\n  local t = {}\n  for i = 1, 100 do t[i] = i end\n  table.sort(t, function(a, b) while true do end end)\nend\n",
        ),
    ]);
    for _ in 0..3 {
        let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
        let mut seen = wait_for_line(&lines, "Computing");
        signal(&child, "TERM");
        let out = wait_with_timeout(child, Duration::from_secs(30));
        seen.extend(rest_of_lines(&lines));
        let said = seen.join("\n");
        assert!(out.status.success(), "{said}");
        assert!(!said.contains("subscription ended"), "{said}");
    }
}

/// Each run stopped while it waits in a call made a full collection of its Lua state,
/// so stopping thousands of waiting process instances grew with their square: 10,000
/// waiting on a full queue took 12 s to stop, and their worker was left behind as
/// stuck (review). A state about to be dropped makes none for them.
#[test]
fn stopping_ten_thousand_waiting_processes_leaves_no_worker_behind() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: mem\n    kind: queue.driver.memory\n    publish_timeout: 600s\n  - name: full\n    kind: queue.queue\n    driver: app:mem\n    max_length: 1\n  - name: filler\n    kind: process.lua\n    source: p.lua\n    method: main\n    instances: 10000\n",
        ),
        (
            "p.lua",
            "function main(i)\n  if i == 10000 then logger:info('All waiting') end\n  queue.publish('app:full', { i = i })\nend\n",
        ),
    ]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml", "--lua-threads", "1"], dir.path());
    // Instances start in turn, each waiting in its publish before the next starts.
    let mut seen = wait_for_line(&lines, "All waiting");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    seen.extend(rest_of_lines(&lines));
    let said = seen.join("\n");
    assert!(out.status.success(), "{:?}", out.status);
    assert!(
        !said.contains("leaving its worker behind"),
        "{}",
        tail(&said)
    );
    // Said once for them all, with their number: it was a line each.
    let stopped: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("process stopped before it finished"))
        .collect();
    assert_eq!(stopped.len(), 1, "{}", tail(&said));
    assert!(stopped[0].contains("instances=9999"), "{}", stopped[0]);
}

/// A process stuck where no slice can end (a `table.sort` comparator that never
/// returns) keeps its worker at a stop: the line that leaves the worker behind names
/// the processes still running. It blamed "a process or handler", and the consumer
/// beside it was said to share a worker with a stuck handler (review).
#[test]
fn a_worker_left_behind_names_the_processes_still_running() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n  - kind: queue.consumer\n    id: worker\n    queue: app:jobs\n    source: h.lua\n    method: handle\n    stop_timeout: 1s\n  - name: sorter\n    kind: process.lua\n    source: h.lua\n    method: main\n",
        ),
        (
            "h.lua",
            "function handle() end\nfunction main()\n  local t = {}\n  for i = 1, 100 do t[i] = i end\n  logger:info('Sorting')\n  table.sort(t, function(a, b) while true do end end)\nend\n",
        ),
    ]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml", "--lua-threads", "1"], dir.path());
    let mut seen = wait_for_line(&lines, "Sorting");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    seen.extend(rest_of_lines(&lines));
    let said = seen.join("\n");
    assert!(out.status.success(), "{:?}: {}", out.status, tail(&said));
    let left = said
        .lines()
        .find(|l| l.contains("leaving its worker behind"))
        .unwrap_or_else(|| panic!("no worker left behind: {}", tail(&said)));
    assert!(left.contains("processes_running=app:sorter (1)"), "{left}");
}

/// 200 handlers stopped at their `stop_timeout` whose `__close` loops: each had
/// 100 ms, one after the other, 20 s in all, and the stop left their worker behind as
/// stuck (review). A state's abandoned runs share 250 ms of `__close` time a second.
#[test]
fn many_stopped_handlers_whose_close_loops_stop_in_time() {
    let dir = app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: mem\n    kind: queue.driver.memory\n    publish_timeout: 600s\n  - name: full\n    kind: queue.queue\n    driver: app:mem\n    max_length: 1\n  - name: jobs\n    kind: queue.queue\n    driver: app:mem\n  - kind: queue.consumer\n    id: w\n    queue: app:jobs\n    source: h.lua\n    method: handle\n    concurrency: 200\n    stop_timeout: 1s\n  - name: feeder\n    kind: process.lua\n    source: h.lua\n    method: feed\n",
        ),
        (
            "h.lua",
            "function feed()\n  queue.publish('app:full', { x = 0 })\n  for i = 1, 200 do queue.publish('app:jobs', { i = i }) end\nend\nfunction handle(msg)\n  local guard <close> = setmetatable({}, { __close = function() while true do end end })\n  if msg.i == 200 then logger:info('All handling') end\n  queue.publish('app:full', { x = 1 })\nend\n",
        ),
    ]);
    let (child, lines) = spawn_with_lines(&["run", "app.yaml", "--lua-threads", "1"], dir.path());
    let mut seen = wait_for_line(&lines, "All handling");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(60));
    seen.extend(rest_of_lines(&lines));
    let said = seen.join("\n");
    assert!(out.status.success(), "{:?}: {}", out.status, tail(&said));
    assert!(
        said.contains("handlers still running at stop_timeout"),
        "{}",
        tail(&said)
    );
    assert!(!said.contains("left behind"), "{}", tail(&said));
}

/// The last lines of a long log, for a failure's message.
fn tail(said: &str) -> String {
    let lines: Vec<&str> = said.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Every thread of the runtime takes `RUST_MIN_STACK` of address space (1 GiB in a
/// debug build, for lapin's parser): under an address-space limit close to what the
/// runtime uses, the stop could not start the thread that joins the Lua workers, and
/// panicked, so a SIGTERM ended it as a crash, with no summary and no driver closed
/// (review). The limit is set on the running process with `prlimit`.
#[test]
fn a_stop_under_an_address_space_limit_still_ends_cleanly() {
    let dir = noop_consumer_app();
    let (child, lines) = spawn_with_lines(&["run", "app.yaml"], dir.path());
    let mut seen = wait_for_line(&lines, "runtime started");
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let used_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/PID/status");
    let limit = (used_kib + 256 * 1024) * 1024;
    let set = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", child.id()))
        .arg(format!("--as={limit}:{limit}"))
        .status()
        .expect("prlimit runs");
    assert!(set.success(), "prlimit failed");
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    seen.extend(rest_of_lines(&lines));
    let said = seen.join("\n");
    assert!(out.status.success(), "{:?}: {said}", out.status);
    let summary = text(&out.stdout);
    assert!(
        summary.contains("summary: queue=app:jobs"),
        "{summary}\n{said}"
    );
}

/// An app with one consumer whose handler does nothing: enough for the metrics server.
fn noop_consumer_app() -> tempfile::TempDir {
    app(&[
        (
            "app.yaml",
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n",
        ),
        ("h.lua", "function handle() end\n"),
    ])
}

/// A liveness probe pointed at `/health` must not fail while idle connections hold
/// every slot (docs/operations.md, "Health"): such a flood, kept up, would have the
/// orchestrator restart a healthy process again and again.
#[test]
fn a_probe_is_answered_while_idle_connections_hold_every_slot() {
    let dir = noop_consumer_app();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = spawn(&["run", "--metrics-addr", &addr, "app.yaml"], dir.path());
    wait_for_metrics(port, "the server", |_| true);
    // More idle connections than the server holds (64), opened one after the other,
    // held open while the probes run.
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects"))
        .collect();
    for _ in 0..3 {
        let answer = http_get_with_status(port, "/health");
        assert_eq!(
            answer.map(|(status, _)| status),
            Some(200),
            "the probe was refused"
        );
    }
    // What made room: the connections that had waited longest without a request.
    // Within a second: the server's own 5-second limit on a request head must not be
    // what closed it.
    let mut oldest = &idle[0];
    oldest
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut byte = [0u8; 1];
    let read = std::io::Read::read(&mut oldest, &mut byte);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the oldest idle connection is still open: {read:?}"
    );
    drop(idle);
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn the_metrics_server_reads_whole_requests_and_survives_a_flood() {
    let dir = noop_consumer_app();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Few file descriptors, so a flood exhausts them.
    let child = std::process::Command::new("sh")
        .args([
            "-c",
            "ulimit -n 96 && exec \"$0\" \"$@\"",
            assert_cmd::cargo::cargo_bin!("queue-runtime")
                .to_str()
                .unwrap(),
            "run",
            "--metrics-addr",
            &addr,
            "app.yaml",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawns");
    // Killed if an assertion below fails first.
    let child = Spawned::from(child);
    wait_for_metrics(port, "the server", |_| true);
    let status = |parts: &[&str]| raw_request(port, parts);
    assert_eq!(
        status(&["GET /hea", "lth HTTP/1.1\r\nhost: x\r\n\r\n"]),
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        status(&["GET /health?probe=1 HTTP/1.1\r\nhost: x\r\n\r\n"]),
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        status(&["POST /health HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"]),
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        status(&["GET /nope HTTP/1.1\r\nhost: x\r\n\r\n"]),
        "HTTP/1.1 404 Not Found"
    );

    // A flood of idle connections, past the process's file descriptors.
    let flood: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let before = queue_testkit::process_cpu(child.id());
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = queue_testkit::process_cpu(child.id()) - before;
    let share = used.as_secs_f64() / window.elapsed().as_secs_f64();
    assert!(share < 0.5, "the accept loop spins: {share:.2} of a core");
    drop(flood);
    // Idle connections time out and the server answers again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if http_get(port, "/health").is_some_and(|b| b.contains("ok")) {
            break;
        }
        assert!(Instant::now() < deadline, "/health never answered again");
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&child, "TERM");
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A consumer's file that needs an opt-in is not run by `check`, so `run` is where a
/// missing method or a top level that fails shows: the start is refused with the
/// consumer, the file and why, before any process or handler runs. It was retried
/// and dead-lettered, one delivery after another, while the consumer said it was
/// attached.
#[test]
fn run_refuses_to_start_a_consumer_whose_handler_is_not_there() {
    for (lua, said) in [
        (
            "local home = os.getenv('HOME')\nfunction handel(p) end\n",
            "defines no function \"handle\"",
        ),
        (
            "error('no config here')\nfunction handle(p) end\n",
            "no config here",
        ),
    ] {
        let yaml = "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n    sandbox:\n      allow: [os]\n  - name: start\n    kind: process.lua\n    source: p.lua\n    method: start\n";
        let dir = app(&[
            ("app.yaml", yaml),
            ("h.lua", lua),
            ("p.lua", "function start() logger:info('Started') end\n"),
        ]);
        let (out, logs) = run_json(dir.path());
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("consumer app:w") && err.contains("h.lua") && err.contains(said),
            "{err}"
        );
        assert!(lua_logs(&logs, "Started").is_empty(), "{err}");
    }
}

/// The same for a process: its method is looked up before anything starts, and the
/// start is refused without it. Before, the other processes and the consumers ran,
/// and this one failed once started.
#[test]
fn run_refuses_to_start_a_process_whose_handler_is_not_there() {
    let yaml = "namespace: app\nentries:\n  - name: start\n    kind: process.lua\n    source: p.lua\n    method: start\n  - name: broken\n    kind: process.lua\n    source: b.lua\n    method: main\n    sandbox:\n      allow: [os]\n";
    let dir = app(&[
        ("app.yaml", yaml),
        ("p.lua", "function start() logger:info('Started') end\n"),
        (
            "b.lua",
            "local home = os.getenv('HOME')\nfunction mian() end\n",
        ),
    ]);
    let (out, logs) = run_json(dir.path());
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("process app:broken") && err.contains("defines no function \"main\""),
        "{err}"
    );
    assert!(lua_logs(&logs, "Started").is_empty(), "{err}");
}
