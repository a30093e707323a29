//! A consumer of one memory queue, and the acker of its deliveries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use async_trait::async_trait;
use tokio::sync::Notify;

use super::queue::MemQueue;
use crate::{Acker, Delivery, Result, Subscription};

/// What a subscription shares with the ackers of its deliveries.
#[derive(Debug)]
struct Outstanding {
    unsettled: AtomicU32,
    /// Signalled when a delivery of this subscription is settled; only the
    /// subscription itself waits on it.
    settled: Notify,
}

pub(super) struct MemSubscription {
    queue: Arc<MemQueue>,
    id: u64,
    prefetch: u32,
    outstanding: Arc<Outstanding>,
    detached: AtomicBool,
}

impl MemSubscription {
    pub(super) fn attach(queue: Arc<MemQueue>, prefetch: u32) -> Self {
        let id = queue.attach();
        MemSubscription {
            queue,
            id,
            prefetch: prefetch.max(1),
            outstanding: Arc::new(Outstanding {
                unsettled: AtomicU32::new(0),
                settled: Notify::new(),
            }),
            detached: AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<Delivery> {
        let (tag, message) = self.queue.take(self.id)?;
        self.outstanding.unsettled.fetch_add(1, Ordering::AcqRel);
        let acker = MemAcker {
            queue: Arc::clone(&self.queue),
            tag,
            outstanding: Arc::clone(&self.outstanding),
        };
        Some(Delivery::shared(message, Box::new(acker)))
    }

    fn detach(&self) {
        if !self.detached.swap(true, Ordering::AcqRel) {
            self.queue.detach(self.id);
        }
    }
}

#[async_trait]
impl Subscription for MemSubscription {
    async fn next(&mut self) -> Option<Result<Delivery>> {
        loop {
            if self.queue.is_closed() || self.detached.load(Ordering::Acquire) {
                return None;
            }
            if self.outstanding.unsettled.load(Ordering::Acquire) >= self.prefetch {
                let settled = self.outstanding.settled.notified();
                tokio::pin!(settled);
                settled.as_mut().enable();
                if self.outstanding.unsettled.load(Ordering::Acquire) >= self.prefetch {
                    // A close ends this wait too: a consumer held at its prefetch
                    // waited for a settlement that might never come (review).
                    tokio::select! {
                        () = settled => {}
                        () = self.queue.closing() => {}
                    }
                }
                continue;
            }
            // Registering as a waiter takes the signal's lock twice: only pay for it
            // when the queue looks empty, then look again so no wake-up is missed.
            if let Some(delivery) = self.take() {
                return Some(Ok(delivery));
            }
            let ready = self.queue.ready_signal.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(delivery) = self.take() {
                return Some(Ok(delivery));
            }
            if self.queue.is_closed() {
                return None;
            }
            ready.await;
        }
    }

    async fn cancel(self: Box<Self>) -> Result<()> {
        self.detach();
        Ok(())
    }
}

impl Drop for MemSubscription {
    fn drop(&mut self) {
        self.detach();
    }
}

struct MemAcker {
    queue: Arc<MemQueue>,
    tag: u64,
    outstanding: Arc<Outstanding>,
}

impl MemAcker {
    fn settle(self, release: bool) -> Result<()> {
        let result = self.queue.settle(self.tag, release);
        self.outstanding.unsettled.fetch_sub(1, Ordering::AcqRel);
        self.outstanding.settled.notify_one();
        result
    }
}

#[async_trait]
impl Acker for MemAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.settle(false)
    }

    async fn release(self: Box<Self>) -> Result<()> {
        self.settle(true)
    }

    fn release_on_drop(self: Box<Self>) {
        // Already returned if its subscription was cancelled; nothing else can fail.
        let _ = self.settle(true);
    }
}
