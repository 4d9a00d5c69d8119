//! The activity feed (documents): what the accounts you follow posted and reposted.
//!
//! **Fan-out on read.** An activity is written once, under its actor (see
//! [`waveline_shared::documents`]); a feed page merges the newest activities of the accounts
//! the viewer follows (at most 10,000), by one index walk per account. So an account with
//! 100,000 followers posting costs one write, the same as any other, and a feed never holds a
//! stale copy of anything: an unfollow, a block, a track turned private or deleted shows on
//! the next page, because nothing was copied. The price is paid on read, where it is bounded
//! by the followings (measured in BENCHMARKS.md).
//!
//! Each page is then filtered for the viewer:
//!
//! - an object the viewer may no longer see (private now, deleted) drops out;
//! - so does anything by, or of, an account that blocks the viewer or that the viewer blocks;
//! - an object appears once, at its newest activity among the accounts followed: a track
//!   reposted by several of them shows at the latest repost, and not again further down.
//!
//! Filtering can leave a page short; the feed reads on (a few rounds) to fill it, and a short
//! page with a `next_cursor` means there is more to read.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use waveline_shared::documents::{Activity, ActivityKind, ActivityObject};
use waveline_shared::domain::{PlaylistId, TrackId, UserId};

use crate::AppState;
use crate::auth::{Auth, MaybeAuth, Session};
use crate::error::ApiError;
use crate::playlists::PlaylistView;
use crate::social::{UserSummaryView, page_limit};
use crate::tracks::TrackView;

/// How many reads one page may take to fill up past filtered-out items.
const ROUNDS: usize = 4;

#[derive(Tags)]
enum Tag {
    /// The activity feed.
    Feed,
}

/// The feed routes.
#[derive(Debug)]
pub struct Feed {
    pub state: AppState,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
enum ActivityType {
    /// A public track became ready.
    Track,
    TrackRepost,
    /// A public playlist was created.
    Playlist,
    PlaylistRepost,
}

/// One item of a feed.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct ActivityView {
    id: String,
    #[oai(rename = "type")]
    kind: ActivityType,
    /// Who posted or reposted.
    actor: UserSummaryView,
    created_at: DateTime<Utc>,
    track: Option<TrackView>,
    playlist: Option<PlaylistView>,
}

/// A page of activities, newest first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct ActivityPage {
    activities: Vec<ActivityView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
}

impl Feed {
    /// A page of `actors`' activities as `session` may see them: `dedupe` shows each object
    /// at its newest activity among the actors only.
    async fn page(
        &self,
        actors: &[UserId],
        cursor: Option<String>,
        limit: usize,
        session: Option<&Session>,
        dedupe: bool,
    ) -> Result<ActivityPage, ApiError> {
        let blocked: HashSet<UserId> = match session {
            Some(session) => self.state.social.blocked_either_way(session.user.id).await?.into_iter().collect(),
            None => HashSet::new(),
        };
        let actors: Vec<UserId> = actors.iter().filter(|a| !blocked.contains(a)).copied().collect();
        let mut kept: Vec<Activity> = Vec::new();
        let mut shown: HashSet<ActivityObject> = HashSet::new();
        let mut seen = Seen::default();
        let mut cursor = cursor;
        let mut next = None;
        for _ in 0..ROUNDS {
            let want = limit - kept.len();
            let page = self.state.documents.feed(&actors, cursor.as_deref(), want).await?;
            let objects: Vec<ActivityObject> = page.activities.iter().map(|a| a.object).collect();
            let newest =
                if dedupe { self.state.documents.newest_about(&objects, &actors).await? } else { HashMap::new() };
            self.see(&objects, session, &blocked, &mut seen).await?;
            for activity in page.activities {
                let newest_here = !dedupe || newest.get(&activity.object).is_none_or(|id| *id == activity.id);
                if newest_here && seen.visible(activity.object) && shown.insert(activity.object) {
                    kept.push(activity);
                }
            }
            next = page.next_cursor;
            match &next {
                Some(after) if kept.len() < limit => cursor = Some(after.clone()),
                _ => break,
            }
        }
        let activities = self.views(kept, session, seen).await?;
        Ok(ActivityPage { activities, next_cursor: next })
    }

