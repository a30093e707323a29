//! `cargo xtask bench`: runs every criterion bench (each measures its candidate and its
//! baseline in the same run; the rows marked "in turns" (end to end, the runtime on
//! each broker, the drivers against raw clients, Lua publishing) come from their
//! benches' passes in turns, `target/bench/in_turns-*.json`), the latency bench
//! (publish -> handler start at fixed rates, `target/bench/latency.json`), a kombu
//! publish/consume run against the same
//! RabbitMQ, and writes the side-by-side table, the table of CPU per message (for the
//! setups whose bench counted it) and the latency table to stdout,
//! `target/bench/results.json` (and a copy per run under `target/bench/runs/`, for
//! `--compare`) and `target/bench/results.svg`; `--write-docs` puts the tables into
//! docs/performance.md, which is never edited by hand between its markers, and the
//! plot into docs/performance.svg.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use queue_fixtures::process::{last_lines, output_within};
use serde::{Deserialize, Serialize};

/// One benchmark: which package runs it.
struct Suite {
    package: &'static str,
    bench: &'static str,
    /// Why the broker it measures against cannot be used, if it needs one (a
    /// `shared_unavailable` of `queue_fixtures`): the suite is then skipped, said so.
    needs: Option<fn() -> Option<String>>,
    /// What it is passed for `--quick`.
    quick_args: &'static [&'static str],
}

/// How long one suite may run once built (criterion's full settings take the longest);
/// past it the suite is killed and reported as failed, and the run goes on.
const SUITE_LIMIT: Duration = Duration::from_secs(40 * 60);
/// The same for `--quick` (a whole quick run of every suite takes about 14 minutes).
const SUITE_LIMIT_QUICK: Duration = Duration::from_secs(12 * 60);

/// Criterion's settings for `--quick`.
const CRITERION_QUICK: &[&str] = &[
    "--warm-up-time",
    "1",
    "--measurement-time",
    "2",
    "--sample-size",
    "10",
];

const SUITES: &[Suite] = &[
    Suite {
        package: "queue-core",
        bench: "memory",
        needs: None,
        quick_args: CRITERION_QUICK,
    },
    Suite {
        package: "queue-lua",
        bench: "lua",
        needs: None,
        quick_args: CRITERION_QUICK,
    },
    Suite {
        package: "queue-runtime",
        bench: "end_to_end",
        needs: None,
        quick_args: CRITERION_QUICK,
    },
    Suite {
        package: "queue-amqp091",
        bench: "publish_consume",
        needs: Some(queue_fixtures::rabbitmq::shared_unavailable),
        quick_args: CRITERION_QUICK,
    },
    Suite {
        package: "queue-runtime",
        bench: "rabbitmq",
        needs: Some(queue_fixtures::rabbitmq::shared_unavailable),
        quick_args: CRITERION_QUICK,
    },
    Suite {
        package: "queue-amqp10",
        bench: "send",
        needs: Some(queue_fixtures::rabbitmq::shared_unavailable),
        quick_args: CRITERION_QUICK,
    },
    // Not criterion: it writes target/bench/in_turns-artemis.json (see
    // `in_turns_files`).
    Suite {
        package: "queue-runtime",
        bench: "artemis",
        needs: Some(queue_fixtures::artemis::shared_unavailable),
        quick_args: &[],
    },
    // Not criterion: it writes target/bench/in_turns-end_to_end.json, the figures of
    // the end-to-end rows (see `in_turns_files`).
    Suite {
        package: "queue-runtime",
        bench: "end_to_end_in_turns",
        needs: None,
        quick_args: &[],
    },
    // Not criterion: it writes target/bench/latency.json, and skips its RabbitMQ
    // setups by itself (the memory one runs anyway).
    Suite {
        package: "queue-runtime",
        bench: "latency",
        needs: None,
        quick_args: &["--quick"],
    },
];

/// A comparison: candidate vs baseline (criterion full ids, or the ids a pass in
/// turns writes), and the goal ratio.
struct Comparison {
    what: &'static str,
    candidate: &'static str,
    baseline: &'static str,
    goal: f64,
}

