//! Running a driver's command with the driver's own runtime entered.
//!
//! Client libraries start a connection's (or session's) task on the runtime of
//! whichever call first needs it. The queue runtime calls drivers from its Lua
//! workers too, each a single-threaded runtime of its own: a connection started
//! there waits for that worker's handlers, and ends with the worker. A driver polls
//! such calls with the runtime it was connected on entered, so what they start runs
//! there.

use std::future::Future;

/// Polls `call` with `tasks` entered: whatever it spawns (`tokio::spawn`) or starts
/// lazily runs on `tasks`, not on the runtime of the task that awaits it. Timers it
/// makes are `tasks`' too; they wake the awaiting task wherever it runs.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let tasks = tokio::runtime::Handle::current();
/// let spawned = queue_core::on_runtime(&tasks, async { tokio::spawn(async { 7 }) }).await;
/// assert_eq!(spawned.await.unwrap(), 7);
/// # });
/// ```
pub async fn on_runtime<F: Future>(tasks: &tokio::runtime::Handle, call: F) -> F::Output {
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        let _entered = tasks.enter();
        call.as_mut().poll(cx)
    })
    .await
}
