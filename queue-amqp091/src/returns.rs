//! Pairs RabbitMQ's returns with the publishes they belong to.
//!
//! A `basic.return` (a `mandatory` message no queue took: its queue is gone) carries
//! no delivery tag: only the message it holds says whose it is. lapin hands each
//! return to whichever confirm it completes next, and completes the confirms of one
//! `multiple` ack in no set order, so taking what lapin gives reported a publish to a
//! deleted queue stored (and lost it) and a stored one returned.
//!
//! The connection's reader ([`crate::transport`]) sees every frame before lapin does,
//! and hands each return's message id to its channel's [`Pairing`] ([`ReturnLog`]).
//! RabbitMQ sends a message's return before its ack, so once lapin has completed a
//! publish's confirm, its return, if it had one, has been read: the publish looks for
//! a return with its message id; what lapin gave its confirm only serves to check
//! that the reader missed no return.
//!
//! What cannot be told is said: a return with a message id that another undecided
//! publish on the channel has too may be either's, so each of them is
//! [`Paired::Uncertain`] (not known to be stored, as after a lost confirm), and so is
//! every ack on a channel where a return's message id could not be read (or lapin
//! gave a confirm a return the reader did not see). A publish whose outcome nobody
//! waits for any more (a timeout, a dropped future) stays undecided until its confirm
//! has come, and is decided for nobody at the channel's next publish; one given up
//! before it was written has no
//! confirm, and stays counted under its id until a return with that id comes, since
//! one may still come: a later publish of the same id that reads a return is then
//! told uncertain rather than returned.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};

use futures_util::future::BoxFuture;
use lapin::{Confirmation, PublisherConfirm};

use crate::lock;

/// At most this many returns wait for their publish's decision, this many publishes
/// given up are remembered, and this many confirms nobody waits for are kept, on one
/// channel; past any, the channel is replaced (a return dropped leaves every ack on
/// it uncertain).
const MOST_KEPT: usize = 4096;

/// What became of a published message.
#[derive(Debug, PartialEq, Eq)]
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

/// The publishing channels of one connection, for its reader to hand their returns.
#[derive(Default)]
pub(crate) struct ReturnLog {
    channels: Mutex<HashMap<u16, Arc<Pairing>>>,
}

impl ReturnLog {
    /// A new pairing for the publishing channel numbered `channel`, which receives its
    /// returns from now on (a channel's number is reused once it is closed).
    pub(crate) fn pairing_for(&self, channel: u16) -> Arc<Pairing> {
        let pairing = Arc::new(Pairing::default());
        lock(&self.channels).insert(channel, Arc::clone(&pairing));
        pairing
    }

    /// A `basic.return` read on `channel`, with its message's id (`None`: it could
    /// not be read).
    pub(crate) fn returned(&self, channel: u16, id: Option<&str>, reply: (u16, String)) {
        let pairing = lock(&self.channels).get(&channel).cloned();
        match pairing {
            Some(pairing) => pairing.returned(id, reply),
            // None of the driver's publishes is on it: nobody is waiting for it.
            None => tracing::debug!(
                channel,
                "a return on a channel the driver does not publish on"
            ),
        }
    }
}

/// The returns read on one publishing channel, and its publishes awaiting theirs.
#[derive(Default)]
pub(crate) struct Pairing {
    /// Message ids are kept as hashes: two ids that hash alike count as one id shared
    /// by two publishes, which is only ever told uncertain, never wrong.
    hasher: RandomState,
    state: Mutex<State>,
    /// The channel is to be replaced (see [`MOST_KEPT`]).
    worn: AtomicBool,
    /// Held while a publish is counted and lapin numbers and queues it
    /// ([`Pairing::publish`]).
    in_order: Mutex<()>,
}

