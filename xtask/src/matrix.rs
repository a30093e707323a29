//! `cargo xtask test-brokers`: each driver x broker pair runs its test binaries; the
//! results are parsed from cargo's own summary lines and printed as a matrix.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Broker, Driver, brokers};

struct Pair {
    broker: Broker,
    driver: Driver,
    package: &'static str,
    suites: &'static [&'static str],
    fault_suites: &'static [&'static str],
    /// The pair's cells of the runtime fault suite (`queue-runtime --test faults`),
    /// chosen by this test-name filter.
    runtime_faults: Option<&'static str>,
}

const PAIRS: &[Pair] = &[
    Pair {
        broker: Broker::Rabbitmq,
        driver: Driver::Amqp091,
        package: "queue-amqp091",
        suites: &["conformance", "broker"],
        fault_suites: &["faults"],
        runtime_faults: Some("_amqp091"),
    },
    Pair {
        broker: Broker::Rabbitmq,
        driver: Driver::Amqp10,
        package: "queue-amqp10",
        suites: &["conformance_rabbitmq", "errors_rabbitmq"],
        fault_suites: &["fault_rabbitmq"],
        runtime_faults: Some("_amqp10"),
    },
    Pair {
        broker: Broker::Proton,
        driver: Driver::Amqp10,
        package: "queue-amqp10",
        suites: &["conformance_proton"],
        fault_suites: &[],
        runtime_faults: None,
    },
    Pair {
        broker: Broker::Artemis,
        driver: Driver::Amqp10,
        package: "queue-amqp10",
        suites: &["conformance_artemis"],
        // No fault cases yet: they need an Artemis the test harness can start, stop
        // and cut, like PrivateNode does for RabbitMQ, and none could be run here.
        fault_suites: &[],
        runtime_faults: None,
    },
];

#[derive(Default)]
struct Outcome {
    passed: u32,
    failed: u32,
    skipped: u32,
    note: String,
    duration: Duration,
    reachable: bool,
}

/// Runs the matrix; `Ok(false)` when a reachable pair failed.
pub fn run(
    only_broker: Option<Broker>,
    only_driver: Option<Driver>,
    quick: bool,
) -> Result<bool, String> {
    let selected: Vec<&Pair> = PAIRS
        .iter()
        .filter(|p| {
            only_broker.is_none_or(|b| b == p.broker) && only_driver.is_none_or(|d| d == p.driver)
        })
        .collect();
    let mut rabbit = None;
    let mut artemis = None;
    let mut rows = Vec::new();
    for pair in &selected {
        let available = match pair.broker {
            Broker::Rabbitmq => rabbit.get_or_insert_with(brokers::rabbitmq),
            Broker::Artemis => artemis.get_or_insert_with(brokers::artemis),
            Broker::Proton => &mut brokers::proton(),
        };
        let outcome = match available {
            Err(reason) => Outcome {
                note: format!("skipped: {reason}"),
                ..Outcome::default()
            },
            Ok(found) => run_pair(pair, &found.env, quick),
        };
        rows.push((pair, outcome));
    }
    if let Some(Ok(found)) = &rabbit
        && found.started
    {
        brokers::stop_rabbitmq();
    }
    if let Some(Ok(found)) = &artemis
        && found.started
    {
        brokers::stop_artemis();
    }

    println!();
    println!(
        "{:<22} {:>7} {:>7} {:>8} {:>9}  note",
        "pair", "passed", "failed", "skipped", "duration"
    );
    let mut ok = true;
    for (pair, o) in &rows {
        let name = format!("{:?} x {:?}", pair.broker, pair.driver).to_lowercase();
        println!(
            "{name:<22} {:>7} {:>7} {:>8} {:>8.1}s  {}",
            o.passed,
            o.failed,
            o.skipped,
            o.duration.as_secs_f64(),
            o.note
        );
        if o.reachable && o.failed > 0 {
            ok = false;
        }
    }
    Ok(ok)
}

fn run_pair(pair: &Pair, env: &[(String, String)], quick: bool) -> Outcome {
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut driver_tests = vec!["test".to_string(), "-p".into(), pair.package.into()];
    let suites = pair.suites.iter().chain(if quick {
        [].iter()
    } else {
        pair.fault_suites.iter()
    });
    for suite in suites {
        driver_tests.extend(["--test".into(), suite.to_string()]);
    }
    driver_tests.push("--".into());
    runs.push(driver_tests);
    if let (false, Some(filter)) = (quick, pair.runtime_faults) {
        runs.push(
            [
                "test",
                "-p",
                "queue-runtime",
                "--test",
                "faults",
                "--",
                filter,
            ]
            .map(String::from)
            .to_vec(),
        );
    }
    let mut outcome = Outcome {
        reachable: true,
        ..Outcome::default()
    };
    for args in runs {
        run_one(pair, env, &args, &mut outcome);
    }
    outcome.duration = started.elapsed();
    if outcome.skipped > 0 && outcome.note.is_empty() {
        outcome.note = "skips are printed by the suites with their reason".into();
    }
    outcome
}

/// Runs one `cargo test` command of a pair and adds its results to `outcome`.
fn run_one(pair: &Pair, env: &[(String, String)], args: &[String], outcome: &mut Outcome) {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.args(args);
    // The broker was found: a test that cannot reach it must fail, not skip.
    command
        .args(["--nocapture", "--test-threads", "2"])
        .env("CI", "true");
    for (k, v) in env {
        command.env(k, v);
    }
    println!(
        "running {:?} x {:?}: {:?}",
        pair.broker, pair.driver, command
    );
    let output = match command.output() {
        Ok(o) => o,
        Err(e) => {
            outcome.failed += 1;
            outcome.note = format!("could not run cargo: {e}");
            return;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut failed = 0;
    for line in text.lines() {
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            outcome.passed += count(rest, "passed");
            failed += count(rest, "failed");
        }
        if line.trim_start().starts_with("skipped:") {
            outcome.skipped += 1;
        }
        // The fault tests' end-to-end counts, shown as they come.
        if line.contains(" / confirmed ") {
            println!("  {}", line.trim());
        }
    }
    outcome.failed += failed;
    if !output.status.success() && failed == 0 {
        outcome.failed += 1;
        outcome.note = "the test run failed before reporting (build error?)".into();
        eprintln!("{text}");
    }
}

fn count(summary: &str, word: &str) -> u32 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(word)
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn reads_cargo_summaries() {
        let ok = "ok. 24 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.5s";
        assert_eq!((count(ok, "passed"), count(ok, "failed")), (24, 0));
        let bad = "FAILED. 3 passed; 2 failed; 0 ignored";
        assert_eq!((count(bad, "passed"), count(bad, "failed")), (3, 2));
    }
}
