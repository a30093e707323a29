//! The Lua sandbox (docs/security.md): policies hold inside coroutines, bytecode is
//! never loaded, the dangerous parts of the standard library are opt-ins, shared
//! tables are read-only, and memory and top-level run time are limited.

mod support;

use std::sync::Arc;
use std::time::Duration;

use queue_core::security::{Actor, Effect, Policy, RulePolicy, SecurityContext};
use queue_core::{ErrorKind, Value};
use queue_lua::{Limits, LuaHost, LuaSource, OptIn, Outcome, SourceCheck};
use queue_testkit::within;
use support::{Harness, lua_file};

fn only_emails() -> SecurityContext {
    let rules: Vec<Arc<dyn Policy>> = vec![Arc::new(RulePolicy::new(
        ["queue.publish", "queue.publish.queue"],
        ["app:emails"],
        Effect::Allow,
    ))];
    SecurityContext::new(Some(Actor::new("mailer")), rules, false)
}

fn field<'a>(body: &'a Value, key: &str) -> &'a Value {
    match body {
        Value::Map(map) => map
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {body:?}")),
        other => panic!("not a map: {other:?}"),
    }
}

#[tokio::test]
async fn coroutines_a_handler_creates_keep_its_policies_and_its_delivery() {
    let h = Harness::new().await;
    let outcome = h
        .run_as("sandbox/coroutines.lua", "sneak", only_emails())
        .await;
    assert_eq!(outcome, Outcome::Ack);
    let report = h.take_body("app:emails").await;
    assert_eq!(field(&report, "wrap"), &Value::from("PermissionDenied"));
    assert_eq!(field(&report, "create"), &Value::from("PermissionDenied"));
    assert!(
        matches!(field(&report, "message_id"), Value::String(id) if !id.is_empty()),
        "queue.message() in a nested coroutine: {report:?}"
    );
    assert_eq!(h.ready("app:tasks").await, 0, "a coroutine published");
}

/// A coroutine kept past the run that made it would publish with that run's rights
/// for whichever handler resumes it later.
#[tokio::test]
async fn a_coroutine_that_outlives_its_handler_run_cannot_publish() {
    let h = Harness::new().await;
    let kept = h
        .run_as(
            "sandbox/coroutines.lua",
            "keep_a_publisher",
            SecurityContext::default(),
        )
        .await;
    assert_eq!(kept, Outcome::Ack);
    assert_the_kept_publisher_is_denied(&h, "a handler's").await;
    // One that a process made, and kept past the process's run, the same.
    let keep = h
        .host
        .handler(&lua_file("sandbox/coroutines.lua"), "keep_a_publisher")
        .unwrap();
    h.host
        .run_process(&keep, Vec::new(), SecurityContext::default())
        .await
        .unwrap();
    assert_the_kept_publisher_is_denied(&h, "a process's").await;
}

/// A coroutine made by a run that still goes on, resumed by another handler's run
/// (both consumers share the file's globals), published with the first run's rights:
/// a handler allowed `app:emails` only published to `app:tasks`. Resuming it from
/// another run is refused while its own run goes on.
#[tokio::test]
async fn a_running_handlers_coroutine_cannot_be_resumed_by_another_run() {
    let h = Harness::new().await;
    h.driver.hold_publishes();
    let file = "sandbox/coroutines.lua";
    let stashing = h.run_as(
        file,
        "stash_a_publisher_and_wait",
        SecurityContext::default(),
    );
    let resuming = async {
        h.driver.wait_for_held(1).await;
        let resume = h.run_as(file, "resume_the_stashed_publisher", only_emails());
        within("the other run's resume", resume).await
    };
    let outcome = tokio::select! {
        outcome = stashing => panic!("the stashing run ended while its publish was held: {outcome:?}"),
        outcome = resuming => outcome,
    };
    match outcome {
        Outcome::Nack { reason, .. } => {
            assert!(reason.contains("another run"), "{reason}")
        }
        other => panic!("the resume was not refused: {other:?}"),
    }
    assert_eq!(h.driver.held(), 1, "the stashed coroutine published");
}

