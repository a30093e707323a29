//! Runs the Lua examples of a Markdown document, so documentation that shows Lua is
//! executed by the test suite and cannot drift from the code. The block scanner and
//! the directive syntax here are shared with the runtime's tests, which check the YAML
//! and command examples of the same pages.
//!
//! A directive is an HTML comment on the line right before a fence (invisible in the
//! rendered book): `<!-- example: word key=value key="quoted value" -->`. A
//! ```` ```text ```` block right after an example (blank lines between are fine) is
//! what the example must print.
//!
//! Every ```` ```lua ```` block is an example. By default it runs as the body of a
//! queue handler for a sample delivery (so `queue.message()` works) and must be
//! acknowledged. Directives change that:
//!
//! - `<!-- example: outside -->`: run outside any handler.
//! - `<!-- example: handler=NAME -->`: load the block as a source file and run its
//!   function `NAME` as the handler.
//! - `<!-- example: expect=nack -->`: the handler must reject the message.
//! - `<!-- example: file=NAME -->`: not run here: the block is the file `NAME` for the
//!   page's configuration examples, which the runtime's tests run.
//!
//! The sample world: queues `app:tasks`, `app:emails`, `app:notifications` on a memory
//! driver; globals `order = {id = 1001}`, `request_id = "req-42"`, and an `email`
//! module whose `send(to, template, data)` returns `true`, or `nil, err` for
//! `"bounce@example.com"`. The sample delivery has id `msg-0001`, headers
//! `priority = "high"` and `correlation_id = "req-42"`, and payload
//! `{to = "ada@example.com", template = "welcome", data = {name = "Ada"}}`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use async_trait::async_trait;
use queue_core::memory::MemoryDriver;
use queue_core::security::SecurityContext;
use queue_core::{
    Codec, Error, HeaderValue, Headers, Message, PublishSettings, QueueId, QueueSpec, Queues,
    Result, Value,
};

use crate::{DeliveryContext, LuaHost, Outcome, Settle};

/// A fenced code block of a Markdown page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Line of the opening fence (1-based).
    pub line: usize,
    /// The fence's info string: `lua`, `yaml`, `rust,ignore`, ...
    pub lang: String,
    /// The text between the fences.
    pub code: String,
    /// The directive on the line right before the fence.
    pub directive: Directive,
    /// The ```` ```text ```` block right after: the line of its fence and its text.
    pub output: Option<(usize, String)>,
}

/// The words of an `<!-- example: ... -->` comment, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Directive {
    /// `(word, value)`: `outside` is `("outside", None)`, `of=app.yaml` is
    /// `("of", Some("app.yaml"))`, `env=A=b` is `("env", Some("A=b"))`.
    pub words: Vec<(String, Option<String>)>,
}

impl Directive {
    /// Parses the text between `example:` and `-->`. Values may be double-quoted
    /// (`contains="out of range"`), with `\"` and `\\` inside.
    pub fn parse(text: &str) -> std::result::Result<Directive, String> {
        let mut words = Vec::new();
        let mut chars = text.trim().chars().peekable();
        while chars.peek().is_some() {
            let mut key = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() || c == '=' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            let value = if chars.peek() == Some(&'=') {
                chars.next();
                let mut value = String::new();
                if chars.peek() == Some(&'"') {
                    chars.next();
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some(c) => value.push(c),
                                None => return Err(format!("`{key}`: unfinished escape")),
                            },
                            Some(c) => value.push(c),
                            None => return Err(format!("`{key}`: unclosed quote")),
                        }
                    }
                } else {
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() {
                            break;
                        }
                        value.push(c);
                        chars.next();
                    }
                }
                Some(value)
            } else {
                None
            };
            if key.is_empty() {
                return Err("a word without a name".into());
            }
            words.push((key, value));
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        }
        Ok(Directive { words })
    }

    /// Whether the word is present, with or without a value.
    pub fn has(&self, word: &str) -> bool {
        self.words.iter().any(|(k, _)| k == word)
    }

    /// The value of the first `key=value`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.words
            .iter()
            .find(|(k, v)| k == key && v.is_some())
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every value given for `key` (`env=` may be repeated).
    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.words
            .iter()
            .filter(move |(k, _)| k == key)
            .filter_map(|(_, v)| v.as_deref())
    }

    /// Fails on a word this kind of block does not take, so a typo is never ignored.
    pub fn check_known(&self, known: &[&str]) -> std::result::Result<(), String> {
        match self
            .words
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((k, _)) => Err(format!(
                "unknown directive word `{k}`: this block takes {}",
                known.join(", ")
            )),
        }
    }
}

