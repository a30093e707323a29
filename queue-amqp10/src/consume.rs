//! Receiving: one receiver link per subscription, link credit = prefetch.
//!
//! A task owns the link. It reads transfers, hands them out as [`Delivery`]s (those
//! already waiting together, so that a fast consumer is woken once for them), and
//! performs every settlement the ackers hand it (accepted for ack, released for
//! release): releases at once, accepts gathered into one disposition (up to
//! [`GATHER_COUNT`] of them, at most [`GATHER_TIME`] after the first, and always
//! before credit is granted); `ack` returns once its settlement is handed over, and a
//! cancel or stop sends the acks handed over before it ahead of releasing the rest.
//! Credit is managed by hand: `unsettled + credit <= prefetch` always holds, and
//! credit is topped up once half of it can be given back or none is left, on RabbitMQ
//! 3.x only once the last credit has been used (see `CreditWindow`), so
//! the broker never has more than `prefetch` deliveries out to this subscription.
//!
//! When the link, session or connection is lost the task re-attaches with backoff and
//! keeps delivering. Deliveries of the lost link were returned by the broker; acking one
//! is then an error (INTERNAL, retryable: it will come again), releasing one is fine;
//! an ack handed over just before the link was lost comes back as a redelivery.
//! `cancel` releases whatever is unsettled, detaches, and from then on every settlement
//! of this subscription's deliveries is `INVALID`. A transfer the link cannot decode is
//! rejected (it would come back for ever); every other is handed over.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use async_trait::async_trait;
use fe2o3_amqp::link::Receiver;
use fe2o3_amqp::link::RecvError;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::types::definitions::{self, AmqpError};
use fe2o3_amqp::types::messaging::{Body, DistributionMode, Source, TerminusDurability};
use queue_core::{Acker, Delivery, Error, Result, Subscription};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::Profile;
use crate::connection::{Attached, CLOSE_TIMEOUT, Connector};
use crate::raw_value::RawValue;

/// What a receiver link needs to (re-)attach.
#[derive(Debug, Clone)]
pub(crate) struct ReceiverSpec {
    pub queue: String,
    pub address: String,
    pub durable: bool,
    pub profile: Profile,
    pub prefetch: u32,
}

impl ReceiverSpec {
    fn source(&self) -> Source {
        let mut source = Source::builder()
            .address(self.address.clone())
            .durable(if self.durable {
                TerminusDurability::Configuration
            } else {
                TerminusDurability::None
            });
        if let Some(caps) = self.profile.terminus_capabilities() {
            source = source
                .capabilities(caps)
                .distribution_mode(DistributionMode::Move);
        }
        source.build()
    }
}

enum Control {
    Settle {
        epoch: u64,
        delivery_id: u32,
        accept: bool,
    },
    Cancel(oneshot::Sender<Result<()>>),
}

/// A delivery waiting for `next`, with the epoch of the link it came on.
type Handed = Result<(u64, Delivery)>;

/// A running consumer of one queue.
pub(crate) struct Amqp10Subscription {
    deliveries: mpsc::UnboundedReceiver<Handed>,
    /// Deliveries handed to the channel and not yet taken by `next`.
    buffered: Arc<AtomicUsize>,
    /// The epoch of the task's current link ([`NO_LINK`] while there is none).
    current_epoch: Arc<AtomicU64>,
    /// The driver's close, which `next` reads itself: the task learns of it a moment
    /// later, and until it has, the epoch above still looks current.
    closed: watch::Receiver<bool>,
    control: mpsc::UnboundedSender<Control>,
    task: Option<JoinHandle<()>>,
}

