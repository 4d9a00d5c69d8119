//! The database layer: the PostgreSQL pool, the migrations, and [`PgTracks`], the track
//! repository (the accounts, the catalogue, the social layer, search and the push devices have
//! modules of their own).
//!
//! PostgreSQL is the record of truth (DESIGN.md). Every state change is a compare-and-set
//! (`UPDATE … WHERE state = $expected`), so a duplicate or late job can never move a track
//! backwards: the caller learns it lost the race from the `false` it gets back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row};

use crate::config::Settings;
use crate::domain::{ProcessingStage, TrackId, TrackState, UserId};

mod accounts;
pub mod billing;
mod catalog;
mod devices;
pub mod images;
pub mod plays;
pub mod realtime;
pub mod search;
pub mod social;

pub use accounts::{
    LoginBlock, LoginPolicy, NewUser, PgUsers, Registration, Role, Rotation, TOKENS_PER_HOUR, TokenPurpose, UserRow,
};
pub use billing::{PgBilling, Tier};
pub use catalog::{Admission, NewTrack, Page, Playable, TrackDetails, TrackPatch, Visibility};
pub use devices::PgDevices;

/// The schema, embedded at build time from `migrations/`.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The account that owns tracks imported without an owner (created by the migrations).
pub const SYSTEM_USER: UserId = UserId(uuid::uuid!("00000000-0000-7000-8000-000000000001"));

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unreachable or failing: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Invalid(String),
    /// A uniqueness rule refused the write; the text names what is taken.
    #[error("{0}")]
    Conflict(String),
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(err: sqlx::Error) -> DbError {
        match err {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                DbError::Unavailable(err)
            }
            other => DbError::Query(other),
        }
    }
}

impl DbError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            DbError::Unavailable(_) => "database_unavailable",
            DbError::Migrate(_) => "migration_failed",
            DbError::Invalid(_) => "invalid_request",
            DbError::Conflict(_) => "conflict",
            DbError::Query(_) => "database_error",
        }
    }

    /// Whether retrying cannot help: only losing the connection is transient.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DbError::Unavailable(_))
    }
}

/// Opens the pool. Fails fast (5 s) when the server cannot be reached.
pub async fn connect(settings: &Settings) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(settings.database_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(settings.database_url.expose_secret())
        .await
        .map_err(DbError::Unavailable)
}

/// Creates the database named in the URL when it does not exist yet; returns whether it did.
pub async fn create_database_if_missing(url: &str) -> Result<bool, DbError> {
    if Postgres::database_exists(url).await.map_err(DbError::Unavailable)? {
        return Ok(false);
    }
    match Postgres::create_database(url).await {
        Ok(()) => Ok(true),
        // Another process created it between the two calls.
        Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("42P04") => Ok(false),
        Err(err) => Err(DbError::Unavailable(err)),
    }
}

/// Applies every pending migration; returns the versions it applied.
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, DbError> {
    let before: Vec<i64> = applied_versions(pool).await.unwrap_or_default();
    MIGRATOR.run(pool).await?;
    let after = applied_versions(pool).await?;
    Ok(after.into_iter().filter(|version| !before.contains(version)).collect())
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version").fetch_all(pool).await
}

/// A track as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrackRow {
    pub id: TrackId,
    pub owner_id: UserId,
    pub title: String,
    pub state: TrackState,
    pub stage: Option<ProcessingStage>,
    pub progress: i16,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub revision: i32,
    pub original_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub state_changed_at: DateTime<Utc>,
}

/// A failure to record with the `failed` state.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// Machine-readable (`unsupported_format`, `retries_exhausted`, …).
    pub code: &'a str,
    /// For people.
    pub message: &'a str,
}

/// Tracks in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgTracks {
    pool: PgPool,
}

impl PgTracks {
    pub fn new(pool: PgPool) -> PgTracks {
        PgTracks { pool }
    }

