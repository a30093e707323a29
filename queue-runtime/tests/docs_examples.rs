//! Every YAML, command and Rust example of the manual (docs/**/*.md and README.md) is
//! executed, so an example that stops working fails the build. The Lua examples run in
//! queue-lua's `docs_examples` test; the block scanner and the directive syntax are
//! `queue_lua::examples`'.
//!
//! How a page's blocks are treated (a directive is `<!-- example: ... -->` on the line
//! right before the fence; a ```` ```text ```` block right after a block is what it must
//! print):
//!
//! - ```` ```yaml ````: must be a complete configuration that `queue-runtime check`
//!   accepts, unless marked:
//!   - `file=NAME`: also the file `NAME` of the page's session (see below);
//!   - `fragment of=NAME`: a list of entries spliced into the page's `file=NAME`
//!     configuration (replacing the entries with the same name or id), then checked;
//!   - `error` (optionally `contains="TEXT"`): `check` must refuse it (with TEXT);
//!   - `env=VAR=value` (repeatable): environment for `${VAR}`.
//!
//!   A block that is only `{{#include path}}` checks that file where it is.
//! - ```` ```lua ```` marked `file=NAME`: a file of the page's session; some YAML block
//!   of the page must name it.
//! - ```` ```sh ```` marked `run` (optionally `broker=rabbitmq` or `broker=artemis`,
//!   `env=VAR=value`, `until="TEXT"`): each
//!   line is run: `queue-runtime ARGS` in the page's session directory (where its
//!   `file=` blocks are), `cargo run [--release] -p queue-runtime -- ARGS` at the
//!   repository root. Each must succeed; the text block after it must match their
//!   output. `until="TEXT"` (a block of one command) sends it SIGINT, as Ctrl-C would,
//!   once it prints a line containing TEXT: for a consumer that runs until stopped.
//!   `broker=` blocks need that broker's shared instance (RabbitMQ on 127.0.0.1:5672,
//!   Artemis on 127.0.0.1:6672) and run in [`the_manuals_broker_commands_run`], which
//!   deletes the broker queues of the page's configurations before and after.
//! - ```` ```rust ````: must be `{{#include}}` of a file under a crate's `examples/`,
//!   which `cargo test` builds (and runs, where the crate says `test = true`).
//!
//! Expected output: each line must appear in the output, in order (other lines may come
//! between); `...` in a line matches any text; lines starting with `$ ` (the command as
//! typed) are not matched but move on to the next command's output.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use queue_lua::examples::{self, Block};
use support::*;

/// One page, its blocks and its session directory (its `file=` blocks, written out).
struct Page {
    name: String,
    path: PathBuf,
    blocks: Vec<Block>,
    /// `file=` name -> (fence line, text, language).
    files: BTreeMap<String, (usize, String, String)>,
    session: tempfile::TempDir,
}

impl Page {
    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.name)
    }
}

/// Reads every page; a page whose blocks cannot be read is a failure, not a skip.
fn pages(failures: &mut Vec<String>) -> Vec<Page> {
    let root = workspace_root();
    let mut pages = Vec::new();
    for path in examples::pages(&root) {
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&path).expect("a page");
        let blocks = match examples::blocks(&text) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let mut page = Page {
            name,
            path,
            blocks,
            files: BTreeMap::new(),
            session: tempfile::tempdir().expect("temp dir"),
        };
        for block in &page.blocks {
            let Some(file) = block.directive.get("file") else {
                continue;
            };
            if block.lang != "yaml" && block.lang != "lua" {
                failures.push(format!(
                    "{}: `file=` is for yaml and lua blocks",
                    page.at(block.line)
                ));
            } else if let Some((first, _, _)) = page.files.get(file) {
                failures.push(format!(
                    "{}: file={file} is already the block at line {first}",
                    page.at(block.line)
                ));
            } else {
                std::fs::write(page.session.path().join(file), &block.code).expect("write");
                page.files.insert(
                    file.to_string(),
                    (block.line, block.code.clone(), block.lang.clone()),
                );
            }
        }
        pages.push(page);
    }
    pages
}

