//! Consuming: `basic.qos` = prefetch, deliveries, and acks batched with `multiple`
//! where that is safe.
//!
//! Each attachment of a subscription (one channel) has a [`Settler`]: deliveries are
//! tracked by tag, `ack`/`release` mark them and wake one flusher task, which sends
//! everything marked so far in as few frames as is safe:
//!
//! * releases first, one `basic.nack(requeue)` each (so a later `multiple` ack can
//!   never cover a message that should go back);
//! * then one `basic.ack(multiple)` for the run of acked tags below the oldest
//!   unsettled one (every tag up to it is settled, so `multiple` covers only acks);
//! * then single acks for acked tags after that gap (a slow handler never holds back
//!   other acks, so the broker's prefetch count never stalls).
//!
//! While the flusher writes, further settlements pile up and go in the next round,
//! so a fast consumer acks in batches and a slow one acks at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use queue_core::{Acker, Delivery, Error, ErrorKind, QueueId, Result, Subscription};
use tokio::sync::{Notify, watch};

use crate::connection::{Link, Shared, lock, queue_name};
use crate::{error, mapping};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Unsettled,
    Acked,
    Released,
}

struct SettleState {
    /// Why settling is refused, once it is.
    refused: Option<(ErrorKind, String)>,
    tags: BTreeMap<u64, Mark>,
}

/// The ack batcher of one consumer channel.
pub(crate) struct Settler {
    channel: Channel,
    state: Mutex<SettleState>,
    wake: Notify,
    /// Becomes true when the flusher has sent everything and stopped.
    done: watch::Sender<bool>,
}

/// What one flush round sends.
#[derive(Default)]
struct Round {
    nacks: Vec<u64>,
    multiple: Option<(u64, bool)>,
    singles: Vec<u64>,
}

impl Settler {
    /// Starts the settler and its flusher on `tasks` (the driver's runtime).
    fn start(channel: Channel, tasks: &tokio::runtime::Handle) -> Arc<Settler> {
        let (done, _) = watch::channel(false);
        let settler = Arc::new(Settler {
            channel,
            state: Mutex::new(SettleState {
                refused: None,
                tags: BTreeMap::new(),
            }),
            wake: Notify::new(),
            done,
        });
        tasks.spawn(flush_loop(Arc::clone(&settler)));
        settler
    }

    fn track(&self, tag: u64) {
        lock(&self.state).tags.insert(tag, Mark::Unsettled);
    }

