//! `ProcessTrack`: one track's original through the pipeline into its renditions.
//!
//! 1. Claim the track (`queued → processing`, attempt + 1); a duplicate or late message finds
//!    it claimed, finished or gone, and ends at once.
//! 2. Fetch the original into a temp dir (removed in every case, by `TempDir`'s drop), at
//!    most the upload limit of it: a larger object fails the track `too_large`.
//! 3. Open it with the pipeline: the header guard first (absurd rates, channel counts or
//!    durations never reach a decoder), then the decoder, once for the whole job.
//! 4. Admit it against the owner's quota by the duration it declares, atomically per owner
//!    ([`PgTracks::admit`](waveline_shared::db::PgTracks::admit)), so concurrent workers
//!    cannot together pass the quota.
//! 5. Run the pass on a thread of its own at the pipeline's priority and within its thread
//!    budget ([`crate::pipeline_thread`]) while this task beats the heartbeat and records stage
//!    and progress, at most once a second; a heartbeat that finds the claim gone stops the
//!    job from writing anything further. Past the pipeline timeout the pass is cancelled and
//!    the track fails `timeout`.
//! 6. Admit it again by the duration actually decoded, then upload everything under
//!    `renditions/{track}/{revision}/…` (deterministic keys: a retry overwrites, never
//!    orphans).
//! 7. Commit `ready` and the rendition rows in one transaction fenced by the claim, then delete
//!    the objects of the revision that was live before. Artwork embedded in the file becomes
//!    the track's artwork (an image job) when the track has none.
//!
//! Bad media fails the track at once with the pipeline's code, and so does any error that
//! says retrying cannot help (`is_permanent()` of storage and database errors); transient
//! failures give the claim back and ask for a retry. What a track stores as its error is a
//! code and a message written for its owner: storage and database text, hosts and temp paths
//! go to the log only.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use tokio::time::Instant;
use waveline_pipeline::{Manifest, Opened, PipelineError, Progress, Stage};
use waveline_shared::bus::Event;
use waveline_shared::db::{Admission, Claim, Committed, Completion, DbError, Failure, RenditionRow};
use waveline_shared::documents::{NewNotification, NotificationKind, Subject};
use waveline_shared::domain::{ProcessingStage, TrackId};
use waveline_shared::storage::{ObjectKey, StorageError, byte_stream, rendition_key, revision_prefix};

use super::Outcome;
use crate::{Context, pipeline_thread};

/// The job.
#[derive(Debug, Clone, Copy)]
pub struct ProcessTrack {
    pub track_id: TrackId,
    /// The message's attempt number, for logs.
    pub attempt: u32,
}

/// Why the work stopped.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// Retrying cannot help: the track fails with `code` and `message` (safe to show).
    #[error("{message}")]
    Permanent { code: &'static str, message: String },
    /// Worth another attempt. `public` is safe to show; `detail` is for the log.
    #[error("{detail}")]
    Transient { public: String, detail: String },
    /// The claim was released or taken over while we worked: someone else owns the track.
    #[error("the claim was lost")]
    ClaimLost,
}

impl JobError {
    /// A transient failure of our own (temp files, threads): nothing about it is shown.
    fn internal(detail: impl std::fmt::Display) -> JobError {
        JobError::Transient {
            public: "an internal error interrupted the processing".into(),
            detail: detail.to_string(),
        }
    }
}

/// A storage failure while `doing` something, by whether retrying can help.
fn storage_error(doing: &str, err: StorageError) -> JobError {
    if err.is_permanent() {
        tracing::error!(error = %err, "storage refused {doing}");
        JobError::Permanent { code: "storage_failed", message: format!("the storage refused {doing} ({})", err.code()) }
    } else {
        JobError::Transient {
            public: format!("the storage was unavailable while {doing}"),
            detail: format!("{doing}: {err}"),
        }
    }
}

