//! The social routes on accounts: profiles, follows, blocks, likes and reposts, and the
//! lists of each. Playlists, comments and the feed have their own modules
//! ([`crate::playlists`], [`crate::comments`], [`crate::feed`]); the views they share are here.
//!
//! - **Who sees what.** A profile's counts are those a stranger sees (public tracks with a
//!   ready revision, public playlists, and the likes and reposts of those). Lists of likes and
//!   reposts hold what the viewer may see. Something the caller may not see answers 404, as if
//!   it did not exist.
//! - **Idempotent writes.** `PUT` and `DELETE` of a follow, block, like or repost answer 204
//!   whether or not they changed anything.
//! - **Blocks.** A block ends the follows between the two accounts, both ways. Neither can
//!   follow the other while it lasts, and the blocked account cannot comment on the blocker's
//!   tracks: 403 `blocked`.
//! - **Rate.** Social writes count against `social_writes_per_minute` per account (429
//!   `rate_limited` with `Retry-After`), per process.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use poem::http::StatusCode;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use uuid::Uuid;
use waveline_shared::db::TrackDetails;
use waveline_shared::db::social::{Keyset, Mark, Marked, Profile, Relate, Relation, Target, UserSummary, Viewer};
use waveline_shared::documents::{ActivityKind, ActivityObject, NewActivity, NotificationKind, Subject};
use waveline_shared::domain::{PlaylistId, TrackId, UserId};

use crate::auth::{Auth, MaybeAuth, Session};
use crate::error::{ApiError, ErrorBody};
use crate::playlists::PlaylistView;
use crate::tracks::{TrackView, check_text};
use crate::{AppState, may_see};

#[derive(Tags)]
enum Tag {
    /// Profiles, follows, blocks, likes and reposts.
    Social,
}

/// The account routes of the social layer.
#[derive(Debug)]
pub struct Social {
    pub state: AppState,
}

/// Social writes per account and minute, on this process.
pub struct WriteLimit {
    limiter: Option<DefaultKeyedRateLimiter<UserId>>,
    calls: AtomicU64,
}

impl std::fmt::Debug for WriteLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLimit").field("on", &self.limiter.is_some()).finish_non_exhaustive()
    }
}

impl WriteLimit {
    /// `per_minute` writes per account (0: no limit).
    pub fn new(per_minute: u32) -> WriteLimit {
        WriteLimit {
            limiter: NonZeroU32::new(per_minute).map(|n| DefaultKeyedRateLimiter::keyed(Quota::per_minute(n))),
            calls: AtomicU64::new(0),
        }
    }

    /// Counts one write of `user`; 429 `rate_limited` past the limit.
    pub(crate) fn check(&self, user: UserId) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        // Accounts idle long enough to be full again are dropped now and then, so the map
        // holds only the accounts writing lately.
        if self.calls.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            limiter.retain_recent();
        }
        limiter.check_key(&user).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            metrics::counter!("waveline_social_writes_refused_total").increment(1);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this account is writing faster than it may; slow down",
            )
            .with_header("retry-after", wait.as_secs().max(1).to_string())
        })
    }
}

/// An account, as lists show it.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct UserSummaryView {
    pub id: String,
    pub username: String,
    /// Empty until the account sets one.
    pub display_name: String,
}

impl From<&UserSummary> for UserSummaryView {
    fn from(user: &UserSummary) -> UserSummaryView {
        UserSummaryView {
            id: user.id.to_string(),
            username: user.username.clone(),
            display_name: user.display_name.clone(),
        }
    }
}

/// A public profile. The counts are what a stranger sees.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub(crate) struct ProfileView {
    id: String,
    username: String,
    display_name: String,
    bio: String,
    /// The avatar's `large` (100×100) JPEG; `t500x500`, `t300x300`, `t67x67` or `small` in
    /// place of `large` for the other sizes. Absent until an avatar is ready.
    avatar_url: Option<String>,
    /// The latest avatar's processing: `pending`, `processing`, `ready` or `failed`; absent
    /// when the account has none.
    avatar_state: Option<String>,
    /// Why the latest avatar failed (`invalid_image`, …).
    avatar_error: Option<ErrorBody>,
    followers_count: i64,
    followings_count: i64,
    /// Public tracks that can be played.
    track_count: i64,
    /// Public playlists.
    playlist_count: i64,
    /// Public tracks and playlists the account likes.
    likes_count: i64,
    /// Public tracks and playlists the account reposted.
    reposts_count: i64,
    created_at: DateTime<Utc>,
}

