//! Playlists (PostgreSQL): create, read, edit, reorder, delete, and an account's list.
//!
//! Every viewer sees a playlist's tracks through their own eyes: another account's private
//! track inside a public playlist is invisible to everyone but its owner (and admins), and
//! counts in neither `track_count` nor `duration_ms`; a deleted track drops out. A playlist's
//! `comment_count` is the sum of the comments on the tracks the viewer sees in it.
//!
//! A public playlist's creation writes a `playlist` activity (once: also when a private one
//! is made public later). Only the owner edits, reorders or deletes; another account gets 403
//! on a public playlist and 404 on a private one. A playlist's artwork is uploaded and served
//! by `artwork`.

use chrono::{DateTime, Utc};
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use waveline_shared::db::Visibility;
use waveline_shared::db::social::{
    NewPlaylist, PLAYLIST_MAX_TRACKS, PlaylistPatch, PlaylistRefusal, PlaylistRow, Target,
};
use waveline_shared::documents::ActivityObject;
use waveline_shared::domain::{PlaylistId, TrackId};
use waveline_shared::images::ImageSubject;

use crate::AppState;
use crate::auth::{Auth, MaybeAuth, Session};
use crate::error::{ApiError, ErrorBody};
use crate::social::{Done, UserSummaryView, decode_keyset, encode_keyset, page_limit, viewer};
use crate::tracks::{TrackView, VisibilityChoice, check_text};

#[derive(Tags)]
enum Tag {
    /// Playlists.
    Playlists,
}

/// The playlist routes.
#[derive(Debug)]
pub struct Playlists {
    pub state: AppState,
}

/// A playlist as the viewer sees it.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct PlaylistView {
    pub id: String,
    owner: UserSummaryView,
    title: String,
    description: String,
    /// `public` or `private`.
    visibility: String,
    /// The tracks you may see in it.
    track_count: i64,
    /// Their total duration.
    duration_ms: i64,
    likes_count: i64,
    reposts_count: i64,
    /// The comments on the tracks you may see in it.
    comment_count: i64,
    /// Plays (0 until play counting exists).
    playback_count: i64,
    /// For a signed-in viewer: whether they like it.
    user_liked: Option<bool>,
    /// For a signed-in viewer: whether they reposted it.
    user_reposted: Option<bool>,
    /// The tracks you may see, in order (on a single playlist; lists leave them out).
    tracks: Option<Vec<TrackView>>,
    /// The artwork's `large` (100×100) JPEG; `t500x500`, `t300x300`, `t67x67` or `small` in
    /// place of `large` for the other sizes. Absent until artwork is ready.
    artwork_url: Option<String>,
    /// The latest artwork's processing: `pending`, `processing`, `ready` or `failed`; absent
    /// when the playlist has none.
    artwork_state: Option<String>,
    /// Why the latest artwork failed (`invalid_image`, …).
    artwork_error: Option<ErrorBody>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A new playlist.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct PlaylistCreate {
    /// 1–200 characters.
    title: String,
    /// At most 5000 characters.
    description: Option<String>,
    /// Default `public`.
    visibility: Option<VisibilityChoice>,
    /// Tracks you may see, at most 500, each once.
    track_ids: Option<Vec<String>>,
}

/// A playlist edit; absent fields stay as they are.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct PlaylistEdit {
    /// 1–200 characters.
    title: Option<String>,
    /// At most 5000 characters.
    description: Option<String>,
    visibility: Option<VisibilityChoice>,
}

/// A playlist's tracks, in their new order.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct PlaylistTracks {
    /// Tracks you may see, at most 500, each once.
    track_ids: Vec<String>,
}

/// A page of playlists.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct PlaylistPage {
    playlists: Vec<PlaylistView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
}

#[derive(ApiResponse)]
enum Created {
    /// The playlist.
    #[oai(status = 201)]
    Created(Json<PlaylistView>),
}

/// The playlist `id` if `session` may see it; 404 otherwise.
pub(crate) async fn visible(state: &AppState, id: &str, session: Option<&Session>) -> Result<PlaylistRow, ApiError> {
    let id: PlaylistId = id.parse().map_err(|_| ApiError::not_found("playlist"))?;
    let row = state.social.playlist(id, viewer(session)).await?.ok_or_else(|| ApiError::not_found("playlist"))?;
    if !crate::may_see(row.owner_id, row.visibility.0, session) {
        return Err(ApiError::not_found("playlist"));
    }
    Ok(row)
}

