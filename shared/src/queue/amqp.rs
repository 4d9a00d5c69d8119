//! `AmqpQueue`: jobs through RabbitMQ.
//!
//! Topology, for a [`Topology`] named `N` (`waveline.jobs` by default), all durable:
//!
//! | name | kind | role |
//! |---|---|---|
//! | exchange `N` (direct) → queue `N`, key `job` | work | jobs wait here for a worker |
//! | exchange `N.dead` (fanout) → queue `N.dead` | dead letters | jobs given up on, with `x-waveline-code` and `x-waveline-reason` headers; also the queue's broker-level dead-letter exchange |
//! | queue `N.retry.{ms}ms` | delay | a retried job waits here; its TTL dead-letters it back into exchange `N` |
//!
//! One delay queue per delay keeps expiry in order (RabbitMQ expires only the head of a
//! queue), and [`RetryPolicy`](super::RetryPolicy) delays are powers of two of the base, so
//! there are only a few; each expires ten minutes after its last use.
//!
//! Every publish waits for the broker's confirm, and is `mandatory`, so a job that no queue
//! would take is an error, not a silent loss. Consumers ack by hand after the work is
//! committed, with `basic.qos` prefetch. When the connection drops, publishing retries with
//! backoff for [`RECONNECT_FOR`] on a fresh connection, and consumers re-attach by themselves;
//! deliveries held on the dead channel are redelivered by the broker. A publish whose confirm
//! was lost with the connection is sent again, so a job can arrive twice: consumers are
//! idempotent by design.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::{
    DeadLetter, Delivery, JobConsumer, JobQueue, QueueError, QueueStats, ReplayReport, RetryPolicy, Settle, log_poison,
};
use crate::job::JobMessage;

/// How long publishing keeps trying to reach the broker before it reports the queue
/// unavailable.
pub const RECONNECT_FOR: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ROUTING_KEY: &str = "job";
const CODE_HEADER: &str = "x-waveline-code";
const REASON_HEADER: &str = "x-waveline-reason";
/// Delay queues outlive their longest wait by this much before the broker removes them.
const DELAY_QUEUE_LINGER: Duration = Duration::from_secs(600);

/// Names of the exchanges and queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The base name: the work exchange and queue; the others derive from it.
    pub name: String,
    /// When set, the work and dead-letter queues are removed by the broker after being
    /// unused this long (`x-expires`). For throw-away topologies such as tests'; production
    /// leaves it `None`.
    pub expires: Option<Duration>,
}

impl Default for Topology {
    fn default() -> Topology {
        Topology { name: "waveline.jobs".to_owned(), expires: None }
    }
}

impl Topology {
    fn dead(&self) -> String {
        format!("{}.dead", self.name)
    }

    fn delay_queue(&self, delay: Duration) -> String {
        format!("{}.retry.{}ms", self.name, delay.as_millis())
    }

    fn queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(expires) = self.expires {
            args.insert("x-expires".into(), AMQPValue::LongLongInt(expires.as_millis() as i64));
        }
        args
    }

    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        let durable_queue = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel.exchange_declare(short(&self.name), ExchangeKind::Direct, durable, FieldTable::default()).await?;
        channel.exchange_declare(short(&self.dead()), ExchangeKind::Fanout, durable, FieldTable::default()).await?;
        let mut work_args = self.queue_args();
        work_args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.dead().into()));
        channel.queue_declare(short(&self.name), durable_queue, work_args).await?;
        channel
            .queue_bind(
                short(&self.name),
                short(&self.name),
                ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel.queue_declare(short(&self.dead()), durable_queue, self.queue_args()).await?;
        channel
            .queue_bind(
                short(&self.dead()),
                short(&self.dead()),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    async fn declare_delay_queue(&self, channel: &Channel, delay: Duration) -> lapin::Result<String> {
        let name = self.delay_queue(delay);
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay.as_millis() as i64));
        args.insert("x-expires".into(), AMQPValue::LongLongInt((delay + DELAY_QUEUE_LINGER).as_millis() as i64));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(self.name.as_str().into()));
        args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(ROUTING_KEY.into()));
        let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
        channel.queue_declare(short(&name), options, args).await?;
        Ok(name)
    }
}

