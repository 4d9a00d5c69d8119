//! Plays and engagement by the hour: counting a batch of plays, the comment buckets, and an
//! owner's statistics per day.
//!
//! A batch of plays is one statement. Within it, a listener's play of a track counts only
//! when its upsert into `play_listeners` wins: the row is new, or its last counted play began
//! at least a dedup window earlier. Replicas flushing at once contend on those rows, and the
//! later one sees the earlier one's play, so every replica's plays add up without counting a
//! listener twice. Counted plays go to the hourly buckets and to `tracks.playback_count` in
//! the same statement, so the counter always equals its buckets. A statement that fails
//! changed nothing and can be retried whole.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::DbError;
use crate::domain::TrackId;

/// One listener starting a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlayEvent {
    pub track: TrackId,
    /// A keyed hash of who listened (the account, or the address and user agent).
    pub listener: [u8; 16],
    /// A play of the 30 s preview, counted apart from full plays.
    pub preview: bool,
    pub at: DateTime<Utc>,
}

/// A track whose counts a batch changed, with its counts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    pub track: TrackId,
    pub playback_count: i64,
    pub preview_playback_count: i64,
}

/// One UTC day of a track's engagement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct DayStats {
    pub day: NaiveDate,
    pub plays: i64,
    pub preview_plays: i64,
    pub likes: i64,
    pub reposts: i64,
    pub comments: i64,
}

/// The most days [`PgPlays::daily`] reports.
pub const MAX_STAT_DAYS: u32 = 365;

/// Plays and engagement buckets in PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgPlays {
    pool: PgPool,
}

impl PgPlays {
    pub fn new(pool: PgPool) -> PgPlays {
        PgPlays { pool }
    }

