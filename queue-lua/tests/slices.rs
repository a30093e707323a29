//! Time slices and handler timeouts (docs/consumers.md, "Handler time limits"): a
//! handler that computes without end lets the others on its Lua state run and ends at
//! its timeout, whether it computes, catches errors, or waits for a publish.

mod support;

use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use queue_core::security::SecurityContext;
use queue_core::{Headers, Value};
use queue_lua::{DeliveryContext, Outcome};
use support::{Harness, Recorder, json_message, lua_file};

async fn run(h: &Harness, method: &str, timeout: Option<Duration>) -> Outcome {
    run_settled_by(h, method, Rc::new(Recorder::default()), timeout).await
}

/// [`run`], its settlements going to `settle`.
async fn run_settled_by(
    h: &Harness,
    method: &str,
    settle: Rc<Recorder>,
    timeout: Option<Duration>,
) -> Outcome {
    let handler = h
        .host
        .handler(&lua_file("sandbox/slices.lua"), method)
        .unwrap();
    let message = json_message(Value::from("x"), Headers::new());
    let context = DeliveryContext {
        message: std::sync::Arc::new(message),
        settle,
    };
    h.host
        .run_handler_within(
            &handler,
            h.host.payload(&Value::from("x")).unwrap(),
            context,
            SecurityContext::default(),
            timeout,
        )
        .await
}

/// Runs a test on a thread of its own: a regression that leaves a handler spinning
/// fails it after a minute instead of hanging the test run.
fn stops<F: Future<Output = ()> + 'static>(test: fn() -> F) {
    let promise = "every spinning handler was stopped";
    queue_testkit::async_finishes_within(Duration::from_secs(60), promise, test)
}

