//! Sending: one sender link per queue, pipelined with a bounded window of unsettled
//! transfers. A publish is `Ok` only on the `accepted` outcome; `rejected`, `released`,
//! `modified`, a lost link and a timeout are errors (INTERNAL, retryable).
//!
//! Two tasks per queue: the *send* task owns the link, takes requests in order, waits
//! for a window slot and writes the transfer; the *outcome* task awaits the outcomes in
//! the same order and answers the callers. When a transfer cannot be written (the link
//! or connection is gone) the send task re-attaches — backing off while that fails —
//! and writes the same message again; a message whose outcome was lost with its link is
//! failed, never reported as sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fe2o3_amqp::Sendable;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::{SendError, Sender};
use fe2o3_amqp::types::messaging::{Data, Outcome, Target, TerminusDurability};
use queue_core::{Error, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::Profile;
use crate::connection::{Attached, CLOSE_TIMEOUT, Connector};
use crate::mapping::Outgoing;

struct SendRequest {
    sendable: Sendable<Data>,
    reply: oneshot::Sender<Result<()>>,
}

struct Pending {
    outcome: DeliveryFut<std::result::Result<Outcome, SendError>>,
    reply: oneshot::Sender<Result<()>>,
    _permit: OwnedSemaphorePermit,
}

/// What a sender link needs to (re-)attach.
#[derive(Debug, Clone)]
pub(crate) struct SenderSpec {
    pub queue: String,
    pub address: String,
    pub durable: bool,
    pub profile: Profile,
    pub window: u32,
    pub publish_timeout: Duration,
}

impl SenderSpec {
    fn target(&self) -> Target {
        let mut target = Target::builder()
            .address(self.address.clone())
            .durable(if self.durable {
                TerminusDurability::Configuration
            } else {
                TerminusDurability::None
            });
        if let Some(caps) = self.profile.terminus_capabilities() {
            target = target.capabilities(caps);
        }
        target.build()
    }
}

/// The publishing side of one queue.
pub(crate) struct QueueSender {
    requests: mpsc::Sender<SendRequest>,
    publish_timeout: Duration,
    queue: String,
    /// The send task's window: a permit per message sent and not yet settled.
    window: Arc<Semaphore>,
    window_size: u32,
    tasks: Vec<JoinHandle<()>>,
}

impl QueueSender {
    /// Attaches the first link now (so declare reports a missing queue or a refused
    /// address) and starts the tasks.
    pub async fn start(connector: Arc<Connector>, spec: SenderSpec) -> Result<QueueSender> {
        let attached = connector
            .attach_sender(connector.link_name("sender", &spec.queue), spec.target())
            .await
            .map_err(|e| e.context(format!("declare {}", spec.queue)))?;
        let window = spec.window.max(1) as usize;
        let (requests, rx) = mpsc::channel(window);
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        let tasks = connector.tasks();
        let outcomes = tasks.spawn(outcome_task(pending_rx));
        let window_permits = Arc::new(Semaphore::new(window));
        let task = SendTask {
            connector,
            spec: spec.clone(),
            window: Arc::clone(&window_permits),
            link: Some(attached),
            pending: pending_tx,
            declared: Instant::now(),
        };
        let sends = tasks.spawn(task.run(rx));
        Ok(QueueSender {
            requests,
            publish_timeout: spec.publish_timeout,
            queue: spec.queue,
            window: window_permits,
            window_size: u32::try_from(window).unwrap_or(u32::MAX),
            tasks: vec![sends, outcomes],
        })
    }

    /// Sends one message and waits for its outcome, at most `publish_timeout`.
    pub async fn send(&self, message: Outgoing) -> Result<()> {
        let deadline = queue_core::deadline_after(self.publish_timeout);
        let reply = self.enqueue(message, deadline).await?;
        self.wait(reply, deadline).await
    }

    /// Sends several messages pipelined; `Ok` once every one was accepted. Each message
    /// has `publish_timeout` from the moment it was handed to the link task.
    pub async fn send_all(&self, messages: Vec<Outgoing>) -> Result<()> {
        let total = messages.len();
        let mut replies = Vec::with_capacity(total);
        let mut first_error = None;
        for message in messages {
            let deadline = queue_core::deadline_after(self.publish_timeout);
            match self.enqueue(message, deadline).await {
                Ok(reply) => replies.push((reply, deadline)),
                Err(e) => {
                    first_error = Some(e);
                    break;
                }
            }
        }
        let mut accepted = 0;
        for (reply, deadline) in replies {
            match self.wait(reply, deadline).await {
                Ok(()) => accepted += 1,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.in_batch(accepted, total)),
            None => Ok(()),
        }
    }

    async fn enqueue(
        &self,
        message: Outgoing,
        deadline: tokio::time::Instant,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let (reply, rx) = oneshot::channel();
        let request = SendRequest {
            sendable: Sendable::from(message),
            reply,
        };
        match tokio::time::timeout_at(deadline, self.requests.send(request)).await {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(_)) => Err(crate::error::closed(&format!("publish to {}", self.queue))),
            Err(_) => Err(self.timed_out()),
        }
    }

    async fn wait(
        &self,
        reply: oneshot::Receiver<Result<()>>,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(result)) => result.map_err(|e| e.context(format!("publish to {}", self.queue))),
            Ok(Err(_)) => Err(crate::error::closed(&format!("publish to {}", self.queue))),
            // Dropping the receiver tells the send task not to send it if it has not yet.
            Err(_) => Err(self.timed_out()),
        }
    }

    fn timed_out(&self) -> Error {
        Error::internal(format!(
            "publish to {}: not accepted within {:?} (broker unreachable or slow); publish again",
            self.queue, self.publish_timeout
        ))
    }

    /// Waits, up to `limit`, until every message sent has its outcome, and holds the
    /// whole window so that nothing more is sent: a close that follows then fails
    /// only messages the broker never got. Closing the connection first failed
    /// publishes the broker had accepted, and a publisher that tried again made a
    /// duplicate (docs/drivers/amqp10.md, "Closing").
    pub async fn settle_sent(&self, limit: Duration) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let all = Arc::clone(&self.window).acquire_many_owned(self.window_size);
        tokio::time::timeout(limit, all).await.ok()?.ok()
    }

    /// Stops the tasks (pending publishes fail) and waits for them.
    pub async fn stop(self) {
        drop(self.requests);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// A sender's attach refused for good (a permission revoked, a queue redeclared
/// otherwise): what it said, and until when publishes are told it without trying.
struct Refusal {
    kind: queue_core::ErrorKind,
    message: String,
    until: Instant,
}

impl Refusal {
    fn again(&self) -> Error {
        Error::new(
            self.kind,
            format!(
                "{} (refused at the last attach; it is tried again after a back-off)",
                self.message
            ),
        )
    }
}

struct SendTask {
    connector: Arc<Connector>,
    spec: SenderSpec,
    window: Arc<Semaphore>,
    link: Option<Attached<Sender>>,
    pending: mpsc::UnboundedSender<Pending>,
    /// When the queue was last declared (a sender attached), on a broker that drops
    /// what reaches no queue ([`Profile::accepts_unroutable`]).
    declared: Instant,
}

/// How often a sender declares its queue again on a broker that accepts and drops a
/// transfer to a queue deleted there: what is published between a deletion and the
/// next declaration is lost (docs/drivers/amqp10.md, "Limits").
const DECLARE_AGAIN_EVERY: Duration = Duration::from_secs(5);

impl SendTask {
    /// Ends a link whose session has stopped. fe2o3-amqp fails the outcomes still
    /// pending on a stopped session only when their sender is dropped: until then
    /// they never come, and hold their window slots.
    fn drop_lost_link(&mut self) {
        tracing::warn!(queue = %self.spec.queue, "amqp10 sender's session ended (connection lost, or ended by the broker); re-attaching on the next publish");
        if let Some(old) = self.link.take() {
            old.end();
        }
    }

    /// Declares the queue again by attaching a sender of its own and ending it: the
    /// queue may have been deleted on the broker, which the publishing link is not
    /// told of. A failure is logged; the publish goes on, on its own link.
    async fn declare_again(&mut self) {
        self.declared = Instant::now();
        let name = self.connector.link_name("declare", &self.spec.queue);
        match self.connector.attach_sender(name, self.spec.target()).await {
            Ok(probe) => probe.end(),
            Err(err) => {
                tracing::warn!(queue = %self.spec.queue, error = %err, "amqp10 sender cannot declare its queue again");
            }
        }
    }

    async fn run(mut self, mut requests: mpsc::Receiver<SendRequest>) {
        let mut closed = self.connector.closed_signal();
        let mut retry: Option<SendRequest> = None;
        let mut failures = 0u32;
        let mut refused: Option<Refusal> = None;
        loop {
            let mut request = match retry.take() {
                Some(request) => request,
                None => tokio::select! {
                    request = requests.recv() => match request {
                        Some(request) => request,
                        None => break,
                    },
                    _ = closed.wait_for(|c| *c) => break,
                    () = session_ended(&mut self.link) => {
                        self.drop_lost_link();
                        continue;
                    }
                },
            };
            if request.reply.is_closed() {
                continue; // the caller gave up (timeout): do not send it late
            }
            let permit = tokio::select! {
                permit = self.window.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = closed.wait_for(|c| *c) => {
                    let _ = request.reply.send(Err(crate::error::closed("publish")));
                    break;
                }
                // The slots may be held by outcomes lost with the session: they come
                // back once its link is dropped.
                () = session_ended(&mut self.link) => {
                    self.drop_lost_link();
                    retry = Some(request);
                    continue;
                }
            };
            if self.link.is_some()
                && self.spec.profile.accepts_unroutable()
                && self.declared.elapsed() >= DECLARE_AGAIN_EVERY
            {
                self.declare_again().await;
            }
            if request.reply.is_closed() {
                // It timed out waiting for the window, for a link on the way round
                // again, or for the declaration just above (which may take the
                // attach's 10 s): its caller was told to publish again, so sending it
                // now would only add a duplicate.
                continue;
            }
            let Some(attached) = self.link.as_mut() else {
                drop(permit);
                // Refused for good a moment ago: told again until its back-off ends,
                // where each publish attached again at once (review).
                if let Some(refusal) = refused.as_ref().filter(|r| Instant::now() < r.until) {
                    let _ = request.reply.send(Err(refusal.again()));
                    continue;
                }
                match self
                    .connector
                    .attach_sender(
                        self.connector.link_name("sender", &self.spec.queue),
                        self.spec.target(),
                    )
                    .await
                {
                    Ok(attached) => {
                        tracing::info!(queue = %self.spec.queue, "amqp10 sender re-attached");
                        self.link = Some(attached);
                        self.declared = Instant::now();
                        failures = 0;
                        refused = None;
                        retry = Some(request);
                    }
                    Err(err) if crate::error::is_permanent(&err) => {
                        failures += 1;
                        let wait = self.connector.backoff(failures);
                        tracing::warn!(queue = %self.spec.queue, error = %err, ?wait, "amqp10 sender's attach refused; publishes fail with it until it is tried again");
                        refused = Some(Refusal {
                            kind: err.kind(),
                            message: err.message().to_string(),
                            until: Instant::now() + wait,
                        });
                        let _ = request.reply.send(Err(err));
                    }
                    Err(err) => {
                        failures += 1;
                        let wait = self.connector.backoff(failures);
                        tracing::warn!(queue = %self.spec.queue, error = %err, ?wait, "amqp10 sender cannot attach; retrying");
                        retry = Some(request);
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = closed.wait_for(|c| *c) => break,
                        }
                    }
                }
                continue;
            };
            let sent = {
                let send = attached.link.send_batchable_ref(&request.sendable);
                tokio::pin!(send);
                let sent = tokio::select! {
                    sent = &mut send => Some(sent),
                    () = request.reply.closed() => None,
                    _ = closed.wait_for(|c| *c) => {
                        let _ = request.reply.send(Err(crate::error::closed("publish")));
                        break;
                    }
                };
                match sent {
                    Some(sent) => sent,
                    // Its caller gave up, most likely while fe2o3-amqp waited for the
                    // broker's credit (an address that blocks producers when full):
                    // sending it once the credit comes would only duplicate what the
                    // caller publishes again. A send stopped there writes nothing, and
                    // one stopped later writes nothing either when the message goes in
                    // one frame.
                    None if fits_one_frame(
                        &request.sendable,
                        self.connector.broker_max_frame(),
                    ) =>
                    {
                        continue;
                    }
                    // A transfer of several frames stopped part way would break the
                    // link: it goes on to its end.
                    None => tokio::select! {
                        sent = send => sent,
                        _ = closed.wait_for(|c| *c) => break,
                    },
                }
            };
            match sent {
                Ok(outcome) => {
                    let pending = Pending {
                        outcome,
                        reply: request.reply,
                        _permit: permit,
                    };
                    if let Err(mpsc::error::SendError(pending)) = self.pending.send(pending) {
                        let _ = pending
                            .reply
                            .send(Err(Error::internal("the outcome task stopped")));
                        break;
                    }
                }
                Err(SendError::MessageSizeExceeded(too_large)) => {
                    // Checked before anything was written: the link is fine, and this
                    // message would be refused on any link of this broker.
                    let _ = request.reply.send(Err(Error::invalid(format!(
                        "the message is {} bytes encoded, more than the {} bytes the broker accepts (its max-message-size)",
                        too_large.size, too_large.max_size
                    ))));
                }
                Err(err) => {
                    // Not written (or not completely): the link is unusable. Write it
                    // again on a fresh link.
                    tracing::warn!(queue = %self.spec.queue, error = %err, "amqp10 sender link lost; re-attaching");
                    if let Some(old) = self.link.take() {
                        old.end();
                    }
                    retry = Some(request);
                }
            }
        }
        if let Some(request) = retry {
            let _ = request.reply.send(Err(crate::error::closed("publish")));
        }
        requests.close();
        while let Ok(request) = requests.try_recv() {
            let _ = request.reply.send(Err(crate::error::closed("publish")));
        }
        if let Some(attached) = self.link.take() {
            // Let the outcomes of what was sent arrive before the link goes away.
            let all = self
                .window
                .clone()
                .acquire_many_owned(self.spec.window.max(1));
            let _ = tokio::time::timeout(Duration::from_secs(5), all).await;
            let Attached { link, session } = attached;
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, link.detach()).await;
            drop(session); // sends its end: see `Attached::end`
        }
    }
}

