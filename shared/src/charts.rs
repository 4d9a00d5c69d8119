//! Trending and the top charts, computed on a schedule.
//!
//! Every `serve` and `worker` process runs the same `clokwerk` schedule. A tick is the
//! interval's number since the Unix epoch (`charts_interval_s`, 600 by default): whichever
//! process ticks first in an interval takes a PostgreSQL advisory lock, sees that nobody has
//! computed this tick yet (`chart_runs`), and computes; every other process that ticks in the
//! same interval finds the tick done (or the lock held) and skips. So exactly one process
//! computes each tick, whichever processes are up, and when the computing process dies its
//! transaction ends and the next tick is computed by someone else.
//!
//! A computation replaces every chart in one transaction: readers see the previous charts
//! until it commits. [`Scores`] has the formula; the README explains it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::DbError;
use crate::domain::TrackId;

/// The advisory lock key of the charts computation ("wl-chart" in ASCII).
const LOCK_KEY: i64 = 0x776c_2d63_6861_7274;

/// How many tracks each ranking keeps: over all genres, and within one genre.
pub const KEEP_ALL: i64 = 1000;
pub const KEEP_PER_GENRE: i64 = 200;

/// New & hot: tracks this young at most.
pub const TRENDING_MAX_AGE_DAYS: i64 = 30;
/// The sliding window of trending's engagement.
pub const TRENDING_WINDOW_DAYS: i64 = 7;

/// A chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chart {
    /// New & hot: engagement velocity with time decay.
    Trending,
    TopWeek,
    TopMonth,
    TopAll,
}

impl Chart {
    pub const ALL: [Chart; 4] = [Chart::Trending, Chart::TopWeek, Chart::TopMonth, Chart::TopAll];

    pub fn as_str(self) -> &'static str {
        match self {
            Chart::Trending => "trending",
            Chart::TopWeek => "top_week",
            Chart::TopMonth => "top_month",
            Chart::TopAll => "top_all",
        }
    }

    /// The engagement window, in days (`None`: all time).
    fn window_days(self) -> Option<i64> {
        match self {
            Chart::Trending => Some(TRENDING_WINDOW_DAYS),
            Chart::TopWeek => Some(7),
            Chart::TopMonth => Some(30),
            Chart::TopAll => None,
        }
    }
}

/// The weights of the score (`trending_weight_*` settings) and trending's half-life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    pub plays: f64,
    pub likes: f64,
    pub reposts: f64,
    pub comments: f64,
    /// Trending only: every repost the track ever had, undecayed.
    pub reposts_all_time: f64,
    /// Trending only: an engagement counts half as much this many hours later.
    pub half_life_hours: f64,
}

impl Default for Scores {
    /// Audius's published reference for the first three (a windowed repost weighs 50 plays, a
    /// save one, an all-time repost a quarter); a comment, which costs a listener more than a
    /// like, weighs 5.
    fn default() -> Scores {
        Scores { plays: 1.0, likes: 1.0, reposts: 50.0, comments: 5.0, reposts_all_time: 0.25, half_life_hours: 48.0 }
    }
}

/// What a computation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub tick: i64,
    pub computed_at: DateTime<Utc>,
    pub duration: Duration,
    /// Rows written over every chart and genre.
    pub entries: u64,
}

/// Why a tick did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// Another process holds the lock (it is computing).
    Busy,
    /// This tick is computed already.
    Done,
}

/// The charts' computation and reading.
#[derive(Debug, Clone)]
pub struct Charts {
    pool: PgPool,
    scores: Scores,
    interval: Duration,
    /// Names the process in `chart_runs`.
    process: String,
}

impl Charts {
    pub fn new(pool: PgPool, scores: Scores, interval: Duration, process: impl Into<String>) -> Charts {
        Charts { pool, scores, interval, process: process.into() }
    }

    /// The tick `at` falls in.
    pub fn tick_at(&self, at: DateTime<Utc>) -> i64 {
        let secs = i64::try_from(self.interval.as_secs().max(1)).unwrap_or(i64::MAX);
        at.timestamp().div_euclid(secs)
    }