    /// Records a new track in `state` (`awaiting_upload` or `uploaded`).
    pub async fn create(
        &self,
        owner: UserId,
        title: &str,
        state: TrackState,
        original_key: Option<&str>,
    ) -> Result<TrackRow, DbError> {
        if !matches!(state, TrackState::AwaitingUpload | TrackState::Uploaded) {
            return Err(DbError::Invalid(format!("a new track starts awaiting_upload or uploaded, not {state}")));
        }
        let id = TrackId::new();
        sqlx::query("INSERT INTO tracks (id, owner_id, title, state, original_key) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(owner)
            .bind(title)
            .bind(state.as_str())
            .bind(original_key)
            .execute(&self.pool)
            .await?;
        self.get(id).await?.ok_or_else(|| DbError::Invalid(format!("track {id} vanished after insert")))
    }

    /// The track, if it exists.
    pub async fn get(&self, id: TrackId) -> Result<Option<TrackRow>, DbError> {
        let row = sqlx::query(
            "SELECT id, owner_id, title, state, stage, progress, error_code, error_message, attempts, revision,
                    original_key, created_at, state_changed_at
             FROM tracks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.try_get("state")?;
        let stage: Option<String> = row.try_get("stage")?;
        Ok(Some(TrackRow {
            id: row.try_get("id")?,
            owner_id: row.try_get("owner_id")?,
            title: row.try_get("title")?,
            state: state.parse().map_err(|err: crate::domain::UnknownState| DbError::Invalid(err.to_string()))?,
            stage: stage
                .map(|stage| stage.parse())
                .transpose()
                .map_err(|err: crate::domain::UnknownState| DbError::Invalid(err.to_string()))?,
            progress: row.try_get("progress")?,
            error_code: row.try_get("error_code")?,
            error_message: row.try_get("error_message")?,
            attempts: row.try_get("attempts")?,
            revision: row.try_get("revision")?,
            original_key: row.try_get("original_key")?,
            created_at: row.try_get("created_at")?,
            state_changed_at: row.try_get("state_changed_at")?,
        }))
    }

    /// Moves a track from `expected` to `next` if, and only if, it is still in `expected`.
    /// Returns `false` when another actor got there first (or the track is gone).
    ///
    /// Side effects by target state: `processing` counts an attempt and starts at stage
    /// `probing` with a fresh heartbeat; `failed` records `failure` (required); `queued` from
    /// `ready` or `failed` starts a new revision with a clean attempt count.
    pub async fn transition(
        &self,
        id: TrackId,
        expected: TrackState,
        next: TrackState,
        failure: Option<Failure<'_>>,
    ) -> Result<bool, DbError> {
        if !expected.can_become(next) {
            return Err(DbError::Invalid(format!("a track cannot go from {expected} to {next}")));
        }
        if (next == TrackState::Failed) != failure.is_some() {
            return Err(DbError::Invalid("a failure reason goes with, and only with, the failed state".into()));
        }
        let reprocess = expected.is_terminal() && next == TrackState::Queued;
        let result = sqlx::query(
            "UPDATE tracks SET
                 state = $3,
                 stage = CASE WHEN $3 = 'processing' THEN 'probing' END,
                 progress = CASE WHEN $3 = 'ready' THEN 100 ELSE 0 END,
                 attempts = CASE WHEN $3 = 'processing' THEN attempts + 1 WHEN $6 THEN 0 ELSE attempts END,
                 revision = CASE WHEN $6 THEN revision + 1 ELSE revision END,
                 heartbeat_at = CASE WHEN $3 = 'processing' THEN now() END,
                 error_code = $4,
                 error_message = $5,
                 updated_at = now(),
                 state_changed_at = now()
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(expected.as_str())
        .bind(next.as_str())
        .bind(failure.map(|f| f.code))
        .bind(failure.map(|f| f.message))
        .bind(reprocess)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Counts tracks per state (every state, zeros included).
    pub async fn count_by_state(&self) -> Result<Vec<(TrackState, i64)>, DbError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM tracks GROUP BY state").fetch_all(&self.pool).await?;
        Ok(TrackState::ALL
            .into_iter()
            .map(|state| {
                let count = rows.iter().find(|(name, _)| name == state.as_str()).map_or(0, |(_, n)| *n);
                (state, count)
            })
            .collect())
    }
}

/// A worker's claim on a track: the attempt number fences every later write, so a claim
/// released (or taken over after a stale heartbeat) can no longer change the track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub track_id: TrackId,
    pub attempt: i32,
    pub revision: i32,
    pub original_key: Option<String>,
}

/// One rendition row, as the worker records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RenditionRow {
    pub preset: String,
    pub kind: String,
    pub storage_key: String,
    pub storage_keys: Vec<String>,
    pub codec: String,
    pub bitrate_kbps: i32,
    pub sample_rate: i32,
    pub channels: i16,
    pub duration_ms: i64,
    pub bytes: i64,
}

/// What a finished run records on the track.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub source: serde_json::Value,
    pub loudness: serde_json::Value,
    pub tags: serde_json::Value,
    pub duration_ms: i64,
    pub waveform_key: String,
    pub waveform_dat_key: String,
    pub waveform_summary_key: String,
    pub artwork_key: Option<String>,
    pub renditions: Vec<RenditionRow>,
}

