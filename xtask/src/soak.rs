//! `cargo xtask soak`: pushes many messages through the release runtime (4 Lua
//! producers, a consumer at concurrency 16) on one driver and samples the runtime's
//! RSS; the run passes when RSS after warm-up (the first fifth of the samples, and at
//! least the first 3 seconds) grows by at most 10%.
//!
//! - `memory`: the embedded driver; `run --exit-when-idle` ends the run.
//! - `amqp091`: RabbitMQ through AMQP 0-9-1; `--exit-when-idle` works from the
//!   broker's counts.
//! - `amqp10`: RabbitMQ 3.x through its AMQP 1.0 plugin, which reports no queue
//!   counts, so `--exit-when-idle` would only see the runtime's own work and could
//!   stop with messages still in the broker. The run is ended instead by SIGTERM once
//!   `/metrics` shows every message acked.
//!
//! Broker runs use a fresh non-durable queue on `--broker` (loopback only) and delete
//! it (and its dead-letter queue) afterwards with `rabbitmqctl` where that is available.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::ValueEnum;

/// Which driver carries the soak.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum SoakDriver {
    /// The embedded memory driver.
    Memory,
    /// RabbitMQ over AMQP 0-9-1.
    Amqp091,
    /// RabbitMQ over AMQP 1.0 (profile rabbitmq-v1).
    Amqp10,
}

impl SoakDriver {
    /// How many messages a soak on this driver pushes unless told otherwise.
    pub fn default_messages(self) -> u64 {
        match self {
            SoakDriver::Memory => 3_000_000,
            SoakDriver::Amqp091 | SoakDriver::Amqp10 => 1_000_000,
        }
    }

    fn name(self) -> &'static str {
        match self {
            SoakDriver::Memory => "memory",
            SoakDriver::Amqp091 => "amqp091",
            SoakDriver::Amqp10 => "amqp10",
        }
    }
}

/// The configuration for one driver; `queue` is the broker-side queue name.
fn app(driver: SoakDriver, host_port: &str, queue: &str) -> String {
    let (driver_entry, queue_entry) = match driver {
        // Small, so the producers' backlog is full within the warm-up and any growth
        // after it is the runtime's, not the queue's contents.
        SoakDriver::Memory => (String::new(), "    max_length: 1000\n".to_string()),
        // On a broker the backlog lives in the broker, not in the runtime, so it
        // needs no bound here (RabbitMQ's reject-publish would only make the
        // producers fail and retry).
        SoakDriver::Amqp091 => (
            format!(
                "  - name: rabbit\n    kind: queue.driver.amqp\n    url: amqp://guest:guest@{host_port}/%2f\n"
            ),
            format!("    queue_name: {queue}\n    durable: false\n"),
        ),
        SoakDriver::Amqp10 => (
            format!(
                "  - name: rabbit\n    kind: queue.driver.amqp10\n    url: amqp://guest:guest@{host_port}\n    profile: rabbitmq-v1\n"
            ),
            format!("    queue_name: {queue}\n    durable: false\n"),
        ),
    };
    format!(
        r#"namespace: soak
entries:
{driver_entry}  - name: q
    kind: queue.queue
{queue_entry}  - name: worker
    kind: queue.consumer
    queue: q
    source: soak.lua
    method: handle
    concurrency: 16
    prefetch: 256
  - name: producer
    kind: process.lua
    source: soak.lua
    method: produce
    instances: 4
"#
    )
}