const COMPARISONS: &[Comparison] = &[
    Comparison {
        what: "memory driver publish->consume->ack vs raw tokio channel",
        candidate: "memory/memory_driver",
        baseline: "memory/raw_tokio_channel",
        goal: 0.2,
    },
    Comparison {
        what: "Lua queue.publish vs Rust publish (memory)",
        candidate: "publish/lua_queue_publish",
        baseline: "publish/rust_facade",
        goal: 0.3,
    },
    Comparison {
        what: "runtime, no-op Lua handler, concurrency 16 vs no-op Rust consumer (memory, in turns)",
        candidate: "end_to_end_in_turns/lua_noop_concurrency_16",
        baseline: "end_to_end_in_turns/baseline_rust_noop_consumer",
        goal: 0.6,
    },
    Comparison {
        what: "runtime, no-op Lua handler, concurrency 1 vs no-op Rust consumer (memory, in turns)",
        candidate: "end_to_end_in_turns/lua_noop_concurrency_1",
        baseline: "end_to_end_in_turns/baseline_rust_noop_consumer",
        goal: 0.0,
    },
    Comparison {
        what: "runtime, no-op Lua handler, concurrency 256 vs no-op Rust consumer (memory, in turns)",
        candidate: "end_to_end_in_turns/lua_noop_concurrency_256",
        baseline: "end_to_end_in_turns/baseline_rust_noop_consumer",
        goal: 0.0,
    },
    Comparison {
        what: "runtime, no-op Lua handler, concurrency 256 vs concurrency 16 (memory, in turns)",
        candidate: "end_to_end_in_turns/lua_noop_concurrency_256",
        baseline: "end_to_end_in_turns/lua_noop_concurrency_16",
        goal: 1.0,
    },
    Comparison {
        what: "runtime on RabbitMQ, no-op Lua handler vs raw lapin consume+ack (in turns)",
        candidate: "rabbitmq_in_turns/runtime_noop_lua",
        baseline: "rabbitmq_in_turns/raw_lapin",
        goal: 0.9,
    },
    Comparison {
        what: "runtime on RabbitMQ over AMQP 1.0, no-op Lua handler vs raw fe2o3-amqp receive+accept (in turns)",
        candidate: "amqp10_in_turns/runtime_noop_lua",
        baseline: "amqp10_in_turns/raw_fe2o3",
        goal: 0.9,
    },
    Comparison {
        what: "runtime on ActiveMQ Artemis (AMQP 1.0), no-op Lua handler vs raw fe2o3-amqp receive+accept (in turns)",
        candidate: "artemis_in_turns/runtime_noop_lua",
        baseline: "artemis_in_turns/raw_fe2o3",
        goal: 0.9,
    },
    Comparison {
        what: "Lua publish with confirms, 16 instances vs raw lapin, 16 in flight (in turns)",
        candidate: "rabbitmq_publish_in_turns/lua_publish_16_instances",
        baseline: "rabbitmq_publish_in_turns/raw_lapin_16_in_flight",
        // Issue "Performance": kept where it was, 0.84-1.10x.
        goal: 0.84,
    },
    Comparison {
        what: "AMQP 0-9-1 confirmed publish vs raw lapin (in turns)",
        candidate: "amqp091_in_turns/publish/driver",
        baseline: "amqp091_in_turns/publish/raw_lapin",
        goal: 0.9,
    },
    Comparison {
        what: "AMQP 0-9-1 consume+ack vs raw lapin (in turns)",
        candidate: "amqp091_in_turns/consume_ack/driver",
        baseline: "amqp091_in_turns/consume_ack/raw_lapin",
        goal: 0.85,
    },
    Comparison {
        what: "AMQP 1.0 send vs raw fe2o3-amqp (in turns)",
        candidate: "amqp10_send_in_turns/driver",
        baseline: "amqp10_send_in_turns/raw_fe2o3",
        goal: 0.9,
    },
    Comparison {
        what: "AMQP 0-9-1 confirmed publish vs kombu (Celery's transport)",
        candidate: "amqp091/publish_100k/driver",
        baseline: "kombu/publish",
        goal: 10.0,
    },
    Comparison {
        what: "AMQP 0-9-1 consume+ack vs kombu",
        candidate: "amqp091/consume_ack_100k/driver",
        baseline: "kombu/consume_ack",
        goal: 0.0,
    },
];

#[derive(Serialize, Clone)]
struct Row {
    what: String,
    candidate: String,
    baseline: String,
    candidate_msgs_per_s: Option<f64>,
    baseline_msgs_per_s: Option<f64>,
    ratio: Option<f64>,
    goal: Option<f64>,
    met: Option<bool>,
}

/// What `cargo xtask bench` is asked to do.
pub struct Options {
    /// Shorter runs.
    pub quick: bool,
    /// Only build the table from criterion's results already on disk.
    pub report_only: bool,
    /// An earlier run's JSON to compare the ratios with.
    pub compare: Option<PathBuf>,
    /// Write the table into docs/performance.md.
    pub write_docs: bool,
}

/// The markers around the generated table in docs/performance.md.
const DOCS_PAGE: &str = "docs/performance.md";
/// The plot the page shows, the run's `results.svg`.
const DOCS_PLOT: &str = "docs/performance.svg";
const TABLE_START: &str = "<!-- bench-table: generated by `cargo xtask bench --write-docs` -->";
const TABLE_END: &str = "<!-- bench-table: end -->";

