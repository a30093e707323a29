//! Publishing: `XADD` (the reply is the confirmation), or a script that checks
//! `max_length` first.

use std::sync::atomic::{AtomicUsize, Ordering};

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
    within(link, what, sent)
        .await
        .map_err(|e| unanswered(e, "the message"))
}

/// The most `XADD`s one pipeline of a batch carries, and about the most bytes of
/// their fields: each pipeline has a `publish_timeout` of its own. One pipeline for a
/// whole batch failed, as not confirmed, when it took longer to write than that, once
/// it was being written and so stored, whole or in part: every try of the batch
/// stored it again (review).
const PIPELINE_COMMANDS: usize = 500;
const PIPELINE_BYTES: usize = 4 << 20;

/// Appends several messages, a pipeline (one round trip) of at most
/// [`PIPELINE_COMMANDS`] and about [`PIPELINE_BYTES`] at a time; `Ok` once every
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
    let mut confirmed = 0;
    for pipeline in pipelines(messages) {
        let (stored, result) = publish_pipeline(link, declared, pipeline).await;
        result.map_err(|e| {
            let sent = format!(
                "the {} messages after the first {confirmed}",
                pipeline.len()
            );
            unanswered(e, &sent).in_batch(confirmed + stored, messages.len())
        })?;
        confirmed += pipeline.len();
    }
    Ok(())
}

