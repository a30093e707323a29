//! The link to the broker and its supervisor: connect, watch for loss, reconnect with
//! backoff, publish the new link.
//!
//! The driver owns the reconnect loop (lapin's automatic recovery is off): one
//! supervisor task per driver holds the current [`Link`] and publishes it through a
//! `watch` channel; `None` there means "reconnecting". Publishers wait on that channel
//! ([`Connection::link_until`]), consumers follow it ([`Connection::links`]) and
//! re-attach when a newer link appears. What has to be redone on a new link before
//! anyone uses it (the driver redeclares its queues) is a hook the driver installs:
//! this module knows nothing of queues, publishers or consumers.
//!
//! With several nodes (the URLs of one cluster), the first connection goes to the
//! first node that answers, in the configured order, and a reconnect starts with the
//! node after the one lost, going round the list: a stopped node is tried last, so
//! the driver moves to a live node as soon as it can, and stays there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use lapin::types::LongString;
use lapin::{Channel, ConnectionProperties};
use queue_core::{Error, ErrorKind, Result};
use tokio::sync::{Notify, watch};

use crate::config::{Amqp091Config, Endpoint};
use crate::returns::ReturnLog;
use crate::{error, lock, transport};

/// How often the supervisor looks at the connection's state besides its events.
const WATCHDOG: Duration = Duration::from_millis(250);
/// How long closing a channel or the connection waits for the broker's close-ok. A
/// broker that hangs with the connection open never sends it, and lapin waits for it
/// without a limit: a cancel, and the runtime's shutdown, would wait forever.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the supervisor runs on every new link before making it available.
pub(crate) type OnReconnect = Box<dyn Fn(Arc<Link>) -> BoxFuture<'static, ()> + Send + Sync>;

/// One established connection.
pub(crate) struct Link {
    pub(crate) connection: lapin::Connection,
    /// 1 for the first connection; every reconnect adds one.
    pub(crate) generation: u64,
    /// Which of the configured nodes it is connected to.
    index: usize,
    nudge: Arc<Notify>,
    /// How long the broker may take to answer (`connection_timeout`).
    answer_limit: Duration,
    /// lapin's events of this connection, listened to from its opening (lapin keeps
    /// none while nobody listens) until the supervisor takes them to watch the link.
    events: Mutex<Option<BoxStream<'static, lapin::Event>>>,
    /// Where the connection's reader hands the returns of its publishing channels.
    pub(crate) returns: Arc<ReturnLog>,
    /// Told when the broker unblocks the connection (a resource alarm ends) or the
    /// link is lost: publishes wait for it rather than hand lapin frames it cannot
    /// write ([`Link::unblocked_until`]).
    unblocked: Notify,
}

impl Link {
    pub(crate) fn is_alive(&self) -> bool {
        self.connection.status().connected()
    }

    /// Waits while the broker blocks the connection (a memory or disk alarm: it reads
    /// nothing from a connection that publishes), until `deadline`. A publish handed
    /// to lapin meanwhile stayed queued in lapin after it timed out, its confirm
    /// window slot given to the next: lapin's memory grew by a window of messages per
    /// `publish_timeout` for as long as the alarm lasted, and every one was written
    /// once it ended, a duplicate of each retry.
    pub(crate) async fn unblocked_until(
        &self,
        what: &str,
        deadline: tokio::time::Instant,
    ) -> Result<()> {
        // Every publish passes here: it registers as a waiter only when blocked.
        if !self.connection.status().blocked() {
            return Ok(());
        }
        loop {
            let unblocked = self.unblocked.notified();
            tokio::pin!(unblocked);
            unblocked.as_mut().enable();
            if !self.connection.status().blocked() || !self.is_alive() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, unblocked).await.is_err() {
                return Err(Error::internal(format!(
                    "{what}: not sent: the broker blocks publishing on this connection (a resource alarm: memory or disk) and did not lift it within publish_timeout"
                )));
            }
        }
    }

    /// A new channel; `what` names the operation in the error.
    pub(crate) async fn channel(&self, what: &str) -> Result<Channel> {
        self.connection.create_channel().await.map_err(|e| {
            self.saw(&e);
            error::map(format!("{what}: open channel"), e)
        })
    }

    /// Waits for `operation`, a request and the broker's answer, for at most
    /// `connection_timeout`: lapin waits without a limit, and a broker that hangs with
    /// the connection open never answers (`what` names the operation in the error).
    pub(crate) async fn answered<T>(
        &self,
        what: &str,
        operation: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.answer_limit, operation).await {
            Ok(answered) => answered,
            Err(_) => Err(Error::internal(format!(
                "{what}: the broker did not answer within connection_timeout {:?}",
                self.answer_limit
            ))),
        }
    }

    /// Wakes the supervisor when `err` means the connection is gone: an I/O error seen
    /// by a publisher or consumer is often the first sign of a loss.
    pub(crate) fn saw(&self, err: &lapin::Error) {
        if error::is_connection_level(err) {
            self.nudge.notify_one();
        }
    }
}

