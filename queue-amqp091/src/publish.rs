//! Publishing in confirm mode with a bounded, pipelined window.
//!
//! Every message is sent `mandatory` to the default exchange with its queue's name
//! as routing key (or its delay queue's), persistent. A window permit is taken
//! before sending and given back when the broker's confirm arrives, so at most
//! `confirm_window` messages wait for confirms at once and a batch never waits for
//! one round trip per message. Outcomes:
//!
//! * broker ack → `Ok`;
//! * a basic.return (unroutable: the queue was deleted on the broker) → the queue is
//!   declared again, `INTERNAL`, retryable, or `NOT_FOUND` when it cannot be
//!   ([`crate::topology::Topology::declare_again_after_return`]); a return is paired
//!   with its publish by message id as the connection's reader reads it, whichever
//!   confirm lapin gave it to ([`crate::returns`]); a publish whose pairing cannot be
//!   told → `INTERNAL`, retryable;
//! * broker nack (a full `reject-publish` queue, a broker error) → `INTERNAL`, retryable;
//! * channel or connection closed before the confirm, no connection, window slot,
//!   publishing channel, write or confirm within `publish_timeout` → `INTERNAL`,
//!   retryable (the error says whether the message was sent: one not yet written
//!   may still be, see [`Stage`]).
//!
//! A nack also retires the publishing channel (at most once per [`RETIRE_EVERY`]):
//! RabbitMQ 3.10 nacks every later publish of a channel whose first publish to a
//! quorum queue found the node of the queue's recorded leader down (a SIGKILLed
//! node, before the cluster has recorded the new leader), for as long as the
//! channel lives. A new channel looks the leader up again.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};
use queue_core::{Error, ErrorKind, Message, QueueId, QueueSpec, Result};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::{Instant, Sleep};

use crate::connection::{Connection, Link};
use crate::returns::{Outcome, Paired, Pairing};
use crate::topology::{Topology, queue_name};
use crate::{error, lock, mapping};

/// How often a nack may retire the publishing channel.
const RETIRE_EVERY: Duration = Duration::from_secs(1);

/// The publishing side of a driver: one confirm-mode channel per link, shared by
/// every publisher, and the window of unconfirmed messages.
pub(crate) struct Publisher {
    conn: Arc<Connection>,
    topology: Arc<Topology>,
    /// Bounds the published-but-unconfirmed messages (`confirm_window`).
    window: Semaphore,
    timeout: Duration,
    /// The confirm-mode channel, read under a plain lock: a publish takes an `Arc`
    /// of it, where a clone and a drop of lapin's `Channel` were about forty atomic
    /// writes to memory lapin's I/O loop writes too.
    channel: std::sync::Mutex<Option<Arc<PublishingChannel>>>,
    /// Held while a channel is opened, so that the publishes that come meanwhile wait
    /// for that one rather than open their own.
    opening: tokio::sync::Mutex<()>,
    /// When a nack last retired the channel.
    retired: std::sync::Mutex<Option<Instant>>,
}

/// A confirm-mode channel, the generation of the link it is on, and the pairing of
/// its returns with its publishes.
struct PublishingChannel {
    generation: u64,
    channel: Channel,
    returns: Arc<Pairing>,
}

/// A message ready for the wire.
struct Prepared {
    id: String,
    delay_ms: Option<u64>,
    properties: BasicProperties,
    body: Vec<u8>,
}

/// Where a message goes: the link and its publishing channel, and the routing key.
struct Route {
    link: Arc<Link>,
    channel: Arc<PublishingChannel>,
    routing: ShortString,
}

/// A message written to its channel, its confirm still to come.
struct Sent {
    channel: Arc<PublishingChannel>,
    confirm: Outcome,
    /// The delay queue it went to, if it has a delay.
    delay_queue: Option<ShortString>,
}

/// What a publish was waiting for when its `publish_timeout` ran out: each says a
/// different thing about whether the message may still arrive.
#[derive(Clone, Copy)]
enum Stage {
    Window,
    /// A connection, its publishing channel, and the message's delay queue if it
    /// has a delay: nothing is sent yet.
    Route,
    /// From `basic.publish` on: lapin holds the frames, and may write them later.
    Write,
    Confirm,
}

