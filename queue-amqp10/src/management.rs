//! Queue counts from ActiveMQ Artemis, over AMQP 1.0 itself: requests to its
//! `activemq.management` address, answered on a dynamic reply queue
//! (docs/drivers/amqp10.md, "ActiveMQ Artemis"). Each read is one request per
//! attribute (`messageCount`, `deliveringCount`, `scheduledCount`,
//! `consumerCount`), one at a time on one pair of links that is attached on first
//! use and again after a connection loss.

use std::time::Duration;

use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::types::messaging::{
    AmqpValue, ApplicationProperties, Body, Message as AmqpMessage, MessageId, Properties, Source,
    Target,
};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use queue_core::{Error, QueueInfo, Result};
use tokio::sync::Mutex;

use crate::connection::{Attached, Connector};

/// The address Artemis takes management requests on.
const MANAGEMENT_ADDRESS: &str = "activemq.management";

/// How long one management request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The request and reply links.
struct Links {
    requests: Attached<Sender>,
    replies: Attached<Receiver>,
    /// The dynamic address the broker gave the reply queue.
    reply_to: String,
}

/// Reads queue counts through Artemis' management address.
pub(crate) struct Management {
    links: Mutex<Option<Links>>,
}

impl Management {
    pub(crate) fn new() -> Management {
        Management {
            links: Mutex::new(None),
        }
    }

    /// The counts of the queue named `queue` on the broker. A queue the broker does
    /// not know is `NOT_FOUND`.
    pub(crate) async fn info(&self, connector: &Connector, queue: &str) -> Result<QueueInfo> {
        let mut links = self.links.lock().await;
        let result = async {
            let total = self
                .read(connector, &mut links, queue, "messageCount")
                .await?;
            let delivering = self
                .read(connector, &mut links, queue, "deliveringCount")
                .await?;
            let scheduled = self
                .read(connector, &mut links, queue, "scheduledCount")
                .await?;
            let consumers = self
                .read(connector, &mut links, queue, "consumerCount")
                .await?;
            Ok(QueueInfo {
                // Artemis counts delivered-but-unsettled and scheduled messages in
                // messageCount.
                ready: Some(total.saturating_sub(delivering.saturating_add(scheduled))),
                in_flight: Some(delivering),
                delayed: Some(scheduled),
                consumers: Some(consumers),
            })
        }
        .await;
        if result.as_ref().is_err_and(|e: &Error| e.retryable()) {
            // The links may be the broken part: attach new ones next time.
            *links = None;
        }
        result
    }

    /// One attribute of one queue.
    async fn read(
        &self,
        connector: &Connector,
        links: &mut Option<Links>,
        queue: &str,
        attribute: &str,
    ) -> Result<u64> {
        // Taken out for the exchange and put back only once its reply is read: a read
        // cut off after its request went out (its future dropped, or timed out) would
        // leave the reply on the link for the next read to take as its own (another
        // queue's counts). New links are attached instead.
        let mut exchanging = match links.take() {
            Some(attached) => attached,
            None => attach(connector).await?,
        };
        let reply = Self::exchange(&mut exchanging, queue, attribute).await?;
        *links = Some(exchanging);
        let succeeded = reply
            .application_properties
            .as_ref()
            .and_then(|p| p.get("_AMQ_OperationSucceeded"))
            .is_some_and(|v| matches!(v, SimpleValue::Bool(true)));
        let text = match reply.body {
            Body::Value(AmqpValue(Value::String(text))) => text,
            other => {
                return Err(Error::internal(format!(
                    "management answered {other:?}, not a JSON string"
                )));
            }
        };
        if !succeeded {
            return Err(if text.contains("AMQ229067") {
                Error::not_found(format!("queue {queue} does not exist on the broker"))
            } else {
                Error::internal(format!(
                    "management refused to read {attribute} of {queue}: {text}"
                ))
            });
        }
        parse_count(&text).ok_or_else(|| {
            Error::internal(format!(
                "management answered {text:?} for {attribute}, not a count"
            ))
        })
    }

    /// Sends one read request and waits (up to REQUEST_TIMEOUT) for its reply.
    async fn exchange(
        links: &mut Links,
        queue: &str,
        attribute: &str,
    ) -> Result<AmqpMessage<Body<Value>>> {
        let request = AmqpMessage::builder()
            .properties(
                Properties::builder()
                    .message_id(MessageId::String(queue_core::new_message_id()))
                    .reply_to(links.reply_to.clone())
                    .build(),
            )
            .application_properties(
                ApplicationProperties::builder()
                    .insert("_AMQ_ResourceName", format!("queue.{queue}"))
                    .insert("_AMQ_Attribute", attribute)
                    .build(),
            )
            .value("[]".to_string())
            .build();
        let exchange =
            async {
                links.replies.link.set_credit(1).await.map_err(|e| {
                    Error::internal(format!("management: granting credit failed: {e}"))
                })?;
                links
                    .requests
                    .link
                    .send(request)
                    .await
                    .map_err(|e| Error::internal(format!("management request failed: {e}")))?;
                let reply = links
                    .replies
                    .link
                    .recv::<Body<Value>>()
                    .await
                    .map_err(|e| Error::internal(format!("management reply failed: {e}")))?;
                let _ = links.replies.link.accept(&reply).await;
                Ok::<_, Error>(reply.into_message())
            };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::internal("a management request timed out"))?
    }
}

/// A count as management writes it: `5`, or `[5]`.
fn parse_count(text: &str) -> Option<u64> {
    match serde_json::from_str::<serde_json::Value>(text).ok()? {
        serde_json::Value::Array(items) => items.first()?.as_u64(),
        value => value.as_u64(),
    }
}

async fn attach(connector: &Connector) -> Result<Links> {
    let requests = connector
        .attach_sender(
            connector.link_name("management", "requests"),
            Target::builder().address(MANAGEMENT_ADDRESS).build(),
        )
        .await?;
    let replies = connector
        .attach_receiver(
            connector.link_name("management", "replies"),
            Source::builder().dynamic(true).build(),
        )
        .await?;
    let reply_to = replies
        .link
        .source()
        .as_ref()
        .and_then(|s| s.address.clone())
        .ok_or_else(|| Error::internal("the broker gave the management reply queue no address"))?;
    Ok(Links {
        requests,
        replies,
        reply_to,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_count;

    #[test]
    fn counts_come_bare_or_in_a_list() {
        assert_eq!(parse_count("5"), Some(5));
        assert_eq!(parse_count("[7]"), Some(7));
        assert_eq!(parse_count("\"x\""), None);
        assert_eq!(parse_count("[]"), None);
    }
}
