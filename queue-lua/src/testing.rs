//! Helpers for the crate's unit tests.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// What `work` returns, run on a thread of its own: a regression that blocks or spins
/// there fails the test after `limit` (saying what was expected of it, `promise`)
/// instead of hanging the test run. A panic in `work` fails the test as it is.
pub(crate) fn within<T: Send + 'static>(
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
