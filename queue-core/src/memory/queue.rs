//! One memory queue: priority lanes of ready messages, the in-flight table, and the
//! signals consumers and publishers wait on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Error, Message, QueueInfo, QueueSpec, Result};

/// A ready message and when it expires (from `message_ttl` or its own `expiration`).
/// Shared with its delivery while in flight: the queue keeps it (to put it back on a
/// release or a cancel) without copying its id, headers and body per delivery. A
/// message put back keeps when it expires, as on RabbitMQ.
#[derive(Debug)]
struct Ready {
    message: Arc<Message>,
    priority: u8,
    expires: Option<Instant>,
}

/// A message on its way into the queue: its time to live starts when it enters
/// (docs/drivers/memory.md), not while its publish waits for room or its delay.
struct Incoming {
    message: Arc<Message>,
    priority: u8,
    ttl: Option<Duration>,
}

impl Incoming {
    /// The message as it enters the queue now.
    fn entering(self) -> Ready {
        Ready {
            message: self.message,
            priority: self.priority,
            // The clock is read only for a message that can expire: most cannot.
            expires: self.ttl.map(crate::deadline_after),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// One lane per priority level, highest last; a queue without priorities has one.
    lanes: Vec<VecDeque<Ready>>,
    ready: u64,
    delayed: u64,
    consumers: u64,
    /// Delivery tag -> (subscription id, the message and its priority). Tags are
    /// counted up by the queue, not chosen by input: FxHash instead of SipHash, which
    /// was a visible part of each delivery's cost (docs/performance.md).
    in_flight: rustc_hash::FxHashMap<u64, (u64, Arc<Message>, u8)>,
    /// Delivery tag -> when it expires, for the deliveries that can: a message put
    /// back keeps it. Apart from `in_flight`, so that the many that cannot expire
    /// cost nothing more per delivery.
    in_flight_expiry: rustc_hash::FxHashMap<u64, Instant>,
}

#[derive(Debug)]
pub(super) struct MemQueue {
    spec: QueueSpec,
    max_length: u64,
    state: Mutex<State>,
    /// Signalled when a message becomes ready, or the queue closes. One message wakes
    /// one waiting consumer (`notify_one`): waking them all made every consumer thread
    /// race for each message. Waiters re-check the queue after registering, so a
    /// stored permit or a lost race only costs a spurious loop.
    pub(super) ready_signal: Notify,
    /// Signalled when room frees up under `max_length` (one publisher per freed
    /// slot), or the queue closes.
    space_signal: Notify,
    /// Signalled (every waiter) when the queue closes or goes: for the waits that
    /// neither of the others ends, a consumer held at its prefetch and a delayed
    /// message's timer. Shared with the timers, which hold no strong reference to the
    /// queue.
    closed_signal: Arc<Notify>,
    next_tag: AtomicU64,
    acked: AtomicU64,
    next_subscription: AtomicU64,
    closed: AtomicBool,
}

impl MemQueue {
    pub(super) fn new(spec: QueueSpec, max_length: u64) -> Self {
        let lanes = spec.max_priority.map_or(1, |p| usize::from(p) + 1);
        MemQueue {
            spec,
            max_length,
            state: Mutex::new(State {
                lanes: (0..lanes).map(|_| VecDeque::new()).collect(),
                ..State::default()
            }),
            ready_signal: Notify::new(),
            space_signal: Notify::new(),
            closed_signal: Arc::new(Notify::new()),
            next_tag: AtomicU64::new(1),
            acked: AtomicU64::new(0),
            next_subscription: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn check_same(&self, spec: &QueueSpec) -> Result<()> {
        let same = self.spec.max_priority == spec.max_priority
            && self.spec.message_ttl == spec.message_ttl
            && (spec.max_length.is_none() || spec.max_length == Some(self.max_length));
        if same {
            Ok(())
        } else {
            Err(Error::new(
                crate::ErrorKind::AlreadyExists,
                format!("queue {} is already declared with other options", spec.id),
            ))
        }
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn lane_of(&self, message: &Message) -> Result<u8> {
        let lanes = self.spec.max_priority.map_or(0, |p| p);
        Ok(message.headers.priority_level()?.unwrap_or(0).min(lanes))
    }

    /// When a message entering the queue `delay` from now expires: its time to live
    /// counts from when it enters, as RabbitMQ counts a queue's `message_ttl` from when
    /// a delayed message reaches it. Counted from the publish, a retry copy delayed
    /// past the queue's `message_ttl` was dropped, confirmed, with its original acked.
    fn ttl_of(&self, message: &Message) -> Result<Option<Duration>> {
        let own = message.headers.ttl()?;
        Ok(match (own, self.spec.message_ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// Reads what a message's headers ask of this queue (lane, time to live, delay); a
    /// header that does not parse refuses the message before anything is queued.
    fn prepare(&self, message: Message) -> Result<(Incoming, Option<Duration>)> {
        let priority = self.lane_of(&message)?;
        let delay = message.headers.delay()?.filter(|d| !d.is_zero());
        let ttl = self.ttl_of(&message)?;
        Ok((
            Incoming {
                message: Arc::new(message),
                priority,
                ttl,
            },
            delay,
        ))
    }

    /// Adds a message at the back of its lane, waiting up to `timeout` for room.
    pub(super) async fn publish(
        self: &Arc<Self>,
        message: Message,
        timeout: Duration,
    ) -> Result<()> {
        let (incoming, delay) = self.prepare(message)?;
        match delay {
            Some(delay) => self.publish_later(incoming, delay, timeout).await,
            None => self.publish_now(incoming, timeout).await,
        }
    }

    /// Adds several messages in order under one lock while there is room (the rest
    /// wait for room like single publishes), then wakes the waiting consumers once.
    /// Every message is checked before any is queued. An error says how many were
    /// queued before it ([`Error::in_batch`]).
    pub(super) async fn publish_batch(
        self: &Arc<Self>,
        messages: Vec<Message>,
        timeout: Duration,
    ) -> Result<()> {
        let total = messages.len();
        let prepared = messages
            .into_iter()
            .map(|m| self.prepare(m))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.in_batch(0, total))?;
        self.refuse_if_closed().map_err(|e| e.in_batch(0, total))?;
        let mut rest = prepared.into_iter().peekable();
        let mut queued = 0;
        {
            let mut state = self.lock();
            while self.make_room(&mut state) {
                match rest.next_if(|(_, delay)| delay.is_none()) {
                    Some((incoming, _)) => {
                        Self::push(&mut state, incoming.entering(), false);
                        queued += 1;
                    }
                    None => break,
                }
            }
        }
        if queued > 0 {
            self.ready_signal.notify_waiters();
        }
        for (incoming, delay) in rest {
            let published = match delay {
                Some(delay) => self.publish_later(incoming, delay, timeout).await,
                None => self.publish_now(incoming, timeout).await,
            };
            published.map_err(|e| e.in_batch(queued, total))?;
            queued += 1;
        }
        Ok(())
    }

    fn refuse_if_closed(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::new(
                crate::ErrorKind::Canceled,
                "the memory driver is closed",
            ));
        }
        Ok(())
    }

    /// Whether a message may come in: the ready and the delayed together stay under
    /// `max_length`. Delayed ones count as they will be ready: before, any `delay`
    /// header got past a full queue, without bound.
    fn has_room(&self, state: &State) -> bool {
        state.ready + state.delayed < self.max_length
    }

    /// [`Self::has_room`], once the expired messages at the head of each lane are
    /// dropped: they took room under `max_length` until a consumer's take dropped
    /// them, so a full queue of expired messages refused publishes with nobody
    /// consuming. Wakes the publishers waiting for the room they leave.
    fn make_room(&self, state: &mut State) -> bool {
        if self.has_room(state) {
            return true;
        }
        if Self::drop_expired_heads(&self.spec, state) == 0 {
            return false;
        }
        self.space_signal.notify_waiters();
        self.has_room(state)
    }

    /// Drops the expired messages at the head of each lane, as RabbitMQ drops them at
    /// the head of its queue; returns how many.
    fn drop_expired_heads(spec: &QueueSpec, state: &mut State) -> usize {
        let mut now = None;
        let mut expired = 0;
        for lane in 0..state.lanes.len() {
            expired += Self::drop_expired_head_of(spec, state, lane, &mut now);
        }
        expired
    }

    /// Drops the expired messages at the head of `lane`; returns how many. Reads the
    /// clock (once, into `now`) only when a head can expire: most messages cannot.
    fn drop_expired_head_of(
        spec: &QueueSpec,
        state: &mut State,
        lane: usize,
        now: &mut Option<Instant>,
    ) -> usize {
        let mut expired = 0;
        while let Some(head) = state.lanes[lane].front() {
            let over = head
                .expires
                .is_some_and(|e| e <= *now.get_or_insert_with(Instant::now));
            if !over {
                break;
            }
            tracing::debug!(queue = %spec.id, id = %head.message.id, "message expired");
            state.lanes[lane].pop_front();
            state.ready -= 1;
            expired += 1;
        }
        expired
    }

    /// Counts a delayed message once there is room for it (waiting up to `timeout`,
    /// as any publish does) and queues it once its delay has passed, on [`timers`].
    async fn publish_later(
        self: &Arc<Self>,
        incoming: Incoming,
        delay: Duration,
        timeout: Duration,
    ) -> Result<()> {
        let timers = timers()?;
        self.with_room(timeout, |state| state.delayed += 1).await?;
        // The timer holds the queue weakly and ends at its close: holding it, a message
        // delayed by days kept a closed or dropped queue, every message in it, in
        // memory for as long (review).
        let (queue, closed) = (Arc::downgrade(self), Arc::clone(&self.closed_signal));
        timers.spawn(async move {
            let closing = closed.notified();
            tokio::pin!(closing);
            closing.as_mut().enable();
            if queue.upgrade().is_none_or(|queue| queue.is_closed()) {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = closing => return,
            }
            let Some(queue) = queue.upgrade() else {
                return;
            };
            let mut state = queue.lock();
            state.delayed -= 1;
            // It has its room already: counted as delayed, now as ready.
            Self::push(&mut state, incoming.entering(), false);
            drop(state);
            queue.ready_signal.notify_one();
        });
        Ok(())
    }

    async fn publish_now(&self, incoming: Incoming, timeout: Duration) -> Result<()> {
        self.with_room(timeout, |state| {
            Self::push(state, incoming.entering(), false)
        })
        .await?;
        self.ready_signal.notify_one();
        Ok(())
    }

    /// Waits up to `timeout` for room, then runs `add` under the queue's lock. Looks
    /// again whenever room may have come: a take or a settlement signals it, and the
    /// first message at the head of a lane to expire makes it by itself.
    async fn with_room(&self, timeout: Duration, add: impl FnOnce(&mut State)) -> Result<()> {
        let deadline = crate::deadline_after(timeout);
        loop {
            let room = self.space_signal.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            self.refuse_if_closed()?;
            let next_expiry = {
                let mut state = self.lock();
                if self.make_room(&mut state) {
                    add(&mut state);
                    return Ok(());
                }
                Self::next_head_expiry(&state)
            };
            if Instant::now() >= deadline {
                return Err(Error::internal(format!(
                    "queue {} is full (max_length {}): no room within {:?}",
                    self.spec.id, self.max_length, timeout
                )));
            }
            let wake = next_expiry.map_or(deadline, |at| at.min(deadline));
            let _ = tokio::time::timeout_at(wake, room).await;
        }
    }

    /// When the first message at the head of a lane expires, if any can.
    fn next_head_expiry(state: &State) -> Option<Instant> {
        state
            .lanes
            .iter()
            .filter_map(|lane| lane.front()?.expires)
            .min()
    }

    fn push(state: &mut State, ready: Ready, front: bool) {
        let lane = &mut state.lanes[usize::from(ready.priority)];
        if front {
            lane.push_front(ready);
        } else {
            lane.push_back(ready);
        }
        state.ready += 1;
    }

    /// Takes the next ready message for a subscription, highest priority first,
    /// skipping expired ones. Returns its delivery tag.
    pub(super) fn take(&self, subscription: u64) -> Option<(u64, Arc<Message>)> {
        let mut state = self.lock();
        // Highest lane first, dropping expired heads only on the way to the message
        // taken: a priority queue has up to 256 lanes.
        let mut now = None;
        let mut expired = 0;
        let mut taken = None;
        for lane in (0..state.lanes.len()).rev() {
            expired += Self::drop_expired_head_of(&self.spec, &mut state, lane, &mut now);
            taken = state.lanes[lane].pop_front();
            if taken.is_some() {
                break;
            }
        }
        let taken = taken.map(|ready| {
            state.ready -= 1;
            let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
            if let Some(expires) = ready.expires {
                state.in_flight_expiry.insert(tag, expires);
            }
            state.in_flight.insert(
                tag,
                (subscription, Arc::clone(&ready.message), ready.priority),
            );
            (tag, ready.message)
        });
        drop(state);
        // One waiting publisher per slot freed, expired ones included: a take that
        // found only expired messages woke nobody, and a publisher waiting for room
        // failed "full" with the queue empty.
        for _ in 0..expired + usize::from(taken.is_some()) {
            self.space_signal.notify_one();
        }
        taken
    }

    /// Takes delivery `tag` out of flight: the message as it was ready, with when it
    /// expires.
    fn leaving_flight(state: &mut State, tag: u64) -> Option<Ready> {
        let (_, message, priority) = state.in_flight.remove(&tag)?;
        let expires = if state.in_flight_expiry.is_empty() {
            None
        } else {
            state.in_flight_expiry.remove(&tag)
        };
        Some(Ready {
            message,
            priority,
            expires,
        })
    }

    /// Settles a delivery: ack drops it, release puts it back at the front.
    pub(super) fn settle(&self, tag: u64, release: bool) -> Result<()> {
        let mut state = self.lock();
        let Some(ready) = Self::leaving_flight(&mut state, tag) else {
            return Err(Error::new(
                crate::ErrorKind::Canceled,
                format!(
                    "delivery {tag} of queue {} is no longer held: its consumer was cancelled and it went back to the queue",
                    self.spec.id
                ),
            ));
        };
        if release {
            Self::push(&mut state, ready, true);
            drop(state);
            self.ready_signal.notify_one();
        } else {
            self.acked.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    pub(super) fn attach(&self) -> u64 {
        self.lock().consumers += 1;
        self.next_subscription.fetch_add(1, Ordering::Relaxed)
    }

    /// Detaches a subscription: every delivery it still holds goes back to the front,
    /// in the order it was delivered.
    pub(super) fn detach(&self, subscription: u64) {
        let mut state = self.lock();
        state.consumers = state.consumers.saturating_sub(1);
        let mut tags: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, (sub, _, _))| *sub == subscription)
            .map(|(tag, _)| *tag)
            .collect();
        tags.sort_unstable_by(|a, b| b.cmp(a));
        let returned = !tags.is_empty();
        for tag in tags {
            if let Some(ready) = Self::leaving_flight(&mut state, tag) {
                Self::push(&mut state, ready, true);
            }
        }
        drop(state);
        if returned {
            self.ready_signal.notify_waiters();
        }
    }

    pub(super) fn info(&self) -> QueueInfo {
        let state = self.lock();
        QueueInfo {
            ready: Some(state.ready),
            in_flight: Some(state.in_flight.len() as u64),
            delayed: Some(state.delayed),
            consumers: Some(state.consumers),
        }
    }

    pub(super) fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready_signal.notify_waiters();
        self.space_signal.notify_waiters();
        self.closed_signal.notify_waiters();
    }

    /// Waits until the queue closes (or returns at once if it has).
    pub(super) async fn closing(&self) {
        let closing = self.closed_signal.notified();
        tokio::pin!(closing);
        closing.as_mut().enable();
        if !self.is_closed() {
            closing.await;
        }
    }
}

impl Drop for MemQueue {
    fn drop(&mut self) {
        // Ends the timers of its delayed messages, which hold it weakly.
        self.closed_signal.notify_waiters();
    }
}

/// The runtime that waits out delayed messages: one thread of the process's own, so
/// that a delayed message outlives the runtime that published it (an embedder's
/// short-lived one, a Lua worker's at a host's restart: it was lost with it, its
/// publish confirmed) and is not held up by what holds that runtime's thread (a
/// handler that cannot yield).
fn timers() -> Result<&'static tokio::runtime::Handle> {
    static TIMERS: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    let started = TIMERS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("queue-memory-timers".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))
            .ok()?;
        Some(handle)
    });
    started.as_ref().ok_or_else(|| {
        Error::internal(
            "the memory driver could not start the thread that waits out delayed messages",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HeaderValue, QueueId};

    /// A delayed message's timer holds its queue weakly and ends when the queue
    /// closes: it held it strongly, so a message delayed by days kept a closed queue,
    /// every message in it, in memory for as long (review).
    #[tokio::test]
    async fn a_delayed_message_keeps_its_queue_neither_alive_nor_past_its_close() {
        let spec = QueueSpec::new(QueueId::parse("app:later").unwrap());
        let queue = Arc::new(MemQueue::new(spec, 10));
        let mut message = Message::from_bytes(b"x".to_vec(), Default::default(), "text/plain");
        message
            .headers
            .insert("delay", HeaderValue::Int(4_000_000_000));
        queue
            .publish(message, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(queue.info().delayed, Some(1));
        // The timer runs on a thread of its own, and looks at the queue as it starts
        // (a strong reference for that moment): nothing signals either but the counts.
        until("the timer holds the queue", || {
            Arc::strong_count(&queue) == 1
        })
        .await;
        // The timer's own weak reference, beside the one this test takes.
        let watched = Arc::downgrade(&queue);
        assert_eq!(Arc::weak_count(&queue), 2);
        queue.close();
        until("the timer outlived the queue's close", || {
            watched.weak_count() == 1
        })
        .await;
    }

    /// Waits until `done` (bounded: fails saying `what` after 10 s).
    async fn until(what: &str, done: impl Fn() -> bool) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert!(waited.await.is_ok(), "{what}");
    }
}
