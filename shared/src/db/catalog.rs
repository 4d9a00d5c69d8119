//! The catalogue side of tracks, for the API: creating uploads, the whole track, listing with
//! a keyset cursor, metadata edits, and what a stream route needs in one query.

use chrono::{DateTime, Utc};

use super::{Claim, DbError, PgTracks, insert_outbox};
use crate::domain::{ProcessingStage, TrackId, TrackState, UnknownState, UserId};

/// Who may see a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    Public,
    /// Only the owner (and admins); everyone else gets 404, so its existence does not leak.
    Private,
}

impl Visibility {
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
        }
    }

    pub fn parse(text: &str) -> Option<Visibility> {
        match text {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            _ => None,
        }
    }
}

/// A track about to be recorded, validated by the caller.
#[derive(Debug, Clone)]
pub struct NewTrack {
    pub id: TrackId,
    pub owner: UserId,
    pub title: String,
    pub description: String,
    pub genre: Option<String>,
    pub tags: Vec<String>,
    pub visibility: Visibility,
    pub original_key: String,
}

/// Everything the API shows of a track.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrackDetails {
    pub id: TrackId,
    pub owner_id: UserId,
    pub owner_username: String,
    pub title: String,
    pub description: String,
    pub genre: Option<String>,
    pub tags: Vec<String>,
    pub visibility: Visibility,
    pub state: TrackState,
    pub stage: Option<ProcessingStage>,
    pub progress: i16,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub attempts: i32,
    pub revision: i32,
    /// The revision whose renditions are served; `None` until the first one is ready.
    pub ready_revision: Option<i32>,
    pub duration_ms: Option<i64>,
    pub original_size: Option<i64>,
    pub loudness: Option<serde_json::Value>,
    pub track_tags: Option<serde_json::Value>,
    pub source: Option<serde_json::Value>,
    /// Presets of the live revision.
    pub presets: Vec<String>,
    /// Counted plays (the 30 s preview's apart).
    pub playback_count: i64,
    pub preview_playback_count: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct DetailsRow {
    id: TrackId,
    owner_id: UserId,
    owner_username: String,
    title: String,
    description: String,
    genre: Option<String>,
    tags: Vec<String>,
    visibility: String,
    state: String,
    stage: Option<String>,
    progress: i16,
    error_code: Option<String>,
    error_message: Option<String>,
    attempts: i32,
    revision: i32,
    ready_revision: Option<i32>,
    duration_ms: Option<i64>,
    original_size: Option<i64>,
    loudness: Option<serde_json::Value>,
    track_tags: Option<serde_json::Value>,
    source: Option<serde_json::Value>,
    presets: Vec<String>,
    playback_count: i64,
    preview_playback_count: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

const DETAILS_SELECT: &str = "
    SELECT t.id, t.owner_id, u.username AS owner_username, t.title, t.description, t.genre, t.tags,
           t.visibility, t.state, t.stage, t.progress, t.error_code, t.error_message, t.attempts,
           t.revision, t.ready_revision, t.duration_ms, t.original_size, t.loudness, t.track_tags,
           t.source, t.playback_count, t.preview_playback_count, t.created_at, t.updated_at,
           coalesce(ARRAY(SELECT r.preset FROM renditions r
                          WHERE r.track_id = t.id AND r.revision = t.ready_revision ORDER BY r.preset),
                    '{}') AS presets
    FROM tracks t JOIN users u ON u.id = t.owner_id";

impl TryFrom<DetailsRow> for TrackDetails {
    type Error = DbError;

    fn try_from(row: DetailsRow) -> Result<TrackDetails, DbError> {
        let invalid = |err: UnknownState| DbError::Invalid(err.to_string());
        Ok(TrackDetails {
            id: row.id,
            owner_id: row.owner_id,
            owner_username: row.owner_username,
            title: row.title,
            description: row.description,
            genre: row.genre,
            tags: row.tags,
            visibility: Visibility::parse(&row.visibility)
                .ok_or_else(|| DbError::Invalid(format!("unknown visibility {:?}", row.visibility)))?,
            state: row.state.parse().map_err(invalid)?,
            stage: row.stage.map(|stage| stage.parse()).transpose().map_err(invalid)?,
            progress: row.progress,
            error_code: row.error_code,
            error_message: row.error_message,
            attempts: row.attempts,
            revision: row.revision,
            ready_revision: row.ready_revision,
            duration_ms: row.duration_ms,
            original_size: row.original_size,
            loudness: row.loudness,
            track_tags: row.track_tags,
            source: row.source,
            presets: row.presets,
            playback_count: row.playback_count,
            preview_playback_count: row.preview_playback_count,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

/// One page of a listing, newest first.
#[derive(Debug, Clone)]
pub struct Page {
    pub tracks: Vec<TrackDetails>,
    /// Where the next page starts, when there is one: the last track's `(created_at, id)`.
    pub next: Option<(DateTime<Utc>, TrackId)>,
}

/// A metadata edit: `None` leaves a field alone (for `genre`, `Some(None)` clears it).
#[derive(Debug, Clone, Default)]
pub struct TrackPatch {
    pub title: Option<String>,
    pub description: Option<String>,
    pub genre: Option<Option<String>>,
    pub tags: Option<Vec<String>>,
    pub visibility: Option<Visibility>,
}

/// What a stream, HLS or waveform route needs, in one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Playable {
    pub owner_id: UserId,
    pub visibility: Visibility,
    pub state: TrackState,
    /// `None` until a revision is ready: the stream routes answer 409 then.
    pub ready_revision: Option<i32>,
    /// The asked-for preset of the live revision: `(storage_key, storage_keys)` (the file, or
    /// the HLS master and every file beneath it).
    pub rendition: Option<(String, Vec<String>)>,
    pub waveform_key: Option<String>,
    pub waveform_dat_key: Option<String>,
    pub waveform_summary_key: Option<String>,
    /// The owner is suspended: only admins may play their private tracks.
    pub owner_suspended: bool,
}

/// How [`PgTracks::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The duration fits (or the owner is exempt); it is now counted against the quota.
    Admitted,
    /// It would pass the quota: `used_ms` is what the owner's other tracks hold.
    OverQuota { used_ms: i64 },
    /// The claim was lost, or the track is gone: nothing was decided.
    Stale,
}

impl PgTracks {
    /// Records an uploaded track and queues it, in one transaction with its outbox message:
    /// the track exists if and only if its job will be published.
    pub async fn create_queued(&self, new: &NewTrack, original_size: i64) -> Result<TrackDetails, DbError> {
        let mut tx = self.pool.begin().await?;
        insert_track(&mut *tx, new, "queued", Some(original_size), None).await?;
        insert_outbox(&mut tx, new.id).await?;
        tx.commit().await?;
        self.details(new.id).await?.ok_or_else(|| DbError::Invalid(format!("track {} vanished", new.id)))
    }

    /// Records a track whose original the client will upload directly, by `expires_at`;
    /// `declared_size`, the size the client announced, is kept as the original's size until
    /// the upload completes.
    pub async fn create_awaiting(
        &self,
        new: &NewTrack,
        expires_at: DateTime<Utc>,
        declared_size: Option<i64>,
    ) -> Result<(), DbError> {
        insert_track(&self.pool, new, "awaiting_upload", declared_size, Some(expires_at)).await
    }

    /// Those of `ids` that are direct uploads still awaiting their bytes.
    pub async fn awaiting_upload_among(&self, ids: &[TrackId]) -> Result<Vec<TrackId>, DbError> {
        let rows: Vec<(TrackId,)> =
            sqlx::query_as("SELECT id FROM tracks WHERE id = ANY($1) AND state = 'awaiting_upload'")
                .bind(ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Forgets the direct uploads whose URL expired more than `grace` ago without being
    /// completed: deletes their rows and returns their ids (their objects are the caller's to
    /// delete). Rows go one statement at a time, so concurrent sweepers never both take one.
    pub async fn sweep_abandoned_uploads(&self, grace: std::time::Duration) -> Result<Vec<TrackId>, DbError> {
        let ids: Vec<(TrackId,)> = sqlx::query_as(
            "DELETE FROM tracks
             WHERE state = 'awaiting_upload' AND upload_expires_at < now() - make_interval(secs => $1)
             RETURNING id",
        )
        .bind(grace.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    /// The end of a direct upload: `awaiting_upload → queued` with the original's size, and
    /// the job in the outbox, in one transaction. `false` when the track was not awaiting its
    /// upload (completed twice, or gone).
    pub async fn complete_upload(&self, id: TrackId, original_size: i64) -> Result<bool, DbError> {
        let mut tx = self.pool.begin().await?;
        let moved = sqlx::query(
            "UPDATE tracks SET state = 'queued', original_size = $2, upload_expires_at = NULL,
                 enqueued_at = now(), updated_at = now(), state_changed_at = now()
             WHERE id = $1 AND state = 'awaiting_upload'",
        )
        .bind(id)
        .bind(original_size)
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

    /// When a direct upload's URL runs out, if the track is still awaiting it.
    pub async fn upload_expiry(&self, id: TrackId) -> Result<Option<DateTime<Utc>>, DbError> {
        Ok(sqlx::query_scalar::<_, Option<DateTime<Utc>>>(
            "SELECT upload_expires_at FROM tracks WHERE id = $1 AND state = 'awaiting_upload'",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    /// The whole track.
    pub async fn details(&self, id: TrackId) -> Result<Option<TrackDetails>, DbError> {
        sqlx::query_as::<_, DetailsRow>(sqlx::AssertSqlSafe(format!("{DETAILS_SELECT} WHERE t.id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(TrackDetails::try_from)
            .transpose()
    }

    /// The tracks among `ids` that exist, in the order of `ids`.
    pub async fn details_many(&self, ids: &[TrackId]) -> Result<Vec<TrackDetails>, DbError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
        let rows =
            sqlx::query_as::<_, DetailsRow>(sqlx::AssertSqlSafe(format!("{DETAILS_SELECT} WHERE t.id = ANY($1)")))
                .bind(&keys)
                .fetch_all(&self.pool)
                .await?;
        let mut found: std::collections::HashMap<TrackId, TrackDetails> = rows
            .into_iter()
            .map(|row| TrackDetails::try_from(row).map(|track| (track.id, track)))
            .collect::<Result<_, _>>()?;
        Ok(ids.iter().filter_map(|id| found.remove(id)).collect())
    }

    /// A page of tracks, newest first: those of `owner` (every track when `None`) that
    /// `viewer` may see, starting after the `after` cursor. Others' tracks are listed once
    /// public and playable (a ready revision); the viewer's own tracks always are, in any
    /// state.
    pub async fn page(
        &self,
        owner: Option<UserId>,
        viewer: Option<UserId>,
        after: Option<(DateTime<Utc>, TrackId)>,
        limit: i64,
    ) -> Result<Page, DbError> {
        let limit = limit.clamp(1, 100);
        let rows = sqlx::query_as::<_, DetailsRow>(sqlx::AssertSqlSafe(format!(
            "{DETAILS_SELECT}
             WHERE ($1::uuid IS NULL OR t.owner_id = $1)
               AND (t.owner_id = $2 OR (t.visibility = 'public' AND t.ready_revision IS NOT NULL))
               AND ($3::timestamptz IS NULL OR (t.created_at, t.id) < ($3, $4))
             ORDER BY t.created_at DESC, t.id DESC
             LIMIT $5"
        )))
        .bind(owner)
        .bind(viewer)
        .bind(after.map(|(at, _)| at))
        .bind(after.map(|(_, id)| id))
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut tracks = rows.into_iter().map(TrackDetails::try_from).collect::<Result<Vec<_>, _>>()?;
        let more = tracks.len() as i64 > limit;
        tracks.truncate(limit as usize);
        let next = if more { tracks.last().map(|last| (last.created_at, last.id)) } else { None };
        Ok(Page { tracks, next })
    }

    /// Applies a metadata edit; `false` when the track is gone.
    pub async fn update_metadata(&self, id: TrackId, patch: &TrackPatch) -> Result<bool, DbError> {
        let result = sqlx::query(
            "UPDATE tracks SET
                 title = coalesce($2, title),
                 description = coalesce($3, description),
                 genre = CASE WHEN $4 THEN $5 ELSE genre END,
                 tags = coalesce($6, tags),
                 visibility = coalesce($7, visibility),
                 updated_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .bind(&patch.title)
        .bind(&patch.description)
        .bind(patch.genre.is_some())
        .bind(patch.genre.clone().flatten())
        .bind(&patch.tags)
        .bind(patch.visibility.map(Visibility::as_str))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// What serving `preset` (or only the waveform, with `None`) of a track needs.
    pub async fn playable(&self, id: TrackId, preset: Option<&str>) -> Result<Option<Playable>, DbError> {
        type Row = (
            UserId,
            String,
            String,
            Option<i32>,
            Option<String>,
            Option<Vec<String>>,
            Option<String>,
            Option<String>,
            Option<String>,
            bool,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT t.owner_id, t.visibility, t.state, t.ready_revision, r.storage_key, r.storage_keys,
                    t.waveform_key, t.waveform_dat_key, t.waveform_summary_key, u.suspended_at IS NOT NULL
             FROM tracks t
             JOIN users u ON u.id = t.owner_id
             LEFT JOIN renditions r ON r.track_id = t.id AND r.revision = t.ready_revision AND r.preset = $2
             WHERE t.id = $1",
        )
        .bind(id)
        .bind(preset)
        .fetch_optional(&self.pool)
        .await?;
        let Some((owner_id, visibility, state, ready_revision, key, keys, waveform, dat, summary, owner_suspended)) =
            row
        else {
            return Ok(None);
        };
        Ok(Some(Playable {
            owner_id,
            visibility: Visibility::parse(&visibility)
                .ok_or_else(|| DbError::Invalid(format!("unknown visibility {visibility:?}")))?,
            state: state.parse().map_err(|err: UnknownState| DbError::Invalid(err.to_string()))?,
            ready_revision,
            rendition: key.map(|key| (key, keys.unwrap_or_default())),
            waveform_key: waveform,
            waveform_dat_key: dat,
            waveform_summary_key: summary,
            owner_suspended,
        }))
    }

    /// For the upload quota: whether `owner` is exempt (the system account of operator
    /// imports), and the total duration of their tracks that have not failed, other than
    /// `excluding`, in milliseconds: the decoded duration of processed tracks, the admitted
    /// one of tracks in processing ([`PgTracks::admit`]); tracks not admitted yet count as 0.
    pub async fn quota_usage(&self, owner: UserId, excluding: Option<TrackId>) -> Result<(bool, i64), DbError> {
        let row: Option<(bool, i64)> = sqlx::query_as(
            "SELECT u.role = 'system',
                    coalesce((SELECT sum(coalesce(t.duration_ms, t.admitted_ms)) FROM tracks t
                              WHERE t.owner_id = u.id AND t.state <> 'failed' AND t.id IS DISTINCT FROM $2), 0)::bigint
             FROM users u WHERE u.id = $1",
        )
        .bind(owner)
        .bind(excluding)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or_else(|| DbError::Invalid(format!("no user {owner}")))
    }

    /// Admits `duration_ms` of audio for the track held by `claim` against its owner's quota
    /// of `quota_ms`, atomically per owner: the owner's row stays locked until the decision
    /// commits, so concurrent admissions for one owner (any number of workers) take turns,
    /// and each counts what the others admitted. Admitted, the track's `admitted_ms` holds
    /// `duration_ms` (replacing what an earlier admission of it reserved).
    pub async fn admit(&self, claim: &Claim, duration_ms: i64, quota_ms: i64) -> Result<Admission, DbError> {
        let mut tx = self.pool.begin().await?;
        let owner: Option<(UserId, bool)> = sqlx::query_as(
            "SELECT u.id, u.role = 'system' FROM tracks t JOIN users u ON u.id = t.owner_id
             WHERE t.id = $1 AND t.state = 'processing' AND t.attempts = $2
             FOR UPDATE OF u",
        )
        .bind(claim.track_id)
        .bind(claim.attempt)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((owner, exempt)) = owner else {
            return Ok(Admission::Stale);
        };
        if !exempt {
            let used_ms: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(coalesce(duration_ms, admitted_ms)), 0)::bigint FROM tracks
                 WHERE owner_id = $1 AND state <> 'failed' AND id <> $2",
            )
            .bind(owner)
            .bind(claim.track_id)
            .fetch_one(&mut *tx)
            .await?;
            if used_ms.saturating_add(duration_ms) > quota_ms {
                return Ok(Admission::OverQuota { used_ms });
            }
        }
        sqlx::query("UPDATE tracks SET admitted_ms = $2 WHERE id = $1")
            .bind(claim.track_id)
            .bind(duration_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Admission::Admitted)
    }

    /// The owner of a track.
    pub async fn owner_of(&self, id: TrackId) -> Result<Option<UserId>, DbError> {
        Ok(sqlx::query_scalar("SELECT owner_id FROM tracks WHERE id = $1").bind(id).fetch_optional(&self.pool).await?)
    }

    /// Sets (or, with `None`, clears) the hash of a track's secret share link.
    pub async fn set_share_hash(&self, id: TrackId, hash: Option<&[u8]>) -> Result<bool, DbError> {
        Ok(sqlx::query("UPDATE tracks SET share_hash = $2 WHERE id = $1")
            .bind(id)
            .bind(hash)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1)
    }

    /// The hash of a track's secret share link, if it has one and its owner is not suspended.
    pub async fn share_hash(&self, id: TrackId) -> Result<Option<Vec<u8>>, DbError> {
        Ok(sqlx::query_scalar(
            "SELECT t.share_hash FROM tracks t JOIN users u ON u.id = t.owner_id
             WHERE t.id = $1 AND u.suspended_at IS NULL AND t.share_hash IS NOT NULL",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// Inserts a new track; a queued one is stamped `enqueued_at` (its job goes in the same
/// transaction).
async fn insert_track(
    executor: impl sqlx::PgExecutor<'_>,
    new: &NewTrack,
    state: &str,
    original_size: Option<i64>,
    upload_expires_at: Option<DateTime<Utc>>,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO tracks (id, owner_id, title, description, genre, tags, visibility, state, original_key,
                             original_size, upload_expires_at, enqueued_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, CASE WHEN $8 = 'queued' THEN now() END)",
    )
    .bind(new.id)
    .bind(new.owner)
    .bind(&new.title)
    .bind(&new.description)
    .bind(&new.genre)
    .bind(&new.tags)
    .bind(new.visibility.as_str())
    .bind(state)
    .bind(&new.original_key)
    .bind(original_size)
    .bind(upload_expires_at)
    .execute(executor)
    .await?;
    Ok(())
}