impl Amqp10Subscription {
    /// Attaches the receiver now (so consume reports a refused address) and starts
    /// the task.
    pub async fn start(connector: Arc<Connector>, spec: ReceiverSpec) -> Result<Self> {
        let attached = connector
            .attach_receiver(connector.link_name("receiver", &spec.queue), spec.source())
            .await
            .map_err(|e| e.context(format!("consume {}", spec.queue)))?;
        let (out, deliveries) = mpsc::unbounded_channel();
        let (control, control_rx) = mpsc::unbounded_channel();
        let closed = connector.closed_signal();
        let tasks = connector.tasks();
        let closed_for_next = closed.clone();
        let buffered = Arc::new(AtomicUsize::new(0));
        let current_epoch = Arc::new(AtomicU64::new(NO_LINK));
        let mut task = ReceiveTask {
            buffered: Arc::clone(&buffered),
            connector,
            spec,
            out,
            control: control.downgrade(),
            control_rx,
            closed,
            epoch: 0,
            current_epoch: Arc::clone(&current_epoch),
            unsettled: HashMap::new(),
            burst: Vec::with_capacity(BURST),
            unreadable: Vec::new(),
            accepts: Vec::new(),
            flush: Box::pin(tokio::time::sleep(GATHER_TIME)),
            credit: 0,
            failures: 0,
            attached_at: tokio::time::Instant::now(),
        };
        let link = task.start_link(attached).await;
        let handle = tasks.spawn(task.run(link));
        Ok(Amqp10Subscription {
            deliveries,
            buffered,
            current_epoch,
            closed: closed_for_next,
            control,
            task: Some(handle),
        })
    }
}

#[async_trait]
impl Subscription for Amqp10Subscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            match self.deliveries.recv().await? {
                Ok((epoch, delivery)) => {
                    self.buffered.fetch_sub(1, Ordering::AcqRel);
                    if epoch == self.current_epoch.load(Ordering::Acquire) && !*self.closed.borrow()
                    {
                        return Some(Ok(delivery));
                    }
                    // Its link was lost, or the driver closed, while it waited here:
                    // the broker has it back and delivers it again, so a handler would
                    // only run it twice and fail to ack it. Dropped, it settles nothing
                    // (an old epoch's settlement is ignored).
                    drop(delivery);
                }
                Err(err) => return Some(Err(err)),
            }
        }
    }

    async fn cancel(mut self: Box<Self>) -> Result<()> {
        let (reply, done) = oneshot::channel();
        if self.control.send(Control::Cancel(reply)).is_err() {
            return Ok(()); // the task has ended already: nothing is held
        }
        let result = done.await.unwrap_or(Ok(()));
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        result
    }
}

/// How many accepts make a disposition worth sending at once.
const GATHER_COUNT: usize = 64;
/// The longest an accept waits for others to join its disposition: the broker learns
/// of an ack at most this much later (a connection lost in between redelivers it).
const GATHER_TIME: std::time::Duration = std::time::Duration::from_millis(1);

/// The current epoch while no link is attached (epochs start at 1).
const NO_LINK: u64 = 0;

struct LinkAcker {
    control: mpsc::UnboundedSender<Control>,
    epoch: u64,
    /// The epoch of the task's current link.
    current_epoch: Arc<AtomicU64>,
    delivery_id: u32,
    message_id: String,
}

impl LinkAcker {
    /// Hands the settlement to the task and returns: the task sends it with whatever
    /// else is waiting in one disposition (docs/drivers/amqp10.md, "Receiving").
    /// Waiting for the disposition to be written made every handler wait a round trip
    /// through two tasks per ack. A settlement of a link already lost is answered
    /// here; one whose link is lost before the task sends it comes back as a
    /// redelivery, as an ack lost with the connection does.
    fn settle(self, accept: bool) -> Result<()> {
        // Looked at first: a stopped task leaves no link either, and its deliveries
        // were told "the connection was lost" (an ack) or settled nothing (a release).
        if self.control.is_closed() {
            return Err(self.cancelled());
        }
        if self.epoch != self.current_epoch.load(Ordering::Acquire) {
            return lost_link_settlement(accept);
        }
        let sent = self.control.send(Control::Settle {
            epoch: self.epoch,
            delivery_id: self.delivery_id,
            accept,
        });
        if sent.is_err() {
            return Err(self.cancelled());
        }
        Ok(())
    }

