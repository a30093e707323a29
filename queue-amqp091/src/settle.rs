//! Settling deliveries: acks batched with `multiple` where that is safe.
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
//! so a fast consumer acks in batches and a slow one acks at once. [`Settlers`] keeps
//! the live ones so that closing the driver can flush them all.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use queue_core::{Acker, Error, ErrorKind, Result};
use tokio::sync::{Notify, watch};

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
    tags: BTreeMap<u64, Mark>,
    /// Tags acked or released since the last round was taken: every round takes all
    /// of them, so the unsettled tags are `tags.len() - marked`.
    marked: usize,
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

impl Round {
    fn is_empty(&self) -> bool {
        self.nacks.is_empty() && self.multiple.is_none() && self.singles.is_empty()
    }
}

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
        {
            let mut state = lock(&self.state);
            if let Some((kind, why)) = &state.refused {
                return Err(Error::new(*kind, why.clone()).retryable_if(false));
            }
            match state.tags.get_mut(&tag) {
                Some(m @ Mark::Unsettled) => *m = mark,
                _ => return Err(Error::invalid(format!("delivery {tag} is already settled"))),
            }
            state.marked += 1;
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

    /// Takes what can be sent now; `true` once settling is refused (the last round).
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
        let run: Vec<u64> = state
            .tags
            .iter()
            .take_while(|(_, mark)| **mark == Mark::Acked)
            .map(|(tag, _)| *tag)
            .collect();
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
        state.marked = 0;
        let finished = state.refused.is_some();
        (round, finished)
    }

    /// Lets settlements gather into fewer frames while other deliveries of the channel
    /// are still being handled: returns once [`GATHER_COUNT`] are waiting, none is
    /// left unsettled, settling is refused, or [`GATHER_TIME`] has passed. Sending a
    /// round per settlement cost a wake-up of the flusher, a frame, and a scan of the
    /// tags for each delivery (docs/performance.md, "The runtime on RabbitMQ").
    async fn gather(&self) {
        let until = tokio::time::Instant::now() + GATHER_TIME;
        loop {
            {
                let state = lock(&self.state);
                let unsettled = state.tags.len().saturating_sub(state.marked);
                if state.refused.is_some()
                    || state.marked == 0
                    || state.marked >= GATHER_COUNT
                    || unsettled == 0
                {
                    return;
                }
            }
            if tokio::time::timeout_at(until, self.wake.notified())
                .await
                .is_err()
            {
                return;
            }
        }
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

/// How many settlements make a round worth sending at once.
const GATHER_COUNT: usize = 64;
/// The longest a settlement waits for others to join its round: the broker learns of
/// an ack at most this much later (a crash in between redelivers the message).
const GATHER_TIME: std::time::Duration = std::time::Duration::from_millis(1);

async fn flush_loop(settler: Arc<Settler>) {
    loop {
        settler.gather().await;
        let (round, finished) = settler.take_round();
        if !round.is_empty() {
            tracing::trace!(
                nacks = round.nacks.len(),
                multiple = ?round.multiple,
                singles = round.singles.len(),
                "settling"
            );
            if let Err(e) = settler.send(&round).await {
                tracing::debug!(error = %error::describe(&e), "settling failed; the broker redelivers");
                settler.kill(
                    "the delivery's channel closed (connection lost?): the broker redelivers it",
                );
                break;
            }
            tracing::trace!("settled");
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
    pub(crate) fn start(&self, channel: Channel) -> (Arc<Settler>, u64) {
        let settler = Arc::new(Settler {
            channel,
            state: Mutex::new(SettleState {
                refused: None,
                tags: BTreeMap::new(),
                marked: 0,
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
        for s in settlers {
            s.close_and_drain(kind, why).await;
        }
    }
}