/// Resumes the coroutine kept in `kept_publisher` from a handler allowed `app:emails`
/// only, and checks that it could not publish to `app:tasks`.
async fn assert_the_kept_publisher_is_denied(h: &Harness, whose: &str) {
    let resumed = h
        .run_as(
            "sandbox/coroutines.lua",
            "resume_the_kept_publisher",
            only_emails(),
        )
        .await;
    assert_eq!(resumed, Outcome::Ack);
    let report = h.take_body("app:emails").await;
    assert_eq!(field(&report, "kept"), &Value::from("PermissionDenied"));
    assert_eq!(
        h.ready("app:tasks").await,
        0,
        "{whose} kept coroutine published"
    );
}

#[tokio::test]
async fn code_without_a_context_is_denied_not_let_through() {
    let h = Harness::new().await;
    let outcome = h
        .run_as(
            "sandbox/coroutines.lua",
            "report_top_level",
            SecurityContext::default(),
        )
        .await;
    assert_eq!(outcome, Outcome::Ack);
    let report = h.take_body("app:emails").await;
    assert_eq!(
        field(&report, "top_level"),
        &Value::from("PermissionDenied")
    );
    assert_eq!(
        field(&report, "coroutine"),
        &Value::from("PermissionDenied")
    );
    assert_eq!(h.ready("app:tasks").await, 0);
}

#[tokio::test]
async fn the_default_sandbox_leaves_out_what_reaches_outside_the_process() {
    let h = Harness::new().await;
    let outcome = h
        .run_as("sandbox/escapes.lua", "probe", SecurityContext::default())
        .await;
    assert_eq!(outcome, Outcome::Ack);
    let report = h.take_body("app:emails").await;
    for absent in [
        "io",
        "os_execute",
        "os_exit",
        "os_getenv",
        "os_remove",
        "dofile",
        "loadfile",
        "package",
        "debug",
        "string_dump",
    ] {
        assert_eq!(field(&report, absent), &Value::from("nil"), "{absent}");
    }
    assert_eq!(field(&report, "os_time"), &Value::from("function"));
    assert_eq!(field(&report, "require_file"), &Value::from("refused"));
    assert_eq!(field(&report, "require_queue"), &Value::from("same"));
    assert_eq!(field(&report, "binary_chunk"), &Value::from("refused"));
    assert_eq!(field(&report, "text_chunk"), &Value::Int(42));
    assert_eq!(field(&report, "collect_stop"), &Value::from("refused"));
}

/// Runs `method` of `sandbox/escapes.lua` with these opt-ins, and returns what it
/// published to `app:emails`.
async fn escapes_with(h: &Harness, method: &str, opt_in: &[&str]) -> Value {
    published_by(h, &lua_file("sandbox/escapes.lua"), method, opt_in).await
}

/// Runs `method` of the file at `path` with these opt-ins; it must succeed. Returns
/// what it published to `app:emails`.
async fn published_by(h: &Harness, path: &std::path::Path, method: &str, opt_in: &[&str]) -> Value {
    let opt_in = OptIn::parse(opt_in.iter().copied()).unwrap();
    let handler = h.host.handler_with(path, method, opt_in).unwrap();
    let message = support::json_message(Value::from("x"), Default::default());
    let payload = h.host.decode_payload(&message).unwrap();
    let context = queue_lua::DeliveryContext {
        message: std::sync::Arc::new(message),
        settle: std::rc::Rc::new(support::Recorder::default()),
    };
    let outcome = h
        .host
        .run_handler(&handler, payload, context, SecurityContext::default())
        .await;
    assert_eq!(outcome, Outcome::Ack);
    h.take_body("app:emails").await
}

#[tokio::test]
async fn an_entry_opts_into_os_for_its_file_only_and_never_gets_exit() {
    let h = Harness::new().await;
    let report = escapes_with(&h, "with_os", &["os"]).await;
    assert_eq!(field(&report, "getenv"), &Value::from("string"));
    assert_eq!(field(&report, "exit"), &Value::from("refused"));
    assert_eq!(
        field(&report, "require_os_getenv"),
        &Value::from("function")
    );
    // The same file without the opt-in, on the same state, still has no os.getenv.
    h.run_as("sandbox/escapes.lua", "probe", SecurityContext::default())
        .await;
    let report = h.take_body("app:emails").await;
    assert_eq!(field(&report, "os_getenv"), &Value::from("nil"));
}

#[tokio::test]
async fn requiring_files_never_hands_out_the_real_standard_library() {
    let h = Harness::new().await;
    let report = escapes_with(&h, "with_require", &["require"]).await;
    for name in ["_G", "package", "debug", "io"] {
        assert_eq!(
            field(&report, name),
            &Value::from("refused"),
            "require({name})"
        );
    }
    assert_eq!(field(&report, "os_exit"), &Value::from("nil"));
    assert_eq!(field(&report, "string"), &Value::from("same"));
}