/// Runs everything; `Ok(false)` if a bench failed to run.
pub fn run(options: Options) -> Result<bool, String> {
    let Options {
        quick, report_only, ..
    } = options;
    let out_dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let steps = if report_only {
        1
    } else {
        SUITES.len() as u64 + 1
    };
    let progress = ProgressBar::new(steps);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let mut all_ok = true;
    let started = Instant::now();
    let run_started = std::time::SystemTime::now();
    if !report_only {
        // So that a bench that fails leaves no figures of an earlier run behind.
        let _ = std::fs::remove_file(out_dir.join("latency.json"));
        for path in in_turns_files(&out_dir) {
            let _ = std::fs::remove_file(path);
        }
    }
    for suite in SUITES.iter().filter(|_| !report_only) {
        progress.set_message(format!(
            "cargo bench -p {} --bench {}",
            suite.package, suite.bench
        ));
        if let Some(why) = suite.needs.and_then(|unavailable| unavailable()) {
            say(&progress, format!("skipped {}: {why}", suite.bench));
            progress.inc(1);
            continue;
        }
        // Built first, with no limit (a fresh machine compiles for many minutes), so
        // that the limit below times the bench alone.
        let mut build = cargo();
        build.args([
            "bench",
            "-p",
            suite.package,
            "--bench",
            suite.bench,
            "--no-run",
        ]);
        match build.output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                all_ok = false;
                say(
                    &progress,
                    format!(
                        "bench {} did not build:{}",
                        suite.bench,
                        last_lines(&out.stderr, 20)
                    ),
                );
                progress.inc(1);
                continue;
            }
            Err(e) => return Err(format!("cargo: {e}")),
        }
        let mut command = cargo();
        command.args(["bench", "-p", suite.package, "--bench", suite.bench, "--"]);
        if quick {
            command.args(suite.quick_args);
        }
        let limit = if quick {
            SUITE_LIMIT_QUICK
        } else {
            SUITE_LIMIT
        };
        let output = match output_within(&mut command, limit) {
            Ok(output) => output,
            Err(why) => {
                all_ok = false;
                say(&progress, format!("bench {} failed: {why}", suite.bench));
                progress.inc(1);
                continue;
            }
        };
        if !output.status.success() {
            all_ok = false;
            say(
                &progress,
                format!(
                    "bench {} failed ({}):{}",
                    suite.bench,
                    output.status,
                    last_lines(&output.stderr, 20)
                ),
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        for line in stdout.lines().filter(|l| l.starts_with("rss_")) {
            say(&progress, line.to_string());
            std::fs::write(out_dir.join("rss.txt"), line).map_err(|e| e.to_string())?;
        }
        for line in stdout
            .lines()
            .filter(|l| l.starts_with("latency ") || l.starts_with("skipped:"))
        {
            say(&progress, format!("{}: {line}", suite.bench));
        }
        progress.inc(1);
    }
    progress.set_message("kombu (Celery's transport) against the same RabbitMQ");
    // A rebuilt table reads what the run it rebuilds measured, not older figures of a
    // bench that failed in that run.
    let since = if report_only {
        last_run_started(&out_dir)
    } else {
        Some(run_started)
    };
    let mut results = read_criterion(Path::new("target/criterion"), since);
    let mut cpu_us_per_message = BTreeMap::new();
    for path in in_turns_files(&out_dir) {
        let figures = read_in_turns(&path);
        results.extend(figures.rates);
        cpu_us_per_message.extend(figures.cpu_us_per_message);
    }
    if queue_fixtures::rabbitmq::shared_unavailable().is_none() {
        match kombu(&out_dir, if quick { 10_000 } else { 50_000 }) {
            Ok(k) => results.extend(k),
            Err(e) => say(&progress, format!("kombu skipped: {e}")),
        }
    }
    progress.inc(1);
    progress.finish_with_message(format!("done in {:.0}s", started.elapsed().as_secs_f64()));

    let rows: Vec<Row> = COMPARISONS
        .iter()
        .map(|c| {
            let cand = results.get(c.candidate).copied();
            let base = results.get(c.baseline).copied();
            let ratio = cand.zip(base).map(|(a, b)| a / b);
            let goal = (c.goal > 0.0).then_some(c.goal);
            Row {
                what: c.what.to_string(),
                candidate: c.candidate.to_string(),
                baseline: c.baseline.to_string(),
                candidate_msgs_per_s: cand,
                baseline_msgs_per_s: base,
                ratio,
                goal,
                met: ratio.zip(goal).map(|(r, g)| r >= g),
            }
        })
        .collect();
    let table = table(&rows);
    print!("\n{table}");
    let cpu_table = cpu_table(&cpu_us_per_message);
    if !cpu_table.is_empty() {
        print!("\n{cpu_table}");
    }
    let latency = read_latency(&out_dir.join("latency.json"));
    let latency_table = latency_table(&latency);
    if latency.is_empty() {
        println!("\nno latency results (target/bench/latency.json is missing or empty)");
    } else {
        print!("\n{latency_table}");
    }
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let started_unix_time = since
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    let (quick, load) = measured_run(&out_dir, quick, report_only);
    let json = serde_json::json!({
        "machine": machine(),
        "load": load,
        "unix_time": when,
        "started_unix_time": started_unix_time,
        "quick": quick,
        "rebuilt": report_only,
        "rows": rows,
        "cpu_us_per_message": cpu_us_per_message,
        "latency": latency,
        "all": results,
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("results.json"), &text).map_err(|e| e.to_string())?;
    let runs = out_dir.join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| e.to_string())?;
    let this_run = runs.join(format!("{when}.json"));
    std::fs::write(&this_run, &text).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("results.svg"), svg(&rows, &latency)).map_err(|e| e.to_string())?;
    println!(
        "wrote target/bench/results.json ({}) and target/bench/results.svg",
        this_run.display()
    );
    if let Some(old) = &options.compare {
        print!("{}", compared(&rows, old)?);
    }
    if options.write_docs {
        let mut tables = table;
        if !cpu_table.is_empty() {
            tables.push_str(&format!("\n{CPU_INTRO}\n\n{cpu_table}"));
        }
        if !latency.is_empty() {
            tables.push_str(&format!("\n{LATENCY_INTRO}\n\n{latency_table}"));
        }
        write_docs(&tables, &json)?;
        std::fs::write(DOCS_PLOT, svg(&rows, &latency)).map_err(|e| format!("{DOCS_PLOT}: {e}"))?;
        println!("wrote the tables into {DOCS_PAGE} and the plot into {DOCS_PLOT}");
    }
    Ok(all_ok)
}

