//! `waveline-workers`: the worker loop between the queue, the pipeline and storage.
//!
//! A worker process runs [`run`]: it consumes jobs with prefetch equal to its concurrency and
//! runs each on its own task ([`jobs`]), and alongside them the outbox relay ([`relay`]) and
//! the reconciler ([`reconciler`], one at a time across the fleet through an advisory lock).
//! Workers are stateless: add processes on any host to scale. Besides tracks, workers send
//! push notifications ([`jobs::push`], through [`fcm`]) and make the sizes of artwork and
//! avatars ([`jobs::process_image`], through [`images`]). The pipeline of a job runs on
//! threads of its own, at the priority and within the thread budget of the [`Context`]
//! ([`pipeline_thread`]), so that beside the API (`waveline serve --workers N`) it takes only
//! what the API leaves.
//!
//! Shutdown: when `shutdown` is cancelled the worker stops taking jobs and lets those in hand
//! finish for up to the grace period; what is still running then gives its claim back and
//! its message back to the queue, so another worker picks it up at once.

pub mod fcm;
pub mod images;
pub mod jobs;
pub mod metrics;
pub mod pipeline_thread;
pub mod reconciler;
pub mod relay;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use waveline_pipeline::{PipelineConfig, ThreadBudget};
use waveline_shared::config::PipelinePriority;
use waveline_shared::db::{Failure, PgDevices, PgOutbox, PgTracks};
use waveline_shared::domain::TrackState;
use waveline_shared::queue::{Delivery, JobQueue, QueueError, RetryOutcome, RetryRequest};
use waveline_shared::storage::Storage;

pub use jobs::process_track::HeldClaims;

/// What every job needs.
#[derive(Debug)]
pub struct Context {
    pub tracks: PgTracks,
    pub outbox: PgOutbox,
    pub storage: Arc<dyn Storage>,
    /// Where a track's `track` activity is written when it becomes ready and public.
    pub documents: Arc<dyn waveline_shared::documents::Documents>,
    /// Where a track's owner hears live that it is ready or failed.
    pub bus: Arc<dyn waveline_shared::bus::EventBus>,
    pub pipeline: Arc<PipelineConfig>,
    /// Where jobs make their temp dirs.
    pub temp_root: PathBuf,
    /// How often a running job beats its heartbeat and records progress.
    pub heartbeat_every: Duration,
    /// Claims of the jobs running now.
    pub claims: HeldClaims,
    /// The total duration of audio an account may upload (its tier's quota).
    pub upload_quota: Duration,
    /// The largest original a job downloads (the upload limit): a larger object fails the
    /// track `too_large` before its bytes are read.
    pub original_max_bytes: u64,
    /// How long the pipeline may run on one job (opening the original and the pass); past
    /// it the track fails `timeout`.
    pub pipeline_timeout: Duration,
    /// The scheduling priority of the pipeline's threads ([`pipeline_thread`]).
    pub pipeline_priority: PipelinePriority,
    /// How many of the pipeline's threads compute at once, shared by every job.
    pub pipeline_budget: ThreadBudget,
    /// The accounts' push devices.
    pub devices: PgDevices,
    /// The FCM client (its access token shared by every push job of the process); `None`
    /// when pushes are off.
    pub push: Option<Arc<fcm::Fcm>>,
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs at once (and the queue prefetch).
    pub concurrency: u16,
    /// How long jobs in hand may run on after shutdown is asked for.
    pub grace: Duration,
    /// How often the reconciler runs.
    pub reconcile_every: Duration,
    /// Queued this long without being claimed: the message is presumed lost.
    pub queued_stale: Duration,
    /// A processing track whose heartbeat is older than this has lost its worker.
    pub heartbeat_stale: Duration,
    /// Attempts before a job is given up on (the queue's retry policy uses the same number).
    pub max_attempts: u32,
    /// How often the outbox relay looks for unsent messages.
    pub relay_every: Duration,
}

impl Default for WorkerOptions {
    fn default() -> WorkerOptions {
        WorkerOptions {
            concurrency: 1,
            grace: Duration::from_secs(30),
            reconcile_every: Duration::from_secs(30),
            queued_stale: Duration::from_secs(600),
            heartbeat_stale: Duration::from_secs(120),
            max_attempts: 5,
            relay_every: Duration::from_millis(500),
        }
    }
}

