//! Configuration: YAML files of `namespace:` + `entries:`, `${VAR}` interpolation, and
//! validation that names file, line and field for every mistake, before anything runs.

mod interpolate;
pub mod model;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;

pub use interpolate::{Interpolated, interpolate};
pub use model::*;

/// One configuration mistake, located.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConfigError {
    /// The YAML file.
    pub file: PathBuf,
    /// 1-based line (0 when the whole file is at fault).
    pub line: usize,
    /// The field at fault, if one is.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Several mistakes, all reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// An entry with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// `namespace:name`.
    pub id: String,
    /// What it is.
    pub kind: EntryKind,
    /// The file's namespace (for resolving references without `:`).
    pub namespace: String,
    /// The YAML file.
    pub file: PathBuf,
    /// The line of the entry.
    pub line: usize,
    /// The line of each field.
    pub field_lines: BTreeMap<String, usize>,
}

impl Entry {
    /// An error about this entry, at the field's line if it has one.
    pub fn error(&self, field: Option<&str>, message: impl Into<String>) -> ConfigError {
        let line = field
            // The line of the field, or of the nearest value around it that has one.
            .and_then(|f| {
                let mut place = f;
                loop {
                    if let Some(line) = self.field_lines.get(place) {
                        return Some(line);
                    }
                    place = &place[..place.rfind(['.', '['])?];
                }
            })
            .copied()
            .unwrap_or(self.line);
        ConfigError {
            file: self.file.clone(),
            line,
            field: field.map(str::to_string),
            message: message.into(),
        }
    }

    /// Resolves a reference written in this entry's file: without `:`, it is in the
    /// file's namespace.
    pub fn resolve(&self, reference: &str) -> String {
        if reference.contains(':') {
            reference.to_string()
        } else {
            format!("{}:{reference}", self.namespace)
        }
    }

    /// A path written in this entry, relative to its YAML file.
    pub fn path(&self, relative: &str) -> PathBuf {
        self.file.parent().unwrap_or(Path::new(".")).join(relative)
    }
}

/// Every file, merged.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// The entries of all files, in order.
    pub entries: Vec<Entry>,
    /// `security: {strict_mode: true}` in any file.
    pub strict_mode: bool,
    /// `lua: {memory_limit: ...}`: the most memory each Lua state may hold.
    pub lua_memory_limit: Option<usize>,
    /// Where each entry is, for [`Config::get`].
    by_id: crate::by_id::ById,
}