/// `cargo`, the one running xtask if known.
fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Prints `line` above the progress bar, or to stderr when the bar is hidden (stderr is
/// not a terminal): a failing suite's output must be seen in a CI log too.
fn say(progress: &ProgressBar, line: String) {
    if progress.is_hidden() {
        eprintln!("{line}");
    } else {
        progress.println(line);
    }
}

/// When the run that wrote `results.json` started, for `--report-only` to read only
/// what that run measured; `None` (every figure on disk) when no run recorded it.
fn last_run_started(out_dir: &Path) -> Option<std::time::SystemTime> {
    let text = std::fs::read_to_string(out_dir.join("results.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let secs = json["started_unix_time"].as_u64()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// The machine's 1-minute load average when the run ended, as `/proc/loadavg` says.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Each ratio next to the one of an earlier run.
fn compared(rows: &[Row], old: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(old).map_err(|e| format!("{}: {e}", old.display()))?;
    let old_json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", old.display()))?;
    let old_ratio = |what: &str| {
        old_json["rows"]
            .as_array()?
            .iter()
            .find(|r| r["what"] == what)?["ratio"]
            .as_f64()
    };
    let mut out = format!("\ncompared with {}:\n\n", old.display());
    out.push_str("| comparison | then | now | change |\n|---|---|---|---|\n");
    for r in rows {
        let then = old_ratio(&r.what);
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}x"));
        let change = then.zip(r.ratio).map_or_else(
            || "-".to_string(),
            |(a, b)| format!("{:+.0}%", (b / a - 1.0) * 100.0),
        );
        out.push_str(&format!(
            "| {} | {} | {} | {change} |\n",
            r.what,
            show(then),
            show(r.ratio)
        ));
    }
    Ok(out)
}

/// Whether the run the figures come from was quick, and the load average at its end:
/// this run's, or for a report rebuilt from earlier figures (`--report-only`), the
/// run's it rebuilds, read from its `results.json` (the load now would describe a
/// machine that measured nothing).
fn measured_run(out_dir: &Path, quick: bool, report_only: bool) -> (bool, Option<f64>) {
    if !report_only {
        return (quick, load_average());
    }
    let previous: serde_json::Value = std::fs::read_to_string(out_dir.join("results.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    (
        previous["quick"].as_bool().unwrap_or(quick),
        previous["load"].as_f64(),
    )
}

/// Replaces the tables between the markers of docs/performance.md with this run's,
/// with the machine and the command that made it.
fn write_docs(tables: &str, json: &serde_json::Value) -> Result<(), String> {
    let page = std::fs::read_to_string(DOCS_PAGE).map_err(|e| format!("{DOCS_PAGE}: {e}"))?;
    let (before, rest) = page
        .split_once(TABLE_START)
        .ok_or_else(|| format!("{DOCS_PAGE} has no line {TABLE_START}"))?;
    let (_, after) = rest
        .split_once(TABLE_END)
        .ok_or_else(|| format!("{DOCS_PAGE} has no line {TABLE_END}"))?;
    let measured = if json["quick"] == true {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let made = if json["rebuilt"] == true {
        format!(
            "Measured by `{measured}`, written by `cargo xtask bench --report-only --write-docs`"
        )
    } else {
        format!("Made by `{measured} --write-docs`")
    };
    let load = json["load"]
        .as_f64()
        .map_or_else(|| "unknown".into(), |l| format!("{l:.2}"));
    let generated = format!(
        "{TABLE_START}\n\n{made} on {} (load average {load} at the end of the measuring run).\n\n{tables}\n{TABLE_END}",
        json["machine"].as_str().unwrap_or("an unknown machine"),
    );
    std::fs::write(DOCS_PAGE, format!("{before}{generated}{after}"))
        .map_err(|e| format!("{DOCS_PAGE}: {e}"))
}

/// Messages per second of every criterion benchmark that declared an element
/// throughput, by full id; with `since`, only of those measured since then, so that
/// a bench that failed or was stopped mid-run leaves its rows empty instead of showing
/// an earlier run's figures.
fn read_criterion(root: &Path, since: Option<std::time::SystemTime>) -> BTreeMap<String, f64> {
    let mut found = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "new") {
                    let fresh = since.is_none_or(|since| {
                        std::fs::metadata(path.join("estimates.json"))
                            .and_then(|m| m.modified())
                            .is_ok_and(|modified| modified >= since)
                    });
                    if !fresh {
                        continue;
                    }
                    if let Some((id, rate)) = read_one(&path) {
                        found.insert(id, rate);
                    }
                } else {
                    stack.push(path);
                }
            }
        }
    }
    found
}

fn read_one(dir: &Path) -> Option<(String, f64)> {
    let benchmark: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("benchmark.json")).ok()?).ok()?;
    let estimates: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("estimates.json")).ok()?).ok()?;
    let elements = benchmark["throughput"]["Elements"].as_f64()?;
    let mean_ns = estimates["mean"]["point_estimate"].as_f64()?;
    Some((
        benchmark["full_id"].as_str()?.to_string(),
        elements / (mean_ns / 1e9),
    ))
}