/// The most a transfer performative and its frame's header take (a frame's payload is
/// what is left of the frame for the message).
const TRANSFER_OVERHEAD: usize = 128;

/// Whether `sendable` goes to the broker in one transfer frame, frames being at most
/// `max_frame` bytes.
fn fits_one_frame(sendable: &Sendable<Data>, max_frame: usize) -> bool {
    crate::mapping::encoded_size(&sendable.message)
        .is_some_and(|size| size.saturating_add(TRANSFER_OVERHEAD) <= max_frame)
}

/// Resolves once the session of `link` has stopped; never while there is no link.
async fn session_ended(link: &mut Option<Attached<Sender>>) {
    match link {
        Some(attached) => {
            let _ = attached.session.on_end().await;
        }
        None => std::future::pending().await,
    }
}

async fn outcome_task(mut pending: mpsc::UnboundedReceiver<Pending>) {
    while let Some(Pending {
        outcome,
        reply,
        _permit,
    }) = pending.recv().await
    {
        let result = match outcome.await {
            Ok(Outcome::Accepted(_)) => Ok(()),
            Ok(Outcome::Rejected(rejected)) => Err(crate::error::rejected(rejected.error.as_ref())),
            Ok(Outcome::Released(_)) => Err(Error::internal(
                "the broker released the message (not delivered to the queue)",
            )),
            Ok(Outcome::Modified(_)) => Err(Error::internal(
                "the broker returned the message as modified",
            )),
            #[allow(unreachable_patterns)]
            Ok(other) => Err(Error::internal(format!("unexpected outcome {other:?}"))),
            Err(err) => Err(Error::internal(format!(
                "the link was lost before the broker confirmed the message ({err}); publish again"
            ))
            .with_source(err)),
        };
        drop(_permit);
        let _ = reply.send(result);
    }
}