/// What a driver uses a connection for. A driver opens one for publishing (and
/// declaring) and another for its consumers: during a resource alarm RabbitMQ stops
/// reading from a connection that publishes, and lapin then writes nothing on it, so
/// consumers sharing it could not ack and the backlog that raised the alarm could not
/// drain (docs/drivers/amqp091.md, "Two connections").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    Publishing,
    Consuming,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Publishing => "publishing",
            Purpose::Consuming => "consuming",
        }
    }
}

/// The connection of one driver: the current link and the supervisor behind it.
pub(crate) struct Connection {
    config: Amqp091Config,
    purpose: Purpose,
    endpoints: Vec<Endpoint>,
    tls: lapin::tcp::OwnedTLSConfig,
    /// The node connected to, or last connected to (password redacted).
    node: Mutex<String>,
    link: watch::Sender<Option<Arc<Link>>>,
    closed: watch::Sender<bool>,
    nudge: Arc<Notify>,
    generation: AtomicU64,
    on_reconnect: OnReconnect,
    /// The runtime the driver was created on, where its background tasks live. A
    /// subscription re-attaches inside `next()`, which may run on a caller's
    /// short-lived runtime (the queue runtime's workers each drive one of their own);
    /// a task spawned there would die with it and leave the subscription unable to
    /// drain its acks or close its channel.
    tasks: tokio::runtime::Handle,
}

impl Connection {
    /// Connects once (failing fast, with the URL redacted), then starts the supervisor,
    /// which runs `on_reconnect` on every later link before publishing it.
    pub(crate) async fn connect(
        config: Amqp091Config,
        purpose: Purpose,
        on_reconnect: OnReconnect,
    ) -> Result<Arc<Connection>> {
        let endpoints = config.endpoints()?;
        let tls = config.tls_config()?;
        let conn = Arc::new(Connection {
            node: Mutex::new(endpoints[0].shown.clone()),
            config,
            purpose,
            endpoints,
            tls,
            link: watch::channel(None).0,
            closed: watch::channel(false).0,
            nudge: Arc::new(Notify::new()),
            generation: AtomicU64::new(0),
            on_reconnect,
            tasks: tokio::runtime::Handle::current(),
        });
        let first = conn.connect_first().await?;
        conn.link.send_replace(Some(Arc::clone(&first)));
        conn.tasks.spawn(supervise(Arc::downgrade(&conn), first));
        Ok(conn)
    }

    pub(crate) fn config(&self) -> &Amqp091Config {
        &self.config
    }