/// An account in a list of follows or blocks.
#[derive(Debug, Object)]
struct RelatedView {
    id: String,
    username: String,
    display_name: String,
    /// When the follow or block began.
    since: DateTime<Utc>,
}

/// A page of accounts.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct UserPage {
    users: Vec<RelatedView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
}

/// A profile edit; absent fields stay as they are.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub(crate) struct ProfileEdit {
    /// At most 100 characters; empty clears it.
    display_name: Option<String>,
    /// At most 4000 characters; empty clears it.
    bio: Option<String>,
    /// Who may send you direct messages: `everyone` (the default) or `following` (only the
    /// accounts you follow).
    messages_from: Option<MessagesFromChoice>,
}

/// Who may send an account direct messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub(crate) enum MessagesFromChoice {
    Everyone,
    Following,
}

/// Confirms an account's deletion.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
pub(crate) struct AccountDeletion {
    /// The account's password.
    password: String,
}

/// What a like or repost is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum MarkedKind {
    Track,
    Playlist,
}

/// One like or repost.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct MarkedView {
    #[oai(rename = "type")]
    kind: MarkedKind,
    /// When it was liked or reposted.
    created_at: DateTime<Utc>,
    track: Option<TrackView>,
    playlist: Option<PlaylistView>,
}

/// A page of likes.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct LikePage {
    likes: Vec<MarkedView>,
    next_cursor: Option<String>,
}

/// A page of reposts.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct RepostPage {
    reposts: Vec<MarkedView>,
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
pub(crate) enum Done {
    /// Done (or already so).
    #[oai(status = 204)]
    Done,
}

/// Who is asking, for the visibility rules of the queries.
pub(crate) fn viewer(session: Option<&Session>) -> Viewer {
    Viewer { id: session.map(|s| s.user.id), admin: session.is_some_and(Session::is_admin) }
}

/// A list cursor: the last item's time (microseconds) and id.
pub(crate) fn encode_keyset((at, id): Keyset) -> String {
    format!("{}.{}", at.timestamp_micros(), id.simple())
}

/// A list cursor back, or 400 `invalid_field` naming `cursor`.
pub(crate) fn decode_keyset(text: Option<&str>) -> Result<Option<Keyset>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("invalid_field", "cursor: not one this API returned for this list");
    let (micros, id) = text.split_once('.').ok_or_else(bad)?;
    if micros.is_empty() || micros.len() > 19 || !micros.bytes().all(|b| b.is_ascii_digit()) || id.len() != 32 {
        return Err(bad());
    }
    let at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok(Some((at, Uuid::try_parse(id).map_err(|_| bad())?)))
}

/// A page size from `limit` (1–100, default 20).
pub(crate) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(20),
        Some(limit @ 1..=100) => Ok(limit),
        Some(other) => Err(ApiError::bad_request("invalid_field", format!("limit: 1 to 100, got {other}"))),
    }
}

/// Views of tracks with their counts, their artwork, and the viewer's access and marks.
pub(crate) async fn track_views(
    state: &AppState,
    tracks: Vec<TrackDetails>,
    session: Option<&Session>,
) -> Result<Vec<TrackView>, ApiError> {
    let images = crate::artwork::images(state);
    track_views_from(&state.social, state.documents.as_ref(), &images, tracks, session).await
}

