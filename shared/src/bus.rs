//! The event bus: live events (a new message, a committed counter, a comment, a notification)
//! reach the sockets on every API process through it.
//!
//! It follows the `queue` setting, so a deployment has one broker, not two:
//!
//! - [`MemoryBus`] (`queue = "memory"`, the embedded mode): a broadcast channel inside the
//!   process, which holds the API, its sockets and the worker.
//! - [`AmqpBus`] (`queue = "amqp://…"`): a RabbitMQ fanout exchange, `{queue_name}.events`.
//!   Every subscriber (every API process) binds its own exclusive, auto-deleted queue to it,
//!   so each process receives every event once and the broker drops the queue when the
//!   process goes away. The queue is bounded (`x-max-length`, dropping the oldest, and a
//!   one-minute TTL): a process that stalls loses old live events instead of growing the
//!   broker's memory.
//!
//! Why a fanout exchange rather than PostgreSQL's LISTEN/NOTIFY (which the status cache
//! uses): a notification's payload is at most 8000 bytes, and a message body alone may be
//! 2000 characters (8000 bytes of UTF-8); every NOTIFY also takes a global lock at commit.
//! RabbitMQ is built for this fan-out and is already in every distributed deployment.
//!
//! Events are live signals, delivered at most once: what they carry is stored before it is
//! published (a message, a comment, a notification), so a client that was away, or whose
//! process crashed, fetches what it missed from the REST routes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{QueueBackend, Settings};
use crate::documents::{Comment, Message, Notification};
use crate::domain::{ConversationId, MessageId, TrackId, UserId};

/// The largest event a process accepts from the bus (a message is at most ~8 KiB).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Events a subscriber's broker queue holds before the oldest are dropped.
const QUEUE_MAX_LENGTH: i64 = 10_000;
/// How long an event waits in a subscriber's queue before it is stale.
const QUEUE_TTL: Duration = Duration::from_secs(60);

/// A live event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A message was stored: for every socket of its sender and its recipient.
    MessageNew { message: Message },
    /// `reader` read a conversation up to `up_to`: for both members' sockets.
    MessageRead { conversation_id: ConversationId, reader: UserId, other: UserId, up_to: MessageId },
    /// A track's committed counts: for the sockets watching it.
    Counters { track_id: TrackId, likes_count: i64, reposts_count: i64, comment_count: i64, playback_count: i64 },
    /// A comment was stored: for the sockets watching its track.
    CommentNew { comment: Comment },
    /// A notification was stored: for its account's sockets.
    Notification { notification: Notification },
}

/// Why the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the message broker is unavailable: {0}")]
    Unavailable(String),
}

/// Live events from every process.
pub type Events = BoxStream<'static, Event>;

/// The bus seam.
#[async_trait]
pub trait EventBus: Send + Sync + fmt::Debug {
    /// `memory` or `amqp`.
    fn backend(&self) -> &'static str;

    /// Sends an event to every subscriber, in every process (at most once).
    async fn publish(&self, event: &Event) -> Result<(), BusError>;

    /// Starts receiving every event published from now on, by any process. The stream ends
    /// when the connection is lost; subscribe again to carry on.
    async fn subscribe(&self) -> Result<Events, BusError>;
}

/// Opens the bus that goes with the configured queue.
pub async fn open(settings: &Settings) -> Result<Arc<dyn EventBus>, BusError> {
    Ok(match &settings.queue {
        QueueBackend::Memory => Arc::new(MemoryBus::new()),
        QueueBackend::Amqp { url } => Arc::new(AmqpBus::connect(url.clone(), &settings.queue_name).await?),
    })
}

/// Events inside one process.
#[derive(Debug, Clone)]
pub struct MemoryBus {
    sender: tokio::sync::broadcast::Sender<Event>,
}

impl Default for MemoryBus {
    fn default() -> MemoryBus {
        MemoryBus::new()
    }
}

impl MemoryBus {
    pub fn new() -> MemoryBus {
        // A subscriber that falls this far behind skips ahead (and logs it).
        MemoryBus { sender: tokio::sync::broadcast::channel(4096).0 }
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        // No subscriber is not an error: nobody is listening.
        let _ = self.sender.send(event.clone());
        Ok(())
    }

