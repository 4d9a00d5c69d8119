//! Play counting, and the owner's statistics (`GET /v1/tracks/{id}/stats`).
//!
//! **What counts.** A listener starts a stream: a progressive `GET` whose range starts at
//! byte 0 (or that has no range), or the first media segment of an HLS variant (in redirect
//! mode, where segments are fetched from storage, the variant playlist). `HEAD`
//! requests, ranges from elsewhere (seeks, a player's later chunks), playlists and init
//! segments do not. Plays of the 30 s `preview` are counted apart (`preview_playback_count`).
//! The owner's own plays do not count.
//!
//! **Who listens.** The account when signed in, else the client's address (after trusted
//! proxies) and user agent, as a keyed hash: the raw address is never stored. A listener's
//! plays of a track count once per `play_dedup_s` (30 min).
//!
//! **Batching.** The listening routes only push the play into this process's buffer (a
//! mutex and a vector); a task writes the buffer in one statement every `plays_flush_ms`
//! (1 s), or at once when 1000 plays wait. Deduplication happens in that statement, against
//! every replica's plays ([`waveline_shared::db::plays`]); a local memory of recent listeners
//! only spares the database the obvious repeats. When the database cannot be reached the
//! plays stay buffered (at most [`MAX_BUFFERED`]; beyond it new plays are dropped and
//! counted in `waveline_plays_dropped_total`) and go with the next flush. A crash loses at
//! most one flush interval; a graceful stop writes the buffer first.
//!
//! After each flush the changed tracks' counts go to their watchers as `counters` frames.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use poem::Request;
use poem::http::Method;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use tokio_util::sync::CancellationToken;
use waveline_shared::db::plays::{Counted, MAX_STAT_DAYS, PgPlays, PlayEvent};
use waveline_shared::domain::{TrackId, UserId};

use crate::auth::Auth;
use crate::error::ApiError;
use crate::{AppState, parse_track_id};

/// A flush starts at once when this many plays wait.
pub const FLUSH_AT: usize = 1000;
/// The most plays buffered while the database is away.
pub const MAX_BUFFERED: usize = 100_000;
/// The most listeners this process remembers to skip repeats.
const RECENT_MAX: usize = 100_000;

/// A play's identity for deduplication: the track, the listener, whether a preview.
type PlayKey = (TrackId, [u8; 16], bool);

/// This process's play buffer.
#[derive(Debug)]
pub struct PlayCounter {
    db: PgPlays,
    window: Duration,
    flush_every: Duration,
    buffer: Mutex<Vec<PlayEvent>>,
    /// (track, listener, preview) → when its play was buffered.
    recent: Mutex<HashMap<PlayKey, Instant>>,
    wake: tokio::sync::Notify,
}

/// What a listening request is, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A progressive stream of this preset.
    Progressive { preview: bool },
    /// An HLS file: the first media segment of a variant starts a play.
    HlsSegment,
    /// An HLS file in redirect mode, where variant playlists name storage URLs for the
    /// segments: fetching a variant playlist starts a play.
    HlsRewrittenPlaylist,
}

impl PlayCounter {
    /// The plays' tables.
    pub fn db(&self) -> &PgPlays {
        &self.db
    }