    /// Reads the objects the viewer may see among `objects`, leaving out those owned by
    /// `blocked` accounts, into `seen` (which the views are then made from: each object is read
    /// once).
    async fn see(
        &self,
        objects: &[ActivityObject],
        session: Option<&Session>,
        blocked: &HashSet<UserId>,
        seen: &mut Seen,
    ) -> Result<(), ApiError> {
        let (tracks, playlists) = split(objects);
        let tracks = crate::social::visible_tracks(&self.state, &tracks, session).await?;
        let playlists = self.state.social.visible_playlists(&playlists, crate::social::viewer(session)).await?;
        seen.tracks.extend(tracks.into_iter().filter(|t| !blocked.contains(&t.owner_id)).map(|t| (t.id, t)));
        seen.playlists.extend(playlists.into_iter().filter(|p| !blocked.contains(&p.owner_id)).map(|p| (p.id, p)));
        Ok(())
    }

    /// Views of activities, with their objects as the viewer sees them.
    async fn views(
        &self,
        kept: Vec<Activity>,
        session: Option<&Session>,
        mut seen: Seen,
    ) -> Result<Vec<ActivityView>, ApiError> {
        let objects: Vec<ActivityObject> = kept.iter().map(|a| a.object).collect();
        let (track_ids, playlist_ids) = split(&objects);
        let tracks: Vec<_> = track_ids.iter().filter_map(|id| seen.tracks.remove(id)).collect();
        let mut tracks: HashMap<String, TrackView> = crate::social::track_views(&self.state, tracks, session)
            .await?
            .into_iter()
            .map(|v| (v.id().to_owned(), v))
            .collect();
        let playlists: Vec<_> = playlist_ids.iter().filter_map(|id| seen.playlists.remove(id)).collect();
        let mut playlists: HashMap<String, PlaylistView> = crate::playlists::views(&self.state, playlists, session)
            .await?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let mut actors: Vec<UserId> = kept.iter().map(|a| a.actor).collect();
        actors.sort_unstable();
        actors.dedup();
        let users = self.state.social.summaries(&actors).await?;
        Ok(kept
            .into_iter()
            .filter_map(|activity| {
                let actor = UserSummaryView::from(users.get(&activity.actor)?);
                let (track, playlist) = match activity.object {
                    ActivityObject::Track(id) => (Some(tracks.remove(&id.to_string())?), None),
                    ActivityObject::Playlist(id) => (None, Some(playlists.remove(&id.to_string())?)),
                };
                Some(ActivityView {
                    id: activity.id.to_string(),
                    kind: match activity.kind {
                        ActivityKind::Track => ActivityType::Track,
                        ActivityKind::TrackRepost => ActivityType::TrackRepost,
                        ActivityKind::Playlist => ActivityType::Playlist,
                        ActivityKind::PlaylistRepost => ActivityType::PlaylistRepost,
                    },
                    actor,
                    created_at: activity.created_at,
                    track,
                    playlist,
                })
            })
            .collect())
    }
}

/// The objects a page read, that the viewer may see.
#[derive(Default)]
struct Seen {
    tracks: HashMap<TrackId, waveline_shared::db::TrackDetails>,
    playlists: HashMap<PlaylistId, waveline_shared::db::social::PlaylistRow>,
}

impl Seen {
    fn visible(&self, object: ActivityObject) -> bool {
        match object {
            ActivityObject::Track(id) => self.tracks.contains_key(&id),
            ActivityObject::Playlist(id) => self.playlists.contains_key(&id),
        }
    }
}

/// The track and playlist ids among `objects`.
fn split(objects: &[ActivityObject]) -> (Vec<TrackId>, Vec<PlaylistId>) {
    let mut tracks = Vec::new();
    let mut playlists = Vec::new();
    for object in objects {
        match object {
            ActivityObject::Track(id) => tracks.push(*id),
            ActivityObject::Playlist(id) => playlists.push(*id),
        }
    }
    (tracks, playlists)
}

#[OpenApi(tag = "Tag::Feed")]
impl Feed {
    /// Your feed: the tracks and playlists the accounts you follow posted and reposted,
    /// newest first, each once.
    #[oai(path = "/v1/me/feed", method = "get")]
    async fn feed(
        &self,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 80))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: Auth,
    ) -> Result<Json<ActivityPage>, ApiError> {
        let session = auth.session();
        let limit = page_limit(limit.0)? as usize;
        let followed = self.state.social.followee_ids(session.user.id).await?;
        Ok(Json(self.page(&followed, cursor.0, limit, Some(session), true).await?))
    }

    /// One account's public stream: what it posted and reposted, newest first.
    #[oai(path = "/v1/users/:username/activities", method = "get")]
    async fn activities(
        &self,
        username: Path<String>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 80))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: MaybeAuth,
    ) -> Result<Json<ActivityPage>, ApiError> {
        let user = crate::social::account(&self.state, &username.0).await?;
        let limit = page_limit(limit.0)? as usize;
        Ok(Json(self.page(&[user.id], cursor.0, limit, auth.session(), false).await?))
    }
}