impl Stage {
    /// The error of a publish whose `publish_timeout` ran out at this stage.
    fn timed_out(self, queue: &QueueId, id: &str, timeout: Duration) -> Error {
        Error::internal(match self {
            Self::Window => format!(
                "publish to {queue}: the confirm window stayed full for publish_timeout {timeout:?}"
            ),
            // The waits of this stage have their own errors at the same deadline; this
            // one is said when the publish's timer fires first.
            Self::Route => format!(
                "publish to {queue}: not sent within publish_timeout {timeout:?}: no connection to the broker, no publishing channel open on it, or its delay queue not declared yet"
            ),
            // lapin queues the frames when the publish is first polled and writes them
            // when it can (not during a resource alarm): dropping the publish does not
            // take them back, so the message may still reach the queue. Said so: a
            // caller that publishes again may make a duplicate, as after a lost confirm.
            Self::Write => format!(
                "publish to {queue}: not written within publish_timeout {timeout:?} (the broker is not reading: a resource alarm, or a hung connection); it may still be written later, so publishing again may duplicate it"
            ),
            Self::Confirm => format!(
                "publish to {queue}: message {id} not confirmed within publish_timeout {timeout:?}"
            ),
        })
    }
}

impl Publisher {
    pub(crate) fn new(conn: Arc<Connection>, topology: Arc<Topology>) -> Publisher {
        let config = conn.config();
        Publisher {
            window: Semaphore::new(config.confirm_window),
            timeout: config.publish_timeout,
            conn,
            topology,
            channel: std::sync::Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            retired: std::sync::Mutex::new(None),
        }
    }

    /// Publishes one message: `Ok` once it is confirmed. Its whole life (a window
    /// slot, the route, the write, the confirm) runs under one timer, registered and
    /// cancelled on every publish (a batch shares one among its messages).
    pub(crate) async fn publish_one(&self, queue: &QueueId, message: Message) -> Result<()> {
        let spec = self.topology.spec_of(queue, "publish to")?;
        let routing = queue_name(&spec.name)?;
        let deadline = queue_core::deadline_after(self.timeout);
        let mut prepared = prepare(message)?;
        let mut stage = Stage::Window;
        let published = async {
            let permit = self.slot().await?;
            stage = Stage::Route;
            let route = self
                .route(queue, &spec, routing, &prepared, deadline)
                .await?;
            stage = Stage::Write;
            let sent = self.write(queue, route, &mut prepared).await?;
            stage = Stage::Confirm;
            let outcome = self.confirmed(queue, &prepared.id, sent, deadline).await;
            drop(permit);
            outcome
        };
        let outcome = tokio::time::timeout_at(deadline, published).await;
        outcome.unwrap_or_else(|_| Err(stage.timed_out(queue, &prepared.id, self.timeout)))
    }

    /// Publishes messages pipelined; `Ok` once every one is confirmed. After the first
    /// failure no further message is started (the one being sent when it is seen goes
    /// on and is counted), the ones in flight are awaited, and the first error is
    /// returned with how many were confirmed.
    ///
    /// The confirms are awaited oldest first, the order the broker sends them in on a
    /// channel, under one timer for the whole batch ([`InFlight`]): a timer for each
    /// message's write and another for its confirm, and a task for each confirm, were
    /// a fifth of the driver's CPU per confirmed publish (docs/performance.md).
    pub(crate) async fn publish_all(&self, queue: &QueueId, messages: Vec<Message>) -> Result<()> {
        let spec = self.topology.spec_of(queue, "publish to")?;
        let routing = queue_name(&spec.name)?;
        let total = messages.len();
        let mut in_flight = InFlight::new(self.timeout);
        for message in messages {
            let deadline = queue_core::deadline_after(self.timeout);
            let mut prepared = match prepare(message) {
                Ok(prepared) => prepared,
                Err(e) => {
                    in_flight.record(Err(e));
                    break;
                }
            };
            let mut stage = Stage::Window;
            let sent = {
                let send = async {
                    let permit = self.slot().await?;
                    stage = Stage::Route;
                    let route = self
                        .route(queue, &spec, routing.clone(), &prepared, deadline)
                        .await?;
                    stage = Stage::Write;
                    let sent = self.write(queue, route, &mut prepared).await?;
                    Ok::<_, Error>((permit, sent))
                };
                tokio::pin!(send);
                // Settles the confirms that come while this one waits for its slot.
                loop {
                    let next = poll_fn(|cx| in_flight.poll_next(send.as_mut(), deadline, cx));
                    match next.await {
                        Next::Oldest(decided) => in_flight.settle(self, queue, decided).await,
                        Next::Sent(sent) => break Some(sent),
                        Next::SendTimedOut => break None,
                    }
                }
            };
            match sent {
                Some(Ok((permit, sent))) => in_flight.wait_for(Waiting {
                    id: prepared.id,
                    permit,
                    sent,
                    deadline,
                }),
                Some(Err(e)) => in_flight.record(Err(e)),
                None => {
                    let e = stage.timed_out(queue, &prepared.id, self.timeout);
                    in_flight.record(Err(e));
                }
            }
            if in_flight.failed() {
                break;
            }
        }
        while let Some(decided) = poll_fn(|cx| in_flight.poll_oldest(cx)).await {
            in_flight.settle(self, queue, decided).await;
        }
        in_flight.result(total)
    }