impl PgTracks {
    /// The pool, for callers that compose their own transactions.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Moves a track to `queued` from `expected` (`uploaded`, or `ready`/`failed` to
    /// reprocess) and writes the job to the outbox in the same transaction: the message
    /// exists if and only if the state change committed.
    pub async fn enqueue(&self, id: TrackId, expected: TrackState) -> Result<bool, DbError> {
        if !expected.can_become(TrackState::Queued) || expected == TrackState::Processing {
            return Err(DbError::Invalid(format!("a {expected} track cannot be enqueued")));
        }
        let reprocess = expected.is_terminal();
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE tracks SET state = 'queued', stage = NULL, progress = 0,
                 error_code = NULL, error_message = NULL,
                 attempts = CASE WHEN $3 THEN 0 ELSE attempts END,
                 revision = CASE WHEN $3 THEN revision + 1 ELSE revision END,
                 enqueued_at = now(), updated_at = now(), state_changed_at = now()
             WHERE id = $1 AND state = $2",
        )
        .bind(id)
        .bind(expected.as_str())
        .bind(reprocess)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if moved {
            insert_outbox(&mut tx, id).await?;
        }
        tx.commit().await?;
        Ok(moved)
    }

    /// Claims a queued track for processing (attempt + 1); `None` when it is not queued any
    /// more (a duplicate or late message).
    pub async fn claim(&self, id: TrackId) -> Result<Option<Claim>, DbError> {
        let row: Option<(i32, i32, Option<String>)> = sqlx::query_as(
            "UPDATE tracks SET state = 'processing', stage = 'probing', progress = 0,
                 attempts = attempts + 1, heartbeat_at = now(), claimed_at = now(),
                 updated_at = now(), state_changed_at = now()
             WHERE id = $1 AND state = 'queued'
             RETURNING attempts, revision, original_key",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(attempt, revision, original_key)| Claim { track_id: id, attempt, revision, original_key }))
    }

    /// Records stage and progress and beats the heartbeat; `false` when the claim is gone.
    pub async fn heartbeat(&self, claim: &Claim, stage: ProcessingStage, progress: i16) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE tracks SET stage = $3, progress = $4, heartbeat_at = now(), updated_at = now()
             WHERE id = $1 AND state = 'processing' AND attempts = $2",
        )
        .bind(claim.track_id)
        .bind(claim.attempt)
        .bind(stage.as_str())
        .bind(progress.clamp(0, 100))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Gives a claim back (`processing → queued`) so the job's retry can claim it again.
    pub async fn release(&self, claim: &Claim) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE tracks SET state = 'queued', stage = NULL, progress = 0, heartbeat_at = NULL,
                 enqueued_at = now(), updated_at = now(), state_changed_at = now()
             WHERE id = $1 AND state = 'processing' AND attempts = $2",
        )
        .bind(claim.track_id)
        .bind(claim.attempt)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Fails a track held by `claim` (`processing → failed`).
    pub async fn fail_claimed(&self, claim: &Claim, failure: Failure<'_>) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE tracks SET state = 'failed', stage = NULL, progress = 0, heartbeat_at = NULL,
                 error_code = $3, error_message = $4, updated_at = now(), state_changed_at = now()
             WHERE id = $1 AND state = 'processing' AND attempts = $2",
        )
        .bind(claim.track_id)
        .bind(claim.attempt)
        .bind(failure.code)
        .bind(failure.message)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Commits a finished run: the rendition rows and `processing → ready` in one
    /// transaction, fenced by the claim. Returns [`Committed::Ready`] with the revision that
    /// was live before (whose objects the caller now deletes), or [`Committed::Stale`] when the
    /// claim was lost, in which case nothing was written.
    pub async fn complete(&self, claim: &Claim, done: &Completion) -> Result<Committed, DbError> {
        let mut tx = self.pool.begin().await?;
        let previous: Option<(Option<i32>,)> = sqlx::query_as(
            "SELECT ready_revision FROM tracks
             WHERE id = $1 AND state = 'processing' AND attempts = $2 AND revision = $3 FOR UPDATE",
        )
        .bind(claim.track_id)
        .bind(claim.attempt)
        .bind(claim.revision)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((previous,)) = previous else {
            return Ok(Committed::Stale);
        };
        sqlx::query("DELETE FROM renditions WHERE track_id = $1 AND revision = $2")
            .bind(claim.track_id)
            .bind(claim.revision)
            .execute(&mut *tx)
            .await?;
        for rendition in &done.renditions {
            sqlx::query(
                "INSERT INTO renditions (track_id, revision, preset, kind, storage_key, storage_keys, codec,
                     bitrate_kbps, sample_rate, channels, duration_ms, bytes)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(claim.track_id)
            .bind(claim.revision)
            .bind(&rendition.preset)
            .bind(&rendition.kind)
            .bind(&rendition.storage_key)
            .bind(&rendition.storage_keys)
            .bind(&rendition.codec)
            .bind(rendition.bitrate_kbps)
            .bind(rendition.sample_rate)
            .bind(rendition.channels)
            .bind(rendition.duration_ms)
            .bind(rendition.bytes)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "UPDATE tracks SET state = 'ready', stage = NULL, progress = 100, heartbeat_at = NULL,
                 ready_revision = revision, source = $2, loudness = $3, track_tags = $4, duration_ms = $5,
                 waveform_key = $6, waveform_dat_key = $7, waveform_summary_key = $8, artwork_key = $9,
                 updated_at = now(), state_changed_at = now()
             WHERE id = $1",
        )
        .bind(claim.track_id)
        .bind(&done.source)
        .bind(&done.loudness)
        .bind(&done.tags)
        .bind(done.duration_ms)
        .bind(&done.waveform_key)
        .bind(&done.waveform_dat_key)
        .bind(&done.waveform_summary_key)
        .bind(&done.artwork_key)
        .execute(&mut *tx)
        .await?;
        if let Some(old) = previous.filter(|old| *old != claim.revision) {
            sqlx::query("DELETE FROM renditions WHERE track_id = $1 AND revision = $2")
                .bind(claim.track_id)
                .bind(old)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Committed::Ready { previous_revision: previous.filter(|old| *old != claim.revision) })
    }

    /// The rendition rows of the live revision.
    pub async fn renditions(&self, id: TrackId) -> Result<Vec<RenditionRow>, DbError> {
        let rows = sqlx::query(
            "SELECT r.preset, r.kind, r.storage_key, r.storage_keys, r.codec, r.bitrate_kbps, r.sample_rate,
                    r.channels, r.duration_ms, r.bytes
             FROM renditions r JOIN tracks t ON t.id = r.track_id AND t.ready_revision = r.revision
             WHERE r.track_id = $1 ORDER BY r.preset",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(RenditionRow {
                    preset: row.try_get("preset")?,
                    kind: row.try_get("kind")?,
                    storage_key: row.try_get("storage_key")?,
                    storage_keys: row.try_get("storage_keys")?,
                    codec: row.try_get("codec")?,
                    bitrate_kbps: row.try_get("bitrate_kbps")?,
                    sample_rate: row.try_get("sample_rate")?,
                    channels: row.try_get("channels")?,
                    duration_ms: row.try_get("duration_ms")?,
                    bytes: row.try_get("bytes")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }
}