/// The languages a fence may name: each is run or checked by the docs tests, or is
/// plain output (`text`). Any other block would be skipped without a word.
pub const LANGUAGES: &[&str] = &["lua", "yaml", "sh", "text", "rust", "rust,ignore"];

/// Every fenced block of a Markdown page, each with its directive and the text block
/// that follows it (a text block taken as an output is not listed on its own). Fails,
/// naming the line, on what the docs tests would otherwise skip without a word: a
/// directive that is malformed or not right before a fence, a comment that mentions
/// `example` but is no directive, a `~~~` fence, a fence in a language outside
/// [`LANGUAGES`], and an unclosed fence.
pub fn blocks(markdown: &str) -> std::result::Result<Vec<Block>, String> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut found = Vec::new();
    let mut pending: Option<(usize, Directive)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.starts_with("~~~") {
            return Err(format!(
                "line {}: write code blocks with ``` fences: a ~~~ fence is not run",
                i + 1
            ));
        }
        if line.starts_with("<!--")
            && line.to_lowercase().contains("example")
            && !line.starts_with("<!-- example:")
        {
            return Err(format!(
                "line {}: a comment that mentions `example` must be a directive, written `<!-- example: words -->` on one line at its start",
                i + 1
            ));
        }
        if let Some(rest) = line.strip_prefix("<!-- example:") {
            let body = rest.strip_suffix("-->").ok_or_else(|| {
                format!("line {}: a directive ends with `-->` on its line", i + 1)
            })?;
            let directive = Directive::parse(body).map_err(|e| format!("line {}: {e}", i + 1))?;
            pending = Some((i + 1, directive));
            i += 1;
            continue;
        }
        let Some(lang) = line.strip_prefix("```") else {
            if let Some((at, _)) = pending.take() {
                return Err(format!(
                    "line {at}: a directive must be on the line right before a ``` fence"
                ));
            }
            i += 1;
            continue;
        };
        if !LANGUAGES.contains(&lang.trim()) {
            return Err(format!(
                "line {}: a fence names one of {} (found {:?}): the docs tests skip any other",
                i + 1,
                LANGUAGES.join(", "),
                lang.trim()
            ));
        }
        let directive = pending.take().map(|(_, d)| d).unwrap_or_default();
        let (code, after) = fenced(&lines, i)?;
        let mut next = after;
        while next < lines.len() && lines[next].trim().is_empty() {
            next += 1;
        }
        let output =
            if lang.trim() != "text" && next < lines.len() && lines[next].trim() == "```text" {
                let (text, end) = fenced(&lines, next)?;
                let output = Some((next + 1, text));
                next = end;
                output
            } else {
                next = after;
                None
            };
        found.push(Block {
            line: i + 1,
            lang: lang.trim().to_string(),
            code,
            directive,
            output,
        });
        i = next;
    }
    if let Some((at, _)) = pending {
        return Err(format!(
            "line {at}: a directive must be on the line right before a ``` fence"
        ));
    }
    Ok(found)
}

