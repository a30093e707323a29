//! `cargo xtask soak`: pushes many messages through the runtime on the memory driver
//! and samples its RSS; the run passes when RSS after warm-up grows by at most 10%.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const APP: &str = r#"namespace: soak
entries:
  - name: q
    kind: queue.queue
    # Small, so the producers' backlog is full within the warm-up and any growth
    # after it is the runtime's, not the queue's contents.
    max_length: 1000
  - name: worker
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
"#;

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

/// Runs the soak; `Ok(false)` when RSS grew more than 10% after warm-up.
pub fn run(messages: u64) -> Result<bool, String> {
    let dir = std::path::Path::new("target/soak");
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("app.yaml"), APP).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("soak.lua"), lua(messages)).map_err(|e| e.to_string())?;
    let build = Command::new("cargo")
        .args(["build", "--release", "-p", "queue-runtime"])
        .status()
        .map_err(|e| e.to_string())?;
    if !build.success() {
        return Err("cannot build the runtime".into());
    }
    let started = Instant::now();
    let mut child = Command::new("target/release/queue-runtime")
        .args(["run", "--exit-when-idle", "target/soak/app.yaml"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut samples = Vec::new();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if let Some(kib) = rss_kib(child.id()) {
            samples.push((started.elapsed().as_secs_f64(), kib));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let elapsed = started.elapsed().as_secs_f64();
    let summary = String::from_utf8_lossy(&output.stdout).to_string();
    let warm = samples.len() / 5;
    let after_warmup = &samples[warm.min(samples.len())..];
    let first = after_warmup.first().map_or(0, |s| s.1);
    let peak = after_warmup.iter().map(|s| s.1).max().unwrap_or(0);
    let growth = if first > 0 {
        (peak as f64 - first as f64) / first as f64
    } else {
        0.0
    };
    let mut report = std::fs::File::create(dir.join("rss.csv")).map_err(|e| e.to_string())?;
    for (t, kib) in &samples {
        writeln!(report, "{t:.2},{kib}").map_err(|e| e.to_string())?;
    }
    println!("{summary}");
    println!(
        "soak: {messages} messages in {elapsed:.1}s ({:.0} msg/s); RSS after warm-up {:.1} MiB, peak {:.1} MiB, growth {:.1}% (samples in target/soak/rss.csv)",
        messages as f64 / elapsed,
        first as f64 / 1024.0,
        peak as f64 / 1024.0,
        growth * 100.0
    );
    Ok(output.status.success() && growth <= 0.10)
}
