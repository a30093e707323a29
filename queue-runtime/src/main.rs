//! `queue-runtime`: run, check, publish to and inspect the queues of a configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use queue_core::security::Actor;
use queue_core::{HeaderValue, Headers, names};
use queue_runtime::config;
use queue_runtime::host::{Host, HostOptions};
use queue_runtime::registry::{self, DriverKinds, Plan};

/// Messages are allocated on one thread and freed on another, many per second:
/// mimalloc's per-thread free lists cut the allocator's share of a delivery's cost
/// by more than half against glibc's malloc (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hosts Lua queue consumers from YAML configuration.
#[derive(Parser, Debug)]
#[command(name = "queue-runtime", version, about)]
struct Cli {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Host the consumers and processes of these files until signalled.
    Run {
        /// YAML files.
        #[arg(required = true)]
        config: Vec<PathBuf>,
        /// Exit once processes are done and consumed queues are empty.
        #[arg(long)]
        exit_when_idle: bool,
        /// Deny what no policy allows, even without policies.
        #[arg(long)]
        strict: bool,
        /// Serve /metrics, /health and /ready on this address (e.g. 127.0.0.1:9090).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Worker threads, each with one Lua state (default: the number of cores, at
        /// most 8; 1 to 256).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
        lua_threads: Option<usize>,
        /// Export trace spans with OTLP over HTTP to this base URL (e.g.
        /// http://127.0.0.1:4318); wins over OTEL_EXPORTER_OTLP_ENDPOINT.
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
    },
    /// Validate these files without starting anything.
    Check {
        /// YAML files.
        #[arg(required = true)]
        config: Vec<PathBuf>,
        /// Check as strict mode would run.
        #[arg(long)]
        strict: bool,
    },
    /// Publish one message to a broker-backed queue.
    Publish {
        /// The queue id, `namespace:name`.
        queue_id: String,
        /// The body, as JSON.
        json: String,
        /// A header, `key=value` (numbers and booleans are typed).
        #[arg(short = 'H', long = "header", value_name = "KEY=VALUE")]
        headers: Vec<String>,
        /// YAML files declaring the queue.
        #[arg(short, long, required = true)]
        config: Vec<PathBuf>,
        /// Publish as this actor.
        #[arg(long)]
        actor: Option<String>,
        /// Actor metadata, `key=value`.
        #[arg(long, value_name = "KEY=VALUE")]
        actor_meta: Vec<String>,
        /// Deny what no policy allows.
        #[arg(long)]
        strict: bool,
    },
    /// Show a broker-backed queue's counts.
    Info {
        /// The queue id.
        queue_id: String,
        /// YAML files declaring the queue.
        #[arg(short, long, required = true)]
        config: Vec<PathBuf>,
    },
    /// Look into or empty a broker-backed queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Work with a dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// Show messages (id, headers, body, dead-letter reason) without taking them: each
    /// goes back to the queue.
    Peek {
        /// The queue id.
        queue_id: String,
        /// YAML files declaring the queue.
        #[arg(short, long, required = true)]
        config: Vec<PathBuf>,
        /// Show at most this many.
        #[arg(long, default_value_t = 10)]
        limit: u64,
    },
    /// Delete the messages the queue holds.
    Purge {
        /// The queue id.
        queue_id: String,
        /// YAML files declaring the queue.
        #[arg(short, long, required = true)]
        config: Vec<PathBuf>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Move dead letters back to the queue they failed in, `attempts` reset; each is
    /// confirmed there before it leaves the dead-letter queue.
    Replay {
        /// The dead-letter queue id.
        queue_id: String,
        /// YAML files declaring the queues.
        #[arg(short, long, required = true)]
        config: Vec<PathBuf>,
        /// Replay at most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// Only dead letters whose reason contains this text.
        #[arg(long, value_name = "TEXT")]
        filter_reason: Option<String>,
        /// Show what would be replayed; move nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The stack of every thread the runtime does not size itself, in bytes, unless
/// `RUST_MIN_STACK` says otherwise. lapin parses each frame on its own thread, and
/// its parser recurses once per level of a header table: a message from another
/// client with a header nested 15,000 deep overflowed the 2 MiB default and aborted
/// the process, at every start, as long as the message waited in its queue. The
/// driver's largest frame (128 KiB) bounds the nesting to about 26,000 levels,
/// which took between 16 and 64 MiB in a release build and between 256 and 512 MiB
/// in a debug build, whose frames are larger (docs/drivers/amqp091.md, "Messages from
/// other clients"). Only the pages a thread touches take memory.
const THREAD_STACK_BYTES: &str = if cfg!(debug_assertions) {
    "1073741824"
} else {
    "134217728"
};

/// Prints a line of the command's answer on stdout. A reader that went away (`| head`,
/// a `tee` stopped by the same Ctrl-C) loses the line, not the command: its work is
/// done, and its exit code must say so (docs/operations.md, "Command-line reference"); `println!`
/// panicked there, as Rust ignores SIGPIPE.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// [`say!`] on stderr: the error line of a failed command, whose exit code is what a
/// script reads.
macro_rules! say_on_stderr {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    if std::env::var_os("RUST_MIN_STACK").is_none() {
        // SAFETY: no other thread runs yet, so none reads the environment meanwhile.
        unsafe { std::env::set_var("RUST_MIN_STACK", THREAD_STACK_BYTES) };
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            say_on_stderr!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Tracing (docs/operations.md, "Tracing"): `run` only, and only with an OTLP endpoint.
    let telemetry = match &cli.command {
        Command::Run { otlp_endpoint, .. } => {
            match queue_runtime::telemetry::Telemetry::start(
                otlp_endpoint.as_deref(),
                runtime.handle().clone(),
            ) {
                Ok(telemetry) => telemetry,
                Err(message) => {
                    say_on_stderr!("error: {message}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    init_logging(cli.log_format, telemetry.as_ref());
    let result = runtime.block_on(run(cli.command));
    // The last spans are sent while the runtime that sends them still runs.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    // A worker stuck in a handler that never yields must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(message) => {
            say_on_stderr!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Targets of the protocol crates whose TRACE events dump whole frames, the login
/// among them (lapin's `StartOk` carries the SASL response with the password).
const WIRE_DUMP_TARGETS: [&str; 4] = ["lapin", "amq_protocol", "fe2o3_amqp", "serde_amqp"];

/// A target whose events dump a whole message at any level: lapin's WARN of each
/// message RabbitMQ returns as unroutable carries its headers and body (a card number
/// in it was readable in the log). The AMQP 0-9-1 driver pairs returns itself and
/// says what came back, by message id.
const MESSAGE_DUMP_TARGET: &str = "lapin::returned_messages";

/// What is logged when `RUST_LOG` is not set: INFO and above, but nothing of lapin's.
/// Its ERROR lines repeated what the AMQP 0-9-1 driver says itself with its context
/// (a refused login came with three of them, one saying "aborting recovery" while
/// the driver went on reconnecting); `RUST_LOG=info` brings them back.
const DEFAULT_LOG_FILTER: &str = "info,lapin=off";

fn init_logging(format: LogFormat, telemetry: Option<&queue_runtime::telemetry::Telemetry>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let logged = tracing_subscriber::registry().with(log_layer(format, filter));
    // No `Option` layer when tracing is off: an absent layer still takes an interest
    // in every callsite.
    match telemetry {
        Some(telemetry) => {
            logged.with(telemetry.layer()).init();
            tracing::info!(
                endpoint = %telemetry.endpoint(),
                "exporting trace spans with OTLP"
            );
        }
        None => logged.init(),
    }
}

/// The log: lines on stderr for what `filter` (RUST_LOG) enables, never a wire dump
/// nor the runtime's tracing spans. Its filters tell `tracing` the most verbose level
/// they may enable (`filter`'s), so that a TRACE or DEBUG event of the protocol crates
/// on a per-message path costs one comparison, not an event built and filtered out
/// (docs/performance.md, "The runtime on RabbitMQ").
fn log_layer<S>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{FilterExt, LevelFilter};

    // Whatever RUST_LOG says: no log level prints a credential, nor a message.
    let no_wire_dumps =
        tracing_subscriber::filter::filter_fn(|meta| never_dumps(meta.target(), *meta.level()))
            .with_max_level_hint(LevelFilter::TRACE);
    // The log reads the same with tracing on: its spans are for the exporter only.
    let no_trace_spans = tracing_subscriber::filter::filter_fn(|meta| {
        !queue_runtime::telemetry::is_trace_span(meta)
    })
    .with_max_level_hint(LevelFilter::TRACE);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer.fmt_fields(OneLineFields).boxed(),
        LogFormat::Json => layer.json().map_event_format(LuaFieldsInline).boxed(),
    };
    layer.with_filter(filter.and(no_wire_dumps).and(no_trace_spans))
}

/// The most a text log line's fields take: past the 64 KiB of fields Lua's `logger`
/// writes (docs/lua-api.md, "logger"), which quoting as a string can double.
const MAX_FIELDS_BYTES: usize = 160 * 1024;

/// A text log line's fields as tracing's own formatter writes them, kept on the line:
/// control characters escaped, and at most [`MAX_FIELDS_BYTES`] of them. A handler's
/// failure reason went into the log as it was, so a newline in it began a line of the
/// handler's making that read as the runtime's own (docs/operations.md, "Logs"). The
/// JSON format escapes them.
struct OneLineFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for OneLineFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        use std::fmt::Write;
        use tracing_subscriber::fmt::format::{DefaultFields, Writer};
        let mut text = String::new();
        DefaultFields::new().format_fields(Writer::new(&mut text), fields)?;
        let mut line = queue_core::OneLine::new(writer, MAX_FIELDS_BYTES);
        line.write_str(&text)?;
        line.finish()
    }
}

/// The JSON log's event format (`F`) with the fields of a Lua `logger` line as a JSON
/// object: the logger gives them to `tracing` as one string of JSON, which the JSON
/// format wrote as a string, so that a log pipeline read `"fields":"{\"n\":1}"`
/// where it looks for `"fields":{"n":1}` (docs/lua-api.md, "logger").
struct LuaFieldsInline<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for LuaFieldsInline<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        if event.metadata().target() == "lua" {
            line = lua_fields_inline(&line);
        }
        writer.write_str(&bidi_escaped(&line))
    }
}

/// A JSON log line with the characters JSON may carry raw but a terminal acts on
/// (line and paragraph separators, bidirectional controls) written as `\uXXXX`, as the
/// text format escapes them: a handler's failure reason with U+202E reordered the
/// line it was shown in (review). JSON escapes the control characters itself.
fn bidi_escaped(line: &str) -> std::borrow::Cow<'_, str> {
    let acts = |c: char| queue_core::escaped_in_a_log_line(c) && !c.is_control();
    if !line.chars().any(acts) {
        return std::borrow::Cow::Borrowed(line);
    }
    let mut escaped = String::with_capacity(line.len() + 12);
    for c in line.chars() {
        if acts(c) {
            escaped.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

/// A JSON log line of the `lua` target with its `fields.fields` string written as the
/// JSON it holds, in its place (the line's other keys keep their order); the line as
/// it was if either does not read.
fn lua_fields_inline(line: &str) -> String {
    let fields = serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|event| Some(event.pointer("/fields/fields")?.as_str()?.to_string()));
    let Some(fields) = fields else {
        return line.to_string();
    };
    // A line logged without fields: an object all the same, as a log pipeline that
    // mapped the field as one would refuse a string in it (review).
    let inline = if fields.is_empty() { "{}" } else { &fields };
    let readable = serde_json::from_str::<serde_json::Value>(inline).is_ok();
    match serde_json::to_string(&fields) {
        Ok(quoted) if readable => line.replacen(
            &format!("\"fields\":{quoted}"),
            &format!("\"fields\":{inline}"),
            1,
        ),
        _ => line.to_string(),
    }
}

/// Whether an event of `target` at `level` may be written whatever `RUST_LOG` says: not
/// when it dumps frames (the login among them) or a whole message.
fn never_dumps(target: &str, level: tracing::Level) -> bool {
    target != MESSAGE_DUMP_TARGET
        && (level != tracing::Level::TRACE
            || !WIRE_DUMP_TARGETS.iter().any(|t| target.starts_with(t)))
}

fn plan(paths: &[PathBuf], strict: bool) -> Result<(Plan, DriverKinds), String> {
    let kinds = DriverKinds::builtin();
    let config = config::load(paths).map_err(|e| format!("invalid configuration:\n{e}"))?;
    let plan = registry::plan(&config, &kinds, strict)
        .map_err(|e| format!("invalid configuration:\n{e}"))?;
    Ok((plan, kinds))
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Check { config, strict } => {
            let (plan, _) = plan(&config, strict)?;
            say!(
                "ok: {} driver(s), {} queue(s), {} consumer(s), {} process(es)",
                plan.drivers.len(),
                plan.queues.len(),
                plan.consumers.len(),
                plan.processes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            config,
            exit_when_idle,
            strict,
            metrics_addr,
            lua_threads,
            otlp_endpoint: _,
        } => {
            let (plan, kinds) = plan(&config, strict)?;
            let handle = queue_runtime::metrics::install();
            let _upkeep = handle.clone().map(queue_runtime::metrics::spawn_upkeep);
            let readiness = queue_runtime::health::Readiness::default();
            let _server = match (metrics_addr, handle) {
                (Some(addr), Some(handle)) => Some(
                    queue_runtime::metrics::serve(addr, handle, readiness.clone())
                        .await
                        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?,
                ),
                // Asked for, and a probe pointed at it: starting without it would have
                // the orchestrator kill the process with nothing said about why.
                (Some(addr), None) => {
                    return Err(format!(
                        "cannot serve metrics on {addr}: the metrics recorder could not be installed (another one is installed in this process)"
                    ));
                }
                (None, _) => None,
            };
            let mut options = HostOptions {
                wait_for_brokers: true,
                needs_queue_counts: exit_when_idle,
                ..HostOptions::default()
            };
            if let Some(n) = lua_threads {
                options.lua_threads = n;
            }
            let mut signals = ShutdownSignals::listen();
            // Waiting for an unreachable broker can be interrupted like everything else.
            let host = tokio::select! {
                host = Host::start(plan, &kinds, options) => host.map_err(|e| e.to_string())?,
                signal = signals.next() => {
                    tracing::info!(signal, "stopped while starting (waiting for the brokers, or loading the handlers)");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            readiness.started(
                host.drivers().clone(),
                host.attachments(),
                host.processes(),
                host.worker_ticks(),
            );
            tracing::info!(lua_states = host.lua_states(), "runtime started");
            // A count that cannot be read ends the wait for idleness, but the stop is
            // the same as any other: handlers finish, deliveries go back, the summary
            // is printed; the exit code says it failed.
            let mut idle_failed = None;
            let (reason, by_signal) = tokio::select! {
                signal = signals.next() => (signal, true),
                idle = host.wait_idle(), if exit_when_idle => match idle {
                    Ok(()) => ("idle", false),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot tell whether the queues are idle; stopping");
                        idle_failed = Some(e);
                        ("queue counts unreadable", false)
                    }
                },
            };
            readiness.stopping();
            tracing::info!(reason, "stopping");
            // Read after the stop: a process may fail during it (it exited 0 then).
            let failures = host.process_failures_later();
            let Some(summary) =
                unless_signalled_again(host.shutdown(), &mut signals, by_signal.then_some(reason))
                    .await
            else {
                say_on_stderr!("SIGINT while stopping: exiting now");
                return Ok(ExitCode::from(130));
            };
            for queue in &summary {
                say!("summary: {queue}");
            }
            if let Some(e) = idle_failed {
                return Err(format!("--exit-when-idle: {e}"));
            }
            Ok(if exit_when_idle && failures() > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Publish {
            queue_id,
            json,
            headers,
            config,
            actor,
            actor_meta,
            strict,
        } => {
            let (plan, kinds) = plan(&config, strict)?;
            let id = queue_core::QueueId::parse(&queue_id).map_err(|e| e.to_string())?;
            // The codec's own reading: it refuses what no body carries (an integer past
            // i64), where serde_json's value took it for the nearest float. Read before
            // the queue is looked at, so that a bad body or header is told wherever it
            // was to go.
            let body = queue_core::Codec::Json
                .decode(json.as_bytes())
                .map_err(|e| format!("the body: {e}"))?;
            let headers = parse_headers(&headers)?;
            refuse_in_memory(&plan, &id)?;
            let actor = match actor {
                Some(id) => {
                    let mut actor = Actor::new(id);
                    for (k, v) in pairs(&actor_meta)? {
                        actor = actor.with_meta(k, v);
                    }
                    Some(actor)
                }
                None => None,
            };
            let security = plan.cli_security(actor)?;
            let host = broker_only(plan, &kinds, Some(&id)).await?;
            let result = host
                .queues()
                .publish(&security, &queue_id, body, headers)
                .await;
            host.shutdown().await;
            let message_id = result.map_err(|e| e.to_string())?;
            say!("published {message_id} to {queue_id}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue(QueueCommand::Peek {
            queue_id,
            config,
            limit,
        }) => queue_tool(&queue_id, &config, Tool::Peek { limit }).await,
        Command::Queue(QueueCommand::Purge {
            queue_id,
            config,
            yes,
        }) => queue_tool(&queue_id, &config, Tool::Purge { ask: !yes }).await,
        Command::Dlq(DlqCommand::Replay {
            queue_id,
            config,
            limit,
            filter_reason,
            dry_run,
        }) => {
            let options = queue_runtime::tools::ReplayOptions {
                limit,
                filter_reason,
                dry_run,
            };
            queue_tool(&queue_id, &config, Tool::Replay(options)).await
        }
        Command::Info { queue_id, config } => {
            let (plan, kinds) = plan(&config, false)?;
            let id = queue_core::QueueId::parse(&queue_id).map_err(|e| e.to_string())?;
            refuse_in_memory(&plan, &id)?;
            let host = broker_only(plan, &kinds, Some(&id)).await?;
            let info = host.queues().info(&queue_id).await;
            // Which node answered, for a driver given several (a cluster).
            let node = host
                .queues()
                .get(&id)
                .and_then(|q| q.driver.connection())
                .map(|c| format!(" node={}", c.node))
                .unwrap_or_default();
            host.shutdown().await;
            let info = info.map_err(|e| e.to_string())?;
            let show = |v: Option<u64>| v.map_or_else(|| "unknown".to_string(), |n| n.to_string());
            say!(
                "{queue_id}: message_count={} ready={} in_flight={} delayed={} consumer_count={}{node}",
                show(info.message_count()),
                show(info.ready),
                show(info.in_flight),
                show(info.delayed),
                show(info.consumers)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What a queue tool is to do.
enum Tool {
    Peek { limit: u64 },
    Purge { ask: bool },
    Replay(queue_runtime::tools::ReplayOptions),
}

/// `queue peek`, `queue purge` and `dlq replay` (queue_runtime::tools), on a queue of
/// a broker driver.
async fn queue_tool(queue_id: &str, config: &[PathBuf], tool: Tool) -> Result<ExitCode, String> {
    use queue_runtime::tools;
    let (plan, kinds) = plan(config, false)?;
    let id = queue_core::QueueId::parse(queue_id).map_err(|e| e.to_string())?;
    refuse_in_memory(&plan, &id)?;
    if let Tool::Purge { ask: true } = tool
        && !confirmed(&format!("delete every message of {id}?"))?
    {
        say!("nothing deleted");
        return Ok(ExitCode::FAILURE);
    }
    // Where a replayed copy may go: a broker queue (one on the embedded memory driver
    // would vanish with this process).
    let on_a_broker: std::collections::HashSet<queue_core::QueueId> = plan
        .queues
        .iter()
        .map(|q| q.spec.id.clone())
        .filter(|q| !plan.is_in_memory(q))
        .collect();
    // A replay publishes to whichever queue a dead letter came from.
    let for_queue = match tool {
        Tool::Replay(_) => None,
        Tool::Peek { .. } | Tool::Purge { .. } => Some(&id),
    };
    let host = broker_only(plan, &kinds, for_queue).await?;
    let driver = host
        .queues()
        .get(&id)
        .map(|q| q.driver.clone())
        .ok_or_else(|| format!("queue {id} is not declared in this configuration"))?;
    let result = match tool {
        Tool::Peek { limit } => tools::peek(&driver, &id, limit).await.map(|messages| {
            for message in &messages {
                say!("{}", tools::show(message));
            }
            say!("{} message(s) shown; all are back in {id}", messages.len());
        }),
        Tool::Purge { .. } => tools::purge(&driver, &id)
            .await
            .map(|purged| say!("purged {purged} message(s) from {id}")),
        Tool::Replay(options) => {
            let mut show = |m: &queue_core::Message| say!("{}", tools::show(m));
            let reachable = |q: &queue_core::QueueId| on_a_broker.contains(q);
            tools::replay(host.queues(), &id, &options, &reachable, &mut show)
                .await
                .and_then(|r| {
                    let deferred = if r.deferred > 0 {
                        format!(", {} untried after their queue failed", r.deferred)
                    } else {
                        String::new()
                    };
                    say!(
                        "{} {} dead letter(s) from {id}; left there: {} skipped, {} with no x_original_queue a copy can go to, {} refused by their queue{deferred}",
                        if options.dry_run { "would replay" } else { "replayed" },
                        r.replayed,
                        r.skipped,
                        r.no_target,
                        r.failed,
                    );
                    if r.held_the_most {
                        say!(
                            "read {} dead letter(s), the most one run holds: any after them in {id} were not read",
                            tools::MAX_HELD
                        );
                    }
                    match r.first_failure {
                        Some(why) if r.stopped_early => Err(queue_core::Error::internal(format!(
                            "stopped, the dead letters after it left in {id} unread: {why}"
                        ))),
                        Some(why) if r.may_pass => Err(queue_core::Error::internal(format!(
                            "{} dead letter(s) could not be replayed now, and {} more for the same queue(s) were not tried: run it again once their queue takes messages; e.g.: {why}",
                            r.failed, r.deferred
                        ))),
                        Some(why) => Err(queue_core::Error::internal(format!(
                            "{} dead letter(s) could not be replayed, e.g.: {why}",
                            r.failed
                        ))),
                        None => Ok(()),
                    }
                })
        }
    };
    host.shutdown().await;
    result.map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; anything but `y` or `yes` is no.
fn confirmed(question: &str) -> Result<bool, String> {
    use std::io::Write;
    // Not `print!`, which panics on a closed stdout: the question unseen, the answer
    // read is still the user's (or none, which is no).
    let mut stdout = std::io::stdout().lock();
    let _ = write!(stdout, "{question} [y/N] ").and_then(|()| stdout.flush());
    drop(stdout);
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

fn refuse_in_memory(plan: &Plan, id: &queue_core::QueueId) -> Result<(), String> {
    if plan.queue(id).is_none() {
        return Err(format!("queue {id} is not declared in this configuration"));
    }
    if plan.is_in_memory(id) {
        return Err(format!(
            "queue {id} lives on the embedded memory driver: it exists only inside a running `queue-runtime run`, out of this command's reach; declare a broker driver for it (to publish to it meanwhile, use a process.lua in that run)"
        ));
    }
    Ok(())
}

/// Starts the drivers and queues (no consumers, no processes) for a one-off command:
/// with `for_queue`, only that queue, the queues its failed messages go to, and their
/// drivers. Every one of them was started: a driver the queue does not use, down,
/// failed the command, and a read-only `info` declared every queue on the brokers
/// (review).
async fn broker_only(
    mut plan: Plan,
    kinds: &DriverKinds,
    for_queue: Option<&queue_core::QueueId>,
) -> Result<Host, String> {
    plan.consumers.clear();
    plan.processes.clear();
    if let Some(queue) = for_queue {
        let mut kept = vec![queue.clone()];
        let mut next = plan.queue(queue).and_then(|q| q.dead_letter.clone());
        while let Some(dead_letters) = next.take().filter(|d| !kept.contains(d)) {
            next = plan
                .queue(&dead_letters)
                .and_then(|q| q.dead_letter.clone());
            kept.push(dead_letters);
        }
        plan.queues.retain(|q| kept.contains(&q.spec.id));
        let used: std::collections::HashSet<&str> =
            plan.queues.iter().map(|q| q.driver.as_str()).collect();
        plan.drivers.retain(|d| used.contains(d.id.as_str()));
    }
    Host::start(
        plan,
        kinds,
        HostOptions {
            lua_threads: 1,
            ..HostOptions::default()
        },
    )
    .await
    .map_err(|e| e.to_string())
}

fn pairs(items: &[String]) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("{item:?} is not key=value"))
        })
        .collect()
}

/// Headers whose value is text whatever it reads like (`-H message_id=1001`).
const TEXT_HEADERS: [&str; 6] = [
    names::MESSAGE_ID,
    names::CORRELATION_ID,
    names::REPLY_TO,
    names::MESSAGE_TYPE,
    names::CONTENT_TYPE,
    names::CONTENT_ENCODING,
];

/// `-H key=value` pairs as headers (docs/operations.md): a value that reads as an
/// integer written plainly, a finite number written with a point or an exponent, or
/// `true`/`false` is typed; one in double
/// quotes, or of a header in [`TEXT_HEADERS`], is text. Typed whatever it read like,
/// `00042` became 42, `nan` a float, and `message_id=1001` an integer, refused.
fn parse_headers(items: &[String]) -> Result<Headers, String> {
    let mut headers = Headers::new();
    for (k, v) in pairs(items)? {
        let quoted = v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
        let value = if quoted {
            HeaderValue::String(v[1..v.len() - 1].to_string())
        } else if TEXT_HEADERS.contains(&k.as_str()) {
            HeaderValue::String(v)
        } else if let Ok(i) = v.parse::<i64>()
            && i.to_string() == v
        {
            HeaderValue::Int(i)
        } else if let Ok(f) = v.parse::<f64>()
            && f.is_finite()
            && v.bytes()
                .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
            && v.contains(['.', 'e', 'E'])
            && !v.starts_with("00")
        {
            HeaderValue::Float(f)
        } else if let Ok(b) = v.parse::<bool>() {
            HeaderValue::Bool(b)
        } else {
            HeaderValue::String(v)
        };
        headers.insert(k, value);
    }
    Ok(headers)
}

/// Where the signals that stop the runtime come from.
trait StopSignals {
    /// Waits for the next one and names it.
    async fn next(&mut self) -> &'static str;
}

/// Waits for `shutdown`; `None` if a SIGINT cut it short (what was returned so far
/// stays returned). `began_with` is the signal that began the stop, if one did: it
/// counts as the first, and a stop that began otherwise (the queues idle, or their
/// counts unreadable) waits for one more, as an orchestrator's ordinary SIGTERM
/// during it asks for what is already happening. After the first, a SIGINT exits at
/// once, unless it comes within [`SAME_REQUEST`] of the first SIGINT of a burst (one
/// request signalled twice, as `timeout -s INT` does). SIGTERM and SIGHUP never cut a
/// stop short: one stop request often arrives twice (GNU `timeout` and some
/// entrypoints signal the process and then its group), and that exited at once,
/// skipping the summary and cutting settlements short (review).
async fn unless_signalled_again<T>(
    shutdown: impl std::future::Future<Output = T>,
    signals: &mut impl StopSignals,
    began_with: Option<&'static str>,
) -> Option<T> {
    tokio::pin!(shutdown);
    let mut first = began_with.is_none();
    // The stop began as the signal that began it came.
    let mut previous = began_with.map(|signal| (signal, tokio::time::Instant::now()));
    loop {
        tokio::select! {
            finished = &mut shutdown => return Some(finished),
            signal = signals.next() => {
                let counted_one_before = !std::mem::take(&mut first);
                let now = tokio::time::Instant::now();
                let again = previous.is_some_and(|(sent, at)| {
                    sent == signal && now.duration_since(at) < SAME_REQUEST
                });
                // The window stays where the first of a burst opened it: Ctrl-C
                // pressed every 200 ms never exited (review).
                if !again {
                    previous = Some((signal, now));
                }
                if counted_one_before && signal == "SIGINT" && !again {
                    return None;
                }
                tracing::info!(signal, "already stopping; SIGINT (Ctrl-C) now exits at once");
            }
        }
    }
}

/// Signals closer than this to the first of their burst are one request sent twice
/// (to the process, then to its group); a person pressing Ctrl-C twice is slower.
const SAME_REQUEST: std::time::Duration = std::time::Duration::from_millis(250);

/// SIGTERM, SIGINT and SIGHUP (a closed terminal), listened to from the start of `run`
/// to its end: each stops the runtime gracefully. SIGINT and SIGHUP are not listened
/// to when the runtime was started with them ignored ([`inherited_ignored`]).
///
/// One listener for the whole run, not one per wait: a signal that arrives between two
/// waits (say right after "stopping" is logged) is kept for the next wait instead of
/// being lost before a fresh listener exists.
struct ShutdownSignals {
    streams: Option<[Option<tokio::signal::unix::Signal>; 3]>,
}

impl ShutdownSignals {
    fn listen() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let unless_ignored = |number, kind| match inherited_ignored(number) {
            true => Ok(None),
            false => signal(kind).map(Some),
        };
        let streams = match (
            signal(SignalKind::terminate()),
            unless_ignored(libc::SIGINT, SignalKind::interrupt()),
            unless_ignored(libc::SIGHUP, SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Some([Some(term), int, hup]),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM/SIGINT/SIGHUP");
                None
            }
        };
        Self { streams }
    }
}

/// Whether the runtime was started with `signal` ignored: `nohup` ignores SIGHUP, and
/// a shell starts a background job with SIGINT ignored. Listening would undo that:
/// under `nohup` a hang-up, and in a script's background job a Ctrl-C meant for the
/// foreground, stopped the runtime (review).
fn inherited_ignored(signal: libc::c_int) -> bool {
    // SAFETY: with no new action given, sigaction only writes the current one into
    // `current`, a zeroed struct of the right type.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

impl StopSignals for ShutdownSignals {
    /// Waits for the next SIGTERM, SIGINT or SIGHUP and names it.
    async fn next(&mut self) -> &'static str {
        let Some([term, int, hup]) = self.streams.as_mut() else {
            return std::future::pending().await;
        };
        async fn received(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = received(term) => "SIGTERM",
            () = received(int) => "SIGINT",
            () = received(hup) => "SIGHUP",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// U+202E in a JSON log line reordered it on a terminal; the text format escaped
    /// it (review). The line stays JSON that reads back the same.
    #[test]
    fn a_json_line_escapes_what_a_terminal_would_act_on() {
        let event = serde_json::json!({"fields": {"reason": "abc\u{202e}def\u{2028}x"}});
        let line = format!("{event}\n");
        assert!(
            line.contains('\u{202e}'),
            "serde_json writes it raw: {line}"
        );
        let escaped = bidi_escaped(&line);
        assert!(
            !escaped.contains('\u{202e}') && !escaped.contains('\u{2028}'),
            "{escaped}"
        );
        assert!(escaped.contains("\\u202e"), "{escaped}");
        let read: serde_json::Value = serde_json::from_str(&escaped).expect("still JSON");
        assert_eq!(read, event);
        assert!(matches!(
            bidi_escaped("{}\n"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    /// lapin's WARN of a message RabbitMQ returned dumped its headers and body whole,
    /// at the default level (outsider attack); the protocol crates' TRACE dumps frames
    /// and the login. Neither is written, whatever RUST_LOG says; the rest is.
    #[test]
    fn no_level_writes_a_frame_or_a_message_dump() {
        use tracing::Level;
        assert!(!never_dumps("lapin::returned_messages", Level::WARN));
        assert!(!never_dumps("lapin::returned_messages", Level::ERROR));
        assert!(!never_dumps("lapin::io_loop", Level::TRACE));
        assert!(!never_dumps("fe2o3_amqp::session", Level::TRACE));
        assert!(never_dumps("lapin::io_loop", Level::DEBUG));
        assert!(never_dumps("lapin::channel", Level::WARN));
        assert!(never_dumps("queue_amqp091::consume", Level::TRACE));
    }

    /// These signals, one per call, counting each as it is read; none after them.
    struct Told {
        /// Each signal, and how long after the one before it comes.
        left: Vec<(&'static str, std::time::Duration)>,
        read: std::rc::Rc<std::cell::Cell<usize>>,
    }

    impl StopSignals for Told {
        async fn next(&mut self) -> &'static str {
            match self.left.pop() {
                Some((signal, after)) => {
                    tokio::time::sleep(after).await;
                    self.read.set(self.read.get() + 1);
                    signal
                }
                None => std::future::pending().await,
            }
        }
    }

    #[test]
    fn header_values_are_typed_only_when_they_read_as_written() {
        let given = [
            "n=42",
            "ratio=0.5",
            "urgent=true",
            "zip=00042",
            "not_a_number=nan",
            "huge=inf",
            "plus=+7",
            "message_id=1001",
            "correlation_id=true",
            "quoted=\"12\"",
            "word=hello",
        ]
        .map(String::from);
        let headers = parse_headers(&given).unwrap();
        let get = |k: &str| headers.get(k).cloned();
        assert_eq!(get("n"), Some(HeaderValue::Int(42)));
        assert_eq!(get("ratio"), Some(HeaderValue::Float(0.5)));
        assert_eq!(get("urgent"), Some(HeaderValue::Bool(true)));
        for (key, text) in [
            ("zip", "00042"),
            ("not_a_number", "nan"),
            ("huge", "inf"),
            ("message_id", "1001"),
            ("correlation_id", "true"),
            ("quoted", "12"),
            ("word", "hello"),
            ("plus", "+7"),
        ] {
            assert_eq!(get(key), Some(HeaderValue::String(text.into())), "{key}");
        }
    }

    /// The fields of a Lua `logger` line were a string of JSON in the JSON log
    /// (review): they are the object it holds, in their place in the line.
    #[test]
    fn lua_fields_are_an_object_in_the_json_log() {
        let fields = r#"{"to":"ada@example.com","note":"say \"hi\"\n","n":1,"é":[true,null]}"#;
        let line = format!(
            "{{\"timestamp\":\"t\",\"level\":\"INFO\",\"fields\":{{\"message\":\"Processing\",\"fields\":{}}},\"target\":\"lua\"}}\n",
            serde_json::to_string(fields).unwrap()
        );
        let inline = lua_fields_inline(&line);
        let event: serde_json::Value = serde_json::from_str(&inline).unwrap();
        assert_eq!(
            event["fields"]["fields"]["note"], "say \"hi\"\n",
            "{inline}"
        );
        assert_eq!(event["fields"]["fields"]["n"], 1, "{inline}");
        assert_eq!(event["fields"]["message"], "Processing");
        assert!(
            inline.starts_with(r#"{"timestamp":"t","level":"INFO","fields":{"#),
            "{inline}"
        );
        assert!(inline.ends_with("}\n"), "{inline:?}");
        // A line without fields has an object too.
        let bare = "{\"fields\":{\"message\":\"x\",\"fields\":\"\"},\"target\":\"lua\"}\n";
        let event: serde_json::Value = serde_json::from_str(&lua_fields_inline(bare)).unwrap();
        assert_eq!(event["fields"]["fields"], serde_json::json!({}));
        // What does not read is left as it was.
        for odd in [
            "not json\n",
            "{\"fields\":{\"fields\":\"{oops\"}}\n",
            "{\"fields\":{}}\n",
        ] {
            assert_eq!(lua_fields_inline(odd), odd);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_sigint_after_the_first_signal_cuts_a_stop_short() {
        use std::time::Duration;
        let apart = Duration::from_secs(1);
        // One stop request sent twice (GNU `timeout` signals the process, then its
        // group): the second within a millisecond.
        let twice = Duration::from_millis(1);
        // Whether a signal began the stop, the signals that come during it (in that
        // order, each this long after the one before), and whether they cut it short.
        let (term, int) = (Some("SIGTERM"), Some("SIGINT"));
        for (by_signal, signals, cut_short) in [
            (term, vec![], false),
            (term, vec![("SIGINT", apart)], true),
            (term, vec![("SIGINT", twice)], true),
            (int, vec![("SIGINT", apart)], true),
            (int, vec![("SIGINT", twice)], false),
            (int, vec![("SIGINT", twice), ("SIGINT", apart)], true),
            (term, vec![("SIGTERM", twice)], false),
            (term, vec![("SIGTERM", apart)], false),
            (term, vec![("SIGHUP", apart), ("SIGTERM", apart)], false),
            (term, vec![("SIGTERM", apart), ("SIGINT", twice)], true),
            (None, vec![("SIGTERM", apart)], false),
            (None, vec![("SIGINT", apart)], false),
            (None, vec![("SIGTERM", apart), ("SIGTERM", apart)], false),
            (None, vec![("SIGTERM", apart), ("SIGINT", apart)], true),
            (None, vec![("SIGINT", apart), ("SIGINT", apart)], true),
            (None, vec![("SIGINT", apart), ("SIGINT", twice)], false),
            // Pressed every 200 ms: the second is past the first's window.
            (
                int,
                vec![
                    ("SIGINT", Duration::from_millis(200)),
                    ("SIGINT", Duration::from_millis(200)),
                ],
                true,
            ),
        ] {
            let read = std::rc::Rc::default();
            let sent = signals.len();
            let mut told = Told {
                left: signals.iter().rev().copied().collect(),
                read: std::rc::Rc::clone(&read),
            };
            // A shutdown that ends once every signal was read.
            let shutdown = async {
                while read.get() < sent {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                "summary"
            };
            let outcome = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                unless_signalled_again(shutdown, &mut told, by_signal),
            )
            .await
            .expect("bounded");
            assert_eq!(
                outcome.is_none(),
                cut_short,
                "began with {by_signal:?}, then {signals:?}"
            );
        }
    }
    use tracing::Subscriber;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt;

    /// The log's most verbose level is RUST_LOG's: below it, a `trace!` in a driver's
    /// per-message path is skipped before any event is built.
    #[test]
    fn the_log_tells_tracing_its_most_verbose_level() {
        for (directives, level) in [
            ("info", LevelFilter::INFO),
            ("warn,queue_amqp091=debug", LevelFilter::DEBUG),
            ("lapin=trace", LevelFilter::TRACE),
        ] {
            let filter = tracing_subscriber::EnvFilter::new(directives);
            let subscriber =
                tracing_subscriber::registry().with(log_layer(LogFormat::Text, filter));
            assert_eq!(
                subscriber.max_level_hint(),
                Some(level),
                "RUST_LOG={directives}"
            );
        }
    }
}
