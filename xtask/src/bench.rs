//! `cargo xtask bench`: runs every criterion bench (each measures its candidate and its
//! baseline in the same run), a kombu publish/consume run against the same RabbitMQ, and
//! writes the side-by-side table to stdout, `target/bench/results.json` (and a copy
//! per run under `target/bench/runs/`, for `--compare`) and `target/bench/results.svg`;
//! `--write-docs` puts the table into docs/performance.md, which is never edited by
//! hand between its markers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// One benchmark: which package runs it.
struct Suite {
    package: &'static str,
    bench: &'static str,
    needs_rabbitmq: bool,
}

const SUITES: &[Suite] = &[
    Suite {
        package: "queue-core",
        bench: "memory",
        needs_rabbitmq: false,
    },
    Suite {
        package: "queue-lua",
        bench: "lua",
        needs_rabbitmq: false,
    },
    Suite {
        package: "queue-runtime",
        bench: "end_to_end",
        needs_rabbitmq: false,
    },
    Suite {
        package: "queue-amqp091",
        bench: "publish_consume",
        needs_rabbitmq: true,
    },
    Suite {
        package: "queue-runtime",
        bench: "rabbitmq",
        needs_rabbitmq: true,
    },
    Suite {
        package: "queue-amqp10",
        bench: "send",
        needs_rabbitmq: true,
    },
];

