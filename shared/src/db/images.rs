//! Images (track and playlist artwork, account avatars) in PostgreSQL: one row per subject,
//! its latest upload's state and the version served (see [`crate::images`] for versions and
//! keys).
//!
//! Every write is fenced by the version: a job for a version since replaced claims nothing,
//! commits nothing and fails nothing. The served version (`ready_version`) changes only in
//! [`PgImages::complete`], after every size is stored, so nothing half-written is ever named
//! by a URL. Queued work is written to the outbox in the transaction that made it necessary.

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

use super::{DbError, Failure};
use crate::domain::TrackId;
use crate::images::ImageSubject;
use crate::job::{Job, JobMessage};

/// Where an image's latest upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// Stored; its job is queued.
    Pending,
    /// A worker is making its sizes.
    Processing,
    /// Its sizes are served.
    Ready,
    /// It could not be used (`error_code` says why); an older ready version is still served.
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Pending => "pending",
            ImageState::Processing => "processing",
            ImageState::Ready => "ready",
            ImageState::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Result<ImageState, DbError> {
        match text {
            "pending" => Ok(ImageState::Pending),
            "processing" => Ok(ImageState::Processing),
            "ready" => Ok(ImageState::Ready),
            "failed" => Ok(ImageState::Failed),
            other => Err(DbError::Invalid(format!("unknown image state {other:?}"))),
        }
    }
}

/// One subject's image, as the views show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStatus {
    pub state: ImageState,
    /// The latest upload's version.
    pub version: String,
    /// The version served, once one is ready.
    pub ready_version: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// What a new upload replaced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replaced {
    /// The previous upload's version, if there was one.
    pub version: Option<String>,
    /// The version served, which stays until the new one is ready.
    pub ready_version: Option<String>,
}

impl Replaced {
    /// The replaced upload's version when nothing serves it (it never became ready): its
    /// objects can go now.
    pub fn unserved(&self) -> Option<&str> {
        self.version.as_deref().filter(|version| Some(*version) != self.ready_version.as_deref())
    }
}

/// A worker's hold on one version of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageClaim {
    pub subject: ImageSubject,
    pub subject_id: Uuid,
    pub version: String,
    /// Where the original is: an upload's own key, or the artwork a track's audio carried.
    pub original_key: String,
    /// 1 on the first claim of this version.
    pub attempt: i32,
}

/// How [`PgImages::complete`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageCommitted {
    /// The version is served; `previous` was served before it (its objects can go).
    Ready { previous: Option<String> },
    /// The version was replaced (or its subject deleted) meanwhile: nothing was written.
    Stale,
}

/// One row of [`PgImages::statuses`].
#[derive(sqlx::FromRow)]
struct StatusRow {
    subject_id: Uuid,
    state: String,
    version: String,
    ready_version: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
}

/// Images in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgImages {
    pool: PgPool,
}

/// The table of a subject, for existence checks.
fn subject_table(subject: ImageSubject) -> &'static str {
    match subject {
        ImageSubject::Track => "tracks",
        ImageSubject::Playlist => "playlists",
        ImageSubject::User => "users",
    }
}

async fn insert_job(tx: &mut sqlx::PgConnection, job: Job) -> Result<(), DbError> {
    let payload = serde_json::to_value(JobMessage::new(job)).map_err(|err| DbError::Invalid(err.to_string()))?;
    sqlx::query("INSERT INTO outbox (payload) VALUES ($1)").bind(payload).execute(&mut *tx).await?;
    Ok(())
}

impl PgImages {
    pub fn new(pool: PgPool) -> PgImages {
        PgImages { pool }
    }