impl Config {
    /// The entry with this id.
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.by_id.find(&self.entries, id, |e| &e.id)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    namespace: Spanned<String>,
    #[serde(default)]
    security: Option<RawTopSecurity>,
    #[serde(default)]
    lua: Option<Spanned<RawTopLua>>,
    #[serde(default)]
    entries: Vec<Spanned<BTreeMap<String, Spanned<FieldValue>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopSecurity {
    #[serde(default)]
    strict_mode: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopLua {
    #[serde(deserialize_with = "queue_core::config::byte_size::deserialize")]
    memory_limit: usize,
}

/// What a file says beyond its entries.
struct FileSettings {
    strict: bool,
    /// The memory limit and its line.
    lua_memory_limit: Option<(usize, usize)>,
}

/// Loads and merges files, reading `${VAR}` from the process environment.
pub fn load(paths: &[PathBuf]) -> Result<Config, ConfigErrors> {
    load_with_env(paths, |name| env_text(std::env::var_os(name)))
}

/// A variable's value as text: one that is not UTF-8 keeps its other characters, its
/// bad bytes read as U+FFFD. `std::env::var` took it for unset, so that a default
/// stood in for it without a word (`${RABBIT_PASSWORD:-guest}` logged in as guest).
fn env_text(value: Option<std::ffi::OsString>) -> Option<String> {
    value.map(|v| v.to_string_lossy().into_owned())
}

/// Loads and merges files with a given environment.
pub fn load_with_env(
    paths: &[PathBuf],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        match read_limited(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => sources.push((path.clone(), text)),
                Err(e) => errors.push(not_utf8(path, e.as_bytes(), e.utf8_error())),
            },
            Err(e) => errors.push(ConfigError {
                file: path.clone(),
                line: 0,
                field: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    merge(&sources, env, errors)
}

/// The largest configuration file read: far past any real one, and short of what
/// `/dev/zero` or a runaway generator behind a pipe would take of the memory.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// A file's bytes, up to [`MAX_CONFIG_BYTES`]. Any readable file, a pipe too.
fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    queue_core::config::read_at_most(std::fs::File::open(path)?, MAX_CONFIG_BYTES)
}

/// Where a file stops being UTF-8.
fn not_utf8(path: &Path, bytes: &[u8], error: std::str::Utf8Error) -> ConfigError {
    let valid = &bytes[..error.valid_up_to()];
    let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = valid.len() - valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
    ConfigError {
        file: path.to_path_buf(),
        line,
        field: None,
        message: format!(
            "not UTF-8 text: byte {:#04x} at column {column} (save the file as UTF-8)",
            bytes[error.valid_up_to()]
        ),
    }
}

/// Parses configuration text as if read from `path` (no environment variables):
/// what the fuzz target and its replay test drive.
pub fn parse_text(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    merge(
        &[(path.to_path_buf(), text.to_string())],
        |_| None,
        Vec::new(),
    )
}

fn merge(
    sources: &[(PathBuf, String)],
    env: impl Fn(&str) -> Option<String>,
    mut errors: Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    let mut config = Config::default();
    for (path, text) in sources {
        match load_file(path, text, &env) {
            Ok((entries, settings)) => {
                config.entries.extend(entries.0);
                errors.extend(entries.1);
                config.strict_mode |= settings.strict;
                if let Some((limit, line)) = settings.lua_memory_limit
                    && limit < queue_lua::Limits::MIN_MEMORY_BYTES
                {
                    errors.push(ConfigError {
                        file: path.clone(),
                        line,
                        field: Some("lua.memory_limit".to_string()),
                        message: format!(
                            "must be at least 1MiB, not {limit} bytes: a Lua state needs a few hundred KiB to start, and to the Lua library 0 means no limit at all"
                        ),
                    });
                } else if let Some((limit, line)) = settings.lua_memory_limit {
                    match config.lua_memory_limit {
                        Some(earlier) if earlier != limit => errors.push(ConfigError {
                            file: path.clone(),
                            line,
                            field: Some("lua.memory_limit".to_string()),
                            message: format!(
                                "another file sets {earlier} bytes: the Lua states are shared, so every file must agree"
                            ),
                        }),
                        _ => config.lua_memory_limit = Some(limit),
                    }
                }
            }
            Err(e) => errors.push(e),
        }
    }
    let mut seen: HashMap<&str, &Entry> = HashMap::new();
    for entry in &config.entries {
        if let Some(first) = seen.insert(&entry.id, entry) {
            errors.push(entry.error(
                Some("name"),
                format!(
                    "duplicate id {}: already defined at {}:{}",
                    entry.id,
                    first.file.display(),
                    first.line
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigErrors(errors))
    }
}

type FileEntries = (Vec<Entry>, Vec<ConfigError>);

fn load_file(
    path: &Path,
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(FileEntries, FileSettings), ConfigError> {
    let at = |line: usize, field: Option<&str>, message: String| ConfigError {
        file: path.to_path_buf(),
        line,
        field: field.map(str::to_string),
        message,
    };
    let interpolated = interpolate(text, env).map_err(|(line, message)| at(line, None, message))?;
    let line_of = |line: u64| interpolated.source_line(line as usize);
    let raw: RawFile = serde_saphyr::from_str(&interpolated.text).map_err(|e| {
        let line = e.location().map_or(0, |l| line_of(l.line()));
        at(line, None, yaml_message(&e.to_string()))
    })?;
    let namespace = raw.namespace.value.clone();
    // Every queue id starts with it, and ids reach every log line.
    if namespace.is_empty()
        || namespace.contains(':')
        || namespace
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(at(
            line_of(raw.namespace.referenced.line()),
            Some("namespace"),
            format!(
                "{namespace:?} is not a namespace: use a word without ':', spaces or control characters"
            ),
        ));
    }
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for spanned in raw.entries {
        let line = line_of(spanned.referenced.line());
        match parse_entry(path, &namespace, line, spanned.value, &line_of) {
            Ok(entry) => entries.push(entry),
            Err(e) => errors.push(e),
        }
    }
    let settings = FileSettings {
        strict: raw.security.is_some_and(|s| s.strict_mode),
        lua_memory_limit: raw
            .lua
            .map(|l| (l.value.memory_limit, line_of(l.referenced.line()))),
    };
    Ok(((entries, errors), settings))
}

/// The YAML parser's message for a user: its first line, without the advice meant for
/// programmers who call the parser (which function or option to use instead).
fn yaml_message(text: &str) -> String {
    let first = text.lines().next().unwrap_or(text);
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // "line 5 column 3: ..." counts lines after `${VAR}` interpolation: the caller
    // gives the file's own line; the column stays.
    let (column, first) = match first.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((position, rest)) => (position.split_once(" column ").map(|(_, c)| c), rest),
        None => (None, first),
    };
    let mut message = match first.strip_prefix("budget breached: ") {
        Some(breach) => past_the_parsers_limit(breach),
        None => first.to_string(),
    };
    for hint in [" use ", " set ", "; consider ", " (hint"] {
        if let Some(at) = message.find(hint)
            && LIBRARY_WORDS.iter().any(|w| message[at..].contains(w))
        {
            message.truncate(at);
        }
    }
    let message = message.trim_end_matches([',', ';', ':', ' ']);
    match column {
        Some(column) => format!("{message} (column {column})"),
        None => message.to_string(),
    }
}

/// The parser's limits on a file (which keep a crafted one from taking the memory or
/// the stack), told in words: it says `Nodes { nodes: 250001 }`.
fn past_the_parsers_limit(breach: &str) -> String {
    let what = breach.split_whitespace().next().unwrap_or(breach);
    let count = breach
        .rsplit(':')
        .next()
        .map(|n| n.trim_matches(|c: char| !c.is_ascii_digit()))
        .unwrap_or_default();
    let said = match what {
        "Depth" => format!("nested {count} levels deep (64 at most)"),
        "Nodes" => "more than 250,000 values".to_string(),
        "Events" => "more YAML than the parser reads in one file".to_string(),
        "Aliases" | "Anchors" => format!("more than {count} {}", what.to_lowercase()),
        "Documents" => "more documents than one (`---`)".to_string(),
        _ => format!("past the YAML parser's limits ({what})"),
    };
    format!("the file is {said}: split its entries over several files")
}

/// Words that mark advice about the parser's API rather than the file.
const LIBRARY_WORDS: [&str; 7] = [
    "from_str",
    "Policy",
    "Options",
    "Option<",
    "serde",
    "saphyr",
    "_multiple",
];

/// An entry field's value, with the line of each value inside it (`[1]`, `.backoff`,
/// `.backoff.initial`), for errors about one of them (`url[1]`) to name its line.
struct FieldValue {
    value: serde_json::Value,
    lines: Vec<(String, u64)>,
}

impl FieldValue {
    /// `inner` as the value at `place` of this one (`[1]`, `.key`).
    fn nest(&mut self, place: String, inner: Spanned<FieldValue>) -> serde_json::Value {
        for (rest, line) in inner.value.lines {
            self.lines.push((format!("{place}{rest}"), line));
        }
        self.lines.push((place, inner.referenced.line()));
        inner.value.value
    }
}

impl<'de> Deserialize<'de> for FieldValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

/// Reads any value as `serde_json::Value` does, keeping the spans of a list's items.
struct FieldVisitor;

impl<'de> serde::de::Visitor<'de> for FieldVisitor {
    type Value = FieldValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<FieldValue, A::Error> {
        let mut list = plain(serde_json::Value::Null);
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<FieldValue>>()? {
            items.push(list.nest(format!("[{}]", items.len()), item));
        }
        list.value = serde_json::Value::Array(items);
        Ok(list)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<FieldValue, A::Error> {
        let mut object = plain(serde_json::Value::Null);
        let mut fields = serde_json::Map::new();
        while let Some((key, value)) = map.next_entry::<String, Spanned<FieldValue>>()? {
            let value = object.nest(format!(".{key}"), value);
            fields.insert(key, value);
        }
        object.value = serde_json::Value::Object(fields);
        Ok(object)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<FieldValue, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_none<E>(self) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::Null))
    }

    fn visit_unit<E>(self) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::Null))
    }

    fn visit_bool<E>(self, b: bool) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::Bool(b)))
    }

    fn visit_i64<E>(self, n: i64) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::from(n)))
    }

    fn visit_u64<E>(self, n: u64) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::from(n)))
    }

    fn visit_f64<E>(self, n: f64) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::from(n)))
    }

    fn visit_str<E>(self, s: &str) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::from(s)))
    }

    fn visit_string<E>(self, s: String) -> Result<FieldValue, E> {
        Ok(plain(serde_json::Value::from(s)))
    }
}