    /// At a close, before the connection goes: waits up to `limit` until every
    /// publish holding a window slot has its outcome, then refuses the ones still
    /// waiting for a slot ("the driver is closed"). Closing the connection under a
    /// publish the broker had taken, before its confirm came back, reported that
    /// publish failed: a duplicate when its publisher tried again.
    pub(crate) async fn settle_sent(&self, limit: Duration) {
        let slots = u32::try_from(self.conn.config().confirm_window).unwrap_or(u32::MAX);
        // The semaphore is fair: publishes that come for a slot after this wait
        // behind it, so it ends once the ones already sent are settled.
        let all = tokio::time::timeout(limit, self.window.acquire_many(slots)).await;
        self.window.close();
        drop(all);
    }

    /// A slot in the confirm window, once one is free.
    async fn slot(&self) -> Result<SemaphorePermit<'_>> {
        self.window
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Canceled, "the driver is closed"))
    }

    /// The confirm-mode channel on `link`, reopened if a channel error closed it.
    async fn channel(
        &self,
        link: &Link,
    ) -> std::result::Result<Arc<PublishingChannel>, lapin::Error> {
        if let Some(open) = self.open_channel(link) {
            return Ok(open);
        }
        let _opening = self.opening.lock().await;
        // Another publish may have opened it while this one waited.
        if let Some(open) = self.open_channel(link) {
            return Ok(open);
        }
        // A channel whose returns can no longer be paired is replaced, whenever it
        // became so (a nack's replacement waits `RETIRE_EVERY`; this one cannot).
        let worn = {
            let mut slot = lock(&self.channel);
            match slot.as_ref() {
                Some(current) if current.returns.needs_replacing() => slot.take(),
                _ => None,
            }
        };
        if let Some(worn) = worn {
            tracing::debug!(
                channel = worn.channel.id(),
                "a return could not be paired, or many publishes were given up, on the publishing channel; opening a new one"
            );
            self.close_once_confirmed(
                worn.channel.clone(),
                "replaced: its returns can no longer be paired",
            );
        }
        let channel = link.connection.create_channel().await?;
        channel.confirm_select(Default::default()).await?;
        let open = Arc::new(PublishingChannel {
            generation: link.generation,
            returns: link.returns.pairing_for(channel.id()),
            channel,
        });
        *lock(&self.channel) = Some(Arc::clone(&open));
        Ok(open)
    }

    /// The publishing channel, if it is on `link` and open.
    fn open_channel(&self, link: &Link) -> Option<Arc<PublishingChannel>> {
        let open = lock(&self.channel).clone()?;
        // A worn channel is replaced, but not while the broker blocks the connection
        // (a resource alarm): no channel opens then, and each open given up at its
        // caller's timeout kept its channel number until the alarm ended.
        let replace = open.returns.needs_replacing() && !link.connection.status().blocked();
        let usable =
            open.generation == link.generation && open.channel.status().connected() && !replace;
        usable.then_some(open)
    }

    /// Where to publish: the link and its publishing channel (opened if there is
    /// none), and the routing key, the queue's own or its delay queue's for a message
    /// with a delay (declared first, if it is not yet). Waits for a link and for the
    /// declaration until `deadline` at most; opening the channel has its caller's
    /// timer only.
    async fn route(
        &self,
        queue: &QueueId,
        spec: &QueueSpec,
        routing: ShortString,
        prepared: &Prepared,
        deadline: Instant,
    ) -> Result<Route> {
        // Only error messages name the operation: build the text only for them.
        let what = || format!("publish to {queue}");
        let link = match self.conn.live_link() {
            Some(link) => link,
            None => self.conn.link_until(&what(), deadline).await?,
        };
        link.unblocked_until(&what(), deadline).await?;
        let routing = match prepared.delay_ms {
            None => routing,
            Some(ms) => {
                let declared = self.topology.delay_queue(&link, spec, ms);
                let Ok(name) = tokio::time::timeout_at(deadline, declared).await else {
                    return Err(Error::internal(format!(
                        "{}: its delay queue was not declared within publish_timeout {:?}",
                        what(),
                        self.timeout
                    )));
                };
                // A delay queue an earlier version declared with an expiry refuses
                // this declaration until it expires by itself, which it will: retried,
                // as docs/drivers/amqp091.md says, not dead-lettered at the first
                // failure. Any other clash stays (a type changed, a queue made by
                // hand) and is not retried.
                let name = name.map_err(|e| match expires_by_itself(&e) {
                    true => e.retryable_if(true),
                    false => e,
                })?;
                queue_name(&name)?
            }
        };
        let channel = self
            .channel(&link)
            .await
            .map_err(|e| publish_failure(&link, &what(), e))?;
        Ok(Route {
            link,
            channel,
            routing,
        })
    }

    /// Writes one message on its route (its properties are taken, not cloned: a
    /// message is written once); the confirm is still to come. Unbounded by itself:
    /// its caller's timer bounds it, and its error says the message may still be
    /// written ([`Stage::timed_out`]).
    async fn write(&self, queue: &QueueId, route: Route, prepared: &mut Prepared) -> Result<Sent> {
        let Route {
            link,
            channel,
            routing,
        } = route;
        content_header_fits(&link, &prepared.properties)
            .map_err(|e| e.context(format!("publish to {queue}")))?;
        let delay_queue = prepared.delay_ms.map(|_| routing.clone());
        let written = channel.channel.basic_publish(
            "".into(),
            routing,
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &prepared.body,
            std::mem::take(&mut prepared.properties),
        );
        match channel.returns.publish(&prepared.id, written).await {
            Ok(confirm) => Ok(Sent {
                confirm,
                channel,
                delay_queue,
            }),
            Err(e) => Err(publish_failure(&link, &format!("publish to {queue}"), e)),
        }
    }

    /// The outcome of a written message, once its confirm is in. A return declares
    /// its queue again, until `deadline` at most.
    async fn confirmed(
        &self,
        queue: &QueueId,
        id: &str,
        mut sent: Sent,
        deadline: Instant,
    ) -> Result<()> {
        let confirm = (&mut sent.confirm).await;
        self.outcome(queue, id, confirm, &sent, deadline).await
    }

    /// The outcome of a written message whose confirm is `confirm`. A return declares
    /// its queue again, until `deadline` at most.
    async fn outcome(
        &self,
        queue: &QueueId,
        id: &str,
        confirm: lapin::Result<Paired>,
        sent: &Sent,
        deadline: Instant,
    ) -> Result<()> {
        let what = || format!("publish to {queue}");
        match confirm {
            Ok(Paired::Stored) => Ok(()),
            // Its delay queue was deleted on the broker (by hand, by an `expires`
            // policy) while this driver counted it declared: not the queue missing, and
            // declared again by the next publish. As NOT_FOUND, every retry with that
            // delay was dead-lettered at its first failure.
            Ok(Paired::Returned {
                reply_code,
                reply_text,
            }) if let Some(delay_queue) = &sent.delay_queue => {
                self.topology.forget_delay_queue(delay_queue.as_str());
                Err(Error::internal(format!(
                    "{}: the broker returned message {id} as unroutable ({reply_code} {reply_text}): its delay queue {delay_queue} is gone from the broker; it is declared again at the next publish",
                    what()
                )))
            }
            Ok(Paired::Returned {
                reply_code,
                reply_text,
            }) => {
                let returned = format!(
                    "{}: the broker returned message {id} as unroutable ({reply_code} {reply_text})",
                    what()
                );
                let declared = match self.conn.live_link() {
                    Some(link) => {
                        let declaring = self.topology.declare_again_after_return(&link, queue);
                        match tokio::time::timeout_at(deadline, declaring).await {
                            Ok(declared) => declared,
                            Err(_) => Err(Error::internal(format!(
                                "not declared within publish_timeout {:?}",
                                self.timeout
                            ))),
                        }
                    }
                    None => Err(Error::internal("no connection to declare it on")),
                };
                Err(match declared {
                    Ok(()) => Error::internal(format!(
                        "{returned}: the queue was missing on the broker (deleted?) and is declared again as it was declared; message {id} was not stored: publish it again"
                    ))
                    .retryable_if(true),
                    Err(e) if e.retryable() => Error::internal(format!(
                        "{returned}: the queue was missing on the broker (deleted?), and declaring it again failed for now ({}); message {id} was not stored",
                        e.message()
                    ))
                    .retryable_if(true),
                    Err(e) => Error::not_found(format!(
                        "{returned}: the queue does not exist on the broker, and declaring it again failed: {}",
                        e.message()
                    )),
                })
            }
            Ok(Paired::Uncertain) => Err(Error::internal(format!(
                "{}: whether the broker returned message {id} as unroutable cannot be told (a return with its id may be another publish's of the same id, or a return on its channel could not be read or paired); message {id} is not known to be stored",
                what()
            ))),
            Ok(Paired::Refused) => {
                self.retire(&sent.channel);
                Err(Error::internal(format!(
                    "{}: the broker refused message {id} (nack): the queue is full (max_length) or the broker could not store it",
                    what()
                )))
            }
            Ok(Paired::NotRequested) => Err(Error::internal(format!(
                "{}: the channel was not in confirm mode; message {id} is not known to be stored",
                what()
            ))),
            Err(e) => {
                if let Some(link) = self.conn.current() {
                    link.saw(&e);
                }
                Err(unconfirmed(&what(), e))
            }
        }
    }
}

