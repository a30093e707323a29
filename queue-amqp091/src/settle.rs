//! Settling deliveries: acks batched with `multiple` where that is safe.
//!
//! Each attachment of a subscription (one channel) has a [`Settler`]: deliveries are
//! tracked by tag and `ack`/`release` mark them. Marks gather into a round, sent in as
//! few frames as is safe:
//!
//! * releases first, one `basic.nack(requeue)` each (so a later `multiple` ack can
//!   never cover a message that should go back);
//! * then one `basic.ack(multiple)` for the run of acked tags below the oldest
//!   unsettled one (every tag up to it is settled, so `multiple` covers only acks);
//! * then single acks for acked tags after that gap (a slow handler never holds back
//!   other acks, so the broker's prefetch count never stalls).
//!
//! A round is complete when it holds [`GATHER_COUNT`] marks (fewer with a small
//! prefetch: half of it, so that the broker always has deliveries left to send), or
//! [`GATHER_TIME`] after its first mark ([`GATHER_TIME_FILLING`] when it fills fast:
//! [`round_deadline`]). The mark that completes a round sends it,
//! from the thread that made it; a round that no mark completes in time is sent by
//! the channel's flusher task. Handing every round to the flusher cost a wake-up of
//! another thread per round, and waiting for lapin to write each frame one more
//! (docs/performance.md, "The runtime on RabbitMQ"). [`Settlers`] keeps the live
//! settlers so that closing the driver can flush them all.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use futures_util::FutureExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use queue_core::{Acker, Error, ErrorKind, Result};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::connection::CLOSE_TIMEOUT;
use crate::{error, lock};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Unsettled,
    Acked,
    Released,
}

struct SettleState {
    /// Why settling is refused, once it is.
    refused: Option<(ErrorKind, String)>,
    /// The broker cancelled the consumer: its queue may be gone, and the deliveries
    /// with it, so they are never said to be lost (see [`Settler::is_lost`]).
    cancelled_by_broker: bool,
    tags: BTreeMap<u64, Mark>,
    /// Tags acked or released since the last round was taken (every round takes all
    /// of them).
    marked: usize,
    /// When the first mark of the round being gathered was made.
    round_started: Option<Instant>,
    /// Whether the flusher is timing rounds; while it is, marks need not wake it.
    timing: bool,
    /// Whether a mark was made since the flusher last looked: it keeps timing while
    /// marks keep coming, rather than being woken for each new round.
    marked_since_tick: bool,
}

impl SettleState {
    /// Takes every mark made so far as one round.
    fn take_round(&mut self) -> Round {
        let mut round = Round::default();
        self.tags.retain(|tag, mark| {
            if *mark == Mark::Released {
                round.nacks.push(*tag);
                false
            } else {
                true
            }
        });
        let run: Vec<u64> = self
            .tags
            .iter()
            .take_while(|(_, mark)| **mark == Mark::Acked)
            .map(|(tag, _)| *tag)
            .collect();
        for tag in &run {
            self.tags.remove(tag);
        }
        if let Some(last) = run.last() {
            round.multiple = Some((*last, run.len() > 1));
        }
        self.tags.retain(|tag, mark| {
            if *mark == Mark::Acked {
                round.singles.push(*tag);
                false
            } else {
                true
            }
        });
        self.marked = 0;
        self.round_started = None;
        round
    }

    /// The channel is gone: nothing can be settled any more (the broker redelivers).
    fn kill(&mut self, why: &str) {
        self.refused = Some((ErrorKind::Internal, why.to_string()));
        self.tags.clear();
        self.marked = 0;
        self.round_started = None;
    }
}

/// Why a channel's settler stops settling when sending on it failed.
const CHANNEL_GONE: &str =
    "the delivery's channel closed (connection lost?): the broker redelivers it";

