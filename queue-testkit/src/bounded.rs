//! Bounds for tests whose regression would block or spin a thread, where no timer
//! on that thread could fire: the work runs on a thread of its own, and the test
//! fails after a limit instead of hanging the test run.

use std::future::Future;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// What `work` returns, run on a thread of its own, or a failure after `limit` that
/// says what was expected of it (`promise`). A panic in `work` fails the test as it
/// is.
///
/// ```
/// use std::time::Duration;
/// let four = queue_testkit::finishes_within(Duration::from_secs(5), "adding returns", || 2 + 2);
/// assert_eq!(four, 4);
/// ```
pub fn finishes_within<T: Send + 'static>(
    limit: Duration,
    promise: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(work());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it ends"),
        },
        Err(RecvTimeoutError::Timeout) => panic!("not within {limit:?}: {promise}"),
    }
}

/// [`finishes_within`] for an async test that need not be `Send` (one Lua state, say):
/// `test` runs on a current-thread tokio runtime on the thread of its own.
pub fn async_finishes_within<F: Future<Output = ()> + 'static>(
    limit: Duration,
    promise: &str,
    test: fn() -> F,
) {
    finishes_within(limit, promise, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(test())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "not within 50ms: it returns")]
    fn work_past_its_limit_fails_the_test() {
        finishes_within(Duration::from_millis(50), "it returns", || {
            std::thread::sleep(Duration::from_secs(5))
        });
    }

    #[test]
    #[should_panic(expected = "the work's own panic")]
    fn a_panic_in_the_work_fails_the_test_as_it_is() {
        finishes_within(Duration::from_secs(5), "it returns", || {
            panic!("the work's own panic")
        });
    }
}
