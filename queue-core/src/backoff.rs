//! One exponential backoff, used by every wait that grows: a failed message's next
//! attempt, a driver's reconnects, a runtime waiting for its broker.

use std::time::Duration;

/// Waits that grow by `multiplier` from `initial` up to `max`, shortened at random by
/// up to a fifth when `jitter` is on (so many waiters spread out).
///
/// ```
/// use std::time::Duration;
/// use queue_core::Backoff;
/// let backoff = Backoff::new(Duration::from_secs(1), 2.0, Duration::from_secs(60));
/// let waits: Vec<u64> = (1..=8).map(|n| backoff.delay(n).as_secs()).collect();
/// assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 60, 60]);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// Growth per step (at least 1).
    pub multiplier: f64,
    /// The longest wait.
    pub max: Duration,
    /// Whether waits are shortened at random by up to 20%.
    pub jitter: bool,
}

impl Backoff {
    /// A backoff without jitter.
    pub const fn new(initial: Duration, multiplier: f64, max: Duration) -> Backoff {
        Backoff {
            initial,
            multiplier,
            max,
            jitter: false,
        }
    }

    /// The same backoff with jitter on or off.
    pub const fn with_jitter(mut self, jitter: bool) -> Backoff {
        self.jitter = jitter;
        self
    }

    /// The wait before step `step` (1-based): initial × multiplier^(step-1), capped
    /// at `max`, then jittered.
    pub fn delay(&self, step: u32) -> Duration {
        let exponent = step.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let capped = secs.min(self.max.as_secs_f64());
        let factor = if self.jitter {
            1.0 - 0.2 * fastrand::f64()
        } else {
            1.0
        };
        // `max` itself may be past what f64 seconds count back exactly (`Duration::MAX`).
        Duration::try_from_secs_f64((capped * factor).max(0.0)).unwrap_or(self.max)
    }

    /// The longest wait it gives.
    pub fn longest(&self) -> Duration {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_cap_gives_it_without_panicking() {
        let endless = Backoff::new(Duration::from_secs(1), 2.0, Duration::MAX);
        assert_eq!(endless.delay(65), Duration::MAX);
        assert_eq!(endless.delay(3), Duration::from_secs(4));
    }

    #[test]
    fn jitter_shortens_by_at_most_a_fifth_and_does_vary() {
        let plain = Backoff::new(Duration::from_secs(1), 2.0, Duration::from_secs(60));
        let jittered = plain.with_jitter(true);
        let mut seen = std::collections::BTreeSet::new();
        for step in 1..=6 {
            let full = plain.delay(step);
            for _ in 0..50 {
                let wait = jittered.delay(step);
                assert!(
                    wait <= full && wait >= full.mul_f64(0.8),
                    "{step}: {wait:?}"
                );
                seen.insert(wait.as_nanos());
            }
        }
        // Jitter that does nothing would give one value per step.
        assert!(seen.len() > 6 * 10, "{} distinct waits", seen.len());
    }
}