/// Track ids from a request: each a track id, each once, at most [`PLAYLIST_MAX_TRACKS`].
fn parse_track_ids(ids: &[String]) -> Result<Vec<TrackId>, ApiError> {
    if ids.len() > PLAYLIST_MAX_TRACKS {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("track_ids: a playlist holds at most {PLAYLIST_MAX_TRACKS} tracks, got {}", ids.len()),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.iter()
        .map(|text| {
            let id: TrackId = text
                .parse()
                .map_err(|_| ApiError::bad_request("invalid_field", "track_ids: each must be a track id"))?;
            if !seen.insert(id) {
                return Err(ApiError::bad_request("invalid_field", format!("track_ids: {id} appears twice")));
            }
            Ok(id)
        })
        .collect()
}

fn refused(refusal: PlaylistRefusal) -> ApiError {
    match refusal {
        PlaylistRefusal::UnknownTrack(id) => {
            ApiError::bad_request("invalid_field", format!("track_ids: no track {id} that you may add"))
        }
        PlaylistRefusal::Full => ApiError::conflict(
            "too_many_playlists",
            format!("an account has at most {} playlists", waveline_shared::db::social::MAX_PLAYLISTS),
        ),
        PlaylistRefusal::Gone => ApiError::not_found("playlist"),
    }
}

/// Views of playlists (without their tracks) with their counts.
pub(crate) async fn views(
    state: &AppState,
    rows: Vec<PlaylistRow>,
    session: Option<&Session>,
) -> Result<Vec<PlaylistView>, ApiError> {
    let ids: Vec<PlaylistId> = rows.iter().map(|r| r.id).collect();
    let stats = state.social.playlist_stats(&ids, session.map(|s| s.user.id)).await?;
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.0).collect();
    let mut artwork = crate::artwork::fields_of(state, ImageSubject::Playlist, &uuids).await?;
    // The comments of the tracks this viewer sees in them: one query for the tracks, one
    // grouped count per 500 of them.
    let tracks = state.social.playlists_track_ids(&ids, viewer(session)).await?;
    let mut all: Vec<TrackId> = tracks.values().flatten().copied().collect();
    all.sort_unstable();
    all.dedup();
    let mut counts = std::collections::HashMap::new();
    for chunk in all.chunks(waveline_shared::documents::MAX_COUNTED_TRACKS) {
        counts.extend(state.documents.count_comments_of(chunk).await?);
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let comments: u64 =
                tracks.get(&row.id).into_iter().flatten().map(|t| counts.get(t).copied().unwrap_or(0)).sum();
            let stats = stats.get(&row.id).copied().unwrap_or_default();
            let artwork = artwork.remove(&row.id.0).unwrap_or_default();
            view(row, stats, comments, session.is_some(), None, artwork)
        })
        .collect())
}

/// Views of the playlists among `ids` that the viewer may see, in no particular order.
pub(crate) async fn views_of(
    state: &AppState,
    ids: &[PlaylistId],
    session: Option<&Session>,
) -> Result<Vec<PlaylistView>, ApiError> {
    let rows = state.social.visible_playlists(ids, viewer(session)).await?;
    views(state, rows, session).await
}

