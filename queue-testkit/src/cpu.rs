//! CPU time used, read from `/proc`: the evidence for a test whose regression would
//! spin a thread (a loop that polls a closed channel) rather than block it.

use std::time::Duration;

/// CPU time (user + system) the process `pid` has used so far.
pub fn process_cpu(pid: u32) -> Duration {
    cpu_of(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) the calling thread has used so far.
///
/// ```
/// let before = queue_testkit::thread_cpu();
/// std::thread::sleep(std::time::Duration::from_millis(20));
/// assert!(queue_testkit::thread_cpu() - before < std::time::Duration::from_millis(20));
/// ```
pub fn thread_cpu() -> Duration {
    cpu_of("/proc/thread-self/stat")
}

/// utime + stime of a `stat` file, in the kernel's clock ticks (100 a second); zero
/// when it cannot be read.
fn cpu_of(path: &str) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The name, in parentheses, may hold spaces: count fields after its end. utime and
    // stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_is_seen_using_cpu() {
        let before = thread_cpu();
        let started = std::time::Instant::now();
        let mut spins = 0u64;
        // Until the loop shows (ticks are 10 ms), however little of a core a loaded
        // machine gives it; a reading that never moves fails at the wall-clock cap.
        while thread_cpu() - before < Duration::from_millis(30) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "30 s of spinning read as {:?} of CPU",
                thread_cpu() - before
            );
            for _ in 0..100_000 {
                spins = std::hint::black_box(spins + 1);
            }
        }
        assert!(process_cpu(std::process::id()) >= thread_cpu() - before);
    }
}