fn short(text: &str) -> ShortString {
    text.into()
}

fn unavailable(err: lapin::Error) -> QueueError {
    QueueError::Unavailable(err.to_string())
}

/// RabbitMQ-backed job queue. Clones share one connection.
#[derive(Clone)]
pub struct AmqpQueue {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpQueue").field("topology", &self.inner.topology).finish_non_exhaustive()
    }
}

struct Inner {
    url: SecretString,
    topology: Topology,
    policy: RetryPolicy,
    link: tokio::sync::Mutex<Option<Link>>,
}

/// A live connection and its confirm-mode publishing channel.
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    publisher: Channel,
}

impl Link {
    fn is_alive(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

/// Where a publish goes.
enum Target<'a> {
    Work,
    Dead { code: &'a str, reason: &'a str },
    Delay(Duration),
}

impl Inner {
    async fn link(&self) -> Result<Link, QueueError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = guard.as_ref().filter(|link| link.is_alive()) {
            return Ok(link.clone());
        }
        let link = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| QueueError::Unavailable(format!("no answer from the broker within {CONNECT_TIMEOUT:?}")))??;
        *guard = Some(link.clone());
        Ok(link)
    }

    async fn connect(&self) -> Result<Link, QueueError> {
        let properties = ConnectionProperties::default().with_connection_name(LongString::from(format!(
            "waveline {} pid {}",
            self.topology.name,
            std::process::id()
        )));
        let connection = Connection::connect(self.url.expose_secret(), properties).await.map_err(unavailable)?;
        let publisher = connection.create_channel().await.map_err(unavailable)?;
        self.topology.declare(&publisher).await.map_err(unavailable)?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable)?;
        tracing::debug!(topology = %self.topology.name, "connected to the message broker");
        Ok(Link { connection: Arc::new(connection), publisher })
    }

    /// Publishes with confirms, reconnecting and retrying for up to [`RECONNECT_FOR`].
    async fn publish(&self, target: Target<'_>, payload: &[u8]) -> Result<(), QueueError> {
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.publish_once(&target, payload).await {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() + pause < deadline => {
                    tracing::warn!(error = %err, retry_in = ?pause, "publish failed; reconnecting");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn publish_once(&self, target: &Target<'_>, payload: &[u8]) -> Result<(), QueueError> {
        let link = self.link().await?;
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_timestamp(Utc::now().timestamp().max(0) as u64);
        let (exchange, routing_key) = match target {
            Target::Work => (self.topology.name.clone(), ROUTING_KEY.to_owned()),
            Target::Dead { code, reason } => {
                let mut headers = FieldTable::default();
                headers.insert(CODE_HEADER.into(), AMQPValue::LongString((*code).into()));
                headers.insert(REASON_HEADER.into(), AMQPValue::LongString((*reason).into()));
                properties = properties.with_headers(headers);
                (self.topology.dead(), String::new())
            }
            Target::Delay(delay) => {
                let queue = self.topology.declare_delay_queue(&link.publisher, *delay).await.map_err(unavailable)?;
                (String::new(), queue)
            }
        };
        properties = properties.with_message_id(Uuid::now_v7().to_string().as_str().into());
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let confirm = link
            .publisher
            .basic_publish(short(&exchange), short(&routing_key), options, payload, properties)
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        if confirm.is_nack() {
            return Err(QueueError::Rejected("the broker nacked the message".into()));
        }
        if confirm.take_message().is_some() {
            return Err(QueueError::Rejected(format!(
                "no queue is bound to exchange {exchange:?} with key {routing_key:?}"
            )));
        }
        Ok(())
    }

    /// A short-lived channel for inspection.
    async fn side_channel(&self) -> Result<Channel, QueueError> {
        let link = self.link().await?;
        link.connection.create_channel().await.map_err(unavailable)
    }
}

impl AmqpQueue {
    /// Connects to the broker at `url` and declares the topology.
    pub async fn connect(url: SecretString, topology: Topology, policy: RetryPolicy) -> Result<AmqpQueue, QueueError> {
        let queue = AmqpQueue { inner: Arc::new(Inner { url, topology, policy, link: tokio::sync::Mutex::new(None) }) };
        queue.inner.link().await?;
        Ok(queue)
    }

    /// The exchange and queue names in use.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Deletes the work and dead-letter queues and exchanges, with their messages (test
    /// clean-up; delay queues expire by themselves).
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        let channel = self.inner.side_channel().await?;
        let topology = &self.inner.topology;
        for queue in [topology.name.clone(), topology.dead()] {
            channel.queue_delete(short(&queue), QueueDeleteOptions::default()).await.map_err(unavailable)?;
        }
        for exchange in [topology.name.clone(), topology.dead()] {
            channel.exchange_delete(short(&exchange), ExchangeDeleteOptions::default()).await.map_err(unavailable)?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }
}

fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

fn dead_letter_of(delivery: &lapin::message::Delivery) -> DeadLetter {
    let properties = &delivery.properties;
    let id =
        properties.message_id().as_ref().and_then(|id| Uuid::parse_str(id.as_str()).ok()).unwrap_or_else(Uuid::nil);
    let dead_at =
        properties.timestamp().and_then(|secs| DateTime::<Utc>::from_timestamp(secs as i64, 0)).unwrap_or_default();
    DeadLetter {
        id,
        code: header_text(properties, CODE_HEADER).unwrap_or_else(|| "rejected".to_owned()),
        reason: header_text(properties, REASON_HEADER)
            .unwrap_or_else(|| "rejected by a consumer without a recorded reason".to_owned()),
        job: JobMessage::decode(&delivery.data).ok(),
        payload: String::from_utf8_lossy(&delivery.data).into_owned(),
        dead_at,
    }
}

#[async_trait]
impl JobQueue for AmqpQueue {
    fn backend(&self) -> &'static str {
        "amqp"
    }

    async fn publish_payload(&self, payload: Vec<u8>) -> Result<(), QueueError> {
        self.inner.publish(Target::Work, &payload).await
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn JobConsumer>, QueueError> {
        if prefetch == 0 {
            return Err(QueueError::Config("prefetch must be at least 1".into()));
        }
        let mut consumer = AmqpConsumer { inner: self.inner.clone(), prefetch, current: None };
        consumer.attach().await?;
        Ok(Box::new(consumer))
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let channel = self.inner.side_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        let topology = &self.inner.topology;
        let work =
            channel.queue_declare(short(&topology.name), passive, FieldTable::default()).await.map_err(unavailable)?;
        let dead = channel
            .queue_declare(short(&topology.dead()), passive, FieldTable::default())
            .await
            .map_err(unavailable)?;
        let _ = channel.close(200, "done".into()).await;
        Ok(QueueStats {
            ready: u64::from(work.message_count()),
            dead: u64::from(dead.message_count()),
            consumers: u64::from(work.consumer_count()),
        })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        // Take without acking, then close the channel: the broker puts every message back
        // where it was.
        let channel = self.inner.side_channel().await?;
        let mut letters = Vec::new();
        while letters.len() < limit {
            let got = channel
                .basic_get(short(&self.inner.topology.dead()), BasicGetOptions { no_ack: false })
                .await
                .map_err(unavailable)?;
            let Some(message) = got else { break };
            letters.push(dead_letter_of(&message.delivery));
        }
        let _ = channel.close(200, "listed".into()).await;
        Ok(letters)
    }

    async fn replay_dead(&self, ids: Option<&[Uuid]>) -> Result<ReplayReport, QueueError> {
        let channel = self.inner.side_channel().await?;
        let mut report = ReplayReport::default();
        loop {
            let got = channel
                .basic_get(short(&self.inner.topology.dead()), BasicGetOptions { no_ack: false })
                .await
                .map_err(unavailable)?;
            let Some(message) = got else { break };
            let letter = dead_letter_of(&message.delivery);
            if ids.is_some_and(|ids| !ids.contains(&letter.id)) {
                continue;
            }
            let Some(mut job) = letter.job else {
                report.unreadable += 1;
                continue;
            };
            job.attempt = 1;
            self.inner.publish(Target::Work, &job.encode()).await?;
            message.delivery.acker.ack(BasicAckOptions::default()).await.map_err(unavailable)?;
            report.replayed += 1;
        }
        // Whatever was not replayed goes back into the dead-letter queue.
        let _ = channel.close(200, "replayed".into()).await;
        Ok(report)
    }
}

struct AmqpConsumer {
    inner: Arc<Inner>,
    prefetch: u16,
    current: Option<(Channel, lapin::Consumer)>,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer").field("prefetch", &self.prefetch).finish_non_exhaustive()
    }
}

impl AmqpConsumer {
    async fn attach(&mut self) -> Result<(), QueueError> {
        let link = self.inner.link().await?;
        let channel = link.connection.create_channel().await.map_err(unavailable)?;
        channel.basic_qos(self.prefetch, BasicQosOptions::default()).await.map_err(unavailable)?;
        let consumer = channel
            .basic_consume(
                short(&self.inner.topology.name),
                short(&format!("waveline-{}", Uuid::new_v4())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        self.current = Some((channel, consumer));
        Ok(())
    }

    /// Re-attaches after the connection dropped, for up to [`RECONNECT_FOR`].
    async fn reattach(&mut self) -> Result<(), QueueError> {
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.attach().await {
                Ok(()) => {
                    tracing::info!(topology = %self.inner.topology.name, "consumer re-attached to the message broker");
                    return Ok(());
                }
                Err(err) if Instant::now() + pause < deadline => {
                    tracing::warn!(error = %err, retry_in = ?pause, "consumer cannot reach the broker yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(err) => return Err(err),
            }
        }
    }
}

#[async_trait]
impl JobConsumer for AmqpConsumer {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        loop {
            if self.current.is_none() {
                self.reattach().await?;
            }
            let Some((_, consumer)) = self.current.as_mut() else {
                continue;
            };
            match consumer.next().await {
                Some(Ok(delivery)) => match JobMessage::decode(&delivery.data) {
                    Ok(message) => {
                        let settle = AmqpSettle { inner: self.inner.clone(), delivery: Some(delivery.acker.clone()) };
                        return Ok(Delivery::new(message, delivery.redelivered, self.inner.policy, Box::new(settle)));
                    }
                    Err(poison) => {
                        log_poison(&delivery.data, &poison);
                        let reason = poison.to_string();
                        self.inner
                            .publish(Target::Dead { code: poison.code(), reason: &reason }, &delivery.data)
                            .await?;
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                },
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "consumer lost its channel; re-attaching");
                    self.current = None;
                }
                None => {
                    tracing::warn!("consumer stream ended; re-attaching");
                    self.current = None;
                }
            }
        }
    }
}

impl Drop for AmqpConsumer {
    fn drop(&mut self) {
        // Closing the channel hands every unacked delivery back to the broker.
        if let Some((channel, _)) = self.current.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = channel.close(200, "consumer dropped".into()).await;
            });
        }
    }
}