impl Publisher {
    /// Stops publishing on `channel` after a nack (see the module docs); the next
    /// publish opens a new one. The old one closes once its confirms are in.
    fn retire(&self, channel: &Arc<PublishingChannel>) {
        {
            let mut retired = lock(&self.retired);
            if retired.is_some_and(|at| at.elapsed() < RETIRE_EVERY) {
                return;
            }
            *retired = Some(Instant::now());
        }
        let old = {
            let mut slot = lock(&self.channel);
            match slot.as_ref() {
                Some(current) if Arc::ptr_eq(current, channel) => slot.take(),
                _ => None,
            }
        };
        let Some(old) = old else { return };
        tracing::debug!(
            channel = old.channel.id(),
            "publishing channel got a nack; opening a new one"
        );
        self.close_once_confirmed(old.channel.clone(), "replaced after a nack");
    }

    /// Closes a publishing channel taken out of use once its confirms are in (at
    /// most `publish_timeout`), so that the publishes still waiting on it get them.
    fn close_once_confirmed(&self, old: Channel, why: &'static str) {
        let timeout = self.timeout;
        self.conn.tasks().spawn(async move {
            let _ = tokio::time::timeout(timeout, old.wait_for_confirms()).await;
            let closing = old.close(200, why.into());
            let _ = tokio::time::timeout(crate::connection::CLOSE_TIMEOUT, closing).await;
        });
    }
}

