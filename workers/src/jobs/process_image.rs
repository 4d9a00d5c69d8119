//! `ProcessImage`: one version of an image (track or playlist artwork, an avatar) into the
//! sizes Waveline serves.
//!
//! 1. Claim the version (`pending → processing`, attempt + 1); a job for a version since
//!    replaced, or already finished, ends at once (and removes that version's objects if
//!    nothing names them any more).
//! 2. Fetch the original, at most [`IMAGE_MAX_BYTES`] of it (`too_large` past that).
//! 3. Decode and make the sizes on a thread at the pipeline's priority, within the pipeline's
//!    time limit ([`crate::images`]).
//! 4. Store every size under the version's prefix (deterministic keys: a retry overwrites).
//! 5. Only then commit `ready`, which makes the URLs name this version, and delete the
//!    objects of the version served before.
//!
//! Bad images (`unsupported_image`, `invalid_image`, `too_large`) and a missing original fail
//! the version at once, keeping its original and whatever version was served before; storage
//! and database outages give the claim back and retry under the queue's rules, and the
//! version fails `retries_exhausted` when they run out.

use bytes::Bytes;
use futures::StreamExt;
use uuid::Uuid;
use waveline_shared::db::Failure;
use waveline_shared::db::images::{ImageClaim, ImageCommitted, PgImages};
use waveline_shared::images::{IMAGE_MAX_BYTES, ImageSize, ImageSubject, variant_key, version_prefix};
use waveline_shared::storage::{ObjectKey, StorageError, byte_stream};

use super::Outcome;
use crate::images::{DecodeLimits, Variant};
use crate::{Context, pipeline_thread};

/// The job.
#[derive(Debug, Clone, Copy)]
pub struct ProcessImage<'a> {
    pub subject: ImageSubject,
    pub subject_id: Uuid,
    pub version: &'a str,
}

