//! The shared connection, the readers' connections, and what the connection report
//! counts.
//!
//! Commands (publish, ack, release, info, declare) share one [`ConnectionManager`]:
//! a multiplexed connection the redis crate replaces by itself when it drops. The
//! crate does not say when it reconnected, so the [`Link`] asks: after a command
//! failed for want of a connection, the next command that succeeds is followed by
//! `CLIENT ID`, and a new id is a new connection. Each subscription reads on a
//! connection of its own, because `XREADGROUP ... BLOCK` holds its connection until
//! it returns.
//!
//! The crate replaces a connection only when its socket reports an error. One the
//! network lost without a word (a NAT or a firewall that forgot it) reports none
//! until the kernel gives up retransmitting, about 15 minutes later: a command that
//! gets no reply in time therefore puts a new connection in place of the one it ran
//! on ([`Link::lost`]; docs/drivers/redis.md, "Connection loss").
//!
//! The crate starts a connection's task on the runtime of whichever command first
//! needs the connection (after a reconnect, or a replacement). Commands come from
//! Lua workers too, each a single-threaded runtime of its own: a connection started
//! there would wait for that worker's handlers, and end with the worker. So every
//! command runs with the runtime the driver was connected on entered
//! ([`queue_core::on_runtime`]), and whatever the crate starts runs there.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use queue_core::{Error, Result, on_runtime};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};

use crate::config::RedisConfig;
use crate::error::{from_redis, is_connection_error};

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect attempts the redis crate makes per failure; the next command after
/// that tries again.
const RETRIES: usize = 6;

/// The shared connection and the counts of the connection report.
pub(crate) struct Link {
    client: redis::Client,
    current: std::sync::RwLock<Current>,
    config: RedisConfig,
    node: String,
    /// Connections that opened: 1 after connecting, +1 per reconnect seen.
    opened: AtomicU64,
    /// Consumer attaches and re-attaches.
    attached: AtomicU64,
    connected: AtomicBool,
    /// A command failed for want of a connection since the last `CLIENT ID`.
    suspect: AtomicBool,
    /// Which connection this is: the server's run id and the connection's `CLIENT ID`
    /// (a restarted server numbers its clients from 1 again).
    identity: std::sync::Mutex<String>,
    closed: AtomicBool,
    /// The runtime the driver was connected on, where connections' tasks run.
    tasks: tokio::runtime::Handle,
}

/// The shared connection, and since when it is the one in use.
struct Current {
    manager: ConnectionManager,
    since: Instant,
    /// Whether its first connect is still under way (see [`Link::lost`]).
    connecting: Arc<AtomicBool>,
}

/// The server's run id and the connection's client id.
async fn identity(mut c: ConnectionManager) -> RedisResult<String> {
    let id: i64 = redis::cmd("CLIENT").arg("ID").query_async(&mut c).await?;
    // `INFO` is one of Redis' `@dangerous` commands, which hardened users are denied:
    // asked for as the driver connected, it failed every connect of such a user
    // (review). Without it, a reconnect to a restarted server that gives the same
    // client id goes uncounted; nothing else needs it.
    let info: RedisResult<String> = redis::cmd("INFO").arg("server").query_async(&mut c).await;
    let info = match info {
        Ok(info) => info,
        Err(e) if e.code() == Some("NOPERM") => String::new(),
        Err(e) => return Err(e),
    };
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim();
    Ok(format!("{run_id}/{id}"))
}