/// Whether a refused delay-queue declaration clashes only with an existing queue's
/// `x-expires` (RabbitMQ: "inequivalent arg 'x-expires' ... but current is the value
/// ..."): that queue goes away by itself once unused.
fn expires_by_itself(refusal: &Error) -> bool {
    let said = refusal.message();
    refusal.is(ErrorKind::AlreadyExists)
        && said.contains("inequivalent arg 'x-expires'")
        && !said.contains("but current is none")
}

fn prepare(message: Message) -> Result<Prepared> {
    let delay_ms = message
        .headers
        .delay()?
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .filter(|ms| *ms > 0);
    let expiration = match delay_ms {
        // The delay hop: never expire before the delay is over (RabbitMQ drops the
        // expiration when it dead-letters, so the ttl does not apply a second time).
        // Both are at most MAX_MILLIS; their sum may not be, and RabbitMQ closes the
        // channel of a publish with a longer expiration.
        Some(d) => message.headers.ttl()?.map(|t| {
            d.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
                .min(queue_core::MAX_MILLIS)
        }),
        None => None,
    };
    let properties = mapping::to_properties(&message, expiration)?;
    Ok(Prepared {
        id: message.id,
        delay_ms,
        properties,
        body: message.body,
    })
}

/// A message's properties and headers travel in one frame (its content header),
/// which RabbitMQ takes only within the connection's `frame_max` (less the frame's own
/// 8 bytes): a larger one ends the whole connection (`FRAME_ERROR`), failing every
/// publish and consumer on it (docs/drivers/amqp091.md, "Publishing").
fn content_header_fits(link: &Link, properties: &BasicProperties) -> Result<()> {
    /// A content header's class, weight and body size, before the properties.
    const BEFORE_PROPERTIES: usize = 12;
    const FRAME_OVERHEAD: usize = 8;
    let frame_max = link.connection.configuration().frame_max();
    let room = usize::try_from(frame_max)
        .unwrap_or(usize::MAX)
        .saturating_sub(FRAME_OVERHEAD);
    let encoded = cookie_factory::r#gen(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .map_err(|e| Error::invalid(format!("the message's properties cannot be encoded: {e}")))?;
    let needs = BEFORE_PROPERTIES + encoded.0.len();
    if frame_max == 0 || needs <= room {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "the message's properties and headers take {needs} bytes, more than one frame holds \
         on this connection ({room}: its frame_max of {frame_max} less 8); send less in \
         headers (the body has no such limit) or raise the URL's frame_max"
    )))
}

