//! The charts: `GET /v1/charts/trending` (new & hot) and `GET /v1/charts/top`.
//!
//! Both read the table that the scheduled computation writes
//! ([`waveline_shared::charts`]); nothing is scored per request. Pages are in score order,
//! ties by track id, with a keyset cursor, so paging is stable until the next computation.
//! A track made private, deleted or whose owner was suspended since the computation is left
//! out at once; for a signed-in viewer, so are the tracks of accounts in a block with them
//! (the others keep their ranks).

use chrono::{DateTime, Utc};
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use waveline_shared::charts::{Chart, decode_cursor, encode_cursor};

use crate::auth::MaybeAuth;
use crate::error::ApiError;
use crate::tracks::TrackView;
use crate::{AppState, social};

#[derive(Tags)]
enum Tag {
    /// Trending and the top charts, computed on a schedule.
    Charts,
}

/// The chart routes.
#[derive(Debug)]
pub struct ChartsApi {
    pub state: AppState,
}

/// The period of a top chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum Period {
    /// The last 7 days.
    Week,
    /// The last 30 days.
    Month,
    /// All time.
    All,
}

/// A page of a chart.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct ChartPage {
    /// Best first.
    tracks: Vec<ChartTrack>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
    /// When the chart was computed; absent before the first computation.
    computed_at: Option<DateTime<Utc>>,
}

/// A track in a chart.
#[derive(Debug, Object)]
struct ChartTrack {
    /// Its place, from 1, within this ranking (all genres, or the genre asked for).
    rank: u32,
    /// Its score (README: "Trending and charts").
    score: f64,
    track: TrackView,
}

/// The most genre characters a query may name.
const MAX_GENRE: usize = 100;

#[OpenApi(tag = "Tag::Charts")]
impl ChartsApi {
    /// New & hot: public tracks up to 30 days old, by engagement in the last 7 days with a
    /// time decay (README: "Trending and charts"). `genre` (case-insensitive) narrows it to
    /// one genre; `limit` is 1–100 (default 20).
    #[oai(path = "/v1/charts/trending", method = "get")]
    async fn trending(
        &self,
        genre: Query<Option<String>>,
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))] limit: Query<Option<i64>>,
        cursor: Query<Option<String>>,
        auth: MaybeAuth,
    ) -> Result<Json<ChartPage>, ApiError> {
        self.page(Chart::Trending, genre.0, limit.0, cursor.0, &auth).await
    }

    /// The most engaged-with public tracks of the last week, month or of all time.
    #[oai(path = "/v1/charts/top", method = "get")]
    async fn top(
        &self,
        genre: Query<Option<String>>,
        /// `week` (the default), `month` or `all`.
        period: Query<Option<Period>>,
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))] limit: Query<Option<i64>>,
        cursor: Query<Option<String>>,
        auth: MaybeAuth,
    ) -> Result<Json<ChartPage>, ApiError> {
        let chart = match period.0.unwrap_or(Period::Week) {
            Period::Week => Chart::TopWeek,
            Period::Month => Chart::TopMonth,
            Period::All => Chart::TopAll,
        };
        self.page(chart, genre.0, limit.0, cursor.0, &auth).await
    }
}

impl ChartsApi {
    async fn page(
        &self,
        chart: Chart,
        genre: Option<String>,
        limit: Option<i64>,
        cursor: Option<String>,
        auth: &MaybeAuth,
    ) -> Result<Json<ChartPage>, ApiError> {
        let limit = social::page_limit(limit)?;
        if let Some(genre) = &genre
            && (genre.chars().count() > MAX_GENRE || genre.chars().any(char::is_control))
        {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!("genre: at most {MAX_GENRE} characters, no control characters"),
            ));
        }
        let after = match cursor.as_deref() {
            None => None,
            Some(text) => Some(
                decode_cursor(text)
                    .ok_or_else(|| ApiError::bad_request("invalid_cursor", "the cursor is not one this chart gave"))?,
            ),
        };
        let genre = genre.as_deref().map(str::trim).filter(|genre| !genre.is_empty());
        let charts = &self.state.charts;
        // One more than asked, to know whether a next page exists.
        let mut entries = charts.page(chart, genre, after, limit + 1).await?;
        let more = entries.len() as i64 > limit;
        entries.truncate(usize::try_from(limit).unwrap_or(0));
        let first_rank = match after {
            None => 1,
            Some((score, track)) => charts.rank_after(chart, genre, score, track).await? + 1,
        };
        let ids: Vec<_> = entries.iter().map(|(id, _)| *id).collect();
        let mut tracks = self.state.tracks.details_many(&ids).await?;
        // The charts are everyone's, less the accounts in a block with the viewer.
        if let Some(session) = auth.session() {
            let blocked = self.state.social.blocked_either_way(session.user.id).await?;
            tracks.retain(|track| !blocked.contains(&track.owner_id));
        }
        let views = social::track_views(&self.state, tracks, auth.session()).await?;
        let mut views: std::collections::HashMap<String, TrackView> =
            views.into_iter().map(|view| (view.id().to_owned(), view)).collect();
        let mut listed = Vec::with_capacity(entries.len());
        for (offset, (id, score)) in entries.iter().enumerate() {
            // A track deleted between the two reads is left out.
            if let Some(track) = views.remove(&id.to_string()) {
                listed.push(ChartTrack { rank: first_rank + offset as u32, score: *score, track });
            }
        }
        let next_cursor = if more { entries.last().map(|(id, score)| encode_cursor(*score, *id)) } else { None };
        let computed_at = charts.last_run().await?.map(|run| run.computed_at);
        Ok(Json(ChartPage { tracks: listed, next_cursor, computed_at }))
    }
}