    /// Where the driver's background tasks run.
    pub(crate) fn tasks(&self) -> &tokio::runtime::Handle {
        &self.tasks
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Follows the closed flag.
    pub(crate) fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Follows the current link.
    pub(crate) fn links(&self) -> watch::Receiver<Option<Arc<Link>>> {
        self.link.subscribe()
    }

    /// The node connected to, or last connected to, password redacted.
    pub(crate) fn node(&self) -> String {
        lock(&self.node).clone()
    }

    /// Connections opened so far (1 after connecting; +1 per reconnect), counted when
    /// they open, before the queues are declared on them again.
    pub(crate) fn connections_opened(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The current link if one is up.
    pub(crate) fn current(&self) -> Option<Arc<Link>> {
        self.link.borrow().clone()
    }

    /// The current link, if it is alive and the driver is not closed: what
    /// [`Self::link_until`] returns at once in the common case, without subscribing.
    pub(crate) fn live_link(&self) -> Option<Arc<Link>> {
        if self.is_closed() {
            return None;
        }
        self.link.borrow().clone().filter(|link| link.is_alive())
    }

    /// Waits for a live link until `deadline`; `what` names the operation in the error.
    pub(crate) async fn link_until(
        &self,
        what: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Link>> {
        if let Some(link) = self.live_link() {
            return Ok(link);
        }
        let mut rx = self.links();
        let mut closed = self.closed();
        let wait = async {
            loop {
                if *closed.borrow_and_update() {
                    return Err(closed_error(what));
                }
                let current = rx.borrow_and_update().clone();
                if let Some(link) = current
                    && link.is_alive()
                {
                    return Ok(link);
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return Err(closed_error(what)) },
                    _ = closed.changed() => {},
                    // A dead link not yet replaced: look again shortly.
                    _ = tokio::time::sleep(WATCHDOG) => {},
                }
            }
        };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(out) => out,
            Err(_) => Err(error::not_connected(
                what,
                &format!(
                    "no connection to {} within publish_timeout {:?}",
                    self.nodes(),
                    self.config.publish_timeout
                ),
            )),
        }
    }

    /// Marks the driver closed (the supervisor stops, waiters give up); true for the
    /// call that closed it.
    pub(crate) fn mark_closed(&self) -> bool {
        !self.closed.send_replace(true)
    }

    /// Closes the current connection, if any: the last step of closing the driver.
    pub(crate) async fn shutdown(&self) -> Result<()> {
        let link = self.link.send_replace(None);
        if let Some(link) = link
            && link.is_alive()
        {
            let close = link.connection.close(200, "driver closed".into());
            match tokio::time::timeout(CLOSE_TIMEOUT, close).await {
                Ok(closed) => closed.map_err(|e| error::map("close connection", e))?,
                Err(_) => {
                    return Err(Error::internal(format!(
                        "close connection: the broker did not answer within {CLOSE_TIMEOUT:?}; the connection was dropped"
                    )));
                }
            }
        }
        Ok(())
    }

    /// What the driver connects to, for messages: the node, or every node of a cluster.
    fn nodes(&self) -> String {
        match self.endpoints.as_slice() {
            [one] => one.shown.clone(),
            many => format!(
                "any of {}",
                many.iter()
                    .map(|e| e.shown.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// Connects to the first node that answers, in the configured order. A node that
    /// refuses the login or the vhost ends the search: users and vhosts are the same
    /// on every node of a cluster, so the next would refuse too.
    async fn connect_first(&self) -> Result<Arc<Link>> {
        let mut failures = Vec::new();
        for index in 0..self.endpoints.len() {
            match self.establish(index).await {
                Ok(link) => return Ok(link),
                Err(e) if !e.retryable() || self.endpoints.len() == 1 => return Err(e),
                Err(e) => {
                    tracing::warn!(node = %self.endpoints[index].shown, error = %e, "node unreachable; trying the next");
                    failures.push(e);
                }
            }
        }
        let said: Vec<String> = failures.iter().map(|e| e.message().to_string()).collect();
        let mut out = Error::internal(format!(
            "no node of the cluster answered: {}",
            said.join("; ")
        ));
        if let Some(last) = failures.pop() {
            out = out.with_source(last);
        }
        Err(out)
    }

    /// Opens a connection to node `index` (bounded by `connection_timeout`).
    async fn establish(&self, index: usize) -> Result<Arc<Link>> {
        let endpoint = &self.endpoints[index];
        let url = endpoint.shown.as_str();
        let mut props = ConnectionProperties::default();
        if let Some(name) = &self.config.connection_name {
            let name = match self.purpose {
                Purpose::Publishing => name.clone(),
                Purpose::Consuming => format!("{name} (consumers)"),
            };
            props = props.with_connection_name(LongString::from(name.as_bytes()));
        }
        let returns = Arc::new(ReturnLog::default());
        let attempt = transport::connect(
            endpoint.uri.clone(),
            props,
            self.tls.clone(),
            Arc::clone(&returns),
        );
        let connection = match tokio::time::timeout(self.config.connection_timeout, attempt).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(connect_error(endpoint, e)),
            Err(_) => {
                return Err(Error::internal(format!(
                    "connect to {url}: no answer within connection_timeout {:?}",
                    self.config.connection_timeout
                )));
            }
        };
        warn_of_a_lowered_heartbeat(&self.config, url, &connection);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *lock(&self.node) = url.to_string();
        tracing::info!(node = %url, generation, purpose = self.purpose.as_str(), "connected to the AMQP broker");
        Ok(Arc::new(Link {
            generation,
            index,
            nudge: Arc::clone(&self.nudge),
            answer_limit: self.config.connection_timeout,
            events: Mutex::new(Some(Box::pin(connection.events_listener()))),
            connection,
            returns,
            unblocked: Notify::new(),
        }))
    }

    /// One round of reconnecting after node `lost` was lost: every node once, the
    /// next one first, the lost one last.
    async fn reconnect_round(&self, lost: usize) -> Result<Arc<Link>> {
        let n = self.endpoints.len();
        let mut last_error = None;
        for step in 1..=n {
            let index = (lost + step) % n;
            match self.establish(index).await {
                Ok(link) => return Ok(link),
                Err(e) => {
                    if n > 1 {
                        tracing::warn!(node = %self.endpoints[index].shown, error = %e, "reconnect to this node failed; trying the next");
                    }
                    last_error = Some(e);
                }
            }
            if self.is_closed() {
                break;
            }
        }
        Err(last_error.unwrap_or_else(|| closed_error("reconnect")))
    }
}

fn closed_error(what: &str) -> Error {
    Error::new(ErrorKind::Canceled, format!("{what}: the driver is closed"))
}

/// lapin settles on the lower of the `heartbeat` asked for and the broker's (RabbitMQ:
/// 60 s): a longer one asked for (against large content headers on a slow link,
/// docs/drivers/amqp091.md) is not what the connection got, and says so.
fn warn_of_a_lowered_heartbeat(config: &Amqp091Config, url: &str, connection: &lapin::Connection) {
    let Some(asked) = config.heartbeat else {
        return;
    };
    let agreed = connection.configuration().heartbeat();
    if u64::from(agreed) < asked.as_secs() {
        tracing::warn!(
            node = %url,
            asked_secs = asked.as_secs(),
            agreed_secs = agreed,
            "the broker's heartbeat is shorter than the `heartbeat` asked for, and the shorter one is used (raise the broker's `heartbeat` to lengthen it)"
        );
    }
}

fn connect_error(endpoint: &Endpoint, e: lapin::Error) -> Error {
    let url = &endpoint.shown;
    // RabbitMQ answers an unknown vhost with NOT_ALLOWED "vhost X not found": a
    // missing resource, not a refused login, so NOT_FOUND with the vhost named.
    let missing_vhost = matches!(
        e.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 530 && amqp.get_message().as_str().ends_with("not found")
    );
    let refused_login = matches!(error::reply_code(&e), Some(403) | Some(530));
    if missing_vhost {
        return Error::not_found(format!(
            "connect to {url}: vhost \"{}\" not found on the broker (create it, or fix the URL's path or the vhost field; an empty path means \"/\")",
            endpoint.vhost()
        ))
        .with_detail("amqp_reply_code", "530")
        .with_source(e);
    }
    let base = error::map(format!("connect to {url}"), e);
    if refused_login {
        Error::new(
            ErrorKind::PermissionDenied,
            format!("{} (check the user, password and vhost)", base.message()),
        )
    } else {
        base
    }
}

/// Watches the link; on loss, reconnects with backoff, runs the reconnect hook and
/// publishes the new link. Holds the connection only weakly: dropping the driver
/// ends it.
async fn supervise(weak: Weak<Connection>, mut link: Arc<Link>) {
    loop {
        let (closed, nudge, backoff) = match weak.upgrade() {
            Some(c) => (
                c.closed(),
                Arc::clone(&c.nudge),
                c.config.reconnect_backoff(),
            ),
            None => return,
        };
        let Some(why) = wait_for_loss(&weak, &link, closed.clone(), &nudge).await else {
            return;
        };
        let Some(conn) = weak.upgrade() else { return };
        if conn.is_closed() {
            return;
        }
        conn.link.send_replace(None);
        let lost = link.index;
        // Why, in the broker's words where it closed the connection: a message it
        // cannot deliver over AMQP 0-9-1 closes it at every delivery with
        // INTERNAL_ERROR, and that word leads to the cause (docs/drivers/amqp091.md,
        // "What is left").
        let why = why.unwrap_or_else(|| "lapin said nothing of why".to_string());
        tracing::warn!(node = %conn.endpoints[lost].shown, purpose = conn.purpose.as_str(), error = %why, "connection to the AMQP broker lost; reconnecting");
        drop(conn);
        drop(link);
        let mut attempt = 1;
        link = loop {
            let mut closed = closed.clone();
            let delay = backoff.delay(attempt);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = closed.wait_for(|c| *c) => return,
            }
            let Some(conn) = weak.upgrade() else { return };
            if conn.is_closed() {
                return;
            }
            match conn.reconnect_round(lost).await {
                Ok(new) => {
                    (conn.on_reconnect)(Arc::clone(&new)).await;
                    if conn.is_closed() {
                        // The driver closed while this one opened: its close found no
                        // link to close, so nobody else would close this one.
                        let close = new.connection.close(200, "driver closed".into());
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
                        return;
                    }
                    if !new.is_alive() {
                        continue;
                    }
                    conn.link.send_replace(Some(Arc::clone(&new)));
                    if conn.is_closed() {
                        // Closed between the check above and now: the close may have
                        // found no link to close.
                        let _ = conn.shutdown().await;
                        return;
                    }
                    tracing::info!(
                        generation = new.generation,
                        "reconnected to the AMQP broker"
                    );
                    break new;
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(error = %e, retry_in = ?backoff.delay(attempt), "reconnect failed");
                }
            }
        };
    }
}

/// Returns, when the link is lost, why as lapin last said it (the broker's reply to a
/// `connection.close` among others), if it said anything; `None` when the driver is
/// closed or gone.
async fn wait_for_loss(
    weak: &Weak<Connection>,
    link: &Link,
    mut closed: watch::Receiver<bool>,
    nudge: &Notify,
) -> Option<Option<String>> {
    let mut events = lock(&link.events)
        .take()
        .unwrap_or_else(|| Box::pin(link.connection.events_listener()));
    let mut events_open = true;
    let mut why = None;
    let mut tick = tokio::time::interval(WATCHDOG);
    loop {
        tokio::select! {
            _ = closed.wait_for(|c| *c) => return None,
            ev = events.next(), if events_open => {
                if matches!(ev, Some(lapin::Event::ConnectionUnblocked)) {
                    link.unblocked.notify_waiters();
                }
                why = ev.as_ref().and_then(connection_error).or(why);
                events_open = ev.is_some();
            }
            _ = tick.tick() => {}
            _ = nudge.notified() => {}
        }
        if weak.strong_count() == 0 {
            return None;
        }
        if !link.is_alive() {
            // Publishes waiting for it to be unblocked go on to find another link.
            link.unblocked.notify_waiters();
            break;
        }
    }
    // lapin may tell the error after the link reads as dead: wait a moment for it.
    if why.is_none() && events_open {
        let told = async {
            while let Some(ev) = events.next().await {
                if let Some(why) = connection_error(&ev) {
                    return Some(why);
                }
            }
            None
        };
        why = tokio::time::timeout(WHY_WAIT, told).await.ok().flatten();
    }
    Some(why)
}

/// The error an event tells of the whole connection (not of one channel: a queue
/// not found says nothing of why a connection was lost).
fn connection_error(event: &lapin::Event) -> Option<String> {
    match event {
        lapin::Event::Error(e) if error::is_connection_level(e) => Some(e.to_string()),
        _ => None,
    }
}

/// How long a lost link's supervisor waits for lapin to say why it was lost, before
/// saying it lost the link without a reason.
const WHY_WAIT: Duration = Duration::from_millis(250);
