//! The `JobQueue` seam: how jobs reach workers.
//!
//! Two backends implement [`JobQueue`]: [`AmqpQueue`] (RabbitMQ, durable) and [`MemoryQueue`]
//! (in-process, for the embedded mode). Both pass the same contract suite
//! (`shared/tests/queue_contract.rs`), and both give these semantics:
//!
//! - **At-least-once.** A delivery is settled exactly once, by [`Delivery::ack`],
//!   [`Delivery::requeue`], [`Delivery::retry`] or [`Delivery::dead_letter`]. One that is
//!   dropped unsettled, or whose consumer goes away (a crashed process, a closed channel),
//!   is delivered again, marked `redelivered`. Consumers must therefore be idempotent; the
//!   track state's compare-and-set is what makes ours so.
//! - **Prefetch.** A consumer holds at most `prefetch` unsettled deliveries; `next` waits
//!   while it is at that limit.
//! - **Retries.** [`Delivery::retry`] re-enqueues the job with `attempt + 1` after an
//!   exponential backoff ([`RetryPolicy`]); once `attempt` reaches the policy's maximum it
//!   dead-letters the job instead. [`Delivery::retry_with`] may also put a narrower job in its
//!   place (the part still to do) and wait at least as long as a failing service asked for.
//! - **Dead letters** keep the payload, a code and a reason. Payloads this build cannot read
//!   (not JSON, an unknown schema version or job kind) are dead-lettered by the consumer
//!   itself, logged, and never handed to the caller, so one bad message cannot crash-loop a
//!   worker. Operators list and replay dead letters.
//! - **No ordering.** Retries and redeliveries overtake one another; nothing may rely on
//!   the order of delivery.

mod amqp;
mod memory;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

pub use amqp::{AmqpQueue, Topology};
pub use memory::MemoryQueue;

use crate::config::{QueueBackend, Settings};
use crate::job::{Job, JobMessage, PoisonMessage};

/// How failed jobs are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; the last failure dead-letters the job.
    pub max_attempts: u32,
    /// Delay before the first retry; each further retry doubles it.
    pub base_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// The policy configured in `settings`.
    pub fn from_settings(settings: &Settings) -> RetryPolicy {
        RetryPolicy {
            max_attempts: settings.job_max_attempts,
            base_delay: settings.job_retry_base,
            max_delay: settings.job_retry_max,
        }
    }

    /// The wait before trying again after attempt `attempt` failed: `base · 2^(attempt-1)`,
    /// at most `max_delay`. Delays are powers of two of the base, so the AMQP backend needs
    /// only a handful of delay queues.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.base_delay.saturating_mul(1 << doublings).min(self.max_delay)
    }

    /// The wait after attempt `attempt` failed when the failing service asked for at least
    /// `at_least` (an HTTP `Retry-After`): the backoff, or the smallest power of two of the
    /// base that is not shorter than `at_least`, whichever is longer. The service's word
    /// outranks `max_delay`; a wait asked past [`RetryPolicy::LONGEST_REQUESTED`] counts as that
    /// long. Staying on powers of two of the base keeps the AMQP backend's delay queues few.
    pub fn delay_at_least(&self, attempt: u32, at_least: Duration) -> Duration {
        let backoff = self.delay_after(attempt);
        let wanted = at_least.min(Self::LONGEST_REQUESTED);
        if wanted <= backoff {
            return backoff;
        }
        let mut delay = self.base_delay.max(Duration::from_millis(1));
        while delay < wanted {
            delay = delay.saturating_mul(2);
        }
        delay
    }

    /// The longest wait a service's request can impose on a retry.
    pub const LONGEST_REQUESTED: Duration = Duration::from_secs(3600);
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy { max_attempts: 5, base_delay: Duration::from_secs(2), max_delay: Duration::from_secs(300) }
    }
}

/// Counts an operator can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Jobs waiting for a worker.
    pub ready: u64,
    /// Dead letters waiting for an operator.
    pub dead: u64,
    /// Consumers attached to the job queue.
    pub consumers: u64,
}

/// A job that will not be retried again, kept for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Identifies this dead letter for [`JobQueue::replay_dead`].
    pub id: Uuid,
    /// Stable code: `retries_exhausted`, a [`PoisonMessage`] code, or the caller's.
    pub code: String,
    /// Why, in words.
    pub reason: String,
    /// The job, when the payload could be read.
    pub job: Option<JobMessage>,
    /// The payload as text (lossy for binary payloads).
    pub payload: String,
    pub dead_at: DateTime<Utc>,
}

/// What [`JobQueue::replay_dead`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReplayReport {
    /// Dead letters re-enqueued as first attempts.
    pub replayed: u64,
    /// Dead letters left in place because their payload cannot be read by this build.
    pub unreadable: u64,
}

/// How a retry differs from a plain one ([`Delivery::retry_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryRequest {
    /// The job to try next in place of the same one: a job that did part of its work carries
    /// on with the rest. Its id, `enqueued_at` and attempt count stay the delivery's.
    pub job: Option<Job>,
    /// Wait at least this long before the next attempt (see [`RetryPolicy::delay_at_least`]).
    pub at_least: Option<Duration>,
}