/// Why the work stopped.
#[derive(Debug, thiserror::Error)]
enum JobError {
    /// Retrying cannot help: the version fails with `code` and `message` (safe to show).
    #[error("{message}")]
    Permanent { code: &'static str, message: String },
    /// Worth another attempt. `public` is safe to show; `detail` is for the log.
    #[error("{detail}")]
    Transient { public: String, detail: String },
}

fn storage_error(doing: &str, err: StorageError) -> JobError {
    if err.is_permanent() {
        tracing::error!(error = %err, "storage refused {doing}");
        JobError::Permanent { code: "internal", message: format!("an internal error stopped {doing}") }
    } else {
        JobError::Transient {
            public: format!("the storage was unavailable while {doing}"),
            detail: format!("{doing}: {err}"),
        }
    }
}

impl ProcessImage<'_> {
    pub async fn run(&self, context: &Context) -> Outcome {
        let images = PgImages::new(context.tracks.pool().clone());
        let claim = match images.claim(self.subject, self.subject_id, self.version).await {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                tracing::info!("the image version is not pending (a duplicate, late or replaced job): nothing to do");
                self.remove_if_orphan(context, &images).await;
                return Outcome::Done;
            }
            Err(err) => {
                return Outcome::retry(format!("cannot claim the image: {err}"), "the database was unavailable");
            }
        };
        tracing::info!(attempt = claim.attempt, "claimed");
        match self.work(context, &claim).await {
            Ok(()) => match images.complete(&claim).await {
                Ok(ImageCommitted::Ready { previous }) => {
                    tracing::info!("ready");
                    if let Some(previous) = previous {
                        let prefix = version_prefix(self.subject, self.subject_id, &previous);
                        if let Err(err) = context.storage.delete_prefix(&prefix).await {
                            // Not fatal: the URLs name the new version now.
                            tracing::warn!(error = %err, %prefix, "could not remove the previous version");
                        }
                    }
                    Outcome::Done
                }
                Ok(ImageCommitted::Stale) => {
                    tracing::info!("the image was replaced while processing");
                    self.remove_if_orphan(context, &images).await;
                    Outcome::Done
                }
                Err(err) => {
                    let _ = images.release(&claim).await;
                    Outcome::retry(format!("cannot commit the image: {err}"), "the database was unavailable")
                }
            },
            Err(JobError::Permanent { code, message }) => {
                match images
                    .fail(self.subject, self.subject_id, self.version, Failure { code, message: &message })
                    .await
                {
                    Ok(held) => {
                        // The sizes of a failed version are never served; its original stays
                        // until the next upload replaces it.
                        if held {
                            self.remove_sizes(context).await;
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
                if let Err(err) = images.release(&claim).await {
                    tracing::warn!(error = %err, "cannot release the image claim");
                }
                Outcome::retry(detail, public)
            }
        }
    }

    async fn work(&self, context: &Context, claim: &ImageClaim) -> Result<(), JobError> {
        let original = self.fetch(context, &claim.original_key).await?;
        let priority = context.pipeline_priority;
        let making = pipeline_thread::run("image", priority, move || {
            crate::images::variants(&original, &DecodeLimits::default())
        });
        let variants = match tokio::time::timeout(context.pipeline_timeout, making).await {
            Ok(Ok(Ok(variants))) => variants,
            Ok(Ok(Err(err))) if err.is_permanent() => {
                return Err(JobError::Permanent { code: err.code(), message: err.to_string() });
            }
            Ok(Ok(Err(err))) => {
                return Err(JobError::Transient {
                    public: "an internal error interrupted the processing".into(),
                    detail: err.to_string(),
                });
            }
            Ok(Err(failed)) => {
                return Err(JobError::Transient {
                    public: "an internal error interrupted the processing".into(),
                    detail: failed.to_string(),
                });
            }
            Err(_) => {
                return Err(JobError::Permanent {
                    code: "timeout",
                    message: format!(
                        "processing took longer than the limit of {} s",
                        context.pipeline_timeout.as_secs_f64()
                    ),
                });
            }
        };
        self.store(context, variants).await
    }

    /// The original, whole, refusing more than [`IMAGE_MAX_BYTES`].
    async fn fetch(&self, context: &Context, key: &str) -> Result<Vec<u8>, JobError> {
        let missing =
            || JobError::Permanent { code: "original_missing", message: "the original is not in storage".into() };
        let key = ObjectKey::parse(key).map_err(|_| missing())?;
        let mut read = match context.storage.get(&key, None).await {
            Ok(read) => read,
            Err(StorageError::NotFound { .. }) => return Err(missing()),
            Err(err) => return Err(storage_error("fetching the original", err)),
        };
        let too_large = || JobError::Permanent {
            code: "too_large",
            message: format!("the image is larger than the limit of {IMAGE_MAX_BYTES} bytes"),
        };
        if read.meta.size > IMAGE_MAX_BYTES {
            return Err(too_large());
        }
        let mut bytes = Vec::with_capacity(read.meta.size as usize);
        while let Some(chunk) = read.body.next().await {
            let chunk = chunk.map_err(|err| storage_error("fetching the original", err))?;
            if (bytes.len() + chunk.len()) as u64 > IMAGE_MAX_BYTES {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn store(&self, context: &Context, variants: Vec<Variant>) -> Result<(), JobError> {
        for variant in variants {
            let key = variant_key(self.subject, self.subject_id, self.version, variant.size)
                .map_err(|err| storage_error("storing the sizes", err))?;
            let body = byte_stream(futures::stream::once(async move { Ok(Bytes::from(variant.jpeg)) }));
            context
                .storage
                .put(&key, "image/jpeg", body)
                .await
                .map_err(|err| storage_error("storing the sizes", err))?;
        }
        Ok(())
    }

    /// Removes the sizes of this version (never its original).
    async fn remove_sizes(&self, context: &Context) {
        for size in ImageSize::ALL {
            if let Ok(key) = variant_key(self.subject, self.subject_id, self.version, size)
                && let Err(err) = context.storage.delete(&key).await
            {
                tracing::warn!(error = %err, %key, "could not remove a size of a failed image");
            }
        }
    }

    /// Removes this version's objects when nothing names it any more (replaced before it was
    /// served, or its subject deleted).
    async fn remove_if_orphan(&self, context: &Context, images: &PgImages) {
        match images.is_live(self.subject, self.subject_id, self.version).await {
            Ok(true) => {}
            Ok(false) => {
                let prefix = version_prefix(self.subject, self.subject_id, self.version);
                if let Err(err) = context.storage.delete_prefix(&prefix).await {
                    tracing::warn!(error = %err, %prefix, "could not remove a replaced image version");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot tell whether the image version is still wanted"),
        }
    }
}

/// Marks an image version failed once its job has used every attempt.
pub async fn give_up(context: &Context, subject: ImageSubject, subject_id: Uuid, version: &str, message: &str) {
    let images = PgImages::new(context.tracks.pool().clone());
    let failure = Failure { code: "retries_exhausted", message };
    if let Err(err) = images.fail(subject, subject_id, version, failure).await {
        tracing::error!(error = %err, "dead-lettered, but the image could not be marked failed");
    }
}
