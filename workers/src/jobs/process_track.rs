//! `ProcessTrack`: one track's original through the pipeline into its renditions.
//!
//! 1. Claim the track (`queued → processing`, attempt + 1); a duplicate or late message finds
//!    it claimed, finished or gone, and ends at once.
//! 2. Fetch the original into a temp dir (removed in every case, by `TempDir`'s drop).
//! 3. Run the pipeline on a blocking thread while this task beats the heartbeat and records
//!    stage and progress, at most once a second; a heartbeat that finds the claim gone stops
//!    the job from writing anything further.
//! 4. Upload everything under `renditions/{track}/{revision}/…` (deterministic keys: a retry
//!    overwrites, never orphans).
//! 5. Commit `ready` and the rendition rows in one transaction fenced by the claim, then delete
//!    the objects of the revision that was live before.
//!
//! Bad media fails the track at once with the pipeline's code; storage, database and
//! internal failures give the claim back and ask for a retry.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use waveline_pipeline::{Manifest, Progress, Stage};
use waveline_shared::db::{Claim, Committed, Completion, Failure, RenditionRow};
use waveline_shared::domain::{ProcessingStage, TrackId};
use waveline_shared::storage::{ObjectKey, StorageError, byte_stream};

use super::Outcome;
use crate::Context;

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
    #[error("{message}")]
    Permanent { code: &'static str, message: String },
    #[error("{0}")]
    Transient(String),
    /// The claim was released or taken over while we worked: someone else owns the track.
    #[error("the claim was lost")]
    ClaimLost,
}

fn storage_error(context: &str, err: StorageError) -> JobError {
    JobError::Transient(format!("{context}: {err}"))
}

fn db_error(context: &str, err: waveline_shared::db::DbError) -> JobError {
    JobError::Transient(format!("{context}: {err}"))
}