/// How [`PgTracks::complete`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The track is ready; `previous_revision`'s objects are now orphans to delete.
    Ready { previous_revision: Option<i32> },
    /// The claim was lost (released or taken over): nothing was written.
    Stale,
}

pub(crate) async fn insert_outbox(tx: &mut sqlx::Transaction<'_, Postgres>, id: TrackId) -> Result<(), DbError> {
    let message = crate::job::JobMessage::new(crate::job::Job::ProcessTrack { track_id: id });
    let payload = serde_json::to_value(&message).map_err(|err| DbError::Invalid(err.to_string()))?;
    sqlx::query("INSERT INTO outbox (payload) VALUES ($1)").bind(payload).execute(&mut **tx).await?;
    Ok(())
}

/// The outbox: messages waiting to be published.
#[derive(Debug, Clone)]
pub struct PgOutbox {
    pool: PgPool,
}

impl PgOutbox {
    pub fn new(pool: PgPool) -> PgOutbox {
        PgOutbox { pool }
    }

    /// Publishes up to `limit` unsent messages through `publish`, oldest first, stamping each
    /// one sent after its confirm. Rows are locked (`SKIP LOCKED`) so several relays share
    /// the work without sending a row twice. Returns how many were sent.
    pub async fn relay<F, Fut>(&self, limit: i64, publish: F) -> Result<u64, DbError>
    where
        F: Fn(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(
            "SELECT id, payload FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut sent = 0;
        for (id, payload) in rows {
            let bytes = serde_json::to_vec(&payload).map_err(|err| DbError::Invalid(err.to_string()))?;
            match publish(bytes).await {
                Ok(()) => {
                    sqlx::query("UPDATE outbox SET sent_at = now(), attempts = attempts + 1 WHERE id = $1")
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    sent += 1;
                }
                Err(error) => {
                    sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = $1")
                        .bind(id)
                        .bind(error)
                        .execute(&mut *tx)
                        .await?;
                    break;
                }
            }
        }
        tx.commit().await?;
        Ok(sent)
    }

    /// Publishes up to `limit` unsent messages to `queue`; returns how many went. The API
    /// calls it right after a commit that queued work, the CLI after `import` and
    /// `reprocess`, and every worker's relay loop in the background, which catches whatever
    /// a crash or an unreachable broker left behind.
    pub async fn publish_to(&self, queue: &dyn crate::queue::JobQueue, limit: i64) -> Result<u64, DbError> {
        self.relay(limit, |payload| async move { queue.publish_payload(payload).await.map_err(|err| err.to_string()) })
            .await
    }

    /// Unsent messages.
    pub async fn pending(&self) -> Result<i64, DbError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetch_one(&self.pool).await?)
    }

    /// Removes sent messages older than `days`.
    pub async fn prune(&self, days: i32) -> Result<u64, DbError> {
        let result = sqlx::query("DELETE FROM outbox WHERE sent_at < now() - make_interval(days => $1)")
            .bind(days)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected())
    }
}