/// What [`Delivery::retry`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The job comes back as `attempt` after `delay`.
    Scheduled { attempt: u32, delay: Duration },
    /// The job had no attempts left and is now a dead letter.
    DeadLettered,
}

/// The queue seam.
#[async_trait]
pub trait JobQueue: Send + Sync + fmt::Debug {
    /// Which backend this is (`amqp`, `memory`), for logs and health checks.
    fn backend(&self) -> &'static str;

    /// Enqueues a job. Returns once the broker has taken responsibility for it (publisher
    /// confirm): after a successful return the job survives a broker restart.
    async fn publish(&self, message: &JobMessage) -> Result<(), QueueError> {
        self.publish_payload(message.encode()).await
    }

    /// Enqueues a payload as it is, unchecked. Tooling that moves messages between queues
    /// uses it; a payload that is not a valid job is dead-lettered when consumed.
    async fn publish_payload(&self, payload: Vec<u8>) -> Result<(), QueueError>;

    /// Attaches a consumer that holds at most `prefetch` unsettled deliveries.
    async fn consume(&self, prefetch: u16) -> Result<Box<dyn JobConsumer>, QueueError>;

    /// Queue depth, dead letters and consumers.
    async fn stats(&self) -> Result<QueueStats, QueueError>;

    /// Up to `limit` dead letters, oldest first, without removing them.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError>;

    /// Re-enqueues the dead letters with these ids (all of them for `None`) as first
    /// attempts, and removes them from the dead letters.
    async fn replay_dead(&self, ids: Option<&[Uuid]>) -> Result<ReplayReport, QueueError>;
}

/// A stream of deliveries.
#[async_trait]
pub trait JobConsumer: Send + fmt::Debug {
    /// The next job, waiting as long as it takes. The AMQP backend reconnects on its own
    /// when the broker goes away, so an error here is one that reconnecting did not cure.
    async fn next(&mut self) -> Result<Delivery, QueueError>;
}

/// How one backend settles one delivery.
#[async_trait]
pub(crate) trait Settle: Send + Sync {
    async fn ack(&mut self) -> Result<(), QueueError>;
    async fn requeue(&mut self) -> Result<(), QueueError>;
    /// Makes `payload` deliverable again after `delay`, then acks this delivery.
    async fn retry_later(&mut self, payload: Vec<u8>, delay: Duration) -> Result<(), QueueError>;
    /// Stores `payload` as a dead letter, then acks this delivery.
    async fn dead_letter(&mut self, payload: Vec<u8>, code: &str, reason: &str) -> Result<(), QueueError>;
    /// The delivery was dropped unsettled: give it back without waiting.
    fn abandon(&mut self);
}

/// One job handed to a consumer, to be settled once.
pub struct Delivery {
    /// The job.
    pub message: JobMessage,
    /// Whether an earlier delivery of this message went unsettled (its consumer died).
    pub redelivered: bool,
    policy: RetryPolicy,
    settle: Option<Box<dyn Settle>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("message", &self.message)
            .field("redelivered", &self.redelivered)
            .field("settled", &self.settle.is_none())
            .finish()
    }
}

impl Delivery {
    pub(crate) fn new(
        message: JobMessage,
        redelivered: bool,
        policy: RetryPolicy,
        settle: Box<dyn Settle>,
    ) -> Delivery {
        Delivery { message, redelivered, policy, settle: Some(settle) }
    }

    fn take(&mut self) -> Box<dyn Settle> {
        // Every settling method consumes `self`, so the handle is always still there.
        self.settle.take().unwrap_or_else(|| Box::new(Settled))
    }

    /// The job is done: remove it for good.
    pub async fn ack(mut self) -> Result<(), QueueError> {
        let mut settle = self.take();
        let result = settle.ack().await;
        give_back_on_error(settle, result)
    }

    /// Give the job back for immediate redelivery, attempt unchanged (a worker shutting
    /// down hands back what it cannot finish).
    pub async fn requeue(mut self) -> Result<(), QueueError> {
        let mut settle = self.take();
        let result = settle.requeue().await;
        give_back_on_error(settle, result)
    }

    /// The job failed for a reason that may pass: try again later, or dead-letter it with
    /// code `retries_exhausted` when this was the last attempt.
    pub async fn retry(self, reason: &str) -> Result<RetryOutcome, QueueError> {
        self.retry_with(reason, RetryRequest::default()).await
    }