/// Runs a worker until `shutdown` is cancelled (and its jobs are finished or handed back).
pub async fn run(
    context: Arc<Context>,
    queue: Arc<dyn JobQueue>,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<(), QueueError> {
    let background = CancellationToken::new();
    let relay = tokio::spawn(relay::run(context.clone(), queue.clone(), options.relay_every, background.clone()));
    let reconciler = tokio::spawn(reconciler::run(context.clone(), options.clone(), background.clone()));
    let depth = tokio::spawn(metrics::watch_queue_depth(queue.clone(), background.clone()));

    let mut consumer = queue.consume(options.concurrency.max(1)).await?;
    let mut running: JoinSet<()> = JoinSet::new();
    let abandon = CancellationToken::new();
    tracing::info!(concurrency = options.concurrency, backend = queue.backend(), "worker started");
    let result = loop {
        // Reap finished jobs so the set does not grow.
        while running.try_join_next().is_some() {}
        if running.len() >= usize::from(options.concurrency.max(1)) {
            tokio::select! {
                _ = running.join_next() => continue,
                _ = shutdown.cancelled() => break Ok(()),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            delivery = consumer.next() => match delivery {
                Ok(delivery) => {
                    let context = context.clone();
                    let abandon = abandon.clone();
                    let max_attempts = options.max_attempts;
                    running.spawn(handle(context, delivery, abandon, max_attempts));
                }
                Err(err) => break Err(err),
            },
        }
    };
    tracing::info!(in_hand = running.len(), "worker stopping: no new jobs");
    let deadline = tokio::time::sleep(options.grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = running.join_next() => if next.is_none() { break },
            _ = &mut deadline => {
                tracing::warn!(in_hand = running.len(), "grace period over: handing the remaining jobs back");
                abandon.cancel();
                while running.join_next().await.is_some() {}
                break;
            }
        }
    }
    drop(consumer);
    background.cancel();
    let _ = tokio::join!(relay, reconciler, depth);
    result
}

/// Runs one delivery's job and settles the delivery by its outcome.
async fn handle(context: Arc<Context>, delivery: Delivery, abandon: CancellationToken, max_attempts: u32) {
    let job = delivery.message.job.clone();
    let attempt = delivery.message.attempt;
    let track_id = job.track_id();
    let span = tracing::info_span!(
        "job",
        kind = job.kind(),
        track_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
        attempt
    );
    if let Some(track_id) = track_id {
        span.record("track_id", tracing::field::display(track_id));
    }
    if let Some(user_id) = job.user_id() {
        span.record("user_id", tracing::field::display(user_id));
    }
    async move {
        let started = Instant::now();
        ::metrics::gauge!("waveline_jobs_in_flight").increment(1.0);
        let outcome = tokio::select! {
            outcome = jobs::run(&context, &job, attempt) => Some(outcome),
            _ = abandon.cancelled() => None,
        };
        ::metrics::gauge!("waveline_jobs_in_flight").decrement(1.0);
        let result = match outcome {
            None => {
                if let Some(claim) = track_id.and_then(|id| context.claims.get(id)) {
                    let _ = context.tracks.release(&claim).await;
                }
                let _ = delivery.requeue().await;
                "requeued"
            }
            Some(jobs::Outcome::Done) => {
                settle(delivery.ack().await);
                "done"
            }
            Some(jobs::Outcome::Abort { code, message }) => {
                tracing::warn!(code, %message, "failed for good");
                settle(delivery.ack().await);
                "failed"
            }
            Some(jobs::Outcome::Retry { reason, public, after, resume }) => {
                tracing::warn!(%reason, "transient failure");
                // The dead letter keeps the safe text (admins read it over HTTP); the detail
                // is in this log line.
                match delivery.retry_with(&public, RetryRequest { job: resume, at_least: after }).await {
                    Ok(RetryOutcome::Scheduled { attempt, delay }) => {
                        tracing::info!(next_attempt = attempt, ?delay, "retry scheduled");
                        "retried"
                    }
                    Ok(RetryOutcome::DeadLettered) => {
                        tracing::error!(%reason, "giving up");
                        let message = format!("gave up after {max_attempts} attempts; last error: {public}");
                        let failure = Failure { code: "retries_exhausted", message: &message };
                        if let waveline_shared::job::Job::ProcessImage { subject, subject_id, version } = &job {
                            jobs::process_image::give_up(&context, *subject, *subject_id, version, &message).await;
                        }
                        match track_id {
                            Some(track_id) => match context
                                .tracks
                                .transition(track_id, TrackState::Queued, TrackState::Failed, Some(failure))
                                .await
                            {
                                Ok(_) => tracing::error!(%message, "dead-lettered"),
                                Err(err) => tracing::error!(
                                    error = %err,
                                    "dead-lettered, but the track could not be marked failed"
                                ),
                            },
                            None => tracing::error!(%message, "dead-lettered"),
                        }
                        "dead_lettered"
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "could not schedule the retry; the job will be redelivered");
                        "redelivered"
                    }
                }
            }
        };
        ::metrics::counter!("waveline_jobs_total", "result" => result).increment(1);
        ::metrics::histogram!("waveline_job_duration_seconds").record(started.elapsed().as_secs_f64());
    }
    .instrument(span)
    .await;
}

fn settle(result: Result<(), QueueError>) {
    if let Err(err) = result {
        tracing::warn!(error = %err, "could not settle the delivery; it will be redelivered and found done");
    }
}