    /// Records an uploaded original (already stored under `version`) as the subject's latest
    /// image, `pending`, and queues its job, in one transaction. `None` when the subject no
    /// longer exists (nothing was written).
    pub async fn accept_upload(
        &self,
        subject: ImageSubject,
        id: Uuid,
        version: &str,
        original_key: &str,
    ) -> Result<Option<Replaced>, DbError> {
        let mut tx = self.pool.begin().await?;
        // The subject is locked against deletion until the commit, so no image outlives it.
        let exists: Option<(i32,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM {} WHERE id = $1 FOR KEY SHARE",
            subject_table(subject)
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_none() {
            return Ok(None);
        }
        let previous: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT version, ready_version FROM images WHERE subject = $1 AND subject_id = $2 FOR UPDATE",
        )
        .bind(subject.as_str())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO images (subject, subject_id, state, source, version, original_key)
             VALUES ($1, $2, 'pending', 'upload', $3, $4)
             ON CONFLICT (subject, subject_id) DO UPDATE SET
                 state = 'pending', source = 'upload', version = EXCLUDED.version,
                 original_key = EXCLUDED.original_key, attempts = 0, error_code = NULL,
                 error_message = NULL, updated_at = now()",
        )
        .bind(subject.as_str())
        .bind(id)
        .bind(version)
        .bind(original_key)
        .execute(&mut *tx)
        .await?;
        insert_job(&mut tx, Job::ProcessImage { subject, subject_id: id, version: version.to_owned() }).await?;
        tx.commit().await?;
        Ok(Some(previous.map_or_else(Replaced::default, |(version, ready_version)| Replaced {
            version: Some(version),
            ready_version,
        })))
    }

    /// Makes the artwork embedded in a track's audio (stored at `original_key`) the track's
    /// artwork and queues its job, unless the track has an image already (uploaded, or
    /// adopted before). Returns whether it did.
    pub async fn adopt_embedded(&self, track: TrackId, original_key: &str) -> Result<bool, DbError> {
        let version = crate::images::new_version();
        let mut tx = self.pool.begin().await?;
        let exists: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM tracks WHERE id = $1 FOR KEY SHARE")
            .bind(track)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(false);
        }
        let inserted = sqlx::query(
            "INSERT INTO images (subject, subject_id, state, source, version, original_key)
             VALUES ('track', $1, 'pending', 'embedded', $2, $3)
             ON CONFLICT (subject, subject_id) DO NOTHING",
        )
        .bind(track)
        .bind(&version)
        .bind(original_key)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            insert_job(&mut tx, Job::ProcessImage { subject: ImageSubject::Track, subject_id: track.0, version })
                .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Claims `version` of the subject's image for processing (attempt + 1); `None` when it
    /// is no longer the latest upload or is finished (a duplicate, late or replaced job).
    pub async fn claim(&self, subject: ImageSubject, id: Uuid, version: &str) -> Result<Option<ImageClaim>, DbError> {
        let row: Option<(String, i32)> = sqlx::query_as(
            "UPDATE images SET state = 'processing', attempts = attempts + 1, updated_at = now()
             WHERE subject = $1 AND subject_id = $2 AND version = $3 AND state IN ('pending', 'processing')
             RETURNING original_key, attempts",
        )
        .bind(subject.as_str())
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(original_key, attempt)| ImageClaim {
            subject,
            subject_id: id,
            version: version.to_owned(),
            original_key,
            attempt,
        }))
    }

    /// Gives a claim back (`processing → pending`) before a retry.
    pub async fn release(&self, claim: &ImageClaim) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE images SET state = 'pending', updated_at = now()
             WHERE subject = $1 AND subject_id = $2 AND version = $3 AND state = 'processing'",
        )
        .bind(claim.subject.as_str())
        .bind(claim.subject_id)
        .bind(&claim.version)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Serves the claimed version: `ready`, in one statement that also reads the version
    /// served before.
    pub async fn complete(&self, claim: &ImageClaim) -> Result<ImageCommitted, DbError> {
        let row: Option<(Option<String>,)> = sqlx::query_as(
            "WITH old AS (
                 SELECT ready_version FROM images
                 WHERE subject = $1 AND subject_id = $2 AND version = $3 AND state = 'processing'
                 FOR UPDATE
             )
             UPDATE images i SET state = 'ready', ready_version = $3, error_code = NULL,
                 error_message = NULL, updated_at = now()
             FROM old
             WHERE i.subject = $1 AND i.subject_id = $2
             RETURNING old.ready_version",
        )
        .bind(claim.subject.as_str())
        .bind(claim.subject_id)
        .bind(&claim.version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((previous,)) => {
                ImageCommitted::Ready { previous: previous.filter(|previous| *previous != claim.version) }
            }
            None => ImageCommitted::Stale,
        })
    }

    /// Fails `version` (pending or processing) with `failure`; `false` when it is no longer
    /// the latest upload, or finished.
    pub async fn fail(
        &self,
        subject: ImageSubject,
        id: Uuid,
        version: &str,
        failure: Failure<'_>,
    ) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE images SET state = 'failed', error_code = $4, error_message = $5, updated_at = now()
             WHERE subject = $1 AND subject_id = $2 AND version = $3 AND state IN ('pending', 'processing')",
        )
        .bind(subject.as_str())
        .bind(id)
        .bind(version)
        .bind(failure.code)
        .bind(failure.message)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Makes `version` `pending` again with a clean attempt count, when it is still the
    /// latest upload and failed `retries_exhausted`: its dead-lettered job is about to be
    /// replayed, and a failed version claims nothing. Returns whether it did.
    pub async fn retry_exhausted(&self, subject: ImageSubject, id: Uuid, version: &str) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE images SET state = 'pending', attempts = 0, error_code = NULL, error_message = NULL,
                 updated_at = now()
             WHERE subject = $1 AND subject_id = $2 AND version = $3 AND state = 'failed'
                 AND error_code = 'retries_exhausted'",
        )
        .bind(subject.as_str())
        .bind(id)
        .bind(version)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Whether `version` of the subject's image is still wanted: the latest upload or the one
    /// served. A version that is neither has objects no one will ever name.
    pub async fn is_live(&self, subject: ImageSubject, id: Uuid, version: &str) -> Result<bool, DbError> {
        let live: Option<(bool,)> = sqlx::query_as(
            "SELECT version = $3 OR ready_version IS NOT DISTINCT FROM $3 FROM images
             WHERE subject = $1 AND subject_id = $2",
        )
        .bind(subject.as_str())
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(live.is_some_and(|(live,)| live))
    }

    /// Queues again (through the outbox) the jobs of images pending or processing for longer
    /// than `older_than`: their message was lost (the in-process queue dies with its
    /// process) or their worker died. A duplicate is harmless: the claim and the commit are
    /// fenced by the version. Safe to run in several workers at once; returns how many.
    pub async fn requeue_stale(&self, older_than: std::time::Duration) -> Result<u64, DbError> {
        let mut tx = self.pool.begin().await?;
        let stale: Vec<(String, Uuid, String)> = sqlx::query_as(
            "WITH stale AS (
                 SELECT subject, subject_id FROM images
                 WHERE state IN ('pending', 'processing') AND updated_at < now() - make_interval(secs => $1)
                 ORDER BY updated_at LIMIT 100
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE images i SET updated_at = now()
             FROM stale WHERE i.subject = stale.subject AND i.subject_id = stale.subject_id
             RETURNING i.subject, i.subject_id, i.version",
        )
        .bind(older_than.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        for (subject, subject_id, version) in &stale {
            let subject = subject.parse().map_err(DbError::Invalid)?;
            insert_job(&mut tx, Job::ProcessImage { subject, subject_id: *subject_id, version: version.clone() })
                .await?;
        }
        tx.commit().await?;
        Ok(stale.len() as u64)
    }

    /// The image of one subject, if it has one.
    pub async fn status(&self, subject: ImageSubject, id: Uuid) -> Result<Option<ImageStatus>, DbError> {
        Ok(self.statuses(subject, &[id]).await?.remove(&id))
    }

    /// The images of `ids`, by id (subjects without one are absent).
    pub async fn statuses(&self, subject: ImageSubject, ids: &[Uuid]) -> Result<HashMap<Uuid, ImageStatus>, DbError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<StatusRow> = sqlx::query_as(
            "SELECT subject_id, state, version, ready_version, error_code, error_message FROM images
             WHERE subject = $1 AND subject_id = ANY($2)",
        )
        .bind(subject.as_str())
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let status = ImageStatus {
                    state: ImageState::parse(&row.state)?,
                    version: row.version,
                    ready_version: row.ready_version,
                    error_code: row.error_code,
                    error_message: row.error_message,
                };
                Ok((row.subject_id, status))
            })
            .collect()
    }
}