    /// Counts a batch of plays: at most one per listener, track and kind within `window`
    /// (across batches and replicas); plays of tracks that no longer exist are dropped.
    /// Returns the tracks whose counts changed.
    pub async fn record(&self, plays: &[PlayEvent], window: Duration) -> Result<Vec<Counted>, DbError> {
        if plays.is_empty() {
            return Ok(Vec::new());
        }
        let tracks: Vec<Uuid> = plays.iter().map(|play| play.track.0).collect();
        let listeners: Vec<Vec<u8>> = plays.iter().map(|play| play.listener.to_vec()).collect();
        let previews: Vec<bool> = plays.iter().map(|play| play.preview).collect();
        let times: Vec<DateTime<Utc>> = plays.iter().map(|play| play.at).collect();
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        // Rows are taken in (track, listener) order and tracks in id order, so two replicas'
        // batches lock in the same order and cannot deadlock each other.
        let rows: Vec<(TrackId, i64, i64)> = sqlx::query_as(
            "WITH input AS (
                 SELECT DISTINCT ON (i.track_id, i.listener, i.preview) i.track_id, i.listener, i.preview, i.at
                 FROM unnest($1::uuid[], $2::bytea[], $3::boolean[], $4::timestamptz[])
                      AS i(track_id, listener, preview, at)
                 WHERE EXISTS (SELECT 1 FROM tracks t WHERE t.id = i.track_id)
                 ORDER BY i.track_id, i.listener, i.preview, i.at
             ),
             counted AS (
                 INSERT INTO play_listeners AS pl (track_id, listener, preview, last_at)
                 SELECT track_id, listener, preview, at FROM input
                 ON CONFLICT (track_id, listener, preview) DO UPDATE SET last_at = EXCLUDED.last_at
                     WHERE pl.last_at <= EXCLUDED.last_at - make_interval(secs => $5::double precision / 1000)
                 RETURNING track_id, preview, last_at
             ),
             hours AS (
                 INSERT INTO play_hours AS ph (track_id, hour, plays, preview_plays)
                 SELECT track_id, date_trunc('hour', last_at, 'UTC'),
                        count(*) FILTER (WHERE NOT preview), count(*) FILTER (WHERE preview)
                 FROM counted GROUP BY 1, 2 ORDER BY 1, 2
                 ON CONFLICT (track_id, hour) DO UPDATE
                     SET plays = ph.plays + EXCLUDED.plays, preview_plays = ph.preview_plays + EXCLUDED.preview_plays
             ),
             per_track AS (
                 SELECT track_id, count(*) FILTER (WHERE NOT preview) AS plays,
                        count(*) FILTER (WHERE preview) AS previews
                 FROM counted GROUP BY track_id
             ),
             locked AS (
                 SELECT t.id FROM tracks t WHERE t.id IN (SELECT track_id FROM per_track)
                 ORDER BY t.id FOR NO KEY UPDATE
             )
             UPDATE tracks t
             SET playback_count = t.playback_count + c.plays,
                 preview_playback_count = t.preview_playback_count + c.previews
             FROM per_track c
             WHERE t.id = c.track_id AND t.id IN (SELECT id FROM locked)
             RETURNING t.id, t.playback_count, t.preview_playback_count",
        )
        .bind(&tracks)
        .bind(&listeners)
        .bind(&previews)
        .bind(&times)
        .bind(window_ms as f64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(track, playback_count, preview_playback_count)| Counted {
                track,
                playback_count,
                preview_playback_count,
            })
            .collect())
    }

    /// The play counts of some tracks (tracks that do not exist are absent).
    pub async fn counts(&self, tracks: &[TrackId]) -> Result<Vec<Counted>, DbError> {
        let ids: Vec<Uuid> = tracks.iter().map(|track| track.0).collect();
        let rows: Vec<(TrackId, i64, i64)> =
            sqlx::query_as("SELECT id, playback_count, preview_playback_count FROM tracks WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(track, playback_count, preview_playback_count)| Counted {
                track,
                playback_count,
                preview_playback_count,
            })
            .collect())
    }

    /// Forgets listeners whose last counted play is older than `window` (they would count
    /// again anyway). Returns how many were removed.
    pub async fn forget_listeners(&self, window: Duration) -> Result<u64, DbError> {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let done = sqlx::query(
            "DELETE FROM play_listeners
             WHERE last_at < now() - make_interval(secs => $1::double precision / 1000)",
        )
        .bind(window_ms as f64)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// A comment was made on `track` at `at` (for the charts and the statistics).
    pub async fn comment_made(&self, track: TrackId, at: DateTime<Utc>) -> Result<(), DbError> {
        sqlx::query(
            "INSERT INTO comment_hours AS ch (track_id, hour, comments)
             SELECT id, date_trunc('hour', $2::timestamptz, 'UTC'), 1 FROM tracks WHERE id = $1
             ON CONFLICT (track_id, hour) DO UPDATE SET comments = ch.comments + 1",
        )
        .bind(track)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// `count` comments (a comment and its replies) were deleted from `track`: they are
    /// taken from the hour of the first, made at `at` (never below zero).
    pub async fn comments_deleted(&self, track: TrackId, at: DateTime<Utc>, count: u64) -> Result<(), DbError> {
        sqlx::query(
            "UPDATE comment_hours SET comments = greatest(comments - $3, 0)
             WHERE track_id = $1 AND hour = date_trunc('hour', $2::timestamptz, 'UTC')",
        )
        .bind(track)
        .bind(at)
        .bind(i64::try_from(count).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The last `days` UTC days of a track's engagement, today included, oldest first; days
    /// without any are zeros. Likes and reposts are those that still stand, by the day they
    /// were made.
    pub async fn daily(&self, track: TrackId, days: u32) -> Result<Vec<DayStats>, DbError> {
        let days = i32::try_from(days.clamp(1, MAX_STAT_DAYS)).unwrap_or(30);
        Ok(sqlx::query_as::<_, DayStats>(
            "WITH span AS (
                 SELECT (now() AT TIME ZONE 'UTC')::date - ($2 - 1) AS first,
                        (now() AT TIME ZONE 'UTC')::date AS last
             ),
             days AS (
                 SELECT d::date AS day FROM span, generate_series(span.first, span.last, interval '1 day') AS d
             ),
             since AS (SELECT (first::timestamp AT TIME ZONE 'UTC') AS at FROM span)
             SELECT days.day,
                 coalesce(p.plays, 0)::bigint AS plays, coalesce(p.preview_plays, 0)::bigint AS preview_plays,
                 coalesce(l.n, 0)::bigint AS likes, coalesce(r.n, 0)::bigint AS reposts,
                 coalesce(c.n, 0)::bigint AS comments
             FROM days
             LEFT JOIN (
                 SELECT (hour AT TIME ZONE 'UTC')::date AS day, sum(plays) AS plays, sum(preview_plays) AS preview_plays
                 FROM play_hours, since WHERE track_id = $1 AND hour >= since.at GROUP BY 1
             ) p USING (day)
             LEFT JOIN (
                 SELECT (created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS n
                 FROM track_likes, since WHERE track_id = $1 AND created_at >= since.at GROUP BY 1
             ) l USING (day)
             LEFT JOIN (
                 SELECT (created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS n
                 FROM track_reposts, since WHERE track_id = $1 AND created_at >= since.at GROUP BY 1
             ) r USING (day)
             LEFT JOIN (
                 SELECT (hour AT TIME ZONE 'UTC')::date AS day, sum(comments) AS n
                 FROM comment_hours, since WHERE track_id = $1 AND hour >= since.at GROUP BY 1
             ) c USING (day)
             ORDER BY days.day",
        )
        .bind(track)
        .bind(days)
        .fetch_all(&self.pool)
        .await?)
    }
}