fn timed_out(outcome: &Outcome, limit: &str) {
    match outcome {
        Outcome::Nack { reason, retryable } => {
            assert!(
                reason.contains(&format!("ran longer than its timeout of {limit}")),
                "{reason}"
            );
            assert!(retryable, "a timeout is worth another attempt: {reason}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn an_endless_loop_ends_at_its_timeout() {
    stops(|| async {
        let h = Harness::new().await;
        let started = Instant::now();
        let outcome = run(&h, "spin", Some(Duration::from_millis(200))).await;
        timed_out(&outcome, "200ms");
        assert!(started.elapsed() < Duration::from_secs(10));
        // The state goes on.
        assert_eq!(run(&h, "quick", None).await, Outcome::Ack);
    });
}

#[test]
fn catching_errors_or_closing_does_not_escape_the_timeout() {
    stops(|| async {
        let h = Harness::new().await;
        for method in [
            "spin_catching",
            "spin_xpcall",
            "spin_resuming",
            "spin_closing",
            "spin_in_sort",
            "close_dead_spinner",
            "spin_loading",
            "spin_in_closed_coroutines",
        ] {
            let outcome = run(&h, method, Some(Duration::from_millis(200))).await;
            timed_out(&outcome, "200ms");
        }
        assert_eq!(run(&h, "quick", None).await, Outcome::Ack);
    });
}

#[test]
fn a_handler_waiting_for_a_publish_ends_at_its_timeout() {
    stops(|| async {
        let h = Harness::new().await;
        h.driver.hold_publishes();
        let outcome = run(&h, "wait_for_publish", Some(Duration::from_millis(300))).await;
        timed_out(&outcome, "300ms");
        assert_eq!(
            h.driver.held(),
            1,
            "the publish was waiting when time ran out"
        );
    });
}

/// A publish a handler waited in when its time ran out is dropped with the handler,
/// at once: it held its driver's resources (an AMQP 0-9-1 confirm window's slot, the
/// encoded body) until Lua's collector happened to free the coroutine's stack, which
/// in a quiet state could be never, and enough of them stalled every publish of the
/// driver. The same for a publish in a coroutine the handler made.
#[test]
fn a_publish_waiting_at_the_timeout_is_dropped_with_its_handler() {
    stops(|| async {
        let h = Harness::new().await;
        h.driver.hold_publishes();
        for (n, method) in ["wait_for_publish", "wait_for_publish_in_a_coroutine"]
            .into_iter()
            .enumerate()
        {
            let outcome = run(&h, method, Some(Duration::from_millis(300))).await;
            timed_out(&outcome, "300ms");
            assert_eq!(h.driver.held(), n + 1, "{method}: the publish was waiting");
            assert_eq!(
                h.driver.abandoned(),
                n + 1,
                "{method}: the publish still waits after its handler timed out"
            );
        }
    });
}

/// A handler stopped at its timeout still gets its `__close` handlers run (under a
/// limit of their own: these loop), whether it was computing or waiting.
#[test]
fn a_stopped_handler_runs_its_close_handlers() {
    stops(|| async {
        let h = Harness::new().await;
        h.driver.hold_publishes();
        for method in ["spin_closing", "wait_closing"] {
            let outcome = run(&h, method, Some(Duration::from_millis(300))).await;
            timed_out(&outcome, "300ms");
            assert_eq!(
                run(&h, "close_ran_before", None).await,
                Outcome::Ack,
                "after {method}"
            );
        }
        assert_eq!(
            h.driver.held(),
            1,
            "wait_closing was waiting for its publish"
        );
    });
}

/// A handler dropped mid-run, as a shutdown drops one still running past its
/// `stop_timeout`, runs its `__close` handlers too.
#[test]
fn a_dropped_handler_runs_its_close_handlers() {
    stops(|| async {
        let h = Harness::new().await;
        h.driver.hold_publishes();
        tokio::select! {
            outcome = run(&h, "wait_closing", None) => {
                panic!("the run ended while its publish was held: {outcome:?}")
            }
            () = h.driver.wait_for_held(1) => {}
        }
        assert_eq!(run(&h, "close_ran_before", None).await, Outcome::Ack);
    });
}

/// Lua closes a stopped coroutine's to-be-closed variables with no error, as if its
/// handler had returned: a `__close` that acks "on success" acked a message whose
/// handler ran past its timeout or was cut by a shutdown, and the message was gone.
/// The delivery is released before the close handlers run: their ack is refused, the
/// run ends as timed out, and the stopped run leaves no context behind.
#[test]
fn a_stopped_handler_cannot_ack_from_its_close_handlers() {
    stops(|| async {
        let h = Harness::new().await;
        h.driver.hold_publishes();
        for method in ["spin_acking_on_close", "wait_acking_on_close"] {
            let settle = Rc::new(Recorder::default());
            let timeout = Some(Duration::from_millis(300));
            let outcome = run_settled_by(&h, method, Rc::clone(&settle), timeout).await;
            timed_out(&outcome, "300ms");
            assert!(
                settle.calls.borrow().is_empty(),
                "{method}: {:?}",
                settle.calls
            );
            assert_eq!(
                run(&h, "close_ack_was_refused", None).await,
                Outcome::Ack,
                "{method}"
            );
        }
        // Dropped mid-run, as a shutdown drops a handler past its stop_timeout.
        let settle = Rc::new(Recorder::default());
        tokio::select! {
            outcome = run_settled_by(&h, "wait_acking_on_close", Rc::clone(&settle), None) => {
                panic!("the run ended while its publish was held: {outcome:?}")
            }
            () = h.driver.wait_for_held(2) => {}
        }
        assert!(settle.calls.borrow().is_empty(), "{:?}", settle.calls);
        assert_eq!(
            h.host.running(),
            0,
            "the dropped run left its context behind"
        );
        assert_eq!(run(&h, "close_ack_was_refused", None).await, Outcome::Ack);
    });
}

/// A handler stopped at its timeout runs its `__close` handlers with no error, as if
/// it had returned: one that publishes "done" there published it at every attempt of
/// a message that was retried each time (review).
#[test]
fn a_stopped_handler_cannot_publish_from_its_close_handlers() {
    stops(|| async {
        let h = Harness::new().await;
        let timeout = Some(Duration::from_millis(300));
        timed_out(&run(&h, "spin_publishing_on_close", timeout).await, "300ms");
        assert_eq!(
            run(&h, "close_publish_was_refused", None).await,
            Outcome::Ack
        );
        let published = h.queues.info("app:tasks").await.unwrap().ready;
        assert_eq!(published, Some(0));
    });
}

/// One Lua state, one thread: while a handler spins, another handler on the same
/// state still runs to its end.
#[test]
fn a_spinning_handler_lets_the_others_on_its_state_run() {
    stops(|| async {
        let h = Harness::new().await;
        let spinner = run(&h, "spin", Some(Duration::from_secs(20)));
        let quick = async {
            let outcome = run(&h, "quick", None).await;
            (outcome, Instant::now())
        };
        let started = Instant::now();
        tokio::pin!(spinner);
        let (quick_outcome, quick_done) = tokio::select! {
            biased;
            _ = &mut spinner => panic!("the spinner ended before the quick handler"),
            done = quick => done,
        };
        assert_eq!(quick_outcome, Outcome::Ack);
        assert!(
            quick_done.duration_since(started) < Duration::from_secs(5),
            "the quick handler waited for the spinner"
        );
    });
}

/// A handler spinning inside a coroutine it created lets the others run too: only
/// the handler's own coroutine yielded at its slice's end, so one nested loop held the
/// whole state (without a timeout, for ever).
#[test]
fn a_spinning_coroutine_of_a_handler_lets_the_others_run() {
    stops(|| async {
        let h = Harness::new().await;
        let spinner = run(&h, "spin_in_own_coroutine", Some(Duration::from_secs(20)));
        let started = Instant::now();
        tokio::pin!(spinner);
        let quick = tokio::select! {
            biased;
            outcome = &mut spinner => panic!("the spinner ended first: {outcome:?}"),
            outcome = run(&h, "quick", None) => outcome,
        };
        assert_eq!(quick, Outcome::Ack);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the quick handler waited for the nested spinner"
        );
    });
}

#[test]
fn a_coroutine_a_handler_creates_keeps_its_resume_semantics() {
    stops(|| async {
        let h = Harness::new().await;
        assert_eq!(run(&h, "own_coroutine", None).await, Outcome::Ack);
        assert_eq!(run(&h, "long_generator", None).await, Outcome::Ack);
        assert_eq!(run(&h, "close_a_long_closer", None).await, Outcome::Ack);
    });
}

/// Handler coroutines are reused once a run returns: a reused one still yields at
/// its slice's end and ends at its timeout.
#[test]
fn a_reused_coroutine_keeps_its_time_limits() {
    stops(|| async {
        let h = Harness::new().await;
        for _ in 0..10 {
            assert_eq!(run(&h, "quick", None).await, Outcome::Ack);
        }
        let outcome = run(&h, "spin", Some(Duration::from_millis(200))).await;
        timed_out(&outcome, "200ms");
        assert_eq!(run(&h, "quick", None).await, Outcome::Ack);
    });
}

/// A handler that keeps its own coroutine cannot use it to reach a later run on
/// the same (reused) coroutine: the sandbox refuses to resume or close it.
#[test]
fn a_kept_handler_coroutine_cannot_be_resumed_or_closed() {
    stops(|| async {
        let h = Harness::new().await;
        assert_eq!(run(&h, "keep_own_coroutine", None).await, Outcome::Ack);
        match run(&h, "resume_kept", None).await {
            Outcome::Nack { reason, .. } => {
                let refusal = "own coroutine cannot be resumed or closed from Lua";
                assert_eq!(reason.matches(refusal).count(), 2, "{reason}");
            }
            other => panic!("expected the refusals as the handler's error, got {other:?}"),
        }
    });
}

/// Loops of the standard library that run in C and allocate nothing: unbounded, they
/// held their thread for ever, past every time limit (no Lua instruction for the hook)
/// and the memory limit. An empty repeat is made at once; the others end at the
/// handler's timeout like any loop.
#[test]
fn library_loops_in_c_end_at_the_timeout() {
    stops(|| async {
        let h = Harness::new().await;
        assert_eq!(run(&h, "rep_of_nothing", None).await, Outcome::Ack);
        for method in [
            "move_forever",
            "move_back_forever",
            "insert_forever",
            "remove_forever",
            "insert_forever_plain",
            "remove_forever_plain",
            "sort_forever_plain",
            "move_forever_from_a_string",
            "concat_forever",
            "sort_forever",
        ] {
            let started = Instant::now();
            let outcome = run(&h, method, Some(Duration::from_millis(200))).await;
            timed_out(&outcome, "200ms");
            assert!(started.elapsed() < Duration::from_secs(10), "{method}");
        }
        assert_eq!(run(&h, "quick", None).await, Outcome::Ack);
    });
}

/// The hook that ends slices and checks the deadline came every 10,000 instructions
/// however long each took: a handler calling `utf8.len` on 100 MB in a loop ran 160 s
/// past its 1 s timeout, and the handlers beside it waited as long (review). It now
/// comes at the next instruction once the slice is over, in the handler's coroutine
/// and in one it resumed.
#[test]
fn slow_instructions_end_at_the_timeout_too() {
    stops(|| async {
        let h = Harness::new().await;
        for method in [
            "slow_instructions_in_the_handler",
            "slow_instructions_in_its_coroutine",
        ] {
            let started = Instant::now();
            let outcome = run(&h, method, Some(Duration::from_millis(200))).await;
            timed_out(&outcome, "200ms");
            assert!(started.elapsed() < Duration::from_secs(10), "{method}");
        }
        assert_eq!(run(&h, "quick", None).await, Outcome::Ack);
    });
}

/// A coroutine that resumed another one waiting in a publish, kept when its run ended
/// at its timeout: another run resuming the outer one must not finish the inner one's
/// call, made with the first run's rights. The outer one's resume of the inner one
/// ignored the refusal, and finished it.
#[test]
fn a_call_kept_in_a_nested_coroutine_is_not_finished_by_another_run() {
    stops(|| async {
        let h = Harness::new().await;
        h.driver.hold_publishes();
        let outcome = run(
            &h,
            "outer_keeps_a_waiting_publish",
            Some(Duration::from_millis(200)),
        )
        .await;
        timed_out(&outcome, "200ms");
        h.driver.wait_for_held(1).await;
        assert!(h.driver.confirm_next());
        assert_eq!(
            run(&h, "finishes_through_the_outer", None).await,
            Outcome::Ack
        );
    });
}
