//! A loopback TCP proxy in front of a broker that can stop passing on what the broker
//! says: all of it (a broker that hangs with its connections open), or only the AMQP
//! 1.0 performatives that answer a client's `end` or `close`. For tests of what a
//! client does while it waits for an answer that never comes.
//!
//! ```no_run
//! use queue_fixtures::proxy::{BrokerProxy, Performative};
//! let proxy = BrokerProxy::start_amqp10(5672).unwrap();
//! proxy.withhold(Performative::End);
//! // connect to amqp://guest:guest@127.0.0.1:{proxy.port()} ...
//! assert!(proxy.wait_withheld(1, std::time::Duration::from_secs(10)));
//! ```

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use queue_core::{Driver, Error, Headers, Message, QueueId, QueueSpec};
use queue_testkit::{numbered, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A performative the proxy can withhold (its AMQP 1.0 descriptor code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Performative {
    /// `attach`: the broker's answer to a link's attach.
    Attach = 0x12,
    /// `flow`: the broker's credit and session window.
    Flow = 0x13,
    /// `detach`: the broker's answer to a link's detach.
    Detach = 0x16,
    /// `end`: the broker's answer to a session's end.
    End = 0x17,
    /// `close`: the broker's answer to a connection's close.
    Close = 0x18,
}

/// What the proxy's connections share with the test.
#[derive(Default)]
struct State {
    withheld_kinds: Vec<Performative>,
    /// Performatives held back until [`BrokerProxy::release_delayed`].
    delayed_kinds: Vec<Performative>,
    /// Bumped by [`BrokerProxy::release_delayed`]: it wakes every connection to pass
    /// on what it held back.
    released: Released,
    frozen: bool,
    /// Connections numbered below it (in the order accepted, from 0) are cut off.
    cut_below: usize,
    /// Connections numbered below it: the proxy reads nothing more their clients send.
    unread_below: usize,
    withheld: usize,
    /// Clients whose side of the connection is still open.
    clients: usize,
    /// Connections accepted so far.
    accepted: usize,
    /// How late the broker's first bytes on a connection reach its client.
    first_reply_delay: Option<Duration>,
    /// The broker's AMQP 1.0 performatives passed on so far, by descriptor code.
    passed: std::collections::HashMap<u8, usize>,
}

/// The signal of [`BrokerProxy::release_delayed`] (a `watch` has no `Default`).
struct Released(tokio::sync::watch::Sender<u64>);

impl Default for Released {
    fn default() -> Self {
        Released(tokio::sync::watch::Sender::new(0))
    }
}

/// The proxy; it stops (its thread with it) when dropped.
pub struct BrokerProxy {
    port: u16,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BrokerProxy {
    /// Listens on a free loopback port and forwards every connection to
    /// 127.0.0.1:`broker_port`, on a thread of its own (so its work is never counted
    /// against the thread of the client under test). It can [`freeze`](Self::freeze).
    pub fn start(broker_port: u16) -> Result<BrokerProxy, String> {
        BrokerProxy::listen(broker_port, false)
    }

    /// The same for an AMQP 1.0 broker, read frame by frame so that it can also
    /// [`withhold`](Self::withhold) performatives.
    pub fn start_amqp10(broker_port: u16) -> Result<BrokerProxy, String> {
        BrokerProxy::listen(broker_port, true)
    }

    fn listen(broker_port: u16, framed: bool) -> Result<BrokerProxy, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("proxy: binding a loopback port: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("proxy: {e}"))?
            .port();
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("proxy: {e}"))?;
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("broker-proxy".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = stopped => {}
                        () = accept_loop(listener, broker_port, framed, shared) => {}
                    }
                });
            })
            .map_err(|e| format!("proxy: starting its thread: {e}"))?;
        Ok(BrokerProxy {
            port,
            state,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on, drops every AMQP 1.0 `performative` the broker sends (the client
    /// never sees it); everything else still passes. Only a proxy started with
    /// [`start_amqp10`](Self::start_amqp10) reads frames: another lets them all pass.
    pub fn withhold(&self, performative: Performative) {
        lock(&self.state.0).withheld_kinds.push(performative);
    }

    /// From now on, holds back every AMQP 1.0 `performative` the broker sends, in the
    /// order it came, until [`release_delayed`](Self::release_delayed): a broker slow
    /// to say it (to grant credit, say), where [`withhold`](Self::withhold) makes one
    /// that never does. Each frame held back counts in [`withheld`](Self::withheld).
    pub fn delay(&self, performative: Performative) {
        lock(&self.state.0).delayed_kinds.push(performative);
    }

    /// Passes on every frame held back by [`delay`](Self::delay), in the order each
    /// connection got them, and delays nothing from now on.
    pub fn release_delayed(&self) {
        let mut state = lock(&self.state.0);
        state.delayed_kinds.clear();
        state.released.0.send_modify(|n| *n += 1);
    }

    /// From now on, the broker's first bytes on each connection reach its client
    /// `delay` late (later bytes wait behind them): a broker slow to set a connection
    /// up, a login or handshake of a round trip or more far away.
    pub fn delay_first_replies(&self, delay: Duration) {
        lock(&self.state.0).first_reply_delay = Some(delay);
    }

    /// From now on, passes every performative again (those withheld before stay
    /// dropped).
    pub fn stop_withholding(&self) {
        lock(&self.state.0).withheld_kinds.clear();
    }

    /// From now on, drops everything the broker sends, whatever the protocol: the
    /// broker looks hung to its clients, their connections still open (when the
    /// broker closes one, the client's side stays open, as it does once anything is
    /// withheld).
    pub fn freeze(&self) {
        lock(&self.state.0).frozen = true;
    }

    /// From now on, drops everything either side sends on the connections open now,
    /// as a network that lost them without a word would (no FIN, no RST: a NAT or a
    /// firewall that forgot them): nothing reaches the broker, nothing comes back,
    /// and both ends still think them open. Connections made later pass. A client
    /// that closes a cut-off connection is not seen to (no FIN reaches the proxy's
    /// count either): [`wait_clients_gone`](Self::wait_clients_gone) waits for the
    /// others only if none was cut off.
    pub fn cut_off_open_connections(&self) {
        let mut state = lock(&self.state.0);
        state.cut_below = state.accepted;
    }

    /// From now on, reads nothing more that clients send on the connections open now
    /// (after the read under way), while what the broker says still passes: a broker
    /// that stops reading its socket but still sends. Their clients' writes fill the
    /// socket buffers and then block; nothing the client reads shows that anything is
    /// wrong. Counted in [`withheld`](Self::withheld) per connection, once its reading
    /// stopped. Connections made later pass.
    pub fn stop_reading_open_connections(&self) {
        let mut state = lock(&self.state.0);
        state.unread_below = state.accepted;
    }

    /// Whether [`freeze`](Self::freeze) was called.
    pub fn is_frozen(&self) -> bool {
        lock(&self.state.0).frozen
    }

    /// How many of the broker's `performative`s the proxy has seen on AMQP 1.0
    /// connections ([`start_amqp10`](Self::start_amqp10)), withheld ones included (a
    /// broker answers each attach with an `attach`, or refuses it by ending its
    /// session: those count a driver's attaches).
    pub fn seen(&self, performative: Performative) -> usize {
        let guard = lock(&self.state.0);
        guard
            .passed
            .get(&(performative as u8))
            .copied()
            .unwrap_or(0)
    }

    /// How many times the proxy has withheld something so far (a frame, or a read of
    /// a frozen broker's bytes or of either side of a cut-off connection): the proof
    /// that the fault landed.
    pub fn withheld(&self) -> usize {
        lock(&self.state.0).withheld
    }

    /// Waits until [`withheld`](Self::withheld) reaches `n`; `false` after `limit`.
    pub fn wait_withheld(&self, n: usize, limit: Duration) -> bool {
        self.wait_until(limit, |state| state.withheld >= n)
    }

    /// Waits until every client has closed its side of its connection (the proxy
    /// read its end of stream); `false` after `limit`.
    pub fn wait_clients_gone(&self, limit: Duration) -> bool {
        self.wait_until(limit, |state| state.clients == 0)
    }

    /// Waits until `n` connections were accepted in all (a client that reconnects
    /// makes one more); `false` after `limit`.
    pub fn wait_accepted(&self, n: usize, limit: Duration) -> bool {
        self.wait_until(limit, |state| state.accepted >= n)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        lock(&self.state.0).accepted
    }

    /// Freezes the broker under a client that only waits (an idle consumer), and
    /// waits up to `limit` for the client to notice and dial again; `Err` says what
    /// did not happen. The freeze has landed once the broker's idle frames or
    /// heartbeats were withheld.
    pub async fn freeze_until_redialled(self: &Arc<Self>, limit: Duration) -> Result<(), String> {
        let redialled = self.accepted() + 1;
        self.freeze();
        if !self
            .wait_async(move |p| p.wait_accepted(redialled, limit))
            .await
        {
            return Err(format!(
                "the client did not notice the silence within {limit:?}"
            ));
        }
        if self.withheld() == 0 {
            return Err("the broker said nothing to withhold".to_string());
        }
        Ok(())
    }

    /// Publishes through `driver` once (the connection through the proxy works), then
    /// freezes the broker and publishes again: that publish's error, which a driver
    /// must give within its time limits. Panics when the publish succeeds, or waits
    /// past the test kit's patience.
    pub async fn publish_to_frozen(&self, driver: &dyn Driver, queue: &QueueId) -> Error {
        driver
            .publish(queue, numbered(1))
            .await
            .expect("a publish before the freeze");
        self.freeze();
        let published = within(
            "a publish to the hung broker",
            driver.publish(queue, numbered(2)),
        );
        let err = published
            .await
            .expect_err("a publish the broker never confirmed");
        assert!(
            self.withheld() >= 1,
            "the broker said nothing after the freeze"
        );
        err
    }

    /// Publishes through `driver` once, then stops reading what it sends
    /// ([`stop_reading_open_connections`](Self::stop_reading_open_connections)) and
    /// publishes 32 MiB at once, more than the socket buffers on both sides hold, so
    /// that its writes block; then publishes until one goes through, which a driver
    /// must reach on a new connection within the test kit's patience. Panics when the
    /// stall did not land, or publishing never went on.
    pub async fn publish_through_a_stop_in_reading(&self, driver: &dyn Driver, queue: &QueueId) {
        driver
            .publish(queue, numbered(1))
            .await
            .expect("a publish before the broker stops reading");
        self.stop_reading_open_connections();
        let big = || {
            Message::from_bytes(
                vec![b'x'; 1 << 20],
                Headers::new(),
                "application/octet-stream",
            )
        };
        let stalled =
            futures_util::future::join_all((0..32).map(|_| driver.publish(queue, big()))).await;
        assert!(
            stalled.iter().any(|published| published.is_err()),
            "every publish went through a proxy that reads nothing"
        );
        assert!(self.withheld() >= 1, "the proxy never stopped reading");
        within("a publish after the broker stopped reading", async {
            while driver.publish(queue, numbered(2)).await.is_err() {}
        })
        .await;
        assert!(self.accepted() >= 2, "published without a new connection");
    }

    /// Declares `spec` through `driver` while the broker is frozen: the declare's
    /// error and how long it took to come. Panics when the declare succeeds, or waits
    /// past the test kit's patience.
    pub async fn declare_while_frozen(
        &self,
        driver: &dyn Driver,
        spec: &QueueSpec,
    ) -> (Error, Duration) {
        let started = Instant::now();
        let declared = within("a declare on the hung broker", driver.declare(spec)).await;
        let err = declared.expect_err("a declare the broker never answered");
        assert!(self.is_frozen(), "the broker is not frozen");
        (err, started.elapsed())
    }

    /// Runs one of the waits above off the async runtime's threads, whose tasks (the
    /// client's under test) must go on meanwhile:
    /// `proxy.wait_async(|p| p.wait_accepted(2, limit)).await`.
    pub async fn wait_async(
        self: &Arc<Self>,
        wait: impl FnOnce(&BrokerProxy) -> bool + Send + 'static,
    ) -> bool {
        let proxy = Arc::clone(self);
        match tokio::task::spawn_blocking(move || wait(&proxy)).await {
            Ok(done) => done,
            // A panic in the wait is the test's failure, not a "no".
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    fn wait_until(&self, limit: Duration, done: impl Fn(&State) -> bool) -> bool {
        let (state, rung) = &*self.state;
        let deadline = Instant::now() + limit;
        let mut guard = lock(state);
        while !done(&guard) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = match rung.wait_timeout(guard, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }
}

impl Drop for BrokerProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    broker_port: u16,
    framed: bool,
    state: Arc<(Mutex<State>, Condvar)>,
) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((client, _)) = listener.accept().await {
        let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
            continue;
        };
        let _ = (client.set_nodelay(true), broker.set_nodelay(true));
        let (client_read, client_write) = client.into_split();
        let (broker_read, broker_write) = broker.into_split();
        let index = {
            let mut counts = lock(&state.0);
            counts.clients += 1;
            counts.accepted += 1;
            counts.accepted - 1
        };
        state.1.notify_all();
        let client_ended = Arc::clone(&state);
        connections.spawn(async move {
            copy(client_read, broker_write, index, &client_ended).await;
            let (state, rung) = &*client_ended;
            lock(state).clients -= 1;
            rung.notify_all();
        });
        connections.spawn(filter(
            broker_read,
            client_write,
            framed,
            index,
            Arc::clone(&state),
        ));
    }
}

/// Forwards the client's bytes to the broker, none once connection `index` is cut off.
async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    index: usize,
    state: &(Mutex<State>, Condvar),
) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if unread(state, index) {
            // The socket stays open, never read again: the client's writes back up.
            std::future::pending::<()>().await;
        }
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) if is_cut_off(state, index) => {
                // A lost network carries no FIN either.
                std::future::pending::<()>().await;
                return;
            }
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut_off(state, index) {
            continue;
        }
        if to.write_all(&chunk[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Forwards the broker's bytes, all of them until frozen; when `framed`, unit by unit
/// (a protocol header or an AMQP 1.0 frame), dropping the withheld performatives.
async fn filter(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    framed: bool,
    index: usize,
    state: Arc<(Mutex<State>, Condvar)>,
) {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    // Frames held back by `delay`, in the order they came.
    let mut delayed: Vec<u8> = Vec::new();
    let mut released = lock(&state.0).released.0.subscribe();
    let mut first = true;
    loop {
        let read = tokio::select! {
            read = from.read(&mut chunk) => read,
            _ = released.changed() => {
                released.borrow_and_update();
                if !delaying(&state) && to.write_all(&std::mem::take(&mut delayed)).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) if withholding(&state) || is_cut_off(&state, index) => {
                // A broker that hangs does not hang up either: the client keeps its
                // connection, unanswered, until the proxy goes.
                std::future::pending::<()>().await;
                return;
            }
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen(&state) || cut_off(&state, index) {
            pending.clear();
            continue;
        }
        if std::mem::take(&mut first) {
            let delay = lock(&state.0).first_reply_delay;
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
        }
        if !framed {
            if to.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            continue;
        }
        pending.extend_from_slice(&chunk[..n]);
        let mut forward = Vec::new();
        while let Some(unit) = next_unit(&pending) {
            let bytes: Vec<u8> = pending.drain(..unit).collect();
            let performative = performative_of(&bytes);
            if let Some(code) = performative {
                *lock(&state.0).passed.entry(code).or_default() += 1;
            }
            match performative {
                Some(code) if withholds(&state, code) => {}
                Some(code) if delays(&state, code) => delayed.extend_from_slice(&bytes),
                _ => {
                    // Released meanwhile: what was held back goes first.
                    if !delayed.is_empty() && !delaying(&state) {
                        forward.append(&mut delayed);
                    }
                    forward.extend_from_slice(&bytes);
                }
            }
        }
        if to.write_all(&forward).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Whether connection `index` is no longer read; counted as withheld the first time.
fn unread(state: &(Mutex<State>, Condvar), index: usize) -> bool {
    let mut guard = lock(&state.0);
    if index >= guard.unread_below {
        return false;
    }
    guard.withheld += 1;
    drop(guard);
    state.1.notify_all();
    true
}

/// Whether the proxy withholds anything now (frozen, or any performative).
fn withholding(state: &(Mutex<State>, Condvar)) -> bool {
    let guard = lock(&state.0);
    guard.frozen || !guard.withheld_kinds.is_empty()
}

/// Whether the broker's bytes are all withheld now; counts the read withheld.
fn frozen(state: &(Mutex<State>, Condvar)) -> bool {
    let (state, rung) = state;
    let mut guard = lock(state);
    if !guard.frozen {
        return false;
    }
    guard.withheld += 1;
    rung.notify_all();
    true
}

/// Whether connection `index` is cut off ([`BrokerProxy::cut_off_open_connections`]).
fn is_cut_off(state: &(Mutex<State>, Condvar), index: usize) -> bool {
    index < lock(&state.0).cut_below
}

/// [`is_cut_off`], counting a read dropped as withheld.
fn cut_off(state: &(Mutex<State>, Condvar), index: usize) -> bool {
    let (state, rung) = state;
    let mut guard = lock(state);
    if index >= guard.cut_below {
        return false;
    }
    guard.withheld += 1;
    rung.notify_all();
    true
}

/// Whether anything is held back by `delay` now.
fn delaying(state: &(Mutex<State>, Condvar)) -> bool {
    !lock(&state.0).delayed_kinds.is_empty()
}

/// Whether frames of descriptor `code` are held back now; counts the one held back.
fn delays(state: &(Mutex<State>, Condvar), code: u8) -> bool {
    listed_and_counted(state, code, |s| &s.delayed_kinds)
}

/// Whether frames of descriptor `code` are withheld now; counts the one withheld.
fn withholds(state: &(Mutex<State>, Condvar), code: u8) -> bool {
    listed_and_counted(state, code, |s| &s.withheld_kinds)
}

/// Whether `code` is in the list `kinds` picks; counted in `withheld` when it is.
fn listed_and_counted(
    state: &(Mutex<State>, Condvar),
    code: u8,
    kinds: impl Fn(&State) -> &Vec<Performative>,
) -> bool {
    let (state, rung) = state;
    let mut guard = lock(state);
    if !kinds(&guard).iter().any(|p| *p as u8 == code) {
        return false;
    }
    guard.withheld += 1;
    rung.notify_all();
    true
}

/// The length of the next whole unit in `bytes`: an 8-byte protocol header or an AMQP
/// 1.0 frame.
fn next_unit(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 8 {
        return None;
    }
    if bytes.starts_with(b"AMQP") {
        return Some(8);
    }
    let size = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    // A size below the header's would never advance: treat it as the rest of the
    // stream (the client then sees the broker's bytes as they are).
    let size = if size < 8 { bytes.len() } else { size };
    (bytes.len() >= size).then_some(size)
}

/// The descriptor code of an AMQP frame's performative (`None` for headers, SASL
/// frames, heartbeats and descriptors the proxy does not read).
fn performative_of(frame: &[u8]) -> Option<u8> {
    if frame.starts_with(b"AMQP") || frame.len() < 8 || frame[5] != 0 {
        return None;
    }
    let body = frame.get(usize::from(frame[4]) * 4..)?;
    match body {
        // A described type: 0x00, then the descriptor as a smallulong or a ulong.
        [0x00, 0x53, code, ..] => Some(*code),
        [0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, code, ..] => Some(*code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_whole_and_their_performative_read() {
        // An `end` frame on channel 1: size 12, doff 2, type 0, then 0x00 0x53 0x17 0x45.
        let end = [0, 0, 0, 12, 2, 0, 0, 1, 0x00, 0x53, 0x17, 0x45];
        let mut stream = b"AMQP\x00\x01\x00\x00".to_vec();
        stream.extend_from_slice(&end);
        assert_eq!(next_unit(&stream), Some(8));
        assert_eq!(next_unit(&stream[8..]), Some(12));
        assert_eq!(next_unit(&stream[8..19]), None, "half a frame waits");
        assert_eq!(performative_of(&end), Some(Performative::End as u8));
        // The same with the descriptor as a full ulong.
        let long = [
            0, 0, 0, 19, 2, 0, 0, 1, 0x00, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x18, 0x45,
        ];
        assert_eq!(performative_of(&long), Some(Performative::Close as u8));
        // A heartbeat (an empty frame) and a SASL frame are no performative.
        assert_eq!(performative_of(&[0, 0, 0, 8, 2, 0, 0, 0]), None);
        assert_eq!(
            performative_of(&[0, 0, 0, 11, 2, 1, 0, 0, 0x00, 0x53, 0x40]),
            None
        );
    }
}