const KOMBU_SCRIPT: &str = r#"
import sys, time
from kombu import Connection, Exchange, Queue, Producer
n = int(sys.argv[1])
queue = Queue("bench-kombu", exchange=Exchange(""), routing_key="bench-kombu", durable=False)
with Connection("amqp://guest:guest@127.0.0.1:5672//", transport_options={"confirm_publish": True}) as conn:
    channel = conn.channel()
    queue(channel).declare()
    queue(channel).purge()
    producer = Producer(channel, routing_key="bench-kombu")
    started = time.perf_counter()
    for i in range(n):
        producer.publish({"n": i}, serializer="json", delivery_mode=2)
    publish = n / (time.perf_counter() - started)
    got = 0
    started = time.perf_counter()
    def on_message(body, message):
        global got
        message.ack()
        got += 1
    with conn.Consumer(queue, callbacks=[on_message], prefetch_count=1000):
        while got < n:
            conn.drain_events(timeout=30)
    consume = n / (time.perf_counter() - started)
    print(f"{publish} {consume}")
"#;

/// How long each step of the kombu run (creating the venv, `pip install`, the run
/// itself) may take: pip can stall on the network, and kombu's consumer on a broker
/// that stops delivering, and the bench must end either way.
const KOMBU_LIMIT: Duration = Duration::from_secs(300);

/// Publishes (with confirms) and consumes `n` messages with kombu in a venv under
/// target/bench; returns msgs/s for both.
fn kombu(out_dir: &Path, n: u32) -> Result<BTreeMap<String, f64>, String> {
    let venv = out_dir.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let mut command = Command::new("python3");
        command.args(["-m", "venv"]).arg(&venv);
        let out =
            output_within(&mut command, KOMBU_LIMIT).map_err(|e| format!("python3 -m venv {e}"))?;
        if !out.status.success() {
            return Err("python3 -m venv failed".into());
        }
    }
    let mut command = Command::new(&python);
    command.args(["-m", "pip", "install", "-q", "kombu"]);
    let pip =
        output_within(&mut command, KOMBU_LIMIT).map_err(|e| format!("pip install kombu {e}"))?;
    if !pip.status.success() {
        return Err(format!(
            "pip install kombu failed: {}",
            String::from_utf8_lossy(&pip.stderr)
        ));
    }
    let script = out_dir.join("kombu_bench.py");
    std::fs::write(&script, KOMBU_SCRIPT).map_err(|e| e.to_string())?;
    let mut command = Command::new(&python);
    command.arg(&script).arg(n.to_string());
    let out = output_within(&mut command, KOMBU_LIMIT)?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut numbers = text
        .split_whitespace()
        .filter_map(|t| t.parse::<f64>().ok());
    let (Some(publish), Some(consume)) = (numbers.next(), numbers.next()) else {
        return Err(format!("unexpected kombu output: {text}"));
    };
    Ok(BTreeMap::from([
        ("kombu/publish".to_string(), publish),
        ("kombu/consume_ack".to_string(), consume),
    ]))
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!("{cores} cores, {cpu}")
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map_or_else(
        || "not measured".into(),
        |r| format!("{:.0}k/s", r / 1000.0),
    )
}