    /// The scheduled computation: computes this tick unless another process is computing or
    /// has computed it.
    pub async fn tick(&self) -> Result<Result<Run, Skipped>, DbError> {
        self.compute(false, &|_, _| {}).await
    }

    /// Computes now, whatever the tick (waiting for a computation in progress to end);
    /// `progress(done, total)` hears each chart as it is written.
    pub async fn rebuild(&self, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<Run, DbError> {
        match self.compute(true, progress).await? {
            Ok(run) => Ok(run),
            // A forced computation waits for the lock and never finds its work done.
            Err(skipped) => Err(DbError::Invalid(format!("the charts computation was skipped ({skipped:?})"))),
        }
    }

    async fn compute(
        &self,
        force: bool,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Result<Run, Skipped>, DbError> {
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        if force {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(LOCK_KEY).execute(&mut *tx).await?;
        } else {
            let locked: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(LOCK_KEY).fetch_one(&mut *tx).await?;
            if !locked {
                return Ok(Err(Skipped::Busy));
            }
        }
        // The database's clock, so that every process agrees on the tick.
        let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut *tx).await?;
        let tick = self.tick_at(now);
        if !force {
            let done: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM chart_runs WHERE tick >= $1)")
                .bind(tick)
                .fetch_one(&mut *tx)
                .await?;
            if done {
                return Ok(Err(Skipped::Done));
            }
        }
        sqlx::query("DELETE FROM chart_entries").execute(&mut *tx).await?;
        let mut entries = 0u64;
        let total = Chart::ALL.len();
        for (done, chart) in Chart::ALL.into_iter().enumerate() {
            entries += self.write_chart(&mut tx, chart).await?;
            progress(done + 1, total);
        }
        let duration = started.elapsed();
        sqlx::query(
            "INSERT INTO chart_runs (tick, computed_at, duration_ms, entries, computed_by)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tick) DO UPDATE SET computed_at = EXCLUDED.computed_at,
                 duration_ms = EXCLUDED.duration_ms, entries = EXCLUDED.entries, computed_by = EXCLUDED.computed_by",
        )
        .bind(tick)
        .bind(now)
        .bind(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
        .bind(i64::try_from(entries).unwrap_or(i64::MAX))
        .bind(&self.process)
        .execute(&mut *tx)
        .await?;
        // Only the last few runs are worth keeping.
        sqlx::query("DELETE FROM chart_runs WHERE tick < $1 - 1000").bind(tick).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(Ok(Run { tick, computed_at: now, duration: started.elapsed(), entries }))
    }

    /// Scores every eligible track for `chart` and keeps the best of each ranking.
    async fn write_chart(&self, tx: &mut sqlx::PgConnection, chart: Chart) -> Result<u64, DbError> {
        let s = &self.scores;
        let trending = chart == Chart::Trending;
        // Without a window, all time; without decay (the top charts), every engagement in the
        // window weighs its weight.
        let since_days = chart.window_days();
        let half_life = trending.then_some(s.half_life_hours);
        let max_age_days = trending.then_some(TRENDING_MAX_AGE_DAYS);
        let reposts_all_time = if trending { s.reposts_all_time } else { 0.0 };
        let done = sqlx::query(
            "WITH eligible AS (
                 SELECT t.id, lower(btrim(coalesce(t.genre, ''))) AS genre
                 FROM tracks t JOIN users u ON u.id = t.owner_id
                 WHERE t.visibility = 'public' AND t.ready_revision IS NOT NULL AND u.suspended_at IS NULL
                   AND ($2::bigint IS NULL OR t.created_at >= now() - make_interval(days => $2::int))
             ),
             since AS (
                 SELECT CASE WHEN $3::bigint IS NULL THEN '-infinity'::timestamptz
                             ELSE now() - make_interval(days => $3::int) END AS at
             ),
             events AS (
                 SELECT track_id, hour AS at, plays * $5::float8 AS weight
                     FROM play_hours, since WHERE hour >= since.at AND plays > 0
                 UNION ALL
                 SELECT track_id, created_at, $6::float8 FROM track_likes, since WHERE created_at >= since.at
                 UNION ALL
                 SELECT track_id, created_at, $7::float8 FROM track_reposts, since WHERE created_at >= since.at
                 UNION ALL
                 SELECT track_id, hour, comments * $8::float8
                     FROM comment_hours, since WHERE hour >= since.at AND comments > 0
             ),
             windowed AS (
                 SELECT track_id,
                        sum(weight * CASE WHEN $4::float8 IS NULL THEN 1
                                          ELSE power(0.5, greatest(extract(epoch FROM now() - at), 0) / 3600 / $4::float8)
                                     END) AS score
                 FROM events GROUP BY track_id
             ),
             all_time AS (
                 SELECT track_id, count(*) * $9::float8 AS score FROM track_reposts
                 WHERE $9::float8 > 0 GROUP BY track_id
             ),
             scored AS (
                 SELECT e.id, e.genre, coalesce(w.score, 0) + coalesce(a.score, 0) AS score
                 FROM eligible e
                 LEFT JOIN windowed w ON w.track_id = e.id
                 LEFT JOIN all_time a ON a.track_id = e.id
                 WHERE w.score > 0 OR a.score > 0
             ),
             ranked AS (
                 SELECT id, genre, score,
                        row_number() OVER (ORDER BY score DESC, id) AS overall,
                        row_number() OVER (PARTITION BY genre ORDER BY score DESC, id) AS within
                 FROM scored
             )
             INSERT INTO chart_entries (chart, genre, track_id, score)
             SELECT $1, '', id, score FROM ranked WHERE overall <= $10
             UNION ALL
             SELECT $1, genre, id, score FROM ranked WHERE within <= $11 AND genre <> ''",
        )
        .bind(chart.as_str())
        .bind(max_age_days)
        .bind(since_days)
        .bind(half_life)
        .bind(s.plays)
        .bind(s.likes)
        .bind(s.reposts)
        .bind(s.comments)
        .bind(reposts_all_time)
        .bind(KEEP_ALL)
        .bind(KEEP_PER_GENRE)
        .execute(&mut *tx)
        .await?;
        Ok(done.rows_affected())
    }

