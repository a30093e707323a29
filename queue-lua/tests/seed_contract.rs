//! The seed document's contract: its Errors table, docs/lua-api.md's settlement table, the
//! delivery context rules, permissions, and publish waiting for its driver.

mod support;

use std::sync::Arc;

use queue_core::security::{Actor, Effect, Policy, RulePolicy, SecurityContext};
use queue_core::{HeaderValue, Headers, Value};
use queue_lua::Outcome;
use support::{Harness, json_message, lua_file};

#[tokio::test]
async fn every_row_of_the_seed_errors_table() {
    let h = Harness::new().await;
    let script = std::fs::read_to_string(lua_file("seed_errors.lua")).unwrap();
    assert_eq!(h.host.eval(&script).await.unwrap(), vec![Value::from("ok")]);
    for q in support::QUEUES {
        assert_eq!(h.ready(q).await, 0, "a refused publish reached {q}");
    }
}

/// `errors.new` and `errors.is` refuse what they cannot mean: `retryable = "false"`
/// made an error retryable (any value but nil and false is true to Lua), and
/// `errors.is(err, "invalid")`, an unknown kind, was quietly false where
/// `errors.new` raises on one (review).
#[tokio::test]
async fn errors_new_and_is_refuse_what_they_cannot_mean() {
    let h = Harness::new().await;
    let raised = |chunk: &'static str| async {
        let err = h.host.eval(chunk).await.expect_err(chunk);
        err.to_string()
    };
    let text =
        raised(r#"return errors.new{kind = errors.INVALID, retryable = "false"}:retryable()"#)
            .await;
    assert!(
        text.contains("retryable must be a boolean, got a string"),
        "{text}"
    );
    let text = raised(r#"return errors.is(errors.new("x"), "invalid")"#).await;
    assert!(text.contains(r#"unknown kind "invalid""#), "{text}");
    // A misspelt constant is no kind at all: read as nil, it made an INTERNAL,
    // retryable error of what the handler meant as INVALID.
    let text = raised(r#"return errors.new{message = "bad", kind = errors.INVALD}"#).await;
    assert!(
        text.contains("errors.INVALD does not exist") && text.contains("errors.INVALID"),
        "{text}"
    );
    let answers = h
        .host
        .eval(
            r#"local e = errors.new{kind = errors.INVALID, retryable = true}
            return e:retryable(), errors.is(e, errors.INVALID), errors.is("x", errors.INVALID)"#,
        )
        .await
        .unwrap();
    assert_eq!(
        answers,
        vec![Value::Bool(true), Value::Bool(true), Value::Bool(false)]
    );
}

fn policies(rules: Vec<RulePolicy>) -> SecurityContext {
    let rules = rules
        .into_iter()
        .map(|r| Arc::new(r) as Arc<dyn Policy>)
        .collect();
    SecurityContext::new(Some(Actor::new("worker")), rules, false)
}

const PUBLISH_AND_REPORT: &str = r#"
    local ok, err = queue.publish("app:tasks", { a = 1 })
    if err then
        assert(ok == false, "a failed publish answers false first, got " .. tostring(ok))
        return err:kind(), err:retryable(), err:message()
    end
    return ok
"#;

#[tokio::test]
async fn permission_denied_by_the_general_check_publishes_nothing() {
    let h = Harness::with_security(policies(vec![RulePolicy::new(
        ["other.*"],
        ["*"],
        Effect::Allow,
    )]))
    .await;
    let out = h.host.eval(PUBLISH_AND_REPORT).await.unwrap();
    assert_eq!(out[0], Value::from("PermissionDenied"));
    assert_eq!(out[1], Value::Bool(false));
    assert!(
        matches!(&out[2], Value::String(m) if m.contains("queue.publish")),
        "{out:?}"
    );
    assert_eq!(h.ready("app:tasks").await, 0);
}

#[tokio::test]
async fn permission_denied_by_the_queue_check_publishes_nothing() {
    let h = Harness::with_security(policies(vec![
        RulePolicy::new(["queue.publish"], ["*"], Effect::Allow),
        RulePolicy::new(["queue.publish.queue"], ["app:emails"], Effect::Allow),
    ]))
    .await;
    let out = h.host.eval(PUBLISH_AND_REPORT).await.unwrap();
    assert_eq!(out[0], Value::from("PermissionDenied"));
    assert!(
        matches!(&out[2], Value::String(m) if m.contains("queue.publish.queue") && m.contains("app:tasks"))
    );
    assert_eq!(h.ready("app:tasks").await, 0);
    let ok = h
        .host
        .eval(r#"return queue.publish("app:emails", { a = 1 })"#)
        .await
        .unwrap();
    assert_eq!(ok, vec![Value::Bool(true), Value::Nil]);
    assert_eq!(h.ready("app:emails").await, 1);
}

#[tokio::test]
async fn the_general_check_comes_before_the_queue_id() {
    let h = Harness::with_security(policies(vec![RulePolicy::new(
        ["other"],
        ["*"],
        Effect::Allow,
    )]))
    .await;
    let h2 = Harness::with_security(SecurityContext::unrestricted(true)).await;
    for harness in [&h, &h2] {
        let out = harness
            .host
            .eval(r#"local ok, err = queue.publish("", {}) return err:kind()"#)
            .await
            .unwrap();
        assert_eq!(out, vec![Value::from("PermissionDenied")]);
    }
}

#[tokio::test]
async fn a_handler_runs_with_its_consumers_security() {
    let h = Harness::new().await;
    let deny = policies(vec![RulePolicy::new(
        ["queue.*"],
        ["app:emails"],
        Effect::Allow,
    )]);
    let payload = Value::map([("x", Value::Int(1))]);
    let (outcome, _) = h
        .handle_as(
            "handlers.lua",
            "publish_and_report",
            json_message(payload, Headers::new()),
            deny,
        )
        .await;
    match outcome {
        Outcome::Nack { reason, .. } => assert!(reason.contains("PermissionDenied"), "{reason}"),
        other => panic!("expected a nack, got {other:?}"),
    }
    assert_eq!(h.ready("app:tasks").await, 0);
}

#[tokio::test]
async fn publish_failed_is_internal_and_retryable() {
    let h = Harness::new().await;
    h.driver.hold_publishes();
    let (out, ()) = tokio::join!(h.host.eval(PUBLISH_AND_REPORT), async {
        h.driver.wait_for_held(1).await;
        assert!(h.driver.refuse_next());
    });
    let out = out.unwrap();
    assert_eq!(out[0], Value::from("Internal"));
    assert_eq!(out[1], Value::Bool(true));
    assert_eq!(h.ready("app:tasks").await, 0);
}

#[tokio::test]
async fn publish_returns_only_once_the_driver_confirms() {
    let h = Harness::new().await;
    h.driver.hold_publishes();
    let (out, ()) = tokio::join!(h.host.eval(PUBLISH_AND_REPORT), async {
        h.driver.wait_for_held(1).await;
        assert_eq!(h.ready("app:tasks").await, 0, "not in the queue while held");
        assert!(h.driver.confirm_next());
    });
    assert_eq!(out.unwrap(), vec![Value::Bool(true)]);
    assert_eq!(h.ready("app:tasks").await, 1);
}

#[tokio::test]
async fn a_waiting_publish_yields_the_coroutine_not_the_thread() {
    let h = Harness::new().await;
    h.driver.hold_publishes();
    let first = json_message(Value::map([("n", Value::Int(1))]), Headers::new());
    let second = json_message(Value::map([("n", Value::Int(2))]), Headers::new());
    let waiting = h.handle("handlers.lua", "publish_and_report", first);
    let other = async {
        h.driver.wait_for_held(1).await;
        // The first handler is suspended in publish on this same Lua state and thread;
        // a second handler runs to completion meanwhile.
        let (outcome, _) = h.handle("handlers.lua", "returns_true", second).await;
        assert_eq!(outcome, Outcome::Ack);
        assert_eq!(h.host.running(), 1, "the first handler is still suspended");
        assert!(h.driver.refuse_next());
    };
    let ((outcome, _), ()) = tokio::join!(waiting, other);
    match outcome {
        Outcome::Nack { reason, .. } => assert!(reason.contains("Internal"), "{reason}"),
        other => panic!("the refused publish must fail the handler, got {other:?}"),
    }
}

async fn outcome_of(method: &str) -> (Outcome, Vec<String>) {
    let h = Harness::new().await;
    let msg = json_message(Value::map([("n", Value::Int(1))]), Headers::new());
    h.handle("handlers.lua", method, msg).await
}

/// `==` between an error value and another userdata is `false`, not a raised
/// "bad argument".
#[tokio::test]
async fn an_error_value_compares_with_any_value() {
    let (outcome, _) = outcome_of("compares_an_error_with_a_message").await;
    assert_eq!(outcome, Outcome::Ack);
}

#[tokio::test]
async fn settlement_table() {
    for method in ["returns_nothing", "returns_true"] {
        assert_eq!(outcome_of(method).await, (Outcome::Ack, vec![]), "{method}");
    }
    for (method, reason) in [
        ("returns_false", "returned false"),
        ("returns_nil_err", "Unavailable: smtp down"),
        ("returns_nil_string", "plain failure"),
        ("raises", "boom"),
    ] {
        match outcome_of(method).await {
            (Outcome::Nack { reason: r, .. }, calls) => {
                assert!(r.contains(reason), "{method}: {r}");
                assert!(calls.is_empty());
            }
            other => panic!("{method}: expected a nack, got {other:?}"),
        }
    }
    assert_eq!(
        outcome_of("acks_itself").await,
        (Outcome::Settled, vec!["ack".to_string()])
    );
    assert_eq!(
        outcome_of("nacks_itself").await,
        (Outcome::Settled, vec!["nack: not today".to_string()])
    );
}

/// A raised error's reason carries the traceback of where it was raised, through the
/// handler's own functions: it showed only the runtime's guard, where the error was
/// raised again (review).
#[tokio::test]
async fn a_raised_error_carries_the_traceback_of_the_handlers_own_code() {
    match outcome_of("raises_deep_inside").await.0 {
        Outcome::Nack { reason, .. } => {
            assert!(reason.contains("attempt to index a nil value"), "{reason}");
            for frame in ["innermost", "middle", "raises_deep_inside"] {
                assert!(reason.contains(frame), "no {frame} in: {reason}");
            }
            assert!(!reason.contains("guard:"), "{reason}");
        }
        other => panic!("expected a nack, got {other:?}"),
    }
}

#[tokio::test]
async fn only_an_error_value_that_says_so_is_not_retryable() {
    for (method, reason, retryable) in [
        ("returns_false", "returned false", true),
        ("returns_nil_err", "Unavailable: smtp down", true),
        ("returns_nil_string", "plain failure", true),
        ("raises", "boom", true),
        ("returns_invalid", "Invalid: bad input", false),
        // An error value returned alone (a slip for `return nil, err`) fails the
        // message as that error: it was acked, the message gone unhandled (review).
        ("returns_an_error_alone", "Unavailable: smtp down", true),
        ("returns_invalid_alone", "Invalid: bad input", false),
        ("raises_invalid", "Invalid: bad input", false),
        ("raises_invalid_after_a_yield", "Invalid: bad input", false),
        (
            "raises_invalid_marked_retryable",
            "Invalid: bad input",
            true,
        ),
        ("catches_invalid_then_raises_text", "something else", true),
        // Only the error that leaves the handler counts: a __close raising on the
        // way out replaces the INVALID one.
        ("raises_invalid_then_close_raises_text", "db lost", true),
    ] {
        match outcome_of(method).await.0 {
            Outcome::Nack {
                reason: r,
                retryable: got,
            } => {
                assert!(r.contains(reason), "{method}: {r}");
                assert_eq!(got, retryable, "{method}: {r}");
            }
            other => panic!("{method}: expected a nack, got {other:?}"),
        }
    }
}

/// An error value whose `__index` loops is described under a deadline of its own:
/// the handler fails, the worker goes on.
#[tokio::test]
async fn an_error_value_that_loops_when_read_still_fails_the_handler() {
    let outcome = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        outcome_of("returns_a_looping_error"),
    )
    .await
    .expect("the worker is not held by the error's __index");
    match outcome.0 {
        Outcome::Nack { reason, retryable } => {
            assert_eq!(reason, "a table error");
            assert!(retryable);
        }
        other => panic!("{other:?}"),
    }
}

/// A raised table whose `__tostring` loops held its worker's thread for good: it was
/// told by running that `__tostring` after the coroutine ended, outside any time
/// limit (review). It is told within a limit of its own, and one that takes too long
/// is told as a table; a `__tostring` that answers still tells it.
#[test]
fn a_raised_error_that_loops_when_told_still_fails_the_handler() {
    for (method, told) in [
        (
            "raises_a_table_that_loops_when_told",
            "raised: a table error",
        ),
        ("raises_a_table_told_by_its_tostring", "raised: HTTP 503"),
        // A number is a message as `return nil, {message = 503}` tells it (review:
        // it was told as `table: 0x...`).
        ("raises_a_table_with_a_number_message", "raised: 503"),
    ] {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = done.send(runtime.block_on(outcome_of(method)));
        });
        let (outcome, _) = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the worker is not held by the error's __tostring");
        match outcome {
            Outcome::Nack { reason, retryable } => {
                assert!(reason.ends_with(told), "{method}: {reason}");
                assert!(retryable);
            }
            other => panic!("{method}: {other:?}"),
        }
    }
}

/// A `__close` runs with the error value the handler raised: telling a raised table
/// by its text must wait until they have run (review).
#[tokio::test]
async fn a_close_sees_the_raised_table() {
    match outcome_of("raises_a_table_a_close_reads").await.0 {
        Outcome::Nack { reason, .. } => assert!(reason.contains("close saw E409"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_raised_error_carries_the_lua_location() {
    match outcome_of("raises").await.0 {
        Outcome::Nack { reason, .. } => assert!(reason.contains("handlers.lua:"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

/// A raised table's `message` is its reason, as a returned table's is: it was the
/// table's address (`table: 0x55…`), which says nothing in a dead letter.
#[tokio::test]
async fn a_raised_table_is_told_by_its_message() {
    match outcome_of("raises_a_table").await.0 {
        Outcome::Nack { reason, retryable } => {
            assert!(reason.contains("raised: card declined"), "{reason}");
            assert!(!reason.contains("table: 0x"), "{reason}");
            assert!(retryable);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_delivery_context_survives_nested_calls_and_yields() {
    let h = Harness::new().await;
    let headers = Headers::from_pairs([("priority", HeaderValue::from("high"))]);
    let msg = json_message(Value::map([("n", Value::Int(1))]), headers);
    let id = msg.id.clone();
    h.driver.hold_publishes();
    let run = h.handle("handlers.lua", "context_in_nested_function", msg);
    let confirm = async {
        h.driver.wait_for_held(1).await;
        h.driver.confirm_next();
    };
    let ((outcome, _), ()) = tokio::join!(run, confirm);
    assert_eq!(outcome, Outcome::Ack);
    let published = h.take("app:tasks").await;
    assert_eq!(
        published.decode().unwrap(),
        Value::map([("from", Value::String(id))])
    );
}

#[tokio::test]
async fn the_message_is_released_when_the_handler_returns() {
    let h = Harness::new().await;
    let msg = || json_message(Value::map([("n", Value::Int(1))]), Headers::new());
    assert_eq!(
        h.handle("handlers.lua", "keeps_message", msg()).await.0,
        Outcome::Ack
    );
    // Same Lua state, so the module table (and the kept message) is shared.
    assert_eq!(
        h.handle("handlers.lua", "uses_kept_message", msg()).await.0,
        Outcome::Ack
    );
}

/// A message is its own run's: another handler that finds it (kept in a global while
/// its run waits in a publish) can neither read nor settle it. Before, the other run
/// acked it, and its own run's failure was then ignored: the message was lost.
#[tokio::test]
async fn a_message_cannot_be_used_by_another_run() {
    let h = Harness::new().await;
    h.driver.hold_publishes();
    let msg = |n| json_message(Value::map([("n", Value::Int(n))]), Headers::new());
    let waiting = h.handle("handlers.lua", "shares_message_and_waits", msg(1));
    let other = async {
        h.driver.wait_for_held(1).await;
        let (outcome, settled) = h
            .handle("handlers.lua", "uses_shared_message", msg(2))
            .await;
        assert_eq!(outcome, Outcome::Ack);
        assert!(settled.is_empty(), "{settled:?}");
        assert!(h.driver.confirm_next());
    };
    let ((outcome, settled), ()) = tokio::join!(waiting, other);
    assert_eq!(outcome, Outcome::Ack);
    assert!(settled.is_empty(), "another run settled it: {settled:?}");
}

/// A call a handler started in a coroutine it kept (resumed where it could not wait)
/// cannot be finished by another run: it would get the result of a call made with
/// the first run's rights (a queue's counts its own policies deny).
#[tokio::test]
async fn a_call_started_by_an_ended_run_is_not_finished_by_another() {
    let h = Harness::new().await;
    h.driver.hold_publishes();
    let msg = |n| json_message(Value::map([("n", Value::Int(n))]), Headers::new());
    let (kept, _) = h
        .handle("handlers.lua", "keeps_a_started_publish", msg(1))
        .await;
    assert_eq!(kept, Outcome::Ack);
    h.driver.wait_for_held(1).await;
    assert!(h.driver.confirm_next());
    let (other, _) = h
        .handle("handlers.lua", "finishes_a_kept_publish", msg(2))
        .await;
    assert_eq!(other, Outcome::Ack);
}

/// A message a handler keeps past its run (`M.kept = queue.message()`) holds nothing
/// of its delivery: neither the message nor what settles it. Before, each kept one
/// held the whole message, outside the Lua memory limit, for as long as Lua kept it.
#[tokio::test]
async fn a_kept_message_holds_nothing_of_its_delivery() {
    let h = Harness::new().await;
    let handler = h
        .host
        .handler(&lua_file("handlers.lua"), "keeps_message")
        .unwrap();
    let message = Arc::new(json_message(
        Value::map([("n", Value::Int(1))]),
        Headers::new(),
    ));
    let recorder = std::rc::Rc::new(support::Recorder::default());
    let payload = h.host.decode_payload(&message).unwrap();
    let context = queue_lua::DeliveryContext {
        message: Arc::clone(&message),
        settle: recorder.clone(),
    };
    let outcome = h
        .host
        .run_handler(&handler, payload, context, SecurityContext::default())
        .await;
    assert_eq!(outcome, Outcome::Ack);
    assert_eq!(
        Arc::strong_count(&message),
        1,
        "the kept message holds the delivery's message"
    );
    assert_eq!(
        std::rc::Rc::strong_count(&recorder),
        1,
        "the kept message holds its settlement"
    );
}

#[tokio::test]
async fn a_handler_reads_attempts_as_a_number() {
    let h = Harness::new().await;
    for (headers, expected) in [
        (Headers::new(), 1),
        (Headers::from_pairs([("attempts", HeaderValue::Int(4))]), 4),
    ] {
        let msg = json_message(Value::map([("expected", Value::Int(expected))]), headers);
        let (outcome, _) = h.handle("attempts.lua", "check", msg).await;
        assert_eq!(outcome, Outcome::Ack, "attempts {expected}");
    }
}

/// "Every method returns `value, err`": a nack given the `err` of a failed call settles
/// with that error as its reason, and a header asked for by a name that is not a
/// string is an `err`, where both raised "bad argument".
#[tokio::test]
async fn msg_methods_answer_odd_arguments_with_err_instead_of_raising() {
    let h = Harness::new().await;
    let (outcome, settled) = h
        .handle_as(
            "handlers.lua",
            "nack_with_an_error",
            json_message(Value::map([("x", Value::Int(1))]), Headers::new()),
            SecurityContext::default(),
        )
        .await;
    assert_eq!(outcome, Outcome::Settled);
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert!(
        settled[0].starts_with("nack: ") && settled[0].contains("Invalid"),
        "{settled:?}"
    );
}

/// A header name that is not UTF-8 names no header: it was read lossily, so that
/// `msg:header("\xff")` gave the header named U+FFFD (review).
#[tokio::test]
async fn a_header_name_that_is_not_utf8_names_no_header() {
    let h = Harness::new().await;
    let headers = Headers::from_pairs([("\u{FFFD}", HeaderValue::from("replacement"))]);
    let msg = json_message(Value::map([("x", Value::Int(1))]), headers);
    let (outcome, _) = h.handle("handlers.lua", "header_named_in_bytes", msg).await;
    assert_eq!(outcome, Outcome::Ack);
}

const INFO_AND_REPORT: &str = r#"
    local info, err = queue.info(QUEUE)
    if err then
        assert(info == nil, "a refused info answers nil first")
        return err:kind(), err:message()
    end
    return info.ready
"#;

#[tokio::test]
async fn queue_info_needs_a_permission_on_the_queue() {
    let publish_only = policies(vec![RulePolicy::new(
        ["queue.publish", "queue.publish.queue"],
        ["*"],
        Effect::Allow,
    )]);
    let app_only = policies(vec![RulePolicy::new(["queue.*"], ["app:*"], Effect::Allow)]);
    let billing_denied = policies(vec![
        RulePolicy::new(["queue.*"], ["*"], Effect::Allow),
        RulePolicy::new(["queue.info"], ["billing:*"], Effect::Deny),
    ]);
    for (security, queue, allowed) in [
        (publish_only, "app:tasks", false),
        (app_only.clone(), "app:tasks", true),
        (app_only, "billing:invoices", false),
        (billing_denied.clone(), "billing:invoices", false),
        (billing_denied, "app:tasks", true),
        (SecurityContext::unrestricted(true), "app:tasks", false),
        (SecurityContext::unrestricted(false), "app:tasks", true),
    ] {
        let h = Harness::with_security(security).await;
        let script = INFO_AND_REPORT.replace("QUEUE", &format!("{queue:?}"));
        let out = h.host.eval(&script).await.unwrap();
        if allowed {
            assert_eq!(out, vec![Value::Int(0)], "{queue}");
        } else {
            assert_eq!(out[0], Value::from("PermissionDenied"), "{queue}: {out:?}");
            assert!(
                matches!(&out[1], Value::String(m) if m.contains("queue.info") && m.contains(queue)),
                "{out:?}"
            );
        }
    }
}