    fn cancelled(&self) -> Error {
        Error::invalid(format!(
            "message {}: its consumer was cancelled and the delivery went back to the queue",
            self.message_id
        ))
    }
}

#[async_trait]
impl Acker for LinkAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle(true)
    }

    async fn release(self: Box<Self>) -> Result<()> {
        self.settle(false)
    }

    fn release_on_drop(self: Box<Self>) {
        let _ = self.control.send(Control::Settle {
            epoch: self.epoch,
            delivery_id: self.delivery_id,
            accept: false,
        });
    }

    fn is_lost(&self) -> bool {
        self.epoch != self.current_epoch.load(Ordering::Acquire)
    }
}

struct ReceiveTask {
    connector: Arc<Connector>,
    buffered: Arc<AtomicUsize>,
    spec: ReceiverSpec,
    out: mpsc::UnboundedSender<Handed>,
    /// Weak, so the task notices when the subscription and every acker are gone.
    control: mpsc::WeakUnboundedSender<Control>,
    control_rx: mpsc::UnboundedReceiver<Control>,
    closed: watch::Receiver<bool>,
    /// Which link the deliveries in `unsettled` came from.
    epoch: u64,
    /// `epoch` while its link is attached, [`NO_LINK`] while there is none: for the
    /// ackers to refuse a settlement of a lost link at once.
    current_epoch: Arc<AtomicU64>,
    unsettled: HashMap<u32, DeliveryInfo>,
    /// Deliveries taken from the link and not yet handed to the consumer (see
    /// `deliver_burst`).
    burst: Vec<Delivery>,
    /// Deliveries of the burst to reject, with why: the link could not decode them, or
    /// what came is not what was sent ([`crate::mapping::mangled_by_artemis`]).
    unreadable: Vec<(DeliveryInfo, String)>,
    /// Acks handed over and not sent yet (no longer in `unsettled`).
    accepts: Vec<DeliveryInfo>,
    /// When `accepts` must be sent at the latest; set when the first one joins and
    /// waited for only while it is not empty. One timer, reset, not one per event.
    flush: Pin<Box<tokio::time::Sleep>>,
    /// Credit the broker still has for this link (granted minus received since).
    credit: u32,
    /// Attaches that failed, or links lost soon after they attached, in a row: what
    /// the next re-attach backs off by.
    failures: u32,
    /// When the current (or last) link attached.
    attached_at: tokio::time::Instant,
}

enum Event {
    Closed,
    Control(Option<Control>),
    /// The waiting accepts have waited [`GATHER_TIME`].
    FlushDue,
    Delivery(Box<Received>),
}

/// What the link's `recv` gives.
type Received = std::result::Result<
    fe2o3_amqp::link::delivery::Delivery<Body<RawValue>>,
    fe2o3_amqp::link::RecvError,
>;

/// How long a link must have served for its loss to count as news, not as the same
/// trouble again (see `run`).
const STEADY_LINK: std::time::Duration = std::time::Duration::from_secs(1);

/// How many transfers already waiting are handed to the consumer at once.
const BURST: usize = 32;

/// Why the task stops: the reply of the cancel that stopped it, if a cancel did.
type StopReply = Option<oneshot::Sender<Result<()>>>;

enum Step {
    Continue,
    LinkLost,
    Stop(StopReply),
}

impl ReceiveTask {
    /// Makes an attached link current: new epoch, full credit.
    async fn start_link(&mut self, mut attached: Attached<Receiver>) -> Option<Attached<Receiver>> {
        self.attached_at = tokio::time::Instant::now();
        self.epoch += 1;
        self.current_epoch.store(self.epoch, Ordering::Release);
        self.unsettled.clear();
        match attached.link.set_credit(self.spec.prefetch).await {
            Ok(()) => {
                self.credit = self.spec.prefetch;
                Some(attached)
            }
            Err(err) => {
                tracing::warn!(queue = %self.spec.queue, error = %err, "amqp10 receiver: granting credit failed");
                attached.end();
                None
            }
        }
    }

