//! From entries to a plan: which drivers, queues (with their dead-letter queues),
//! consumers and processes to start, with every reference resolved and every source
//! checked. Building the plan touches no broker, so `check` and `run` share it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use queue_core::retry::RetryPolicy;
use queue_core::security::{Actor, Effect, Pattern, Policy, RulePolicy, SecurityContext};
use queue_core::{
    Backoff, Capabilities, DriverFactory, Factory, PublishSettings, QueueId, QueueSpec,
};
use queue_lua::{Limits, LuaSource, OptIn, SourceCheck};

use crate::config::Config;
use crate::config::{
    ConfigError, ConfigErrors, DeadLetterConfig, DriverFields, EffectName, Entry, EntryKind,
    EntrySecurity, QueueEntry, RetryConfig, SandboxConfig,
};

/// The name of the embedded memory driver used when a configuration declares none.
pub const EMBEDDED_DRIVER: &str = "embedded:memory";

/// The driver kinds the runtime knows: one factory per `queue.driver.<name>`.
#[derive(Clone, Default)]
pub struct DriverKinds {
    factories: BTreeMap<&'static str, Arc<dyn DriverFactory>>,
}

impl DriverKinds {
    /// Every driver this build ships: the memory driver, and each broker driver whose
    /// cargo feature is on. Adding a driver is one line here.
    pub fn builtin() -> Self {
        let mut kinds = DriverKinds::default();
        kinds.register(Arc::new(Factory::<queue_core::memory::MemoryConfig>::new()));
        #[cfg(feature = "amqp091")]
        kinds.register(Arc::new(Factory::<queue_amqp091::Amqp091Config>::new()));
        #[cfg(feature = "amqp10")]
        kinds.register(Arc::new(Factory::<queue_amqp10::Amqp10Config>::new()));
        #[cfg(feature = "redis")]
        kinds.register(Arc::new(Factory::<queue_redis::RedisConfig>::new()));
        kinds
    }

    /// Registers a factory under its kind.
    pub fn register(&mut self, factory: Arc<dyn DriverFactory>) {
        self.factories.insert(factory.kind(), factory);
    }

    /// The factory of a kind.
    pub fn get(&self, kind: &str) -> Option<&Arc<dyn DriverFactory>> {
        self.factories.get(kind)
    }

    /// The known kinds, for messages.
    pub fn names(&self) -> Vec<&'static str> {
        self.factories.keys().copied().collect()
    }
}

/// A driver to create.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverPlan {
    /// Entry id (or [`EMBEDDED_DRIVER`]).
    pub id: String,
    /// `queue.driver.*`.
    pub kind: String,
    /// Fields for the factory (`Debug` shows their names only).
    pub config: DriverFields,
    /// What the driver will be able to do, as its factory read the fields.
    pub capabilities: Capabilities,
}

/// The retry policy a `retry:` section describes.
fn retry_policy(r: &RetryConfig) -> RetryPolicy {
    RetryPolicy {
        max_attempts: r.max_attempts,
        backoff: Backoff::new(r.backoff.initial, r.backoff.multiplier, r.backoff.max)
            .with_jitter(r.backoff.jitter),
    }
}

/// A queue to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuePlan {
    /// Declaration.
    pub spec: QueueSpec,
    /// Codec and size limit.
    pub settings: PublishSettings,
    /// Driver id.
    pub driver: String,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Where exhausted messages go (`None`: dropped, logged and counted).
    pub dead_letter: Option<QueueId>,
}

/// A consumer to start.
#[derive(Debug, Clone)]
pub struct ConsumerPlan {
    /// Entry id.
    pub id: String,
    /// The queue it reads.
    pub queue: QueueId,
    /// The Lua file, as read and checked when planning: every worker runs this text.
    pub source: LuaSource,
    /// The handler function.
    pub method: String,
    /// Handlers at once.
    pub concurrency: u32,
    /// Unsettled deliveries held.
    pub prefetch: u32,
    /// Shutdown wait.
    pub stop_timeout: Duration,
    /// Longest a handler run may take.
    pub timeout: Option<Duration>,
    /// Retry non-retryable handler errors too.
    pub retry_all_errors: bool,
    /// Actor and policies.
    pub security: SecurityContext,
    /// What its Lua file may use beyond the sandbox's safe library.
    pub opt_in: OptIn,
}

/// A process to run at start.
#[derive(Debug, Clone)]
pub struct ProcessPlan {
    /// Entry id.
    pub id: String,
    /// The Lua file, as read and checked when planning: every worker runs this text.
    pub source: LuaSource,
    /// The function.
    pub method: String,
    /// Coroutines running it.
    pub instances: u32,
    /// Actor and policies.
    pub security: SecurityContext,
    /// What its Lua file may use beyond the sandbox's safe library.
    pub opt_in: OptIn,
}

/// Everything to start, resolved and checked.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Drivers.
    pub drivers: Vec<DriverPlan>,
    /// Queues, dead-letter queues included.
    pub queues: Vec<QueuePlan>,
    /// Consumers.
    pub consumers: Vec<ConsumerPlan>,
    /// Processes.
    pub processes: Vec<ProcessPlan>,
    /// Strict mode.
    pub strict: bool,
    /// The limits of every Lua state.
    pub lua_limits: Limits,
    /// The entries that run as an actor, with their policies: what
    /// `publish --actor` applies.
    pub actors: Vec<ActorEntry>,
    /// Where each queue is, for [`Plan::queue`].
    queues_by_id: crate::by_id::ById,
}

/// A consumer or process that runs as an actor.
#[derive(Debug, Clone)]
pub struct ActorEntry {
    /// The actor's id.
    pub actor: String,
    /// The entry's id.
    pub entry: String,
    /// Its policies' entry ids.
    pub policy_ids: Vec<String>,
    /// Its security context.
    pub security: SecurityContext,
}

impl Plan {
    /// The queue plan of an id.
    pub fn queue(&self, id: &QueueId) -> Option<&QueuePlan> {
        self.queues_by_id
            .find(&self.queues, id.as_str(), |q| q.spec.id.as_str())
    }

    /// The queues some queue dead-letters into: taken once by whoever asks it of
    /// every consumer, since each question scans every queue.
    pub fn dead_letter_queues(&self) -> std::collections::HashSet<&QueueId> {
        self.queues
            .iter()
            .filter_map(|q| q.dead_letter.as_ref())
            .collect()
    }

    /// Whether this queue lives on the embedded or a declared memory driver.
    pub fn is_in_memory(&self, id: &QueueId) -> bool {
        self.queue(id)
            .and_then(|q| self.drivers.iter().find(|d| d.id == q.driver))
            .is_some_and(|d| d.kind == queue_core::memory::KIND)
    }

    /// The security context of a command-line publish (docs/operations.md): as
    /// `actor`, with the policies of the entries that run as that actor (none when no
    /// entry does). Entries of one actor with different policies make it ambiguous.
    pub fn cli_security(&self, actor: Option<Actor>) -> Result<SecurityContext, String> {
        let Some(actor) = actor else {
            return Ok(SecurityContext::new(None, Vec::new(), self.strict));
        };
        let runs_as: Vec<&ActorEntry> =
            self.actors.iter().filter(|a| a.actor == actor.id).collect();
        let Some((first, rest)) = runs_as.split_first() else {
            return Ok(SecurityContext::new(Some(actor), Vec::new(), self.strict));
        };
        if let Some(other) = rest.iter().find(|a| a.policy_ids != first.policy_ids) {
            return Err(format!(
                "actor {:?} runs entries with different policies ({} has [{}], {} has [{}]): publish as an actor whose entries share their policies",
                actor.id,
                first.entry,
                first.policy_ids.join(", "),
                other.entry,
                other.policy_ids.join(", ")
            ));
        }
        // Checked as a handler's publish is: with the metadata the entries give the
        // actor, which the policies' conditions read.
        let meta_of = |a: &ActorEntry| a.security.actor().map(|actor| actor.meta.clone());
        let meta = meta_of(first).unwrap_or_default();
        if let Some(other) = rest.iter().find(|a| meta_of(a).unwrap_or_default() != meta) {
            return Err(format!(
                "actor {:?} runs entries with different metadata ({} has {:?}, {} has {:?}): publish as an actor whose entries share it",
                actor.id,
                first.entry,
                meta,
                other.entry,
                meta_of(other).unwrap_or_default()
            ));
        }
        if !actor.meta.is_empty() && actor.meta != meta {
            return Err(format!(
                "--actor-meta gives actor {:?} {:?}, but {} runs as it with {:?}: leave --actor-meta out, or give the entries' own",
                actor.id, actor.meta, first.entry, meta
            ));
        }
        let actor = Actor { meta, ..actor };
        Ok(SecurityContext::new(
            Some(actor),
            first.security.policies().to_vec(),
            self.strict,
        ))
    }
}

