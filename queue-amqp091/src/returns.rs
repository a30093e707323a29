//! Pairs RabbitMQ's returns with the publishes they belong to.
//!
//! A `basic.return` (a `mandatory` message no queue took: its queue is gone) comes
//! before the message's confirm and carries no delivery tag: only the message it holds
//! says whose it is. lapin hands each return to whichever confirm it completes next,
//! and completes the confirms of one `multiple` ack in no set order, so a publish to a
//! deleted queue was reported stored (and lost) while a stored one was reported
//! returned. Here the publishes of a channel read their confirms together and match
//! each return to its publish by message id, whichever confirm lapin gave it to:
//!
//! * a publish is numbered as lapin numbers it (its number is taken under the same
//!   lock as lapin's delivery tag), and RabbitMQ returns messages in that order, so
//!   lapin's queue of returns holds them in that order too;
//! * lapin completes confirms one after the other and wakes each as it completes; a
//!   confirm's waker here queues it, so when a confirm is read complete, every one
//!   lapin completed before it is queued or read already;
//! * a confirm takes the oldest return in lapin's queue, and a message's return comes
//!   before its ack: a publish whose confirm came with no return, or with the return
//!   of a later publish, had its own return (if any) taken before by a confirm
//!   completed earlier, which is read before it is decided;
//! * a publish begun before another's confirm was read, and still being written (its
//!   confirm not in hand: lapin may have completed it), holds that decision back.
//!
//! What cannot be told is said: a confirm that came with the return of an earlier
//! publish leaves its own fate open (its return may still wait in lapin's queue), and
//! so does a return whose message id two publishes in flight share; a publish given up
//! while being written takes its confirm, and any return lapin gives it, with it. Those
//! publishes are [`Paired::Uncertain`]: not known to be stored, as after a lost
//! confirm.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use lapin::message::BasicReturnMessage;
use lapin::{Confirmation, PublisherConfirm};

use crate::lock;

/// At most this many returns wait to be claimed by their publish.
const MOST_UNCLAIMED: usize = 4096;

/// What became of a published message.
#[derive(Debug)]
pub(crate) enum Paired {
    /// Acked, and no return was its.
    Stored,
    /// Returned as unroutable: no queue took it.
    Returned { reply_code: u16, reply_text: String },
    /// Nacked: the broker refused it.
    Refused,
    /// Whether it was returned cannot be told (see the module docs).
    Uncertain,
    /// The channel was not in confirm mode.
    NotRequested,
}

/// The confirms of one publishing channel, and the returns read from them.
#[derive(Default)]
pub(crate) struct Pairing {
    state: Mutex<State>,
    woken: Arc<Woken>,
}

/// Confirms whose waker fired, in the order lapin completed them.
#[derive(Default)]
struct Woken {
    queue: Mutex<VecDeque<u64>>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// Publishes begun whose confirm is not in hand yet.
    writing: BTreeSet<u64>,
    entries: HashMap<u64, Entry>,
    /// Publishes in flight by message id: a return names its message by id only.
    by_id: HashMap<String, Vec<u64>>,
    /// Publishes whose confirm was read, not yet decided.
    completed: BTreeSet<u64>,
    /// Returns read from a confirm other than their own publish's.
    unclaimed: VecDeque<Unclaimed>,
    /// A publish given up while being written took its confirm away, and with it
    /// any return lapin may give to that confirm: nothing acked here is known
    /// unreturned any more.
    tainted: bool,
}

struct Entry {
    id: String,
    confirm: Option<PublisherConfirm>,
    waker: Waker,
    owner: Arc<AtomicWaker>,
    completed: Option<Completed>,
    decided: Option<lapin::Result<Paired>>,
    /// Its publish stopped waiting: the entry stays until its confirm is read, for
    /// the return it may carry.
    abandoned: bool,
}

/// A confirm read complete.
struct Completed {
    outcome: lapin::Result<Confirmation>,
    /// `next_seq` when it was read: publishes from this number on began after.
    read_at: u64,
    /// It came with the return of the publish with this number (`None`: of a
    /// publish not in flight, or of two that share its message id).
    others_return_of: Option<Option<u64>>,
}

/// A return read from another publish's confirm.
struct Unclaimed {
    id: String,
    reply_code: u16,
    reply_text: String,
}

/// Queues its confirm for the next read and wakes the publish waiting on it.
struct ConfirmWaker {
    seq: u64,
    woken: Arc<Woken>,
    owner: Arc<AtomicWaker>,
}

impl Wake for ConfirmWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.woken.queue).push_back(self.seq);
        self.owner.wake();
    }
}