    fn mark(&self, tag: u64, mark: Mark) -> Result<()> {
        {
            let mut state = lock(&self.state);
            if let Some((kind, why)) = &state.refused {
                return Err(Error::new(*kind, why.clone()).retryable_if(false));
            }
            match state.tags.get_mut(&tag) {
                Some(m @ Mark::Unsettled) => *m = mark,
                _ => return Err(Error::invalid(format!("delivery {tag} is already settled"))),
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    /// Refuses further settlements; what was settled before is still sent.
    fn refuse(&self, kind: ErrorKind, why: &str) {
        let mut state = lock(&self.state);
        if state.refused.is_none() {
            state.refused = Some((kind, why.to_string()));
        }
        drop(state);
        self.wake.notify_one();
    }

    /// The channel is gone: nothing can be settled any more (the broker redelivers).
    fn kill(&self, why: &str) {
        let mut state = lock(&self.state);
        state.refused = Some((ErrorKind::Internal, why.to_string()));
        state.tags.clear();
        drop(state);
        self.wake.notify_one();
    }

    /// Refuses further settlements and waits until the flusher has sent the rest.
    pub(crate) async fn close_and_drain(&self, kind: ErrorKind, why: &str) {
        self.refuse(kind, why);
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    fn take_round(&self) -> (Round, bool) {
        let mut state = lock(&self.state);
        let mut round = Round::default();
        state.tags.retain(|tag, mark| {
            if *mark == Mark::Released {
                round.nacks.push(*tag);
                false
            } else {
                true
            }
        });
        let mut run: Vec<u64> = Vec::new();
        for (tag, mark) in state.tags.iter() {
            if *mark != Mark::Acked {
                break;
            }
            run.push(*tag);
        }
        for tag in &run {
            state.tags.remove(tag);
        }
        if let Some(last) = run.last() {
            round.multiple = Some((*last, run.len() > 1));
        }
        state.tags.retain(|tag, mark| {
            if *mark == Mark::Acked {
                round.singles.push(*tag);
                false
            } else {
                true
            }
        });
        let finished = state.refused.is_some();
        (round, finished)
    }

    async fn send(&self, round: &Round) -> std::result::Result<(), lapin::Error> {
        for tag in &round.nacks {
            self.channel
                .basic_nack(
                    *tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await?;
        }
        if let Some((tag, multiple)) = round.multiple {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .await?;
        }
        for tag in &round.singles {
            self.channel
                .basic_ack(*tag, BasicAckOptions { multiple: false })
                .await?;
        }
        Ok(())
    }
}

async fn flush_loop(settler: Arc<Settler>) {
    loop {
        let (round, finished) = settler.take_round();
        let empty = round.nacks.is_empty() && round.multiple.is_none() && round.singles.is_empty();
        if !empty {
            if let Err(e) = settler.send(&round).await {
                tracing::debug!(error = %error::describe(&e), "settling failed; the broker redelivers");
                settler.kill(
                    "the delivery's channel closed (connection lost?): the broker redelivers it",
                );
                break;
            }
            continue;
        }
        if finished {
            break;
        }
        settler.wake.notified().await;
    }
    settler.done.send_replace(true);
}

/// Settles one delivery through its channel's settler.
struct AmqpAcker {
    settler: Arc<Settler>,
    tag: u64,
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settler.mark(self.tag, Mark::Acked)
    }

    async fn release(self: Box<Self>) -> Result<()> {
        self.settler.mark(self.tag, Mark::Released)
    }

    fn release_on_drop(self: Box<Self>) {
        // Refused only when the channel is gone or cancelled: the broker requeues then.
        let _ = self.settler.mark(self.tag, Mark::Released);
    }
}

struct Attached {
    generation: u64,
    channel: Channel,
    consumer: Consumer,
    settler: Arc<Settler>,
    settler_id: u64,
}

/// A consumer of one queue that re-attaches after reconnects.
pub(crate) struct AmqpSubscription {
    shared: Arc<Shared>,
    queue: QueueId,
    prefetch: u16,
    attached: Option<Attached>,
    /// Generation of a link an attach failed on: wait for a newer one.
    failed_generation: Option<u64>,
}

impl AmqpSubscription {
    pub(crate) async fn start(shared: Arc<Shared>, queue: QueueId, prefetch: u32) -> Result<Self> {
        shared.spec_of(&queue, "consume")?;
        let prefetch = u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX);
        let mut sub = AmqpSubscription {
            shared,
            queue,
            prefetch,
            attached: None,
            failed_generation: None,
        };
        if let Some(link) = sub.shared.current().filter(|l| l.is_alive()) {
            match sub.attach(&link).await {
                Ok(a) => sub.attached = Some(a),
                Err(e) if e.retryable() => sub.failed_generation = Some(link.generation),
                Err(e) => return Err(e),
            }
        }
        Ok(sub)
    }

    async fn attach(&self, link: &Link) -> Result<Attached> {
        let spec = self.shared.spec_of(&self.queue, "consume")?;
        let what = format!("consume {}", self.queue);
        let name = queue_name(&spec.name)?;
        let channel = link.scratch_channel(&what).await?;
        let result = async {
            channel
                .basic_qos(self.prefetch, BasicQosOptions { global: false })
                .await?;
            let tag = format!("queue-amqp091-{}", queue_core::new_message_id());
            channel
                .basic_consume(
                    name,
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        .await;
        let consumer = match result {
            Ok(c) => c,
            Err(e) => {
                if error::is_connection_level(&e) {
                    self.shared.nudge.notify_one();
                }
                let _ = channel.close(200, "OK".into()).await;
                return Err(error::map(&what, e));
            }
        };
        self.shared
            .consumers_attached
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let settler = Settler::start(channel.clone(), &self.shared.tasks);
        let settler_id = self.shared.next_id();
        lock(&self.shared.settlers).insert(settler_id, Arc::downgrade(&settler));
        Ok(Attached {
            generation: link.generation,
            channel,
            consumer,
            settler,
            settler_id,
        })
    }

    /// Lets go of the current channel: what was settled is still sent, then the
    /// channel is closed, which returns its unsettled deliveries to the queue.
    fn detach(&mut self, kind: ErrorKind, why: &str) {
        if let Some(a) = self.attached.take() {
            lock(&self.shared.settlers).remove(&a.settler_id);
            let Attached {
                channel,
                settler,
                consumer,
                ..
            } = a;
            drop(consumer);
            let why = why.to_string();
            let close = async move {
                settler.close_and_drain(kind, &why).await;
                if channel.status().connected() {
                    let _ = channel.close(200, "consumer detached".into()).await;
                }
            };
            // On the driver's runtime, which works from any thread (a subscription
            // dropped outside a runtime too) and outlives the caller's. If that
            // runtime is gone, the future is dropped and lapin closes the channel
            // once the last delivery of it is gone.
            self.shared.tasks.spawn(close);
        }
    }

    /// Waits for a link newer than a failed one; `None` once the driver is closed.
    async fn usable_link(&mut self) -> Option<Arc<Link>> {
        let mut links = self.shared.link.subscribe();
        let mut closed = self.shared.closed.subscribe();
        loop {
            if *closed.borrow_and_update() {
                return None;
            }
            let current = links.borrow_and_update().clone();
            if let Some(link) = current
                && link.is_alive()
                && Some(link.generation) != self.failed_generation
            {
                return Some(link);
            }
            tokio::select! {
                changed = links.changed() => if changed.is_err() { return None },
                _ = closed.changed() => {},
                // The same link after a non-connection failure (the queue was
                // deleted on the broker, say): try again after the reconnect delay.
                _ = tokio::time::sleep(self.shared.config.reconnect_delay) => self.failed_generation = None,
            }
        }
    }
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.shared.is_closed() {
                self.detach(ErrorKind::Canceled, "the driver was closed");
                return None;
            }
            if self.attached.is_none() {
                let link = self.usable_link().await?;
                match self.attach(&link).await {
                    Ok(a) => {
                        self.failed_generation = None;
                        self.attached = Some(a);
                    }
                    Err(e) => {
                        self.failed_generation = Some(link.generation);
                        if e.retryable() {
                            continue;
                        }
                        return Some(Err(e));
                    }
                }
            }
            let mut closed = self.shared.closed.subscribe();
            let mut links = self.shared.link.subscribe();
            let a = self.attached.as_mut()?;
            let generation = a.generation;
            // The link this channel lives on was replaced (or is being): the channel is
            // dead even if lapin has not said so on this consumer yet.
            let replaced =
                links.wait_for(|l| l.as_ref().is_none_or(|l| l.generation != generation));
            let step = tokio::select! {
                item = a.consumer.next() => Some(item),
                _ = closed.wait_for(|c| *c) => continue,
                _ = replaced => None,
            };
            let Some(item) = step else {
                self.failed_generation = Some(generation);
                self.detach(
                    ErrorKind::Internal,
                    "the delivery's channel closed (connection lost): the broker redelivers it",
                );
                continue;
            };
            match item {
                Some(Ok(d)) => {
                    a.settler.track(d.delivery_tag);
                    let acker = AmqpAcker {
                        settler: Arc::clone(&a.settler),
                        tag: d.delivery_tag,
                    };
                    let message = mapping::from_delivery(&d.properties, d.data);
                    return Some(Ok(Delivery::new(message, Box::new(acker))));
                }
                Some(Err(e)) => {
                    tracing::warn!(queue = %self.queue, error = %error::describe(&e), "consumer channel lost; re-attaching");
                    let generation = a.generation;
                    if error::is_connection_level(&e) {
                        self.shared.nudge.notify_one();
                        self.failed_generation = Some(generation);
                    }
                    self.detach(
                        ErrorKind::Internal,
                        "the delivery's channel closed (connection lost?): the broker redelivers it",
                    );
                }
                None => {
                    tracing::warn!(queue = %self.queue, "consumer cancelled by the broker; re-attaching");
                    let generation = a.generation;
                    if !a.channel.status().connected() {
                        self.failed_generation = Some(generation);
                    }
                    self.detach(
                        ErrorKind::Internal,
                        "the consumer was cancelled by the broker: the message went back to the queue",
                    );
                }
            }
        }
    }

    async fn cancel(mut self: Box<Self>) -> Result<()> {
        let Some(a) = self.attached.take() else {
            return Ok(());
        };
        lock(&self.shared.settlers).remove(&a.settler_id);
        a.settler
            .close_and_drain(
                ErrorKind::Canceled,
                "the subscription was cancelled: the message went back to the queue",
            )
            .await;
        drop(a.consumer);
        // Closing the channel returns every unacked delivery of it to the queue.
        if a.channel.status().connected() {
            a.channel
                .close(200, "cancelled".into())
                .await
                .map_err(|e| error::map(format!("cancel consumer of {}", self.queue), e))?;
        }
        Ok(())
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        self.detach(
            ErrorKind::Canceled,
            "the subscription was dropped: the message went back to the queue",
        );
    }
}