/// A value with nothing inside it.
fn plain(value: serde_json::Value) -> FieldValue {
    FieldValue {
        value,
        lines: Vec::new(),
    }
}

/// The path of the first null in `value` (written at `path`), if it holds one.
fn null_at(path: String, value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => Some(path),
        serde_json::Value::Object(fields) => fields
            .iter()
            .find_map(|(key, value)| null_at(format!("{path}.{key}"), value)),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| null_at(format!("{path}[{i}]"), item)),
        _ => None,
    }
}

fn parse_entry(
    file: &Path,
    namespace: &str,
    line: usize,
    fields: BTreeMap<String, Spanned<FieldValue>>,
    line_of: &impl Fn(u64) -> usize,
) -> Result<Entry, ConfigError> {
    let mut field_lines: BTreeMap<String, usize> = BTreeMap::new();
    for (name, value) in &fields {
        field_lines.insert(name.clone(), line_of(value.referenced.line()));
        for (place, line) in &value.value.lines {
            field_lines.insert(format!("{name}{place}"), line_of(*line));
        }
    }
    let mut values: serde_json::Map<String, serde_json::Value> = fields
        .into_iter()
        .map(|(k, v)| (k, v.value.value))
        .collect();
    let mut entry = Entry {
        id: String::new(),
        kind: EntryKind::Function(FunctionEntry {
            source: String::new(),
            method: String::new(),
            sandbox: SandboxConfig::default(),
        }),
        namespace: namespace.to_string(),
        file: file.to_path_buf(),
        line,
        field_lines,
    };
    let name = match (values.remove("name"), values.remove("id")) {
        (Some(serde_json::Value::String(n)), None) | (None, Some(serde_json::Value::String(n))) => {
            n
        }
        (Some(_), Some(_)) => return Err(entry.error(Some("id"), "give `name` or `id`, not both")),
        (None, None) => return Err(entry.error(None, "entry has no `name` (or `id`)")),
        _ => return Err(entry.error(Some("name"), "must be a string")),
    };
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(entry.error(Some("name"), format!("{name:?} is not a valid name")));
    }
    entry.id = if name.contains(':') {
        name
    } else {
        format!("{namespace}:{name}")
    };
    let kind = match values.remove("kind") {
        Some(serde_json::Value::String(k)) => k,
        Some(_) => return Err(entry.error(Some("kind"), "must be a string")),
        None => return Err(entry.error(None, "entry has no `kind`")),
    };
    // A field with no value read as absent: `queue_name: ${Q}` with Q set to nothing
    // consumed the default queue without a word, `vhost: ${V}` dialled `/` (review).
    // `resources` says so in its policy's own words.
    // `driver_options` is read by no driver: anything goes there.
    let checked = |key: &&String| !["resources", "driver_options"].contains(&key.as_str());
    for (key, value) in values.iter().filter(|(key, _)| checked(key)) {
        if let Some(path) = null_at(key.clone(), value) {
            return Err(entry.error(
                Some(&path),
                "has no value (nothing after it, or a `${VAR}` set to nothing, which YAML reads as null): give one, or leave the field out for its default",
            ));
        }
    }
    let object = serde_json::Value::Object(values);
    entry.kind = match kind.as_str() {
        k if k.starts_with("queue.driver.") => EntryKind::Driver {
            kind: kind.clone(),
            config: DriverFields(object),
        },
        "queue.queue" => EntryKind::Queue(Box::new(typed(&entry, object)?)),
        "queue.consumer" => {
            let consumer: ConsumerEntry = typed(&entry, object)?;
            check_consumer(&entry, &consumer)?;
            EntryKind::Consumer(Box::new(consumer))
        }
        "function.lua" => EntryKind::Function(typed(&entry, object)?),
        "process.lua" => {
            let process: ProcessEntry = typed(&entry, object)?;
            if !(1..=10_000).contains(&process.instances) {
                return Err(entry.error(Some("instances"), "must be 1..=10000"));
            }
            EntryKind::Process(process)
        }
        "security.policy" => {
            let policy: PolicyEntry = typed(&entry, object)?;
            check_policy(&entry, &policy)?;
            EntryKind::Policy(policy)
        }
        other => {
            return Err(entry.error(
                Some("kind"),
                format!(
                    "unknown kind {other:?}: expected queue.driver.<name> (a driver), queue.queue, queue.consumer, function.lua, process.lua or security.policy"
                ),
            ));
        }
    };
    if let EntryKind::Queue(q) = &entry.kind {
        check_queue(&entry, q)?;
    }
    Ok(entry)
}