/// A publish being written; dropped before its confirm is in hand, the publish was
/// given up (see the module docs).
struct Ticket<'p> {
    pairing: &'p Arc<Pairing>,
    seq: u64,
    attached: bool,
}

/// The outcome of one publish, once its confirm and every return that may be its
/// are read.
pub(crate) struct Outcome {
    pairing: Arc<Pairing>,
    seq: u64,
    done: bool,
}

impl Pairing {
    /// Sends message `id` with `basic_publish` (lapin's `basic_publish` future, not
    /// yet polled) and returns its outcome to come, once lapin has written it.
    pub(crate) async fn publish(
        self: &Arc<Self>,
        id: &str,
        basic_publish: impl Future<Output = lapin::Result<PublisherConfirm>>,
    ) -> lapin::Result<Outcome> {
        let mut basic_publish = pin!(basic_publish);
        let mut ticket = None;
        let confirm = std::future::poll_fn(|cx| {
            if ticket.is_some() {
                return basic_publish.as_mut().poll(cx);
            }
            // lapin takes the delivery tag on this first poll: the number here is
            // taken under the same lock, so that the two orders agree.
            let mut state = lock(&self.state);
            ticket = Some(self.begin(&mut state, id));
            basic_publish.as_mut().poll(cx)
        })
        .await;
        let Some(ticket) = ticket else {
            unreachable!("a future is polled before it completes")
        };
        Ok(ticket.attach(confirm?))
    }

    fn begin<'p>(self: &'p Arc<Self>, state: &mut State, id: &str) -> Ticket<'p> {
        let seq = state.next_seq;
        state.next_seq += 1;
        state.writing.insert(seq);
        state.by_id.entry(id.to_string()).or_default().push(seq);
        let owner = Arc::new(AtomicWaker::new());
        let waker = Waker::from(Arc::new(ConfirmWaker {
            seq,
            woken: Arc::clone(&self.woken),
            owner: Arc::clone(&owner),
        }));
        state.entries.insert(
            seq,
            Entry {
                id: id.to_string(),
                confirm: None,
                waker,
                owner,
                completed: None,
                decided: None,
                abandoned: false,
            },
        );
        Ticket {
            pairing: self,
            seq,
            attached: false,
        }
    }

    /// Reads every confirm queued by its waker, then decides what can be decided
    /// and wakes those publishes.
    fn advance(&self, state: &mut State) {
        self.read_woken(state);
        let oldest_writing = state.writing.first().copied();
        let decidable: Vec<u64> = state
            .completed
            .iter()
            .copied()
            .filter(|seq| {
                let read_at = state.entries.get(seq).and_then(|e| e.completed.as_ref());
                read_at.is_some_and(|c| oldest_writing.is_none_or(|w| w >= c.read_at))
            })
            .collect();
        for seq in decidable {
            state.completed.remove(&seq);
            let decided = decide(state, seq);
            if let Some(entry) = state.entries.get_mut(&seq) {
                entry.decided = Some(decided);
                entry.owner.wake();
            }
        }
    }

    fn read_woken(&self, state: &mut State) {
        loop {
            let Some(seq) = lock(&self.woken.queue).pop_front() else {
                return;
            };
            let read_at = state.next_seq;
            let Some(entry) = state.entries.get_mut(&seq) else {
                continue;
            };
            let Some(confirm) = entry.confirm.as_mut() else {
                continue;
            };
            let mut cx = Context::from_waker(&entry.waker);
            let Poll::Ready(outcome) = Pin::new(confirm).poll(&mut cx) else {
                continue;
            };
            entry.confirm = None;
            let abandoned = entry.abandoned;
            let others = match &outcome {
                Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) => {
                    let returned = unclaimed(r);
                    returned.filter(|r| r.id != entry.id)
                }
                _ => None,
            };
            let others_return_of = others.as_ref().map(|r| match state.by_id.get(&r.id) {
                Some(seqs) if seqs.len() == 1 => Some(seqs[0]),
                _ => None,
            });
            if let Some(entry) = state.entries.get_mut(&seq) {
                entry.completed = Some(Completed {
                    outcome,
                    read_at,
                    others_return_of,
                });
            }
            if let Some(other) = others {
                state.unclaimed.push_back(other);
                if state.unclaimed.len() > MOST_UNCLAIMED {
                    state.unclaimed.pop_front();
                }
            }
            if abandoned {
                remove(state, seq);
            } else {
                state.completed.insert(seq);
            }
        }
    }
}