impl Link {
    /// Connects once and checks the login, failing fast: an unreachable server is
    /// INTERNAL (retryable), a refused login PERMISSION_DENIED.
    pub async fn connect(config: &RedisConfig) -> Result<Arc<Link>> {
        config.validate()?;
        let client = config.client()?;
        let node = config.redacted_url();
        let what = format!("connecting to {node}");
        // The manager retries a failed first connect for a while; one plain attempt
        // tells at once what is wrong.
        // With the driver's limits: the crate's defaults (1 s to connect, 500 ms for an
        // answer) failed the connect on a Redis a moment slow, and skipped the checks
        // of its persistence and eviction settings.
        let limits = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let mut probe = tokio::time::timeout(
            CONNECT_TIMEOUT,
            client.get_multiplexed_async_connection_with_config(&limits),
        )
        .await
        .map_err(|_| Error::internal(format!("{what} timed out")))?
        .map_err(|e| from_redis(&what, e))?;
        let _: String = redis::cmd("PING")
            .query_async(&mut probe)
            .await
            .map_err(|e| from_redis(&what, e))?;
        warn_unless_persistent(&mut probe, &node).await;
        drop(probe);
        let manager = tokio::time::timeout(
            CONNECT_TIMEOUT * 2,
            ConnectionManager::new_with_config(client.clone(), shared_config(config)),
        )
        .await
        .map_err(|_| Error::internal(format!("{what} timed out")))?
        .map_err(|e| from_redis(&what, e))?;
        let link = Link {
            client,
            current: std::sync::RwLock::new(Current {
                manager,
                since: Instant::now(),
                connecting: Arc::new(AtomicBool::new(false)),
            }),
            config: config.clone(),
            node,
            opened: AtomicU64::new(1),
            attached: AtomicU64::new(0),
            connected: AtomicBool::new(true),
            suspect: AtomicBool::new(false),
            identity: std::sync::Mutex::new(String::new()),
            closed: AtomicBool::new(false),
            tasks: tokio::runtime::Handle::current(),
        };
        let id = link.run(&what, identity).await?;
        *link
            .identity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = id;
        Ok(Arc::new(link))
    }