/// The figures of benchmarks measured in turns (two or more setups fed alternately,
/// so that this machine's drift does not decide their ratios), which benches write
/// under `target/bench/` as `in_turns-<bench>.json`:
/// `{"rounds": N, "rates": {"<id>": msg/s}}`, with `"cpu_us_per_message": {"<id>":
/// µs}` for the setups whose CPU the bench counted.
fn in_turns_files(out_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(out_dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("in_turns-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    files
}

/// The figures of one `in_turns-*.json`, by setup id.
#[derive(Default)]
struct InTurns {
    /// msg/s.
    rates: BTreeMap<String, f64>,
    /// The client process's CPU per message, in µs, for the setups whose bench
    /// counted it (`queue_testkit::bench::counting_cpu`).
    cpu_us_per_message: BTreeMap<String, f64>,
}

/// The figures of one `in_turns-*.json`; none if it cannot be read.
fn read_in_turns(path: &Path) -> InTurns {
    let Ok(text) = std::fs::read_to_string(path) else {
        return InTurns::default();
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(json) => json,
        Err(e) => {
            eprintln!("{}: {e}; its figures are left out", path.display());
            return InTurns::default();
        }
    };
    let section = |name: &str| {
        json[name]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(id, figure)| Some((id.clone(), figure.as_f64()?)))
            .collect()
    };
    InTurns {
        rates: section("rates"),
        cpu_us_per_message: section("cpu_us_per_message"),
    }
}

/// The CPU per message of the setups that counted it, in Markdown; empty if none did.
fn cpu_table(cpu_us_per_message: &BTreeMap<String, f64>) -> String {
    if cpu_us_per_message.is_empty() {
        return String::new();
    }
    let mut out = String::from("| setup (in turns) | client CPU per message |\n|---|---|\n");
    for (id, micros) in cpu_us_per_message {
        out.push_str(&format!("| {id} | {micros:.1} µs |\n"));
    }
    out
}

const CPU_INTRO: &str = "CPU time the whole client process used per message over each side's rounds (user and system, from `/proc`; the runtime's start and stop included; lower is better):";

/// One row of `target/bench/latency.json`, as queue-runtime's latency bench writes it,
/// with (for the runtime's rows on RabbitMQ) its p99 against raw lapin's at the same
/// rate.
#[derive(Serialize, Deserialize, Clone)]
struct LatencyRow {
    setup: String,
    rate: u64,
    count: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    #[serde(default)]
    p99_vs_raw_lapin: Option<f64>,
}

/// The setup whose p99 the runtime's rows on RabbitMQ are compared with.
const RAW_LAPIN: &str = "raw_lapin";

/// The runtime's setups on the same broker and protocol as [`RAW_LAPIN`]: the memory
/// setup is not compared with it, as it has no broker in its path.
const COMPARED_WITH_RAW_LAPIN: &[&str] = &["runtime_rabbitmq"];

/// What `--write-docs` puts above the latency table.
const LATENCY_INTRO: &str = "Latency from publish to handler start, open loop at fixed offered rates, measured from each message's scheduled send time (`cargo bench -p queue-runtime --bench latency`; lower is better):";

/// The latency bench's rows, or none if it did not write its file (it failed, or
/// never ran: `--report-only` on a fresh checkout).
fn read_latency(path: &Path) -> Vec<LatencyRow> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut rows: Vec<LatencyRow> = match serde_json::from_str(&text) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("{}: {e}; no latency table", path.display());
            return Vec::new();
        }
    };
    let raw: BTreeMap<u64, f64> = rows
        .iter()
        .filter(|r| r.setup == RAW_LAPIN)
        .map(|r| (r.rate, r.p99_us))
        .collect();
    for r in &mut rows {
        r.p99_vs_raw_lapin = COMPARED_WITH_RAW_LAPIN
            .contains(&r.setup.as_str())
            .then(|| raw.get(&r.rate))
            .flatten()
            .filter(|base| **base > 0.0)
            .map(|base| r.p99_us / base);
    }
    rows
}

/// What a setup of the latency bench is, for the table and the plot.
fn setup_label(setup: &str) -> &str {
    match setup {
        "runtime_memory" => "runtime, memory driver, no-op Lua, concurrency 16",
        "runtime_rabbitmq" => "runtime, RabbitMQ 0-9-1, no-op Lua, concurrency 16",
        "raw_lapin" => "raw lapin consumer on RabbitMQ, ack each",
        other => other,
    }
}

/// A latency in µs, as µs below a millisecond and as ms above.
fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

/// A grid line's label: 10^`decade` µs as `10 µs`, `1 ms`, `1 s`.
fn fmt_decade(decade: f64) -> String {
    let us = 10f64.powf(decade);
    if us >= 1e6 {
        format!("{} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{} ms", us / 1e3)
    } else {
        format!("{us} µs")
    }
}

/// The latency table, in Markdown.
fn latency_table(rows: &[LatencyRow]) -> String {
    let mut out = String::from(
        "| setup | rate | p50 | p99 | p99.9 | p99 vs raw lapin, same rate |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = r
            .p99_vs_raw_lapin
            .map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
        out.push_str(&format!(
            "| {} | {} msg/s | {} | {} | {} | {ratio} |\n",
            setup_label(&r.setup),
            r.rate,
            fmt_us(r.p50_us),
            fmt_us(r.p99_us),
            fmt_us(r.p999_us),
        ));
    }
    out
}

/// The side-by-side table, in Markdown.
fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| comparison | candidate | baseline | ratio | goal |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = r.ratio.map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
        let goal = match (r.goal, r.met) {
            (Some(g), Some(true)) => format!(">= {g}x: met"),
            (Some(g), Some(false)) => format!(">= {g}x: MISSED"),
            (Some(g), None) => format!(">= {g}x: not measured"),
            (None, _) => "-".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {ratio} | {goal} |\n",
            r.what,
            fmt_rate(r.candidate_msgs_per_s),
            fmt_rate(r.baseline_msgs_per_s)
        ));
    }
    out
}

/// The plot's columns: labels up to `LEFT`, bars `WIDTH` wide, then `RIGHT` for the
/// bars' values.
const LEFT: f64 = 430.0;
const WIDTH: f64 = 420.0;
const RIGHT: f64 = 80.0;

