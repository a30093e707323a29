//! Consuming: one channel per subscription with `basic.qos` = prefetch, re-attached
//! on a new link after a reconnect. Settling is `settle.rs`'s.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use queue_core::{Delivery, Error, ErrorKind, QueueId, Result, Subscription};

use crate::connection::{CLOSE_TIMEOUT, Connection, Link};
use crate::settle::{Settler, Settlers};
use crate::topology::{Topology, queue_name};
use crate::{error, mapping};

/// The consuming side of a driver: what its subscriptions share.
pub(crate) struct Consumers {
    conn: Arc<Connection>,
    topology: Arc<Topology>,
    settlers: Settlers,
    /// Consumers attached (basic.consume), re-attaches after a reconnect included.
    attached: AtomicU64,
}

impl Consumers {
    pub(crate) fn new(conn: Arc<Connection>, topology: Arc<Topology>) -> Arc<Consumers> {
        Arc::new(Consumers {
            settlers: Settlers::new(conn.tasks().clone()),
            conn,
            topology,
            attached: AtomicU64::new(0),
        })
    }

    /// The consumers' own connection.
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Consumers attached so far, re-attaches included.
    pub(crate) fn attached(&self) -> u64 {
        self.attached.load(Ordering::Relaxed)
    }

    /// Flushes every subscription's pending settlements; later ones are refused.
    pub(crate) async fn close(&self) {
        self.settlers
            .drain_all(ErrorKind::Canceled, "the driver was closed")
            .await;
    }

    /// A subscription to a declared queue, attached at once when a link is up.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        queue: QueueId,
        prefetch: u32,
    ) -> Result<Amqp091Subscription> {
        let spec = self.topology.spec_of(&queue, "consume")?;
        let mut sub = Amqp091Subscription {
            consumers: Arc::clone(self),
            queue,
            broker_counts: spec.queue_type == queue_core::QueueType::Quorum,
            prefetch: u16::try_from(prefetch.max(1)).unwrap_or(u16::MAX),
            attached: None,
            failed_generation: None,
        };
        if let Some(link) = self.conn.current().filter(|l| l.is_alive()) {
            // A queue deleted on the broker since it was declared is declared again,
            // as a running subscription and a publish do.
            match sub.attach_declaring(&link).await {
                Ok(a) => sub.attached = Some(a),
                Err(e) if e.retryable() => sub.failed_generation = Some(link.generation),
                Err(e) => return Err(e),
            }
        }
        Ok(sub)
    }
}

/// One attachment: a channel with its consumer and settler.
struct Attached {
    generation: u64,
    channel: Channel,
    consumer: Consumer,
    settler: Arc<Settler>,
    settler_id: u64,
}

/// A consumer of one queue that re-attaches after reconnects.
pub(crate) struct Amqp091Subscription {
    consumers: Arc<Consumers>,
    queue: QueueId,
    /// A quorum queue: RabbitMQ counts its deliveries in `x-delivery-count`, where
    /// on a classic queue that header is only ever a publisher's.
    broker_counts: bool,
    prefetch: u16,
    attached: Option<Attached>,
    /// Generation of a link an attach failed on: wait for a newer one.
    failed_generation: Option<u64>,
}

/// What waiting for an attachment came to.
enum Attach {
    Ready,
    /// A retryable failure: wait for another link.
    Retry,
    Failed(Error),
    Closed,
}

/// What waiting on the channel came to.
enum Step {
    Delivered(Delivery),
    /// The channel is gone (the reason is logged): attach again.
    Detached,
}

impl Amqp091Subscription {
    fn conn(&self) -> &Connection {
        &self.consumers.conn
    }