    /// A page of a chart, best first (ties by track id), after the `after` keyset: only
    /// tracks that are public, ready and of an account in good standing now (a track made
    /// private since the computation leaves its chart at once).
    pub async fn page(
        &self,
        chart: Chart,
        genre: Option<&str>,
        after: Option<(f64, TrackId)>,
        limit: i64,
    ) -> Result<Vec<(TrackId, f64)>, DbError> {
        let genre = genre.map(|genre| genre.trim().to_lowercase()).unwrap_or_default();
        let (after_score, after_id) = after.map_or((None, None), |(score, id)| (Some(score), Some(id.0)));
        let rows: Vec<(TrackId, f64)> = sqlx::query_as(
            "SELECT c.track_id, c.score
             FROM chart_entries c
             JOIN tracks t ON t.id = c.track_id
             JOIN users u ON u.id = t.owner_id
             WHERE c.chart = $1 AND c.genre = $2
               AND t.visibility = 'public' AND t.ready_revision IS NOT NULL AND u.suspended_at IS NULL
               AND ($3::float8 IS NULL OR (c.score < $3 OR (c.score = $3 AND c.track_id > $4)))
             ORDER BY c.score DESC, c.track_id
             LIMIT $5",
        )
        .bind(chart.as_str())
        .bind(genre)
        .bind(after_score)
        .bind(after_id)
        .bind(limit.clamp(1, 100))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// How many entries of a chart's ranking come before or at `(score, track)` (what
    /// [`Charts::page`] would have listed up to that keyset).
    pub async fn rank_after(
        &self,
        chart: Chart,
        genre: Option<&str>,
        score: f64,
        track: TrackId,
    ) -> Result<u32, DbError> {
        let genre = genre.map(|genre| genre.trim().to_lowercase()).unwrap_or_default();
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*)
             FROM chart_entries c
             JOIN tracks t ON t.id = c.track_id
             JOIN users u ON u.id = t.owner_id
             WHERE c.chart = $1 AND c.genre = $2
               AND t.visibility = 'public' AND t.ready_revision IS NOT NULL AND u.suspended_at IS NULL
               AND (c.score > $3 OR (c.score = $3 AND c.track_id <= $4))",
        )
        .bind(chart.as_str())
        .bind(genre)
        .bind(score)
        .bind(track.0)
        .fetch_one(&self.pool)
        .await?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    }

    /// When the charts were last computed.
    pub async fn last_run(&self) -> Result<Option<Run>, DbError> {
        let row: Option<(i64, DateTime<Utc>, i64, i64)> = sqlx::query_as(
            "SELECT tick, computed_at, duration_ms, entries FROM chart_runs ORDER BY computed_at DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(tick, computed_at, duration_ms, entries)| Run {
            tick,
            computed_at,
            duration: Duration::from_millis(u64::try_from(duration_ms).unwrap_or(0)),
            entries: u64::try_from(entries).unwrap_or(0),
        }))
    }
}