/// The ratio chart and, below it, the latency chart.
fn svg(rows: &[Row], latency: &[LatencyRow]) -> String {
    let (ratios, ratios_height) = ratio_chart(rows);
    let (latencies, latency_height) = latency_chart(latency, ratios_height);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">{ratios}{latencies}</svg>\n",
        LEFT + WIDTH + RIGHT,
        ratios_height + latency_height
    )
}

/// A horizontal bar chart of the ratios, with each goal marked; and its height.
fn ratio_chart(rows: &[Row]) -> (String, f64) {
    let measured: Vec<&Row> = rows.iter().filter(|r| r.ratio.is_some()).collect();
    let scale = measured
        .iter()
        .flat_map(|r| r.ratio.into_iter().chain(r.goal))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let (left, width, bar) = (LEFT, WIDTH, 26.0);
    let height = 40.0 + bar * measured.len() as f64 + 20.0;
    let mut s = String::new();
    s.push_str(r#"<text x="10" y="20" font-size="14">candidate / baseline, same run (goal marked in red)</text>"#);
    for (i, r) in measured.iter().enumerate() {
        let y = 36.0 + i as f64 * bar;
        let ratio = r.ratio.unwrap_or(0.0);
        let w = width * ratio / scale;
        let colour = match r.met {
            Some(false) => "#d9822b",
            _ => "#3b7dd8",
        };
        let label: String = r.what.chars().take(64).collect();
        s.push_str(&format!(
            r#"<text x="10" y="{}">{}</text>"#,
            y + 15.0,
            escape(&label)
        ));
        s.push_str(&format!(
            r#"<rect x="{left}" y="{y}" width="{w:.1}" height="{}" fill="{colour}"/>"#,
            bar - 6.0
        ));
        s.push_str(&format!(
            r#"<text x="{:.1}" y="{}">{ratio:.2}x</text>"#,
            left + w + 4.0,
            y + 15.0
        ));
        if let Some(goal) = r.goal {
            let gx = left + width * goal / scale;
            s.push_str(&format!(r#"<line x1="{gx:.1}" x2="{gx:.1}" y1="{y}" y2="{}" stroke="red" stroke-width="2"/>"#, y + bar - 6.0));
        }
    }
    (s, height)
}

/// Grouped horizontal bars of p50, p99 and p99.9 per setup and rate on a log scale,
/// starting at `top`; and its height (0 without results).
fn latency_chart(latency: &[LatencyRow], top: f64) -> (String, f64) {
    if latency.is_empty() {
        return (String::new(), 0.0);
    }
    // Whole decades around every value, so that the grid lines are 10 µs, 100 µs, ...
    let smallest = latency
        .iter()
        .map(|r| r.p50_us)
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let largest = latency
        .iter()
        .map(|r| r.p999_us.max(r.p99_us).max(r.p50_us))
        .fold(1.0_f64, f64::max);
    // At least a factor of 2 below the smallest value, so that its bar shows.
    let low = (smallest / 2.0).log10().floor();
    let high = largest.log10().ceil().max(low + 1.0);
    let x = |us: f64| LEFT + WIDTH * (us.max(1.0).log10() - low).max(0.0) / (high - low);
    let (bar, gap, group_gap) = (9.0, 2.0, 10.0);
    let group = 3.0 * (bar + gap) + group_gap;
    let first = top + 56.0;
    let bottom = first + group * latency.len() as f64;
    let mut s = format!(
        r#"<text x="10" y="{}" font-size="14">latency, publish to handler start, open loop (log scale; lower is better)</text>"#,
        top + 20.0
    );
    let series = [("p50", "#9cc3f0"), ("p99", "#3b7dd8"), ("p99.9", "#1d3f73")];
    for (i, (name, colour)) in series.iter().enumerate() {
        let lx = LEFT + i as f64 * 70.0;
        s.push_str(&format!(
            r#"<rect x="{lx}" y="{}" width="12" height="10" fill="{colour}"/><text x="{}" y="{}">{name}</text>"#,
            top + 30.0,
            lx + 16.0,
            top + 39.0
        ));
    }
    let mut decade = low;
    while decade <= high {
        let gx = x(10f64.powf(decade));
        s.push_str(&format!(
            r##"<line x1="{gx:.1}" x2="{gx:.1}" y1="{}" y2="{bottom}" stroke="#ccc"/><text x="{gx:.1}" y="{}" text-anchor="middle" font-size="10">{}</text>"##,
            first - 4.0,
            bottom + 14.0,
            fmt_decade(decade)
        ));
        decade += 1.0;
    }
    for (i, r) in latency.iter().enumerate() {
        let y = first + i as f64 * group;
        // The rate first: a long label loses its end.
        let label: String = format!("{}/s: {}", r.rate, setup_label(&r.setup))
            .chars()
            .take(64)
            .collect();
        s.push_str(&format!(
            r#"<text x="10" y="{}">{}</text>"#,
            y + 1.5 * (bar + gap) + 4.0,
            escape(&label)
        ));
        for (j, ((_, colour), us)) in series
            .iter()
            .zip([r.p50_us, r.p99_us, r.p999_us])
            .enumerate()
        {
            let by = y + j as f64 * (bar + gap);
            let w = x(us) - LEFT;
            s.push_str(&format!(
                r#"<rect x="{LEFT}" y="{by}" width="{w:.1}" height="{bar}" fill="{colour}"/><text x="{:.1}" y="{}" font-size="10">{}</text>"#,
                LEFT + w + 4.0,
                by + bar - 1.0,
                fmt_us(us)
            ));
        }
    }
    (s, bottom - top + 24.0)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_run_reads_only_what_it_measured() {
        let root = std::env::temp_dir().join(format!("xtask-criterion-{}", std::process::id()));
        let new = root.join("group").join("bench").join("new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::write(
            new.join("benchmark.json"),
            r#"{"full_id": "group/bench", "throughput": {"Elements": 1000}}"#,
        )
        .unwrap();
        std::fs::write(
            new.join("estimates.json"),
            r#"{"mean": {"point_estimate": 1000000.0}}"#,
        )
        .unwrap();
        let all = read_criterion(&root, None);
        assert_eq!(all.get("group/bench").copied(), Some(1_000_000.0));
        // A run that started after these were written (a bench that failed or was
        // stopped before measuring) must not report them.
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        assert!(read_criterion(&root, Some(later)).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_rebuilt_report_names_the_run_it_rebuilds_not_the_machine_now() {
        let dir = std::env::temp_dir().join(format!("xtask-rebuilt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("results.json"), r#"{"quick": true, "load": 2.28}"#).unwrap();
        let rebuilt = measured_run(&dir, false, true);
        let measured = measured_run(&dir, false, false);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(rebuilt, (true, Some(2.28)));
        assert!(!measured.0, "a run says how it was itself run");
    }

    #[test]
    fn rows_measured_in_turns_read_the_files_their_benches_wrote() {
        let dir = std::env::temp_dir().join(format!("xtask-in-turns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(in_turns_files(&dir).is_empty(), "no bench ran");
        let path = dir.join("in_turns-end_to_end.json");
        std::fs::write(
            &path,
            r#"{"rounds": 80, "rates": {"end_to_end_in_turns/lua_noop_concurrency_16": 500000.0}, "cpu_us_per_message": {"end_to_end_in_turns/lua_noop_concurrency_16": 2.5}}"#,
        )
        .unwrap();
        std::fs::write(dir.join("latency.json"), "[]").unwrap();
        let files = in_turns_files(&dir);
        let figures = read_in_turns(&path);
        std::fs::write(&path, "{\"rates\": ").unwrap();
        let cut_short = read_in_turns(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(files, vec![path]);
        assert_eq!(
            figures
                .rates
                .get("end_to_end_in_turns/lua_noop_concurrency_16"),
            Some(&500_000.0)
        );
        assert!(
            cpu_table(&figures.cpu_us_per_message)
                .contains("| end_to_end_in_turns/lua_noop_concurrency_16 | 2.5 µs |")
        );
        assert!(
            cut_short.rates.is_empty(),
            "a file cut short gives no figures"
        );
        assert!(cpu_table(&cut_short.cpu_us_per_message).is_empty());
    }

    #[test]
    fn a_rebuilt_table_reads_from_when_the_last_run_started() {
        let dir = std::env::temp_dir().join(format!("xtask-last-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(last_run_started(&dir), None, "no run yet: every figure");
        std::fs::write(
            dir.join("results.json"),
            r#"{"unix_time": 1700000900, "started_unix_time": 1700000000}"#,
        )
        .unwrap();
        let started = last_run_started(&dir);
        std::fs::write(dir.join("results.json"), r#"{"unix_time": 1700000900}"#).unwrap();
        let unrecorded = last_run_started(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            started,
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(unrecorded, None, "a run that did not record its start");
    }

    #[test]
    fn the_runtime_on_rabbitmq_is_compared_with_raw_lapin_at_its_rate() {
        let dir = std::env::temp_dir().join(format!("xtask-latency-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("latency.json");
        let row = |setup: &str, rate: u64, p99: f64| {
            serde_json::json!({"setup": setup, "rate": rate, "count": 10, "p50_us": 1.0,
                "p99_us": p99, "p999_us": p99, "max_us": p99})
        };
        let rows = serde_json::json!([
            row("runtime_memory", 2000, 50.0),
            row("runtime_rabbitmq", 2000, 300.0),
            row("raw_lapin", 2000, 200.0),
            row("runtime_rabbitmq", 10000, 300.0),
        ]);
        std::fs::write(&path, rows.to_string()).expect("write");
        let read = read_latency(&path);
        let _ = std::fs::remove_dir_all(&dir);
        let ratios: Vec<Option<f64>> = read.iter().map(|r| r.p99_vs_raw_lapin).collect();
        assert_eq!(ratios, [None, Some(1.5), None, None]);
        assert!(latency_table(&read).contains("| 1.50x |"));
        assert!(svg(&[], &read).contains("p99.9"));
    }
}