/// What became of the completed publish `seq` (see the module docs).
fn decide(state: &mut State, seq: u64) -> lapin::Result<Paired> {
    let Some(entry) = state.entries.get_mut(&seq) else {
        return Ok(Paired::Uncertain);
    };
    let Some(completed) = entry.completed.take() else {
        return Ok(Paired::Uncertain);
    };
    let id = entry.id.clone();
    let shared_id = state.by_id.get(&id).is_some_and(|seqs| seqs.len() > 1);
    let outcome = completed.outcome?;
    let claimed = state.unclaimed.iter().position(|u| u.id == id);
    if let (Confirmation::Ack(_), Some(at)) = (&outcome, claimed) {
        if shared_id {
            // Another publish in flight with this id may be the returned one: the
            // return stays for it to see too.
            return Ok(Paired::Uncertain);
        }
        if let Some(claimed) = state.unclaimed.remove(at) {
            return Ok(Paired::Returned {
                reply_code: claimed.reply_code,
                reply_text: claimed.reply_text,
            });
        }
    }
    Ok(match outcome {
        Confirmation::Nack(_) => Paired::Refused,
        Confirmation::NotRequested => Paired::NotRequested,
        Confirmation::Ack(Some(r)) if completed.others_return_of.is_none() => {
            if shared_id {
                // Its twin's return, maybe: the twin is told the same.
                state.unclaimed.extend(unclaimed(&r));
                Paired::Uncertain
            } else {
                Paired::Returned {
                    reply_code: r.reply_code,
                    reply_text: r.reply_text.to_string(),
                }
            }
        }
        Confirmation::Ack(_) if state.tainted => Paired::Uncertain,
        // Its own return would have come before that later publish's, and been
        // taken (and read) before: it had none.
        Confirmation::Ack(Some(_)) if completed.others_return_of.flatten() > Some(seq) => {
            Paired::Stored
        }
        // Its own return may still wait in lapin's queue, behind the one it took.
        Confirmation::Ack(Some(_)) => Paired::Uncertain,
        Confirmation::Ack(None) => Paired::Stored,
    })
}

fn unclaimed(r: &BasicReturnMessage) -> Option<Unclaimed> {
    Some(Unclaimed {
        id: r.properties.message_id().as_ref()?.to_string(),
        reply_code: r.reply_code,
        reply_text: r.reply_text.to_string(),
    })
}

fn remove(state: &mut State, seq: u64) {
    let Some(entry) = state.entries.remove(&seq) else {
        return;
    };
    state.writing.remove(&seq);
    state.completed.remove(&seq);
    if let Some(seqs) = state.by_id.get_mut(&entry.id) {
        seqs.retain(|s| *s != seq);
        if seqs.is_empty() {
            state.by_id.remove(&entry.id);
        }
    }
}

impl Ticket<'_> {
    /// The confirm lapin handed over for this publish: its outcome is to come.
    fn attach(mut self, confirm: PublisherConfirm) -> Outcome {
        self.attached = true;
        {
            let mut state = lock(&self.pairing.state);
            state.writing.remove(&self.seq);
            if let Some(entry) = state.entries.get_mut(&self.seq) {
                entry.confirm = Some(confirm);
            }
        }
        // Read at the next look, whoever looks: lapin may have completed it already.
        lock(&self.pairing.woken.queue).push_back(self.seq);
        Outcome {
            pairing: Arc::clone(self.pairing),
            seq: self.seq,
            done: false,
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.attached {
            return;
        }
        let mut state = lock(&self.pairing.state);
        state.tainted = true;
        remove(&mut state, self.seq);
        // Publishes that waited for this one to be written can be decided now.
        self.pairing.advance(&mut state);
    }
}

impl Future for Outcome {
    type Output = lapin::Result<Paired>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let pairing = Arc::clone(&self.pairing);
        let mut state = lock(&pairing.state);
        match state.entries.get(&self.seq) {
            Some(entry) => entry.owner.register(cx.waker()),
            None => return Poll::Ready(Ok(Paired::Uncertain)),
        }
        pairing.advance(&mut state);
        let decided = state
            .entries
            .get_mut(&self.seq)
            .and_then(|e| e.decided.take());
        match decided {
            Some(decided) => {
                remove(&mut state, self.seq);
                self.done = true;
                Poll::Ready(decided)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = lock(&self.pairing.state);
        let Some(entry) = state.entries.get_mut(&self.seq) else {
            return;
        };
        if entry.confirm.is_some() {
            // Kept until its confirm is read, for a return lapin may give it.
            entry.abandoned = true;
        } else {
            remove(&mut state, self.seq);
        }
    }
}