    pub fn new(db: PgPlays, window: Duration, flush_every: Duration) -> PlayCounter {
        PlayCounter {
            db,
            window,
            flush_every,
            buffer: Mutex::new(Vec::new()),
            recent: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Buffers a play unless this process counted the same one within the window.
    pub fn push(&self, track: TrackId, listener: [u8; 16], preview: bool) {
        let now = Instant::now();
        {
            let mut recent = Self::lock(&self.recent);
            if recent.get(&(track, listener, preview)).is_some_and(|at| now.duration_since(*at) < self.window) {
                metrics::counter!("waveline_plays_total", "outcome" => "repeat").increment(1);
                return;
            }
            if recent.len() >= RECENT_MAX {
                recent.retain(|_, at| now.duration_since(*at) < self.window);
                if recent.len() >= RECENT_MAX {
                    recent.clear();
                }
            }
            recent.insert((track, listener, preview), now);
        }
        let waiting = {
            let mut buffer = Self::lock(&self.buffer);
            if buffer.len() >= MAX_BUFFERED {
                metrics::counter!("waveline_plays_dropped_total").increment(1);
                return;
            }
            buffer.push(PlayEvent { track, listener, preview, at: Utc::now() });
            buffer.len()
        };
        metrics::counter!("waveline_plays_total", "outcome" => "buffered").increment(1);
        if waiting >= FLUSH_AT {
            self.wake.notify_one();
        }
    }

    /// Writes what is buffered; on failure puts it back for the next flush.
    pub async fn flush(&self) -> Result<Vec<Counted>, waveline_shared::db::DbError> {
        let batch = std::mem::take(&mut *Self::lock(&self.buffer));
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match self.db.record(&batch, self.window).await {
            Ok(counted) => {
                metrics::counter!("waveline_plays_flushed_total").increment(batch.len() as u64);
                tracing::debug!(plays = batch.len(), tracks = counted.len(), "plays written");
                Ok(counted)
            }
            Err(err) => {
                let mut buffer = Self::lock(&self.buffer);
                let room = MAX_BUFFERED.saturating_sub(buffer.len());
                let kept = batch.len().min(room);
                if kept < batch.len() {
                    metrics::counter!("waveline_plays_dropped_total").increment((batch.len() - kept) as u64);
                }
                // The older plays first, as they were.
                let newer = std::mem::take(&mut *buffer);
                buffer.extend(batch.into_iter().take(kept));
                buffer.extend(newer);
                Err(err)
            }
        }
    }

    /// Flushes every `plays_flush_ms`, or when [`FLUSH_AT`] plays wait, until `stop`; then
    /// once more. Each flush's changed counts go to the tracks' watchers.
    pub fn start(state: &AppState, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let state = state.clone();
        tokio::spawn(async move {
            let counter = state.plays.clone();
            loop {
                let stopping = tokio::select! {
                    () = stop.cancelled() => true,
                    () = tokio::time::sleep(counter.flush_every) => false,
                    () = counter.wake.notified() => false,
                };
                match counter.flush().await {
                    Ok(counted) => crate::realtime::publish_play_counts(&state, counted),
                    Err(err) => tracing::warn!(error = %err, "cannot write plays now; they wait for the next flush"),
                }
                if stopping {
                    break;
                }
            }
        })
    }
}

impl AppState {
    /// Counts a play if this request starts one (see the module doc). `owner` is the track's.
    pub(crate) fn count_play(
        &self,
        req: &Request,
        track: TrackId,
        owner: UserId,
        viewer: Option<UserId>,
        start: Start,
        file: Option<&str>,
    ) {
        if req.method() != Method::GET || viewer == Some(owner) {
            return;
        }
        let preview = match start {
            Start::Progressive { preview } => {
                if !range_starts_at_zero(req.headers().get(poem::http::header::RANGE)) {
                    return;
                }
                preview
            }
            Start::HlsSegment => {
                if !file.is_some_and(is_first_segment) {
                    return;
                }
                false
            }
            Start::HlsRewrittenPlaylist => {
                if !file.is_some_and(|file| file.ends_with(".m3u8")) {
                    return;
                }
                false
            }
        };
        let listener = match viewer {
            Some(user) => self.tokens.listener_hash(&[b"account", user.0.as_bytes()]),
            None => {
                let address =
                    req.data::<crate::throttle::ClientAddr>().map(|client| client.0.to_string()).unwrap_or_default();
                let agent = req.headers().get(poem::http::header::USER_AGENT).map(|v| v.as_bytes()).unwrap_or_default();
                self.tokens.listener_hash(&[b"address", address.as_bytes(), agent])
            }
        };
        self.plays.push(track, listener, preview);
    }
}

/// Whether a `Range` header (or its absence) asks for the stream from its first byte.
pub fn range_starts_at_zero(range: Option<&poem::http::HeaderValue>) -> bool {
    let Some(range) = range else {
        return true;
    };
    let Ok(text) = range.to_str() else {
        return false;
    };
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return false;
    };
    spec.split(',').next().and_then(|first| first.trim().split_once('-')).is_some_and(|(start, _)| {
        let start = start.trim();
        !start.is_empty() && start.bytes().all(|b| b == b'0')
    })
}

/// Whether an HLS file name is a variant's first media segment (`seg_00000.m4s`, `…0.ts`):
/// the first run of digits in its stem is zero.
pub fn is_first_segment(file: &str) -> bool {
    let Some((stem, extension)) = file.rsplit_once('.') else {
        return false;
    };
    if !matches!(extension, "m4s" | "ts" | "aac" | "mp4") || stem.starts_with("init") {
        return false;
    }
    let digits: String = stem.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    !digits.is_empty() && digits.bytes().all(|b| b == b'0')
}

#[derive(Tags)]
enum Tag {
    /// Plays and engagement statistics.
    Stats,
}

/// The statistics route.
#[derive(Debug)]
pub struct Stats {
    pub state: AppState,
}

/// One UTC day of a track's engagement.
#[derive(Debug, Object)]
struct DayView {
    /// The UTC day, `YYYY-MM-DD`.
    day: NaiveDate,
    /// Plays that began this day.
    plays: i64,
    /// Plays of the 30 s preview.
    preview_plays: i64,
    /// Likes made this day that still stand.
    likes: i64,
    /// Reposts made this day that still stand.
    reposts: i64,
    /// Comments made this day (deleted ones taken back).
    comments: i64,
}

/// A track's engagement per day.
#[derive(Debug, Object)]
struct TrackStats {
    track_id: String,
    /// Every counted play, all time.
    playback_count: i64,
    preview_playback_count: i64,
    /// The last `days` UTC days, oldest first, today included.
    days: Vec<DayView>,
}

#[OpenApi(tag = "Tag::Stats")]
impl Stats {
    /// A track's plays, likes, reposts and comments per UTC day, for its owner (and admins):
    /// the last `days` days (1–365, default 30), today included.
    #[oai(path = "/v1/tracks/:id/stats", method = "get")]
    async fn stats(
        &self,
        id: Path<String>,
        #[oai(validator(minimum(value = "1"), maximum(value = "365")))] days: Query<Option<u32>>,
        auth: Auth,
    ) -> Result<Json<TrackStats>, ApiError> {
        let days = days.0.unwrap_or(30);
        if !(1..=MAX_STAT_DAYS).contains(&days) {
            return Err(ApiError::bad_request("invalid_field", format!("days: 1 to {MAX_STAT_DAYS}, got {days}")));
        }
        let id = parse_track_id(&id)?;
        let session = auth.session();
        let owner = self.state.tracks.owner_of(id).await?.ok_or_else(|| ApiError::not_found("track"))?;
        if owner != session.user.id && !session.is_admin() {
            // Others' tracks look absent here, whether or not they could see them.
            return Err(ApiError::not_found("track"));
        }
        let counts = self.state.plays.db.counts(&[id]).await?;
        let counted = counts.first().copied().ok_or_else(|| ApiError::not_found("track"))?;
        let rows = self.state.plays.db.daily(id, days).await?;
        Ok(Json(TrackStats {
            track_id: id.to_string(),
            playback_count: counted.playback_count,
            preview_playback_count: counted.preview_playback_count,
            days: rows
                .into_iter()
                .map(|row| DayView {
                    day: row.day,
                    plays: row.plays,
                    preview_plays: row.preview_plays,
                    likes: row.likes,
                    reposts: row.reposts,
                    comments: row.comments,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(text: &str) -> poem::http::HeaderValue {
        poem::http::HeaderValue::from_str(text).unwrap_or_else(|_| poem::http::HeaderValue::from_static("x"))
    }

    #[test]
    fn a_play_starts_at_byte_zero() {
        assert!(range_starts_at_zero(None));
        for yes in ["bytes=0-", "bytes=0-65535", "bytes=00-1", " bytes=0-10, 20-30"] {
            assert!(range_starts_at_zero(Some(&range(yes))), "{yes}");
        }
        for no in ["bytes=1-", "bytes=65536-131071", "bytes=-500", "items=0-1", "bytes=", "bytes=x-1", "0-1"] {
            assert!(!range_starts_at_zero(Some(&range(no))), "{no}");
        }
    }

    #[test]
    fn only_a_variants_first_media_segment_starts_a_play() {
        for yes in ["seg_00000.m4s", "segment0.ts", "000.m4s"] {
            assert!(is_first_segment(yes), "{yes}");
        }
        for no in ["seg_00001.m4s", "init.mp4", "playlist.m3u8", "seg_10.m4s", "seg.m4s", "seg_00000", ""] {
            assert!(!is_first_segment(no), "{no}");
        }
    }
}