    async fn run(mut self, mut link: Option<Attached<Receiver>>) {
        let stop_reply = loop {
            let Some(attached) = link.as_mut() else {
                // Until a link is attached again, a settlement of the lost one's
                // deliveries is refused at once, not handed over to be dropped.
                self.current_epoch.store(NO_LINK, Ordering::Release);
                match self.reattach().await {
                    Ok(attached) => link = self.start_link(attached).await,
                    Err(reply) => break reply,
                }
                continue;
            };
            let event = tokio::select! {
                biased;
                _ = self.closed.wait_for(|c| *c) => Event::Closed,
                control = self.control_rx.recv() => Event::Control(control),
                _ = self.out.closed() => Event::Closed,
                delivery = attached.link.recv::<Body<RawValue>>() => Event::Delivery(Box::new(delivery)),
                () = &mut self.flush, if !self.accepts.is_empty() => Event::FlushDue,
            };
            let step = match event {
                Event::Closed | Event::Control(None) => Step::Stop(None),
                Event::Control(Some(control)) => self.handle(&mut attached.link, control).await,
                Event::FlushDue => self.send_accepts(&attached.link).await,
                Event::Delivery(delivery) => {
                    let session_ended = || attached.session.is_ended();
                    self.deliver_burst(&mut attached.link, session_ended, *delivery)
                        .await
                }
            };
            match step {
                Step::Continue => {}
                Step::LinkLost => {
                    if let Some(old) = link.take() {
                        old.end();
                    }
                    // A link lost right after it attached is lost for a reason that
                    // comes back with the next one (a delivery it cannot take, a broker
                    // that detaches it at once): the re-attach backs off, where it
                    // attached again hundreds of times a second. One that served a
                    // while is attached again at once.
                    if self.attached_at.elapsed() < STEADY_LINK {
                        self.failures += 1;
                    } else {
                        self.failures = 0;
                    }
                    self.unsettled.clear();
                    // Their deliveries went back with the link.
                    self.accepts.clear();
                }
                Step::Stop(reply) => {
                    // Settlements from here on are refused, not taken and dropped: the
                    // detach below waits for the broker (up to 5 s), and an ack made
                    // meanwhile said `Ok` while its delivery went back with the rest.
                    // Those handed over already are still read (a closed channel keeps
                    // what it holds) and sent.
                    self.current_epoch.store(NO_LINK, Ordering::Release);
                    self.control_rx.close();
                    let mut cancels = Vec::new();
                    if let Some(attached) = link.take() {
                        cancels = self.settle_handed_over(&attached.link).await;
                        self.release_all(&attached.link).await;
                        let Attached { link, session } = attached;
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.detach()).await;
                        drop(session); // sends its end: see `Attached::end`
                    }
                    for cancel in cancels {
                        let _ = cancel.send(Ok(()));
                    }
                    break reply;
                }
            }
        };
        // From here on every settlement is an error: the deliveries went back, and
        // those still waiting for `next` are dropped there, not handed out (a handler
        // would run what another consumer may have, and fail to ack it).
        self.current_epoch.store(NO_LINK, Ordering::Release);
        self.control_rx.close();
        while let Ok(control) = self.control_rx.try_recv() {
            if let Control::Cancel(reply) = control {
                let _ = reply.send(Ok(()));
            }
            // A settlement handed over after the stop is dropped: its delivery went
            // back with the link. From now on `settle` reports the consumer cancelled.
        }
        if let Some(reply) = stop_reply {
            let _ = reply.send(Ok(()));
        }
    }

    /// Attaches again, backing off; settlements and cancel keep being answered meanwhile.
    /// `Err` means stop (with the cancel reply, if it was a cancel).
    async fn reattach(&mut self) -> std::result::Result<Attached<Receiver>, StopReply> {
        loop {
            if self.connector.is_closed() || self.out.is_closed() {
                return Err(None);
            }
            if self.failures > 0 {
                let wait = self.connector.backoff(self.failures);
                self.unless_stopped(tokio::time::sleep(wait)).await?;
            }
            // An attach can wait for the connector's timeouts on a broker that does
            // not answer: a cancel meanwhile is answered at once, not after them.
            let connector = Arc::clone(&self.connector);
            let attach = connector.attach_receiver(
                connector.link_name("receiver", &self.spec.queue),
                self.spec.source(),
            );
            let err = match self.unless_stopped(attach).await? {
                Ok(attached) => {
                    tracing::info!(queue = %self.spec.queue, "amqp10 receiver re-attached");
                    return Ok(attached);
                }
                Err(err) => err,
            };
            self.failures += 1;
            let wait = self.connector.backoff(self.failures);
            tracing::warn!(queue = %self.spec.queue, error = %err, ?wait, "amqp10 receiver cannot attach; retrying");
            if crate::error::is_permanent(&err) {
                // e.g. the queue was deleted: tell the consumer, keep trying.
                let _ = self.out.send(Err(err));
            }
        }
    }

    /// Waits for `work` while no link is attached, answering what arrives meanwhile: a
    /// cancel or the driver's close ends the wait (`Err`, with the cancel's reply); a
    /// settlement is dropped, as every delivery of the lost link is back in the queue.
    async fn unless_stopped<F: Future>(
        &mut self,
        work: F,
    ) -> std::result::Result<F::Output, StopReply> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return Ok(done),
                _ = self.closed.wait_for(|c| *c) => return Err(None),
                control = self.control_rx.recv() => match control {
                    Some(Control::Cancel(reply)) => return Err(Some(reply)),
                    Some(Control::Settle { .. }) => {}
                    None => return Err(None),
                },
            }
        }
    }

    /// Takes `first` and the transfers already waiting behind it (up to [`BURST`]),
    /// then hands them to the consumer together: it is woken once for them, not once
    /// each (docs/performance.md, "Broker drivers"). A burst whose link or session is
    /// gone by then is dropped instead: fe2o3-amqp hands out the transfers it had
    /// queued before the broker's `detach` or `end` (or the connection's loss), and the
    /// broker has those back already; handed over, each would have run its handler
    /// while the broker delivers it again, and an ack made before this task noticed
    /// the loss said `Ok` (docs/drivers/amqp10.md, "Connection loss").
    async fn deliver_burst(
        &mut self,
        link: &mut Receiver,
        session_ended: impl Fn() -> bool,
        first: Received,
    ) -> Step {
        let mut step = self.take_in(first);
        for _ in 1..BURST {
            if !matches!(step, Step::Continue) {
                break;
            }
            // Cancel safe, as the `select!` in `run` relies on: nothing is lost when
            // no transfer is waiting. Polled where it is made: the future is about
            // 3 KB, and `now_or_never` moved it once more per transfer.
            let recv = std::pin::pin!(link.recv::<Body<RawValue>>());
            match recv.poll(&mut Context::from_waker(Waker::noop())) {
                Poll::Ready(received) => step = self.take_in(received),
                Poll::Pending => break,
            }
        }
        if matches!(step, Step::Continue) && session_ended() {
            tracing::warn!(queue = %self.spec.queue, "amqp10 receiver: its session ended; re-attaching");
            step = Step::LinkLost;
        }
        if matches!(step, Step::LinkLost) {
            // Dropped, each delivery's acker hands over a release of the lost link,
            // which settles nothing.
            self.buffered.fetch_sub(self.burst.len(), Ordering::AcqRel);
            self.burst.clear();
            self.unreadable.clear();
            return step;
        }
        for delivery in self.burst.drain(..) {
            if self.out.send(Ok((self.epoch, delivery))).is_err() {
                return Step::Stop(None);
            }
        }
        if self.unreadable.is_empty() {
            return step;
        }
        for (info, why) in std::mem::take(&mut self.unreadable) {
            // No handler can have it: the link could not decode it, or Artemis mangled
            // it (a core client reads it whole), so it cannot be handed over, nor
            // dead-lettered by the runtime, whose copy would be what came. Rejected,
            // Artemis keeps it in its DLQ address, RabbitMQ drops it; released, it
            // would come back here for ever. Said in the log, with why.
            tracing::error!(queue = %self.spec.queue, error = %why, "amqp10 receiver rejected a message it cannot decode");
            let condition = definitions::Error::new(AmqpError::DecodeError, Some(why), None);
            if let Err(err) = link.reject(info, condition).await {
                tracing::warn!(queue = %self.spec.queue, error = %err, "amqp10 receiver: reject failed");
                return Step::LinkLost;
            }
        }
        match step {
            Step::Continue => self.top_up(link).await,
            other => other,
        }
    }

    /// One result of the link's `recv`: a delivery for the burst, one to reject, or
    /// the link lost.
    fn take_in(&mut self, received: Received) -> Step {
        match received {
            Ok(delivery) => self.deliver(delivery),
            Err(RecvError::MessageDecode(unreadable)) => {
                self.credit = self.credit.saturating_sub(1);
                self.unreadable
                    .push((unreadable.info, unreadable.source.to_string()));
                Step::Continue
            }
            Err(RecvError::MessageSizeExceeded(too_large)) => {
                // fe2o3-amqp refuses it by detaching the link, so the broker keeps it
                // and offers it again first at every re-attach: the queue is blocked
                // until someone removes it or raises the limit. Said plainly.
                tracing::error!(
                    queue = %self.spec.queue,
                    size = too_large.size,
                    max_message_size = too_large.max_size,
                    "amqp10 receiver refused a delivery larger than max_message_size; the broker keeps it and the queue waits behind it (remove it, or raise max_message_size, up to 128 MiB)"
                );
                Step::LinkLost
            }
            Err(err) => {
                tracing::warn!(queue = %self.spec.queue, error = %err, "amqp10 receiver link lost; re-attaching");
                Step::LinkLost
            }
        }
    }

    /// Maps one transfer into a delivery waiting in `burst`. Every body the link
    /// decoded is handed over, none refused (RabbitMQ drops a refused message: see
    /// `crate::body`), but one Artemis mangled, which it keeps whole when it is rejected.
    fn deliver(&mut self, delivery: fe2o3_amqp::link::delivery::Delivery<Body<RawValue>>) -> Step {
        let info = DeliveryInfo::from(&delivery);
        let delivery_id = info.delivery_id();
        self.credit = self.credit.saturating_sub(1);
        // Only Artemis keeps what it is refused; another broker would drop it.
        if self.spec.profile == Profile::Artemis
            && let Some(why) = crate::mapping::mangled_by_artemis(delivery.message())
        {
            self.unreadable.push((info, why));
            return Step::Continue;
        }
        let message = crate::mapping::from_amqp(delivery.into_message());
        let Some(control) = self.control.upgrade() else {
            return Step::Stop(None);
        };
        self.unsettled.insert(delivery_id, info);
        let acker = LinkAcker {
            control,
            epoch: self.epoch,
            current_epoch: Arc::clone(&self.current_epoch),
            delivery_id,
            message_id: message.id.clone(),
        };
        self.buffered.fetch_add(1, Ordering::AcqRel);
        self.burst.push(Delivery::new(message, Box::new(acker)));
        Step::Continue
    }

    /// Performs `control` and every settlement waiting behind it (up to 1024): the
    /// releases at once in one disposition, the accepts joining the waiting ones, sent
    /// once [`GATHER_COUNT`] wait. A settlement of an earlier link is dropped: its
    /// delivery went back to the queue with that link.
    async fn handle(&mut self, link: &mut Receiver, control: Control) -> Step {
        let mut releases = Vec::new();
        let mut stop = None;
        let mut next = Some(control);
        let mut taken = 0;
        while let Some(control) = next.take() {
            if let Some(reply) = self.take_settlement(control, &mut releases) {
                stop = Some(reply);
                break;
            }
            taken += 1;
            if taken < 1024 {
                next = self.control_rx.try_recv().ok();
            }
        }
        if !releases.is_empty()
            && let Err(e) = link.release_all(releases).await
        {
            tracing::warn!(queue = %self.spec.queue, error = %e, "amqp10 receiver: releases not sent, the link is lost (the broker returns them when the link ends)");
            // A cancel taken with them still stops the task: its reply, dropped, read
            // as done, and its caller then waited for a task that attached again.
            return match stop {
                Some(reply) => Step::Stop(Some(reply)),
                None => Step::LinkLost,
            };
        }
        if let Some(reply) = stop {
            return Step::Stop(Some(reply));
        }
        if self.accepts.len() >= GATHER_COUNT
            && let Step::LinkLost = self.send_accepts(link).await
        {
            return Step::LinkLost;
        }
        self.top_up(link).await
    }

    /// Takes one settlement off `unsettled`: an accept joins the waiting ones, a
    /// release goes into `releases`. Returns a cancel's reply.
    fn take_settlement(
        &mut self,
        control: Control,
        releases: &mut Vec<DeliveryInfo>,
    ) -> Option<oneshot::Sender<Result<()>>> {
        match control {
            Control::Cancel(reply) => return Some(reply),
            Control::Settle {
                epoch,
                delivery_id,
                accept,
            } => {
                if epoch == self.epoch
                    && let Some(info) = self.unsettled.remove(&delivery_id)
                {
                    if accept {
                        if self.accepts.is_empty() {
                            let deadline = tokio::time::Instant::now() + GATHER_TIME;
                            self.flush.as_mut().reset(deadline);
                        }
                        self.accepts.push(info);
                    } else {
                        releases.push(info);
                    }
                }
            }
        }
        None
    }

    /// Sends the waiting accepts in one disposition.
    async fn send_accepts(&mut self, link: &Receiver) -> Step {
        if self.accepts.is_empty() {
            return Step::Continue;
        }
        let accepts = std::mem::take(&mut self.accepts);
        if let Err(e) = link.accept_all(accepts).await {
            tracing::warn!(queue = %self.spec.queue, error = %e, "amqp10 receiver: acks not sent, the link is lost; those messages will be redelivered");
            return Step::LinkLost;
        }
        Step::Continue
    }

    /// Gives back credit for settled deliveries: `unsettled + credit <= prefetch`.
    async fn top_up(&mut self, link: &mut Receiver) -> Step {
        let held = u32::try_from(self.unsettled.len()).unwrap_or(u32::MAX);
        let window = CreditWindow {
            prefetch: self.spec.prefetch,
            overshoots: self.spec.profile.credit_overshoots(),
        };
        let starving = self.buffered.load(Ordering::Acquire) == 0;
        let Some(target) = window.grant(held, self.credit, starving) else {
            return Step::Continue;
        };
        // The broker learns of the settlements this credit is for before the credit
        // itself, so it never has more than `prefetch` out unsettled.
        if let Step::LinkLost = self.send_accepts(link).await {
            return Step::LinkLost;
        }
        if let Err(err) = link.set_credit(target).await {
            tracing::warn!(queue = %self.spec.queue, error = %err, "amqp10 receiver: granting credit failed");
            return Step::LinkLost;
        }
        self.credit = target;
        Step::Continue
    }

    /// Sends the settlements handed over before a stop, ahead of releasing the rest:
    /// an ack its handler was told went through must not come back as a release.
    /// Returns the replies of cancels found among them, to answer once stopped.
    async fn settle_handed_over(&mut self, link: &Receiver) -> Vec<oneshot::Sender<Result<()>>> {
        let mut cancels = Vec::new();
        // A release is what the stop does to every unsettled delivery anyway: the
        // ones taken here go back with the rest.
        let mut releases = Vec::new();
        while let Ok(control) = self.control_rx.try_recv() {
            cancels.extend(self.take_settlement(control, &mut releases));
        }
        self.unsettled
            .extend(releases.into_iter().map(|info| (info.delivery_id(), info)));
        // Not sent (the link is lost): said in the log, and the broker redelivers them.
        let _ = self.send_accepts(link).await;
        cancels
    }

    async fn release_all(&mut self, link: &Receiver) {
        let held: Vec<DeliveryInfo> = self.unsettled.drain().map(|(_, info)| info).collect();
        if !held.is_empty()
            && let Err(err) = link.release_all(held).await
        {
            tracing::warn!(queue = %self.spec.queue, error = %err, "amqp10 receiver: releasing on cancel failed (the broker returns them when the link ends)");
        }
    }
}