/// The ack batcher of one consumer channel.
pub(crate) struct Settler {
    channel: Channel,
    /// How many marks complete a round.
    round_size: usize,
    state: Mutex<SettleState>,
    /// Wakes the flusher: a round started while it was not timing, or settling was
    /// refused.
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

/// A frame handed to lapin, which completes once lapin has written it.
type Written<'a> = Pin<Box<dyn Future<Output = lapin::Result<()>> + Send + 'a>>;

impl Settler {
    /// Starts tracking delivery `tag`; its [`Acker`] settles it.
    pub(crate) fn track(self: &Arc<Self>, tag: u64) -> Box<dyn Acker> {
        lock(&self.state).tags.insert(tag, Mark::Unsettled);
        Box::new(ChannelAcker {
            settler: Arc::clone(self),
            tag,
        })
    }

    fn mark(&self, tag: u64, mark: Mark) -> Result<()> {
        let mut state = lock(&self.state);
        if let Some((kind, why)) = &state.refused {
            return Err(Error::new(*kind, why.clone()).retryable_if(false));
        }
        if !self.channel.status().connected() {
            // No settlement can reach the broker any more, and it has taken back
            // what it delivered here: an `Ok` marked in a round would be a lie until
            // the subscription next looked at its channel.
            return self.gone(state);
        }
        match state.tags.get_mut(&tag) {
            Some(m @ Mark::Unsettled) => *m = mark,
            _ => return Err(Error::invalid(format!("delivery {tag} is already settled"))),
        }
        state.marked += 1;
        state.marked_since_tick = true;
        let now = Instant::now();
        let started = *state.round_started.get_or_insert(now);
        if state.marked >= self.round_size || now >= round_deadline(started, state.marked) {
            // Sent under the lock, so rounds reach lapin in the order they were taken.
            let round = state.take_round();
            if let Err(e) = self.hand_over(&round) {
                settling_failed(&e);
                return self.gone(state);
            }
            return Ok(());
        }
        if !state.timing {
            state.timing = true;
            drop(state);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Refuses this settlement and every one after it: the channel is gone. The
    /// flusher has nothing left to send but must say it is done.
    fn gone(&self, mut state: std::sync::MutexGuard<'_, SettleState>) -> Result<()> {
        state.kill(CHANNEL_GONE);
        drop(state);
        self.wake.notify_one();
        Err(Error::new(ErrorKind::Internal, CHANNEL_GONE).retryable_if(false))
    }

    /// Whether the broker has taken back what this channel delivered and nobody
    /// settled: the channel is closed (its connection lost), or the subscription let go
    /// of it, which closes it. RabbitMQ delivers such a message again, unless it
    /// cancelled the consumer itself: the queue may have been deleted, and a failed
    /// delivery's copy is then all that is left of it.
    fn is_lost(&self) -> bool {
        let state = lock(&self.state);
        !state.cancelled_by_broker
            && (state.refused.is_some() || !self.channel.status().connected())
    }

    /// The broker cancelled the consumer (see [`Settler::is_lost`]).
    pub(crate) fn cancelled_by_broker(&self) {
        lock(&self.state).cancelled_by_broker = true;
    }

    /// Refuses further settlements; what was settled before is still sent.
    pub(crate) fn refuse(&self, kind: ErrorKind, why: &str) {
        let mut state = lock(&self.state);
        if state.refused.is_none() {
            state.refused = Some((kind, why.to_string()));
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Refuses further settlements and waits until the flusher has sent the rest, at
    /// most [`CLOSE_TIMEOUT`]: a connection the broker stopped reading (a resource
    /// alarm, a network that drops everything) never takes the last frames, and a
    /// cancel or close must not wait for ever. Settlements not written by then come
    /// back as redeliveries.
    pub(crate) async fn close_and_drain(&self, kind: ErrorKind, why: &str) {
        self.refuse(kind, why);
        let mut done = self.done.subscribe();
        if tokio::time::timeout(CLOSE_TIMEOUT, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            tracing::warn!(
                "settlements not written within {CLOSE_TIMEOUT:?}; those messages will be redelivered"
            );
        }
    }

    /// Hands a round's frames to lapin in order, without waiting for them to be
    /// written; what is still being written is returned. lapin's `basic_ack` and
    /// `basic_nack` queue their frame when first polled, and its writer sends the
    /// frames of a connection in the order they were queued.
    fn hand_over(&self, round: &Round) -> std::result::Result<Vec<Written<'_>>, lapin::Error> {
        let mut writing = Vec::new();
        for tag in &round.nacks {
            let options = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            queue(
                &mut writing,
                Box::pin(self.channel.basic_nack(*tag, options)),
            )?;
        }
        if let Some((tag, multiple)) = round.multiple {
            let options = BasicAckOptions { multiple };
            queue(&mut writing, Box::pin(self.channel.basic_ack(tag, options)))?;
        }
        for tag in &round.singles {
            let options = BasicAckOptions { multiple: false };
            queue(
                &mut writing,
                Box::pin(self.channel.basic_ack(*tag, options)),
            )?;
        }
        Ok(writing)
    }
}

/// Polls `frame` once, which queues it in lapin; keeps it in `writing` while it is not
/// yet written.
fn queue<'a>(
    writing: &mut Vec<Written<'a>>,
    mut frame: Written<'a>,
) -> std::result::Result<(), lapin::Error> {
    match (&mut frame).now_or_never() {
        Some(result) => result,
        None => {
            writing.push(frame);
            Ok(())
        }
    }
}

/// How many settlements make a round worth sending at once (with a prefetch of at
/// least twice as many).
const GATHER_COUNT: usize = 64;
/// The longest a settlement waits for others to join its round while they come
/// slowly: the broker learns of an ack at most this much later (a crash in between
/// redelivers the message).
const GATHER_TIME: std::time::Duration = std::time::Duration::from_millis(1);
/// The longest a round waits that filled fast: one with [`FILLING_FAST`] settlements
/// or more at [`GATHER_TIME`] is on its way to [`GATHER_COUNT`] within this, so the
/// settlement that fills it sends it, rather than the flusher's timer a part of it.
const GATHER_TIME_FILLING: std::time::Duration = std::time::Duration::from_millis(4);
/// See [`GATHER_TIME_FILLING`]: a quarter of a full round.
const FILLING_FAST: usize = GATHER_COUNT / 4;

/// When a round that started at `started` and holds `marked` settlements is sent if
/// it is not full before: [`GATHER_TIME`] after its start, or [`GATHER_TIME_FILLING`]
/// when it fills fast. A consumer that settles slowly (a fixed rate, a small prefetch)
/// never has that many in a millisecond, so its acks wait no longer than 1 ms.
fn round_deadline(started: Instant, marked: usize) -> Instant {
    if marked >= FILLING_FAST {
        started + GATHER_TIME_FILLING
    } else {
        started + GATHER_TIME
    }
}

/// What the flusher does next.
enum Next {
    /// Nothing is being gathered: wait to be woken.
    Idle,
    /// Look again at this instant (or when woken).
    At(Instant),
    /// Settling is refused: this is the last round.
    Finish(Round),
}

/// Sends the rounds that no mark completes, at their [`round_deadline`], and the last
/// round once settling is refused.
async fn flush_loop(settler: Arc<Settler>) {
    let last = loop {
        match next_step(&settler) {
            Next::Idle => settler.wake.notified().await,
            Next::At(when) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(when) => {}
                    _ = settler.wake.notified() => {}
                }
            }
            Next::Finish(round) => break round,
        }
    };
    // Waits until the last frames are written: whoever closes the channel or the
    // connection next does so after every settlement made before.
    match settler.hand_over(&last) {
        Ok(writing) => {
            for frame in writing {
                if let Err(e) = frame.await {
                    settling_failed(&e);
                    break;
                }
            }
        }
        Err(e) => {
            settling_failed(&e);
        }
    }
    settler.done.send_replace(true);
}

/// Sends a round past its [`round_deadline`], and says when to look again.
fn next_step(settler: &Settler) -> Next {
    let mut state = lock(&settler.state);
    if state.refused.is_some() {
        return Next::Finish(state.take_round());
    }
    let now = Instant::now();
    let deadline = state
        .round_started
        .map(|started| round_deadline(started, state.marked));
    match deadline {
        Some(deadline) if now < deadline => Next::At(deadline),
        Some(_) => {
            let round = state.take_round();
            if let Err(e) = settler.hand_over(&round) {
                settling_failed(&e);
                state.kill(CHANNEL_GONE);
                return Next::Finish(Round::default());
            }
            state.marked_since_tick = false;
            Next::At(now + GATHER_TIME)
        }
        // Marks are still coming: a round is likely to start soon.
        None if state.marked_since_tick => {
            state.marked_since_tick = false;
            Next::At(now + GATHER_TIME)
        }
        None => {
            state.timing = false;
            Next::Idle
        }
    }
}

fn settling_failed(e: &lapin::Error) {
    tracing::debug!(error = %error::describe(e), "settling failed; the broker redelivers");
}

/// Settles one delivery through its channel's settler.
struct ChannelAcker {
    settler: Arc<Settler>,
    tag: u64,
}

#[async_trait]
impl Acker for ChannelAcker {
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