/// What one reconciler pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reconciled {
    /// Queued tracks whose message was presumed lost, published again.
    pub requeued_queued: u64,
    /// Processing tracks with a stale heartbeat, released and published again.
    pub requeued_stale: u64,
    /// Stale tracks that had used every attempt, failed with `retries_exhausted`.
    pub exhausted: u64,
}

/// The advisory-lock key that makes the reconciler run in one worker at a time.
const RECONCILER_LOCK: i64 = 0x5741_5645_4c49_4e45; // "WAVELINE"

/// One reconciler pass, if this process wins the advisory lock; `None` when another
/// process holds it.
pub async fn reconcile(
    pool: &PgPool,
    queued_stale: std::time::Duration,
    heartbeat_stale: std::time::Duration,
    max_attempts: i32,
) -> Result<Option<Reconciled>, DbError> {
    let mut conn = pool.acquire().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(RECONCILER_LOCK).fetch_one(&mut *conn).await?;
    if !locked {
        return Ok(None);
    }
    let result = reconcile_locked(&mut conn, queued_stale, heartbeat_stale, max_attempts).await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(RECONCILER_LOCK).execute(&mut *conn).await;
    result.map(Some)
}

async fn reconcile_locked(
    conn: &mut sqlx::PgConnection,
    queued_stale: std::time::Duration,
    heartbeat_stale: std::time::Duration,
    max_attempts: i32,
) -> Result<Reconciled, DbError> {
    let mut done = Reconciled::default();
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // Queued for too long: the message may be lost. A duplicate is harmless (the claim is a
    // compare-and-set); `enqueued_at` moves on so the same track is not re-sent every pass.
    let lost: Vec<(TrackId,)> = sqlx::query_as(
        "UPDATE tracks SET enqueued_at = now()
         WHERE state = 'queued' AND coalesce(enqueued_at, state_changed_at) < now() - make_interval(secs => $1)
         RETURNING id",
    )
    .bind(queued_stale.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    for (id,) in &lost {
        insert_outbox(&mut tx, *id).await?;
    }
    done.requeued_queued = lost.len() as u64;
    // Heartbeat stale: the worker died. Fail what has no attempts left; release the rest.
    let exhausted = sqlx::query(
        "UPDATE tracks SET state = 'failed', stage = NULL, progress = 0, heartbeat_at = NULL,
             error_code = 'retries_exhausted',
             error_message = 'the worker processing this track stopped answering, and no attempts are left',
             updated_at = now(), state_changed_at = now()
         WHERE state = 'processing' AND heartbeat_at < now() - make_interval(secs => $1) AND attempts >= $2",
    )
    .bind(heartbeat_stale.as_secs_f64())
    .bind(max_attempts)
    .execute(&mut *tx)
    .await?;
    done.exhausted = exhausted.rows_affected();
    let stale: Vec<(TrackId,)> = sqlx::query_as(
        "UPDATE tracks SET state = 'queued', stage = NULL, progress = 0, heartbeat_at = NULL,
             enqueued_at = now(), updated_at = now(), state_changed_at = now()
         WHERE state = 'processing' AND heartbeat_at < now() - make_interval(secs => $1)
         RETURNING id",
    )
    .bind(heartbeat_stale.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    for (id,) in &stale {
        insert_outbox(&mut tx, *id).await?;
    }
    done.requeued_stale = stale.len() as u64;
    tx.commit().await?;
    Ok(done)
}

/// Which tracks an operator means (`waveline tracks list`, `waveline reprocess`).
#[derive(Debug, Clone, Default)]
pub struct TrackFilter {
    /// Any of these states (all when empty).
    pub states: Vec<TrackState>,
    /// Ready tracks whose live revision has no rendition of this preset.
    pub missing_preset: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Only these tracks (all when empty).
    pub ids: Vec<TrackId>,
    pub limit: Option<i64>,
}

impl PgTracks {
    /// Tracks matching `filter`, oldest first.
    pub async fn list(&self, filter: &TrackFilter) -> Result<Vec<TrackRow>, DbError> {
        let states: Vec<String> = filter.states.iter().map(|s| s.as_str().to_owned()).collect();
        let ids: Vec<uuid::Uuid> = filter.ids.iter().map(|id| id.0).collect();
        let found: Vec<(TrackId,)> = sqlx::query_as(
            "SELECT t.id FROM tracks t
             WHERE (cardinality($1::text[]) = 0 OR t.state = ANY($1))
               AND (cardinality($2::uuid[]) = 0 OR t.id = ANY($2))
               AND ($3::timestamptz IS NULL OR t.created_at >= $3)
               AND ($4::text IS NULL OR NOT EXISTS (
                     SELECT 1 FROM renditions r
                     WHERE r.track_id = t.id AND r.revision = t.ready_revision AND r.preset = $4))
             ORDER BY t.created_at, t.id
             LIMIT $5",
        )
        .bind(&states)
        .bind(&ids)
        .bind(filter.since)
        .bind(&filter.missing_preset)
        .bind(filter.limit.unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut rows = Vec::with_capacity(found.len());
        for (id,) in found {
            if let Some(row) = self.get(id).await? {
                rows.push(row);
            }
        }
        Ok(rows)
    }

    /// Removes a track row (and, by cascade, its renditions).
    pub async fn delete(&self, id: TrackId) -> Result<bool, DbError> {
        Ok(sqlx::query("DELETE FROM tracks WHERE id = $1").bind(id).execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Sets where the original is stored and marks it uploaded (`awaiting_upload → uploaded`).
    pub async fn mark_uploaded(&self, id: TrackId, original_key: &str, size: i64) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE tracks SET state = 'uploaded', original_key = $2, original_size = $3,
                 updated_at = now(), state_changed_at = now()
             WHERE id = $1 AND state = 'awaiting_upload'",
        )
        .bind(id)
        .bind(original_key)
        .bind(size)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}
