//! Runs the Lua examples of a Markdown document, so documentation that shows Lua is
//! executed by the test suite and cannot drift from the code.
//!
//! Every ```` ```lua ```` block is an example. By default it runs as the body of a
//! queue handler for a sample delivery (so `queue.message()` works) and must be
//! acknowledged. An HTML comment on the line before the block changes that:
//!
//! - `<!-- example: outside -->`: run outside any handler.
//! - `<!-- example: handler=NAME -->`: load the block as a source file and run its
//!   function `NAME` as the handler.
//! - `<!-- example: expect=nack -->`: the handler must reject the message.
//!
//! A ```` ```text ```` block right after an example is what the example must `print`.
//!
//! The sample world: queues `app:tasks`, `app:emails`, `app:notifications` on a memory
//! driver; globals `order = {id = 1001}`, `request_id = "req-42"`, and an `email`
//! module whose `send(to, template, data)` returns `true`, or `nil, err` for
//! `"bounce@example.com"`. The sample delivery has id `msg-0001`, headers
//! `priority = "high"` and `correlation_id = "req-42"`, and payload
//! `{to = "ada@example.com", template = "welcome", data = {name = "Ada"}}`.

use std::cell::RefCell;
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

/// Finds the Lua examples of a Markdown document.
pub fn extract(markdown: &str) -> Vec<Example> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut examples = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() != "```lua" {
            i += 1;
            continue;
        }
        let fence = i;
        let directive = fence
            .checked_sub(1)
            .map(|p| lines[p].trim())
            .and_then(|l| l.strip_prefix("<!-- example:"))
            .and_then(|l| l.strip_suffix("-->"))
            .unwrap_or("")
            .trim()
            .to_string();
        let (code, after) = block(&lines, fence + 1);
        let mut next = after;
        while next < lines.len() && lines[next].trim().is_empty() {
            next += 1;
        }
        let expected_output = if next < lines.len() && lines[next].trim() == "```text" {
            let (text, end) = block(&lines, next + 1);
            next = end;
            Some(text)
        } else {
            next = after;
            None
        };
        let mut mode = Mode::HandlerBody;
        let mut expect_nack = false;
        for word in directive.split_whitespace() {
            match word {
                "outside" => mode = Mode::Outside,
                "expect=nack" => expect_nack = true,
                w => {
                    if let Some(name) = w.strip_prefix("handler=") {
                        mode = Mode::Handler(name.to_string());
                    }
                }
            }
        }
        examples.push(Example {
            line: fence + 1,
            code,
            mode,
            expect_nack,
            expected_output,
        });
        i = next;
    }
    examples
}

fn block(lines: &[&str], start: usize) -> (String, usize) {
    let mut end = start;
    while end < lines.len() && lines[end].trim() != "```" {
        end += 1;
    }
    (lines[start..end.min(lines.len())].join("\n"), end + 1)
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

struct NoopSettle;

#[async_trait(?Send)]
impl Settle for NoopSettle {
    async fn ack(&self) -> Result<()> {
        Ok(())
    }
    async fn nack(&self, _reason: &str) -> Result<()> {
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
        host.lua().globals().set("print", print)?;
        host.lua().load(PRELUDE).exec()
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
        (None | Some(Outcome::Ack | Outcome::Settled), false)
        | (Some(Outcome::Nack { .. }), true) => {}
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
    let payload = message.decode()?;
    let delivery = DeliveryContext {
        message,
        settle: Rc::new(NoopSettle),
    };
    Ok(host
        .run_handler(&handler, &payload, delivery, SecurityContext::default())
        .await)
}

/// Runs every example of a document; returns how many ran, or the first failure.
pub async fn run_document(markdown: &str) -> Result<usize> {
    let examples = extract(markdown);
    for example in &examples {
        run(example).await?;
    }
    Ok(examples.len())
}