/// The text of the block whose fence is at `open`, dedented by the fence's indent, and
/// the index of the line after its closing fence.
fn fenced(lines: &[&str], open: usize) -> std::result::Result<(String, usize), String> {
    let spaces = |l: &str| l.bytes().take_while(|b| *b == b' ').count();
    let indent = spaces(lines[open]);
    let mut end = open + 1;
    while end < lines.len() && lines[end].trim() != "```" {
        end += 1;
    }
    if end == lines.len() {
        return Err(format!("line {}: the fence is never closed", open + 1));
    }
    let code: Vec<&str> = lines[open + 1..end]
        .iter()
        .map(|l| &l[spaces(l).min(indent)..])
        .collect();
    Ok((code.join("\n"), end + 1))
}

/// The manual's pages under `root` (the workspace): every `docs/**/*.md` but the built
/// book, and `README.md`, sorted.
pub fn pages(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "book") {
                    walk(&path, out);
                }
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&root.join("docs"), &mut found);
    found.push(root.join("README.md"));
    found.sort();
    found
}

/// How an example runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// As the body of a handler (the default).
    HandlerBody,
    /// Outside any handler.
    Outside,
    /// Loaded as a source; this function is the handler.
    Handler(String),
}

/// One Lua example found in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Line of the opening fence (1-based).
    pub line: usize,
    /// The Lua code.
    pub code: String,
    /// How it runs.
    pub mode: Mode,
    /// Whether the handler must reject the message.
    pub expect_nack: bool,
    /// What it must print, if the document says.
    pub expected_output: Option<String>,
}

/// The Lua examples of a Markdown document (every ```` ```lua ```` block but the
/// `file=` ones). Fails, naming the line, on a malformed or unknown directive.
pub fn extract(markdown: &str) -> std::result::Result<Vec<Example>, String> {
    let mut examples = Vec::new();
    for block in blocks(markdown)? {
        if block.lang != "lua" {
            continue;
        }
        let at = |e: String| format!("line {}: {e}", block.line);
        let d = &block.directive;
        d.check_known(&["outside", "handler", "expect", "file"])
            .map_err(at)?;
        if d.has("file") {
            continue;
        }
        let mut mode = Mode::HandlerBody;
        if d.has("outside") {
            mode = Mode::Outside;
        }
        if d.has("handler") {
            let name = d
                .get("handler")
                .ok_or_else(|| at("`handler=NAME` names the function".into()))?;
            mode = Mode::Handler(name.to_string());
        }
        let expect_nack = match d.get("expect") {
            None | Some("ack") => false,
            Some("nack") => true,
            Some(other) => {
                return Err(at(format!("expect={other}: use expect=nack or expect=ack")));
            }
        };
        examples.push(Example {
            line: block.line,
            code: block.code,
            mode,
            expect_nack,
            expected_output: block.output.map(|(_, text)| text),
        });
    }
    Ok(examples)
}

/// The sample delivery examples run against.
pub fn sample_delivery() -> Message {
    let payload = Value::map([
        ("to", Value::from("ada@example.com")),
        ("template", Value::from("welcome")),
        ("data", Value::map([("name", Value::from("Ada"))])),
    ]);
    let headers = Headers::from_pairs([
        ("message_id", HeaderValue::from("msg-0001")),
        ("priority", HeaderValue::from("high")),
        ("correlation_id", HeaderValue::from("req-42")),
    ]);
    Message::encode(&payload, headers, Codec::Json).expect("the sample payload encodes")
}

/// How an example's handler settled its message itself, if it did.
#[derive(Default)]
struct SettledBy(RefCell<Option<bool>>);

#[async_trait(?Send)]
impl Settle for SettledBy {
    async fn ack(&self) -> Result<()> {
        self.0.borrow_mut().get_or_insert(true);
        Ok(())
    }
    async fn nack(&self, _reason: &str, _retryable: bool) -> Result<()> {
        self.0.borrow_mut().get_or_insert(false);
        Ok(())
    }
}

const PRELUDE: &str = r#"
order = { id = 1001 }
request_id = "req-42"
email = {}
function email.send(to, template, data)
  if to == "bounce@example.com" then
    return nil, errors.new({ message = "mailbox unavailable", kind = errors.UNAVAILABLE })
  end
  return true
end
"#;