    /// A connection of its own for one reader, with a response timeout above its
    /// longest block. It connects on first use and reconnects by itself.
    pub fn reader(&self, block: Duration) -> Result<ConnectionManager> {
        // The crate starts a task of the connection as it makes it (see `lost`).
        let _entered = self.tasks.enter();
        ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            manager_config(&self.config, Some(block + CONNECT_TIMEOUT)),
        )
        .map_err(|e| from_redis(format!("connecting to {}", self.node), e))
    }

    /// Runs one command (or pipeline, or script) on the shared connection and notes
    /// what its outcome says about the connection. Errors are the workspace's, with
    /// `what` in front; a closed driver refuses.
    pub async fn run<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.is_closed() {
            return Err(crate::error::closed(what));
        }
        let started = Instant::now();
        let result = on_runtime(&self.tasks, op(self.manager())).await;
        self.replace_if_lost(&result, started);
        self.observe(&result).await;
        result.map_err(|e| from_redis(what, e))
    }

    /// The shared connection in use now.
    fn manager(&self) -> ConnectionManager {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .manager
            .clone()
    }

    /// After a command begun at `started` got no reply in time (or its login was
    /// refused): puts a new shared connection (opened at its first use) in place of
    /// the one in use, unless that one is newer than the command (another command
    /// replaced it already). The old one closes once its last command has ended.
    pub fn lost(&self, started: Instant) {
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A connection whose first connect is still under way is kept: replaced at
        // each command that gave up first, none ever connected where setting one up
        // (a connect, a login, a round trip or four) takes longer than
        // `publish_timeout`, and publishing never came back (review).
        if current.since > started || current.connecting.load(Ordering::Acquire) {
            return;
        }
        // The crate starts a task of the connection as it makes it: on the driver's
        // runtime, not the caller's.
        let _entered = self.tasks.enter();
        match ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            shared_config(&self.config),
        ) {
            Ok(manager) => {
                // The crate connects a new connection only while a command waits for
                // it: this one waits, however long the callers' commands wait, for at
                // most two connects' time (the crate would try again for longer, and
                // a connection that cannot be set up by then may be replaced).
                let connecting = Arc::new(AtomicBool::new(!self.is_closed()));
                if !self.is_closed() {
                    let (first, done) = (manager.clone(), Arc::clone(&connecting));
                    self.tasks.spawn(async move {
                        let mut first = first;
                        let ping = redis::cmd("PING");
                        let pinged = ping.query_async::<String>(&mut first);
                        let _ = tokio::time::timeout(2 * CONNECT_TIMEOUT, pinged).await;
                        done.store(false, Ordering::Release);
                    });
                }
                *current = Current {
                    manager,
                    since: Instant::now(),
                    connecting,
                };
                self.connected.store(false, Ordering::Relaxed);
                self.suspect.store(true, Ordering::Relaxed);
                tracing::warn!(node = %self.node, "redis: a command got no reply in time, its login was refused or the server is a replica now; the next ones go on a new connection (the network may have lost the old one without a word, or a failover moved the primary)");
            }
            Err(err) => {
                tracing::warn!(node = %self.node, error = %err, "redis: a command got no reply in time, its login was refused or the server is a replica now, and no new connection could be set up");
            }
        }
    }

    /// Awaits `sending` (commands on the shared connection) for `publish_timeout` at
    /// most; `None` when that ran out, the connection then taken as lost
    /// ([`Link::lost`]). The limit runs out before the crate's own, which [`Link::run`]
    /// would take as a lost connection: without this, each command past it failed on a
    /// connection the network had lost without a word.
    pub async fn within_limit<T>(&self, sending: impl Future<Output = T>) -> Option<T> {
        let started = Instant::now();
        let limited = tokio::time::timeout(self.config.publish_timeout, sending).await;
        if limited.is_err() {
            self.lost(started);
        }
        limited.ok()
    }

    /// [`Link::lost`] when `result` is the redis crate's own time limit running out,
    /// or a refused login: the crate keeps a connection whose login failed, and every
    /// command on it fails the same way, even once the login is fixed.
    fn replace_if_lost<T>(&self, result: &RedisResult<T>, started: Instant) {
        if matches!(result, Err(e) if connection_is_lost(e)) {
            self.lost(started);
        }
    }

    /// Like [`Link::run`] for commands that may run twice (declare, attach, info):
    /// a command that failed for want of a connection is tried again, backing off,
    /// until `publish_timeout` has passed. The redis crate fails the first command
    /// after a connection drops, and reconnects only then. Each try is bounded by what
    /// is left of `publish_timeout`: one try waited for the crate's own limits (a 5 s
    /// answer, reconnects of 5 s each), past the caller's.
    pub async fn run_idempotent<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = queue_core::deadline_after(self.config.publish_timeout);
        let mut failures = 0;
        loop {
            if self.is_closed() {
                return Err(crate::error::closed(what));
            }
            let started = Instant::now();
            let command = on_runtime(&self.tasks, op(self.manager()));
            let Ok(result) = tokio::time::timeout_at(deadline, command).await else {
                self.lost(started);
                return Err(Error::internal(format!(
                    "{what}: Redis did not answer within publish_timeout {:?}",
                    self.config.publish_timeout
                )));
            };
            self.replace_if_lost(&result, started);
            self.observe(&result).await;
            match result {
                Err(e) if is_connection_error(&e) => {
                    failures += 1;
                    let wait = self.backoff(failures);
                    if queue_core::deadline_after(wait) > deadline {
                        return Err(from_redis(what, e));
                    }
                    tracing::debug!(error = %e, ?wait, "redis: {what} failed; trying again");
                    tokio::time::sleep(wait).await;
                }
                other => return other.map_err(|e| from_redis(what, e)),
            }
        }
    }

    /// Notes a command's outcome: a connection error marks the link suspect, the next
    /// success finds out whether the connection is a new one.
    pub async fn observe<T>(&self, result: &RedisResult<T>) {
        match result {
            Err(e) if is_connection_error(e) => {
                self.connected.store(false, Ordering::Relaxed);
                self.suspect.store(true, Ordering::Relaxed);
            }
            // A script or command error came over a working connection.
            _ => {
                self.connected.store(true, Ordering::Relaxed);
                if self.suspect.swap(false, Ordering::AcqRel) {
                    self.check_identity().await;
                }
            }
        }
    }

    async fn check_identity(&self) {
        match on_runtime(&self.tasks, identity(self.manager())).await {
            Ok(id) => {
                let old = std::mem::replace(
                    &mut *self
                        .identity
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    id.clone(),
                );
                if old != id {
                    let n = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(node = %self.node, connections_opened = n, "redis: reconnected");
                }
            }
            Err(_) => self.suspect.store(true, Ordering::Relaxed),
        }
    }

    /// Counts a consumer (re-)attach.
    pub fn attached(&self) {
        self.attached.fetch_add(1, Ordering::Relaxed);
    }

    /// How many connections opened: 1 after connecting, +1 per reconnect.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Consumer attaches, re-attaches included.
    pub fn links_attached(&self) -> u64 {
        self.attached.load(Ordering::Relaxed)
    }

    /// Whether the last command found a working connection.
    pub fn is_connected(&self) -> bool {
        !self.is_closed() && self.connected.load(Ordering::Relaxed)
    }

    /// The server's URL, password redacted.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The wait before reconnect attempt `failures` (1-based): doubling from
    /// `reconnect_delay` up to `reconnect_max_delay`.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
        self.config
            .reconnect_delay
            .saturating_mul(factor)
            .min(self.config.reconnect_max_delay)
    }

    /// The driver's settings.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Refuses every command from now on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The runtime the driver was connected on: background work goes there, not to
    /// the caller's runtime (a Lua worker's, in the queue runtime).
    pub fn tasks(&self) -> &tokio::runtime::Handle {
        &self.tasks
    }

    /// Whether [`Link::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The shared connection's settings: an answer may take longer than
