//! For benches that measure two or more setups *in turns* and hand their figures to
//! `cargo xtask bench` (docs/performance.md, "Measuring in turns").
//!
//! This machine's speed drifts by 10–40% over seconds, as much as the difference
//! between two setups that criterion measures one after the other. Fed alternately, a
//! round at a time, the setups go through the same drift, and their ratio holds from
//! run to run. A bench that does so writes `target/bench/in_turns-<bench>.json`,
//! `{"rounds": N, "rates": {"<id>": msg/s}}` (and, for the setups whose CPU was
//! counted, `"cpu_us_per_message": {"<id>": µs}`), where `cargo xtask bench` reads
//! the rows it compares:
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use queue_testkit::bench::{InTurnsFigures, in_turns, in_turns_wanted};
//!
//! let time = |work: fn()| {
//!     let start = Instant::now();
//!     work();
//!     start.elapsed()
//! };
//! let args: Vec<String> = std::env::args().skip(1).collect();
//! if in_turns_wanted(&args) {
//!     let rounds = 16;
//!     let (raw, ours) = in_turns(rounds, || time(|| {}), || time(|| {}));
//!     let mut figures = InTurnsFigures::new("in_turns-example.json", rounds);
//!     figures.record("example_in_turns/raw", 1_000 * u64::from(rounds), raw);
//!     figures.record("example_in_turns/ours", 1_000 * u64::from(rounds), ours);
//!     figures.write();
//! }
//! ```

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Runs `a` and `b` for `rounds` rounds, alternating which goes first, and returns the
/// time each took in all: both sides see the same drift of the machine's speed, which
/// criterion, measuring one side after the other, does not give them.
pub fn in_turns(
    rounds: u32,
    mut a: impl FnMut() -> Duration,
    mut b: impl FnMut() -> Duration,
) -> (Duration, Duration) {
    let (mut time_a, mut time_b) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        if round % 2 == 0 {
            time_a += a();
            time_b += b();
        } else {
            time_b += b();
            time_a += a();
        }
    }
    (time_a, time_b)
}

/// `side` (a setup's round, returning its timed part), also adding the CPU time the
/// whole process used during each call to `cpu`: the CPU a message costs on the
/// client's side, which a throughput pair's noise can hide. It counts every thread,
/// and everything the round does untimed (starting and stopping a runtime).
pub fn counting_cpu<'a>(
    cpu: &'a Cell<Duration>,
    mut side: impl FnMut() -> Duration + 'a,
) -> impl FnMut() -> Duration + 'a {
    move || {
        let before = crate::process_cpu(std::process::id());
        let time = side();
        cpu.set(cpu.get() + crate::process_cpu(std::process::id()).saturating_sub(before));
        time
    }
}

/// Whether a bench binary, given its command line (without the program's name), is
/// to run its pass in turns: under `cargo bench` (not `cargo test --benches`, which
/// passes no `--bench` and only checks that a bench runs), not while criterion
/// profiles, lists or runs only ignored benchmarks, and not when a filter names
/// other benchmarks (`-- in_turns` asks for the passes alone).
pub fn in_turns_wanted(args: &[String]) -> bool {
    const NO_PASS: [&str; 4] = ["--profile-time", "--list", "--test", "--ignored"];
    let is = |arg: &str, option: &str| arg == option || arg.starts_with(&format!("{option}="));
    if !args.iter().any(|a| a == "--bench")
        || args
            .iter()
            .any(|a| NO_PASS.iter().any(|option| is(a, option)))
    {
        return false;
    }
    filters(args).all(|filter| filter.contains("in_turns"))
}

/// Whether, in a pass in turns that [`in_turns_wanted`] lets run, the pair whose ids
/// start with `pair` (`rabbitmq_publish_in_turns`) runs: every pair without a filter
/// or with `in_turns`, else the pairs a filter is part of (`-- publish_in_turns`
/// runs that pair alone, for a quick comparison of two builds).
pub fn in_turns_pair_wanted(args: &[String], pair: &str) -> bool {
    in_turns_whole_pass(args)
        || filters(args).any(|filter| pair.contains(filter) || filter.starts_with(pair))
}

/// Whether a pass in turns runs every pair (no filter but `in_turns`): only such a
/// pass may write its figures, which `cargo xtask bench` reads as a whole.
pub fn in_turns_whole_pass(args: &[String]) -> bool {
    filters(args).all(|filter| filter == "in_turns")
}

/// The words of a bench's command line that are criterion's filters: not options,
/// nor the value of an option.
fn filters(args: &[String]) -> impl Iterator<Item = &str> {
    // Criterion's options that take the next word as their value (`--sample-size
    // 10`).
    const TAKE_A_VALUE: [&str; 16] = [
        "--warm-up-time",
        "--measurement-time",
        "--sample-size",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--nresamples",
        "--output-format",
        "--format",
        "--color",
        "--plotting-backend",
        "--logfile",
    ];
    let is_value = move |i: usize| i > 0 && TAKE_A_VALUE.contains(&args[i - 1].as_str());
    args.iter()
        .enumerate()
        .filter(move |(i, a)| !a.starts_with('-') && !is_value(*i))
        .map(|(_, filter)| filter.as_str())
}

/// `target/` of the workspace, where `cargo xtask bench` reads `bench/*.json`: cargo
/// runs benches from the package's directory, not the workspace's.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // Cargo puts a bench's executable in `target/<profile>/deps/`.
    let from_exe = || {
        let exe = std::env::current_exe().ok()?;
        let deps = exe.parent()?;
        if deps.file_name()? != "deps" {
            return None;
        }
        Some(deps.parent()?.parent()?.to_path_buf())
    };
    from_exe().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The rates of one bench's pass in turns, written where `cargo xtask bench` reads