/// [`track_views`] from the stores themselves, for what has no [`AppState`] (the CLI's
/// `tracks show|list --json`): the one place a track's whole view is built. Three queries for
/// the lot. Without a session it is the view of an anonymous listener.
pub async fn track_views_from(
    social: &waveline_shared::db::social::PgSocial,
    documents: &dyn waveline_shared::documents::Documents,
    images: &waveline_shared::db::images::PgImages,
    tracks: Vec<TrackDetails>,
    session: Option<&Session>,
) -> Result<Vec<TrackView>, ApiError> {
    let ids: Vec<TrackId> = tracks.iter().map(|t| t.id).collect();
    let viewer_id = session.map(|s| s.user.id);
    let uuids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    let (stats, comments, mut artwork) = tokio::try_join!(
        async { social.track_stats(&ids, viewer_id).await.map_err(ApiError::from) },
        async { documents.count_comments_of(&ids).await.map_err(ApiError::from) },
        crate::artwork::fields_from(images, waveline_shared::images::ImageSubject::Track, &uuids),
    )?;
    Ok(tracks
        .into_iter()
        .map(|track| {
            let id = track.id;
            let premium = crate::access::premium_access(session, track.owner_id);
            TrackView::from(track)
                .with_social(
                    stats.get(&id).copied().unwrap_or_default(),
                    comments.get(&id).copied().unwrap_or(0),
                    session.is_some(),
                )
                .with_access(premium)
                .with_artwork(artwork.remove(&id.0).unwrap_or_default())
        })
        .collect())
}

/// One track's view with its counts.
pub(crate) async fn track_view(
    state: &AppState,
    track: TrackDetails,
    session: Option<&Session>,
) -> Result<TrackView, ApiError> {
    track_views(state, vec![track], session)
        .await?
        .pop()
        .ok_or_else(|| ApiError::internal(&"a track view went missing"))
}

/// The tracks among `ids` that the viewer may see in lists (theirs, or public and ready).
pub(crate) async fn visible_tracks(
    state: &AppState,
    ids: &[TrackId],
    session: Option<&Session>,
) -> Result<Vec<TrackDetails>, ApiError> {
    let tracks = state.tracks.details_many(ids).await?;
    Ok(tracks
        .into_iter()
        .filter(|t| {
            may_see(t.owner_id, t.visibility, session)
                && (t.ready_revision.is_some() || session.is_some_and(|s| s.user.id == t.owner_id || s.is_admin()))
        })
        .collect())
}

/// The account named `username`, or 404.
pub(crate) async fn account(state: &AppState, username: &str) -> Result<UserSummary, ApiError> {
    if !crate::auth::valid_username(username) {
        return Err(ApiError::not_found("user"));
    }
    state.social.summary_by_username(username).await?.ok_or_else(|| ApiError::not_found("user"))
}

/// Views of what some likes or reposts are of, in their order; those no longer visible drop.
async fn marked_views(
    state: &AppState,
    items: Vec<Marked>,
    session: Option<&Session>,
) -> Result<Vec<MarkedView>, ApiError> {
    let track_ids: Vec<TrackId> = items
        .iter()
        .filter_map(|m| match m.target {
            Target::Track(id) => Some(id),
            Target::Playlist(_) => None,
        })
        .collect();
    let playlist_ids: Vec<PlaylistId> = items
        .iter()
        .filter_map(|m| match m.target {
            Target::Playlist(id) => Some(id),
            Target::Track(_) => None,
        })
        .collect();
    let tracks = visible_tracks(state, &track_ids, session).await?;
    let mut tracks: HashMap<String, TrackView> =
        track_views(state, tracks, session).await?.into_iter().map(|v| (v.id().to_owned(), v)).collect();
    let mut playlists: HashMap<String, PlaylistView> = crate::playlists::views_of(state, &playlist_ids, session)
        .await?
        .into_iter()
        .map(|v| (v.id.clone(), v))
        .collect();
    Ok(items
        .into_iter()
        .filter_map(|item| match item.target {
            Target::Track(id) => tracks.remove(&id.to_string()).map(|track| MarkedView {
                kind: MarkedKind::Track,
                created_at: item.created_at,
                track: Some(track),
                playlist: None,
            }),
            Target::Playlist(id) => playlists.remove(&id.to_string()).map(|playlist| MarkedView {
                kind: MarkedKind::Playlist,
                created_at: item.created_at,
                track: None,
                playlist: Some(playlist),
            }),
        })
        .collect())
}