    fn is_lost(&self) -> bool {
        self.settler.is_lost()
    }
}

/// The live settlers of one driver, flushed when it closes.
pub(crate) struct Settlers {
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Weak<Settler>>>,
    /// Where flushers run (the driver's runtime: see `Connection::tasks`).
    tasks: tokio::runtime::Handle,
}

impl Settlers {
    pub(crate) fn new(tasks: tokio::runtime::Handle) -> Settlers {
        Settlers {
            next_id: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            tasks,
        }
    }

    /// Starts the settler of `channel` and its flusher; the id is for [`Self::forget`].
    pub(crate) fn start(&self, channel: Channel, prefetch: u16) -> (Arc<Settler>, u64) {
        let settler = Arc::new(Settler {
            channel,
            round_size: GATHER_COUNT.min(usize::from(prefetch / 2).max(1)),
            state: Mutex::new(SettleState {
                refused: None,
                cancelled_by_broker: false,
                tags: BTreeMap::new(),
                marked: 0,
                round_started: None,
                timing: false,
                marked_since_tick: false,
            }),
            wake: Notify::new(),
            done: watch::channel(false).0,
        });
        self.tasks.spawn(flush_loop(Arc::clone(&settler)));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).insert(id, Arc::downgrade(&settler));
        (settler, id)
    }

    /// The settler's subscription drains it itself.
    pub(crate) fn forget(&self, id: u64) {
        lock(&self.live).remove(&id);
    }

    /// Refuses further settlements everywhere and waits until every flusher has sent
    /// what was settled before.
    pub(crate) async fn drain_all(&self, kind: ErrorKind, why: &str) {
        let settlers: Vec<Arc<Settler>> = lock(&self.live)
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        // Side by side: each waits at most CLOSE_TIMEOUT, all of them no longer.
        futures_util::future::join_all(settlers.iter().map(|s| s.close_and_drain(kind, why))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_that_fills_slowly_goes_out_one_millisecond_after_it_started() {
        let started = Instant::now();
        for marked in [1, 2, FILLING_FAST - 1] {
            assert_eq!(round_deadline(started, marked), started + GATHER_TIME);
        }
    }

    #[test]
    fn a_round_that_fills_fast_waits_longer_to_be_filled_by_a_settlement() {
        let started = Instant::now();
        for marked in [FILLING_FAST, GATHER_COUNT - 1] {
            assert_eq!(
                round_deadline(started, marked),
                started + GATHER_TIME_FILLING
            );
        }
    }
}
