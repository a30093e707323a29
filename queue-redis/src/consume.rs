//! Consuming: one consumer of the queue's group per subscription, reading with
//! `XREADGROUP` on a connection of its own.
//!
//! A task reads. It first takes room under the prefetch (a semaphore of `prefetch`
//! permits; each delivery holds one until it is settled), then asks Redis for at
//! most that many new entries, blocking up to [`BLOCK`]. So the group never has more
//! than `prefetch` entries pending for this consumer.
//!
//! - ack: `XACK` + `XDEL` in one script;
//! - release (and dropping a delivery unsettled): the entry is removed and a copy with
//!   the same fields appended (the scripts module says why), so any consumer can get
//!   it; it goes to the back of the queue;
//! - cancel: the reader is stopped (`CLIENT UNBLOCK` ends its wait), then every entry
//!   still pending for this consumer goes back the same way and the consumer leaves
//!   the group; settling one of its deliveries afterwards is `INVALID`.
//!
//! Losing the connection loses no entry: the group keeps what it delivered to this
//! consumer. After a reconnect (and after a settlement failed) the reader looks at
//! its own pending list and delivers again what no delivery holds, such as entries
//! whose `XREADGROUP` reply was lost. A consumer whose process died is found by the
//! others: its lease key expires, and they return what it held.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use queue_core::{Acker, Delivery, Error, Result, Subscription};
use redis::aio::ConnectionManager;
use redis::{RedisResult, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::connection::{Link, connection_is_lost, is_permanent};
use crate::error::redis_code;
use crate::mapping::{self, Entry};
use crate::{GROUP, Keys, scripts};

/// The longest a read waits for new entries before the reader looks around (stop,
/// lease) and asks again.
pub(crate) const BLOCK: Duration = Duration::from_secs(2);

/// How many pending entries one look at the consumer's own pending list covers.
const RESCAN_PAGE: usize = 1000;

/// The most entries one read asks for: its permits are taken before it and held until
/// it replies, and with a prefetch of millions (the Rust API takes any) the reader
/// gathered every one of them into memory first.
const READ_PAGE: usize = 1000;

/// The release script's code for an entry it cannot copy back.
const TOO_WIDE: &str = "TOO_WIDE";
/// The release script's code for a copy Redis refuses for now.
const COPY_REFUSED: &str = "COPY_REFUSED";

/// What a subscription, its reader task and the ackers of its deliveries share.
pub(crate) struct Shared {
    link: Arc<Link>,
    queue: String,
    keys: Keys,
    /// The queue's `max_length` as declared, to declare it again with.
    max_length: Option<u64>,
    consumer: String,
    lease_key: String,
    permits: Arc<Semaphore>,
    /// Stream ids of deliveries handed out and not settled yet.
    held: Mutex<HashSet<String>>,
    /// The pending list may hold entries no delivery holds: look again.
    rescan: AtomicBool,
    /// Where the next look goes on: after the last id of a full page it read, so that
    /// a pending list longer than a page is read page by page, never the first one
    /// again and again (`None`: from the start).
    rescan_from: Mutex<Option<String>>,
    stop: watch::Sender<bool>,
    /// Set when cancel (or close, or a drop) starts: settling is an error from then on.
    detached: AtomicBool,
    /// `CLIENT ID` of the reader's connection (0 before it is known).
    reader_id: AtomicI64,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// The consumer has left the group.
    done: AtomicBool,
    /// How many renewals found the lease gone (run out while Redis stalled, or
    /// deleted): what the consumer held then may be another consumer's now.
    lapses: AtomicU64,
}

impl Shared {
    fn held(&self) -> MutexGuard<'_, HashSet<String>> {
        // Inserts and removes cannot leave the set half-written.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Something may be pending that no delivery holds: the next read looks through
    /// the pending list from its start (a look already under way may have passed it).
    fn look_again(&self) {
        *self.rescan_from() = None;
        self.rescan.store(true, Ordering::Release);
    }

    fn rescan_from(&self) -> MutexGuard<'_, Option<String>> {
        self.rescan_from.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops the reader, returns everything this consumer holds to the queue, and
    /// removes the consumer from the group. Idempotent.
    pub(crate) async fn shutdown(&self) -> Result<()> {
        let mut task = self.task.lock().await;
        self.detached.store(true, Ordering::Release);
        self.stop.send_replace(true);
        if let Some(mut handle) = task.take() {
            // The reader may be blocked in XREADGROUP: unblock it rather than waiting
            // out the block, and retry in case the read was not blocked yet.
            let deadline = Instant::now() + BLOCK + Duration::from_secs(3);
            loop {
                let id = self.reader_id.load(Ordering::Acquire);
                if id > 0 {
                    // Within the same deadline: on a Redis that hangs it never answers.
                    let unblock = self.link.run("unblock a reader", |mut c| async move {
                        redis::cmd("CLIENT")
                            .arg("UNBLOCK")
                            .arg(id)
                            .query_async::<Value>(&mut c)
                            .await
                    });
                    let _ = tokio::time::timeout_at(deadline.into(), unblock).await;
                }
                tokio::select! {
                    _ = &mut handle => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                if Instant::now() > deadline {
                    // A read may still land in this consumer's pending list; with its
                    // lease gone, the other consumers return it.
                    handle.abort();
                    let _ = handle.await;
                    break;
                }
            }
        }
        if self.done.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let what = format!("cancel a consumer of {}", self.queue);
        let (stream, consumer, lease_key) = (&self.keys.stream, &self.consumer, &self.lease_key);
        // A page at a time: one script returning thousands of large entries stalled
        // Redis for every other client meanwhile, long enough for live consumers'
        // leases to run out and their messages to be handed out twice (review). The
        // first page deletes the lease: a cancel cut short leaves the rest to a live
        // consumer's reap.
        let limit = self.link.config().publish_timeout;
        let (mut returned, mut after) = (0i64, "-".to_string());
        loop {
            let from = after.as_str();
            let page = self.link.run_idempotent(&what, |mut c| async move {
                let mut invocation = scripts::DETACH.key(stream);
                invocation
                    .arg(GROUP)
                    .arg(consumer)
                    .arg(lease_key)
                    .arg(from)
                    .arg(scripts::DETACH_PAGE);
                invocation.invoke_async(&mut c).await
            });
            // Its tries stop at `publish_timeout`, but one try can wait for the redis
            // crate's reconnects to a server that drops every attempt: each page is
            // bounded as a whole.
            let (back, next): (i64, String) = tokio::time::timeout(limit, page)
                .await
                .unwrap_or_else(|_| {
                    Err(queue_core::Error::internal(format!(
                        "{what}: Redis did not answer within publish_timeout {limit:?}"
                    )))
                })
                .map_err(|e| {
                    e.context(
                        "what it still held goes back once a live consumer finds it has no lease, or its lease runs out (consumer_timeout)",
                    )
                })?;
            returned += back;
            if next.is_empty() {
                break;
            }
            after = next;
        }
        tracing::debug!(queue = %self.queue, consumer = %self.consumer, returned, "redis: consumer left");
        Ok(())
    }
}

/// A running consumer of one queue.
pub(crate) struct RedisSubscription {
    deliveries: mpsc::UnboundedReceiver<Result<Delivery>>,
    shared: Arc<Shared>,
}

impl RedisSubscription {
    /// Joins the group as a new consumer (so consume reports a missing queue) and
    /// starts the reader.
    pub async fn start(
        link: Arc<Link>,
        queue: String,
        keys: Keys,
        max_length: Option<u64>,
        prefetch: u32,
    ) -> Result<Self> {
        let consumer = format!("c-{}", queue_core::new_message_id());
        let lease_key = format!("{}{consumer}", keys.lease_prefix);
        let lease = link.config().consumer_timeout;
        let what = format!("consume {queue}");
        {
            let (stream, consumer, lease_key) = (&keys.stream, &consumer, &lease_key);
            let _: i64 = link
                .run_idempotent(&what, |mut c| async move {
                    let mut invocation = scripts::ATTACH.key(stream);
                    invocation
                        .arg(GROUP)
                        .arg(consumer)
                        .arg(lease_key)
                        .arg(millis(lease));
                    invocation.invoke_async(&mut c).await
                })
                .await?;
        }
        link.attached();
        let reader = link.reader(BLOCK)?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            link,
            queue,
            keys,
            max_length,
            consumer,
            lease_key,
            permits: Arc::new(Semaphore::new(prefetch.max(1) as usize)),
            held: Mutex::new(HashSet::new()),
            rescan: AtomicBool::new(false),
            rescan_from: Mutex::new(None),
            stop,
            detached: AtomicBool::new(false),
            reader_id: AtomicI64::new(0),
            task: tokio::sync::Mutex::new(None),
            done: AtomicBool::new(false),
            lapses: AtomicU64::new(0),
        });
        let (out, deliveries) = mpsc::unbounded_channel();
        // On the driver's runtime, as every task it starts (src/connection.rs).
        let handle = shared
            .link
            .tasks()
            .spawn(read_loop(Arc::clone(&shared), reader, out));
        *shared.task.lock().await = Some(handle);
        Ok(RedisSubscription { deliveries, shared })
    }

    /// What the driver keeps to stop it on close.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

#[async_trait]
impl Subscription for RedisSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        let next = self.deliveries.recv().await?;
        if self.shared.is_stopping() {
            // Closed (the subscription or its driver): what it had read ahead went back
            // to the queue with the shutdown, and handed out now it would run twice.
            return None;
        }
        Some(next)
    }

    async fn cancel(self: Box<Self>) -> Result<()> {
        self.shared.shutdown().await
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        if self.shared.done.load(Ordering::Acquire) {
            return;
        }
        // Before the buffered deliveries drop: the shutdown returns them.
        self.shared.detached.store(true, Ordering::Release);
        self.shared.stop.send_replace(true);
        // On the driver's runtime: a consumer dropped on a Lua worker that is ending
        // would have its shutdown cancelled with the worker.
        {
            let shared = Arc::clone(&self.shared);
            self.shared.link.tasks().spawn(async move {
                if let Err(err) = shared.shutdown().await {
                    tracing::warn!(queue = %shared.queue, error = %err, "redis: a dropped consumer could not return its messages");
                }
            });
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

async fn read_loop(
    shared: Arc<Shared>,
    mut reader: ConnectionManager,
    out: mpsc::UnboundedSender<Result<Delivery>>,
) {
    let link = Arc::clone(&shared.link);
    let lease = link.config().consumer_timeout;
    let mut stop = shared.stop.subscribe();
    let mut failures = 0u32;
    let mut fresh = true;
    let mut told = false;
    let mut renewed = Instant::now();
    let mut reaped: Option<Instant> = None;
    // When the queue was last declared again after Redis lost it.
    let mut redeclared: Option<Instant> = None;
    loop {
        if shared.is_stopping() || out.is_closed() || link.is_closed() {
            break;
        }
        // Tried again at once when it fails: a renewal that got no reply in time
        // replaced the connection, and the next read could take 7 s more.
        if renewed.elapsed() >= lease / 4
            && (renew(&shared, lease).await || renew(&shared, lease).await)
        {
            renewed = Instant::now();
        }
        if reaped.is_none_or(|at| at.elapsed() >= lease / 2) {
            reap(&shared).await;
            reaped = Some(Instant::now());
        }
        // Room under the prefetch first; wake up meanwhile to renew the lease.
        let first = tokio::select! {
            permit = Arc::clone(&shared.permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = tokio::time::sleep(lease / 4) => continue,
            _ = stop.changed() => continue,
        };
        let mut permits = vec![first];
        while permits.len() < READ_PAGE
            && let Ok(permit) = Arc::clone(&shared.permits).try_acquire_owned()
        {
            permits.push(permit);
        }
        match step(&shared, &mut reader, &mut fresh, permits.len()).await {
            Ok(entries) => {
                if failures > 0 {
                    link.attached();
                    tracing::info!(queue = %shared.queue, "redis: consumer re-attached");
                    failures = 0;
                    told = false;
                }
                if entries.len() > permits.len() {
                    shared.look_again();
                }
                for entry in entries {
                    if shared.is_stopping() {
                        // Still pending for this consumer: the shutdown returns it.
                        break;
                    }
                    let Some(permit) = permits.pop() else { break };
                    deliver(&shared, &out, entry, permit);
                }
            }
            Err(err) => {
                drop(permits);
                failures += 1;
                fresh = true;
                shared.look_again();
                if connection_is_lost(&err) {
                    // No reply past its block and a connect's time, or a refused login:
                    // the reader's connection is replaced as the shared one is.
                    match link.reader(BLOCK) {
                        Ok(fresh_reader) => reader = fresh_reader,
                        Err(e) => {
                            tracing::warn!(queue = %shared.queue, error = %e, "redis: no new reader connection")
                        }
                    }
                }
                // At most a quarter of the lease: the lease is renewed at the top of the
                // loop, and a reader whose reconnects alone fail (maxclients) while the
                // shared connection works must not let it run out, or the other
                // consumers hand out what its handlers still hold.
                let wait = link.backoff(failures).min(lease / 4);
                tracing::warn!(queue = %shared.queue, error = %err, ?wait, "redis: reading failed; retrying");
                // At once the first time; a stream that keeps going (evicted under
                // `maxmemory`) is declared again after the usual wait.
                let recently = redeclared.is_some_and(|at: Instant| at.elapsed() < lease / 4);
                if !shared.is_stopping() && matches!(err.code(), Some("NOGROUP" | "UNBLOCKED")) {
                    // Redis lost the stream or its group (a FLUSHALL, a restart without
                    // persistence, a DEL; `UNBLOCKED` when it went during the read):
                    // the queue is declared again, and the next read goes on; what it
                    // held is gone.
                    let what = format!("declare {} again", shared.queue);
                    match shared.keys.declare(&link, shared.max_length, &what).await {
                        Ok(_) => {
                            tracing::warn!(queue = %shared.queue, "redis: the queue's stream or group was gone (FLUSHALL, a restart without persistence, or DEL): declared it again; what it held is lost");
                            redeclared = Some(Instant::now());
                            // Its lease went with the rest: without one, another
                            // consumer would take it for dead.
                            if renew(&shared, lease).await {
                                renewed = Instant::now();
                            }
                            if !recently {
                                continue;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(queue = %shared.queue, error = %e, "redis: the queue's stream or group is gone and declaring it again failed")
                        }
                    }
                }
                if is_permanent(&err) && !told {
                    // e.g. the stream or group cannot be declared again: tell the
                    // consumer, keep trying.
                    told = true;
                    let what = format!("consume {}", shared.queue);
                    let _ = out.send(Err(crate::error::from_redis(what, err)));
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// One read: the consumer's own pending entries when it must look again, else new
/// entries (at most `count`).
async fn step(
    shared: &Shared,
    reader: &mut ConnectionManager,
    fresh: &mut bool,
    count: usize,
) -> RedisResult<Vec<Entry>> {
    if *fresh {
        let id: i64 = redis::cmd("CLIENT").arg("ID").query_async(reader).await?;
        shared.reader_id.store(id, Ordering::Release);
        *fresh = false;
    }
    if shared.rescan.swap(false, Ordering::AcqRel) {
        let found = rescan(shared, reader, count).await;
        if found.is_err() {
            shared.look_again();
        }
        return found;
    }
    let reply: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(&shared.consumer)
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(millis(BLOCK))
        .arg("STREAMS")
        .arg(&shared.keys.stream)
        .arg(">")
        .query_async(reader)
        .await?;
    Ok(mapping::read_reply(&reply).0)
}

/// Entries pending for this consumer that no delivery holds (a read whose reply was
/// lost, a settlement that failed), claimed again (at most `count`).
async fn rescan(
    shared: &Shared,
    reader: &mut ConnectionManager,
    count: usize,
) -> RedisResult<Vec<Entry>> {
    let from = shared.rescan_from().take();
    let start = from
        .as_ref()
        .map_or_else(|| "-".to_string(), |id| format!("({id}"));
    let pending: Value = redis::cmd("XPENDING")
        .arg(&shared.keys.stream)
        .arg(GROUP)
        .arg(&start)
        .arg("+")
        .arg(RESCAN_PAGE)
        .arg(&shared.consumer)
        .query_async(reader)
        .await?;
    // Each pending entry's id and how many times it was delivered so far.
    let counted: Vec<(String, u64)> = match &pending {
        Value::Array(items) => items
            .iter()
            .filter_map(|item| match item {
                Value::Array(parts) => {
                    let id = parts.first().and_then(mapping::text_of)?;
                    let count = match parts.get(3) {
                        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
                        _ => 0,
                    };
                    Some((id, count))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let ids: Vec<String> = counted.iter().map(|(id, _)| id.clone()).collect();
    let lost: Vec<String> = {
        let held = shared.held();
        ids.iter()
            .filter(|id| !held.contains(*id))
            .cloned()
            .collect()
    };
    if lost.len() > count {
        // More than there is room for: the rest at the next look, on this page again.
        *shared.rescan_from() = from;
        shared.rescan.store(true, Ordering::Release);
    } else if ids.len() >= RESCAN_PAGE {
        // A full page, all of it held or claimed now: the next look reads the next
        // page (before, it read this one again, for ever, while these were held).
        *shared.rescan_from() = ids.last().cloned();
        shared.rescan.store(true, Ordering::Release);
    }
    if lost.is_empty() {
        return Ok(Vec::new());
    }
    let take = &lost[..lost.len().min(count)];
    let reply: Value = redis::cmd("XCLAIM")
        .arg(&shared.keys.stream)
        .arg(GROUP)
        .arg(&shared.consumer)
        .arg(0)
        .arg(take)
        .query_async(reader)
        .await?;
    let (mut entries, gone) = mapping::entries(&reply);
    // The claim counted one more delivery of each.
    for entry in &mut entries {
        if let Some((_, count)) = counted.iter().find(|(id, _)| *id == entry.stream_id) {
            entry.deliveries = count + 1;
        }
    }
    if !gone.is_empty() {
        let _: i64 = redis::cmd("XACK")
            .arg(&shared.keys.stream)
            .arg(GROUP)
            .arg(&gone)
            .query_async(reader)
            .await?;
    }
    if !entries.is_empty() {
        tracing::info!(queue = %shared.queue, count = entries.len(), "redis: delivering again what this consumer held unsettled");
    }
    Ok(entries)
}

fn deliver(
    shared: &Arc<Shared>,
    out: &mpsc::UnboundedSender<Result<Delivery>>,
    entry: Entry,
    permit: OwnedSemaphorePermit,
) {
    shared.held().insert(entry.stream_id.clone());
    let acker = StreamAcker {
        shared: Arc::clone(shared),
        lapses: shared.lapses.load(Ordering::Acquire),
        stream_id: entry.stream_id,
        deliveries: entry.deliveries,
        message_id: entry.message.id.clone(),
        _permit: permit,
    };
    // A closed channel drops the delivery, whose drop returns it.
    let _ = out.send(Ok(Delivery::new(entry.message, Box::new(acker))));
}

/// Renews the consumer's lease; `false` when Redis could not be reached. A lease it
/// finds gone (it ran out while Redis stalled, or was deleted) is counted: another
/// consumer may have taken back what this one holds, and its deliveries say they are
/// lost, so that a failed handler's message is not retried by both (review: one
/// message ran four times and was dead-lettered twice).
async fn renew(shared: &Shared, lease: Duration) -> bool {
    let key = shared.lease_key.clone();
    let renewed: Result<Option<String>> = shared
        .link
        .run("renew a consumer lease", |mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(millis(lease))
                .arg("GET")
                .query_async(&mut c)
                .await
        })
        .await;
    match renewed {
        Ok(Some(_)) => true,
        Ok(None) => {
            shared.lapses.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(queue = %shared.queue, "redis: the consumer's lease was gone when it was renewed (Redis stalled past consumer_timeout, or the key was deleted): another consumer may run what it holds too; those deliveries are settled as lost");
            true
        }
        Err(_) => false,
    }
}

/// Returns what dead consumers of the queue held (their leases ran out).
async fn reap(shared: &Shared) {
    let (stream, prefix) = (&shared.keys.stream, &shared.keys.lease_prefix);
    // A page at a time, as a cancel returns a holding (`scripts::DETACH`).
    let reaped: Result<i64> = async {
        let (mut returned, mut consumer, mut after) = (0, String::new(), "-".to_string());
        loop {
            let (name, from) = (consumer.as_str(), after.as_str());
            let (back, next, at): (i64, String, String) = shared
                .link
                .run(
                    "return the messages of dead consumers",
                    |mut c| async move {
                        let mut invocation = scripts::REAP.key(stream);
                        invocation
                            .arg(GROUP)
                            .arg(prefix)
                            .arg(name)
                            .arg(from)
                            .arg(scripts::DETACH_PAGE);
                        invocation.invoke_async(&mut c).await
                    },
                )
                .await?;
            returned += back;
            if next.is_empty() {
                return Ok(returned);
            }
            (consumer, after) = (next, at);
        }
    }
    .await;
    match reaped {
        Ok(n) if n > 0 => {
            tracing::warn!(queue = %shared.queue, returned = n, "redis: returned the messages of consumers whose lease ran out")
        }
        Ok(_) => {}
        Err(err) => {
            tracing::debug!(queue = %shared.queue, error = %err, "redis: looking for dead consumers failed")
        }
    }
}

/// Settles one delivery through the shared connection.
struct StreamAcker {
    shared: Arc<Shared>,
    /// The lease's lapses when it was delivered: one after makes it lost.
    lapses: u64,
    stream_id: String,
    /// Which delivery of the entry this is (see [`mapping::Entry::deliveries`]).
    deliveries: u64,
    message_id: String,
    /// Room under the prefetch, given back when the delivery is settled.
    _permit: OwnedSemaphorePermit,
}

impl StreamAcker {
    /// [`Self::settle`] as a task of the driver's runtime, awaited: a caller that gives
    /// up on it (a time limit, a `select!`) does not cut it short. Run in the caller's
    /// future, a settlement dropped before Redis replied left the entry pending for
    /// this live consumer, delivered to nobody until the consumer was cancelled, and
    /// out of its holding's count (review).
    async fn settle_to_the_end(self: Box<Self>, ack: bool) -> Result<()> {
        let tasks = self.shared.link.tasks().clone();
        let (queue, message) = (self.shared.queue.clone(), self.message_id.clone());
        tasks.spawn(self.settle(ack)).await.unwrap_or_else(|e| {
            Err(Error::internal(format!(
                "settling message {message} of {queue}: the task ended without an outcome ({e})"
            )))
        })
    }

    async fn settle(self, ack: bool) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        if shared.detached.load(Ordering::Acquire) {
            return Err(Error::invalid(format!(
                "message {}: its consumer was cancelled and the delivery went back to the queue",
                self.message_id
            )));
        }
        let what = format!(
            "{} message {} of {}",
            if ack { "ack" } else { "release" },
            self.message_id,
            shared.queue
        );
        let (stream, consumer, id, deliveries) = (
            shared.keys.stream.clone(),
            shared.consumer.clone(),
            self.stream_id.clone(),
            self.deliveries,
        );
        let settling = shared.link.run(&what, |mut c| async move {
            if ack {
                let mut invocation = scripts::ACK.key(&stream);
                invocation
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg(&id)
                    .arg(deliveries);
                invocation.invoke_async::<i64>(&mut c).await
            } else {
                let mut invocation = scripts::RELEASE.key(&stream);
                invocation
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg(&id)
                    .arg(deliveries);
                invocation.invoke_async::<i64>(&mut c).await
            }
        });
        // Past the limit the next commands go on a new connection, as after a publish
        // (each ack and release failed on a connection lost without a word, their
        // messages delivered again and again).
        let result = shared.link.within_limit(settling).await.unwrap_or_else(|| {
            Err(Error::internal(format!(
                "{what}: Redis did not reply within {:?}",
                shared.link.config().publish_timeout
            )))
        });
        shared.held().remove(&self.stream_id);
        match result {
            Ok(1) => Ok(()),
            // Redis answers 0 both for an entry whose lease ran out and for one whose
            // stream or group is gone: only the first comes again (review).
            Ok(_) => Err(Error::internal(format!(
                "{what}: this consumer no longer holds it: its lease ran out and it went back to the queue, to be delivered again, or its stream was lost on Redis with it"
            ))
            .retryable_if(false)),
            // An entry too wide to copy back stays pending for this consumer, for an
            // operator (docs/drivers/redis.md): looked for again, it came straight back
            // to a handler, and failed to go back, again and again.
            // Told by the reply's code: the text holds the message id, which may read
            // like anything (an id that read like this reply left a message whose ack
            // merely timed out pending, never looked for again).
            Err(err) if redis_code(&err) == Some(TOO_WIDE) => Err(err),
            // Redis refuses writes for now (out of memory, read-only). Looked for at
            // once, the message went straight back to a handler whose release was
            // refused again, in a loop for as long as the refusal lasted: it is looked
            // for after the longest reconnect wait.
            Err(err) if redis_code(&err) == Some(COPY_REFUSED) => {
                let wait = shared.link.config().reconnect_max_delay;
                let later = Arc::clone(&shared);
                shared.link.tasks().spawn(async move {
                    tokio::time::sleep(wait).await;
                    later.look_again();
                });
                Err(err.context(format!(
                    "the message will be delivered again in {wait:?}"
                )))
            }
            Err(err) => {
                // Still pending for this consumer, unless Redis did it and only the
                // reply was lost (a late reply runs all the same), or its stream is
                // gone: the reader looks and delivers it again if it is there.
                shared.look_again();
                Err(err.context(
                    "the message is delivered again if Redis still holds it (not if the settlement ran and only its reply was lost, nor if its stream was lost)",
                ))
            }
        }
    }
}

#[async_trait]
impl Acker for StreamAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle_to_the_end(true).await
    }

    async fn release(self: Box<Self>) -> Result<()> {
        self.settle_to_the_end(false).await
    }

    fn is_lost(&self) -> bool {
        self.shared.lapses.load(Ordering::Acquire) > self.lapses
    }

    fn release_on_drop(self: Box<Self>) {
        if self.shared.detached.load(Ordering::Acquire) {
            return; // the cancel returns it
        }
        // On the driver's runtime, not the one that dropped it (a Lua worker's).
        let tasks = self.shared.link.tasks().clone();
        tasks.spawn(async move {
            let queue = self.shared.queue.clone();
            if let Err(err) = self.settle(false).await {
                tracing::debug!(%queue, error = %err, "redis: releasing a dropped delivery failed");
            }
        });
    }
}