fn typed<T: serde::de::DeserializeOwned>(
    entry: &Entry,
    value: serde_json::Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if path == "." {
            // Unknown or missing fields are reported on the entry itself.
            let field = message
                .split('`')
                .nth(1)
                .filter(|_| {
                    message.starts_with("unknown field") || message.starts_with("missing field")
                })
                .map(str::to_string);
            entry.error(field.as_deref(), message)
        } else {
            entry.error(Some(&path), message)
        }
    })
}

fn check_consumer(entry: &Entry, c: &ConsumerEntry) -> Result<(), ConfigError> {
    if !(1..=1000).contains(&c.concurrency) {
        return Err(entry.error(
            Some("concurrency"),
            format!("{} is out of range 1..=1000", c.concurrency),
        ));
    }
    if !(1..=10_000).contains(&c.prefetch) {
        return Err(entry.error(
            Some("prefetch"),
            format!("{} is out of range 1..=10000", c.prefetch),
        ));
    }
    if c.timeout.is_some_and(|t| t.is_zero()) {
        return Err(entry.error(
            Some("timeout"),
            "must be longer than 0s (leave it out for no limit)",
        ));
    }
    // The function runs in its own file with its entry's opt-ins: the consumer's were
    // neither applied nor checked, so a handler that needed them failed every delivery
    // after `check` said ok (review).
    if c.func.is_some() && c.sandbox != SandboxConfig::default() {
        return Err(entry.error(
            Some("sandbox"),
            "a consumer with `func` runs that function.lua entry's file: give `sandbox:` there",
        ));
    }
    // `method` alone is found in the configuration's Lua files when it is planned
    // (docs/configuration.md, "Where a consumer's method is found").
    match (&c.func, &c.source, &c.method) {
        (Some(_), None, None) | (None, _, Some(_)) => Ok(()),
        (Some(_), _, _) => Err(entry.error(
            Some("func"),
            "give either `func` or `method` (with or without `source`), not both",
        )),
        (None, Some(_), None) => Err(entry.error(
            Some("source"),
            "add `method:`, the function to call in the source",
        )),
        (None, None, None) => Err(entry.error(
            None,
            "a consumer needs `method` (and, optionally, its `source` file) or `func`",
        )),
    }
}

