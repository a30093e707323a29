//! `cargo xtask test-brokers`: the broker matrix. Nothing here names a driver or a
//! broker: the driver crates are the workspace members with a `conformance` test
//! binary, and each test in their `conformance`, `faults`, `tls` and `cluster` binaries is named
//! `<broker>::...`, so the pairs are read off `--list`. The runtime's own cells (any
//! `queue-runtime` test named `<broker>::<driver>::...`: its `faults` and `artemis`
//! binaries) join their pair. Each pair runs with `CI=true` (a broker that cannot be reached fails), and
//! the table shows passed, failed, and ignored tests with why (a capability the
//! broker lacks, most often).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// The test binaries that make up a driver's suites.
const SUITES: [&str; 4] = ["conformance", "faults", "tls", "cluster"];

#[derive(Default)]
struct Outcome {
    passed: u32,
    failed: u32,
    /// Ignored tests, by why.
    ignored: BTreeMap<String, u32>,
    duration: Duration,
    counts: Vec<String>,
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Workspace members with a test target named `conformance`, and which of the suites
/// each has.
fn driver_crates() -> Result<Vec<(String, Vec<&'static str>)>, String> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    let mut crates = Vec::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let tests: Vec<&str> = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "test"))
            })
            .filter_map(|t| t["name"].as_str())
            .collect();
        if tests.contains(&"conformance") {
            let suites = SUITES.into_iter().filter(|s| tests.contains(s)).collect();
            crates.push((package["name"].as_str().unwrap_or("").to_string(), suites));
        }
    }
    Ok(crates)
}

/// The brokers a crate's suites name, from `--list`.
fn brokers_of(package: &str, suites: &[&str]) -> Result<Vec<String>, String> {
    let mut command = cargo();
    // The `tls` suite needs the crate's `tls` feature; every suite runs with all of them.
    command.args(["test", "-p", package, "--all-features"]);
    for suite in suites {
        command.args(["--test", suite]);
    }
    let out = command
        .args(["--", "--list"])
        .output()
        .map_err(|e| format!("cargo test --list: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo test -p {package} --list failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut brokers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter_map(|name| name.split_once("::").map(|(b, _)| b.to_string()))
        .collect();
    brokers.sort();
    brokers.dedup();
    Ok(brokers)
}

/// Runs the matrix; `Ok(false)` when a test failed.
pub fn run(
    only_broker: Option<String>,
    only_driver: Option<String>,
    quick: bool,
) -> Result<bool, String> {
    let mut rows = Vec::new();
    for (package, suites) in driver_crates()? {
        let driver = package.trim_start_matches("queue-").to_string();
        if only_driver.as_ref().is_some_and(|d| *d != driver) {
            continue;
        }
        let suites: Vec<&str> = suites
            .into_iter()
            .filter(|s| !(quick && *s == "faults"))
            .collect();
        for broker in brokers_of(&package, &suites)? {
            if only_broker.as_ref().is_some_and(|b| *b != broker) {
                continue;
            }
            let started = Instant::now();
            let mut outcome = Outcome::default();
            let mut command = cargo();
            command.args(["test", "-p", &package, "--all-features"]);
            for suite in &suites {
                command.args(["--test", suite]);
            }
            command.args(["--", &format!("{broker}::")]);
            run_tests(&format!("{broker} x {driver}"), command, &mut outcome);
            if !quick && package != "queue-runtime" {
                let mut runtime = cargo();
                runtime.args([
                    "test",
                    "-p",
                    "queue-runtime",
                    "--tests",
                    "--",
                    &format!("{broker}::{driver}::"),
                ]);
                run_tests(
                    &format!("{broker} x {driver} (runtime)"),
                    runtime,
                    &mut outcome,
                );
            }
            outcome.duration = started.elapsed();
            rows.push((format!("{broker} x {driver}"), outcome));
        }
    }
    print_table(&rows);
    Ok(rows.iter().all(|(_, o)| o.failed == 0))
}

/// Runs one `cargo test` command and adds its results to `outcome`.
fn run_tests(label: &str, mut command: Command, outcome: &mut Outcome) {
    // In the matrix a broker that cannot be reached is a failure, not a skip.
    command.env("CI", "true").arg("--nocapture");
    println!("running {label}: {command:?}");
    let output = match command.output() {
        Ok(o) => o,
        Err(e) => {
            outcome.failed += 1;
            eprintln!("could not run cargo: {e}");
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
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("test result: ") {
            outcome.passed += count(rest, "passed");
            failed += count(rest, "failed");
        }
        if let Some(why) = ignored_reason(line) {
            *outcome.ignored.entry(why).or_default() += 1;
        }
        // The fault tests' end-to-end counts, shown as they come.
        if line.contains(" / confirmed ") {
            println!("  {line}");
            outcome.counts.push(line.to_string());
        }
    }
    outcome.failed += failed;
    if !output.status.success() && failed == 0 {
        outcome.failed += 1;
        eprintln!("the test run failed before reporting (build error?):\n{text}");
    }
}

/// Why a test was ignored, from its line: `test [lacks priority] b::t ... ignored`.
fn ignored_reason(line: &str) -> Option<String> {
    let rest = line.strip_prefix("test [")?;
    if !line.ends_with("... ignored") {
        return None;
    }
    rest.split_once(']').map(|(why, _)| why.to_string())
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

fn print_table(rows: &[(String, Outcome)]) {
    println!();
    println!(
        "{:<26} {:>7} {:>7} {:>8} {:>9}  ignored, by why",
        "pair", "passed", "failed", "ignored", "duration"
    );
    for (pair, o) in rows {
        let ignored: u32 = o.ignored.values().sum();
        let why: Vec<String> = o.ignored.iter().map(|(w, n)| format!("{n} {w}")).collect();
        println!(
            "{pair:<26} {:>7} {:>7} {:>8} {:>8.1}s  {}",
            o.passed,
            o.failed,
            ignored,
            o.duration.as_secs_f64(),
            why.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cargo_summaries() {
        let ok = "ok. 24 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.5s";
        assert_eq!((count(ok, "passed"), count(ok, "failed")), (24, 0));
        let bad = "FAILED. 3 passed; 2 failed; 0 ignored";
        assert_eq!((count(bad, "passed"), count(bad, "failed")), (3, 2));
    }

    #[test]
    fn reads_why_a_test_was_ignored() {
        let line = "test [lacks priority]    artemis::priority_orders_delivery ... ignored";
        assert_eq!(ignored_reason(line).as_deref(), Some("lacks priority"));
        assert_eq!(ignored_reason("test rabbitmq::x ... ok"), None);
    }
}