/// Runs one example in a fresh sample world; returns what it printed.
/// Fails if it raises, if the handler outcome is not the expected one, or if the
/// output differs from the document's.
pub async fn run(example: &Example) -> Result<String> {
    let queues = Queues::new();
    let driver = Arc::new(MemoryDriver::new());
    for q in ["app:tasks", "app:emails", "app:notifications"] {
        let spec = QueueSpec::new(QueueId::parse(q)?);
        queues
            .declare(spec, PublishSettings::default(), driver.clone())
            .await?;
    }
    let host = LuaHost::new(queues, SecurityContext::default())?;
    let printed = Rc::new(RefCell::new(String::new()));
    let sink = Rc::clone(&printed);
    let setup = || -> mlua::Result<()> {
        let print = host
            .lua()
            .create_function(move |_, args: mlua::Variadic<mlua::Value>| {
                let parts: Vec<String> = args
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<mlua::Result<_>>()?;
                let mut out = sink.borrow_mut();
                out.push_str(&parts.join("\t"));
                out.push('\n');
                Ok(())
            })?;
        host.globals().set("print", print)?;
        // Trusted set-up: its globals go where every example reads names from.
        host.lua()
            .load(PRELUDE)
            .set_environment(host.globals().clone())
            .exec()
    };
    setup().map_err(|e| Error::internal(format!("example prelude: {e}")))?;

    let at = format!("example at line {}", example.line);
    let outcome = match &example.mode {
        Mode::Outside => {
            host.eval(&example.code).await.map_err(|e| e.context(&at))?;
            None
        }
        Mode::HandlerBody => {
            let source = format!("function __example(payload)\n{}\nend", example.code);
            Some(run_handler(&host, &source, "__example").await?)
        }
        Mode::Handler(name) => Some(run_handler(&host, &example.code, name).await?),
    };
    match (outcome, example.expect_nack) {
        (None | Some(Outcome::Ack), false) | (Some(Outcome::Nack { .. }), true) => {}
        (other, _) => {
            return Err(Error::invalid(format!(
                "{at}: handler ended with {other:?}, expected {}",
                if example.expect_nack {
                    "a nack"
                } else {
                    "an ack"
                }
            )));
        }
    }
    let printed = printed.borrow().trim_end().to_string();
    if let Some(expected) = &example.expected_output
        && printed != expected.trim_end()
    {
        return Err(Error::invalid(format!(
            "{at} printed:\n{printed}\nbut the document says:\n{expected}"
        )));
    }
    Ok(printed)
}