/// A database failure while `doing` something, by whether retrying can help.
fn db_error(doing: &str, err: DbError) -> JobError {
    if err.is_permanent() {
        tracing::error!(error = %err, "the database refused {doing}");
        JobError::Permanent { code: "internal", message: format!("an internal error stopped {doing}") }
    } else {
        JobError::Transient {
            public: format!("the database was unavailable while {doing}"),
            detail: format!("{doing}: {err}"),
        }
    }
}

/// A pipeline failure: the pipeline's code and its public message.
fn pipeline_error(err: PipelineError) -> JobError {
    if err.is_permanent() {
        JobError::Permanent { code: err.code(), message: err.public_message() }
    } else {
        JobError::Transient { public: err.public_message(), detail: format!("pipeline: {err}") }
    }
}

impl ProcessTrack {
    pub async fn run(&self, context: &Context) -> Outcome {
        let claim = match context.tracks.claim(self.track_id).await {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                tracing::info!("track is not queued (a duplicate, late or deleted job): nothing to do");
                return Outcome::Done;
            }
            Err(err) => {
                return Outcome::retry(format!("cannot claim the track: {err}"), "the database was unavailable");
            }
        };
        tracing::info!(attempt = claim.attempt, revision = claim.revision, "claimed");
        context.claims.hold(&claim);
        let result = self.work(context, &claim).await;
        context.claims.drop_claim(claim.track_id);
        match result {
            Ok(()) => Outcome::Done,
            Err(JobError::ClaimLost) => {
                tracing::warn!("the claim was taken over while processing; leaving the track to its new owner");
                Outcome::Done
            }
            Err(JobError::Permanent { code, message }) => {
                let message = scrub(&message, &context.temp_root);
                match context.tracks.fail_claimed(&claim, Failure { code, message: &message }).await {
                    Ok(held) => {
                        if held {
                            notify_owner(context, claim.track_id, NotificationKind::TrackFailed).await;
                        }
                        // Renditions this revision already stored will never be served. Only
                        // while the claim was ours: a worker that took it over writes the
                        // same revision's keys.
                        let prefix = revision_prefix(claim.track_id, claim.revision);
                        if held && let Err(err) = context.storage.delete_prefix(&prefix).await {
                            tracing::warn!(error = %err, "cannot remove the renditions of a failed run");
                        }
                        Outcome::Abort { code, message }
                    }
                    Err(err) => Outcome::retry(
                        format!("cannot record the failure {code}: {err}"),
                        "the database was unavailable",
                    ),
                }
            }
            Err(JobError::Transient { public, detail }) => {
                if let Err(err) = context.tracks.release(&claim).await {
                    // The heartbeat will go stale and the reconciler will release it.
                    tracing::warn!(error = %err, "cannot release the claim");
                }
                Outcome::retry(detail, scrub(&public, &context.temp_root))
            }
        }
    }

    async fn work(&self, context: &Context, claim: &Claim) -> Result<(), JobError> {
        let temp = tempfile::Builder::new()
            .prefix("waveline-job-")
            .tempdir_in(&context.temp_root)
            .map_err(|err| JobError::internal(format!("cannot make a temp dir: {err}")))?;
        let input = temp.path().join("original");
        let out = temp.path().join("out");
        let original = claim.original_key.as_deref().ok_or_else(|| JobError::Permanent {
            code: "original_missing",
            message: "the track has no original to process".into(),
        })?;
        self.fetch(context, original, &input).await?;
        // The pipeline's time limit runs from here: opening and the pass share it.
        let deadline = Instant::now() + context.pipeline_timeout;
        let opened = self.open(context, &input, deadline).await?;
        // The quota, first by what the file declares (before any decoding), then by what was
        // decoded (before anything is stored).
        self.admit(context, claim, original, opened.declared_duration_ms().unwrap_or(0)).await?;
        let manifest = self.run_pipeline(context, claim, opened, &out, deadline).await?;
        self.admit(context, claim, original, manifest.source.duration_ms).await?;
        beat(context, claim, ProcessingStage::Storing, 96).await?;
        let completion = self.upload(context, claim, &out, &manifest).await?;
        match context.tracks.complete(claim, &completion).await.map_err(|err| db_error("committing the track", err))? {
            Committed::Stale => Err(JobError::ClaimLost),
            Committed::Ready { previous_revision } => {
                tracing::info!(revision = claim.revision, renditions = completion.renditions.len(), "ready");
                // A public track's first ready revision goes to its owner's followers' feeds
                // (once: a reprocessed track has its activity already).
                let social = waveline_shared::db::social::PgSocial::new(context.tracks.pool().clone());
                let target = waveline_shared::db::social::Target::Track(claim.track_id);
                match social.announce(context.documents.as_ref(), target).await {
                    Ok(true) => tracing::info!("the track's activity is written"),
                    Ok(false) => {}
                    // The track is ready either way; the activity is written the next time
                    // the track becomes ready or public.
                    Err(err) => tracing::warn!(error = %err, "could not write the track's activity"),
                }
                notify_owner(context, claim.track_id, NotificationKind::TrackReady).await;
                if let Some(artwork) = &completion.artwork_key {
                    adopt_artwork(context, claim.track_id, artwork).await;
                }
                if let Some(old) = previous_revision {
                    let prefix = revision_prefix(claim.track_id, old);
                    match context.storage.delete_prefix(&prefix).await {
                        Ok(removed) => {
                            tracing::info!(revision = old, removed, "removed the previous revision")
                        }
                        // Not fatal for the track; an operator can sweep the prefix later.
                        Err(err) => {
                            tracing::warn!(revision = old, error = %err, "could not remove the previous revision")
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Admits `duration_ms` against the owner's quota; over it, fails the track with
    /// `quota_exceeded`, deleting its original.
    async fn admit(&self, context: &Context, claim: &Claim, original: &str, duration_ms: u64) -> Result<(), JobError> {
        let quota_ms = context.upload_quota.as_millis() as u64;
        let admission = context
            .tracks
            .admit(claim, i64::try_from(duration_ms).unwrap_or(i64::MAX), i64::try_from(quota_ms).unwrap_or(i64::MAX))
            .await
            .map_err(|err| db_error("checking the upload quota", err))?;
        let used_ms = match admission {
            Admission::Admitted => return Ok(()),
            Admission::Stale => return Err(JobError::ClaimLost),
            Admission::OverQuota { used_ms } => used_ms.max(0) as u64,
        };
        tracing::info!(used_ms, duration_ms, quota_ms, "over the upload quota");
        let key = ObjectKey::parse(original).map_err(|err| JobError::internal(format!("original key: {err}")))?;
        context.storage.delete(&key).await.map_err(|err| storage_error("deleting the original", err))?;
        Err(JobError::Permanent {
            code: "quota_exceeded",
            message: format!(
                "this track ({}) would take the account past its upload quota of {} (used: {}); its original was deleted",
                minutes(duration_ms),
                minutes(quota_ms),
                minutes(used_ms)
            ),
        })
    }

    async fn fetch(&self, context: &Context, key: &str, to: &Path) -> Result<(), JobError> {
        let key = ObjectKey::parse(key).map_err(|_| JobError::Permanent {
            code: "original_missing",
            message: "the original's storage key is invalid".into(),
        })?;
        let mut read = match context.storage.get(&key, None).await {
            Ok(read) => read,
            Err(StorageError::NotFound { .. }) => {
                return Err(JobError::Permanent {
                    code: "original_missing",
                    message: "the original is not in storage".into(),
                });
            }
            Err(err) => return Err(storage_error("fetching the original", err)),
        };
        let max = context.original_max_bytes;
        let too_large = |size: u64| JobError::Permanent {
            code: "too_large",
            message: format!("the original has {size} bytes or more, over the upload limit of {max} bytes"),
        };
        if read.meta.size > max {
            return Err(too_large(read.meta.size));
        }
        let writing = |err: std::io::Error| JobError::internal(format!("writing the original to disk: {err}"));
        let mut file = tokio::fs::File::create(to).await.map_err(writing)?;
        let mut received: u64 = 0;
        while let Some(chunk) = read.body.next().await {
            let chunk = chunk.map_err(|err| storage_error("fetching the original", err))?;
            // The size reported up front is the store's word; the bytes are counted too.
            received += chunk.len() as u64;
            if received > max {
                return Err(too_large(received));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await.map_err(writing)?;
        }
        // Tokio's `File` finishes writes in the background: without this flush the pipeline,
        // which reads the file with blocking I/O, could see it short or empty.
        tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(writing)?;
        Ok(())
    }

    /// The header guard, then the decoder, on a pipeline thread, within the time limit.
    async fn open(&self, context: &Context, input: &Path, deadline: Instant) -> Result<Opened, JobError> {
        let config = context.pipeline.clone();
        let input = input.to_path_buf();
        let opening = pipeline_thread::run("pipe-open", context.pipeline_priority, move || {
            waveline_pipeline::open(&input, &config)
        });
        match tokio::time::timeout_at(deadline, opening).await {
            Ok(Ok(opened)) => opened.map_err(pipeline_error),
            Ok(Err(failed)) => Err(JobError::internal(failed)),
            Err(_) => Err(timed_out(context)),
        }
    }

    async fn run_pipeline(
        &self,
        context: &Context,
        claim: &Claim,
        opened: Opened,
        out: &Path,
        deadline: Instant,
    ) -> Result<Manifest, JobError> {
        let (progress_tx, mut progress_rx) =
            tokio::sync::watch::channel(Progress { stage: Stage::Probing, fraction: 0.0 });
        let config = context.pipeline.clone();
        let out = out.to_path_buf();
        let cancel = Arc::new(AtomicBool::new(false));
        let budget = context.pipeline_budget.clone();
        let yielded = {
            let budget = budget.clone();
            move || {
                let ms = u64::try_from(budget.yielded().as_millis()).unwrap_or(u64::MAX);
                ::metrics::counter!("waveline_pipeline_yielded_milliseconds_total").absolute(ms);
            }
        };
        let pipeline = pipeline_thread::run("pipe-pass", context.pipeline_priority, {
            let cancel = cancel.clone();
            move || {
                opened.process(
                    &out,
                    &config,
                    &budget,
                    &|progress| {
                        let _ = progress_tx.send(progress);
                    },
                    &cancel,
                )
            }
        });
        tokio::pin!(pipeline);
        let mut ticker = tokio::time::interval(context.heartbeat_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let time_limit = tokio::time::sleep_until(deadline);
        tokio::pin!(time_limit);
        let (mut lost, mut timed_out_now) = (false, false);
        let result = loop {
            tokio::select! {
                result = &mut pipeline => break result,
                // Cancelled, the pass stops at its next block; the loop waits for that, so
                // nothing is still writing into the temp dir when it is removed.
                _ = &mut time_limit, if !timed_out_now => {
                    timed_out_now = true;
                    cancel.store(true, Ordering::Relaxed);
                }
                // Beats go on after a timeout until the pass has stopped: the claim stays
                // this worker's while its thread still runs.
                _ = ticker.tick(), if !lost => {
                    yielded();
                    let progress = *progress_rx.borrow_and_update();
                    let stage = match progress.stage {
                        Stage::Probing => ProcessingStage::Probing,
                        Stage::Encoding => ProcessingStage::Encoding,
                        Stage::Finishing => ProcessingStage::Analyzing,
                    };
                    // Keep 96–100 for storing and the commit.
                    let percent = (progress.fraction * 95.0).round() as i16;
                    if let Err(JobError::ClaimLost) = beat(context, claim, stage, percent).await {
                        lost = true;
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
        };
        yielded();
        if lost {
            return Err(JobError::ClaimLost);
        }
        match result {
            Ok(Ok(manifest)) => Ok(manifest),
            Ok(Err(PipelineError::Cancelled)) => Err(timed_out(context)),
            Ok(Err(err)) => Err(pipeline_error(err)),
            Err(failed) => Err(JobError::internal(failed)),
        }
    }

    /// Uploads what the manifest lists (and the manifest), returning the completion record.
    async fn upload(
        &self,
        context: &Context,
        claim: &Claim,
        out: &Path,
        manifest: &Manifest,
    ) -> Result<Completion, JobError> {
        // `relative` is the file's path in `out`; `stored` its key's, under the revision's prefix.
        let put = |relative: String, stored: String| {
            let storage = context.storage.clone();
            let path = out.join(&relative);
            async move {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|err| JobError::internal(format!("{}: {err}", path.display())))?;
                let key = rendition_key(claim.track_id, claim.revision, &stored)
                    .map_err(|err| storage_error("storing the renditions", err))?;
                let body = byte_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024));
                storage
                    .put(&key, waveline_media::content_type(&relative), body)
                    .await
                    .map_err(|err| storage_error("storing the renditions", err))?;
                Ok::<String, JobError>(key.to_string())
            }
        };
        let mut renditions = Vec::new();
        for rendition in &manifest.renditions {
            let (storage_key, storage_keys) = match rendition.kind {
                waveline_pipeline::manifest::RenditionKind::Progressive => {
                    let key = put(rendition.path.clone(), format!("{}/{}", rendition.preset, rendition.path)).await?;
                    (key.clone(), vec![key])
                }
                waveline_pipeline::manifest::RenditionKind::Hls => {
                    let mut keys = Vec::new();
                    for relative in files_under(out, &rendition.preset).map_err(JobError::internal)? {
                        keys.push(put(relative.clone(), relative).await?);
                    }
                    let master = rendition_key(claim.track_id, claim.revision, &rendition.path)
                        .map_err(|err| storage_error("storing the renditions", err))?;
                    (master.to_string(), keys)
                }
            };
            renditions.push(RenditionRow {
                preset: rendition.preset.clone(),
                kind: match rendition.kind {
                    waveline_pipeline::manifest::RenditionKind::Progressive => "progressive".into(),
                    waveline_pipeline::manifest::RenditionKind::Hls => "hls".into(),
                },
                storage_key,
                storage_keys,
                codec: rendition.codec.clone(),
                bitrate_kbps: rendition.bitrate_kbps as i32,
                sample_rate: rendition.sample_rate as i32,
                channels: rendition.channels as i16,
                duration_ms: rendition.duration_ms as i64,
                bytes: rendition.bytes as i64,
            });
        }
        let waveform = &manifest.waveform;
        let waveform_key = put(waveform.json.clone(), format!("waveform/{}", waveform.json)).await?;
        let waveform_dat_key = put(waveform.dat.clone(), format!("waveform/{}", waveform.dat)).await?;
        let waveform_summary_key = put(waveform.summary.clone(), format!("waveform/{}", waveform.summary)).await?;
        let artwork_key = match &manifest.tags.artwork {
            Some(artwork) => Some(put(artwork.clone(), format!("artwork/{artwork}")).await?),
            None => None,
        };
        put("manifest.json".into(), "manifest.json".into()).await?;
        let to_json = |value: serde_json::Result<serde_json::Value>| value.map_err(JobError::internal);
        Ok(Completion {
            source: to_json(serde_json::to_value(&manifest.source))?,
            loudness: to_json(serde_json::to_value(&manifest.loudness))?,
            tags: to_json(serde_json::to_value(&manifest.tags.tags))?,
            duration_ms: manifest.source.duration_ms as i64,
            waveform_key,
            waveform_dat_key,
            waveform_summary_key,
            artwork_key,
            renditions,
        })
    }
}

/// Makes the artwork embedded in the audio the track's artwork (its sizes made by an image
/// job, queued through the outbox), unless the track has artwork already. A failure leaves the
/// track without default artwork, which its owner can upload; it is logged, not retried.
async fn adopt_artwork(context: &Context, track: TrackId, artwork_key: &str) {
    let images = waveline_shared::db::images::PgImages::new(context.tracks.pool().clone());
    match images.adopt_embedded(track, artwork_key).await {
        Ok(true) => tracing::info!("the embedded artwork is queued as the track's artwork"),
        Ok(false) => {}
        Err(err) => tracing::warn!(error = %err, "could not queue the embedded artwork"),
    }
}

/// `1 h 02 min` and the like.
fn minutes(ms: u64) -> String {
    let minutes = ms.div_ceil(60_000);
    if minutes >= 60 { format!("{} h {:02} min", minutes / 60, minutes % 60) } else { format!("{minutes} min") }
}

/// The failure of a job that ran past the pipeline timeout.
fn timed_out(context: &Context) -> JobError {
    JobError::Permanent {
        code: "timeout",
        message: format!("processing took longer than the limit of {} s", context.pipeline_timeout.as_secs_f64()),
    }
}

/// `message` without the worker's temp paths, should any have slipped into it.
fn scrub(message: &str, temp_root: &Path) -> String {
    let root = temp_root.to_string_lossy();
    if root.len() > 1 && message.contains(root.as_ref()) {
        message.replace(root.as_ref(), "…")
    } else {
        message.to_owned()
    }
}

/// Records stage and progress; a claim found gone means someone else owns the track now.
async fn beat(context: &Context, claim: &Claim, stage: ProcessingStage, percent: i16) -> Result<(), JobError> {
    match context.tracks.heartbeat(claim, stage, percent).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(JobError::ClaimLost),
        // A missed beat is not fatal: the next one may get through before the heartbeat goes stale.
        Err(err) => {
            tracing::warn!(error = %err, "heartbeat failed");
            Ok(())
        }
    }
}

/// Every file under `out/dir`, as paths relative to `out`, sorted.
fn files_under(out: &Path, dir: &str) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut pending: Vec<PathBuf> = vec![out.join(dir)];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            } else if let Ok(relative) = entry.path().strip_prefix(out) {
                found.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Claims held by this worker's running jobs, so a shutdown past its grace period can give
/// them back at once instead of waiting for the heartbeat to go stale.
#[derive(Debug, Default)]
pub struct HeldClaims {
    inner: std::sync::Mutex<std::collections::HashMap<TrackId, Claim>>,
}

impl HeldClaims {
    fn hold(&self, claim: &Claim) {
        self.lock().insert(claim.track_id, claim.clone());
    }

    fn drop_claim(&self, track: TrackId) {
        self.lock().remove(&track);
    }

    /// The claim held on `track`, if any.
    pub fn get(&self, track: TrackId) -> Option<Claim> {
        self.lock().get(&track).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<TrackId, Claim>> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Tells a track's owner that it is ready or failed: a notification, delivered live to their
/// sockets on any API process. Failures are logged: the track's state is what counts.
async fn notify_owner(context: &Context, track: TrackId, kind: NotificationKind) {
    let owner = match context.tracks.owner_of(track).await {
        Ok(Some(owner)) => owner,
        Ok(None) => return,
        Err(err) => {
            tracing::warn!(error = %err, "cannot find the track's owner to notify");
            return;
        }
    };
    let new = NewNotification {
        user_id: owner,
        kind,
        actor: None,
        subject: Subject::Track { id: track },
        created_at: chrono::Utc::now(),
    };
    let notification = match context.documents.insert_notification(new).await {
        Ok(notification) => notification,
        Err(err) => {
            tracing::warn!(error = %err, "could not store the owner's notification");
            return;
        }
    };
    if let Err(err) = context.bus.publish(&Event::Notification { notification: notification.clone() }).await {
        tracing::warn!(error = %err, "could not publish the owner's notification; it is stored");
    }
    // An owner with no live socket gets a push (the relay publishes the job).
    let push = waveline_shared::push::Push::new(context.push.is_some());
    if !push.is_on() {
        return;
    }
    let pool = context.tracks.pool();
    match waveline_shared::db::realtime::PgRealtime::new(pool.clone()).online(owner).await {
        Ok(false) => {}
        Ok(true) => return,
        Err(err) => {
            tracing::warn!(error = %err, "cannot tell whether the owner is online; no push");
            return;
        }
    }
    match waveline_shared::push::for_notification(&notification, None, None) {
        Ok(message) => {
            if let Err(err) = push.enqueue(pool, owner, &message).await {
                tracing::warn!(error = %err, "could not queue the owner's push");
            }
        }
        Err(err) => tracing::warn!(error = %err, "the owner's push does not fit"),
    }
}
