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
//!   confirm not in hand: lapin may have completed it), holds that decision back; it
//!   takes its delivery tag under lapin's lock of acks, so every confirm lapin
//!   completed in the same ack as that confirm is queued before it is handed over.
//!
//! One publish at a time reads and decides, for all: the others do not wait for it
//! (a publish that finds the reading taken leaves its confirm to the reader, who wakes
//! it once decided), so that publishes on two threads never sleep on each other.
//!
//! What cannot be told is said: a confirm that came with the return of an earlier
//! publish leaves its own fate open (its return may still wait in lapin's queue); so
//! does a return read with a message id that another publish in flight had too (it
//! may be either's: each is told so); and a publish given up while being written
//! takes its confirm, and any return lapin gives it, with it, which leaves every later
//! ack on the channel open ([`Pairing::is_tainted`]: the publisher then replaces the
//! channel). Those publishes are [`Paired::Uncertain`]: not known to be stored, as
//! after a lost confirm. The message id of a publish told uncertain (or given up)
//! stays marked until lapin's queue of returns is seen empty: its own return may still
//! come, and a later publish of the same id, or a publish that took that return, is
//! then told uncertain rather than returned or stored.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
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
    /// Held from a publish's number to lapin's delivery tag, so that the two orders
    /// agree; apart from [`Numbering`], which readers take, since lapin's first poll
    /// of a publish (its frames built) is long.
    order: Mutex<()>,
    numbering: Mutex<Numbering>,
    /// Confirms lapin handed over, for the reader to take.
    handed_over: Mutex<Vec<HandedOver>>,
    woken: Arc<Woken>,
    /// Held by the one publish reading and deciding (see the module docs).
    reading: Mutex<Reading>,
    /// A publish given up while being written took its confirm away, and with it
    /// any return lapin may give to that confirm: nothing acked here is known
    /// unreturned any more.
    tainted: AtomicBool,
}

/// Publishes by number and message id, from their `basic.publish` on.
#[derive(Default)]
struct Numbering {
    next_seq: u64,
    /// Publishes begun whose confirm is not read yet.
    writing: BTreeSet<u64>,
    /// Publishes in flight by message id: a return names its message by id only.
    by_id: HashMap<Arc<str>, Vec<u64>>,
    /// Publishes whose message id another publish in flight had too while they were:
    /// a return with that id may be any of theirs.
    ambiguous: HashSet<u64>,
    /// Publishes a return was read for that cannot be told to be theirs (their id is
    /// ambiguous): each may be the returned one.
    contested: HashSet<u64>,
    /// Message ids of publishes decided uncertain or given up, whose own return may
    /// still come, with the number they were marked at: a later publish of the same id
    /// must not take that return for its own, nor another publish's decision rest on
    /// it. Cleared once a confirm numbered after it comes with no return (lapin's
    /// queue of returns was empty then).
    orphans: HashMap<Arc<str>, u64>,
}

/// Confirms whose waker fired, in the order lapin completed them.
#[derive(Default)]
struct Woken {
    queue: Mutex<VecDeque<u64>>,
    /// A publish is reading: it will read what is queued, and wake each publish it
    /// decides, so the waker does not wake the confirm's own publish as well (which
    /// would find the reading taken, and wait for the reader's wake anyway).
    reader_at_work: AtomicBool,
}

/// What the reader keeps between reads.
#[derive(Default)]
struct Reading {
    entries: HashMap<u64, Entry>,
    /// Publishes whose confirm was read, not yet decided.
    completed: BTreeSet<u64>,
    /// Returns read from a confirm other than their own publish's.
    unclaimed: VecDeque<Unclaimed>,
}

struct HandedOver {
    seq: u64,
    id: Arc<str>,
    slot: Arc<Slot>,
    confirm: PublisherConfirm,
}

struct Entry {
    id: Arc<str>,
    slot: Arc<Slot>,
    waker: Waker,
    confirm: Option<PublisherConfirm>,
    completed: Option<Completed>,
}

/// Where a publish waits for its outcome; its waker queues its confirm for the next
/// read and wakes the publish.
struct Slot {
    seq: u64,
    woken: Arc<Woken>,
    owner: AtomicWaker,
    decided: Mutex<Option<lapin::Result<Paired>>>,
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
    /// The publish it is: the one in flight with its message id, alone.
    owner: u64,
    reply_code: u16,
    reply_text: String,
}

impl Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        lock(&self.woken.queue).push_back(self.seq);
        // Queued before this looks; the reader stops being at work before it looks
        // at the queue a last time: one of the two sees the other.
        if !self.woken.reader_at_work.load(Ordering::SeqCst) {
            self.owner.wake();
        }
    }
}

/// A publish being written; dropped before its confirm is in hand, the publish was
/// given up (see the module docs).
struct Ticket<'p> {
    pairing: &'p Arc<Pairing>,
    seq: u64,
    id: Arc<str>,
    attached: bool,
}