/// `PATCH /v1/me` (routed with `GET /v1/me` in `auth`, one path of the document): changes
/// the account's display name and bio; answers its profile.
pub(crate) async fn edit_me(state: &AppState, edit: ProfileEdit, auth: &Auth) -> Result<ProfileView, ApiError> {
    let me = &auth.session().user;
    let display_name = edit.display_name.as_deref().map(|d| check_text("display_name", d, 0, 100)).transpose()?;
    let bio = edit.bio.as_deref().map(|b| check_text("bio", b, 0, 4000)).transpose()?;
    if !state.social.update_profile(me.id, display_name.as_deref(), bio.as_deref()).await? {
        return Err(ApiError::not_found("user"));
    }
    if let Some(from) = edit.messages_from {
        let from = match from {
            MessagesFromChoice::Everyone => waveline_shared::db::social::MessagesFrom::Everyone,
            MessagesFromChoice::Following => waveline_shared::db::social::MessagesFrom::Following,
        };
        state.social.set_messages_from(me.id, from).await?;
    }
    profile_of(state, &me.username).await
}

/// `DELETE /v1/me`: deletes the account and everything of it, given its password.
pub(crate) async fn delete_me(state: &AppState, deletion: AccountDeletion, auth: &Auth) -> Result<(), ApiError> {
    let me = auth.session().user.clone();
    let Some(hash) = me.password_hash.clone() else {
        return Err(ApiError::conflict(
            "password_not_set",
            "this account has no password; set one through /v1/auth/password/forgot, then delete it",
        ));
    };
    if deletion.password.len() > 1024 || !crate::auth::verify_password(deletion.password, Some(hash)).await? {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "wrong_password", "the password is not this account's"));
    }
    crate::account_deletion::delete_account(state, me.id).await?;
    tracing::info!(user = %me.id, "account deleted");
    Ok(())
}

/// A profile by username, with the counts a stranger sees.
async fn profile_of(state: &AppState, username: &str) -> Result<ProfileView, ApiError> {
    if !crate::auth::valid_username(username) {
        return Err(ApiError::not_found("user"));
    }
    let profile = state.social.profile(username).await?.ok_or_else(|| ApiError::not_found("user"))?;
    profile_views(state, vec![profile]).await?.pop().ok_or_else(|| ApiError::internal(&"a profile view went missing"))
}

/// Views of profiles with their avatars (one query for the lot), in the order given.
pub(crate) async fn profile_views(state: &AppState, profiles: Vec<Profile>) -> Result<Vec<ProfileView>, ApiError> {
    let ids: Vec<Uuid> = profiles.iter().map(|profile| profile.id.0).collect();
    let mut avatars = crate::artwork::fields_of(state, waveline_shared::images::ImageSubject::User, &ids).await?;
    Ok(profiles
        .into_iter()
        .map(|profile| {
            let avatar = avatars.remove(&profile.id.0).unwrap_or_default();
            let mut view = ProfileView::from(profile);
            view.avatar_url = avatar.url;
            view.avatar_state = avatar.state;
            view.avatar_error = avatar.error;
            view
        })
        .collect())
}

impl From<Profile> for ProfileView {
    /// The view without the avatar (its fields are filled in by [`profile_views`]).
    fn from(profile: Profile) -> ProfileView {
        ProfileView {
            id: profile.id.to_string(),
            username: profile.username,
            display_name: profile.display_name,
            bio: profile.bio,
            avatar_url: None,
            avatar_state: None,
            avatar_error: None,
            followers_count: profile.followers_count,
            followings_count: profile.followings_count,
            track_count: profile.track_count,
            playlist_count: profile.playlist_count,
            likes_count: profile.likes_count,
            reposts_count: profile.reposts_count,
            created_at: profile.created_at,
        }
    }
}

impl Social {
    /// Resolves the target of a like or repost as `session` may act on it.
    async fn target(
        &self,
        kind: MarkedKind,
        id: &str,
        session: &Session,
        mark: Mark,
        on: bool,
    ) -> Result<(Target, UserId), ApiError> {
        match kind {
            MarkedKind::Track => {
                let id = crate::parse_track_id(id)?;
                let track = self.state.tracks.details(id).await?.ok_or_else(|| ApiError::not_found("track"))?;
                if !may_see(track.owner_id, track.visibility, Some(session)) {
                    return Err(ApiError::not_found("track"));
                }
                if on && track.ready_revision.is_none() {
                    return Err(ApiError::conflict(
                        "not_ready",
                        format!("the track is {}; it can be liked and reposted once ready", track.state),
                    ));
                }
                if on && mark == Mark::Repost && track.owner_id == session.user.id {
                    return Err(ApiError::bad_request("cannot_repost_own", "you cannot repost your own track"));
                }
                Ok((Target::Track(id), track.owner_id))
            }
            MarkedKind::Playlist => {
                let playlist = crate::playlists::visible(&self.state, id, Some(session)).await?;
                if on && mark == Mark::Repost && playlist.owner_id == session.user.id {
                    return Err(ApiError::bad_request("cannot_repost_own", "you cannot repost your own playlist"));
                }
                Ok((Target::Playlist(playlist.id), playlist.owner_id))
            }
        }
    }