/// Refuses a deny rule that can never deny anything (docs/security.md): publishing is
/// checked first without a queue, where a deny applies only with `resources: "*"`,
/// then as `queue.publish.queue` with the queue id, which always holds a `:`; reading
/// counts is checked as `queue.info` with the queue id.
fn check_policy(entry: &Entry, p: &PolicyEntry) -> Result<(), ConfigError> {
    use queue_core::security::{ACTION_INFO, ACTION_PUBLISH, ACTION_PUBLISH_QUEUE, Pattern};
    // Any policy: what it names must be something. An action the runtime never checks
    // made a deny deny nothing, and a `resources:` written empty read as absent (every
    // queue) made an allow allow everything.
    let actions = p.actions.to_vec();
    if actions.is_empty() {
        return Err(entry.error(
            Some("actions"),
            "names no action: write `queue.publish`, `queue.publish.queue`, `queue.info` or `queue.*`",
        ));
    }
    let checked = [ACTION_PUBLISH, ACTION_PUBLISH_QUEUE, ACTION_INFO];
    if let Some(unknown) = actions
        .iter()
        .find(|a| !checked.iter().any(|c| Pattern::parse(a).matches(c)))
    {
        return Err(entry.error(
            Some("actions"),
            format!(
                "{:?} matches no action the runtime checks: `queue.publish`, `queue.publish.queue`, `queue.info` (or `queue.*`; names are case-sensitive)",
                queue_core::truncate(unknown, 64)
            ),
        ));
    }
    let resources: Vec<Pattern> = match &p.resources {
        None => vec![Pattern::Any],
        Some(written) => {
            let listed = written.as_ref().map(OneOrMany::to_vec).unwrap_or_default();
            if listed.is_empty() {
                return Err(entry.error(
                    Some("resources"),
                    "names no queue (written empty, or a `${VAR}` that is empty): list the queues, write `*` for every queue, or leave the field out",
                ));
            }
            listed.iter().map(|r| Pattern::parse(r)).collect()
        }
    };
    if p.effect != EffectName::Deny {
        return Ok(());
    }
    if resources.contains(&Pattern::Any) {
        return Ok(());
    }
    let per_queue = p.actions.to_vec().iter().any(|a| {
        let action = Pattern::parse(a);
        action.matches(ACTION_PUBLISH_QUEUE) || action.matches(ACTION_INFO)
    });
    if !per_queue {
        return Err(entry.error(
            Some("actions"),
            "this deny names queues, but no action it names is checked with a queue: publishing is checked first with no queue, then as `queue.publish.queue` with it (and reading counts as `queue.info` with it); write `actions: queue.publish.queue` (or `queue.*`)",
        ));
    }
    for resource in &resources {
        if let Some(why) = never_a_queue(resource, &entry.namespace) {
            return Err(entry.error(Some("resources"), why));
        }
    }
    Ok(())
}

/// Why a deny's resource matches no queue id, if it matches none: a queue id is
/// `namespace:name`, both parts non-empty, without whitespace; and a `*` is a wildcard
/// only at the end, so one elsewhere matches only a queue named with it.
fn never_a_queue(resource: &queue_core::security::Pattern, namespace: &str) -> Option<String> {
    use queue_core::security::Pattern;
    let (text, exact) = match resource {
        Pattern::Any => return None,
        Pattern::Exact(name) => (name.as_str(), true),
        Pattern::Prefix(prefix) => (prefix.as_str(), false),
    };
    let shown = queue_core::truncate(text, 64);
    if let Some(bad) = text.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!(
            "{shown:?} holds {bad:?}, which no queue id holds (no whitespace or control characters)"
        ));
    }
    if text.contains('*') {
        return Some(format!(
            "{shown:?}: `*` is a wildcard only at the end, so this matches only a queue with a `*` in its id; write a prefix such as `{namespace}:*`, or list the queues"
        ));
    }
    if exact && !text.contains(':') {
        return Some(format!(
            "{shown:?} is no queue id, which is always `namespace:name`: write `{namespace}:{shown}` (or a prefix such as `{namespace}:*`)"
        ));
    }
    if exact {
        let refused = queue_core::QueueId::parse(text).err();
        return refused.map(|e| format!("{shown:?} matches no queue: {}", e.message()));
    }
    // A prefix needs only to start some id: any text without whitespace does, but
    // one with an empty namespace, or with no room left for a name.
    if text.starts_with(':') {
        return Some(format!(
            "{shown:?} matches no queue: a queue id needs a non-empty namespace before its `:`"
        ));
    }
    let shortest_id = if text.contains(':') {
        text.len() + 1
    } else {
        text.len() + 2
    };
    (shortest_id > queue_core::QueueId::MAX_LEN).then(|| {
        format!(
            "{shown:?} matches no queue: a queue id is at most {} bytes, and none starts with these {} bytes",
            queue_core::QueueId::MAX_LEN,
            text.len()
        )
    })
}