async fn run_handler(host: &LuaHost, source: &str, method: &str) -> Result<Outcome> {
    let dir = std::env::temp_dir().join(format!(
        "queue-lua-example-{}",
        queue_core::new_message_id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::internal(e.to_string()))?;
    let path = dir.join("example.lua");
    std::fs::write(&path, source).map_err(|e| Error::internal(e.to_string()))?;
    let handler = host.handler(&path, method);
    let _ = std::fs::remove_dir_all(&dir);
    let handler = handler?;
    let message = sample_delivery();
    let payload = host.decode_payload(&message)?;
    let settled_by = Rc::new(SettledBy::default());
    let delivery = DeliveryContext {
        message: std::sync::Arc::new(message),
        settle: Rc::clone(&settled_by) as Rc<dyn Settle>,
    };
    let outcome = host
        .run_handler(&handler, payload, delivery, SecurityContext::default())
        .await;
    // A handler that settled the message itself acked or nacked it: which one is
    // what the example shows.
    Ok(match (outcome, *settled_by.0.borrow()) {
        (Outcome::Settled, Some(true)) => Outcome::Ack,
        (Outcome::Settled, _) => Outcome::Nack {
            reason: "the handler called msg:nack()".to_string(),
            retryable: true,
        },
        (outcome, _) => outcome,
    })
}

/// Runs every example of a document; returns how many ran, or the first failure.
pub async fn run_document(markdown: &str) -> Result<usize> {
    let examples = extract(markdown).map_err(Error::invalid)?;
    for example in &examples {
        run(example).await?;
    }
    Ok(examples.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_take_bare_words_values_and_quoted_values() {
        let d =
            Directive::parse(r#"fragment of=app.yaml contains="out of \"range\"" env=A=b env=C=d"#)
                .unwrap();
        assert!(d.has("fragment") && d.has("of") && !d.has("run"));
        assert_eq!(d.get("of"), Some("app.yaml"));
        assert_eq!(d.get("contains"), Some(r#"out of "range""#));
        assert_eq!(d.values("env").collect::<Vec<_>>(), vec!["A=b", "C=d"]);
        assert!(
            d.check_known(&["fragment", "of", "contains", "env"])
                .is_ok()
        );
        let e = d.check_known(&["fragment", "of"]).unwrap_err();
        assert!(e.contains("`contains`"), "{e}");
        assert!(Directive::parse(r#"contains="open"#).is_err());
    }

    #[test]
    fn blocks_carry_their_directive_and_the_text_right_after() {
        let page = "# T\n\n<!-- example: file=h.lua -->\n```lua\nx = 1\n```\n\n```text\n1\n```\n\n```yaml\na: 1\n```\nprose\n```text\nnot an output\n```\n";
        let found = blocks(page).unwrap();
        assert_eq!(found.len(), 3, "{found:?}");
        assert_eq!((found[0].line, found[0].lang.as_str()), (4, "lua"));
        assert_eq!(found[0].directive.get("file"), Some("h.lua"));
        assert_eq!(found[0].output, Some((8, "1".to_string())));
        assert_eq!((found[1].line, found[1].output.clone()), (12, None));
        assert_eq!(found[2].lang, "text");
    }

    #[test]
    fn a_directive_away_from_a_fence_or_an_open_fence_is_an_error() {
        let e = blocks("<!-- example: outside -->\n\n```lua\n```\n").unwrap_err();
        assert!(e.starts_with("line 1:"), "{e}");
        let e = blocks("text\n```yaml\na: 1\n").unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
        let e = extract("<!-- example: outsid -->\n```lua\n```\n").unwrap_err();
        assert!(e.contains("unknown directive word `outsid`"), "{e}");
    }

    #[test]
    fn what_the_docs_tests_would_skip_silently_is_an_error() {
        for (page, line, says) in [
            ("a\n~~~lua\nx()\n~~~\n", 2, "~~~ fence"),
            ("```bash\nls\n```\n", 1, "found \"bash\""),
            ("```\nls\n```\n", 1, "found \"\""),
            ("```Lua\nx()\n```\n", 1, "found \"Lua\""),
            (
                "<!--example: run-->\n```sh\n```\n",
                1,
                "must be a directive",
            ),
            (
                "<!-- Example: outside -->\n```lua\n```\n",
                1,
                "must be a directive",
            ),
            ("x\n  <!-- examples run -->\n", 2, "must be a directive"),
        ] {
            let e = blocks(page).unwrap_err();
            assert!(
                e.starts_with(&format!("line {line}:")) && e.contains(says),
                "{page:?}: {e}"
            );
        }
        assert!(blocks("<!-- a comment about something else -->\n```rust,ignore\n```\n").is_ok());
    }

    #[tokio::test]
    async fn a_handler_that_settles_itself_is_judged_by_how_it_settled() {
        let nacks = "<!-- example: expect=nack -->\n```lua\nqueue.message():nack('no')\n```\n";
        let acks = "```lua\nqueue.message():ack()\n```\n";
        assert_eq!(run_document(nacks).await.unwrap(), 1);
        assert_eq!(run_document(acks).await.unwrap(), 1);
        let claims_ack = "```lua\nqueue.message():nack('no')\n```\n";
        let e = run_document(claims_ack).await.unwrap_err();
        assert!(e.to_string().contains("expected an ack"), "{e}");
        let claims_nack = "<!-- example: expect=nack -->\n```lua\nqueue.message():ack()\n```\n";
        assert!(run_document(claims_nack).await.is_err());
    }
}