/// A comparison: candidate vs baseline (criterion full ids), and the goal ratio.
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
        what: "runtime, no-op Lua handler, concurrency 16 vs no-op Rust consumer (memory)",
        candidate: "end_to_end/lua_noop_concurrency_16",
        baseline: "end_to_end/baseline_rust_noop_consumer",
        goal: 0.0,
    },
    Comparison {
        what: "runtime, no-op Lua handler, concurrency 1 vs no-op Rust consumer (memory)",
        candidate: "end_to_end/lua_noop_concurrency_1",
        baseline: "end_to_end/baseline_rust_noop_consumer",
        goal: 0.0,
    },
    Comparison {
        what: "runtime, no-op Lua handler, concurrency 256 vs no-op Rust consumer (memory)",
        candidate: "end_to_end/lua_noop_concurrency_256",
        baseline: "end_to_end/baseline_rust_noop_consumer",
        goal: 0.0,
    },
    Comparison {
        what: "runtime on RabbitMQ, no-op Lua handler vs raw lapin consume+ack",
        candidate: "rabbitmq_consume/runtime_noop_lua",
        baseline: "rabbitmq_consume/raw_lapin",
        goal: 0.0,
    },
    Comparison {
        what: "Lua publish with confirms, 16 instances vs raw lapin, 16 in flight",
        candidate: "rabbitmq_publish/lua_publish_16_instances",
        baseline: "rabbitmq_publish/raw_lapin_16_in_flight",
        goal: 0.0,
    },
    Comparison {
        what: "AMQP 0-9-1 confirmed publish vs raw lapin",
        candidate: "amqp091/publish_100k/driver",
        baseline: "amqp091/publish_100k/raw_lapin",
        goal: 0.9,
    },
    Comparison {
        what: "AMQP 0-9-1 consume+ack vs raw lapin",
        candidate: "amqp091/consume_ack_100k/driver",
        baseline: "amqp091/consume_ack_100k/raw_lapin",
        goal: 0.85,
    },
    Comparison {
        what: "AMQP 1.0 send vs raw fe2o3-amqp",
        candidate: "amqp10_send_50k/driver",
        baseline: "amqp10_send_50k/raw_fe2o3",
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
const TABLE_START: &str = "<!-- bench-table: generated by `cargo xtask bench --write-docs` -->";
const TABLE_END: &str = "<!-- bench-table: end -->";

/// Runs everything; `Ok(false)` if a bench failed to run.
pub fn run(options: Options) -> Result<bool, String> {
    let Options {
        quick, report_only, ..
    } = options;
    let out_dir = PathBuf::from("target/bench");
    std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
    let rabbit = std::net::TcpStream::connect("127.0.0.1:5672").is_ok();
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
    for suite in SUITES.iter().filter(|_| !report_only) {
        progress.set_message(format!(
            "cargo bench -p {} --bench {}",
            suite.package, suite.bench
        ));
        if suite.needs_rabbitmq && !rabbit {
            progress.println(format!(
                "skipped {}: RabbitMQ is not reachable on 127.0.0.1:5672",
                suite.bench
            ));
            progress.inc(1);
            continue;
        }
        let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        command.args(["bench", "-p", suite.package, "--bench", suite.bench, "--"]);
        if quick {
            command.args([
                "--warm-up-time",
                "1",
                "--measurement-time",
                "2",
                "--sample-size",
                "10",
            ]);
        }
        let output = command.output().map_err(|e| e.to_string())?;
        if !output.status.success() {
            all_ok = false;
            progress.println(format!(
                "bench {} failed:\n{}",
                suite.bench,
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        for line in String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|l| l.starts_with("rss_"))
        {
            progress.println(line);
            std::fs::write(out_dir.join("rss.txt"), line).map_err(|e| e.to_string())?;
        }
        progress.inc(1);
    }
    progress.set_message("kombu (Celery's transport) against the same RabbitMQ");
    let mut results = read_criterion(Path::new("target/criterion"));
    if rabbit {
        match kombu(&out_dir, if quick { 10_000 } else { 50_000 }) {
            Ok(k) => results.extend(k),
            Err(e) => progress.println(format!("kombu skipped: {e}")),
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
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let json = serde_json::json!({
        "machine": machine(),
        "load": load_average(),
        "unix_time": when,
        "quick": quick,
        "rows": rows,
        "all": results,
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("results.json"), &text).map_err(|e| e.to_string())?;
    let runs = out_dir.join("runs");
    std::fs::create_dir_all(&runs).map_err(|e| e.to_string())?;
    let this_run = runs.join(format!("{when}.json"));
    std::fs::write(&this_run, &text).map_err(|e| e.to_string())?;
    std::fs::write(out_dir.join("results.svg"), svg(&rows)).map_err(|e| e.to_string())?;
    println!(
        "wrote target/bench/results.json ({}) and target/bench/results.svg",
        this_run.display()
    );
    if let Some(old) = &options.compare {
        print!("{}", compared(&rows, old)?);
    }
    if options.write_docs {
        write_docs(&table, &json)?;
        println!("wrote the table into {DOCS_PAGE}");
    }
    Ok(all_ok)
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

/// Replaces the table between the markers of docs/performance.md with this run's,
/// with the machine and the command that made it.
fn write_docs(table: &str, json: &serde_json::Value) -> Result<(), String> {
    let page = std::fs::read_to_string(DOCS_PAGE).map_err(|e| format!("{DOCS_PAGE}: {e}"))?;
    let (before, rest) = page
        .split_once(TABLE_START)
        .ok_or_else(|| format!("{DOCS_PAGE} has no line {TABLE_START}"))?;
    let (_, after) = rest
        .split_once(TABLE_END)
        .ok_or_else(|| format!("{DOCS_PAGE} has no line {TABLE_END}"))?;
    let command = if json["quick"] == true {
        "cargo xtask bench --quick --write-docs"
    } else {
        "cargo xtask bench --write-docs"
    };
    let load = json["load"]
        .as_f64()
        .map_or_else(|| "unknown".into(), |l| format!("{l:.2}"));
    let generated = format!(
        "{TABLE_START}\n\nMade by `{command}` on {} (load average {load} at the end of the run).\n\n{table}\n{TABLE_END}",
        json["machine"].as_str().unwrap_or("an unknown machine"),
    );
    std::fs::write(DOCS_PAGE, format!("{before}{generated}{after}"))
        .map_err(|e| format!("{DOCS_PAGE}: {e}"))
}

/// Messages per second of every criterion benchmark that declared an element
/// throughput, by full id.
fn read_criterion(root: &Path) -> BTreeMap<String, f64> {
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

/// Publishes (with confirms) and consumes `n` messages with kombu in a venv under
/// target/bench; returns msgs/s for both.
fn kombu(out_dir: &Path, n: u32) -> Result<BTreeMap<String, f64>, String> {
    let venv = out_dir.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("python3 -m venv failed".into());
        }
    }
    let pip = Command::new(&python)
        .args(["-m", "pip", "install", "-q", "kombu"])
        .output()
        .map_err(|e| e.to_string())?;
    if !pip.status.success() {
        return Err(format!(
            "pip install kombu failed: {}",
            String::from_utf8_lossy(&pip.stderr)
        ));
    }
    let script = out_dir.join("kombu_bench.py");
    std::fs::write(&script, KOMBU_SCRIPT).map_err(|e| e.to_string())?;
    let out = Command::new(&python)
        .arg(&script)
        .arg(n.to_string())
        .output()
        .map_err(|e| e.to_string())?;
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

/// A horizontal bar chart of the ratios, with each goal marked.
fn svg(rows: &[Row]) -> String {
    let measured: Vec<&Row> = rows.iter().filter(|r| r.ratio.is_some()).collect();
    let scale = measured
        .iter()
        .flat_map(|r| r.ratio.into_iter().chain(r.goal))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let (left, width, bar) = (430.0, 420.0, 26.0);
    let height = 40.0 + bar * measured.len() as f64 + 20.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="12">"#,
        left + width + 80.0
    );
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
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
