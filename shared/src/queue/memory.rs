//! `MemoryQueue`: the in-process queue of the embedded mode.
//!
//! The same semantics as the AMQP backend minus durability: what is queued lives in this
//! process and is gone when it exits (PostgreSQL stays the record of truth, and the
//! reconciler re-enqueues what still needs work). Settling a delivery whose consumer was
//! dropped fails with [`QueueError::DeliveryLost`], as acking on a closed AMQP channel does.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{
    DeadLetter, Delivery, JobConsumer, JobQueue, QueueError, QueueStats, ReplayReport, RetryPolicy, Settle, log_poison,
};
use crate::job::JobMessage;

/// The in-process job queue. Clones share one queue.
#[derive(Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
    policy: RetryPolicy,
}

impl fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryQueue").field("policy", &self.policy).finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// Woken whenever a job becomes ready or a prefetch slot frees up.
    changed: Notify,
}

#[derive(Default)]
struct State {
    ready: VecDeque<Queued>,
    in_flight: HashMap<u64, InFlight>,
    dead: Vec<DeadLetter>,
    next_tag: u64,
    next_consumer: u64,
    consumers: u64,
}

struct Queued {
    payload: Vec<u8>,
    redelivered: bool,
}

struct InFlight {
    consumer: u64,
    payload: Vec<u8>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn push(&self, payload: Vec<u8>) {
        self.lock().ready.push_back(Queued { payload, redelivered: false });
        self.changed.notify_waiters();
    }

    /// Removes an in-flight delivery, or says it is no longer ours to settle.
    fn settle(&self, tag: u64) -> Result<Vec<u8>, QueueError> {
        let taken = self.lock().in_flight.remove(&tag).ok_or(QueueError::DeliveryLost);
        self.changed.notify_waiters();
        taken.map(|entry| entry.payload)
    }
}

impl MemoryQueue {
    /// An empty queue.
    pub fn new(policy: RetryPolicy) -> MemoryQueue {
        MemoryQueue { shared: Arc::new(Shared { state: Mutex::new(State::default()), changed: Notify::new() }), policy }
    }
}

#[async_trait]
impl JobQueue for MemoryQueue {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn publish_payload(&self, payload: Vec<u8>) -> Result<(), QueueError> {
        self.shared.push(payload);
        Ok(())
    }

    async fn consume(&self, prefetch: u16) -> Result<Box<dyn JobConsumer>, QueueError> {
        if prefetch == 0 {
            return Err(QueueError::Config("prefetch must be at least 1".into()));
        }
        let id = {
            let mut state = self.shared.lock();
            state.next_consumer += 1;
            state.consumers += 1;
            state.next_consumer
        };
        Ok(Box::new(MemoryConsumer { shared: self.shared.clone(), policy: self.policy, id, prefetch }))
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let state = self.shared.lock();
        Ok(QueueStats { ready: state.ready.len() as u64, dead: state.dead.len() as u64, consumers: state.consumers })
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, QueueError> {
        Ok(self.shared.lock().dead.iter().take(limit).cloned().collect())
    }

    async fn replay_dead(&self, ids: Option<&[Uuid]>) -> Result<ReplayReport, QueueError> {
        let mut report = ReplayReport::default();
        {
            let mut state = self.shared.lock();
            let dead = std::mem::take(&mut state.dead);
            for letter in dead {
                if ids.is_some_and(|ids| !ids.contains(&letter.id)) {
                    state.dead.push(letter);
                    continue;
                }
                match &letter.job {
                    Some(job) => {
                        let mut fresh = job.clone();
                        fresh.attempt = 1;
                        state.ready.push_back(Queued { payload: fresh.encode(), redelivered: false });
                        report.replayed += 1;
                    }
                    None => {
                        report.unreadable += 1;
                        state.dead.push(letter);
                    }
                }
            }
        }
        self.shared.changed.notify_waiters();
        Ok(report)
    }
}

struct MemoryConsumer {
    shared: Arc<Shared>,
    policy: RetryPolicy,
    id: u64,
    prefetch: u16,
}

impl fmt::Debug for MemoryConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryConsumer").field("id", &self.id).field("prefetch", &self.prefetch).finish()
    }
}

#[async_trait]
impl JobConsumer for MemoryConsumer {
    async fn next(&mut self) -> Result<Delivery, QueueError> {
        loop {
            // Register interest before looking, so a wake-up between the look and the wait
            // is not lost.
            let mut changed = pin!(self.shared.changed.notified());
            changed.as_mut().enable();
            {
                let mut state = self.shared.lock();
                let held = state.in_flight.values().filter(|entry| entry.consumer == self.id).count();
                if held < usize::from(self.prefetch) {
                    while let Some(queued) = state.ready.pop_front() {
                        match JobMessage::decode(&queued.payload) {
                            Ok(message) => {
                                state.next_tag += 1;
                                let tag = state.next_tag;
                                state.in_flight.insert(tag, InFlight { consumer: self.id, payload: queued.payload });
                                let settle = MemorySettle { shared: self.shared.clone(), tag };
                                return Ok(Delivery::new(message, queued.redelivered, self.policy, Box::new(settle)));
                            }
                            Err(poison) => {
                                log_poison(&queued.payload, &poison);
                                state.dead.push(DeadLetter {
                                    id: Uuid::now_v7(),
                                    code: poison.code().to_owned(),
                                    reason: poison.to_string(),
                                    job: None,
                                    payload: String::from_utf8_lossy(&queued.payload).into_owned(),
                                    dead_at: Utc::now(),
                                });
                            }
                        }
                    }
                }
            }
            changed.await;
        }
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        // A consumer that goes away gives back what it held, like a closed AMQP channel.
        let mut state = self.shared.lock();
        state.consumers = state.consumers.saturating_sub(1);
        let mut mine: Vec<u64> =
            state.in_flight.iter().filter(|(_, entry)| entry.consumer == self.id).map(|(tag, _)| *tag).collect();
        mine.sort_unstable();
        for tag in mine.into_iter().rev() {
            if let Some(entry) = state.in_flight.remove(&tag) {
                state.ready.push_front(Queued { payload: entry.payload, redelivered: true });
            }
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }
}

struct MemorySettle {
    shared: Arc<Shared>,
    tag: u64,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(&mut self) -> Result<(), QueueError> {
        self.shared.settle(self.tag).map(drop)
    }

    async fn requeue(&mut self) -> Result<(), QueueError> {
        let payload = self.shared.settle(self.tag)?;
        self.shared.lock().ready.push_front(Queued { payload, redelivered: true });
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn retry_later(&mut self, payload: Vec<u8>, delay: Duration) -> Result<(), QueueError> {
        self.shared.settle(self.tag)?;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared.push(payload);
        });
        Ok(())
    }

    async fn dead_letter(&mut self, payload: Vec<u8>, code: &str, reason: &str) -> Result<(), QueueError> {
        self.shared.settle(self.tag)?;
        self.shared.lock().dead.push(DeadLetter {
            id: Uuid::now_v7(),
            code: code.to_owned(),
            reason: reason.to_owned(),
            job: JobMessage::decode(&payload).ok(),
            payload: String::from_utf8_lossy(&payload).into_owned(),
            dead_at: Utc::now(),
        });
        Ok(())
    }

    fn abandon(&mut self) {
        if let Ok(payload) = self.shared.settle(self.tag) {
            self.shared.lock().ready.push_front(Queued { payload, redelivered: true });
            self.shared.changed.notify_waiters();
        }
    }
}
