//! Deadlines from waits a caller may set as long as it likes.

use std::time::Duration;

use tokio::time::Instant;

/// Stands for "never" where a wait reaches past what the clock can count: a century.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The instant `wait` from now. A wait past what the clock can count (`Duration::MAX`
/// is how Rust writes "wait for ever") gives an instant a century away, where adding
/// it to now would panic.
///
/// ```
/// use std::time::Duration;
/// let soon = queue_core::deadline_after(Duration::from_secs(5));
/// let never = queue_core::deadline_after(Duration::MAX);
/// assert!(soon < never);
/// ```
pub fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait).unwrap_or_else(|| now + NEVER)
}