    /// Likes or reposts (`on`), or takes it back; a repost writes the reposter's activity
    /// and taking it back removes it.
    async fn mark(&self, mark: Mark, kind: MarkedKind, id: &str, auth: &Auth, on: bool) -> Result<Done, ApiError> {
        let session = auth.session();
        let me = session.user.id;
        self.state.social_writes.check(me)?;
        let (target, owner) = self.target(kind, id, session, mark, on).await?;
        let object = match target {
            Target::Track(id) => ActivityObject::Track(id),
            Target::Playlist(id) => ActivityObject::Playlist(id),
        };
        if mark == Mark::Repost && !on {
            // The activity first: a repost is never left without its undoing on a retry.
            self.state.documents.delete_object_activities(object, Some(me)).await?;
        }
        let changed = self.state.social.set_mark(mark, target, me, on).await?;
        if mark == Mark::Repost && on && changed {
            let kind = match target {
                Target::Track(_) => ActivityKind::TrackRepost,
                Target::Playlist(_) => ActivityKind::PlaylistRepost,
            };
            let activity = NewActivity { kind, actor: me, object, created_at: Utc::now() };
            if let Err(err) = self.state.documents.insert_activity(activity).await {
                // No repost without its activity: take the repost back, and say so.
                self.state.social.set_mark(mark, target, me, false).await?;
                return Err(err.into());
            }
        }
        if changed {
            if let Target::Track(track) = target {
                crate::realtime::publish_counters(&self.state, track);
            }
            if on && owner != me {
                let (kind, subject) = match (mark, target) {
                    (Mark::Like, Target::Track(id)) => (NotificationKind::Like, Subject::Track { id }),
                    (Mark::Like, Target::Playlist(id)) => (NotificationKind::Like, Subject::Playlist { id }),
                    (Mark::Repost, Target::Track(id)) => (NotificationKind::Repost, Subject::Track { id }),
                    (Mark::Repost, Target::Playlist(id)) => (NotificationKind::Repost, Subject::Playlist { id }),
                };
                crate::inbox::notify(&self.state, owner, kind, Some(me), subject).await;
            }
        }
        Ok(Done::Done)
    }

    async fn marked(
        &self,
        mark: Mark,
        username: &str,
        cursor: Option<&str>,
        limit: Option<i64>,
        session: Option<&Session>,
    ) -> Result<(Vec<MarkedView>, Option<String>), ApiError> {
        let user = account(&self.state, username).await?;
        let after = decode_keyset(cursor)?;
        let page = self.state.social.marked(mark, user.id, viewer(session), after, page_limit(limit)?).await?;
        let views = marked_views(&self.state, page.items, session).await?;
        Ok((views, page.next.map(encode_keyset)))
    }

    async fn related(
        &self,
        user: UserId,
        relation: Relation,
        cursor: Option<&str>,
        limit: Option<i64>,
    ) -> Result<Json<UserPage>, ApiError> {
        let after = decode_keyset(cursor)?;
        let page = self.state.social.related(user, relation, after, page_limit(limit)?).await?;
        Ok(Json(UserPage {
            users: page
                .items
                .into_iter()
                .map(|r| RelatedView {
                    id: r.id.to_string(),
                    username: r.username,
                    display_name: r.display_name,
                    since: r.since,
                })
                .collect(),
            next_cursor: page.next.map(encode_keyset),
        }))
    }

    /// The other account of a follow or block: 404 when unknown, 400 when oneself.
    async fn other(&self, username: &str, me: UserId, code: &'static str, what: &str) -> Result<UserSummary, ApiError> {
        let other = account(&self.state, username).await?;
        if other.id == me {
            return Err(ApiError::bad_request(code, format!("you cannot {what} yourself")));
        }
        Ok(other)
    }
}