fn check_queue(entry: &Entry, q: &QueueEntry) -> Result<(), ConfigError> {
    // Each names the value's own field, and so its line (or the nearest written one
    // around it, for a value left at its default).
    if q.retry.max_attempts == 0 {
        return Err(entry.error(Some("retry.max_attempts"), "must be at least 1"));
    }
    if !(q.retry.backoff.multiplier >= 1.0 && q.retry.backoff.multiplier <= 100.0) {
        return Err(entry.error(Some("retry.backoff.multiplier"), "must be 1..=100"));
    }
    if q.retry.backoff.max.as_millis() > u128::from(queue_core::MAX_MILLIS) {
        return Err(entry.error(
            Some("retry.backoff.max"),
            "must be at most 4294967295ms (about 49 days), the longest delay a broker carries",
        ));
    }
    if q.retry.backoff.initial > q.retry.backoff.max {
        return Err(entry.error(
            Some("retry.backoff.initial"),
            "must not be longer than retry.backoff.max",
        ));
    }
    if q.max_message_bytes == 0 {
        return Err(entry.error(Some("max_message_bytes"), "must be at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that is not UTF-8 is a value, not unset: a default stood in for it
    /// without a word (review).
    #[test]
    fn a_variable_that_is_not_utf8_is_set() {
        use std::os::unix::ffi::OsStringExt;
        let bad = std::ffi::OsString::from_vec(b"p\xffss".to_vec());
        assert_eq!(env_text(Some(bad)).as_deref(), Some("p\u{fffd}ss"));
        assert_eq!(env_text(None), None);
    }

    fn load_text(text: &str) -> Result<Config, ConfigErrors> {
        let dir =
            std::env::temp_dir().join(format!("queue-config-{}", queue_core::new_message_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.yaml");
        std::fs::write(&path, text).unwrap();
        let result = load_with_env(&[path], |n| match n {
            "PASS" => Some("s3cret".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        });
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn single_error(text: &str) -> ConfigError {
        let errors = load_text(text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().unwrap()
    }

    /// Review: a namespace with an escape sequence passed (and reached every log
    /// line as part of each id); an empty one said "use Option<String>"; past the
    /// parser's limits the error was Rust's debug form of its budget.
    #[test]
    fn a_namespace_or_a_file_past_the_parsers_limits_is_refused_in_words() {
        let error = single_error("namespace: \"a\\x1b[31mRED\"\nentries: []\n");
        assert_eq!((error.line, error.field.as_deref()), (1, Some("namespace")));
        assert!(error.message.contains("control"), "{error:?}");
        let error = single_error("namespace:\nentries: []\n");
        assert!(!error.message.contains("Option"), "{error:?}");
        let deep = format!(
            "namespace: app\nentries:\n  - {{name: a, kind: queue.queue, x: {}{}}}\n",
            "[".repeat(100),
            "]".repeat(100)
        );
        // On a stack as large as the runtime gives its threads (a test thread's 2 MiB
        // is too small for 64 levels in a debug build).
        let error = std::thread::Builder::new()
            .stack_size(16 * 1024 * 1024)
            .spawn(move || single_error(&deep))
            .unwrap()
            .join()
            .unwrap();
        assert!(
            error.message.contains("levels deep") && !error.message.contains('{'),
            "{error:?}"
        );
        let many: String = (0..60_000)
            .map(|i| format!("  - {{name: q{i}, kind: queue.queue}}\n"))
            .collect();
        let many = format!("namespace: app\nentries:\n{many}");
        let error = single_error(&many);
        assert!(
            error.message.contains("more than") && !error.message.contains('{'),
            "{error:?}"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn an_endless_file_is_refused_by_its_size_and_a_pipe_is_read() {
        // Read whole before, /dev/zero took every byte of memory there was.
        let errors = load(&[PathBuf::from("/dev/zero")]).unwrap_err().0;
        assert!(
            errors[0].message.contains("larger than 16 MiB"),
            "{errors:?}"
        );
        let mut writer = std::process::Command::new("sh")
            .args(["-c", "printf 'namespace: app\\nentries: []\\n'"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pipe = writer.stdout.take().unwrap();
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", pipe.as_raw_fd()));
        assert!(load(&[path]).is_ok());
        let _ = writer.wait();
    }

    #[test]
    fn a_backoff_longer_than_a_broker_carries_is_refused() {
        let e = single_error(
            "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    retry:\n      backoff:\n        max: 1200h\n",
        );
        assert!(e.message.contains("at most 4294967295ms"), "{e:?}");
    }

    #[test]
    fn a_lua_memory_limit_below_one_mib_is_refused_as_zero_would_mean_none() {
        for limit in ["0", "0MiB", "512KiB"] {
            let e = single_error(&format!(
                "namespace: app\nlua:\n  memory_limit: {limit}\nentries: []\n"
            ));
            assert_eq!(e.field.as_deref(), Some("lua.memory_limit"), "{e:?}");
            assert_eq!(e.line, 3, "{e:?}");
            assert!(e.message.contains("at least 1MiB"), "{limit}: {e:?}");
        }
        let fine = load_text("namespace: app\nlua:\n  memory_limit: 1MiB\nentries: []\n").unwrap();
        assert_eq!(fine.lua_memory_limit, Some(1024 * 1024));
    }

    /// A field written with no value, or as a `${VAR}` set to nothing, read as
    /// absent: the default queue name, vhost or limit, without a word (review).
    #[test]
    fn a_field_with_no_value_is_refused_not_read_as_absent() {
        for (fields, field, line) in [
            ("    queue_name: ${EMPTY}\n", "queue_name", 5),
            ("    max_length:\n", "max_length", 5),
            (
                "    retry:\n      max_attempts: ${EMPTY}\n",
                "retry.max_attempts",
                6,
            ),
            (
                "    retry:\n      max_attempts: 3\n      backoff:\n        initial:\n",
                "retry.backoff.initial",
                8,
            ),
        ] {
            let e = single_error(&format!(
                "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n{fields}"
            ));
            assert_eq!(e.field.as_deref(), Some(field), "{fields}: {e:?}");
            assert_eq!(e.line, line, "{fields}: {e:?}");
            assert!(e.message.contains("has no value"), "{e:?}");
        }
        let e = single_error(
            "namespace: app\nentries:\n  - name: r\n    kind: queue.driver.amqp\n    url: amqp://127.0.0.1\n    vhost: ${EMPTY}\n",
        );
        assert_eq!(e.field.as_deref(), Some("vhost"), "{e:?}");
        // Read by no driver, `driver_options` may hold anything.
        load_text("namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    driver_options:\n      x: ~\n").unwrap();
    }

    /// An error about a value inside `retry` named the `retry:` line (review).
    #[test]
    fn a_bad_retry_value_names_its_own_line() {
        let retry = |max_attempts: &str, multiplier: &str, max: &str| {
            format!(
                "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    retry:\n      max_attempts: {max_attempts}\n      backoff:\n        initial: 1s\n        multiplier: {multiplier}\n        max: {max}\n"
            )
        };
        for (yaml, field, line) in [
            (retry("3", "500", "60s"), "retry.backoff.multiplier", 9),
            (retry("0", "2", "60s"), "retry.max_attempts", 6),
            (retry("3", "2", "500ms"), "retry.backoff.initial", 8),
            (retry("3", "2", "60d"), "retry.backoff.max", 10),
        ] {
            let e = single_error(&yaml);
            assert_eq!((e.field.as_deref(), e.line), (Some(field), line), "{e:?}");
            assert!(
                !e.message.starts_with("retry."),
                "the field is named once: {e:?}"
            );
        }
    }

    #[test]
    fn a_sandbox_on_a_consumer_with_func_is_refused_not_ignored() {
        for allow in ["[os]", "[bogus]"] {
            let e = single_error(&format!(
                "namespace: app\nentries:\n  - kind: function.lua\n    id: send\n    source: h.lua\n    method: send\n  - kind: queue.consumer\n    id: w\n    queue: app:q\n    func: send\n    sandbox:\n      allow: {allow}\n"
            ));
            assert_eq!(e.field.as_deref(), Some("sandbox"), "{e:?}");
            // A nested field's line is its first key's.
            assert_eq!(e.line, 12, "{e:?}");
            assert!(e.message.contains("function.lua"), "{e:?}");
        }
    }

    #[test]
    fn reads_the_seed_entry_with_a_source() {
        let config = load_text(
            "namespace: app\nentries:\n  - kind: queue.consumer\n    id: email_worker\n    queue: app:emails\n    source: handlers.lua\n    method: handle_email\n",
        )
        .unwrap();
        let entry = &config.entries[0];
        assert_eq!(entry.id, "app:email_worker");
        assert_eq!(entry.line, 3);
        assert!(
            matches!(&entry.kind, EntryKind::Consumer(c) if c.concurrency == 1 && c.prefetch == 10)
        );
    }

    #[test]
    fn the_seed_entry_without_source_parses() {
        let config = load_text(
            "namespace: app\nentries:\n  - kind: queue.consumer\n    id: email_worker\n    queue: app:emails\n    method: handle_email\n",
        )
        .unwrap();
        assert!(
            matches!(&config.entries[0].kind, EntryKind::Consumer(c) if c.source.is_none() && c.method.as_deref() == Some("handle_email"))
        );
    }

    #[test]
    fn unknown_fields_wrong_types_and_ranges_name_line_and_field() {
        let e = single_error(
            "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    colour: blue\n",
        );
        assert_eq!((e.line, e.field.as_deref()), (5, Some("colour")), "{e}");
        let e = single_error(
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: a.lua\n    method: m\n    concurrency: many\n",
        );
        assert_eq!(
            (e.line, e.field.as_deref()),
            (8, Some("concurrency")),
            "{e}"
        );
        let e = single_error(
            "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: a.lua\n    method: m\n    prefetch: 0\n",
        );
        assert_eq!((e.line, e.field.as_deref()), (8, Some("prefetch")), "{e}");
        for (timeout, says) in [("0s", "longer than 0s"), ("soon", "")] {
            let e = single_error(&format!(
                "namespace: app\nentries:\n  - name: w\n    kind: queue.consumer\n    queue: q\n    source: a.lua\n    method: m\n    timeout: {timeout}\n"
            ));
            assert_eq!((e.line, e.field.as_deref()), (8, Some("timeout")), "{e}");
            assert!(e.message.contains(says), "{e}");
        }
        let e = single_error(
            "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    retry:\n      backoff:\n        initial: soon\n",
        );
        assert_eq!(e.field.as_deref(), Some("retry.backoff.initial"), "{e}");
        // A nested field is located on its own line.
        assert_eq!(e.line, 7);
        assert!(
            e.to_string()
                .contains("app.yaml:7: field `retry.backoff.initial`"),
            "{e}"
        );
    }

    /// A backoff that starts longer than its longest wait was capped without a word.
    /// (The queue options a broker would read as something else are refused with the
    /// plan, `registry::tests::queue_options_every_broker_refuses_fail_check`.)
    #[test]
    fn a_backoff_starting_past_its_longest_wait_is_refused() {
        let e = single_error(
            "namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n    retry:\n      backoff: { initial: 2m, max: 1m }\n",
        );
        assert_eq!(
            (e.line, e.field.as_deref()),
            (6, Some("retry.backoff.initial")),
            "{e}"
        );
        assert!(e.message.contains("must not be longer than"), "{e}");
    }

    /// Deny rules that can never deny anything: publishing is checked first without
    /// a queue (a deny applies there only with `resources: "*"`), then as
    /// `queue.publish.queue` with the queue; and a queue id always holds a `:`. Each
    /// was taken without a word, and the queue it meant to protect stayed open.
    #[test]
    fn deny_rules_that_can_never_apply_are_refused() {
        for (rule, field, says) in [
            (
                "actions: queue.publish\n    resources: app:secret",
                "actions",
                "queue.publish.queue",
            ),
            (
                "actions: queue.publish.queue\n    resources: secret",
                "resources",
                "namespace:name",
            ),
            // No queue id has an empty name, whitespace, or a `*` that is a wildcard
            // anywhere but at the end.
            (
                "actions: queue.publish.queue\n    resources: \"billing:\"",
                "resources",
                "non-empty namespace and name",
            ),
            (
                "actions: queue.publish.queue\n    resources: \"billing:* \"",
                "resources",
                "whitespace",
            ),
            (
                "actions: queue.publish.queue\n    resources: \"*:secret\"",
                "resources",
                "only at the end",
            ),
            (
                "actions: queue.info\n    resources: [\"app:ok\", \"app:*-prod*\"]",
                "resources",
                "only at the end",
            ),
            // A prefix no id starts with: an empty namespace, or past 255 bytes.
            (
                "actions: queue.publish.queue\n    resources: \":secret*\"",
                "resources",
                "empty namespace",
            ),
            (
                &format!(
                    "actions: queue.publish.queue\n    resources: \"app:{}*\"",
                    "x".repeat(300)
                ),
                "resources",
                "255 bytes",
            ),
        ] {
            let e = single_error(&format!(
                "namespace: app\nentries:\n  - name: p\n    kind: security.policy\n    effect: deny\n    {rule}\n"
            ));
            assert_eq!(e.field.as_deref(), Some(field), "{e}");
            assert!(e.message.contains(says), "{rule}: {e}");
        }
        // What does apply is taken: a deny of every queue, a deny through `queue.*`.
        for rule in [
            "actions: queue.publish\n    resources: \"*\"",
            "actions: \"queue.*\"\n    resources: app:secret",
            "actions: queue.publish.queue\n    resources: \"app*\"",
            "actions: queue.info\n    resources: \"billing:*\"",
        ] {
            load_text(&format!(
                "namespace: app\nentries:\n  - name: p\n    kind: security.policy\n    effect: deny\n    {rule}\n"
            ))
            .unwrap_or_else(|e| panic!("{rule}: {e}"));
        }
    }

    /// Policies that cannot mean what they say: an action the runtime never checks
    /// (`publish`, `Queue.*`), no action or no resource at all, and a `resources:`
    /// written empty (`~`, or `${V}` with V set to nothing), which read as absent:
    /// every queue. The deny loaded and denied nothing; the allow allowed every queue
    /// (review).
    #[test]
    fn policies_that_cannot_mean_what_they_say_are_refused() {
        for (effect, rule, field, says) in [
            (
                "deny",
                "actions: publish",
                "actions",
                "no action the runtime checks",
            ),
            (
                "allow",
                "actions: [\"Queue.*\"]",
                "actions",
                "no action the runtime checks",
            ),
            (
                "deny",
                "actions: []\n    resources: \"*\"",
                "actions",
                "names no action",
            ),
            (
                "deny",
                "actions: queue.publish.queue\n    resources: []",
                "resources",
                "names no queue",
            ),
            (
                "allow",
                "actions: \"queue.*\"\n    resources: ~",
                "resources",
                "names no queue",
            ),
            (
                "allow",
                "actions: \"queue.*\"\n    resources: ${EMPTY}",
                "resources",
                "names no queue",
            ),
        ] {
            let e = single_error(&format!(
                "namespace: app\nentries:\n  - name: p\n    kind: security.policy\n    effect: {effect}\n    {rule}\n"
            ));
            assert_eq!(e.field.as_deref(), Some(field), "{rule}: {e}");
            assert!(e.message.contains(says), "{rule}: {e}");
        }
    }

    #[test]
    fn duplicates_and_unknown_kinds() {
        let errors = load_text("namespace: app\nentries:\n  - name: q\n    kind: queue.queue\n  - name: q\n    kind: queue.queue\n  - name: z\n    kind: queue.thing\n").unwrap_err().0;
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.line == 5 && e.message.contains("duplicate id app:q"))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.line == 8 && e.message.contains("unknown kind"))
        );
    }

    #[test]
    fn interpolation_and_strict_mode() {
        let config = load_text("namespace: app\nsecurity:\n  strict_mode: true\nentries:\n  - name: rabbit\n    kind: queue.driver.amqp\n    url: amqp://guest:${PASS}@127.0.0.1:${PORT:-5672}\n").unwrap();
        assert!(config.strict_mode);
        match &config.entries[0].kind {
            EntryKind::Driver { config, .. } => {
                assert_eq!(config["url"], "amqp://guest:s3cret@127.0.0.1:5672")
            }
            other => panic!("{other:?}"),
        }
        let e = single_error(
            "namespace: app\nentries:\n  - name: x\n    kind: queue.driver.amqp\n    url: ${NOPE}\n",
        );
        assert_eq!(e.line, 5);
    }

    #[test]
    fn yaml_syntax_errors_have_a_line() {
        let e = single_error("namespace: app\nentries:\n  - name: [unclosed\n");
        assert!(e.line >= 3, "{e}");
    }
}
