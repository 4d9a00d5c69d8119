//! The database layer: the PostgreSQL pool, the migrations, and [`PgTracks`], the track
//! repository.
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
    #[error("database query failed: {0}")]
    Query(#[source] sqlx::Error),
}

impl From<sqlx::Error> for DbError {
    fn from(err: sqlx::Error) -> DbError {
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_) => DbError::Unavailable(err),
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
    if Postgres::database_exists(url)
        .await
        .map_err(DbError::Unavailable)?
    {
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
    Ok(after
        .into_iter()
        .filter(|version| !before.contains(version))
        .collect())
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
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
            return Err(DbError::Invalid(format!(
                "a new track starts awaiting_upload or uploaded, not {state}"
            )));
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
        self.get(id)
            .await?
            .ok_or_else(|| DbError::Invalid(format!("track {id} vanished after insert")))
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
            state: state
                .parse()
                .map_err(|err: crate::domain::UnknownState| DbError::Invalid(err.to_string()))?,
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
            return Err(DbError::Invalid(format!(
                "a track cannot go from {expected} to {next}"
            )));
        }
        if (next == TrackState::Failed) != failure.is_some() {
            return Err(DbError::Invalid(
                "a failure reason goes with, and only with, the failed state".into(),
            ));
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
            sqlx::query_as("SELECT state, count(*) FROM tracks GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        Ok(TrackState::ALL
            .into_iter()
            .map(|state| {
                let count = rows
                    .iter()
                    .find(|(name, _)| name == state.as_str())
                    .map_or(0, |(_, n)| *n);
                (state, count)
            })
            .collect())
    }
}