    /// As [`Delivery::retry`], with the next attempt's job and its earliest time as `request`
    /// asks. The dead letter of a last attempt keeps the narrower job too, so a replay does
    /// only what is left.
    pub async fn retry_with(mut self, reason: &str, request: RetryRequest) -> Result<RetryOutcome, QueueError> {
        let mut settle = self.take();
        let attempt = self.message.attempt;
        let mut next = self.message.clone();
        if let Some(job) = request.job {
            next.job = job;
        }
        if attempt >= self.policy.max_attempts {
            let reason = format!("retries exhausted after {attempt} attempts; last error: {reason}");
            let result = settle.dead_letter(next.encode(), "retries_exhausted", &reason).await;
            return give_back_on_error(settle, result).map(|()| RetryOutcome::DeadLettered);
        }
        let delay = match request.at_least {
            Some(at_least) => self.policy.delay_at_least(attempt, at_least),
            None => self.policy.delay_after(attempt),
        };
        next.attempt = attempt + 1;
        let result = settle.retry_later(next.encode(), delay).await;
        give_back_on_error(settle, result).map(|()| RetryOutcome::Scheduled { attempt: attempt + 1, delay })
    }

    /// The job can never succeed: keep it as a dead letter with this code and reason.
    pub async fn dead_letter(mut self, code: &str, reason: &str) -> Result<(), QueueError> {
        let payload = self.message.encode();
        let mut settle = self.take();
        let result = settle.dead_letter(payload, code, reason).await;
        give_back_on_error(settle, result)
    }
}

/// A settle that failed half-way (say the retry could not be published) must not strand the
/// job: hand it back for redelivery, as a dropped delivery would be.
fn give_back_on_error(mut settle: Box<dyn Settle>, result: Result<(), QueueError>) -> Result<(), QueueError> {
    if result.is_err() {
        settle.abandon();
    }
    result
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(mut settle) = self.settle.take() {
            settle.abandon();
        }
    }
}

/// The handle of a delivery already settled; never reached in practice.
struct Settled;

#[async_trait]
impl Settle for Settled {
    async fn ack(&mut self) -> Result<(), QueueError> {
        Err(QueueError::DeliveryLost)
    }
    async fn requeue(&mut self) -> Result<(), QueueError> {
        Err(QueueError::DeliveryLost)
    }
    async fn retry_later(&mut self, _: Vec<u8>, _: Duration) -> Result<(), QueueError> {
        Err(QueueError::DeliveryLost)
    }
    async fn dead_letter(&mut self, _: Vec<u8>, _: &str, _: &str) -> Result<(), QueueError> {
        Err(QueueError::DeliveryLost)
    }
    fn abandon(&mut self) {}
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the message broker is unreachable: {0}")]
    Unavailable(String),
    #[error("the message broker refused the message: {0}")]
    Rejected(String),
    #[error(
        "the delivery can no longer be settled: its consumer or channel has gone, and the job will be delivered again"
    )]
    DeliveryLost,
    #[error("queue configuration: {0}")]
    Config(String),
}

impl QueueError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            QueueError::Unavailable(_) => "queue_unavailable",
            QueueError::Rejected(_) => "queue_rejected",
            QueueError::DeliveryLost => "delivery_lost",
            QueueError::Config(_) => "queue_config",
        }
    }

    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, QueueError::Config(_) | QueueError::DeliveryLost)
    }
}

/// Logs why a payload is being dead-lettered by a consumer.
pub(crate) fn log_poison(payload: &[u8], poison: &PoisonMessage) {
    let preview: String = String::from_utf8_lossy(payload).chars().take(200).collect();
    tracing::warn!(code = poison.code(), reason = %poison, payload = %preview, "dead-lettering a job message this build cannot read");
}

/// Builds the configured backend.
pub async fn open(settings: &Settings) -> Result<Arc<dyn JobQueue>, QueueError> {
    let policy = RetryPolicy::from_settings(settings);
    Ok(match &settings.queue {
        QueueBackend::Memory => Arc::new(MemoryQueue::new(policy)),
        QueueBackend::Amqp { url } => {
            let topology = Topology { name: settings.queue_name.clone(), expires: None };
            Arc::new(AmqpQueue::connect(url.clone(), topology, policy).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy =
            RetryPolicy { max_attempts: 10, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(3) };
        let delays: Vec<u128> = (1..=6).map(|attempt| policy.delay_after(attempt).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 3000, 3000, 3000]);
        assert_eq!(policy.delay_after(u32::MAX), Duration::from_secs(3));
    }

    #[test]
    fn a_requested_wait_rounds_up_to_a_power_of_two_of_the_base() {
        let policy =
            RetryPolicy { max_attempts: 10, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(3) };
        let at_least = |attempt, secs: f64| policy.delay_at_least(attempt, Duration::from_secs_f64(secs)).as_millis();
        // Shorter than the backoff: the backoff.
        assert_eq!(at_least(1, 0.2), 500);
        assert_eq!(at_least(3, 1.0), 2000);
        // Longer: the next power of two of the base, past `max_delay` if asked.
        assert_eq!(at_least(1, 1.0), 1000);
        assert_eq!(at_least(1, 1.2), 2000);
        assert_eq!(at_least(1, 30.0), 32_000);
        // Never past the ceiling's power of two, whatever is asked.
        assert_eq!(at_least(1, 1e9), 4_096_000);
    }
}