    async fn attach(&self, link: &Link) -> Result<Attached> {
        let spec = self.consumers.topology.spec_of(&self.queue, "consume")?;
        let what = format!("consume {}", self.queue);
        let name = queue_name(&spec.name)?;
        let channel = link.answered(&what, link.channel(&what)).await?;
        let subscribe = async {
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
        };
        let result = match link.answered(&what, async { Ok(subscribe.await) }).await {
            Ok(result) => result,
            Err(unanswered) => {
                // Closed, so that a consume the broker registers late delivers to
                // nobody's channel rather than to one no one reads.
                self.conn().tasks().spawn(async move {
                    let _ =
                        tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "OK".into())).await;
                });
                return Err(unanswered);
            }
        };
        let consumer = match result {
            Ok(c) => c,
            Err(e) => {
                link.saw(&e);
                let _ = channel.close(200, "OK".into()).await;
                return Err(error::map(&what, e));
            }
        };
        self.consumers.attached.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(queue = %self.queue, generation = link.generation, "consumer attached");
        let (settler, settler_id) = self
            .consumers
            .settlers
            .start(channel.clone(), self.prefetch);
        Ok(Attached {
            generation: link.generation,
            channel,
            consumer,
            settler,
            settler_id,
        })
    }

    /// [`Self::attach`], declaring the queue again if the broker says it is missing:
    /// deleted there (by an operator, or to empty it), where attaching would fail
    /// until the next reconnect declared it (docs/drivers/amqp091.md, "Queues").
    async fn attach_declaring(&self, link: &Link) -> Result<Attached> {
        let missing = match self.attach(link).await {
            Err(e) if e.kind() == ErrorKind::NotFound => e,
            attached => return attached,
        };
        let topology = &self.consumers.topology;
        if topology.spec_of(&self.queue, "consume").is_err() {
            return Err(missing);
        }
        tracing::warn!(queue = %self.queue, error = %missing, "the queue is missing on the broker (deleted?); declaring it again as it was declared");
        topology
            .declare_again(link, &self.queue)
            .await
            .map_err(|e| e.context(format!("consume {}: the queue was missing", self.queue)))?;
        self.attach(link).await
    }

    /// Attaches if not attached, waiting for a usable link.
    async fn ensure_attached(&mut self) -> Attach {
        if self.attached.is_some() {
            return Attach::Ready;
        }
        let Some(link) = self.usable_link().await else {
            return Attach::Closed;
        };
        match self.attach_declaring(&link).await {
            Ok(a) => {
                self.failed_generation = None;
                self.attached = Some(a);
                Attach::Ready
            }
            Err(e) => {
                self.failed_generation = Some(link.generation);
                if e.retryable() {
                    Attach::Retry
                } else {
                    Attach::Failed(e)
                }
            }
        }
    }

    /// Waits for the next delivery on the attached channel; `None` if not attached or
    /// the driver is closing.
    async fn next_on_channel(&mut self) -> Option<Step> {
        let mut closed = self.conn().closed();
        let mut links = self.conn().links();
        let a = self.attached.as_mut()?;
        let generation = a.generation;
        // The link this channel lives on was replaced (or is being): the channel is
        // dead even if lapin has not said so on this consumer yet.
        let replaced = links.wait_for(|l| l.as_ref().is_none_or(|l| l.generation != generation));
        tokio::pin!(replaced);
        let item = loop {
            let item = tokio::select! {
                item = a.consumer.next() => item,
                _ = closed.wait_for(|c| *c) => return None,
                _ = &mut replaced => {
                    self.lost(generation, "the delivery's channel closed (connection lost): the broker redelivers it");
                    return Some(Step::Detached);
                }
            };
            match item {
                // lapin hands out what it buffered before the channel's close, and
                // the close after it: the broker has taken those deliveries back,
                // and a handler of one would run for nothing.
                Some(Ok(_)) if !a.channel.status().connected() => continue,
                item => break item,
            }
        };
        Some(match item {
            Some(Ok(d)) => Step::Delivered(self.delivered(d)?),
            Some(Err(e)) => {
                self.channel_failed(&e);
                Step::Detached
            }
            None => {
                self.cancelled_by_broker();
                Step::Detached
            }
        })
    }

    fn delivered(&self, d: AmqpDelivery) -> Option<Delivery> {
        let a = self.attached.as_ref()?;
        let acker = a.settler.track(d.delivery_tag);
        let counted = d.redelivered && self.broker_counts;
        let message = mapping::from_delivery(&d.properties, d.data, counted);
        Some(Delivery::new(message, acker))
    }

    /// The link went away under the channel.
    fn lost(&mut self, generation: u64, why: &str) {
        self.failed_generation = Some(generation);
        self.detach(ErrorKind::Internal, why);
    }

    fn channel_failed(&mut self, e: &lapin::Error) {
        tracing::warn!(queue = %self.queue, error = %error::describe(e), "consumer channel lost; re-attaching");
        if let Some(a) = &self.attached
            && error::is_connection_level(e)
        {
            if let Some(link) = self.conn().current() {
                link.saw(e);
            }
            self.failed_generation = Some(a.generation);
        }
        self.detach(
            ErrorKind::Internal,
            "the delivery's channel closed (connection lost?): the broker redelivers it",
        );
    }

    fn cancelled_by_broker(&mut self) {
        tracing::warn!(queue = %self.queue, "consumer cancelled by the broker; re-attaching");
        if let Some(a) = &self.attached {
            a.settler.cancelled_by_broker();
            if !a.channel.status().connected() {
                self.failed_generation = Some(a.generation);
            }
        }
        self.detach(
            ErrorKind::Internal,
            "the consumer was cancelled by the broker: the message went back to its queue, or went with it if the queue was deleted",
        );
    }

    /// Lets go of the current channel: what was settled is still sent, then the
    /// channel is closed, which returns its unsettled deliveries to the queue.
    fn detach(&mut self, kind: ErrorKind, why: &str) {
        let Some(a) = self.attached.take() else {
            return;
        };
        tracing::debug!(queue = %self.queue, generation = a.generation, why, "consumer detached");
        self.consumers.settlers.forget(a.settler_id);
        let Attached {
            channel,
            settler,
            consumer,
            ..
        } = a;
        // At once, so that the deliveries of this channel say they are lost
        // (`Acker::is_lost`) before the close below runs.
        settler.refuse(kind, why);
        let why = why.to_string();
        let close = async move {
            settler.close_and_drain(kind, &why).await;
            let _ = close_then_drop(channel, consumer, "consumer detached").await;
        };
        // On the driver's runtime, which works from any thread (a subscription
        // dropped outside a runtime too) and outlives the caller's. If that
        // runtime is gone, the future is dropped and lapin closes the channel
        // once the last delivery of it is gone.
        self.conn().tasks().spawn(close);
    }

    /// Waits for a link newer than a failed one; `None` once the driver is closed.
    async fn usable_link(&mut self) -> Option<Arc<Link>> {
        let mut links = self.conn().links();
        let mut closed = self.conn().closed();
        let retry_after = self.conn().config().reconnect_delay;
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
                _ = tokio::time::sleep(retry_after) => self.failed_generation = None,
            }
        }
    }
}

