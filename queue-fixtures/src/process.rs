//! Commands run to their end within a limit: a test, a fixture or `cargo xtask` that
//! runs a tool (`rabbitmqctl`, `openssl`, a Python client, a bench) never waits on it
//! for ever, and a tool killed at its limit takes every process it started with it.

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a tool a test or fixture runs may take (`rabbitmqctl` on a loaded
/// machine, a Python client publishing its messages) before it is killed and the
/// test fails: far past what any takes when things work, short of a hung test run.
pub const TOOL_LIMIT: Duration = Duration::from_secs(180);

/// Runs `command` to its end and returns what it wrote, or kills it once `limit` has
/// passed and says so (`did not finish in N s`, then the last lines it wrote to stderr).
///
/// The command is killed with every process it started: a `cargo bench` killed alone
/// would leave the bench binary it started spinning, a `rabbitmqctl` the Erlang VM it
/// started. (It stays in its caller's process group, so that Ctrl-C at the terminal
/// still stops it.)
pub fn output_within(command: &mut Command, limit: Duration) -> Result<Output, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Both pipes are read while the child runs: one that writes more than a pipe
    // holds would otherwise block and never exit.
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    // A grandchild that inherited a pipe could keep it open after the child exited:
    // wait for the rest of the output a little, not for ever.
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default()
    };
    if !wait_or_kill(&mut child, limit) {
        let written = collect(stderr);
        return Err(format!(
            "did not finish in {} s{}",
            limit.as_secs(),
            last_lines(&written, 20)
        ));
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Waits up to `limit` for `child` to end; past it (or if it cannot be waited for),
/// kills it with every process it started. Whether it ended by itself.
pub fn wait_or_kill(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {
                kill_with_descendants(child);
                return false;
            }
        }
    }
}

/// Kills `child` and every process it started, found through `/proc` before any is
/// killed (a killed parent's children are handed to init, and the trail is lost);
/// reaps `child`, and returns once the others are gone too (or after 5 s), so that
/// the next suite does not share the machine with what is left of this one.
fn kill_with_descendants(child: &mut Child) {
    let doomed = descendants(child.id());
    let pids: Vec<String> = std::iter::once(child.id())
        .chain(doomed.iter().copied())
        .map(|pid| pid.to_string())
        .collect();
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg("--")
        .args(&pids)
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
    // SIGKILL takes effect when the process next runs, which on a busy machine is
    // not at once. Nothing signals the end of a process that is not our child, so
    // its state is looked at until it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while doomed.iter().any(|&pid| running(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether process `pid` exists and has not ended (a zombie has ended; init may be
/// slow to reap it).
pub fn running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|stat| stat.state != 'Z')
}

/// What `/proc/<pid>/stat` says of a process that the benches' kill needs.
struct ProcStat {
    /// `R`, `S`, `Z` (ended, not yet reaped)...
    state: char,
    parent: u32,
}

/// Reads `/proc/<pid>/stat` (`pid (comm) state ppid ...`; comm may hold spaces and
/// parentheses, hence the split at the last `)`); `None` once the process is gone.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some(ProcStat { state, parent })
}

/// The processes below `root` in the process tree, from `/proc/<pid>/stat`.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = proc_stat(pid) {
            children.entry(stat.parent).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut next = vec![root];
    while let Some(pid) = next.pop() {
        for &kid in children.get(&pid).into_iter().flatten() {
            found.push(kid);
            next.push(kid);
        }
    }
    found
}

/// The last `n` lines of `bytes`, each on a line of its own after a newline; empty
/// when there are none.
pub fn last_lines(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|line| format!("\n{line}"))
        .collect()
}

/// Reads `pipe` to its end on a thread of its own; the bytes arrive on the channel.
fn read_in_background(
    pipe: Option<impl Read + Send + 'static>,
) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_ends_in_time_gives_its_output() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2"]);
        let out = output_within(&mut command, Duration::from_secs(30)).expect("ran");
        assert!(out.status.success());
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn a_command_past_its_limit_is_killed_and_reported() {
        let started = Instant::now();
        let mut command = Command::new("sleep");
        command.arg("30");
        let err = output_within(&mut command, Duration::from_secs(1)).expect_err("killed");
        assert_eq!(err, "did not finish in 1 s");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_command_past_its_limit_is_killed_with_what_it_started() {
        let dir = std::env::temp_dir().join(format!("xtask-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pid_file = dir.join("grandchild.pid");
        // As `cargo bench` starts the bench binary: a child that outlives its parent's
        // kill unless the whole group goes.
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!(
                "sleep 300 & echo $! > {}; echo started >&2; wait",
                pid_file.display()
            ),
        ]);
        let err = output_within(&mut command, Duration::from_secs(1)).expect_err("killed");
        assert_eq!(err, "did not finish in 1 s\nstarted");
        let grandchild = std::fs::read_to_string(&pid_file).expect("pid written");
        let grandchild: u32 = grandchild.trim().parse().expect("a pid");
        let outlived = running(grandchild);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!outlived, "the grandchild {grandchild} outlived the limit");
    }
}