struct AmqpSettle {
    inner: Arc<Inner>,
    delivery: Option<lapin::Acker>,
}

impl AmqpSettle {
    async fn ack(&mut self) -> Result<(), QueueError> {
        let acker = self.delivery.take().ok_or(QueueError::DeliveryLost)?;
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            _ => Err(QueueError::DeliveryLost),
        }
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn ack(&mut self) -> Result<(), QueueError> {
        AmqpSettle::ack(self).await
    }

    async fn requeue(&mut self) -> Result<(), QueueError> {
        let acker = self.delivery.take().ok_or(QueueError::DeliveryLost)?;
        match acker.nack(BasicNackOptions { requeue: true, multiple: false }).await {
            Ok(true) => Ok(()),
            _ => Err(QueueError::DeliveryLost),
        }
    }

    async fn retry_later(&mut self, payload: Vec<u8>, delay: Duration) -> Result<(), QueueError> {
        self.inner.publish(Target::Delay(delay), &payload).await?;
        AmqpSettle::ack(self).await
    }

    async fn dead_letter(&mut self, payload: Vec<u8>, code: &str, reason: &str) -> Result<(), QueueError> {
        self.inner.publish(Target::Dead { code, reason }, &payload).await?;
        AmqpSettle::ack(self).await
    }

    fn abandon(&mut self) {
        if let Some(acker) = self.delivery.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
            });
        }
    }
}