fn lua(messages: u64) -> String {
    format!(
        r#"
function produce(instance)
  for i = 1, {per} do
    local ok, err = queue.publish("soak:q", {{ n = i, instance = instance, text = "some payload text" }}, {{ correlation_id = "c" .. i }})
    if err then error(err) end
  end
end

function handle(payload)
  local msg = queue.message()
  if msg:id() == nil then return false end
end
"#,
        per = messages / 4
    )
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// `queue_acked_total` for the soak queue from the runtime's `/metrics`, if it answers.
fn acked(metrics_port: u16) -> Option<u64> {
    let mut stream = TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response
        .lines()
        .find(|l| l.starts_with("queue_acked_total{queue=\"soak:q\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

fn signal(child: &Child, name: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .map_err(|e| format!("kill: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{name} failed: {status}"))
    }
}

/// Runs the soak; `Ok(false)` when the run failed or RSS grew more than 10% after
/// warm-up.
pub fn run(messages: u64, driver: SoakDriver, broker: &str) -> Result<bool, String> {
    if driver != SoakDriver::Memory && !broker.starts_with("127.0.0.1:") {
        return Err(format!(
            "--broker {broker}: the soak only talks to a broker on 127.0.0.1"
        ));
    }
    let dir = std::path::Path::new("target/soak");
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let queue = format!("soak-{}-{}", driver.name(), std::process::id());
    std::fs::write(dir.join("app.yaml"), app(driver, broker, &queue)).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("soak.lua"), lua(messages)).map_err(|e| e.to_string())?;
    let build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "queue-runtime"])
        .status()
        .map_err(|e| e.to_string())?;
    if !build.success() {
        return Err("cannot build the runtime".into());
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let binary = std::path::Path::new(&target).join("release/queue-runtime");

    let mut args = vec!["run".to_string()];
    let metrics_port = if driver == SoakDriver::Amqp10 {
        let port = queue_fixtures::free_port();
        args.extend(["--metrics-addr".into(), format!("127.0.0.1:{port}")]);
        Some(port)
    } else {
        args.push("--exit-when-idle".into());
        None
    };
    args.push("target/soak/app.yaml".into());
    let log = std::fs::File::create(dir.join("runtime.log")).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = Command::new(&binary)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    // Read all along: the runtime blocks on a full pipe (64 KiB) nobody reads, and the
    // soak would measure a stalled runtime.
    let mut stdout = child
        .stdout
        .take()
        .ok_or("the runtime's stdout is not piped")?;
    let summary = std::thread::spawn(move || {
        let mut text = Vec::new();
        stdout.read_to_end(&mut text).map(|_| text)
    });
    let mut samples = Vec::new();
    let mut signalled = false;
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if let Some(kib) = rss_kib(child.id()) {
            samples.push((started.elapsed().as_secs_f64(), kib));
        }
        if let Some(port) = metrics_port
            && !signalled
            && acked(port).is_some_and(|n| n >= messages)
        {
            signal(&child, "TERM")?;
            signalled = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let elapsed = started.elapsed().as_secs_f64();
    let summary = summary
        .join()
        .map_err(|_| "reading the runtime's output panicked".to_string())?
        .map_err(|e| format!("reading the runtime's output: {e}"))?;
    let summary = String::from_utf8_lossy(&summary).to_string();
    if driver != SoakDriver::Memory {
        // The queue and the dead-letter queue the runtime declares next to it.
        delete_queue(&queue);
        delete_queue(&format!("{queue}.dlq"));
    }

    const GROWTH_LIMIT: f64 = 0.10;
    let after_warmup = after_warm_up(&samples);
    let first = after_warmup.first().map_or(0, |s| s.1);
    let peak = after_warmup.iter().map(|s| s.1).max().unwrap_or(0);
    let last = after_warmup.last().map_or(0, |s| s.1);
    let growth = if first > 0 {
        (peak as f64 - first as f64) / first as f64
    } else {
        0.0
    };
    let csv = dir.join(format!("rss-{}.csv", driver.name()));
    let mut report = std::fs::File::create(&csv).map_err(|e| e.to_string())?;
    for (t, kib) in &samples {
        writeln!(report, "{t:.2},{kib}").map_err(|e| e.to_string())?;
    }
    print!("{summary}");
    println!(
        "soak ({}): {messages} messages in {elapsed:.1}s ({:.0} msg/s); RSS after warm-up {:.1} MiB, peak {:.1} MiB, at the end {:.1} MiB, growth {:.1}% (samples in {})",
        driver.name(),
        messages as f64 / elapsed,
        first as f64 / 1024.0,
        peak as f64 / 1024.0,
        last as f64 / 1024.0,
        growth * 100.0,
        csv.display()
    );
    if !status.success() {
        eprintln!("soak: the runtime exited with {status} (log in target/soak/runtime.log)");
    }
    if metrics_port.is_some() && !signalled {
        eprintln!("soak: the runtime stopped before every message was acked");
    }
    // Too few samples to see growth is a failed soak, not a flat one.
    let measured = after_warmup.len() >= 5 && first > 0;
    if !measured {
        eprintln!(
            "soak: only {} RSS samples after warm-up: too few to measure growth",
            after_warmup.len()
        );
    }
    if growth > GROWTH_LIMIT {
        eprintln!(
            "soak: RSS grew {:.1}% after warm-up, over the limit of {:.0}%",
            growth * 100.0,
            GROWTH_LIMIT * 100.0
        );
    }
    let complete = metrics_port.is_none() || signalled;
    Ok(status.success() && complete && measured && growth <= GROWTH_LIMIT)
}

/// Best effort: the soak's queue is empty and non-durable, but should not linger on a
/// shared broker. Needs `rabbitmqctl` (and the rights to use it).
fn delete_queue(queue: &str) {
    let deleted = Command::new("rabbitmqctl")
        .args(["-q", "delete_queue", queue])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !deleted {
        println!("soak: could not delete queue {queue} with rabbitmqctl; delete it by hand");
    }
}

/// The RSS samples (seconds since start, KiB) after the warm-up: the first fifth of
/// the samples, and at least the first 3 seconds. RSS climbs into its band in about
/// the first two seconds (mimalloc's pages, the producers' backlog), and a fast run's
/// first fifth can end before that.
fn after_warm_up(samples: &[(f64, u64)]) -> &[(f64, u64)] {
    const MIN_WARM_UP_SECS: f64 = 3.0;
    let warm = samples
        .iter()
        .take_while(|(t, _)| *t < MIN_WARM_UP_SECS)
        .count()
        .max(samples.len() / 5);
    &samples[warm.min(samples.len())..]
}

#[cfg(test)]
mod tests {
    use super::after_warm_up;

    fn every_quarter_second(seconds: f64) -> Vec<(f64, u64)> {
        (0..(seconds * 4.0) as u64)
            .map(|i| (i as f64 / 4.0, i))
            .collect()
    }

    #[test]
    fn a_short_run_skips_its_first_three_seconds() {
        let samples = every_quarter_second(5.0);
        assert_eq!(after_warm_up(&samples).first().map(|s| s.0), Some(3.0));
    }

    #[test]
    fn a_long_run_skips_its_first_fifth() {
        let samples = every_quarter_second(40.0);
        assert_eq!(after_warm_up(&samples).first().map(|s| s.0), Some(8.0));
    }
}