#[OpenApi(tag = "Tag::Social")]
impl Social {
    /// A public profile, with the counts anyone sees.
    #[oai(path = "/v1/users/:username", method = "get")]
    async fn profile(&self, username: Path<String>) -> Result<Json<ProfileView>, ApiError> {
        Ok(Json(profile_of(&self.state, &username.0).await?))
    }

    /// Follows an account (idempotent). Following oneself answers 400
    /// `cannot_follow_self`; an account that blocks you, or that you block, 403 `blocked`.
    #[oai(path = "/v1/me/followings/:username", method = "put")]
    async fn follow(&self, username: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        let me = auth.session().user.id;
        self.state.social_writes.check(me)?;
        let other = self.other(&username.0, me, "cannot_follow_self", "follow").await?;
        match self.state.social.follow(me, other.id).await? {
            Relate::Done => {
                crate::inbox::notify(&self.state, other.id, NotificationKind::Follow, Some(me), Subject::Nothing).await;
                Ok(Done::Done)
            }
            Relate::Already => Ok(Done::Done),
            Relate::Blocked => Err(ApiError::new(StatusCode::FORBIDDEN, "blocked", "one of you blocks the other")),
            Relate::Full => Err(ApiError::conflict(
                "too_many_followings",
                format!("an account follows at most {} others", waveline_shared::db::social::MAX_FOLLOWINGS),
            )),
        }
    }

    /// Stops following an account (idempotent).
    #[oai(path = "/v1/me/followings/:username", method = "delete")]
    async fn unfollow(&self, username: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        let me = auth.session().user.id;
        self.state.social_writes.check(me)?;
        let other = self.other(&username.0, me, "cannot_follow_self", "follow").await?;
        self.state.social.unfollow(me, other.id).await?;
        Ok(Done::Done)
    }

    /// Who follows an account, newest first.
    #[oai(path = "/v1/users/:username/followers", method = "get")]
    async fn followers(
        &self,
        username: Path<String>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
    ) -> Result<Json<UserPage>, ApiError> {
        let user = account(&self.state, &username.0).await?;
        self.related(user.id, Relation::Followers, cursor.0.as_deref(), limit.0).await
    }

    /// Whom an account follows, newest first.
    #[oai(path = "/v1/users/:username/followings", method = "get")]
    async fn followings(
        &self,
        username: Path<String>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
    ) -> Result<Json<UserPage>, ApiError> {
        let user = account(&self.state, &username.0).await?;
        self.related(user.id, Relation::Followings, cursor.0.as_deref(), limit.0).await
    }

    /// Blocks an account (idempotent): the follows between you end, it can no longer follow
    /// you or comment on your tracks.
    #[oai(path = "/v1/me/blocks/:username", method = "put")]
    async fn block(&self, username: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        let me = auth.session().user.id;
        self.state.social_writes.check(me)?;
        let other = self.other(&username.0, me, "cannot_block_self", "block").await?;
        match self.state.social.block(me, other.id).await? {
            Relate::Done | Relate::Already | Relate::Blocked => Ok(Done::Done),
            Relate::Full => Err(ApiError::conflict(
                "too_many_blocks",
                format!("an account blocks at most {} others", waveline_shared::db::social::MAX_BLOCKS),
            )),
        }
    }

    /// Unblocks an account (idempotent). Follows the block ended stay ended.
    #[oai(path = "/v1/me/blocks/:username", method = "delete")]
    async fn unblock(&self, username: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        let me = auth.session().user.id;
        self.state.social_writes.check(me)?;
        let other = self.other(&username.0, me, "cannot_block_self", "block").await?;
        self.state.social.unblock(me, other.id).await?;
        Ok(Done::Done)
    }

    /// The accounts you block, newest first (yours alone to see).
    #[oai(path = "/v1/me/blocks", method = "get")]
    async fn blocks(
        &self,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: Auth,
    ) -> Result<Json<UserPage>, ApiError> {
        self.related(auth.session().user.id, Relation::Blocks, cursor.0.as_deref(), limit.0).await
    }