/// The outcome of one publish, once its confirm and every return that may be its
/// are read.
pub(crate) struct Outcome {
    pairing: Arc<Pairing>,
    slot: Arc<Slot>,
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
            let _order = lock(&self.order);
            let id: Arc<str> = Arc::from(id);
            let seq = {
                let mut numbering = lock(&self.numbering);
                let seq = numbering.next_seq;
                numbering.next_seq += 1;
                numbering.writing.insert(seq);
                let twins = numbering.by_id.entry(Arc::clone(&id)).or_default();
                twins.push(seq);
                if twins.len() > 1 {
                    let twins = twins.clone();
                    numbering.ambiguous.extend(twins);
                }
                if numbering.orphans.contains_key(&id) {
                    numbering.ambiguous.insert(seq);
                }
                seq
            };
            ticket = Some(Ticket {
                pairing: self,
                seq,
                id,
                attached: false,
            });
            basic_publish.as_mut().poll(cx)
        })
        .await;
        let Some(ticket) = ticket else {
            unreachable!("a future is polled before it completes")
        };
        Ok(ticket.attach(confirm?))
    }

    /// Reads and decides unless another publish is at it; looks again after, for
    /// what came meanwhile (the other publish may have passed it by).
    fn read_if_free(&self) {
        loop {
            let mut reading = match self.reading.try_lock() {
                Ok(reading) => reading,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            self.woken.reader_at_work.store(true, Ordering::SeqCst);
            self.read(&mut reading);
            self.woken.reader_at_work.store(false, Ordering::SeqCst);
            drop(reading);
            let more = !lock(&self.handed_over).is_empty() || !lock(&self.woken.queue).is_empty();
            if !more {
                return;
            }
        }
    }

    /// Takes the confirms handed over, reads every confirm queued by its waker, then
    /// decides what can be decided and wakes those publishes.
    fn read(&self, reading: &mut Reading) {
        let handed_over = std::mem::take(&mut *lock(&self.handed_over));
        for h in handed_over {
            let waker = Waker::from(Arc::clone(&h.slot));
            reading.entries.insert(
                h.seq,
                Entry {
                    id: h.id,
                    slot: h.slot,
                    waker,
                    confirm: Some(h.confirm),
                    completed: None,
                },
            );
            // Read now, whatever lapin did meanwhile: it may have completed it
            // before its waker was ours. Still writing until then.
            self.read_confirm(reading, h.seq);
            lock(&self.numbering).writing.remove(&h.seq);
        }
        loop {
            let woken = std::mem::take(&mut *lock(&self.woken.queue));
            if woken.is_empty() {
                break;
            }
            for seq in woken {
                self.read_confirm(reading, seq);
            }
        }
        self.decide_all(reading);
    }

    fn read_confirm(&self, reading: &mut Reading, seq: u64) {
        let Some(entry) = reading.entries.get_mut(&seq) else {
            return;
        };
        let Some(confirm) = entry.confirm.as_mut() else {
            return;
        };
        let mut cx = Context::from_waker(&entry.waker);
        let Poll::Ready(outcome) = Pin::new(confirm).poll(&mut cx) else {
            return;
        };
        entry.confirm = None;
        let mut numbering = lock(&self.numbering);
        // A return with its own id is its own, unless its id is shared.
        let others = match &outcome {
            Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) => {
                returned_id(r).filter(|id| **id != *entry.id || numbering.ambiguous.contains(&seq))
            }
            _ => None,
        };
        // Whose it is: one publish in flight, alone with its id; else any of those
        // with its id, each then told it is uncertain.
        let owner = others.as_ref().map(|id| {
            let orphaned = numbering.orphans.remove(id.as_str()).is_some();
            match numbering.by_id.get(id.as_str()) {
                // Perhaps the late return of a publish decided already.
                Some(seqs) if orphaned => {
                    let seqs = seqs.clone();
                    numbering.contested.extend(seqs);
                    None
                }
                Some(seqs) if seqs.len() == 1 && !numbering.ambiguous.contains(&seqs[0]) => {
                    Some(seqs[0])
                }
                Some(seqs) => {
                    let seqs = seqs.clone();
                    numbering.contested.extend(seqs);
                    None
                }
                None => None,
            }
        });
        let read_at = numbering.next_seq;
        drop(numbering);
        let claim = match (&outcome, owner) {
            (Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))), Some(Some(owner))) => {
                Some(Unclaimed {
                    owner,
                    reply_code: r.reply_code,
                    reply_text: r.reply_text.to_string(),
                })
            }
            _ => None,
        };
        entry.completed = Some(Completed {
            outcome,
            read_at,
            others_return_of: owner,
        });
        if let Some(other) = claim {
            reading.unclaimed.push_back(other);
            if reading.unclaimed.len() > MOST_UNCLAIMED {
                // Never with a window below this (each waits for a publish in
                // flight); if it were, a publish could miss its return.
                reading.unclaimed.pop_front();
                self.tainted.store(true, Ordering::Release);
            }
        }
        reading.completed.insert(seq);
    }

    fn decide_all(&self, reading: &mut Reading) {
        let oldest_writing = lock(&self.numbering).writing.first().copied();
        let decidable: Vec<u64> = reading
            .completed
            .iter()
            .copied()
            .filter(|seq| {
                let read_at = reading.entries.get(seq).and_then(|e| e.completed.as_ref());
                read_at.is_some_and(|c| oldest_writing.is_none_or(|w| w >= c.read_at))
            })
            .collect();
        for seq in decidable {
            reading.completed.remove(&seq);
            let decided = self.decide(reading, seq);
            if let Some(entry) = reading.entries.remove(&seq) {
                if matches!(decided, Ok(Paired::Uncertain)) {
                    self.orphan(&entry.id);
                }
                self.forget(seq, &entry.id);
                *lock(&entry.slot.decided) = Some(decided);
                entry.slot.owner.wake();
            }
        }
    }

    /// What became of the completed publish `seq` (see the module docs).
    fn decide(&self, reading: &mut Reading, seq: u64) -> lapin::Result<Paired> {
        let Some(entry) = reading.entries.get_mut(&seq) else {
            return Ok(Paired::Uncertain);
        };
        let Some(completed) = entry.completed.take() else {
            return Ok(Paired::Uncertain);
        };
        if let Ok(Confirmation::Ack(None) | Confirmation::Nack(None)) = &completed.outcome {
            // lapin's queue of returns was empty when it completed: any late return
            // of a publish orphaned before this one was numbered has been read.
            lock(&self.numbering)
                .orphans
                .retain(|_, marked_at| *marked_at > seq);
        }
        // Its return, read from another publish's confirm, is its own to take
        // whatever the outcome.
        let claimed = match reading.unclaimed.iter().position(|u| u.owner == seq) {
            Some(at) => reading.unclaimed.remove(at),
            None => None,
        };
        let contested = lock(&self.numbering).contested.contains(&seq);
        let outcome = completed.outcome?;
        if let (Confirmation::Ack(_), Some(claimed)) = (&outcome, claimed) {
            return Ok(Paired::Returned {
                reply_code: claimed.reply_code,
                reply_text: claimed.reply_text,
            });
        }
        Ok(match outcome {
            Confirmation::Nack(_) => Paired::Refused,
            Confirmation::NotRequested => Paired::NotRequested,
            // A return with its id was read, and it may be its twin's.
            Confirmation::Ack(_) if contested => Paired::Uncertain,
            Confirmation::Ack(Some(r)) if completed.others_return_of.is_none() => {
                Paired::Returned {
                    reply_code: r.reply_code,
                    reply_text: r.reply_text.to_string(),
                }
            }
            Confirmation::Ack(_) if self.is_tainted() => Paired::Uncertain,
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

    /// Whether a publish given up while being written (or a return dropped) leaves
    /// every ack on this channel uncertain: the channel is to be replaced.
    pub(crate) fn is_tainted(&self) -> bool {
        self.tainted.load(Ordering::Acquire)
    }

    /// Marks message `id` as one whose return may still come for nobody in flight.
    fn orphan(&self, id: &Arc<str>) {
        let mut numbering = lock(&self.numbering);
        let marked_at = numbering.next_seq;
        numbering.orphans.insert(Arc::clone(id), marked_at);
    }

    /// Forgets publish `seq` of message `id`: decided, or given up while written.
    fn forget(&self, seq: u64, id: &Arc<str>) {
        let mut numbering = lock(&self.numbering);
        numbering.writing.remove(&seq);
        numbering.ambiguous.remove(&seq);
        numbering.contested.remove(&seq);
        if let Some(seqs) = numbering.by_id.get_mut(id) {
            seqs.retain(|s| *s != seq);
            if seqs.is_empty() {
                numbering.by_id.remove(id);
            }
        }
    }
}

fn returned_id(r: &BasicReturnMessage) -> Option<String> {
    Some(r.properties.message_id().as_ref()?.to_string())
}

impl Ticket<'_> {
    /// The confirm lapin handed over for this publish: its outcome is to come.
    fn attach(mut self, confirm: PublisherConfirm) -> Outcome {
        self.attached = true;
        let slot = Arc::new(Slot {
            seq: self.seq,
            woken: Arc::clone(&self.pairing.woken),
            owner: AtomicWaker::new(),
            decided: Mutex::new(None),
        });
        lock(&self.pairing.handed_over).push(HandedOver {
            seq: self.seq,
            id: Arc::clone(&self.id),
            slot: Arc::clone(&slot),
            confirm,
        });
        Outcome {
            pairing: Arc::clone(self.pairing),
            slot,
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.attached {
            return;
        }
        self.pairing.tainted.store(true, Ordering::Release);
        self.pairing.orphan(&self.id);
        self.pairing.forget(self.seq, &self.id);
        // Publishes that waited for this one to be written can be decided now: a
        // reader at work looks again once it sees something queued.
        lock(&self.pairing.woken.queue).push_back(self.seq);
        self.pairing.read_if_free();
    }
}

impl Future for Outcome {
    type Output = lapin::Result<Paired>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.slot.owner.register(cx.waker());
        if let Some(decided) = lock(&self.slot.decided).take() {
            return Poll::Ready(decided);
        }
        self.pairing.read_if_free();
        match lock(&self.slot.decided).take() {
            Some(decided) => Poll::Ready(decided),
            None => Poll::Pending,
        }
    }
}
