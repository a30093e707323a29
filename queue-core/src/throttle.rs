//! At most one log line an interval about events that can come in a flood.

use std::time::{Duration, Instant};

/// Decides which of a run of events gets a log line: the first, then at most one an
/// interval, each counting the events since the one before. The drivers log with it
/// what they mend in other clients' messages, so that a flood of such messages does
/// not flood the log.
///
/// ```
/// use std::time::Duration;
/// use queue_core::Throttle;
///
/// let mut mended = Throttle::new(Duration::from_secs(10));
/// assert_eq!(mended.tick(), Some(1)); // log it: one event
/// assert_eq!(mended.tick(), None); // counted, not logged
/// ```
#[derive(Debug)]
pub struct Throttle {
    interval: Duration,
    /// Events since the last line, and when that was.
    count: u64,
    last: Option<Instant>,
}

/// A throttle of one line every 10 seconds: what the drivers log of other clients'
/// messages they mend (docs/drivers/writing.md), so that each says the same.
impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(Duration::from_secs(10))
    }
}

impl Throttle {
    /// A throttle that lets one line through every `interval`.
    pub fn new(interval: Duration) -> Self {
        Throttle {
            interval,
            count: 0,
            last: None,
        }
    }

    /// Counts an event: `Some(n)` when it is to be logged, `n` the events since the
    /// last line logged, this one included.
    pub fn tick(&mut self) -> Option<u64> {
        self.tick_at(Instant::now())
    }

    fn tick_at(&mut self, now: Instant) -> Option<u64> {
        self.count += 1;
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood logs one line, then one an interval counting the events in between.
    #[test]
    fn a_flood_logs_once_an_interval() {
        let every = Duration::from_secs(10);
        let mut throttle = Throttle::new(every);
        let start = Instant::now();
        assert_eq!(throttle.tick_at(start), Some(1));
        for _ in 0..4 {
            assert_eq!(throttle.tick_at(start + every / 2), None);
        }
        assert_eq!(throttle.tick_at(start + every), Some(5));
        assert_eq!(throttle.tick_at(start + every), None);
    }

    /// The drivers' docs say one line every 10 seconds.
    #[test]
    fn the_default_is_one_line_every_ten_seconds() {
        assert_eq!(Throttle::default().interval, Duration::from_secs(10));
    }
}