/// them.
pub struct InTurnsFigures {
    file_name: &'static str,
    rounds: u32,
    rates: serde_json::Map<String, serde_json::Value>,
    cpu_us_per_message: serde_json::Map<String, serde_json::Value>,
}

impl InTurnsFigures {
    /// Figures of a pass of `rounds` rounds, to go to `target/bench/<file_name>`
    /// (`in_turns-<bench>.json`).
    pub fn new(file_name: &'static str, rounds: u32) -> Self {
        Self {
            file_name,
            rounds,
            rates: serde_json::Map::new(),
            cpu_us_per_message: serde_json::Map::new(),
        }
    }

    /// Records (and prints) the rate of the setup `id`, which handled `messages` in
    /// `time` over all its turns; returns it, in messages per second.
    pub fn record(&mut self, id: &str, messages: u64, time: Duration) -> f64 {
        let rate = messages as f64 / time.as_secs_f64();
        println!("in turns: {id:<52} {rate:>9.0} msg/s");
        self.rates.insert(id.to_string(), serde_json::json!(rate));
        rate
    }

    /// Records (and prints) the process CPU the setup `id` used per message, over all
    /// its turns (see [`counting_cpu`]); returns it, in microseconds.
    ///
    /// # Panics
    /// If no CPU time was counted (`/proc` could not be read): a zero would read as
    /// a measurement.
    pub fn record_cpu(&mut self, id: &str, messages: u64, cpu: Duration) -> f64 {
        assert!(
            !cpu.is_zero(),
            "{id}: no CPU time counted (is /proc readable?)"
        );
        let micros = cpu.as_secs_f64() * 1e6 / messages as f64;
        println!("in turns: {id:<52} {micros:>9.1} µs of CPU per message");
        self.cpu_us_per_message
            .insert(id.to_string(), serde_json::json!(micros));
        micros
    }

    /// Writes the figures to `target/bench/`; returns the file's path.
    ///
    /// # Panics
    /// If the file cannot be written: a bench whose figures are lost must not look
    /// as if it had measured.
    pub fn write(self) -> PathBuf {
        let out = target_dir().join("bench");
        std::fs::create_dir_all(&out).unwrap_or_else(|e| panic!("create {}: {e}", out.display()));
        let mut json = serde_json::json!({ "rounds": self.rounds, "rates": self.rates });
        if !self.cpu_us_per_message.is_empty() {
            json["cpu_us_per_message"] = self.cpu_us_per_message.into();
        }
        let path = out.join(self.file_name);
        let text = serde_json::to_string_pretty(&json).expect("a map of numbers is JSON");
        std::fs::write(&path, text)
            .unwrap_or_else(|e| panic!("write the in-turns figures to {}: {e}", path.display()));
        println!("wrote {}", path.display());
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn the_pass_runs_under_cargo_bench_unless_a_filter_names_other_benchmarks() {
        assert!(in_turns_wanted(&args("--bench")));
        assert!(in_turns_wanted(&args("--bench in_turns")));
        assert!(in_turns_wanted(&args("--bench --sample-size 10")));
        assert!(!in_turns_wanted(&args("--bench publish")));
        assert!(!in_turns_wanted(&args("")), "cargo test --benches");
        assert!(!in_turns_wanted(&args("--bench --profile-time 5")));
        assert!(!in_turns_wanted(&args("--bench --list")));
    }

    #[test]
    fn a_filter_picks_the_pairs_it_is_part_of() {
        let pair = "rabbitmq_publish_in_turns";
        assert!(in_turns_pair_wanted(&args("--bench"), pair));
        assert!(in_turns_pair_wanted(&args("--bench in_turns"), pair));
        assert!(in_turns_pair_wanted(
            &args("--bench publish_in_turns"),
            pair
        ));
        assert!(!in_turns_pair_wanted(
            &args("--bench publish_in_turns"),
            "rabbitmq_in_turns"
        ));
        assert!(in_turns_pair_wanted(
            &args("--bench --sample-size 10 publish_in_turns"),
            pair
        ));
        assert!(in_turns_pair_wanted(
            &args("--bench rabbitmq_publish_in_turns/lua"),
            pair
        ));
        assert!(in_turns_whole_pass(&args("--bench in_turns")));
        assert!(!in_turns_whole_pass(&args("--bench publish_in_turns")));
    }

    #[test]
    fn counting_cpu_adds_what_the_process_used_during_each_call() {
        let cpu = Cell::new(Duration::ZERO);
        let mut side = counting_cpu(&cpu, || {
            let start = std::time::Instant::now();
            // Ticks are 10 ms: spin past a few, on however loaded a machine.
            let before = crate::thread_cpu();
            while crate::thread_cpu() - before < Duration::from_millis(30) {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the CPU clock never moved"
                );
                std::hint::black_box(0u64);
            }
            start.elapsed()
        });
        side();
        assert!(cpu.get() >= Duration::from_millis(20), "{:?}", cpu.get());
    }

    #[test]
    fn each_side_goes_first_every_other_round() {
        let order = std::cell::RefCell::new(String::new());
        let (a, b) = in_turns(
            4,
            || {
                order.borrow_mut().push('a');
                Duration::from_millis(1)
            },
            || {
                order.borrow_mut().push('b');
                Duration::from_millis(2)
            },
        );
        assert_eq!(order.into_inner(), "abbaabba");
        assert_eq!((a, b), (Duration::from_millis(4), Duration::from_millis(8)));
    }
}