fn publish_failure(link: &Link, what: &str, e: lapin::Error) -> Error {
    link.saw(&e);
    unconfirmed(what, e)
}

/// Any failure of the channel or connection leaves the publish unconfirmed:
/// INTERNAL and retryable, whatever lapin called it, but for a refusal of the user's
/// rights (403 `ACCESS_REFUSED`): every publish goes through the default exchange,
/// whose write permission is the user's for the whole vhost, so it holds for each
/// publish the closed channel fails, and trying again cannot help. Retried, a
/// handler's failures went round their backoffs and dead-lettered every message with
/// an `INTERNAL` reason (review).
fn unconfirmed(what: &str, e: lapin::Error) -> Error {
    let refused = error::reply_code(&e) == Some(ACCESS_REFUSED);
    let mapped = error::map(what, e);
    if refused && mapped.kind() == ErrorKind::PermissionDenied {
        return mapped;
    }
    Error::internal(format!("{} (message not confirmed)", mapped.message()))
}

/// AMQP's reply code for an operation the user's permissions do not allow.
const ACCESS_REFUSED: u16 = 403;

/// The messages of a batch written and waiting for their confirms, oldest first, and
/// what became of the ones before them.
///
/// One timer serves the whole batch: it is set to the oldest waiting message's
/// deadline, or, when none waits, to the deadline of the message being sent. The
/// deadlines come in the order the messages were started, so the timer only ever
/// moves later while it runs, which tokio does in place, without taking its timer
/// wheel's lock.
struct InFlight<'a> {
    waiting: VecDeque<Waiting<'a>>,
    timer: Pin<Box<Sleep>>,
    confirmed: usize,
    first_error: Option<Error>,
}

/// A message written, its confirm still to come.
struct Waiting<'a> {
    id: String,
    permit: SemaphorePermit<'a>,
    sent: Sent,
    deadline: Instant,
}

/// How the oldest message waiting was decided.
enum Decided {
    /// Its confirm came.
    Confirmed(lapin::Result<Paired>),
    /// Its deadline passed first.
    TimedOut,
}