/// `publish_timeout`, and at least as long as a connect. Longer, so that a command's
/// own limit (`publish_timeout`) ends it first and says what it may have done: at
/// `publish_timeout`, the default 5 s, both fired at once and the crate's error won,
/// a publish that may have been added said only that the connection failed (review).
fn shared_config(config: &RedisConfig) -> ConnectionManagerConfig {
    let longer = config
        .publish_timeout
        .saturating_add(Duration::from_secs(1));
    manager_config(config, Some(longer.max(CONNECT_TIMEOUT)))
}

fn manager_config(
    config: &RedisConfig,
    response_timeout: Option<Duration>,
) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(config.reconnect_delay)
        .set_max_delay(config.reconnect_max_delay)
        .set_exponent_base(2.0)
        .set_number_of_retries(RETRIES)
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(response_timeout)
}

/// Confirmed messages survive a crash only when the server appends every write to
/// its AOF and syncs it before replying, and a server that evicts keys under
/// `maxmemory` can drop a queue's stream (its confirmed messages) with an `allkeys-*`
/// policy, or the consumers' leases with a `volatile-*` one, which hands a live
/// consumer's messages to another (docs/drivers/redis.md); says so when a setting
/// differs. A server that refuses `CONFIG GET` (ACLs, renamed command) is taken at
/// its word.
async fn warn_unless_persistent(conn: &mut redis::aio::MultiplexedConnection, node: &str) {
    if let Some(settings) = config_get(conn, "append*").await {
        let (aof, fsync) = (
            setting(&settings, "appendonly"),
            setting(&settings, "appendfsync"),
        );
        if aof != "yes" || fsync != "always" {
            tracing::warn!(
                node,
                appendonly = %aof,
                appendfsync = %fsync,
                "redis: the server does not sync every write to its AOF (appendonly yes, appendfsync always): confirmed messages may be lost if it crashes"
            );
        }
    }
    if let Some(settings) = config_get(conn, "maxmemory-policy").await {
        let policy = setting(&settings, "maxmemory-policy");
        if !policy.is_empty() && policy != "noeviction" {
            tracing::warn!(
                node,
                maxmemory_policy = %policy,
                "redis: the server may evict keys under maxmemory (maxmemory-policy is not noeviction): confirmed messages or consumers' leases may be deleted"
            );
        }
    }
}

/// `CONFIG GET pattern`: name, value, name, value...; `None` when refused.
async fn config_get(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Option<Vec<String>> {
    let got: RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(pattern)
        .query_async(conn)
        .await;
    got.ok()
}

/// One setting of a `CONFIG GET` reply ("" when absent).
fn setting(pairs: &[String], name: &str) -> String {
    pairs
        .chunks(2)
        .find(|p| p.first().is_some_and(|k| k == name))
        .and_then(|p| p.get(1).cloned())
        .unwrap_or_default()
}

/// Whether a failed command's connection is to be replaced: it got no reply in time
/// (the network may have lost it without a word), its login was refused (the redis
/// crate keeps such a connection and fails every command on it the same way), or the
/// server is a replica now (a failover: the URL's name may point at the new primary,
/// which only a new connection reaches).
pub(crate) fn connection_is_lost(err: &RedisError) -> bool {
    err.is_timeout()
        || crate::error::is_refused_login(err)
        || matches!(
            err.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        )
}

/// Whether a failed command is worth telling the consumer about (the queue is gone,
/// the login was revoked) rather than only retrying quietly. A refused login is one,
/// though it counts as a connection error: it lasts until someone fixes it.
pub(crate) fn is_permanent(err: &RedisError) -> bool {
    !is_connection_error(err) || crate::error::is_refused_login(err)
}