#[async_trait]
impl Subscription for Amqp091Subscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.conn().is_closed() {
                self.detach(ErrorKind::Canceled, "the driver was closed");
                return None;
            }
            match self.ensure_attached().await {
                Attach::Ready => {}
                Attach::Retry => continue,
                Attach::Failed(e) => return Some(Err(e)),
                Attach::Closed => return None,
            }
            if let Some(Step::Delivered(d)) = self.next_on_channel().await {
                return Some(Ok(d));
            }
        }
    }

    async fn cancel(mut self: Box<Self>) -> Result<()> {
        let Some(a) = self.attached.take() else {
            return Ok(());
        };
        self.consumers.settlers.forget(a.settler_id);
        a.settler
            .close_and_drain(
                ErrorKind::Canceled,
                "the subscription was cancelled: the message went back to the queue",
            )
            .await;
        // Closing the channel returns every unacked delivery of it to the queue.
        close_then_drop(a.channel, a.consumer, "cancelled")
            .await
            .map_err(|e| e.context(format!("cancel consumer of {}", self.queue)))
    }
}

/// Closes `channel` (saying `reason` to the broker), then drops its `consumer`. A lapin consumer dropped while active
/// cancels itself from a task of lapin's; if that cancel meets the channel already
/// closing it fails, and lapin takes the failure for the connection's: every channel
/// on it closes, and acks other consumers had not sent yet are lost (their messages
/// come again). Dropped after the close, the consumer has nothing left to cancel.
///
/// The close waits at most [`CLOSE_TIMEOUT`] for the broker's answer: a broker that
/// hangs never gives one, and the channel's deliveries go back when it drops the
/// connection.
async fn close_then_drop(channel: Channel, consumer: Consumer, reason: &str) -> Result<()> {
    let closed = if channel.status().connected() {
        match tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, reason.into())).await {
            Ok(closed) => closed.map_err(|e| error::map("close the consumer's channel", e)),
            Err(_) => Err(Error::internal(format!(
                "close the consumer's channel: the broker did not answer within {CLOSE_TIMEOUT:?}; its deliveries go back when the broker drops the connection"
            ))),
        }
    } else {
        Ok(())
    };
    drop(consumer);
    closed
}

impl Drop for Amqp091Subscription {
    fn drop(&mut self) {
        self.detach(
            ErrorKind::Canceled,
            "the subscription was dropped: the message went back to the queue",
        );
    }
}