/// `messages` cut into the pipelines [`publish_batch`] sends, in order: each at most
/// [`PIPELINE_COMMANDS`] long, and past [`PIPELINE_BYTES`] only with one message.
fn pipelines(messages: &[Message]) -> Vec<&[Message]> {
    let size = |m: &Message| {
        let headers: usize = m.headers.iter().map(|(k, _)| k.len() + 16).sum();
        m.body.len() + m.id.len() + m.content_type.len() + headers
    };
    let mut cut = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, message) in messages.iter().enumerate() {
        let this = size(message);
        let full = i - start == PIPELINE_COMMANDS || bytes + this > PIPELINE_BYTES;
        if i > start && full {
            cut.push(&messages[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += this;
    }
    if start < messages.len() {
        cut.push(&messages[start..]);
    }
    cut
}

/// One pipeline of a batch: how many of its messages are known stored, and whether
/// all were.
async fn publish_pipeline(
    link: &Link,
    declared: &Declared,
    messages: &[Message],
) -> (usize, Result<()>) {
    let what = NAME;
    let mut pipe = redis::pipe();
    // Each `XADD`'s reply on its own: by default the crate fails the whole pipeline on
    // one refused command, and the replies of those stored before it were lost (a batch
    // cut by `maxmemory` said none was stored, and publishing it again duplicated them).
    pipe.ignore_errors();
    for message in messages {
        pipe.cmd("XADD")
            .arg(&declared.keys.stream)
            .arg("NOMKSTREAM")
            .arg("*")
            .arg(mapping::to_fields(message));
    }
    let added = AtomicUsize::new(0);
    let sent = async {
        // A refused command is the run's error (the link replaces a connection on a
        // read-only reply, say), with how many were added noted beside it.
        let (pipe, added) = (&pipe, &added);
        link.run(what, |mut c| async move {
            let replies: Vec<Value> = pipe.query_async(&mut c).await?;
            let (stored, refused) = tally(replies);
            added.store(stored, Ordering::Relaxed);
            refused.map_or(Ok(()), Err)
        })
        .await?;
        if added.load(Ordering::Relaxed) != messages.len() {
            return Err(gone(what, &declared.spec.id));
        }
        Ok(())
    };
    // A pipeline that failed or timed out as a whole: none is known added.
    let result = within(link, what, sent).await;
    (added.load(Ordering::Relaxed), result)
}

/// A publish's failure with no reply from Redis (its connection failed, or its
/// reply did not come in time): the command may have been written, and the message
/// added, before. Said so, as a timeout says it: the redis crate's own time-out
/// said only that the connection failed (review).
/// `sent` names what may have been added.
fn unanswered(err: Error, sent: &str) -> Error {
    let answered = redis_code(&err).is_some() || !err.retryable();
    if answered || err.message().contains("may have been added") {
        return err;
    }
    err.context(format!(
        "no reply from Redis: if the command was written before, {sent} may have been added, and a retry may deliver it twice"
    ))
}

/// How many of a pipeline's `XADD`s stored their message (replied with an entry id),
/// and the first refusal among them, if any. A `nil` reply (`NOMKSTREAM` on a stream
/// that is gone) stores nothing and is no refusal.
fn tally(replies: Vec<Value>) -> (usize, Option<redis::RedisError>) {
    let mut stored = 0;
    let mut refused = None;
    for reply in replies {
        match reply {
            Value::Nil => {}
            Value::ServerError(e) => {
                refused.get_or_insert(redis::RedisError::from(e));
            }
            _ => stored += 1,
        }
    }
    (stored, refused)
}

async fn within<T>(
    link: &Link,
    what: &str,
    sending: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    link.within_limit(sending).await.unwrap_or_else(|| {
        Err(Error::internal(format!(
            "{what}: no reply within {:?} (publish_timeout); the message may have been added, so a retry may deliver it twice",
            link.config().publish_timeout
        )))
    })
}

/// `XADD NOMKSTREAM` to a stream that no longer exists (deleted behind the driver's back).
fn gone(what: &str, queue: &queue_core::QueueId) -> Error {
    Error::not_found(format!(
        "{what}: queue {queue}: its stream does not exist in Redis"
    ))
    .with_detail(REDIS_CODE, NOT_FOUND_CODE)
}

/// Whether a publish failed because the queue's stream, or its group, is gone.
pub(crate) fn is_stream_gone(err: &Error) -> bool {
    // `NOGROUP`: the limited publish's script found the stream without its group.
    matches!(redis_code(err), Some(NOT_FOUND_CODE | "NOGROUP"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch goes as pipelines of at most 500 commands and about 4 MiB, each under a
    /// `publish_timeout` of its own, in order; a message larger than that goes alone.
    #[test]
    fn a_batch_is_cut_into_pipelines_by_count_and_size() {
        let small = |n: usize| Message::from_bytes(vec![b'x'; n], Default::default(), "text/plain");
        let many: Vec<Message> = (0..1_200).map(|_| small(10)).collect();
        let lengths: Vec<usize> = pipelines(&many).iter().map(|p| p.len()).collect();
        assert_eq!(lengths, vec![500, 500, 200]);
        let large = vec![small(3 << 20), small(3 << 20), small(10 << 20), small(1)];
        let lengths: Vec<usize> = pipelines(&large).iter().map(|p| p.len()).collect();
        assert_eq!(lengths, vec![1, 1, 1, 1]);
        assert!(pipelines(&[]).is_empty());
    }

    /// What Redis answers a pipeline of `XADD`s with each reply on its own: a stored
    /// message (its entry id), a refused one (`maxmemory` reached), one whose stream
    /// is gone (`NOMKSTREAM`: nil). The pipeline's replies read as the crate gives them.
    #[test]
    fn a_batch_cut_short_counts_what_was_stored_and_keeps_the_refusal() {
        let answer = b"*4\r\n$3\r\n1-0\r\n$3\r\n1-1\r\n-OOM command not allowed when used memory > 'maxmemory'.\r\n_\r\n";
        let Value::Array(replies) = redis::parse_redis_value(answer).unwrap() else {
            panic!("an array")
        };
        let replies: Vec<Value> = redis::from_redis_value(Value::Array(replies)).unwrap();
        let (stored, refused) = tally(replies);
        assert_eq!(stored, 2);
        let refused = refused.expect("the refusal is kept");
        assert_eq!(refused.code(), Some("OOM"), "{refused}");
        // The workspace's error for it says two are known stored.
        let error = crate::error::from_redis("publish", refused).in_batch(stored, 4);
        assert_eq!(
            error.details().get("confirmed").map(String::as_str),
            Some("2")
        );
        // Every reply an entry id: all stored, nothing refused.
        let all = vec![Value::SimpleString("1-0".into()); 3];
        assert!(matches!(tally(all), (3, None)));
    }
}