/// Resolves and checks a configuration. `strict` is the `--strict` flag.
pub fn plan(config: &Config, kinds: &DriverKinds, strict: bool) -> Result<Plan, ConfigErrors> {
    let strict = strict || config.strict_mode;
    let mut errors = Vec::new();
    let mut plan = Plan {
        drivers: Vec::new(),
        queues: Vec::new(),
        consumers: Vec::new(),
        processes: Vec::new(),
        strict,
        lua_limits: Limits {
            memory_bytes: config
                .lua_memory_limit
                .unwrap_or(Limits::DEFAULT_MEMORY_BYTES),
            ..Limits::default()
        },
        actors: Vec::new(),
        queues_by_id: Default::default(),
    };
    let mut texts = SourceTexts::default();
    // Each planned handler's file and method, with the entry that names them.
    let mut to_check: Vec<(&Entry, LuaSource, String, OptIn)> = Vec::new();

    for entry in &config.entries {
        if let EntryKind::Driver { kind, config } = &entry.kind {
            match kinds.get(kind) {
                None => errors.push(entry.error(
                    Some("kind"),
                    format!(
                        "unknown driver kind {kind:?}: this build knows {}",
                        kinds.names().join(", ")
                    ),
                )),
                Some(factory) => {
                    let config = files_beside_yaml(entry, config);
                    match factory.validate(&config) {
                        Ok(capabilities) => plan.drivers.push(DriverPlan {
                            id: entry.id.clone(),
                            kind: kind.clone(),
                            config,
                            capabilities,
                        }),
                        Err(e) => errors.push(driver_error(entry, &e)),
                    }
                }
            }
        }
    }
    let default_driver = match plan.drivers.len() {
        0 => {
            let config = DriverFields(serde_json::json!({}));
            let capabilities = queue_core::memory::CAPABILITIES;
            plan.drivers.push(DriverPlan {
                id: EMBEDDED_DRIVER.to_string(),
                kind: queue_core::memory::KIND.to_string(),
                config,
                capabilities,
            });
            Some(EMBEDDED_DRIVER.to_string())
        }
        1 => Some(plan.drivers[0].id.clone()),
        _ => None,
    };

    for entry in &config.entries {
        if let EntryKind::Queue(q) = &entry.kind {
            match queue_plan(entry, q, &plan, default_driver.as_deref()) {
                Ok(queue) => plan.queues.push(queue),
                Err(e) => errors.push(e),
            }
        }
    }

    errors.extend(dead_letter_cycles(config, &plan));

    // Before consumers, so a consumer can read a dead-letter queue; again after, for the
    // queues that only consumers name.
    add_implicit_dead_letter_queues(&mut plan);
    for entry in &config.entries {
        match &entry.kind {
            EntryKind::Consumer(c) => {
                let queue = entry.resolve(&c.queue);
                let queue = match QueueId::parse(&queue) {
                    Ok(q) => q,
                    Err(e) => {
                        errors.push(entry.error(Some("queue"), e.message()));
                        continue;
                    }
                };
                if plan.queue(&queue).is_none() {
                    match &default_driver {
                        Some(driver) => match default_queue(queue.clone(), driver) {
                            Ok(implied) => plan.queues.push(implied),
                            Err(message) => {
                                errors.push(entry.error(Some("queue"), message));
                                continue;
                            }
                        },
                        None => {
                            errors.push(entry.error(
                                Some("queue"),
                                format!("{queue} is not declared and several drivers are: declare it with a queue.queue entry naming its driver"),
                            ));
                            continue;
                        }
                    }
                }
                // The file is read here, once: what the plan checks and workers run.
                let named = match (&c.func, &c.source, &c.method) {
                    (Some(func), _, _) => {
                        match config.get(&entry.resolve(func)).map(|f| (f, &f.kind)) {
                            Some((f, EntryKind::Function(func))) => (
                                texts.read_for(f, &func.source),
                                func.method.clone(),
                                (f, &func.sandbox),
                            ),
                            _ => {
                                errors.push(entry.error(
                                    Some("func"),
                                    format!("{} is not a function.lua entry", entry.resolve(func)),
                                ));
                                continue;
                            }
                        }
                    }
                    (None, Some(source), Some(method)) => (
                        texts.read_for(entry, source),
                        method.clone(),
                        (entry, &c.sandbox),
                    ),
                    (None, None, Some(method)) => (
                        source_defining(
                            config,
                            entry,
                            &c.sandbox,
                            method,
                            plan.lua_limits,
                            &mut texts,
                        ),
                        method.clone(),
                        (entry, &c.sandbox),
                    ),
                    _ => continue, // refused while parsing
                };
                let (source, method, sandbox) = match named {
                    (Ok(source), method, sandbox) => (source, method, sandbox),
                    (Err(e), _, _) => {
                        errors.push(e);
                        continue;
                    }
                };
                let opt_in = match opt_in(sandbox.0, sandbox.1) {
                    Ok(o) => o,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                let security = match security(config, entry, &c.security, strict) {
                    Ok(s) => s,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                plan.actors
                    .extend(actor_entry(entry, &c.security, &security));
                // Checked against the entry that names the file and method: a
                // `function.lua` entry for a `func:` consumer.
                let named_by = sandbox.0;
                if !to_check
                    .iter()
                    .any(|(e, _, m, o)| std::ptr::eq(*e, named_by) && *m == method && *o == opt_in)
                {
                    to_check.push((named_by, source.clone(), method.clone(), opt_in));
                }
                plan.consumers.push(ConsumerPlan {
                    id: entry.id.clone(),
                    queue,
                    source,
                    method,
                    concurrency: c.concurrency,
                    prefetch: c.prefetch,
                    stop_timeout: c.stop_timeout,
                    timeout: c.timeout,
                    retry_all_errors: c.retry_all_errors,
                    security,
                    opt_in,
                });
            }
            EntryKind::Process(p) => {
                match (
                    security(config, entry, &p.security, strict),
                    opt_in(entry, &p.sandbox),
                    texts.read_for(entry, &p.source),
                ) {
                    (Ok(security), Ok(opt_in), Ok(source)) => {
                        plan.actors
                            .extend(actor_entry(entry, &p.security, &security));
                        to_check.push((entry, source.clone(), p.method.clone(), opt_in));
                        plan.processes.push(ProcessPlan {
                            id: entry.id.clone(),
                            source,
                            method: p.method.clone(),
                            instances: p.instances,
                            security,
                            opt_in,
                        });
                    }
                    (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => errors.push(e),
                }
            }
            _ => {}
        }
    }

    add_implicit_dead_letter_queues(&mut plan);
    errors.extend(queue_wiring(config, &plan));
    errors.extend(holds_past_the_broker(config, &plan));

    for (entry, source, method, opt_in) in &to_check {
        match queue_lua::check_source(source, method, *opt_in, plan.lua_limits) {
            Ok(SourceCheck::Defines) => {}
            Ok(SourceCheck::NotRun { reason }) => tracing::warn!(
                "{}:{}: {}: not verified that {} defines {method:?}: {reason} (a file's top level runs here without what its entry opts into)",
                entry.file.display(),
                entry.line,
                entry.id,
                source.path().display()
            ),
            Err(e) => errors.push(entry.error(Some("source"), e.message())),
        }
    }

    if errors.is_empty() {
        Ok(plan)
    } else {
        // A `function.lua` entry that several consumers name is reported once.
        let mut seen = std::collections::HashSet::new();
        errors.retain(|error| seen.insert(error.clone()));
        Err(ConfigErrors(errors))
    }
}

/// The Lua file that defines `method`, for a consumer entry that names no `source:`
/// (as the seed's entry is written; docs/configuration.md, "Where a consumer's method
/// is found"): among the Lua file named like the entry's YAML file beside it
/// (`app.yaml` -> `app.lua`) and every `source:` of the configuration, the one file
/// that defines it. None, or several, is an error naming the files looked at.
fn source_defining(
    config: &Config,
    entry: &Entry,
    sandbox: &SandboxConfig,
    method: &str,
    limits: Limits,
    texts: &mut SourceTexts,
) -> Result<LuaSource, ConfigError> {
    // Each file is loaded as `check` loads it for the entry that names it (the file
    // beside the YAML, for this consumer): with what that entry opts into.
    let mut candidates = vec![(entry.file.with_extension("lua"), opt_in(entry, sandbox)?)];
    for other in &config.entries {
        let (source, sandbox) = match &other.kind {
            EntryKind::Consumer(c) => match &c.source {
                Some(source) => (source, &c.sandbox),
                None => continue,
            },
            EntryKind::Process(p) => (&p.source, &p.sandbox),
            EntryKind::Function(f) => (&f.source, &f.sandbox),
            _ => continue,
        };
        if let Ok(opt_in) = opt_in(other, sandbox) {
            candidates.push((other.path(source), opt_in));
        }
    }
    // One file reached by two spellings (`app.lua`, `./app.lua`) is looked at once.
    let mut seen = std::collections::HashSet::new();
    candidates.retain(|(path, _)| seen.insert(std::fs::canonicalize(path).unwrap_or(path.clone())));
    let mut defining = Vec::new();
    let mut unknown = Vec::new();
    let mut looked = Vec::new();
    for (path, opt_in) in candidates {
        let name = path.display().to_string();
        if !path.exists() {
            looked.push(format!("{name} (no such file)"));
            continue;
        }
        let checked = texts.read(&path).and_then(|source| {
            Ok((
                queue_lua::check_source(&source, method, opt_in, limits)?,
                source,
            ))
        });
        match checked {
            Ok((SourceCheck::Defines, source)) => defining.push(source),
            Ok((SourceCheck::NotRun { .. }, _)) => unknown.push(name),
            // "FILE defines no function ...", or why FILE does not load.
            Err(e) => looked.push(e.message().to_string()),
        }
    }
    // A file `check` cannot run (its top level needs an opt-in) might define the
    // method too: never guess past it.
    if !unknown.is_empty() {
        return Err(entry.error(
            Some("method"),
            format!(
                "cannot tell which Lua file defines {method:?}: the top level of {} needs what its entry opts into, which check does not run; add `source: FILE`",
                unknown.join(", ")
            ),
        ));
    }
    match defining.len() {
        1 => Ok(defining.remove(0)),
        0 => Err(entry.error(
            Some("method"),
            format!(
                "no Lua file of this configuration defines {method:?}: looked in {}; add `source: FILE` naming the file that does",
                looked.join(", ")
            ),
        )),
        _ => Err(entry.error(
            Some("method"),
            format!(
                "{method:?} is defined in several Lua files: {}; add `source: FILE` to choose one",
                defining
                    .iter()
                    .map(|s| s.path().display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// The Lua files read while planning, each once: a file read for two entries (under
/// any spelling of its path), or for finding a method and then for its entry, is one
/// text, and the text checked is the text the workers run (docs/configuration.md,
/// "When Lua files are read").
#[derive(Default)]
struct SourceTexts(HashMap<PathBuf, LuaSource>);

impl SourceTexts {
    fn read(&mut self, path: &Path) -> queue_core::Result<LuaSource> {
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        if let Some(source) = self.0.get(&key) {
            return Ok(LuaSource::from_code(path, source.shared_code()));
        }
        let source = LuaSource::read(path)?;
        self.0.insert(key, source.clone());
        Ok(source)
    }

    /// The file `relative` that `entry` names, an error on its `source` field if it
    /// cannot be read (for a consumer with `func:`, on the `function.lua` entry).
    fn read_for(&mut self, entry: &Entry, relative: &str) -> Result<LuaSource, ConfigError> {
        self.read(&entry.path(relative))
            .map_err(|e| entry.error(Some("source"), e.message()))
    }
}

/// Dead-letter queues that lead back to where they started (`a` to `b`, `b` to `a`):
/// one poison message would bounce between them forever.
fn dead_letter_cycles(config: &Config, plan: &Plan) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for start in &plan.queues {
        let mut path = vec![&start.spec.id];
        let mut next = start.dead_letter.as_ref();
        while let Some(id) = next {
            if id == &start.spec.id {
                let cycle: Vec<String> = path.iter().map(|q| q.to_string()).collect();
                if let Some(entry) = config.get(start.spec.id.as_str()) {
                    errors.push(entry.error(
                        Some("dead_letter"),
                        format!(
                            "dead-letter queues form a cycle: {} -> {id}; a message that keeps failing would bounce between them",
                            cycle.join(" -> ")
                        ),
                    ));
                }
                break;
            }
            if path.contains(&id) {
                break; // a cycle that does not pass through `start`: reported from its own queues
            }
            path.push(id);
            next = plan.queue(id).and_then(|q| q.dead_letter.as_ref());
        }
    }
    errors
}

/// Consumers that would hold a delivery past what their broker allows
/// ([`Capabilities::max_unsettled`], RabbitMQ's `consumer_timeout`): a handler
/// `timeout` that reaches it, or a backoff waited out holding the delivery on a
/// driver without `delay`. The broker takes the delivery back and ends the channel,
/// and the message comes back with the same `attempts`: retried for ever, never
/// dead-lettered (docs/consumers.md, "Handler time limits").
fn holds_past_the_broker(config: &Config, plan: &Plan) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let shown = |d: Duration| humantime::format_duration(d).to_string();
    let dead_letter_queues = plan.dead_letter_queues();
    for consumer in &plan.consumers {
        let Some(queue) = plan.queue(&consumer.queue) else {
            continue;
        };
        let Some(driver) = plan.drivers.iter().find(|d| d.id == queue.driver) else {
            continue;
        };
        let (Some(limit), Some(entry)) =
            (driver.capabilities.max_unsettled, config.get(&consumer.id))
        else {
            continue;
        };
        let advice = format!(
            "the broker takes back a delivery left unsettled for its consumer_timeout ({}: driver {}'s consumer_timeout) and ends the channel: the message comes back with the same attempts, retried for ever and never dead-lettered; stay under it, or set the driver's consumer_timeout to the broker's own",
            shown(limit),
            driver.id
        );
        if let Some(timeout) = consumer.timeout
            && timeout >= limit
        {
            errors.push(entry.error(
                Some("timeout"),
                format!("a handler may run for {}: {advice}", shown(timeout)),
            ));
        }
        // A dead-letter queue, or a queue without one, keeps a failing dead letter.
        let keeps_dead_letters =
            dead_letter_queues.contains(&queue.spec.id) || queue.dead_letter.is_none();
        let longest = queue.retry.longest_wait(keeps_dead_letters);
        let holds = !driver.capabilities.delay;
        if let Some(timeout) = consumer.timeout
            && holds
            && timeout < limit
            && longest < limit
            && timeout.saturating_add(longest) >= limit
        {
            errors.push(entry.error(
                Some("timeout"),
                format!(
                    "a handler may run for {} and its failed delivery is then held through a backoff of up to {} (the retry policy of {}: driver {} has no delayed delivery), {} unsettled in all: {advice}",
                    shown(timeout),
                    shown(longest),
                    queue.spec.id,
                    driver.id,
                    shown(timeout.saturating_add(longest))
                ),
            ));
        }
        if holds && longest >= limit {
            let (entry, field) = match config.get(queue.spec.id.as_str()) {
                Some(queue_entry) => (queue_entry, "retry"),
                None => (entry, "queue"),
            };
            errors.push(entry.error(
                Some(field),
                format!(
                    "the backoff of {} reaches {} (its longest wait, from its retry policy), which driver {} waits out holding the failed delivery (it has no delayed delivery): {advice}",
                    queue.spec.id,
                    shown(longest),
                    driver.id
                ),
            ));
        }
    }
    errors
}

/// Queues that would be one queue on their broker, and dead letters that would not
/// outlive the process (and, warned of, dead letters that would expire). Both passed `check`: two entries with one broker name
/// (`queue_name`, or an id equal to another's `<name>.dlq`) became one queue served by
/// both consumers, and dead letters of a broker's queue sent to the memory driver were
/// acked on the broker and lost when the process ended.
fn queue_wiring(config: &Config, plan: &Plan) -> Vec<ConfigError> {
    // The first queue that dead-letters into each (a map: a scan per queue made
    // checking many queues quadratic).
    let mut sends_to: HashMap<&QueueId, &QueuePlan> = HashMap::new();
    for q in &plan.queues {
        if let Some(dlq) = &q.dead_letter {
            sends_to.entry(dlq).or_insert(q);
        }
    }
    // The entry to point at for a queue: its own, or for a dead-letter queue no entry
    // declares, the `dead_letter` of a queue that sends to it.
    let located = |id: &QueueId| match config.get(id.as_str()) {
        Some(entry) => Some((entry, "queue_name")),
        None => sends_to
            .get(id)
            .and_then(|q| config.get(q.spec.id.as_str()))
            .map(|entry| (entry, "dead_letter")),
    };
    // The entry and field that make a queue's broker name: its own entry's
    // `queue_name` (or `name`), the `dead_letter` that implies it, or the `queue` of a
    // consumer that names it.
    let made_by = |id: &QueueId| {
        match config.get(id.as_str()) {
        Some(entry) => Some(match &entry.kind {
            EntryKind::Queue(q) if q.queue_name.is_none() => (entry, "name"),
            _ => (entry, "queue_name"),
        }),
        None => located(id).or_else(|| {
            config
                .entries
                .iter()
                .find(|e| matches!(&e.kind, EntryKind::Consumer(c) if e.resolve(&c.queue) == id.as_str()))
                .map(|entry| (entry, "queue"))
        }),
    }
    };
    let mut errors = Vec::new();
    // Dead-letter queues with a TTL, warned of once each.
    let mut expiring = std::collections::HashSet::new();
    // The first queue of each broker name on each driver, but on memory drivers.
    let mut by_name: HashMap<(&str, &str), &QueuePlan> = HashMap::new();
    for q in &plan.queues {
        if let Some(dlq) = &q.dead_letter
            && plan
                .queue(dlq)
                .is_some_and(|d| d.spec.message_ttl.is_some())
            && let Some(entry) = config.get(dlq.as_str())
            && expiring.insert(dlq)
        {
            // A TTL caps what a dead-letter queue holds, which some want: said, not
            // refused (a configuration that ran before still runs).
            tracing::warn!(
                "{}:{}: {dlq} holds the dead letters of {} and has a message_ttl: its dead letters expire out of it, unseen",
                entry.file.display(),
                entry.line,
                q.spec.id
            );
        }
        let max_name = plan
            .drivers
            .iter()
            .find(|d| d.id == q.driver)
            .and_then(|d| d.capabilities.max_queue_name_bytes);
        if let Some(max) = max_name
            && q.spec.name.len() > max
            && let Some((entry, field)) = made_by(&q.spec.id)
        {
            errors.push(entry.error(
                Some(field),
                format!(
                    "the broker name of {} is {} bytes: driver {} takes at most {max} (give it a shorter queue_name)",
                    q.spec.id,
                    q.spec.name.len(),
                    q.driver
                ),
            ));
        }
        let reserved = plan
            .drivers
            .iter()
            .find(|d| d.id == q.driver)
            .map_or(&[][..], |d| d.capabilities.reserved_queue_name_prefixes);
        if let Some(prefix) = reserved.iter().find(|p| q.spec.name.starts_with(**p))
            && let Some((entry, field)) = made_by(&q.spec.id)
        {
            errors.push(entry.error(
                Some(field),
                format!(
                    "the broker name {:?} of {} begins with {prefix:?}, which the broker of driver {} keeps for itself and refuses to declare (give another queue_name)",
                    q.spec.name, q.spec.id, q.driver
                ),
            ));
        }
        // A memory driver keeps its queues by id: one name there is no clash.
        let same = match plan.is_in_memory(&q.spec.id) {
            true => None,
            false => match by_name.entry((q.driver.as_str(), q.spec.name.as_str())) {
                std::collections::hash_map::Entry::Occupied(first) => Some(*first.get()),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(q);
                    None
                }
            },
        };
        // Told at the later queue's entry, or at the earlier's when no entry declares
        // the later (a queue a consumer implies, or its dead-letter queue).
        if let Some(first) = same
            && let Some((entry, field)) = located(&q.spec.id).or_else(|| located(&first.spec.id))
        {
            errors.push(entry.error(
                Some(field),
                format!(
                    "{} and {} are both the queue {:?} on driver {}: on a broker they would be one queue, served by the consumers of both (give one another queue_name)",
                    first.spec.id, q.spec.id, q.spec.name, q.driver
                ),
            ));
        }
        if let Some(dlq) = &q.dead_letter
            && !plan.is_in_memory(&q.spec.id)
            && plan.is_in_memory(dlq)
            && let Some(entry) = config.get(q.spec.id.as_str())
        {
            errors.push(entry.error(
                Some("dead_letter"),
                format!(
                    "{dlq} is on a memory driver: dead letters of {}, acked on its broker, would be lost when the process ends (put the dead-letter queue on a broker's driver)",
                    q.spec.id
                ),
            ));
        }
    }
    errors
}

/// Dead-letter targets that no entry declares are declared like their source queue,
/// on the same driver, with the broker name `<name>.dlq`.
fn add_implicit_dead_letter_queues(plan: &mut Plan) {
    let mut implicit: Vec<QueuePlan> = Vec::new();
    let mut added = std::collections::HashSet::new();
    for q in &plan.queues {
        if let Some(dlq) = &q.dead_letter
            && plan.queue(dlq).is_none()
            && added.insert(dlq.clone())
        {
            implicit.push(QueuePlan {
                spec: QueueSpec::new(dlq.clone())
                    .with_name(format!("{}.dlq", q.spec.name))
                    .with_durable(q.spec.durable)
                    .with_queue_type(q.spec.queue_type),
                settings: q.settings,
                driver: q.driver.clone(),
                retry: q.retry.clone(),
                dead_letter: None,
            });
        }
    }
    plan.queues.append(&mut implicit);
}

/// A driver factory's error, at the line of the field its `field` detail names.
fn driver_error(entry: &Entry, error: &queue_core::Error) -> ConfigError {
    let field = error.details().get("field").map(String::as_str);
    let mut message = error.message();
    // The error shows the field itself: say it once.
    for prefix in [Some(entry.kind.name()), field].into_iter().flatten() {
        message = message
            .strip_prefix(prefix)
            .and_then(|m| m.strip_prefix(": "))
            .unwrap_or(message);
    }
    entry.error(field, message)
}

/// A driver entry's fields with each relative path (the value of a field named
/// `*_file`, at any depth: `tls.ca_file`) taken from beside the entry's YAML file, as a
/// `source:` is (docs/configuration.md, "Drivers"), not from the working directory.
fn files_beside_yaml(entry: &Entry, fields: &DriverFields) -> DriverFields {
    fn walk(value: &mut serde_json::Value, entry: &Entry) {
        let serde_json::Value::Object(fields) = value else {
            return;
        };
        for (name, value) in fields.iter_mut() {
            match value {
                serde_json::Value::String(path)
                    if name.ends_with("_file") && Path::new(path.as_str()).is_relative() =>
                {
                    if let Ok(beside) = entry.path(path).into_os_string().into_string() {
                        *path = beside;
                    }
                }
                other => walk(other, entry),
            }
        }
    }
    let mut fields = fields.clone();
    walk(&mut fields.0, entry);
    fields
}

/// The plan of a queue only a consumer names, with the defaults: a dead-letter queue
/// `<id>.dlq`; an id that leaves no room for it is refused (its messages would be
/// dropped after their last attempt, which nobody asked for).
fn default_queue(id: QueueId, driver: &str) -> Result<QueuePlan, String> {
    let retry = retry_policy(&RetryConfig::default());
    let dead_letter = QueueId::parse(&format!("{id}.dlq")).map_err(|e| {
        format!(
            "{id} is not declared, and its id leaves no room for its dead-letter queue ({}): declare it with a queue.queue entry that names its dead_letter (or says false)",
            e.message()
        )
    })?;
    Ok(QueuePlan {
        spec: QueueSpec::new(id),
        settings: PublishSettings::default(),
        driver: driver.to_string(),
        retry,
        dead_letter: Some(dead_letter),
    })
}

fn queue_plan(
    entry: &Entry,
    q: &QueueEntry,
    plan: &Plan,
    default_driver: Option<&str>,
) -> Result<QueuePlan, ConfigError> {
    let id = QueueId::parse(&entry.id).map_err(|e| entry.error(Some("name"), e.message()))?;
    let driver = match (&q.driver, default_driver) {
        (Some(d), _) => {
            let d = entry.resolve(d);
            if !plan.drivers.iter().any(|p| p.id == d) {
                return Err(entry.error(Some("driver"), format!("{d} is not a declared driver")));
            }
            d
        }
        (None, Some(d)) => d.to_string(),
        (None, None) => {
            return Err(entry.error(
                Some("driver"),
                "several drivers are declared: name the one this queue lives on",
            ));
        }
    };
    let mut spec = QueueSpec::new(id.clone()).with_durable(q.durable);
    if let Some(name) = &q.queue_name {
        // An empty name asks RabbitMQ for a queue it names itself (`amq.gen-...`), which
        // nothing publishes to; a longer one, or its `.dlq`, no AMQP 0-9-1 broker takes.
        let implies_dlq = matches!(q.dead_letter, None | Some(DeadLetterConfig::Enabled(true)));
        let room = if implies_dlq { ".dlq".len() } else { 0 };
        if name.trim().is_empty() || name.len() + room > QueueId::MAX_LEN {
            return Err(entry.error(
                Some("queue_name"),
                format!(
                    "must not be empty and must take at most {} bytes{}",
                    QueueId::MAX_LEN,
                    if implies_dlq {
                        " with the `.dlq` of its dead-letter queue"
                    } else {
                        ""
                    }
                ),
            ));
        }
        spec = spec.with_name(name);
    }
    spec.max_length = q.max_length;
    spec.max_priority = q.max_priority;
    spec.message_ttl = q.message_ttl;
    spec.queue_type = q.queue_type.into();
    if let Some(driver_plan) = plan.drivers.iter().find(|d| d.id == driver) {
        spec.check_supported(&driver_plan.kind, &driver_plan.capabilities)
            .map_err(|e| {
                let field = e.details().get("field").map(String::as_str);
                entry.error(field, e.message())
            })?;
    }
    let dead_letter = match &q.dead_letter {
        None | Some(DeadLetterConfig::Enabled(true)) => Some(format!("{id}.dlq")),
        Some(DeadLetterConfig::Enabled(false)) => None,
        // Text where a boolean was meant (`"${DLQ:-false}"`, quoted) is no queue name:
        // the dead letters would go to a queue `app:false`.
        Some(DeadLetterConfig::Queue(text))
            if text.eq_ignore_ascii_case("true") || text.eq_ignore_ascii_case("false") =>
        {
            return Err(entry.error(
                Some("dead_letter"),
                format!("{text:?} is text: write true or false without quotes"),
            ));
        }
        Some(DeadLetterConfig::Queue(other)) => Some(entry.resolve(other)),
    }
    .map(|d| QueueId::parse(&d).map_err(|e| entry.error(Some("dead_letter"), e.message())))
    .transpose()?;
    if dead_letter.as_ref() == Some(&id) {
        return Err(entry.error(
            Some("dead_letter"),
            "a queue cannot be its own dead-letter queue",
        ));
    }
    Ok(QueuePlan {
        spec,
        settings: PublishSettings {
            codec: q.codec.into(),
            max_message_bytes: q.max_message_bytes,
        },
        driver,
        retry: retry_policy(&q.retry),
        dead_letter,
    })
}

fn security(
    config: &Config,
    entry: &Entry,
    s: &EntrySecurity,
    strict: bool,
) -> Result<SecurityContext, ConfigError> {
    let mut policies: Vec<Arc<dyn Policy>> = Vec::new();
    for (i, reference) in s.policies.iter().enumerate() {
        let id = entry.resolve(reference);
        match config.get(&id).map(|e| &e.kind) {
            Some(EntryKind::Policy(p)) => {
                let rule = RulePolicy {
                    actions: p
                        .actions
                        .to_vec()
                        .iter()
                        .map(|a| Pattern::parse(a))
                        .collect(),
                    // Written empty, `resources` is refused when the file is read.
                    resources: match &p.resources {
                        None => vec![Pattern::Any],
                        Some(written) => written
                            .iter()
                            .flat_map(|r| r.to_vec())
                            .map(|a| Pattern::parse(&a))
                            .collect(),
                    },
                    effect: match p.effect {
                        EffectName::Allow => Effect::Allow,
                        EffectName::Deny => Effect::Deny,
                    },
                    conditions: p.conditions.clone(),
                };
                policies.push(Arc::new(rule));
            }
            _ => {
                // Named by its own item, and so its line.
                return Err(entry.error(
                    Some(&format!("security.policies[{i}]")),
                    format!("{id} is not a security.policy entry"),
                ));
            }
        }
    }
    if !policies.is_empty() && s.actor.is_none() {
        // Policies decide for an actor: without one they would apply to nothing, and
        // the entry would publish anywhere its author meant to restrict.
        return Err(entry.error(
            Some("security"),
            "`policies` need an `actor` to apply to: add `actor: { id: ... }` (docs/security.md)",
        ));
    }
    let actor = s.actor.as_ref().map(|a| Actor {
        id: a.id.clone(),
        meta: a.meta.clone(),
    });
    Ok(SecurityContext::new(actor, policies, strict))
}

/// The entry's actor with its policies, if it runs as one.
fn actor_entry(entry: &Entry, s: &EntrySecurity, security: &SecurityContext) -> Option<ActorEntry> {
    let actor = s.actor.as_ref()?;
    Some(ActorEntry {
        actor: actor.id.clone(),
        entry: entry.id.clone(),
        policy_ids: s.policies.iter().map(|r| entry.resolve(r)).collect(),
        security: security.clone(),
    })
}

/// What an entry's `sandbox.allow` opts into.
fn opt_in(entry: &Entry, sandbox: &SandboxConfig) -> Result<OptIn, ConfigError> {
    OptIn::parse(&sandbox.allow).map_err(|e| entry.error(Some("sandbox"), e.message()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory holding `app.yaml` with this text, and these other files.
    fn app_dir(yaml: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app.yaml"), yaml).unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    /// The plan of the `app.yaml` in `dir`.
    fn plan_in(dir: &std::path::Path, strict: bool) -> Result<Plan, ConfigErrors> {
        let config = crate::config::load(&[dir.join("app.yaml")]).unwrap();
        plan(&config, &DriverKinds::builtin(), strict)
    }

    /// Each error's line and field, and whether its message contains `needle`.
    fn located<'e>(errors: &'e [ConfigError], needle: &str) -> Vec<(usize, Option<&'e str>, bool)> {
        errors
            .iter()
            .map(|e| (e.line, e.field.as_deref(), e.message.contains(needle)))
            .collect()
    }

    /// What a broker refuses only when the queue is declared, after `run` waited for
    /// it and with no line to point at, `check` refuses naming the field.
    #[test]
    #[cfg(feature = "amqp091")]
    fn queue_options_every_broker_refuses_fail_check() {
        for (options, field) in [
            ("queue_type: quorum\n    durable: false", "durable"),
            ("max_priority: 0", "max_priority"),
            // A TTL that rounds to 0 ms reached RabbitMQ as x-message-ttl 0: every
            // message not taken at once dropped. Past 2^32 ms a broker refuses it.
            ("message_ttl: 0s", "message_ttl"),
            ("message_ttl: 0.5ms", "message_ttl"),
            ("message_ttl: 1200h", "message_ttl"),
            ("max_length: 0", "max_length"),
        ] {
            let yaml = format!(
                "namespace: app\nentries:\n  - name: mq\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1:5672\n  - name: q\n    kind: queue.queue\n    {options}\n"
            );
            // The error names the field's own line.
            let line = 1 + yaml
                .lines()
                .position(|l| l.trim_start().starts_with(&format!("{field}:")))
                .unwrap();
            let dir = app_dir(&yaml, &[]);
            let errors = plan_in(dir.path(), false).unwrap_err().0;
            assert!(
                errors
                    .iter()
                    .any(|e| e.field.as_deref() == Some(field) && e.line == line),
                "{options}: {errors:?}"
            );
        }
    }

    /// The loaded configuration and its plan are public values a library user may log
    /// with `{:?}`: a driver's URL, password and all, must not show.
    #[test]
    fn debug_output_shows_no_driver_password() {
        let dir = app_dir(
            "namespace: app\nentries:\n  - name: mq\n    kind: queue.driver.amqp\n    url: amqp://app:s3cret@127.0.0.1:5672\n",
            &[],
        );
        let config = crate::config::load(&[dir.path().join("app.yaml")]).unwrap();
        let planned = plan(&config, &DriverKinds::builtin(), false).unwrap();
        for shown in [format!("{config:?}"), format!("{planned:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("url"), "{shown}");
        }
    }

    /// One file named under two spellings is read once: both entries run one text.
    #[test]
    fn a_file_named_two_ways_is_one_text() {
        let dir = app_dir(
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: sub/../h.lua\n    method: handle\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: main\n",
            &[("h.lua", "function handle() end\nfunction main() end\n")],
        );
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let planned = plan_in(dir.path(), false).unwrap();
        let (consumer, process) = (&planned.consumers[0].source, &planned.processes[0].source);
        assert!(Arc::ptr_eq(&consumer.shared_code(), &process.shared_code()));
        // Each keeps the spelling its entry wrote, for its messages.
        assert_eq!(consumer.path(), dir.path().join("sub/../h.lua"));
        assert_eq!(process.path(), dir.path().join("h.lua"));
    }

    /// A `source:` naming a directory or a device is refused on its own line, that of
    /// the `function.lua` entry for a consumer with `func:`.
    #[test]
    fn a_source_that_is_not_a_regular_file_is_an_error_on_its_entry() {
        let dir = app_dir(
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: handlers\n    method: handle\n  - name: p\n    kind: process.lua\n    source: device.lua\n    method: main\n  - name: f\n    kind: function.lua\n    source: handlers\n    method: handle\n  - name: v\n    kind: queue.consumer\n    queue: q\n    func: f\n  - name: v2\n    kind: queue.consumer\n    queue: q\n    func: f\n",
            &[],
        );
        std::fs::create_dir(dir.path().join("handlers")).unwrap();
        // A device, not a pipe: were it read, the test would fail on the message
        // rather than hang (LuaSource's own tests cover a pipe, with a timeout).
        std::os::unix::fs::symlink("/dev/zero", dir.path().join("device.lua")).unwrap();
        let errors = plan_in(dir.path(), false).unwrap_err().0;
        assert_eq!(
            located(&errors, "not a regular file"),
            [
                (6, Some("source"), true),
                (10, Some("source"), true),
                (14, Some("source"), true)
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn a_function_entry_whose_file_lacks_its_method_is_the_error_not_its_consumers() {
        let dir = app_dir(
            "namespace: app\nentries:\n  - name: f\n    kind: function.lua\n    source: h.lua\n    method: absent\n  - name: v\n    kind: queue.consumer\n    queue: q\n    func: f\n  - name: w\n    kind: queue.consumer\n    queue: q\n    func: f\n",
            &[("h.lua", "function present() end\n")],
        );
        let errors = plan_in(dir.path(), false).unwrap_err().0;
        assert_eq!(
            located(&errors, "absent"),
            [(5, Some("source"), true)],
            "{errors:?}"
        );
    }

    /// The seed's entry names only `method`: the file that defines it is found, and
    /// when it is not unique, the error names the files.
    #[test]
    fn a_method_without_a_source_is_found_in_the_one_file_that_defines_it() {
        let seed_entry = "namespace: app\nentries:\n  - kind: queue.consumer\n    id: email_worker\n    queue: app:emails\n    method: handle_email\n  - name: p\n    kind: process.lua\n    source: ./other.lua\n    method: other\n";
        let dir = app_dir(seed_entry, &[("other.lua", "function other() end\n")]);
        let planned = |dir: &std::path::Path| plan_in(dir, false);
        std::fs::write(dir.path().join("app.lua"), "function handle_email() end\n").unwrap();
        let found = planned(dir.path()).unwrap();
        assert_eq!(found.consumers[0].source.path(), dir.path().join("app.lua"));

        std::fs::write(
            dir.path().join("other.lua"),
            "function other() end\nfunction handle_email() end\n",
        )
        .unwrap();
        let e = planned(dir.path()).unwrap_err().0.remove(0);
        assert_eq!((e.line, e.field.as_deref()), (6, Some("method")), "{e}");
        assert!(
            e.message.contains("defined in several Lua files")
                && e.message.contains("app.lua")
                && e.message.contains("other.lua"),
            "{e}"
        );

        std::fs::remove_file(dir.path().join("app.lua")).unwrap();
        let found = planned(dir.path()).unwrap();
        assert_eq!(
            found.consumers[0].source.path(),
            dir.path().join("./other.lua")
        );

        // A file whose top level needs an opt-in cannot be searched at check time: it
        // might define the method too, so nothing is guessed.
        std::fs::write(
            dir.path().join("app.yaml"),
            seed_entry.replace(
                "    method: handle_email\n",
                "    method: handle_email\n    sandbox:\n      allow: [os]\n",
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("app.lua"),
            "local home = os.getenv('HOME')\nfunction handle_email() end\n",
        )
        .unwrap();
        let e = planned(dir.path()).unwrap_err().0.remove(0);
        assert!(
            e.message.contains("cannot tell") && e.message.contains("app.lua"),
            "{e}"
        );
    }

    #[test]
    fn publish_as_an_actor_applies_the_policies_of_its_entries() {
        let entry = |name: &str, actor: &str, policy: &str| {
            format!(
                "  - name: {name}\n    kind: process.lua\n    source: h.lua\n    method: m\n    security:\n      actor: {{ id: {actor} }}\n      policies: [{policy}]\n"
            )
        };
        let text = format!(
            "namespace: app\nentries:\n  - name: app_only\n    kind: security.policy\n    actions: \"queue.*\"\n    resources: \"app:*\"\n    effect: allow\n  - name: anything\n    kind: security.policy\n    actions: \"*\"\n    effect: allow\n{}{}{}",
            entry("a", "worker", "app_only"),
            entry("b", "worker", "app_only"),
            entry("c", "mixed", "app_only") + &entry("d", "mixed", "anything"),
        );
        let dir = app_dir(&text, &[("h.lua", "function m() end\n")]);
        let plan = plan_in(dir.path(), true).unwrap();
        let worker = plan.cli_security(Some(Actor::new("worker"))).unwrap();
        assert!(worker.check("queue.publish", Some("app:tasks")).is_ok());
        assert!(
            worker
                .check("queue.publish", Some("billing:invoices"))
                .is_err()
        );
        // No entry runs as this actor: no policies, so strict mode denies.
        let stranger = plan.cli_security(Some(Actor::new("stranger"))).unwrap();
        assert!(stranger.check("queue.publish", Some("app:tasks")).is_err());
        let err = plan.cli_security(Some(Actor::new("mixed"))).unwrap_err();
        assert!(
            err.contains("different policies") && err.contains("app:c"),
            "{err}"
        );
    }

    /// `publish --actor` is checked with the metadata its entries give the actor, as a
    /// handler's publish is: it took the command line's alone, so a deny that needs
    /// `team: growth` let the command publish where the actor's handlers are refused
    /// (review). Metadata on the command line that differs is refused, naming both.
    #[test]
    fn publish_as_an_actor_takes_the_metadata_of_its_entries() {
        let text = "namespace: app\nentries:\n  - name: anything\n    kind: security.policy\n    actions: \"*\"\n    effect: allow\n  - name: no_billing\n    kind: security.policy\n    actions: \"queue.*\"\n    resources: \"billing:*\"\n    effect: deny\n    conditions: { team: growth }\n  - name: p\n    kind: process.lua\n    source: h.lua\n    method: m\n    security:\n      actor: { id: worker-1, meta: { team: growth } }\n      policies: [anything, no_billing]\n";
        let dir = app_dir(text, &[("h.lua", "function m() end\n")]);
        let plan = plan_in(dir.path(), false).unwrap();
        let worker = plan.cli_security(Some(Actor::new("worker-1"))).unwrap();
        assert!(
            worker
                .check("queue.publish.queue", Some("app:tasks"))
                .is_ok()
        );
        assert!(
            worker
                .check("queue.publish.queue", Some("billing:invoices"))
                .is_err(),
            "the command published where the actor's handlers are refused"
        );
        let same = Actor::new("worker-1").with_meta("team", "growth");
        assert!(plan.cli_security(Some(same)).is_ok());
        let other = Actor::new("worker-1").with_meta("team", "billing");
        let err = plan.cli_security(Some(other)).unwrap_err();
        assert!(err.contains("team") && err.contains("app:p"), "{err}");
    }

    /// Two queues that one broker would hold as one, and dead letters of a broker's
    /// queue sent where they would not outlive the process, fail the plan.
    #[test]
    #[cfg(feature = "amqp091")]
    fn queues_one_broker_would_merge_and_dead_letters_kept_in_memory_fail_the_plan() {
        let head = "namespace: app\nentries:\n  - name: mq\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1:5672\n  - name: mem\n    kind: queue.driver.memory\n";
        for (queues, field, needle) in [
            (
                "  - name: a\n    kind: queue.queue\n    driver: mq\n    queue_name: shared\n  - name: b\n    kind: queue.queue\n    driver: mq\n    queue_name: shared\n",
                "queue_name",
                "one queue",
            ),
            // A name equal to the dead-letter queue another implies: told at the
            // `dead_letter` of the queue that implies it (no entry declares it).
            (
                "  - name: a\n    kind: queue.queue\n    driver: mq\n  - name: c\n    kind: queue.queue\n    driver: mq\n    queue_name: app:a.dlq\n",
                "dead_letter",
                "one queue",
            ),
            (
                "  - name: a\n    kind: queue.queue\n    driver: mq\n    dead_letter: kept\n  - name: kept\n    kind: queue.queue\n    driver: mem\n",
                "dead_letter",
                "lost when the process ends",
            ),
        ] {
            let dir = app_dir(&format!("{head}{queues}"), &[]);
            let errors = plan_in(dir.path(), false).unwrap_err().0;
            assert!(
                errors
                    .iter()
                    .any(|e| e.field.as_deref() == Some(field) && e.message.contains(needle)),
                "{queues}: {errors:?}"
            );
        }
        // A memory driver keeps queues by id: one name twice is two queues there.
        let on_memory = "  - name: a\n    kind: queue.queue\n    driver: mem\n    queue_name: shared\n  - name: b\n    kind: queue.queue\n    driver: mem\n    queue_name: shared\n";
        let dir = app_dir(&format!("{head}{on_memory}"), &[]);
        assert!(plan_in(dir.path(), false).is_ok());
    }

    /// A broker name RabbitMQ keeps for itself (`amq.`) passed `check`, and RabbitMQ
    /// refused its declare (ACCESS_REFUSED) only once the runtime ran (review).
    #[test]
    #[cfg(feature = "amqp091")]
    fn a_broker_name_rabbitmq_keeps_for_itself_fails_the_plan() {
        let yaml = "namespace: app\nentries:\n  - name: mq\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1:5672\n  - name: jobs\n    kind: queue.queue\n    queue_name: amq.jobs\n";
        let dir = app_dir(yaml, &[]);
        let errors = plan_in(dir.path(), false).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|e| e.field.as_deref() == Some("queue_name") && e.message.contains("\"amq.\"")),
            "{errors:?}"
        );
        // The memory driver keeps no names for itself.
        let on_memory = "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n    queue_name: amq.jobs\n";
        let dir = app_dir(on_memory, &[]);
        assert!(plan_in(dir.path(), false).is_ok());
    }

    /// A queue a consumer implies (no entry declares it) with the broker name of a
    /// declared queue: one queue on the broker, its messages handled under the implied
    /// queue's default policy. It passed `check`, since only the later queue's entry
    /// was looked for (review); it is told at the declared queue's `queue_name`.
    #[test]
    #[cfg(feature = "amqp091")]
    fn a_queue_a_consumer_implies_with_a_declared_queues_broker_name_fails_the_plan() {
        let yaml = "namespace: app\nentries:\n  - name: mq\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1:5672\n  - name: jobs\n    kind: queue.queue\n    queue_name: app:tasks\n  - name: w\n    kind: queue.consumer\n    queue: tasks\n    source: h.lua\n    method: handle\n";
        let dir = app_dir(yaml, &[("h.lua", "function handle() end\n")]);
        let errors = plan_in(dir.path(), false).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|e| e.field.as_deref() == Some("queue_name")
                    && e.message.contains("app:jobs and app:tasks")),
            "{errors:?}"
        );
    }

    /// TLS files named relative to the YAML file are read from beside it, as a
    /// `source:` is, and when the plan is made (`check`): they were opened relative to
    /// the working directory, and only once the driver connected (review).
    #[test]
    #[cfg(all(feature = "amqp091", feature = "amqp10", feature = "tls"))]
    fn tls_files_are_read_beside_the_yaml_when_the_plan_is_made() {
        let certs = queue_fixtures::certs::TestCertificates::generate();
        let ca = std::fs::read(certs.ca_file()).unwrap();
        for kind in ["queue.driver.amqp", "queue.driver.amqp10"] {
            let yaml = format!(
                "namespace: app\nentries:\n  - name: mq\n    kind: {kind}\n    url: amqps://127.0.0.1:5671\n    tls:\n      ca_file: certs/ca.pem\n"
            );
            let dir = app_dir(&yaml, &[]);
            let beside = dir.path().join("certs/ca.pem");
            let errors = plan_in(dir.path(), false).unwrap_err().0;
            assert!(
                errors
                    .iter()
                    .any(|e| e.message.contains(&beside.display().to_string())),
                "{kind}: {errors:?}"
            );
            std::fs::create_dir(dir.path().join("certs")).unwrap();
            std::fs::write(&beside, &ca).unwrap();
            if let Err(errors) = plan_in(dir.path(), false) {
                panic!("{kind}: {errors:?}");
            }
        }
    }

    /// A file's top level runs in `check` within `lua.memory_limit`, as at `run`: it
    /// ran within the default 256 MiB, so a top level past a smaller limit passed
    /// `check` and failed the start, and one past the default failed `check` with a
    /// larger limit set (review).
    #[test]
    fn a_top_level_runs_in_check_within_the_configured_memory_limit() {
        let lua = "local t = {} for i = 1, 1500000 do t[i] = i end\nfunction handle() end\n";
        let yaml = |limit: &str| {
            format!(
                "namespace: app\nlua:\n  memory_limit: {limit}\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: h.lua\n    method: handle\n"
            )
        };
        let dir = app_dir(&yaml("8MiB"), &[("h.lua", lua)]);
        let errors = plan_in(dir.path(), false).unwrap_err().0;
        assert!(
            errors.iter().any(|e| e.message.contains("memory")),
            "{errors:?}"
        );
        let dir = app_dir(&yaml("64MiB"), &[("h.lua", lua)]);
        if let Err(errors) = plan_in(dir.path(), false) {
            panic!("{errors:?}");
        }
    }

    /// A consumer that would hold a delivery past its broker's `consumer_timeout`
    /// (RabbitMQ's, 30 minutes by default) passed `check`: the broker takes the
    /// delivery back and ends the channel (measured on RabbitMQ 3.10 over AMQP 1.0:
    /// `PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out`), and
    /// the message came back with the same `attempts`, retried for ever (review).
    #[test]
    #[cfg(all(feature = "amqp091", feature = "amqp10"))]
    fn a_consumer_that_would_hold_past_the_brokers_consumer_timeout_fails_the_plan() {
        let amqp10 = |profile: &str, more: &str| {
            format!(
                "kind: queue.driver.amqp10\n    url: amqp://127.0.0.1:5672\n    profile: {profile}{more}"
            )
        };
        let amqp091 =
            |more: &str| format!("kind: queue.driver.amqp\n    url: amqp://127.0.0.1:5672{more}");
        let cases = [
            // No delayed delivery: the backoff is waited out holding the delivery.
            (amqp10("rabbitmq-v1", ""), "1h", "10s", Some("retry")),
            (amqp10("rabbitmq-v1", ""), "20m", "10s", None),
            (amqp10("rabbitmq-v1", ""), "20m", "30m", Some("timeout")),
            // The handler's run and the hold after it, together.
            (amqp10("rabbitmq-v1", ""), "20m", "15m", Some("timeout")),
            (
                amqp10("rabbitmq-v1", "\n    consumer_timeout: 2h"),
                "1h",
                "50m",
                None,
            ),
            (
                amqp10("rabbitmq-v1", "\n    consumer_timeout: 0s"),
                "1h",
                "90m",
                None,
            ),
            (amqp10("artemis", ""), "1h", "90m", None),
            // Delayed delivery: nothing is held for a backoff.
            (amqp091(""), "1h", "10s", None),
            (amqp091(""), "1m", "45m", Some("timeout")),
            (amqp091("\n    consumer_timeout: 0s"), "1m", "45m", None),
        ];
        // Every retry waits its backoff's `max`: from the first, at `initial: max`.
        let every_wait = |max: &str| format!("backoff: {{ initial: {max}, max: {max} }}");
        let cases = cases
            .into_iter()
            .map(|(driver, max, timeout, field)| (driver, every_wait(max), timeout, field))
            .chain([
                // Three attempts wait 1 s and 2 s, whatever `max` says.
                (
                    amqp10("rabbitmq-v1", ""),
                    "max_attempts: 3\n      backoff: { initial: 1s, max: 1h }".to_string(),
                    "10s",
                    None,
                ),
                // Without a dead-letter queue a dead letter that fails is kept after
                // the longest backoff.
                (
                    amqp10("rabbitmq-v1", ""),
                    "max_attempts: 3\n      backoff: { initial: 1s, max: 1h }\n    dead_letter: false"
                        .to_string(),
                    "10s",
                    Some("retry"),
                ),
            ]);
        for (driver, retry, timeout, field) in cases {
            let yaml = format!(
                "namespace: app\nentries:\n  - name: mq\n    {driver}\n  - name: jobs\n    kind: queue.queue\n    retry:\n      {retry}\n  - name: w\n    kind: queue.consumer\n    queue: jobs\n    source: h.lua\n    method: handle\n    timeout: {timeout}\n"
            );
            let dir = app_dir(&yaml, &[("h.lua", "function handle() end\n")]);
            match (plan_in(dir.path(), false), field) {
                (Ok(_), None) => {}
                (Ok(_), Some(field)) => panic!("{yaml}: passed, where {field} holds too long"),
                (Err(errors), None) => panic!("{yaml}: {errors:?}"),
                (Err(errors), Some(field)) => assert!(
                    errors.0.iter().any(|e| e.field.as_deref() == Some(field)
                        && e.message.contains("consumer_timeout")),
                    "{yaml}: {errors:?}"
                ),
            }
        }
    }

    /// A broker name longer than the driver takes (AMQP 0-9-1 keeps room for its delay
    /// queues' names: 238 bytes) passed `check` and failed the start (review); so did
    /// the `.dlq` one implies, and a queue a consumer names. Each is told at the entry
    /// that makes it.
    #[test]
    #[cfg(feature = "amqp091")]
    fn a_broker_name_longer_than_its_driver_takes_fails_the_plan() {
        let head = "namespace: app\nentries:\n  - name: mq\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1:5672\n";
        let fits = "n".repeat(234);
        let long = "n".repeat(236);
        for (queues, ok, field) in [
            (
                format!("  - name: a\n    kind: queue.queue\n    queue_name: {fits}\n"),
                true,
                "",
            ),
            // Its `.dlq` is 240 bytes.
            (
                format!("  - name: a\n    kind: queue.queue\n    queue_name: {long}\n"),
                false,
                "dead_letter",
            ),
            (
                format!(
                    "  - name: a\n    kind: queue.queue\n    queue_name: {long}\n    dead_letter: false\n"
                ),
                true,
                "",
            ),
            (
                format!(
                    "  - name: a\n    kind: queue.queue\n    queue_name: {long}nnnn\n    dead_letter: false\n"
                ),
                false,
                "queue_name",
            ),
            (
                format!(
                    "  - name: w\n    kind: queue.consumer\n    queue: {long}\n    source: h.lua\n    method: handle\n"
                ),
                false,
                "queue",
            ),
        ] {
            let dir = app_dir(
                &format!("{head}{queues}"),
                &[("h.lua", "function handle() end\n")],
            );
            match plan_in(dir.path(), false) {
                Ok(_) => assert!(ok, "{queues}: passed"),
                Err(errors) => {
                    assert!(!ok, "{queues}: {errors:?}");
                    assert!(
                        errors.0.iter().any(|e| e.field.as_deref() == Some(field)
                            && e.message.contains("238")),
                        "{queues}: {errors:?}"
                    );
                }
            }
        }
    }

    /// A broker name that is empty (RabbitMQ names such a queue itself, and nothing
    /// reaches it) or too long for a broker, its `.dlq` counted, fails the plan.
    #[test]
    fn a_queue_name_no_broker_takes_fails_the_plan() {
        let long = "n".repeat(252);
        for (queue_name, ok) in [
            ("\"\"", false),
            ("\"  \"", false),
            (long.as_str(), false),
            (&long[..251], true),
        ] {
            let yaml = format!(
                "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    queue_name: {queue_name}\n"
            );
            let dir = app_dir(&yaml, &[]);
            match plan_in(dir.path(), false) {
                Ok(_) => assert!(ok, "{queue_name:?} passed"),
                Err(errors) => {
                    assert!(!ok, "{queue_name:?}: {errors:?}");
                    assert_eq!(
                        located(&errors.0, "must not be empty"),
                        vec![(5, Some("queue_name"), true)]
                    );
                }
            }
        }
    }

    /// A consumer of a queue no entry declares, whose id leaves no room for `.dlq`:
    /// its queue got no dead-letter queue, and every message that failed for the last
    /// time was dropped, as if the user had written `dead_letter: false`.
    #[test]
    fn an_undeclared_queue_with_no_room_for_its_dead_letter_queue_fails_the_plan() {
        let long = "q".repeat(250);
        let yaml = format!(
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: {long}\n    source: h.lua\n    method: handle\n"
        );
        let dir = app_dir(&yaml, &[("h.lua", "function handle() end\n")]);
        let errors = plan_in(dir.path(), false).unwrap_err().0;
        assert_eq!(
            located(&errors, "no room for its dead-letter queue"),
            vec![(5, Some("queue"), true)],
            "{errors:?}"
        );
    }

    /// `dead_letter: "${DLQ:-false}"`, quoted as text should be, sent the dead letters
    /// to a queue `app:false` (review); `durable: "false"` is refused as text.
    #[test]
    fn a_quoted_true_or_false_dead_letter_is_refused_not_read_as_a_queue() {
        for quoted in ["\"false\"", "'true'", "\"False\""] {
            let yaml = format!(
                "namespace: app\nentries:\n  - name: jobs\n    kind: queue.queue\n    dead_letter: {quoted}\n"
            );
            let dir = app_dir(&yaml, &[]);
            let errors = plan_in(dir.path(), false).unwrap_err().0;
            assert_eq!(
                located(&errors, "without quotes"),
                vec![(5, Some("dead_letter"), true)],
                "{quoted}: {errors:?}"
            );
        }
    }

    #[test]
    fn dead_letter_queues_are_declared_once_for_declared_and_implied_queues() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/quickstart/app.yaml");
        let config = crate::config::load(&[root]).unwrap();
        let plan = plan(&config, &DriverKinds::builtin(), false).unwrap();
        let ids: Vec<&str> = plan.queues.iter().map(|q| q.spec.id.as_str()).collect();
        assert_eq!(ids, vec!["app:emails", "app:emails.dlq"]);
        assert_eq!(plan.queues[1].dead_letter, None);
        assert_eq!(
            plan.queues[0].dead_letter.as_ref().map(|q| q.as_str()),
            Some("app:emails.dlq")
        );
    }
}