#[tokio::test]
async fn shared_tables_are_read_only_so_one_handler_cannot_fool_another() {
    let h = Harness::new().await;
    let outcome = h
        .run_as("sandbox/tamper.lua", "report", SecurityContext::default())
        .await;
    assert_eq!(outcome, Outcome::Ack);
    let report = h.take_body("app:emails").await;
    let Value::Map(results) = &report else {
        panic!("{report:?}")
    };
    assert_eq!(results.len(), 11, "{report:?}");
    for (what, result) in results {
        assert_eq!(result, &Value::from("refused"), "{what} was changed");
    }
    let outcome = h
        .run_as(
            "sandbox/other.lua",
            "publish_for_real",
            SecurityContext::default(),
        )
        .await;
    assert_eq!(outcome, Outcome::Ack);
    assert_eq!(h.ready("app:tasks").await, 1, "queue.publish was replaced");
}

/// The sandbox's read-only stand-ins for `math`, `string`, `queue`... read raw are
/// empty: `{m = math}` was sent as `{m = {}}`, what the handler meant lost without a
/// word (review). They are refused, with their path.
#[tokio::test]
async fn library_tables_are_refused_as_data_not_sent_empty() {
    let h = Harness::new().await;
    let outcome = h
        .run_as(
            "sandbox/other.lua",
            "publish_libraries",
            SecurityContext::default(),
        )
        .await;
    assert_eq!(outcome, Outcome::Ack);
    let said = h.take_body("app:emails").await;
    for (name, path) in [
        ("math", "data.m"),
        ("string", "data"),
        ("queue", "data.q[1]"),
    ] {
        let Value::String(text) = field(&said, name) else {
            panic!("{said:?}")
        };
        assert!(
            text.starts_with("Invalid: ") && text.contains(path) && text.contains("library"),
            "{name}: {text}"
        );
    }
    assert_eq!(h.ready("app:tasks").await, 0);
}

/// A top level whose instructions each take milliseconds ran 46 s past its 5 s load
/// time: the hook came every 10,000 of them (review).
#[test]
fn a_top_level_of_slow_instructions_ends_at_its_load_time() {
    let source = LuaSource::from_code(
        "slow.lua",
        &b"local text = string.rep('a', 40 * 1024 * 1024)\nwhile true do utf8.len(text) end\n"[..],
    );
    let limits = Limits {
        load_time: Duration::from_millis(200),
        ..Limits::default()
    };
    let checked = queue_testkit::finishes_within(
        Duration::from_secs(60),
        "the top level ends at its load time",
        move || queue_lua::check_source(&source, "handle", OptIn::default(), limits),
    );
    let err = checked.unwrap_err();
    assert!(err.message().contains("top level ran longer"), "{err}");
}

/// An error a module function raises names what it was given cut short, and one
/// that Lua code it ran raised (a `__tostring`) is cut as a message is: their text
/// lives on Rust's heap, outside the memory limit, for as long as the error value is
/// kept. 300 kept errors of `collectgarbage(string.rep("\1", 1e6))` held 1.7 GB
/// with 16 MiB allowed (review).
#[tokio::test]
async fn errors_of_the_modules_keep_no_more_than_a_message() {
    let h = Harness::new().await;
    let out = h
        .host
        .eval(
            r#"
local big = string.rep("\1", 1000000)
local loud = setmetatable({}, { __tostring = function() error(big, 0) end })
local lengths = {}
for _, call in ipairs({
  function() return collectgarbage(big) end,
  function() return errors.is(nil, big) end,
  function() return errors.new({ kind = big }) end,
  function() return errors.new({ message = "m", details = { d = loud } }) end,
  function() return logger.info(loud) end,
  function() return logger.info("m", { f = loud }) end,
}) do
  local ok, err = pcall(call)
  lengths[#lengths + 1] = ok and -1 or #tostring(err)
end
return table.unpack(lengths)
"#,
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 6, "{out:?}");
    for (i, length) in out.iter().enumerate() {
        match length {
            // -1: the call went through (a logged field that cannot be told is `?`).
            Value::Int(n) => assert!(*n <= 8192, "call {}: {n} bytes", i + 1),
            other => panic!("call {}: {other:?}", i + 1),
        }
    }
}

/// Bytecode of `return 1`, made by a Lua state outside any sandbox.
fn bytecode() -> Vec<u8> {
    mlua::Lua::new()
        .load("return 1")
        .into_function()
        .unwrap()
        .dump(false)
}

#[tokio::test]
async fn binary_chunks_are_refused_even_corrupted_never_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut corrupted = bytecode();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0xff;
    let h = Harness::new().await;
    for (name, bytes) in [("good.luac", bytecode()), ("bad.luac", corrupted)] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let err = h.host.handler(&path, "handle").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert!(err.message().contains("binary"), "{err}");
        let checked = queue_lua::check_source(
            &LuaSource::read(&path).unwrap(),
            "handle",
            OptIn::default(),
            Limits::default(),
        )
        .unwrap_err();
        assert!(checked.message().contains("binary"), "{checked}");
    }
    let lua_bytes = h.host.lua().create_string(bytecode()).unwrap();
    h.host.globals().raw_set("bytes", lua_bytes).unwrap();
    let out = h
        .host
        .eval("local f, err = load(bytes) return f == nil, err")
        .await
        .unwrap();
    assert_eq!(out[0], Value::Bool(true));
    assert!(
        matches!(&out[1], Value::String(e) if e.contains("binary")),
        "{out:?}"
    );
}