impl ProcessTrack {
    pub async fn run(&self, context: &Context) -> Outcome {
        let claim = match context.tracks.claim(self.track_id).await {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                tracing::info!("track is not queued (a duplicate, late or deleted job): nothing to do");
                return Outcome::Done;
            }
            Err(err) => return Outcome::Retry(format!("cannot claim the track: {err}")),
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
                match context.tracks.fail_claimed(&claim, Failure { code, message: &message }).await {
                    Ok(_) => Outcome::Abort { code, message },
                    Err(err) => Outcome::Retry(format!("cannot record the failure {code}: {err}")),
                }
            }
            Err(JobError::Transient(reason)) => {
                if let Err(err) = context.tracks.release(&claim).await {
                    // The heartbeat will go stale and the reconciler will release it.
                    tracing::warn!(error = %err, "cannot release the claim");
                }
                Outcome::Retry(reason)
            }
        }
    }

    async fn work(&self, context: &Context, claim: &Claim) -> Result<(), JobError> {
        let temp = tempfile::Builder::new()
            .prefix("waveline-job-")
            .tempdir_in(&context.temp_root)
            .map_err(|err| JobError::Transient(format!("cannot make a temp dir: {err}")))?;
        let input = temp.path().join("original");
        let original = claim.original_key.as_deref().ok_or_else(|| JobError::Permanent {
            code: "original_missing",
            message: "the track has no original to process".into(),
        })?;
        self.fetch(context, original, &input).await?;
        // The quota, first by what the file declares (before any decoding), then by what was
        // decoded (before anything is stored).
        let declared = tokio::task::spawn_blocking({
            let input = input.clone();
            move || declared_duration_ms(&input)
        })
        .await
        .ok()
        .flatten();
        self.check_quota(context, original, declared).await?;

        let manifest = self.run_pipeline(context, claim, &input, &temp.path().join("out")).await?;
        self.check_quota(context, original, Some(manifest.source.duration_ms)).await?;
        beat(context, claim, ProcessingStage::Storing, 96).await?;
        let completion = self.upload(context, claim, &temp.path().join("out"), &manifest).await?;
        match context.tracks.complete(claim, &completion).await.map_err(|err| db_error("commit", err))? {
            Committed::Stale => Err(JobError::ClaimLost),
            Committed::Ready { previous_revision } => {
                tracing::info!(revision = claim.revision, renditions = completion.renditions.len(), "ready");
                if let Some(old) = previous_revision {
                    let prefix = format!("renditions/{}/{old}/", claim.track_id);
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

    /// Fails the track with `quota_exceeded`, deleting its original, when `duration_ms` added
    /// to what its owner already has would pass the quota.
    async fn check_quota(&self, context: &Context, original: &str, duration_ms: Option<u64>) -> Result<(), JobError> {
        let Some(duration_ms) = duration_ms else {
            return Ok(());
        };
        let owner = context
            .tracks
            .owner_of(self.track_id)
            .await
            .map_err(|err| db_error("owner", err))?
            .ok_or(JobError::ClaimLost)?;
        let (exempt, used_ms) =
            context.tracks.quota_usage(owner, Some(self.track_id)).await.map_err(|err| db_error("quota", err))?;
        let quota_ms = context.upload_quota.as_millis() as u64;
        let used_ms = used_ms.max(0) as u64;
        if exempt || used_ms + duration_ms <= quota_ms {
            return Ok(());
        }
        tracing::info!(used_ms, duration_ms, quota_ms, "over the upload quota");
        let key = ObjectKey::parse(original).map_err(|err| JobError::Transient(format!("original key: {err}")))?;
        context.storage.delete(&key).await.map_err(|err| storage_error("delete the original", err))?;
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
        let key = ObjectKey::parse(key).map_err(|err| JobError::Permanent {
            code: "original_missing",
            message: format!("the original's key is invalid: {err}"),
        })?;
        let mut read = match context.storage.get(&key, None).await {
            Ok(read) => read,
            Err(StorageError::NotFound { .. }) => {
                return Err(JobError::Permanent {
                    code: "original_missing",
                    message: format!("the original {key} is not in storage"),
                });
            }
            Err(err) => return Err(storage_error("fetching the original", err)),
        };
        let mut file = tokio::fs::File::create(to).await.map_err(|err| JobError::Transient(err.to_string()))?;
        while let Some(chunk) = read.body.next().await {
            let chunk = chunk.map_err(|err| storage_error("fetching the original", err))?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                .await
                .map_err(|err| JobError::Transient(format!("writing the original to disk: {err}")))?;
        }
        // Tokio's `File` finishes writes in the background: without this flush the pipeline,
        // which reads the file with blocking I/O, could see it short or empty.
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(|err| JobError::Transient(format!("writing the original to disk: {err}")))?;
        Ok(())
    }

    async fn run_pipeline(
        &self,
        context: &Context,
        claim: &Claim,
        input: &Path,
        out: &Path,
    ) -> Result<Manifest, JobError> {
        let (progress_tx, mut progress_rx) =
            tokio::sync::watch::channel(Progress { stage: Stage::Probing, fraction: 0.0 });
        let config = context.pipeline.clone();
        let (input, out) = (input.to_path_buf(), out.to_path_buf());
        let span = tracing::Span::current();
        let mut pipeline = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            waveline_pipeline::process(&input, &out, &config, &|progress| {
                let _ = progress_tx.send(progress);
            })
        });
        let mut ticker = tokio::time::interval(context.heartbeat_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lost = false;
        let result = loop {
            tokio::select! {
                result = &mut pipeline => break result,
                _ = ticker.tick(), if !lost => {
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
                    }
                }
            }
        };
        if lost {
            return Err(JobError::ClaimLost);
        }
        match result {
            Ok(Ok(manifest)) => Ok(manifest),
            Ok(Err(err)) if err.is_permanent() => {
                Err(JobError::Permanent { code: err.code(), message: err.to_string() })
            }
            Ok(Err(err)) => Err(JobError::Transient(format!("pipeline: {err}"))),
            Err(join) => Err(JobError::Transient(format!("the pipeline thread failed: {join}"))),
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
        let base = format!("renditions/{}/{}", claim.track_id, claim.revision);
        let put = |relative: String, key: String| {
            let storage = context.storage.clone();
            let path = out.join(&relative);
            async move {
                let file = tokio::fs::File::open(&path)
                    .await
                    .map_err(|err| JobError::Transient(format!("{}: {err}", path.display())))?;
                let key = ObjectKey::parse(key).map_err(|err| JobError::Transient(err.to_string()))?;
                let body = byte_stream(tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024));
                storage
                    .put(&key, content_type(&relative), body)
                    .await
                    .map_err(|err| storage_error("uploading", err))?;
                Ok::<String, JobError>(key.to_string())
            }
        };
        let mut renditions = Vec::new();
        for rendition in &manifest.renditions {
            let (storage_key, storage_keys) = match rendition.kind {
                waveline_pipeline::manifest::RenditionKind::Progressive => {
                    let key =
                        put(rendition.path.clone(), format!("{base}/{}/{}", rendition.preset, rendition.path)).await?;
                    (key.clone(), vec![key])
                }
                waveline_pipeline::manifest::RenditionKind::Hls => {
                    let mut keys = Vec::new();
                    for relative in
                        files_under(out, &rendition.preset).map_err(|err| JobError::Transient(err.to_string()))?
                    {
                        keys.push(put(relative.clone(), format!("{base}/{relative}")).await?);
                    }
                    (format!("{base}/{}", rendition.path), keys)
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
        let waveform_key = put(waveform.json.clone(), format!("{base}/waveform/{}", waveform.json)).await?;
        let waveform_dat_key = put(waveform.dat.clone(), format!("{base}/waveform/{}", waveform.dat)).await?;
        let waveform_summary_key =
            put(waveform.summary.clone(), format!("{base}/waveform/{}", waveform.summary)).await?;
        let artwork_key = match &manifest.tags.artwork {
            Some(artwork) => Some(put(artwork.clone(), format!("{base}/artwork/{artwork}")).await?),
            None => None,
        };
        put("manifest.json".into(), format!("{base}/manifest.json")).await?;
        let to_json =
            |value: serde_json::Result<serde_json::Value>| value.map_err(|err| JobError::Transient(err.to_string()));
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

/// `1 h 02 min` and the like.
fn minutes(ms: u64) -> String {
    let minutes = ms.div_ceil(60_000);
    if minutes >= 60 { format!("{} h {:02} min", minutes / 60, minutes % 60) } else { format!("{minutes} min") }
}

/// The duration the container declares, when it declares one (decoding nothing).
fn declared_duration_ms(input: &Path) -> Option<u64> {
    let container = waveline_pipeline::sniff::sniff_file(input).ok()?;
    let reader = waveline_pipeline::decode::open(input, container).ok()?;
    let facts = reader.facts();
    let frames = facts.declared_frames?;
    (facts.sample_rate > 0).then(|| frames * 1000 / u64::from(facts.sample_rate))
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

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("mp3") => "audio/mpeg",
        Some("opus" | "ogg") => "audio/ogg",
        Some("m3u8") => "application/vnd.apple.mpegurl",
        Some("mp4" | "m4s" | "m4a") => "audio/mp4",
        Some("json") => "application/json",
        Some("png") => "image/png",
        Some("jpg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
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