fn view(
    row: PlaylistRow,
    stats: waveline_shared::db::social::Stats,
    comments: u64,
    signed_in: bool,
    tracks: Option<Vec<TrackView>>,
    artwork: crate::artwork::ImageFields,
) -> PlaylistView {
    PlaylistView {
        id: row.id.to_string(),
        owner: UserSummaryView {
            id: row.owner_id.to_string(),
            username: row.owner_username,
            display_name: row.owner_display_name,
        },
        title: row.title,
        description: row.description,
        visibility: row.visibility.0.as_str().to_owned(),
        track_count: row.track_count,
        duration_ms: row.duration_ms,
        likes_count: stats.likes,
        reposts_count: stats.reposts,
        comment_count: i64::try_from(comments).unwrap_or(i64::MAX),
        playback_count: 0,
        user_liked: signed_in.then_some(stats.liked),
        user_reposted: signed_in.then_some(stats.reposted),
        tracks,
        artwork_url: artwork.url,
        artwork_state: artwork.state,
        artwork_error: artwork.error,
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

impl Playlists {
    /// The whole playlist, with the tracks the viewer may see.
    async fn whole(&self, id: PlaylistId, session: Option<&Session>) -> Result<PlaylistView, ApiError> {
        let row =
            self.state.social.playlist(id, viewer(session)).await?.ok_or_else(|| ApiError::not_found("playlist"))?;
        let ids = self.state.social.playlist_track_ids(id, viewer(session)).await?;
        let tracks = self.state.tracks.details_many(&ids).await?;
        let tracks = crate::social::track_views(&self.state, tracks, session).await?;
        let comments: i64 = tracks.iter().map(|t| t.comment_count()).sum();
        let stats = self.state.social.playlist_stats(&[id], session.map(|s| s.user.id)).await?;
        let stats = stats.get(&id).copied().unwrap_or_default();
        let artwork = crate::artwork::fields_of(&self.state, ImageSubject::Playlist, &[id.0])
            .await?
            .remove(&id.0)
            .unwrap_or_default();
        Ok(view(row, stats, comments.max(0) as u64, session.is_some(), Some(tracks), artwork))
    }

    /// The playlist if `session` owns it: 404 when they cannot see it, 403 when they can but
    /// do not own it.
    async fn owned(&self, id: &str, session: &Session) -> Result<PlaylistRow, ApiError> {
        let row = visible(&self.state, id, Some(session)).await?;
        if row.owner_id != session.user.id {
            return Err(ApiError::forbidden("only the playlist's owner may do this"));
        }
        Ok(row)
    }

    /// Writes the playlist's activity if it is now public and has none.
    async fn announce(&self, id: PlaylistId) {
        if let Err(err) = self.state.social.announce(self.state.documents.as_ref(), Target::Playlist(id)).await {
            // The playlist stands; its activity is written the next time it becomes public.
            tracing::warn!(playlist = %id, error = %err, "could not write the playlist's activity");
        }
    }
}

#[OpenApi(tag = "Tag::Playlists")]
impl Playlists {
    /// Creates a playlist; a public one appears in your followers' feeds.
    #[oai(path = "/v1/playlists", method = "post")]
    async fn create(&self, body: Json<PlaylistCreate>, auth: Auth) -> Result<Created, ApiError> {
        let session = auth.session();
        self.state.social_writes.check(session.user.id)?;
        let body = body.0;
        let new = NewPlaylist {
            owner: session.user.id,
            title: check_text("title", &body.title, 1, 200)?,
            description: body
                .description
                .as_deref()
                .map(|d| check_text("description", d, 0, 5000))
                .transpose()?
                .unwrap_or_default(),
            visibility: body.visibility.map_or(Visibility::Public, Visibility::from),
            tracks: parse_track_ids(body.track_ids.as_deref().unwrap_or_default())?,
        };
        let id = self.state.social.create_playlist(&new).await?.map_err(refused)?;
        self.announce(id).await;
        Ok(Created::Created(Json(self.whole(id, Some(session)).await?)))
    }

    /// A playlist, with the tracks you may see in it.
    #[oai(path = "/v1/playlists/:id", method = "get")]
    async fn get(&self, id: Path<String>, auth: MaybeAuth) -> Result<Json<PlaylistView>, ApiError> {
        let row = visible(&self.state, &id.0, auth.session()).await?;
        Ok(Json(self.whole(row.id, auth.session()).await?))
    }

    /// Changes a playlist's title, description or visibility (owner only).
    #[oai(path = "/v1/playlists/:id", method = "patch")]
    async fn patch(
        &self,
        id: Path<String>,
        body: Json<PlaylistEdit>,
        auth: Auth,
    ) -> Result<Json<PlaylistView>, ApiError> {
        let session = auth.session();
        let row = self.owned(&id.0, session).await?;
        self.state.social_writes.check(session.user.id)?;
        let patch = PlaylistPatch {
            title: body.0.title.as_deref().map(|t| check_text("title", t, 1, 200)).transpose()?,
            description: body.0.description.as_deref().map(|d| check_text("description", d, 0, 5000)).transpose()?,
            visibility: body.0.visibility.map(Visibility::from),
        };
        if !self.state.social.update_playlist(row.id, &patch).await? {
            return Err(ApiError::not_found("playlist"));
        }
        self.announce(row.id).await;
        Ok(Json(self.whole(row.id, Some(session)).await?))
    }

    /// Deletes a playlist (owner only); its activities go with it.
    #[oai(path = "/v1/playlists/:id", method = "delete")]
    async fn delete(&self, id: Path<String>, auth: Auth) -> Result<Done, ApiError> {
        let session = auth.session();
        let row = self.owned(&id.0, session).await?;
        // The activities first, so a failure leaves the playlist to delete again.
        self.state.documents.delete_object_activities(ActivityObject::Playlist(row.id), None).await?;
        self.state.social.delete_playlist(row.id).await?;
        crate::artwork::delete_objects(&self.state, ImageSubject::Playlist, row.id.0).await;
        Ok(Done::Done)
    }

    /// Replaces a playlist's tracks, in the given order (owner only; at most 500).
    #[oai(path = "/v1/playlists/:id/tracks", method = "put")]
    async fn set_tracks(
        &self,
        id: Path<String>,
        body: Json<PlaylistTracks>,
        auth: Auth,
    ) -> Result<Json<PlaylistView>, ApiError> {
        let session = auth.session();
        let row = self.owned(&id.0, session).await?;
        self.state.social_writes.check(session.user.id)?;
        let tracks = parse_track_ids(&body.0.track_ids)?;
        self.state.social.set_playlist_tracks(row.id, &tracks).await?.map_err(refused)?;
        Ok(Json(self.whole(row.id, Some(session)).await?))
    }

    /// An account's playlists that you may see, newest first.
    #[oai(path = "/v1/users/:username/playlists", method = "get")]
    async fn of_user(
        &self,
        username: Path<String>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 64))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: MaybeAuth,
    ) -> Result<Json<PlaylistPage>, ApiError> {
        let user = crate::social::account(&self.state, &username.0).await?;
        let after = decode_keyset(cursor.0.as_deref())?;
        let page =
            self.state.social.user_playlists(user.id, viewer(auth.session()), after, page_limit(limit.0)?).await?;
        let playlists = views(&self.state, page.items, auth.session()).await?;
        Ok(Json(PlaylistPage { playlists, next_cursor: page.next.map(encode_keyset) }))
    }
}