/// What came first while a message was being sent.
enum Next<T> {
    /// The oldest message waiting is decided.
    Oldest(Decided),
    /// The message being sent is written, or failed.
    Sent(T),
    /// The message being sent ran out of time before it was written.
    SendTimedOut,
}

impl<'a> InFlight<'a> {
    fn new(timeout: Duration) -> Self {
        InFlight {
            waiting: VecDeque::new(),
            timer: Box::pin(tokio::time::sleep_until(queue_core::deadline_after(
                timeout,
            ))),
            confirmed: 0,
            first_error: None,
        }
    }

    fn wait_for(&mut self, written: Waiting<'a>) {
        self.waiting.push_back(written);
    }

    fn failed(&self) -> bool {
        self.first_error.is_some()
    }

    /// Polls the oldest message's confirm, and the timer at its deadline: `None` once
    /// none waits. The message stays the oldest until it is settled.
    fn poll_oldest(&mut self, cx: &mut Context<'_>) -> Poll<Option<Decided>> {
        let Some(oldest) = self.waiting.front_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(confirm) = Pin::new(&mut oldest.sent.confirm).poll(cx) {
            return Poll::Ready(Some(Decided::Confirmed(confirm)));
        }
        let deadline = oldest.deadline;
        ready!(self.poll_timer(deadline, cx));
        Poll::Ready(Some(Decided::TimedOut))
    }

    /// Polls the oldest message waiting, then `send`, the message being sent, whose
    /// time runs out at `deadline` (the timer's, when no older message waits).
    fn poll_next<T>(
        &mut self,
        send: Pin<&mut impl Future<Output = T>>,
        deadline: Instant,
        cx: &mut Context<'_>,
    ) -> Poll<Next<T>> {
        if let Poll::Ready(Some(decided)) = self.poll_oldest(cx) {
            return Poll::Ready(Next::Oldest(decided));
        }
        if let Poll::Ready(sent) = send.poll(cx) {
            return Poll::Ready(Next::Sent(sent));
        }
        if self.waiting.is_empty() {
            ready!(self.poll_timer(deadline, cx));
            return Poll::Ready(Next::SendTimedOut);
        }
        Poll::Pending
    }

    fn poll_timer(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if self.timer.deadline() != deadline {
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx)
    }

    /// Records the outcome of the oldest message, `decided`, and gives its window slot
    /// back.
    async fn settle(&mut self, publisher: &Publisher, queue: &QueueId, decided: Decided) {
        let Some(Waiting {
            id,
            permit,
            sent,
            deadline,
        }) = self.waiting.pop_front()
        else {
            return;
        };
        let outcome = match decided {
            Decided::Confirmed(confirm) => {
                publisher
                    .outcome(queue, &id, confirm, &sent, deadline)
                    .await
            }
            Decided::TimedOut => Err(Stage::Confirm.timed_out(queue, &id, publisher.timeout)),
        };
        // Its pairing learns it was given up before its slot goes to another.
        drop(sent);
        drop(permit);
        self.record(outcome);
    }

    fn record(&mut self, done: Result<()>) {
        match done {
            Ok(()) => self.confirmed += 1,
            Err(e) => {
                self.first_error.get_or_insert(e);
            }
        }
    }

    /// The batch's result once none waits: `Ok`, or the first error with how many of
    /// the `total` were confirmed.
    fn result(self, total: usize) -> Result<()> {
        match self.first_error {
            None => Ok(()),
            Some(e) => Err(e.in_batch(self.confirmed, total)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a publish that reached `basic.publish` may have its frames written after
    /// its timeout: only its error may warn of a duplicate.
    #[test]
    fn only_a_timeout_after_the_write_began_warns_that_the_message_may_arrive() {
        let queue = QueueId::parse("app:jobs").unwrap();
        let said = |stage: Stage| {
            let err = stage.timed_out(&queue, "m-1", Duration::from_secs(5));
            assert!(err.retryable(), "{err}");
            err.message().to_string()
        };
        for stage in [Stage::Window, Stage::Route] {
            assert!(!said(stage).contains("duplicate"), "{}", said(stage));
        }
        assert!(said(Stage::Route).contains("not sent"));
        assert!(said(Stage::Write).contains("may duplicate it"));
        assert!(said(Stage::Confirm).contains("message m-1 not confirmed"));
    }
}