/// With `require` allowed, Lua's own file searcher loaded a module's file as text or
/// bytecode, and a module runs with the real standard library, whose `load` took
/// bytecode too: a corrupted chunk crashed the runtime (review). Every way in takes
/// text only.
#[tokio::test]
async fn a_required_module_and_what_it_loads_take_text_only() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = dir.path().join("chunk.lua");
    std::fs::write(&chunk, bytecode()).unwrap();
    std::fs::write(dir.path().join("compiled.lua"), bytecode()).unwrap();
    std::fs::write(
        dir.path().join("helper.lua"),
        r#"
local M = {}
function M.load_text(path)
  local file = io.open(path, "rb")
  local text = file:read("a")
  file:close()
  return load(text)
end
function M.load_file(path) return loadfile(path) end
function M.load_file_binary(path) return loadfile(path, "b") end
function M.run_file(path) return pcall(dofile, path) end
return M
"#,
    )
    .unwrap();
    let handler = dir.path().join("h.lua");
    std::fs::write(
        &handler,
        format!(
            r#"
local chunk = {chunk:?}
function handle()
  local required, why = pcall(require, "compiled")
  local helper = require("helper")
  local report = {{ required = required, why = tostring(why) }}
  report.load, report.load_why = helper.load_text(chunk)
  report.loadfile, report.loadfile_why = helper.load_file(chunk)
  report.binary, report.binary_why = helper.load_file_binary(chunk)
  report.dofile, report.dofile_why = helper.run_file(chunk)
  for _, key in ipairs({{"load", "loadfile", "binary"}}) do
    report[key] = report[key] ~= nil
  end
  report.dofile_why = tostring(report.dofile_why)
  queue.publish("app:emails", report)
end
"#
        ),
    )
    .unwrap();
    let h = Harness::new().await;
    let package: mlua::Table = h.host.lua().globals().get("package").unwrap();
    let search = format!("{}/?.lua", dir.path().display());
    package.set("path", search).unwrap();
    let report = published_by(&h, &handler, "handle", &["require"]).await;
    for (refused, why) in [
        ("required", "why"),
        ("load", "load_why"),
        ("loadfile", "loadfile_why"),
        ("binary", "binary_why"),
        ("dofile", "dofile_why"),
    ] {
        assert_eq!(field(&report, refused), &Value::Bool(false), "{report:?}");
        assert!(
            matches!(field(&report, why), Value::String(e) if e.contains("binary")),
            "{why}: {report:?}"
        );
    }
}