/// YAML, commands that need no broker, Lua files and Rust blocks of every page.
fn the_manuals_configurations_and_commands_work_as_documented() {
    let mut failures = Vec::new();
    let pages = pages(&mut failures);
    let mut yaml = 0;
    for page in &pages {
        for block in &page.blocks {
            let result = match block.lang.as_str() {
                "yaml" => {
                    yaml += 1;
                    yaml_example(page, block)
                }
                "lua" => lua_file_is_used(page, block),
                "sh" => match commands_of(block) {
                    Ok(Some(None)) => run_commands(page, block),
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                },
                lang if lang.starts_with("rust") => rust_example(page, block),
                // What a command prints, or a sample of text; nothing to run.
                "text" if block.directive.words.is_empty() => Ok(()),
                _ => Err("directives apply to yaml, lua and sh blocks".to_string()),
            };
            if let Err(e) = result {
                failures.push(format!("{}: {e}", page.at(block.line)));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} docs example(s) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    // A scanner that found nothing would pass the loop above.
    assert!(yaml >= 15, "found only {yaml} yaml blocks");
}

/// The `broker=...` command blocks of one broker, against its shared instance: ignored
/// with the reason when it is not there (failed in CI).
fn the_manuals_broker_commands_run(broker: Broker) {
    let mut failures = Vec::new();
    let pages = pages(&mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let on_broker: Vec<(&Page, Vec<&Block>)> = pages
        .iter()
        .map(|p| {
            let blocks: Vec<&Block> = p
                .blocks
                .iter()
                .filter(|b| b.lang == "sh" && commands_of(b) == Ok(Some(Some(broker))))
                .collect();
            (p, blocks)
        })
        .filter(|(_, blocks)| !blocks.is_empty())
        .collect();
    assert!(
        !on_broker.is_empty(),
        "no page has a broker={} example: its walkthrough is gone",
        broker.name()
    );
    for (page, blocks) in on_broker {
        // Leftovers of an interrupted run would change what the commands print.
        let _cleanup = match BrokerQueues::of(page, broker) {
            Ok(q) => q,
            Err(e) => {
                failures.push(format!("{}: {e}", page.name));
                continue;
            }
        };
        for block in blocks {
            if let Err(e) = run_commands(page, block) {
                failures.push(format!("{}: {e}", page.at(block.line)));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} {} docs example(s) failed:\n\n{}",
        failures.len(),
        broker.name(),
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------
// YAML

fn yaml_example(page: &Page, block: &Block) -> Result<(), String> {
    let d = &block.directive;
    d.check_known(&["file", "fragment", "of", "error", "contains", "env"])?;
    if d.has("contains") && !d.has("error") {
        return Err("`contains=` goes with `error`".into());
    }
    if let Some(include) = include_path(&block.code) {
        if !d.words.is_empty() {
            return Err(
                "an {{#include}} block is checked as the file it includes; it takes no directive"
                    .into(),
            );
        }
        let file = page
            .path
            .parent()
            .expect("a page's directory")
            .join(include);
        let out = check(&[file.as_os_str()], &workspace_root(), d)?;
        return expect_check(block, &out, &LineMap::default());
    }
    let (name, text, map) = if d.has("fragment") {
        if d.has("file") {
            return Err("a fragment is not a file of its own: drop `file=`".into());
        }
        let base = d
            .get("of")
            .ok_or("a fragment names its base: `fragment of=NAME`")?;
        let (base_line, base_text, lang) = page
            .files
            .get(base)
            .ok_or_else(|| format!("of={base}: no `file={base}` block on this page"))?;
        if lang != "yaml" {
            return Err(format!("of={base}: the base is not a yaml block"));
        }
        let (text, base_len) =
            splice(base_text, &block.code).map_err(|e| format!("fragment of={base}: {e}"))?;
        let map = LineMap {
            name: base.to_string(),
            ranges: vec![(0, *base_line), (base_len, block.line)],
            page: page.name.clone(),
        };
        (base.to_string(), text, map)
    } else {
        if d.has("of") {
            return Err("`of=` goes with `fragment`".into());
        }
        let name = d.get("file").unwrap_or("app.yaml").to_string();
        let map = LineMap {
            name: name.clone(),
            ranges: vec![(0, block.line)],
            page: page.name.clone(),
        };
        (name, block.code.clone(), map)
    };
    // Its own directory: the page's files, with this configuration as `name`.
    let dir = tempfile::tempdir().expect("temp dir");
    for (file, (_, content, _)) in &page.files {
        std::fs::write(dir.path().join(file), content).expect("write");
    }
    std::fs::write(dir.path().join(&name), &text).expect("write");
    let out = check(&[std::ffi::OsStr::new(&name)], dir.path(), d)?;
    expect_check(block, &out, &map)
}

fn check(
    files: &[&std::ffi::OsStr],
    dir: &Path,
    d: &examples::Directive,
) -> Result<std::process::Output, String> {
    let mut command = binary();
    command.arg("check").args(files).current_dir(dir);
    environment(&mut command, d)?;
    let limit = queue_fixtures::process::TOOL_LIMIT;
    queue_fixtures::process::output_within(&mut command, limit)
        .map_err(|e| format!("queue-runtime check: {e}"))
}

fn expect_check(block: &Block, out: &std::process::Output, map: &LineMap) -> Result<(), String> {
    let stderr = map.annotate(&text(&out.stderr));
    let stdout = text(&out.stdout);
    let d = &block.directive;
    if d.has("error") {
        if out.status.success() {
            return Err(format!(
                "marked `error`, but `queue-runtime check` accepted it: {stdout}"
            ));
        }
        if let Some(needle) = d.get("contains")
            && !stderr.contains(needle)
        {
            return Err(format!(
                "`queue-runtime check` refused it, but not with {needle:?}:\n{stderr}"
            ));
        }
    } else if !out.status.success() {
        let hint = if d.words.is_empty() {
            " (a fragment or a deliberate error needs a directive: \
             `<!-- example: fragment of=NAME -->` or `<!-- example: error contains=\"...\" -->`)"
        } else {
            ""
        };
        return Err(format!(
            "`queue-runtime check` refused this block{hint}:\n{stderr}"
        ));
    }
    if let Some((line, expected)) = &block.output {
        let outputs = [Output {
            stderr: text(&out.stderr),
            stdout,
        }];
        expect_output(expected, &outputs)
            .map_err(|e| format!("the text block at line {line}: {e}"))?;
    }
    Ok(())
}

/// `{{#include path}}`, alone in a block: the path.
fn include_path(code: &str) -> Option<&str> {
    code.trim()
        .strip_prefix("{{#include ")?
        .strip_suffix("}}")
        .map(str::trim)
}

/// Splices a fragment (a YAML list of entries at column 0) into a base configuration
/// whose last top-level key is `entries:`: base entries with the same name or id are
/// blanked out (their lines stay, empty, so line numbers still point into the base),
/// and the fragment is appended at the base's entry indent. Returns the text and how
/// many of its lines come from the base.
fn splice(base: &str, fragment: &str) -> Result<(String, usize), String> {
    #[derive(serde::Deserialize)]
    struct Base {
        entries: Vec<serde_saphyr::Spanned<BTreeMap<String, serde_json::Value>>>,
    }
    let base_lines: Vec<&str> = base.lines().collect();
    let entries_at = base_lines
        .iter()
        .position(|l| l.starts_with("entries:"))
        .ok_or("the base has no `entries:`")?;
    if base_lines[entries_at + 1..]
        .iter()
        .any(|l| !l.is_empty() && !l.starts_with([' ', '#', '-']))
    {
        return Err("`entries:` must be the base's last key".into());
    }
    // Only `entries` is read here: the other keys are the base's own business.
    let only_entries = format!("entries:\n{}", base_lines[entries_at + 1..].join("\n"));
    let spanned: Base =
        serde_saphyr::from_str(&only_entries).map_err(|e| format!("the base: {e}"))?;
    let starts: Vec<usize> = spanned
        .entries
        .iter()
        .map(|e| entries_at + e.referenced.line() as usize - 1)
        .collect();
    let first = *starts.first().ok_or("the base has no entries")?;
    let indent = base_lines[first].len() - base_lines[first].trim_start().len();
    let id_of = |fields: &BTreeMap<String, serde_json::Value>| {
        fields
            .get("name")
            .or_else(|| fields.get("id"))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let added: Vec<BTreeMap<String, serde_json::Value>> =
        serde_saphyr::from_str(fragment).map_err(|e| format!("not a list of entries: {e}"))?;
    let replaced: Vec<String> = added.iter().filter_map(id_of).collect();
    let mut lines: Vec<String> = base_lines.iter().map(|l| l.to_string()).collect();
    for (i, entry) in spanned.entries.iter().enumerate() {
        if id_of(&entry.value).is_some_and(|id| replaced.contains(&id)) {
            let end = starts.get(i + 1).copied().unwrap_or(lines.len());
            for line in &mut lines[starts[i]..end] {
                line.clear();
            }
        }
    }
    let base_len = lines.len();
    for line in fragment.lines() {
        lines.push(if line.is_empty() {
            String::new()
        } else {
            format!("{}{line}", " ".repeat(indent))
        });
    }
    Ok((lines.join("\n") + "\n", base_len))
}

/// Which page line each line of a checked file came from, to point errors at the page.
#[derive(Default)]
struct LineMap {
    name: String,
    /// (first file line - 1, fence line on the page), in order.
    ranges: Vec<(usize, usize)>,
    page: String,
}

impl LineMap {
    fn page_line(&self, line: usize) -> Option<usize> {
        let (start, fence) = self.ranges.iter().rev().find(|(start, _)| line > *start)?;
        Some(fence + line - start)
    }

    /// Appends `(docs/page.md:N)` after each `NAME:LINE` of the text.
    fn annotate(&self, text: &str) -> String {
        if self.name.is_empty() {
            return text.to_string();
        }
        let needle = format!("{}:", self.name);
        text.lines()
            .map(|l| {
                let number = l.find(&needle).and_then(|at| {
                    let digits: String = l[at + needle.len()..]
                        .chars()
                        .take_while(char::is_ascii_digit)
                        .collect();
                    digits.parse::<usize>().ok()
                });
                match number.and_then(|n| self.page_line(n)) {
                    Some(p) => format!("{l}   [{}:{p}]", self.page),
                    None => l.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

// ---------------------------------------------------------------------------------------
// Lua files and Rust

fn lua_file_is_used(page: &Page, block: &Block) -> Result<(), String> {
    let Some(file) = block.directive.get("file") else {
        return Ok(()); // an example queue-lua's docs test runs
    };
    let used = page
        .blocks
        .iter()
        .any(|b| b.lang == "yaml" && b.code.contains(file));
    if used {
        Ok(())
    } else {
        Err(format!(
            "file={file} is named by no yaml block of this page, so nothing would run it"
        ))
    }
}

fn rust_example(page: &Page, block: &Block) -> Result<(), String> {
    if !block.directive.words.is_empty() {
        return Err("a rust block takes no directive".into());
    }
    let include = include_path(&block.code).ok_or(
        "a rust block must be {{#include}} of a file under a crate's examples/, so cargo test compiles it",
    )?;
    let (file, anchor) = match include.split_once(':') {
        Some((file, anchor)) => (file, Some(anchor)),
        None => (include, None),
    };
    let path = page.path.parent().expect("a page's directory").join(file);
    let Ok(source) = std::fs::read_to_string(&path) else {
        return Err(format!("{file} does not exist"));
    };
    if let Some(anchor) = anchor
        && !anchor.chars().next().is_some_and(|c| c.is_ascii_digit())
        && !source.contains(&format!("ANCHOR: {anchor}"))
    {
        return Err(format!("{file} has no `// ANCHOR: {anchor}`"));
    }
    if path.parent().and_then(Path::file_name) != Some(std::ffi::OsStr::new("examples")) {
        return Err(format!("{file} is not in a crate's examples/ directory"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Commands

/// The brokers a walkthrough can run on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Broker {
    RabbitMq,
    Artemis,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::RabbitMq => "rabbitmq",
            Broker::Artemis => "artemis",
        }
    }
}

/// `None` for a block that runs nothing, else the broker it needs, if any.
fn commands_of(block: &Block) -> Result<Option<Option<Broker>>, String> {
    let d = &block.directive;
    d.check_known(&["run", "broker", "env", "until", "skip"])?;
    if !d.has("run") {
        return if d.words.is_empty() {
            Ok(None)
        } else {
            Err("a sh block is run when marked `run`".into())
        };
    }
    match d.get("broker") {
        None => Ok(Some(None)),
        Some("rabbitmq") => Ok(Some(Some(Broker::RabbitMq))),
        Some("artemis") => Ok(Some(Some(Broker::Artemis))),
        Some(other) => Err(format!(
            "broker={other}: only broker=rabbitmq and broker=artemis are known"
        )),
    }
}

struct Output {
    stderr: String,
    stdout: String,
}

fn run_commands(page: &Page, block: &Block) -> Result<(), String> {
    let until = block.directive.get("until");
    // `skip="COMMAND"` names, in full, a command that cannot run inside the tests
    // (the README's `bash .ci/run` is the test run itself).
    let skipped: Vec<&str> = block.directive.values("skip").collect();
    for command in &skipped {
        if !block.code.lines().any(|l| l.trim() == *command) {
            return Err(format!("skip={command:?} names no command of the block"));
        }
    }
    let runs = |l: &&str| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#') && !skipped.contains(&l)
    };
    let commands = block.code.lines().filter(runs).count();
    if until.is_some() && commands != 1 {
        return Err(
            "`until=` stops the one command of its block: give it a block of its own".into(),
        );
    }
    let mut outputs = Vec::new();
    for (i, line) in block.code.lines().enumerate() {
        let at = block.line + 1 + i;
        if !runs(&line) {
            continue;
        }
        let line = line.trim();
        let words = shell_words(line).map_err(|e| format!("line {at}: {e}"))?;
        let (dir, args) = match words.first().map(String::as_str) {
            Some("queue-runtime") => (page.session.path().to_path_buf(), &words[1..]),
            Some("cargo") if words.get(1).is_some_and(|w| w == "run") => {
                let dashes = words.iter().position(|w| w == "--");
                let is_runtime = words
                    .windows(2)
                    .any(|w| w[0] == "-p" && w[1] == "queue-runtime");
                match dashes {
                    Some(d) if is_runtime => (workspace_root(), &words[d + 1..]),
                    _ => {
                        return Err(format!(
                            "line {at}: only `cargo run -p queue-runtime -- ARGS` can run here"
                        ));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "line {at}: a `run` block runs `queue-runtime ...` or `cargo run -p queue-runtime -- ...`, not {line:?}"
                ));
            }
        };
        let mut command = binary();
        command
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // What the page shows is what a user sees with no RUST_LOG set.
            .env_remove("RUST_LOG");
        environment(&mut command, &block.directive)?;
        let (status, output) = run_streaming(command, Duration::from_secs(120), until)
            .map_err(|e| format!("line {at}: {line}: {e}"))?;
        if !status.success() {
            return Err(format!(
                "line {at}: {line}: exited with {status}\n{}{}",
                output.stderr, output.stdout
            ));
        }
        outputs.push(output);
    }
    if outputs.is_empty() {
        return Err("a `run` block with no command".into());
    }
    // Without it nothing would say what the commands must print.
    let (line, expected) = block
        .output
        .as_ref()
        .ok_or("a `run` block needs the ```text block of what it prints right after it")?;
    expect_output(expected, &outputs).map_err(|e| format!("the text block at line {line}: {e}"))
}

fn environment(command: &mut Command, d: &examples::Directive) -> Result<(), String> {
    for pair in d.values("env") {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("env={pair}: write env=NAME=value"))?;
        command.env(k, v);
    }
    Ok(())
}

/// Runs a command to its end (bounded), reading its output as it comes. With `until`,
/// the first output line containing that text gets the command a SIGINT, as a user's
/// Ctrl-C would: how a page shows a consumer that runs until stopped.
fn run_streaming(
    mut command: Command,
    limit: Duration,
    until: Option<&str>,
) -> Result<(std::process::ExitStatus, Output), String> {
    use std::io::BufRead;
    let mut child = command.spawn().map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel::<(bool, String)>();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    for (is_stdout, pipe) in [
        (true, Box::new(stdout) as Box<dyn std::io::Read + Send>),
        (false, Box::new(stderr)),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send((is_stdout, line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut output = Output {
        stderr: String::new(),
        stdout: String::new(),
    };
    let mut interrupted = false;
    let deadline = Instant::now() + limit;
    // Both pipes close when the command exits: the channel then disconnects.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((is_stdout, line)) => {
                if let Some(text) = until
                    && !interrupted
                    && line.contains(text)
                {
                    signal(&child, "INT");
                    interrupted = true;
                }
                let out = if is_stdout {
                    &mut output.stdout
                } else {
                    &mut output.stderr
                };
                out.push_str(&line);
                out.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                let waiting = until.map_or_else(String::new, |t| format!(" (no line with {t:?})"));
                return Err(format!(
                    "still running after {limit:?}{waiting}:\n{}{}",
                    output.stderr, output.stdout
                ));
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if let Some(text) = until
        && !interrupted
    {
        return Err(format!(
            "ended before printing a line with {text:?}:\n{}{}",
            output.stderr, output.stdout
        ));
    }
    Ok((status, output))
}

/// Splits a command line as a POSIX shell would for the quoting the docs use: single
/// quotes, double quotes with `\` escapes, and `\` outside quotes.
fn shell_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("unclosed '".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("unclosed \"".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("unclosed \"".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("a line ending in \\ (continuations are not supported)".into()),
            },
            '|' | '&' | ';' | '<' | '>' | '$' | '`' => {
                return Err(format!(
                    "{c:?}: only plain commands can run, no shell syntax"
                ));
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

/// Each expected line must match a line of the output, in order: within one command's
/// output, a line may come from stderr or stdout (each in its own order); `$ ` lines
/// move to the next command.
fn expect_output(expected: &str, outputs: &[Output]) -> Result<(), String> {
    let streams: Vec<[Vec<&str>; 2]> = outputs
        .iter()
        .map(|o| [o.stderr.lines().collect(), o.stdout.lines().collect()])
        .collect();
    let mut command = 0;
    let mut cursors = [0usize; 2];
    let mut prompts = 0;
    for want in expected.lines().map(str::trim_end) {
        if want.trim().is_empty() {
            continue;
        }
        if want.starts_with("$ ") {
            if prompts > 0 {
                command += 1;
                cursors = [0, 0];
            }
            prompts += 1;
            if command >= streams.len() {
                return Err(format!("{want:?}: more `$` lines than commands"));
            }
            continue;
        }
        let mut found = false;
        while !found && command < streams.len() {
            for (s, lines) in streams[command].iter().enumerate() {
                if let Some(k) = lines[cursors[s]..].iter().position(|l| matches(want, l)) {
                    cursors[s] += k + 1;
                    found = true;
                    break;
                }
            }
            if !found {
                if prompts > 0 {
                    break; // a `$` line pins the command
                }
                command += 1;
                cursors = [0, 0];
            }
        }
        if !found {
            let all: Vec<String> = outputs
                .iter()
                .map(|o| format!("{}{}", o.stderr, o.stdout))
                .collect();
            return Err(format!(
                "no output line matches {want:?} (in order); the output was:\n{}",
                all.join("---\n")
            ));
        }
    }
    Ok(())
}

/// `want` with `...` matching any text, against one output line.
fn matches(want: &str, line: &str) -> bool {
    let line = line.trim_end();
    let parts: Vec<&str> = want.split("...").collect();
    if parts.len() == 1 {
        return want == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || line.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &line[first.len()..];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

// ---------------------------------------------------------------------------------------
// Broker queues

const RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker queues of a page's configurations, deleted now and again when dropped, so
/// the page's commands can run again. The AMQP 0-9-1 driver's delay queues
/// (`NAME.delay.MS`) are left: they expire by themselves a minute after their last use.
struct BrokerQueues {
    broker: Broker,
    names: Vec<String>,
}

impl BrokerQueues {
    fn of(page: &Page, broker: Broker) -> Result<BrokerQueues, String> {
        let kinds = queue_runtime::registry::DriverKinds::builtin();
        let mut names = Vec::new();
        for (file, (_, _, lang)) in &page.files {
            if lang != "yaml" {
                continue;
            }
            let path = page.session.path().join(file);
            let config = queue_runtime::config::load(&[path]).map_err(|e| e.to_string())?;
            let plan =
                queue_runtime::registry::plan(&config, &kinds, false).map_err(|e| e.to_string())?;
            for q in &plan.queues {
                let on_broker = plan
                    .drivers
                    .iter()
                    .any(|d| d.id == q.driver && d.kind.starts_with("queue.driver.amqp"));
                if on_broker {
                    names.push(q.spec.name.clone());
                }
            }
        }
        let queues = BrokerQueues { broker, names };
        queues.delete()?;
        Ok(queues)
    }

    fn delete(&self) -> Result<(), String> {
        if self.broker == Broker::Artemis {
            return self
                .names
                .iter()
                .try_for_each(|name| queue_fixtures::artemis::delete_shared_queue(name));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let conn = lapin::Connection::connect(RABBITMQ, lapin::ConnectionProperties::default())
                .await
                .map_err(|e| e.to_string())?;
            for name in &self.names {
                // A channel per queue: deleting a missing queue is fine, but an error
                // closes the channel.
                let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
                ch.queue_delete(
                    name.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await
                .map_err(|e| format!("deleting {name}: {e}"))?;
                // Closed before the connection: lapin refuses to close a connection
                // while a dropped channel is still closing.
                ch.close(200, "done".into())
                    .await
                    .map_err(|e| e.to_string())?;
            }
            conn.close(200, "done".into())
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl Drop for BrokerQueues {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("cleaning up the docs' {} queues: {e}", self.broker.name());
        }
    }
}

fn expected_output_matches_in_order_with_ellipses_and_prompts() {
    let outputs = [
        Output {
            stderr: "2026-01-01T00:00:00Z  INFO lua: Sent to=a\nnoise\n".into(),
            stdout: "published 0190 to app:tasks\n".into(),
        },
        Output {
            stderr: String::new(),
            stdout: "summary: queue=app:tasks acked=1\n".into(),
        },
    ];
    assert!(
        expect_output(
            "... INFO lua: Sent ...\npublished ... to app:tasks\nsummary: queue=app:tasks acked=1",
            &outputs
        )
        .is_ok()
    );
    assert!(
        expect_output(
            "$ queue-runtime publish\npublished ...\n$ queue-runtime run\nsummary: ...",
            &outputs
        )
        .is_ok()
    );
    // A `$` line pins the command: the summary is not the first command's.
    assert!(expect_output("$ queue-runtime publish\nsummary: ...", &outputs).is_err());
    assert!(
        expect_output("summary: ...\npublished ...", &outputs).is_err(),
        "order"
    );
    assert!(expect_output("published", &outputs).is_err(), "whole lines");
    assert!(matches("a...c...e", "abcde") && !matches("a...c...e", "ace!"));
}

fn fragments_replace_entries_by_name_and_keep_base_lines() {
    let base = "namespace: app\nentries:\n  - name: a\n    kind: queue.queue\n  - name: b\n    kind: queue.queue\n";
    let (text, base_len) =
        splice(base, "- name: a\n  kind: queue.queue\n  durable: false\n").unwrap();
    assert_eq!(base_len, 6);
    assert_eq!(
        text,
        "namespace: app\nentries:\n\n\n  - name: b\n    kind: queue.queue\n  - name: a\n    kind: queue.queue\n    durable: false\n"
    );
    let map = LineMap {
        name: "app.yaml".into(),
        ranges: vec![(0, 10), (6, 40)],
        page: "p.md".into(),
    };
    assert_eq!(map.page_line(2), Some(12));
    assert_eq!(map.page_line(9), Some(43));
    assert!(splice("entries:\n  - name: a\nnamespace: x\n", "- name: b\n").is_err());
}

fn shell_words_handle_the_quoting_the_docs_use() {
    assert_eq!(
        shell_words(r#"queue-runtime publish app:tasks '{"a": 1}' -H "k=v w" x\ y"#).unwrap(),
        vec![
            "queue-runtime",
            "publish",
            "app:tasks",
            r#"{"a": 1}"#,
            "-H",
            "k=v w",
            "x y"
        ]
    );
    assert!(shell_words("a | b").is_err());
    assert!(shell_words("a 'b").is_err());
}

/// Every test here is a trial; a broker walkthrough is ignored with the reason when
/// its broker is not here (failed in CI).
fn main() {
    queue_testkit::run(vec![
        queue_testkit::broker_test(
            "the_manuals_configurations_and_commands_work_as_documented",
            None,
            || async {
                tokio::task::block_in_place(
                    the_manuals_configurations_and_commands_work_as_documented,
                )
            },
        ),
        queue_testkit::broker_test(
            "the_manuals_rabbitmq_commands_run_against_rabbitmq",
            queue_fixtures::rabbitmq::shared_unavailable(),
            || async {
                tokio::task::block_in_place(|| the_manuals_broker_commands_run(Broker::RabbitMq))
            },
        ),
        queue_testkit::broker_test(
            "the_manuals_artemis_commands_run_against_artemis",
            queue_fixtures::artemis::shared_unavailable(),
            || async {
                tokio::task::block_in_place(|| the_manuals_broker_commands_run(Broker::Artemis))
            },
        ),
        queue_testkit::broker_test(
            "expected_output_matches_in_order_with_ellipses_and_prompts",
            None,
            || async {
                tokio::task::block_in_place(
                    expected_output_matches_in_order_with_ellipses_and_prompts,
                )
            },
        ),
        queue_testkit::broker_test(
            "fragments_replace_entries_by_name_and_keep_base_lines",
            None,
            || async {
                tokio::task::block_in_place(fragments_replace_entries_by_name_and_keep_base_lines)
            },
        ),
        queue_testkit::broker_test(
            "shell_words_handle_the_quoting_the_docs_use",
            None,
            || async { tokio::task::block_in_place(shell_words_handle_the_quoting_the_docs_use) },
        ),
    ]);
}