#[derive(Default)]
struct State {
    /// Publishes counted so far: each one's number.
    counted: u64,
    /// Publishes not decided yet, by message id.
    by_id: HashMap<u64, Sharing>,
    /// Returns read whose publish is not decided yet.
    returned: VecDeque<Return>,
    /// Returns read, and returns lapin attached to the confirms decided: lapin sees a
    /// return after the reader does, so never more than it.
    returns_read: u64,
    returns_attached: u64,
    /// Publishes given up, counted in `by_id`.
    given_up: usize,
    /// Undecided publishes nobody waits for, with their confirm: decided when it
    /// comes, as the next publish looks.
    unwatched: Vec<(Counted, Confirm)>,
    /// A return was read whose message id was not, or one was dropped, or lapin gave
    /// a confirm a return the reader did not see: any ack on this channel may be a
    /// returned message's.
    lost_track: bool,
}

/// A publish's confirm from lapin.
type Confirm = BoxFuture<'static, lapin::Result<Confirmation>>;

/// The publishes of one message id.
#[derive(Default)]
struct Sharing {
    undecided: u32,
    given_up: u32,
    /// A return with this id was taken by one of several when this many publishes
    /// had been counted: it may be the return of any counted before, which are told
    /// uncertain; one counted after could not have had its return then.
    contested_at: Option<u64>,
}

struct Return {
    id: u64,
    reply_code: u16,
    reply_text: String,
}

/// A publish counted under its message id until it is decided; dropped undecided, it
/// was given up (see the module docs).
pub(crate) struct Pending {
    pairing: Arc<Pairing>,
    counted: Counted,
    decided: bool,
}

/// A publish as its channel counted it: its message id's hash, and its number among
/// the channel's publishes.
#[derive(Clone, Copy)]
struct Counted {
    id: u64,
    number: u64,
}

/// The outcome of one publish, once its confirm is in; dropped before, its confirm
/// is decided later for nobody.
pub(crate) struct Outcome {
    confirm: Option<PublisherConfirm>,
    pending: Pending,
}

impl Pairing {
    /// Sends message `id` with `basic_publish` (lapin's `basic_publish` future, not
    /// yet polled) and returns its outcome to come, once lapin has written it.
    pub(crate) async fn publish(
        self: &Arc<Self>,
        id: &str,
        basic_publish: impl Future<Output = lapin::Result<PublisherConfirm>>,
    ) -> lapin::Result<Outcome> {
        let mut basic_publish = std::pin::pin!(basic_publish);
        // lapin gives a publish its delivery tag, then copies its body into frames and
        // queues them, all in its first poll: publishes from several threads on one
        // channel, each of them there at once, reached the broker in another order
        // than their tags, and an ack or nack settled another message's confirm (a
        // refused message was told stored, review). That poll, and the count, are
        // made one publish at a time.
        let (pending, first) = std::future::poll_fn(|cx| {
            let _in_order = lock(&self.in_order);
            // Counted before it is sent: its return cannot come before.
            let pending = self.expect(id);
            Poll::Ready((pending, basic_publish.as_mut().poll(cx)))
        })
        .await;
        let confirm = match first {
            Poll::Ready(confirm) => confirm?,
            Poll::Pending => basic_publish.await?,
        };
        Ok(Outcome {
            confirm: Some(confirm),
            pending,
        })
    }

    /// Whether this channel is to be replaced: a return was dropped or could not be
    /// read, or too many publishes were given up on it or left unwatched.
    pub(crate) fn needs_replacing(&self) -> bool {
        self.worn.load(Ordering::Relaxed)
    }

