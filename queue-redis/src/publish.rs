//! Publishing: `XADD` (the reply is the confirmation), or a script that checks
//! `max_length` first.

use queue_core::{Error, Message, Result};
use redis::Value;

use crate::connection::Link;
use crate::error::{NOT_FOUND_CODE, REDIS_CODE, redis_code};
use crate::{Declared, GROUP, NAME, mapping, scripts};

/// Appends one message; `Ok` once Redis replied with its entry id (with the
/// fixture's `appendfsync always`, once it is on disk).
pub(crate) async fn publish(link: &Link, declared: &Declared, message: &Message) -> Result<()> {
    // The caller (the runtime's facade) says which queue: "publish to app:tasks: redis: ...".
    let what = NAME;
    let fields = mapping::to_fields(message);
    let stream = declared.keys.stream.clone();
    let sent = async {
        match declared.max_length {
            Some(max) => {
                let _: String = link
                    .run(what, |mut c| async move {
                        let mut invocation = scripts::PUBLISH_LIMITED.key(&stream);
                        invocation.arg(GROUP).arg(max).arg(fields);
                        invocation.invoke_async(&mut c).await
                    })
                    .await?;
                Ok(())
            }
            None => {
                let id: Option<String> = link
                    .run(what, |mut c| async move {
                        redis::cmd("XADD")
                            .arg(&stream)
                            .arg("NOMKSTREAM")
                            .arg("*")
                            .arg(fields)
                            .query_async(&mut c)
                            .await
                    })
                    .await?;
                id.map(|_| ()).ok_or_else(|| gone(what, &declared.spec.id))
            }
        }
    };
    within(link, what, sent).await
}

/// Appends several messages in one pipeline (one round trip); `Ok` once every
/// `XADD` replied. A queue with `max_length` takes them one at a time, each checked.
pub(crate) async fn publish_batch(
    link: &Link,
    declared: &Declared,
    messages: &[Message],
) -> Result<()> {
    if declared.max_length.is_some() {
        for (published, message) in messages.iter().enumerate() {
            publish(link, declared, message)
                .await
                .map_err(|e| e.in_batch(published, messages.len()))?;
        }
        return Ok(());
    }
    if messages.is_empty() {
        return Ok(());
    }
    let what = NAME;
    let mut pipe = redis::pipe();
    for message in messages {
        pipe.cmd("XADD")
            .arg(&declared.keys.stream)
            .arg("NOMKSTREAM")
            .arg("*")
            .arg(mapping::to_fields(message));
    }
    let sent = async {
        let replies: Vec<Value> = link
            .run(what, |mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        if replies.len() != messages.len() || replies.iter().any(|r| matches!(r, Value::Nil)) {
            let added = replies.iter().filter(|r| !matches!(r, Value::Nil)).count();
            return Err(gone(what, &declared.spec.id).in_batch(added, messages.len()));
        }
        Ok(())
    };
    // A pipeline that failed or timed out as a whole: none is known added.
    within(link, what, sent)
        .await
        .map_err(|e| e.in_batch(0, messages.len()))
}

async fn within<T>(
    link: &Link,
    what: &str,
    sending: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let limit = link.config().publish_timeout;
    let started = std::time::Instant::now();
    match tokio::time::timeout(limit, sending).await {
        Ok(result) => result,
        Err(_) => {
            link.lost(started);
            Err(Error::internal(format!(
                "{what}: no reply within {limit:?} (publish_timeout); the message may have been added, so a retry may deliver it twice"
            )))
        }
    }
}

/// `XADD NOMKSTREAM` to a stream that no longer exists (deleted behind the driver's back).
fn gone(what: &str, queue: &queue_core::QueueId) -> Error {
    Error::not_found(format!(
        "{what}: queue {queue}: its stream does not exist in Redis"
    ))
    .with_detail(REDIS_CODE, NOT_FOUND_CODE)
}

/// Whether a publish failed because the queue's stream is gone.
pub(crate) fn is_stream_gone(err: &Error) -> bool {
    redis_code(err) == Some(NOT_FOUND_CODE)
}