    /// Likes a track (idempotent). 404 for a track you cannot see, 409 `not_ready` before it
    /// is ready.
    #[oai(path = "/v1/me/likes/tracks/:id", method = "put")]
    async fn like_track(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Like, MarkedKind::Track, &id.0, &auth, true).await
    }

    /// Takes back a like of a track (idempotent).
    #[oai(path = "/v1/me/likes/tracks/:id", method = "delete")]
    async fn unlike_track(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Like, MarkedKind::Track, &id.0, &auth, false).await
    }

    /// Likes a playlist (idempotent).
    #[oai(path = "/v1/me/likes/playlists/:id", method = "put")]
    async fn like_playlist(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Like, MarkedKind::Playlist, &id.0, &auth, true).await
    }

    /// Takes back a like of a playlist (idempotent).
    #[oai(path = "/v1/me/likes/playlists/:id", method = "delete")]
    async fn unlike_playlist(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Like, MarkedKind::Playlist, &id.0, &auth, false).await
    }

    /// Reposts a track to your followers' feeds (idempotent). Not your own: 400
    /// `cannot_repost_own`.
    #[oai(path = "/v1/me/reposts/tracks/:id", method = "put")]
    async fn repost_track(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Repost, MarkedKind::Track, &id.0, &auth, true).await
    }

    /// Takes back a repost of a track (idempotent); it leaves your followers' feeds.
    #[oai(path = "/v1/me/reposts/tracks/:id", method = "delete")]
    async fn unrepost_track(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Repost, MarkedKind::Track, &id.0, &auth, false).await
    }

    /// Reposts a playlist (idempotent).
    #[oai(path = "/v1/me/reposts/playlists/:id", method = "put")]
    async fn repost_playlist(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Repost, MarkedKind::Playlist, &id.0, &auth, true).await
    }

    /// Takes back a repost of a playlist (idempotent).
    #[oai(path = "/v1/me/reposts/playlists/:id", method = "delete")]
    async fn unrepost_playlist(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        self.mark(Mark::Repost, MarkedKind::Playlist, &id.0, &auth, false).await
    }

    /// What an account likes (tracks and playlists you may see), newest first.
    #[oai(path = "/v1/users/:username/likes", method = "get")]
    async fn likes(
        &self,
        username: Path<String>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: MaybeAuth,
    ) -> Result<Json<LikePage>, ApiError> {
        let (likes, next_cursor) =
            self.marked(Mark::Like, &username.0, cursor.0.as_deref(), limit.0, auth.session()).await?;
        Ok(Json(LikePage { likes, next_cursor }))
    }

    /// What an account reposted (tracks and playlists you may see), newest first.
    #[oai(path = "/v1/users/:username/reposts", method = "get")]
    async fn reposts(
        &self,
        username: Path<String>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: MaybeAuth,
    ) -> Result<Json<RepostPage>, ApiError> {
        let (reposts, next_cursor) =
            self.marked(Mark::Repost, &username.0, cursor.0.as_deref(), limit.0, auth.session()).await?;
        Ok(Json(RepostPage { reposts, next_cursor }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_cursors_round_trip_and_refuse_forgeries() {
        let at = DateTime::from_timestamp_micros(1_764_151_234_567_890).expect("time");
        let id = Uuid::now_v7();
        let text = encode_keyset((at, id));
        assert_eq!(decode_keyset(Some(&text)).expect("decode"), Some((at, id)));
        assert_eq!(decode_keyset(None).expect("none"), None);
        for bad in [
            "",
            ".",
            "x.y",
            "123",
            "-5.0",
            "+5.00000000000000000000000000000000",
            "123.not-a-uuid",
            "99999999999999999999.00000000000000000000000000000000",
        ] {
            assert_eq!(decode_keyset(Some(bad)).expect_err(bad).code, "invalid_field", "{bad}");
        }
        assert_eq!(page_limit(None).expect("default"), 20);
        assert!(page_limit(Some(0)).is_err());
        assert!(page_limit(Some(101)).is_err());
    }

    #[test]
    fn the_write_limit_refuses_past_its_rate_with_a_retry_after() {
        let limit = WriteLimit::new(2);
        let user = UserId::new();
        assert!(limit.check(user).is_ok());
        assert!(limit.check(user).is_ok());
        let refused = limit.check(user).expect_err("third write");
        assert_eq!((refused.status, refused.code), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
        assert!(refused.header.is_some_and(|(name, _)| name == "retry-after"));
        // Another account has its own allowance.
        assert!(limit.check(UserId::new()).is_ok());
        assert!(WriteLimit::new(0).check(user).is_ok());
    }
}
