//! Turning fe2o3-amqp's errors into the workspace's [`queue_core::Error`].
//!
//! fe2o3's own errors never carry the connection URL, and the driver only ever formats
//! the redacted one, so no password reaches a message.

use fe2o3_amqp::link::{ReceiverAttachError, SenderAttachError, SessionStopReason};
use fe2o3_amqp::types::definitions::{self, AmqpError, ErrorCondition, LinkError};
use queue_core::{Error, ErrorKind};

/// The portable kind of an error condition a peer sent.
pub(crate) fn kind_of_condition(condition: &ErrorCondition) -> ErrorKind {
    match condition {
        ErrorCondition::AmqpError(AmqpError::NotFound) => ErrorKind::NotFound,
        ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess) => ErrorKind::PermissionDenied,
        ErrorCondition::AmqpError(AmqpError::PreconditionFailed) => ErrorKind::AlreadyExists,
        ErrorCondition::AmqpError(AmqpError::InvalidField)
        | ErrorCondition::AmqpError(AmqpError::NotAllowed)
        | ErrorCondition::AmqpError(AmqpError::NotImplemented) => ErrorKind::Invalid,
        _ => ErrorKind::Internal,
    }
}

/// What RabbitMQ says with NOT_FOUND when a queue exists but its process is down for
/// a while (its node stopping or stopped in a cluster): not a missing queue, and
/// cured by waiting, so it is `UNAVAILABLE` and retried.
const QUEUE_DOWN: [&str; 2] = [
    "process is stopped by supervisor",
    "is down or inaccessible",
];

/// An error a peer sent (detach, end or close with an error).
pub(crate) fn remote(err: &definitions::Error) -> Error {
    let description = err.description.as_deref().unwrap_or_default();
    let kind = match kind_of_condition(&err.condition) {
        ErrorKind::NotFound if QUEUE_DOWN.iter().any(|t| description.contains(t)) => {
            ErrorKind::Unavailable
        }
        kind => kind,
    };
    let mut message = format!("{:?}", err.condition);
    if let Some(description) = &err.description {
        message.push_str(": ");
        message.push_str(description);
    }
    Error::new(kind, message)
}

/// A publish the broker answered with `rejected`. What the condition names decides
/// whether sending it again can help: a message too large or one the broker cannot
/// decode will be refused every time, so it is `INVALID` (not retried: a retry copy
/// refused so is dead-lettered instead of returned again and again); a refusal
/// without a condition, or for a limit that passes (`resource-limit-exceeded`), stays
/// `INTERNAL`, retryable.
pub(crate) fn rejected(err: Option<&definitions::Error>) -> Error {
    let Some(err) = err else {
        return Error::internal("the broker rejected the message (it gave no reason)");
    };
    let refusal = remote(err);
    let kind = match &err.condition {
        ErrorCondition::LinkError(LinkError::MessageSizeExceeded)
        | ErrorCondition::AmqpError(AmqpError::DecodeError) => ErrorKind::Invalid,
        _ => refusal.kind(),
    };
    Error::new(
        kind,
        format!("the broker rejected the message: {}", refusal.message()),
    )
}

/// A failed sender attach.
pub(crate) fn sender_attach(err: SenderAttachError) -> Error {
    match &err {
        SenderAttachError::RemoteClosedWithError(remote_err)
        | SenderAttachError::SessionStopped(SessionStopReason::RemoteEndedWithError(remote_err)) => {
            remote(remote_err)
        }
        _ => Error::internal(format!("attaching a sender failed: {err}")),
    }
    .with_source(err)
}

/// A failed receiver attach.
pub(crate) fn receiver_attach(err: ReceiverAttachError) -> Error {
    match &err {
        ReceiverAttachError::RemoteClosedWithError(remote_err)
        | ReceiverAttachError::SessionStopped(SessionStopReason::RemoteEndedWithError(
            remote_err,
        )) => remote(remote_err),
        _ => Error::internal(format!("attaching a receiver failed: {err}")),
    }
    .with_source(err)
}

/// Errors that retrying on a fresh link or connection cannot cure.
pub(crate) fn is_permanent(err: &Error) -> bool {
    matches!(
        err.kind(),
        ErrorKind::NotFound
            | ErrorKind::PermissionDenied
            | ErrorKind::AlreadyExists
            | ErrorKind::Invalid
    )
}

/// The driver (or its subscription) is closed.
pub(crate) fn closed(what: &str) -> Error {
    Error::new(
        ErrorKind::Canceled,
        format!("{what}: the amqp10 driver is closed"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_map_to_portable_kinds() {
        let not_found =
            definitions::Error::new(AmqpError::NotFound, Some("no queue 'x'".into()), None);
        let err = remote(&not_found);
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.message().contains("no queue 'x'"));
        assert!(is_permanent(&err));
        // A queue whose node is down in a cluster comes back: retried, not permanent.
        for down in [
            "queue 'q' in vhost '/' process is stopped by supervisor",
            "home node 'rabbit@a' of durable queue 'q' in vhost '/' is down or inaccessible",
        ] {
            let err = remote(&definitions::Error::new(
                AmqpError::NotFound,
                Some(down.into()),
                None,
            ));
            assert_eq!(err.kind(), ErrorKind::Unavailable, "{down}");
            assert!(err.retryable() && !is_permanent(&err), "{down}");
        }
        let limit = definitions::Error::new(AmqpError::ResourceLimitExceeded, None, None);
        assert_eq!(remote(&limit).kind(), ErrorKind::Internal);
        assert!(remote(&limit).retryable());
    }

    #[test]
    fn a_rejection_that_will_come_again_is_not_retried() {
        for (condition, kind) in [
            (
                ErrorCondition::LinkError(LinkError::MessageSizeExceeded),
                ErrorKind::Invalid,
            ),
            (
                ErrorCondition::AmqpError(AmqpError::DecodeError),
                ErrorKind::Invalid,
            ),
            (
                ErrorCondition::AmqpError(AmqpError::UnauthorizedAccess),
                ErrorKind::PermissionDenied,
            ),
            (
                ErrorCondition::AmqpError(AmqpError::ResourceLimitExceeded),
                ErrorKind::Internal,
            ),
        ] {
            let refusal = definitions::Error::new(condition.clone(), Some("why".into()), None);
            let err = rejected(Some(&refusal));
            assert_eq!(err.kind(), kind, "{condition:?}");
            assert_eq!(
                err.retryable(),
                kind == ErrorKind::Internal,
                "{condition:?}"
            );
            assert!(err.message().contains("rejected") && err.message().contains("why"));
        }
        assert!(rejected(None).retryable());
    }
}