/// Runs the charts schedule until `stop` resolves: every `interval` (from the process's
/// start), a [`Charts::tick`]; after a computed tick, listeners older than `dedup_window` are
/// forgotten. `/metrics` shows `waveline_charts_ticks_total{outcome}` and, from the process
/// that computed, `waveline_charts_last_run_timestamp_seconds` and
/// `waveline_charts_last_run_duration_seconds`.
pub fn spawn_schedule(
    charts: Arc<Charts>,
    plays: crate::db::plays::PgPlays,
    dedup_window: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use clokwerk::{AsyncScheduler, TimeUnits as _};
    let mut scheduler = AsyncScheduler::with_tz(Utc);
    let every = u32::try_from(charts.interval.as_secs().max(1)).unwrap_or(u32::MAX);
    scheduler.every(every.seconds()).run(move || {
        let charts = charts.clone();
        let plays = plays.clone();
        async move { run_tick(&charts, &plays, dedup_window).await }
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            scheduler.run_pending().await;
        }
    })
}

async fn run_tick(charts: &Charts, plays: &crate::db::plays::PgPlays, dedup_window: Duration) {
    let outcome = match charts.tick().await {
        Ok(Ok(run)) => {
            metrics::gauge!("waveline_charts_last_run_timestamp_seconds").set(run.computed_at.timestamp() as f64);
            metrics::gauge!("waveline_charts_last_run_duration_seconds").set(run.duration.as_secs_f64());
            tracing::info!(
                tick = run.tick,
                entries = run.entries,
                duration_ms = run.duration.as_millis() as u64,
                "charts computed"
            );
            if let Err(err) = plays.forget_listeners(dedup_window).await {
                tracing::warn!(error = %err, "cannot forget old play listeners");
            }
            "computed"
        }
        Ok(Err(Skipped::Busy)) => "busy",
        Ok(Err(Skipped::Done)) => "done",
        Err(err) => {
            tracing::warn!(error = %err, "the charts computation failed; the next tick tries again");
            "failed"
        }
    };
    metrics::counter!("waveline_charts_ticks_total", "outcome" => outcome).increment(1);
}

/// A chart page's keyset cursor: the last entry's score (its exact bits) and track.
pub fn encode_cursor(score: f64, track: TrackId) -> String {
    format!("{:016x}{}", score.to_bits(), track.0.simple())
}

/// Reads [`encode_cursor`]'s text; `None` when it is not one.
pub fn decode_cursor(text: &str) -> Option<(f64, TrackId)> {
    if text.len() != 48 || !text.is_ascii() {
        return None;
    }
    let bits = u64::from_str_radix(&text[..16], 16).ok()?;
    let score = f64::from_bits(bits);
    let id = Uuid::try_parse(&text[16..]).ok()?;
    score.is_finite().then_some((score, TrackId(id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let track = TrackId(Uuid::now_v7());
        for score in [0.0, 1.5, 123_456.789, f64::MIN_POSITIVE] {
            assert_eq!(decode_cursor(&encode_cursor(score, track)), Some((score, track)));
        }
        assert_eq!(decode_cursor(""), None);
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor(&format!("{:016x}{}", f64::NAN.to_bits(), track.0.simple())), None);
        assert_eq!(decode_cursor(&"é".repeat(24)), None);
        let mut bad = encode_cursor(1.0, track);
        bad.replace_range(20..21, "g");
        assert_eq!(decode_cursor(&bad), None);
    }
}