#[tokio::test]
async fn a_handler_past_the_memory_limit_fails_alone_and_the_state_goes_on() {
    let h = Harness::with_limits(Limits {
        memory_bytes: 32 * 1024 * 1024,
        ..Limits::default()
    })
    .await;
    let outcome = h
        .run_as("sandbox/memory.lua", "grow", SecurityContext::default())
        .await;
    match outcome {
        Outcome::Nack { reason, .. } => assert!(reason.contains("memory"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let outcome = h
        .run_as("sandbox/memory.lua", "fine", SecurityContext::default())
        .await;
    assert_eq!(outcome, Outcome::Ack);
    assert_eq!(h.ready("app:emails").await, 1);
}

/// An error value's text is held by Rust, where Lua's memory limit did not see it:
/// a handler keeping errors grew the process without bound. It is cut to a bound,
/// and counted against the limit.
#[tokio::test]
async fn error_values_count_against_the_memory_limit() {
    let h = Harness::with_limits(Limits {
        memory_bytes: 32 * 1024 * 1024,
        ..Limits::default()
    })
    .await;
    let security = SecurityContext::default;
    match h
        .run_as("sandbox/memory.lua", "grow_with_errors", security())
        .await
    {
        Outcome::Nack { reason, .. } => assert!(reason.contains("memory"), "{reason}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let outcome = h
        .run_as("sandbox/memory.lua", "errors_are_cut", security())
        .await;
    assert_eq!(outcome, Outcome::Ack);
}

#[test]
fn a_top_level_that_never_ends_fails_the_load_in_time() {
    let promise = "every endless top level failed its load";
    queue_testkit::async_finishes_within(Duration::from_secs(60), promise, || async {
        top_levels_that_never_end_fail_the_load()
    });
}

fn top_levels_that_never_end_fail_the_load() {
    let limits = Limits {
        load_time: Duration::from_millis(200),
        ..Limits::default()
    };
    let host =
        LuaHost::with_limits(Default::default(), SecurityContext::default(), limits).unwrap();
    for file in [
        "endless_top_level.lua",
        "endless_in_coroutine.lua",
        "endless_catching_top_level.lua",
        "endless_loading_top_level.lua",
    ] {
        let path = lua_file(&format!("sandbox/{file}"));
        let started = std::time::Instant::now();
        let err = host.handler(&path, "handle").unwrap_err();
        assert!(err.message().contains("longer than"), "{file}: {err}");
        assert!(started.elapsed() < Duration::from_secs(5), "{file}");
    }
}

#[tokio::test]
async fn check_runs_no_side_effect_even_for_an_entry_that_opts_into_os() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let source = dir.path().join("side_effect.lua");
    std::fs::write(
        &source,
        format!(
            "os.execute('touch {}')\nfunction handle() end\n",
            marker.display()
        ),
    )
    .unwrap();
    let os = OptIn::parse(["os"]).unwrap();
    let source = LuaSource::read(&source).unwrap();
    let checked = queue_lua::check_source(&source, "handle", os, Limits::default()).unwrap();
    assert!(
        matches!(&checked, SourceCheck::NotRun { reason } if reason.contains("execute")),
        "{checked:?}"
    );
    // Without the opt-in, the same file is an error: it calls what it may not.
    let err = queue_lua::check_source(&source, "handle", OptIn::default(), Limits::default())
        .unwrap_err();
    assert!(err.message().contains("execute"), "{err}");
    assert!(!marker.exists(), "check ran os.execute");
}

/// A `require` of a module that is not built in, at a file's top level, fails
/// `check`, saying so: the stock binary embeds nothing, so the start would fail too (a
/// program that embeds one requires it inside its handlers).
#[test]
fn a_top_level_require_of_no_built_in_module_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uses_jsno.lua");
    std::fs::write(
        &path,
        "local json = require('jsno')\nfunction handle() end\n",
    )
    .unwrap();
    let source = LuaSource::read(&path).unwrap();
    let err = queue_lua::check_source(&source, "handle", OptIn::default(), Limits::default())
        .unwrap_err();
    assert!(
        err.message().contains("jsno") && err.message().contains("not a built-in module"),
        "{err}"
    );
}

#[tokio::test]
async fn finalizers_are_refused_as_they_would_run_outside_any_time_limit() {
    let h = Harness::new().await;
    let outcome = h
        .run_as(
            "sandbox/finalizers.lua",
            "probe",
            SecurityContext::default(),
        )
        .await;
    assert_eq!(outcome, Outcome::Ack);
    let report = h.take_body("app:emails").await;
    for refused in ["function", "placeholder"] {
        let Value::String(error) = field(&report, refused) else {
            panic!("{report:?}")
        };
        assert!(error.contains("__gc"), "{refused}: {error}");
    }
    assert_eq!(field(&report, "plain"), &Value::from("allowed"));
    let Value::String(protected) = field(&report, "protected") else {
        panic!("{report:?}")
    };
    assert!(protected.contains("protected metatable"), "{protected}");
}
