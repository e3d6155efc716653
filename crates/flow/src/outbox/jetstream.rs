//! NATS JetStream as the outbox's bus (the `jetstream` feature, on by default).

use std::time::Duration;

use super::{BusError, EventBus, Message};

/// NATS JetStream as the bus: durable, acknowledged publishes, duplicates within
/// the stream's window dropped by message id.
#[derive(Clone, Debug)]
pub struct JetStreamBus {
    js: async_nats::jetstream::Context,
}

impl JetStreamBus {
    /// Connects to the NATS server at `url` and makes sure stream `stream` exists
    /// and takes `subjects` (a two-minute duplicate window).
    pub async fn connect(url: &str, stream: &str, subjects: Vec<String>) -> Result<Self, BusError> {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| BusError(e.to_string()))?;
        let js = async_nats::jetstream::new(client);
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: stream.to_string(),
            subjects,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| BusError(e.to_string()))?;
        Ok(JetStreamBus { js })
    }

    /// The JetStream context (for consumers).
    pub fn context(&self) -> &async_nats::jetstream::Context {
        &self.js
    }
}

impl JetStreamBus {
    /// Sends `message`; the future of the server's acknowledgement.
    async fn send(
        &self,
        message: &Message,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", message.id.as_str());
        self.js
            .publish_with_headers(message.subject.clone(), headers, message.payload.clone())
            .await
            .map_err(|e| BusError(e.to_string()))
    }
}

impl EventBus for JetStreamBus {
    async fn publish(&self, message: &Message) -> Result<(), BusError> {
        self.send(message)
            .await?
            .await
            .map_err(|e| BusError(e.to_string()))?;
        Ok(())
    }

    /// Every message sent before any acknowledgement is awaited (pipelined), then
    /// the acknowledgements read in order.
    async fn publish_all(&self, messages: &[Message]) -> (usize, Option<BusError>) {
        let mut acks = Vec::with_capacity(messages.len());
        let mut stopped = None;
        for m in messages {
            match self.send(m).await {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    stopped = Some(e);
                    break;
                }
            }
        }
        let sent = acks.len();
        for (i, ack) in acks.into_iter().enumerate() {
            if let Err(e) = ack.await {
                return (i, Some(BusError(e.to_string())));
            }
        }
        (sent, stopped)
    }
}