    async fn subscribe(&self) -> Result<Events, BusError> {
        let receiver = self.sender.subscribe();
        Ok(futures::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(event) => return Some((event, receiver)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                        tracing::warn!(skipped, "a bus subscriber fell behind and skipped events");
                        metrics::counter!("waveline_bus_events_dropped_total").increment(skipped);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }
}

/// Events through a RabbitMQ fanout exchange.
pub struct AmqpBus {
    url: SecretString,
    exchange: String,
    publisher: tokio::sync::Mutex<Option<(Connection, Channel)>>,
}

impl fmt::Debug for AmqpBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBus").field("exchange", &self.exchange).finish_non_exhaustive()
    }
}

fn unavailable(err: impl fmt::Display) -> BusError {
    BusError::Unavailable(err.to_string())
}

impl AmqpBus {
    /// Connects and declares the exchange `{base}.events`.
    pub async fn connect(url: SecretString, base: &str) -> Result<AmqpBus, BusError> {
        let bus = AmqpBus { url, exchange: format!("{base}.events"), publisher: tokio::sync::Mutex::new(None) };
        let link = bus.link().await?;
        *bus.publisher.lock().await = Some(link);
        Ok(bus)
    }

    /// The exchange's name.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    async fn link(&self) -> Result<(Connection, Channel), BusError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("waveline events pid {}", std::process::id())));
        let connection = Connection::connect(self.url.expose_secret(), properties).await.map_err(unavailable)?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        channel
            .exchange_declare(
                ShortString::from(self.exchange.as_str()),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        Ok((connection, channel))
    }
}

#[async_trait]
impl EventBus for AmqpBus {
    fn backend(&self) -> &'static str {
        "amqp"
    }

    async fn publish(&self, event: &Event) -> Result<(), BusError> {
        let payload = serde_json::to_vec(event).map_err(unavailable)?;
        let mut publisher = self.publisher.lock().await;
        // One reconnection per publish at most: a live event is not worth waiting long for.
        for _ in 0..2 {
            if publisher.as_ref().is_none_or(|(connection, _)| !connection.status().connected()) {
                *publisher = Some(self.link().await?);
            }
            let Some((_, channel)) = publisher.as_ref() else {
                continue;
            };
            let sent = channel
                .basic_publish(
                    ShortString::from(self.exchange.as_str()),
                    ShortString::from(""),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_content_type(ShortString::from("application/json")),
                )
                .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(err) => {
                    tracing::warn!(error = %err, "publishing an event failed; reconnecting");
                    *publisher = None;
                }
            }
        }
        Err(BusError::Unavailable("the event could not be published".into()))
    }

    async fn subscribe(&self) -> Result<Events, BusError> {
        let (connection, channel) = self.link().await?;
        let mut arguments = FieldTable::default();
        arguments.insert(ShortString::from("x-max-length"), AMQPValue::LongLongInt(QUEUE_MAX_LENGTH));
        arguments.insert(ShortString::from("x-overflow"), AMQPValue::LongString(LongString::from("drop-head")));
        arguments.insert(ShortString::from("x-message-ttl"), AMQPValue::LongLongInt(QUEUE_TTL.as_millis() as i64));
        let queue = channel
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
                arguments,
            )
            .await
            .map_err(unavailable)?;
        channel
            .queue_bind(
                queue.name().clone(),
                ShortString::from(self.exchange.as_str()),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                ShortString::from(""),
                BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        // The connection and channel live as long as the stream.
        let held = Arc::new((connection, channel));
        Ok(consumer
            .take_while(|delivery| futures::future::ready(delivery.is_ok()))
            .filter_map(move |delivery| {
                let _held = held.clone();
                async move {
                    let delivery = delivery.ok()?;
                    if delivery.data.len() > MAX_EVENT_BYTES {
                        tracing::warn!(bytes = delivery.data.len(), "an oversize event was dropped");
                        return None;
                    }
                    match serde_json::from_slice::<Event>(&delivery.data) {
                        Ok(event) => Some(event),
                        Err(err) => {
                            tracing::warn!(error = %err, "an event that is not one of ours was dropped");
                            None
                        }
                    }
                }
            })
            .boxed())
    }
}