/// When a receiver gives credit back, and how much.
#[derive(Debug, Clone, Copy)]
struct CreditWindow {
    prefetch: u32,
    /// The broker may send more than the credit it was given when a flow crosses
    /// deliveries in flight (RabbitMQ 3.x).
    overshoots: bool,
}

impl CreditWindow {
    /// The credit to grant now, given the deliveries still unsettled (`held`), the
    /// credit the broker still has, and whether the consumer has taken every delivery
    /// handed to it (`starving`); `None` for no flow.
    fn grant(self, held: u32, credit: u32, starving: bool) -> Option<u32> {
        let target = self.prefetch.saturating_sub(held);
        let threshold = (self.prefetch / 2).max(1);
        let flow = if self.overshoots {
            // RabbitMQ 3.x computes the new credit without the deliveries still on
            // their way to us and sends that many more, which fe2o3 refuses as a
            // transfer-limit violation. Granting only when nothing is in flight keeps
            // its count right; a consumer that has taken everything gets what is free
            // at once, one that has work buffered waits for half the prefetch.
            credit == 0 && target > 0 && (target >= threshold || starving)
        } else {
            // Half the window at a time, as fe2o3's own automatic credit does. Not
            // on every settlement of a consumer that keeps up: that was a flow frame
            // per ack, and halved the rate on Artemis (docs/performance.md, "Broker
            // drivers").
            target > credit && (target - credit >= threshold || credit == 0)
        };
        flow.then_some(target)
    }
}