    /// Counts a publish of message `id` as undecided, from before it is sent; decides
    /// first the publishes nobody waits for whose confirm came.
    pub(crate) fn expect(self: &Arc<Self>, id: &str) -> Pending {
        let id = self.hasher.hash_one(id);
        let mut state = lock(&self.state);
        if !state.unwatched.is_empty() {
            // Decided before this one is counted, so that it takes no return of theirs
            // (unless another publish is deciding them at the same time: then it may
            // be told uncertain, never wrong).
            let unwatched = std::mem::take(&mut state.unwatched);
            drop(state);
            self.decide_unwatched(unwatched);
            state = lock(&self.state);
        }
        state.by_id.entry(id).or_default().undecided += 1;
        let number = state.counted;
        state.counted += 1;
        drop(state);
        Pending {
            pairing: Arc::clone(self),
            counted: Counted { id, number },
            decided: false,
        }
    }

    /// Decides each of `unwatched` whose confirm came (polled outside the lock, which
    /// the connection's reader takes); keeps the others.
    fn decide_unwatched(&self, unwatched: Vec<(Counted, Confirm)>) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiting = Vec::new();
        for (counted, mut confirm) in unwatched {
            match confirm.as_mut().poll(&mut cx) {
                Poll::Ready(Ok(confirmation)) => drop(self.decide(counted, confirmation)),
                // The channel is gone: nothing more comes on it.
                Poll::Ready(Err(_)) => self.give_up(counted.id),
                Poll::Pending => waiting.push((counted, confirm)),
            }
        }
        if !waiting.is_empty() {
            self.unwatch(waiting);
        }
    }

    /// Keeps undecided publishes (by message id) that nobody waits for until their
    /// confirm comes.
    fn unwatch(&self, unwatched: impl IntoIterator<Item = (Counted, Confirm)>) {
        let mut state = lock(&self.state);
        state.unwatched.extend(unwatched);
        if state.unwatched.len() > MOST_KEPT {
            self.worn.store(true, Ordering::Relaxed);
        }
    }

    fn returned(&self, id: Option<&str>, (reply_code, reply_text): (u16, String)) {
        let mut state = lock(&self.state);
        state.returns_read += 1;
        let Some(id) = id.map(|id| self.hasher.hash_one(id)) else {
            state.lost_track = true;
            self.worn.store(true, Ordering::Relaxed);
            return;
        };
        let Some(sharing) = state.by_id.get_mut(&id) else {
            // Every publish is counted before it is sent, and decided after its return.
            tracing::debug!("a return for no publish of this channel");
            return;
        };
        if sharing.undecided == 0 {
            // Only publishes given up have this id: it is one of theirs, and the
            // last of it that can come for that one.
            sharing.given_up -= 1;
            if sharing.given_up == 0 {
                state.by_id.remove(&id);
            }
            state.given_up -= 1;
            return;
        }
        state.returned.push_back(Return {
            id,
            reply_code,
            reply_text,
        });
        if state.returned.len() > MOST_KEPT {
            // Never with a window below this: each waits for a publish undecided.
            state.returned.pop_front();
            state.lost_track = true;
            self.worn.store(true, Ordering::Relaxed);
        }
    }

    fn decide(&self, Counted { id, number }: Counted, confirmation: Confirmation) -> Paired {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        if let Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) = confirmation {
            state.returns_attached += 1;
            if state.returns_attached > state.returns_read {
                tracing::error!(
                    "lapin gave a confirm a return the driver's reader did not see; the publishing channel's acks are uncertain until it is replaced"
                );
                state.lost_track = true;
                self.worn.store(true, Ordering::Relaxed);
            }
        }
        let own = match state.returned.iter().position(|r| r.id == id) {
            Some(at) => state.returned.remove(at),
            None => None,
        };
        let lost_track = state.lost_track;
        let contested = match state.by_id.get_mut(&id) {
            Some(sharing) => {
                if own.is_some() && sharing.undecided + sharing.given_up > 1 {
                    sharing.contested_at = Some(state.counted);
                }
                let contested = sharing.contested_at.is_some_and(|at| number < at);
                sharing.undecided -= 1;
                if sharing.undecided == 0 && sharing.given_up == 0 {
                    state.by_id.remove(&id);
                }
                contested
            }
            None => true,
        };
        drop(guard);
        match confirmation {
            Confirmation::NotRequested => Paired::NotRequested,
            Confirmation::Nack(_) => Paired::Refused,
            Confirmation::Ack(_) if contested => Paired::Uncertain,
            Confirmation::Ack(_) => match own {
                Some(own) => Paired::Returned {
                    reply_code: own.reply_code,
                    reply_text: own.reply_text,
                },
                None if lost_track => Paired::Uncertain,
                None => Paired::Stored,
            },
        }
    }

    fn give_up(&self, id: u64) {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let Some(sharing) = state.by_id.get_mut(&id) else {
            return;
        };
        sharing.undecided -= 1;
        if sharing.undecided == 0
            && let Some(at) = state.returned.iter().position(|r| r.id == id)
        {
            // Read while this one was undecided, it is one of the publishes given up's
            // (as in `returned`): this one's, counted so.
            state.returned.remove(at);
            if sharing.given_up == 0 {
                state.by_id.remove(&id);
            }
            return;
        }
        sharing.given_up += 1;
        state.given_up += 1;
        if state.given_up > MOST_KEPT {
            self.worn.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
impl Pending {
    /// What it is told once acked (its confirm is not read: for tests).
    pub(crate) fn acked(self) -> Paired {
        self.confirmed(Confirmation::Ack(None))
    }

    /// What it is told once its confirm is `confirmation`.
    fn confirmed(mut self, confirmation: Confirmation) -> Paired {
        self.decided = true;
        self.pairing.decide(self.counted, confirmation)
    }

    /// Its outcome dropped, with its confirm to come once `acked` is set.
    fn unwatched(mut self, acked: &Arc<AtomicBool>) {
        self.decided = true;
        let acked = Arc::clone(acked);
        let confirm: Confirm = Box::pin(std::future::poll_fn(move |_| {
            if acked.load(Ordering::Relaxed) {
                Poll::Ready(Ok(Confirmation::Ack(None)))
            } else {
                Poll::Pending
            }
        }));
        self.pairing.unwatch([(self.counted, confirm)]);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.decided {
            self.pairing.give_up(self.counted.id);
        }
    }
}

impl Future for Outcome {
    type Output = lapin::Result<Paired>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(confirm) = this.confirm.as_mut() else {
            return Poll::Ready(Ok(Paired::Uncertain));
        };
        // lapin has read the ack once it completes the confirm, and the reader every
        // frame before it: this message's return too, if it had one.
        let confirmation = ready!(Pin::new(confirm).poll(cx));
        this.confirm = None;
        let confirmation = confirmation?;
        this.pending.decided = true;
        Poll::Ready(Ok(this
            .pending
            .pairing
            .decide(this.pending.counted, confirmation)))
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if let Some(confirm) = self.confirm.take() {
            self.pending.decided = true;
            let unwatched: Confirm = Box::pin(confirm);
            self.pending
                .pairing
                .unwatch([(self.pending.counted, unwatched)]);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn reply() -> (u16, String) {
        (312, "NO_ROUTE".to_string())
    }

    fn ack() -> Confirmation {
        Confirmation::Ack(None)
    }

    fn returned() -> Paired {
        Paired::Returned {
            reply_code: 312,
            reply_text: "NO_ROUTE".to_string(),
        }
    }

    #[test]
    fn a_return_goes_to_the_publish_of_its_id_whichever_is_acked_first() {
        let pairing = Arc::new(Pairing::default());
        let (a, b) = (pairing.expect("a"), pairing.expect("b"));
        pairing.returned(Some("a"), reply());
        assert_eq!(b.confirmed(ack()), Paired::Stored);
        assert_eq!(a.confirmed(ack()), returned());
        assert!(lock(&pairing.state).by_id.is_empty());
    }

    #[test]
    fn publishes_sharing_an_id_with_a_return_are_each_uncertain() {
        let pairing = Arc::new(Pairing::default());
        let (first, second) = (pairing.expect("x"), pairing.expect("x"));
        pairing.returned(Some("x"), reply());
        assert_eq!(second.confirmed(ack()), Paired::Uncertain);
        assert_eq!(first.confirmed(ack()), Paired::Uncertain);
        // Once neither is undecided, the id is free again.
        let third = pairing.expect("x");
        assert_eq!(third.confirmed(ack()), Paired::Stored);
    }

    #[test]
    fn publishes_sharing_an_id_without_a_return_are_stored() {
        let pairing = Arc::new(Pairing::default());
        let (first, second) = (pairing.expect("x"), pairing.expect("x"));
        assert_eq!(first.confirmed(ack()), Paired::Stored);
        assert_eq!(second.confirmed(ack()), Paired::Stored);
    }

    #[test]
    fn a_later_publish_does_not_take_the_return_of_one_given_up() {
        let pairing = Arc::new(Pairing::default());
        drop(pairing.expect("x"));
        let later = pairing.expect("x");
        pairing.returned(Some("x"), reply());
        assert_eq!(later.confirmed(ack()), Paired::Uncertain);
        // A return read while only the given-up publish had the id was its own.
        drop(pairing.expect("y"));
        pairing.returned(Some("y"), reply());
        let after = pairing.expect("y");
        assert_eq!(after.confirmed(ack()), Paired::Stored);
        assert!(lock(&pairing.state).returned.is_empty());
    }

    #[test]
    fn a_return_whose_id_was_not_read_leaves_every_ack_uncertain() {
        let pairing = Arc::new(Pairing::default());
        let a = pairing.expect("a");
        pairing.returned(None, reply());
        assert!(pairing.needs_replacing());
        assert_eq!(a.confirmed(ack()), Paired::Uncertain);
    }

    #[test]
    fn a_nack_is_refused_and_a_return_for_nobody_is_not_kept() {
        let pairing = Arc::new(Pairing::default());
        let a = pairing.expect("a");
        pairing.returned(Some("a"), reply());
        pairing.returned(Some("nobody"), reply());
        assert_eq!(a.confirmed(Confirmation::Nack(None)), Paired::Refused);
        let state = lock(&pairing.state);
        assert!(state.returned.is_empty() && state.by_id.is_empty());
    }

    #[test]
    fn a_channel_with_too_many_publishes_given_up_is_replaced() {
        let pairing = Arc::new(Pairing::default());
        for n in 0..MOST_KEPT {
            drop(pairing.expect(&n.to_string()));
        }
        assert!(!pairing.needs_replacing());
        drop(pairing.expect("one more"));
        assert!(pairing.needs_replacing());
    }

    #[test]
    fn the_log_hands_each_return_to_its_channels_latest_pairing() {
        let log = ReturnLog::default();
        let (old, other) = (log.pairing_for(1), log.pairing_for(2));
        let new = log.pairing_for(1);
        let (on_old, on_other, on_new) = (old.expect("a"), other.expect("a"), new.expect("a"));
        log.returned(1, Some("a"), reply());
        log.returned(9, Some("a"), reply());
        assert_eq!(on_old.confirmed(ack()), Paired::Stored);
        assert_eq!(on_other.confirmed(ack()), Paired::Stored);
        assert_eq!(on_new.confirmed(ack()), returned());
    }

    /// What becomes of a publish in a schedule.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Fate {
        /// Its outcome is awaited: acked, or nacked.
        Decided { nacked: bool },
        /// Given up before it was written: no confirm.
        GivenUp,
        /// Written, its outcome dropped: its confirm comes later for nobody.
        Unwatched,
    }

    /// One publish in a schedule: its message id, whether RabbitMQ returns it, what
    /// becomes of it, and when each of its steps comes.
    #[derive(Debug, Clone)]
    struct Planned {
        id: usize,
        is_returned: bool,
        fate: Fate,
        /// Given up or unwatched, its return comes after that.
        returned_late: bool,
        times: [u16; 4],
    }

    fn planned() -> impl Strategy<Value = Planned> {
        let fate = prop_oneof![
            6 => Just(Fate::Decided { nacked: false }),
            1 => Just(Fate::Decided { nacked: true }),
            1 => Just(Fate::GivenUp),
            2 => Just(Fate::Unwatched),
        ];
        (
            0usize..4,
            any::<bool>(),
            fate,
            any::<bool>(),
            any::<[u16; 4]>(),
        )
            .prop_map(|(id, is_returned, fate, returned_late, mut times)| {
                times.sort_unstable();
                Planned {
                    id,
                    is_returned,
                    fate,
                    returned_late,
                    times,
                }
            })
    }

    #[derive(Clone, Copy, PartialEq, PartialOrd, Eq, Ord)]
    enum Step {
        Publish,
        Return,
        /// Given up, or its outcome dropped.
        Leave,
        /// Its confirm comes.
        Confirm,
    }

    proptest! {
        /// Whatever the order of publishes, returns and confirms (a return comes
        /// after its publish is sent and before its ack; a publish given up or
        /// unwatched may have its return come after that), no publish is told an
        /// outcome that is false; with message ids all different, none is
        /// uncertain; once every confirm came, only publishes given up unwritten stay
        /// counted.
        #[test]
        fn no_publish_is_told_a_false_outcome(
            mut plan in prop::collection::vec(planned(), 1..24),
            distinct in any::<bool>(),
        ) {
            if distinct {
                for (n, p) in plan.iter_mut().enumerate() {
                    p.id = n;
                }
            }
            let pairing = Arc::new(Pairing::default());
            let mut steps: Vec<(u16, Step, usize)> = Vec::new();
            for (n, p) in plan.iter().enumerate() {
                let [published, early, late, confirmed] = p.times;
                steps.push((published, Step::Publish, n));
                let (returned_at, left_at) = match p.fate {
                    Fate::Decided { .. } => (early, None),
                    _ if p.returned_late => (late, Some(early)),
                    _ => (early, Some(late)),
                };
                if p.is_returned {
                    steps.push((returned_at, Step::Return, n));
                }
                if let Some(left_at) = left_at {
                    steps.push((left_at, Step::Leave, n));
                }
                if p.fate != Fate::GivenUp {
                    steps.push((confirmed, Step::Confirm, n));
                }
            }
            steps.sort_by_key(|&(at, step, n)| (at, step, n));
            let mut pending: Vec<Option<Pending>> = (0..plan.len()).map(|_| None).collect();
            let acked: Vec<Arc<AtomicBool>> = plan.iter().map(|_| Arc::default()).collect();
            let mut told = Vec::new();
            for (_, step, n) in steps {
                let id = format!("id-{}", plan[n].id);
                match (step, plan[n].fate) {
                    (Step::Publish, _) => pending[n] = Some(pairing.expect(&id)),
                    (Step::Return, _) => pairing.returned(Some(&id), reply()),
                    (Step::Leave, Fate::GivenUp) => drop(pending[n].take()),
                    (Step::Leave, _) => {
                        if let Some(p) = pending[n].take() {
                            p.unwatched(&acked[n]);
                        }
                    }
                    (Step::Confirm, Fate::Decided { nacked }) => {
                        if let Some(p) = pending[n].take() {
                            let confirmation = if nacked { Confirmation::Nack(None) } else { ack() };
                            told.push((n, p.confirmed(confirmation)));
                        }
                    }
                    (Step::Confirm, _) => acked[n].store(true, Ordering::Relaxed),
                }
            }
            for (n, outcome) in told {
                let p = &plan[n];
                match outcome {
                    Paired::Stored => prop_assert!(!p.is_returned, "publish {n} was returned, told stored"),
                    Paired::Returned { .. } => prop_assert!(p.is_returned, "publish {n} was stored, told returned"),
                    Paired::Refused => prop_assert_eq!(p.fate, Fate::Decided { nacked: true }),
                    Paired::Uncertain => prop_assert!(!distinct, "publish {n} uncertain"),
                    Paired::NotRequested => prop_assert!(false, "publish {n} not requested"),
                }
            }
            // The next publish decides the unwatched ones whose confirm came: all.
            let last = pairing.expect("last");
            prop_assert_eq!(last.acked(), Paired::Stored);
            let state = lock(&pairing.state);
            prop_assert!(state.unwatched.is_empty());
            prop_assert!(state.by_id.values().all(|s| s.undecided == 0));
            if plan.iter().all(|p| p.fate != Fate::GivenUp) {
                prop_assert!(state.by_id.is_empty() && state.returned.is_empty());
            }
        }
    }

    /// A publish whose outcome was dropped is decided once its confirm came, at the
    /// next publish: a retry of a timed-out stored message to a queue deleted since
    /// is `NOT_FOUND`, neither uncertain nor stored. It is decided before that
    /// publish counts: its own return is not taken for a retry's.
    #[test]
    fn an_unwatched_publish_is_decided_once_its_confirm_came() {
        let pairing = Arc::new(Pairing::default());
        let acked = Arc::new(AtomicBool::new(false));
        pairing.expect("m-1").unwatched(&acked);
        // Not confirmed yet: it is still undecided, and kept.
        let other = pairing.expect("m-2");
        assert_eq!(lock(&pairing.state).unwatched.len(), 1);
        acked.store(true, Ordering::Relaxed);
        let retry = pairing.expect("m-1");
        assert!(lock(&pairing.state).unwatched.is_empty());
        pairing.returned(Some("m-1"), reply());
        assert_eq!(retry.acked(), returned());
        assert_eq!(other.acked(), Paired::Stored);
        assert!(lock(&pairing.state).by_id.is_empty());
        // Returned itself, its return is its own, not the next publish's of its id.
        pairing.expect("m-3").unwatched(&acked);
        pairing.returned(Some("m-3"), reply());
        let next = pairing.expect("m-3");
        assert_eq!(next.acked(), Paired::Stored);
    }

    /// A return taken while a publish given up unwritten shares its id leaves
    /// uncertain the publishes counted by then, not one counted after, which could not
    /// have had its return then: a stored retry is stored.
    #[test]
    fn a_contested_return_leaves_uncertain_only_the_publishes_counted_before() {
        let pairing = Arc::new(Pairing::default());
        drop(pairing.expect("x"));
        let (returned_one, twin) = (pairing.expect("x"), pairing.expect("x"));
        pairing.returned(Some("x"), reply());
        assert_eq!(returned_one.acked(), Paired::Uncertain);
        let later = pairing.expect("x");
        assert_eq!(twin.acked(), Paired::Uncertain);
        assert_eq!(later.acked(), Paired::Stored);
    }

    #[test]
    fn lapin_attaching_a_return_the_reader_did_not_see_leaves_acks_uncertain() {
        let pairing = Arc::new(Pairing::default());
        let (seen, unseen, after) = (
            pairing.expect("seen"),
            pairing.expect("unseen"),
            pairing.expect("after"),
        );
        pairing.returned(Some("seen"), reply());
        let attached = || {
            Confirmation::Ack(Some(lapin::message::BasicReturnMessage {
                delivery: lapin::message::Delivery::mock(0, "".into(), "q".into(), false, vec![]),
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
            }))
        };
        // lapin gives the return read to a confirm, then one the reader never saw.
        assert_eq!(seen.confirmed(attached()), returned());
        assert!(!pairing.needs_replacing());
        assert_eq!(unseen.confirmed(attached()), Paired::Uncertain);
        assert!(pairing.needs_replacing());
        assert_eq!(after.confirmed(ack()), Paired::Uncertain);
    }
}
