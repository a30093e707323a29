//! End-to-end counting for fault tests: which numbered messages
//! the test published, which the broker confirmed, which came out at the other end
//! and how often. Every fault test prints the same line from it:
//! `published N / confirmed N / consumed N / duplicates N / lost N`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// The counts a fault test prints and asserts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultCounts {
    /// Distinct messages the test published (each counted once, however many tries).
    pub published: u64,
    /// Distinct messages whose publish returned `Ok` (the broker confirmed them).
    pub confirmed: u64,
    /// Distinct confirmed messages that came out at the consuming end.
    pub consumed: u64,
    /// Deliveries beyond the first of a message (at-least-once redeliveries).
    pub duplicates: u64,
    /// Confirmed messages that never came out: must be 0.
    pub lost: u64,
    /// Publish calls that failed (across the fault) and were tried again.
    pub failed_publishes: u64,
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "published {} / confirmed {} / consumed {} / duplicates {} / lost {}",
            self.published, self.confirmed, self.consumed, self.duplicates, self.lost
        )?;
        if self.failed_publishes > 0 {
            write!(f, " ({} failed publishes retried)", self.failed_publishes)?;
        }
        Ok(())
    }
}

/// A thread-safe tally of numbered messages (see [`crate::numbered`]).
#[derive(Debug)]
pub struct Tally {
    published: Mutex<HashSet<i64>>,
    confirmed: Mutex<HashSet<i64>>,
    seen: Mutex<HashMap<i64, u64>>,
    failed_publishes: AtomicU64,
    confirmed_count: watch::Sender<usize>,
    consumed_count: watch::Sender<usize>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            published: Mutex::default(),
            confirmed: Mutex::default(),
            seen: Mutex::default(),
            failed_publishes: AtomicU64::new(0),
            confirmed_count: watch::channel(0).0,
            consumed_count: watch::channel(0).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tally {
    /// An empty tally.
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Message `n` is about to be published.
    pub fn publishing(&self, n: i64) {
        lock(&self.published).insert(n);
    }

    /// Message `n`'s publish returned `Ok`.
    pub fn confirmed(&self, n: i64) {
        self.publishing(n);
        let count = {
            let mut confirmed = lock(&self.confirmed);
            confirmed.insert(n);
            confirmed.len()
        };
        self.confirmed_count.send_replace(count);
    }

    /// A publish failed and will be tried again.
    pub fn publish_failed(&self) {
        self.failed_publishes.fetch_add(1, Ordering::Relaxed);
    }

    /// Message `n` came out at the consuming end (once more).
    pub fn consumed(&self, n: i64) {
        let distinct = {
            let mut seen = lock(&self.seen);
            *seen.entry(n).or_default() += 1;
            seen.len()
        };
        self.consumed_count.send_replace(distinct);
    }

    /// How many distinct messages were confirmed so far.
    pub fn confirmed_count(&self) -> usize {
        lock(&self.confirmed).len()
    }

    /// How many distinct messages came out so far.
    pub fn consumed_count(&self) -> usize {
        lock(&self.seen).len()
    }

    /// Waits until at least `n` messages are confirmed; `false` after `limit`.
    pub async fn wait_confirmed(&self, n: usize, limit: Duration) -> bool {
        let mut rx = self.confirmed_count.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .is_ok()
    }

    /// Waits until at least `n` distinct messages came out; `false` after `limit`.
    pub async fn wait_consumed(&self, n: usize, limit: Duration) -> bool {
        let mut rx = self.consumed_count.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|c| *c >= n))
            .await
            .is_ok()
    }

    /// Waits until every confirmed message came out; `false` after `limit`.
    pub async fn wait_all_consumed(&self, limit: Duration) -> bool {
        let mut rx = self.consumed_count.subscribe();
        tokio::time::timeout(limit, async {
            loop {
                // `missing` sorts every confirmed number: only worth it once as many
                // distinct messages came out as were confirmed. Run on each delivery,
                // it held the lock the consumers need and slowed them to a crawl.
                if *rx.borrow_and_update() >= self.confirmed_count() && self.missing().is_empty() {
                    return;
                }
                if rx.changed().await.is_err() {
                    // Cannot happen while `self` (the sender) lives; never spin.
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Confirmed messages that have not come out (sorted).
    pub fn missing(&self) -> Vec<i64> {
        let confirmed = lock(&self.confirmed).clone();
        let seen = lock(&self.seen);
        let mut missing: Vec<i64> = confirmed
            .into_iter()
            .filter(|n| !seen.contains_key(n))
            .collect();
        missing.sort_unstable();
        missing
    }

    /// The counts now.
    pub fn counts(&self) -> FaultCounts {
        let published = lock(&self.published).len() as u64;
        let confirmed = lock(&self.confirmed).clone();
        let seen = lock(&self.seen);
        let consumed = confirmed.iter().filter(|n| seen.contains_key(n)).count() as u64;
        FaultCounts {
            published,
            confirmed: confirmed.len() as u64,
            consumed,
            duplicates: seen.values().map(|c| c - 1).sum(),
            lost: confirmed.len() as u64 - consumed,
            failed_publishes: self.failed_publishes.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_and_losses() {
        let t = Tally::new();
        for n in 0..4 {
            t.confirmed(n);
        }
        t.publishing(4); // never confirmed: not lost, it was never promised
        t.publish_failed();
        for n in [0, 1, 1, 2, 4] {
            t.consumed(n);
        }
        let c = t.counts();
        assert_eq!(
            c,
            FaultCounts {
                published: 5,
                confirmed: 4,
                consumed: 3,
                duplicates: 1,
                lost: 1,
                failed_publishes: 1
            }
        );
        assert_eq!(t.missing(), vec![3]);
        assert_eq!(
            c.to_string(),
            "published 5 / confirmed 4 / consumed 3 / duplicates 1 / lost 1 (1 failed publishes retried)"
        );
    }
}