/// The answer to settling a delivery of a link that is gone: the broker has it back.
fn lost_link_settlement(accept: bool) -> Result<()> {
    if accept {
        Err(Error::internal(
            "the connection was lost before the ack; the message will be redelivered",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::CreditWindow;

    const EXACT: CreditWindow = CreditWindow {
        prefetch: 1000,
        overshoots: false,
    };
    const OVERSHOOTS: CreditWindow = CreditWindow {
        prefetch: 1000,
        overshoots: true,
    };

    #[test]
    fn a_consumer_that_keeps_up_gets_credit_half_a_window_at_a_time() {
        // 300 delivered and settled, nothing buffered: 700 still granted, no flow.
        assert_eq!(EXACT.grant(0, 700, true), None);
        // 500 settled: the window is topped up.
        assert_eq!(EXACT.grant(0, 500, true), Some(1000));
        assert_eq!(EXACT.grant(0, 0, false), Some(1000));
    }

    #[test]
    fn credit_never_lets_unsettled_deliveries_pass_the_prefetch() {
        for held in [0, 1, 499, 500, 999, 1000, 5000] {
            for credit in [0, 1, 250, 500, 1000] {
                for starving in [false, true] {
                    for window in [EXACT, OVERSHOOTS] {
                        if let Some(granted) = window.grant(held, credit, starving) {
                            assert!(
                                held + granted <= window.prefetch,
                                "{window:?}: {held} held + {granted} granted"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_broker_that_overshoots_gets_credit_only_once_all_granted_arrived() {
        assert_eq!(OVERSHOOTS.grant(0, 1, true), None);
        assert_eq!(OVERSHOOTS.grant(0, 0, false), Some(1000));
        // Work buffered and most of the window unsettled: wait for half of it.
        assert_eq!(OVERSHOOTS.grant(800, 0, false), None);
        // Nothing buffered: what is free, at once.
        assert_eq!(OVERSHOOTS.grant(800, 0, true), Some(200));
    }
}
