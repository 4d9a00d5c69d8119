//! Track routes: the whole track, its status (poll with ETags, or follow as Server-Sent
//! Events), the catalogue with a keyset cursor, metadata edits, deletion and reprocessing.
//!
//! Access: a private track is visible only to its owner (and admins); to everyone else it
//! answers 404, exactly as a track that does not exist. Edits and deletion are the owner's;
//! another user gets 403 on a public track (and 404 on a private one).
//!
//! The owner can make a secret share link (`PUT /v1/tracks/{id}/share`): only its SHA-256 is
//! stored, and with it anyone sees the track and gets its signed URLs
//! (`GET /v1/tracks/{id}/signed-urls?secret=…`), which play without a session.
//!
//! SSE sends one event per committed change of state, stage or progress, relayed from
//! PostgreSQL notifications (see [`crate::status_feed`]); a comment every 15 s keeps proxies
//! from closing an idle stream. The stream ends after `ready` or `failed`, or on deletion.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use md5::{Digest, Md5};
use poem::Request;
use poem::web::sse::Event;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::{EventStream, Json};
use poem_openapi::types::Any;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use waveline_shared::db::social::Target;
use waveline_shared::db::{TrackDetails, TrackPatch, Visibility};
use waveline_shared::documents::ActivityObject;
use waveline_shared::domain::{TrackId, UserId};
use waveline_shared::storage::Storage;

use crate::auth::{Auth, MaybeAuth, Session};
use crate::error::{ApiError, ErrorBody};
use crate::events::{StreamSlots, Watch};
use crate::media::signed_prefix;
use crate::status_feed::Announced;
use crate::throttle::ClientAddr;
use crate::uploads::{UploadAccepted, UploadForm};
use crate::{AppState, may_see, parse_track_id};

#[derive(Tags)]
enum Tag {
    /// Tracks and their processing.
    Tracks,
}

/// The track routes.
#[derive(Debug)]
pub struct Tracks {
    pub state: AppState,
    /// The open event streams.
    pub streams: Arc<StreamSlots>,
}

/// Where a track is in processing.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct TrackStatus {
    id: String,
    /// `awaiting_upload`, `uploaded`, `queued`, `processing`, `ready` or `failed`.
    state: String,
    /// While processing: `probing`, `decoding`, `analyzing`, `encoding` or `storing`.
    stage: Option<String>,
    /// 0–100.
    progress: i16,
    attempts: i32,
    revision: i32,
    /// Set when the state is `failed`.
    error: Option<ErrorBody>,
}

impl TrackStatus {
    /// Whether nothing will change any more (`ready` or `failed`).
    pub fn is_final(&self) -> bool {
        self.state == "ready" || self.state == "failed"
    }

    /// The status a notification announces (`None` for one without a state).
    pub(crate) fn announced(announced: &Announced) -> Option<TrackStatus> {
        Some(TrackStatus {
            id: announced.id.to_string(),
            state: announced.state.clone()?,
            stage: announced.stage.clone(),
            progress: announced.progress,
            attempts: announced.attempts,
            revision: announced.revision,
            error: announced
                .error_code
                .clone()
                .map(|code| ErrorBody { code, message: announced.error_message.clone().unwrap_or_default() }),
        })
    }
}

impl From<&TrackDetails> for TrackStatus {
    fn from(track: &TrackDetails) -> TrackStatus {
        TrackStatus {
            id: track.id.to_string(),
            state: track.state.as_str().to_owned(),
            stage: track.stage.map(|stage| stage.as_str().to_owned()),
            progress: track.progress,
            attempts: track.attempts,
            revision: track.revision,
            error: track
                .error_code
                .clone()
                .map(|code| ErrorBody { code, message: track.error_message.clone().unwrap_or_default() }),
        }
    }
}

/// Who uploaded a track.
#[derive(Debug, Object)]
pub struct OwnerView {
    id: String,
    username: String,
}

/// A track, whole.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct TrackView {
    id: String,
    owner: OwnerView,
    title: String,
    description: String,
    genre: Option<String>,
    tags: Vec<String>,
    /// `public` or `private`.
    visibility: String,
    /// Only premium listeners (and the owner, and admins) play it in full.
    premium_only: bool,
    /// How the viewer may listen: `playable`, `preview` (the 30 s `preview` stream only) or
    /// `blocked`.
    access: crate::access::TrackAccess,
    state: String,
    stage: Option<String>,
    progress: i16,
    error: Option<ErrorBody>,
    revision: i32,
    /// Known once processed.
    duration_ms: Option<i64>,
    /// Integrated loudness (LUFS), loudness range (LU), true peak (dBTP), ReplayGain.
    loudness: Option<Any<serde_json::Value>>,
    /// Tags read from the file (title, artist, album, …).
    file_tags: Option<Any<serde_json::Value>>,
    /// The audiowaveform JSON (`?format=dat` or `summary` for the others).
    waveform_url: Option<String>,
    /// Progressive streams by preset, with byte ranges.
    stream_urls: BTreeMap<String, String>,
    hls_master_url: Option<String>,
    /// The artwork's `large` (100×100) JPEG: uploaded, or else the artwork embedded in the
    /// audio file; `t500x500`, `t300x300`, `t67x67` or `small` in place of `large` for the
    /// other sizes. Absent until artwork is ready.
    artwork_url: Option<String>,
    /// The latest artwork's processing: `pending`, `processing`, `ready` or `failed`; absent
    /// when the track has none.
    artwork_state: Option<String>,
    /// Why the latest artwork failed (`invalid_image`, …).
    artwork_error: Option<ErrorBody>,
    /// Accounts that like the track.
    likes_count: i64,
    /// Accounts that reposted it.
    reposts_count: i64,
    /// Its timestamped comments, replies included.
    comment_count: i64,
    /// Counted plays: listeners starting the stream, once per listener per 30 min, the
    /// owner's own not counted (see `GET /v1/tracks/{id}/stats`).
    playback_count: i64,
    /// For a signed-in viewer: whether they like it.
    user_liked: Option<bool>,
    /// For a signed-in viewer: whether they reposted it.
    user_reposted: Option<bool>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TrackView {
    /// The view with its social counts, and the viewer's own marks when signed in.
    pub fn with_social(
        mut self,
        stats: waveline_shared::db::social::Stats,
        comments: u64,
        signed_in: bool,
    ) -> TrackView {
        self.likes_count = stats.likes;
        self.reposts_count = stats.reposts;
        self.comment_count = i64::try_from(comments).unwrap_or(i64::MAX);
        self.user_liked = signed_in.then_some(stats.liked);
        self.user_reposted = signed_in.then_some(stats.reposted);
        self
    }

    /// The view for a viewer with (or without) premium access to the track.
    pub fn with_access(mut self, premium: bool) -> TrackView {
        let has_preview = self.stream_urls.contains_key("preview");
        self.access = crate::access::track_access(self.premium_only, has_preview, premium);
        self
    }

    /// The view with its artwork's URL and state.
    pub(crate) fn with_artwork(mut self, artwork: crate::artwork::ImageFields) -> TrackView {
        self.artwork_url = artwork.url;
        self.artwork_state = artwork.state;
        self.artwork_error = artwork.error;
        self
    }

    /// The track's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Its duration, once processed.
    pub fn duration_ms(&self) -> Option<i64> {
        self.duration_ms
    }

    /// Its comments, replies included.
    pub fn comment_count(&self) -> i64 {
        self.comment_count
    }

    /// The view as the API's JSON: what `GET /v1/tracks/{id}` answers, and what the CLI's
    /// `tracks show --json` and `tracks list --json` print.
    pub fn to_json(&self) -> serde_json::Value {
        poem_openapi::types::ToJSON::to_json(self).unwrap_or_default()
    }
}

impl From<TrackDetails> for TrackView {
    fn from(track: TrackDetails) -> TrackView {
        let status = TrackStatus::from(&track);
        let base = format!("/v1/tracks/{}", track.id);
        let ready = track.ready_revision.is_some();
        let stream_urls = track
            .presets
            .iter()
            .filter(|preset| crate::media::PROGRESSIVE.contains(&preset.as_str()))
            .map(|preset| (preset.clone(), format!("{base}/stream/{preset}")))
            .collect();
        TrackView {
            id: status.id,
            owner: OwnerView { id: track.owner_id.to_string(), username: track.owner_username },
            title: track.title,
            description: track.description,
            genre: track.genre,
            tags: track.tags,
            visibility: track.visibility.as_str().to_owned(),
            premium_only: track.premium_only,
            // As its owner sees it; [`TrackView::with_access`] sets it for another viewer.
            access: crate::access::TrackAccess::Playable,
            state: status.state,
            stage: status.stage,
            progress: status.progress,
            error: status.error,
            revision: track.revision,
            duration_ms: track.duration_ms,
            loudness: track.loudness.map(Any),
            file_tags: track.track_tags.map(Any),
            waveform_url: ready.then(|| format!("{base}/waveform")),
            stream_urls,
            hls_master_url: track.presets.iter().any(|p| p == "aac_hls").then(|| format!("{base}/hls/master.m3u8")),
            artwork_url: None,
            artwork_state: None,
            artwork_error: None,
            likes_count: 0,
            reposts_count: 0,
            comment_count: 0,
            playback_count: track.playback_count,
            user_liked: None,
            user_reposted: None,
            created_at: track.created_at,
            updated_at: track.updated_at,
        }
    }
}

/// Signed URLs, valid until `expires_at`.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct SignedUrls {
    expires_at: DateTime<Utc>,
    /// Seconds from now.
    expires_in: u64,
    /// Progressive streams by preset.
    stream_urls: BTreeMap<String, String>,
    /// The master playlist; its variants and segments are covered by the same signature.
    hls_master_url: Option<String>,
    waveform_url: String,
}

/// A secret share link.
#[derive(Debug, Object)]
struct ShareLink {
    /// The secret: keep it; it is not shown again.
    secret: String,
    /// The track, with the secret.
    url: String,
    /// Where the link's holder gets playable (signed) URLs.
    signed_urls: String,
}

#[derive(ApiResponse)]
enum ShareResponse {
    /// The new link; any previous one no longer works.
    #[oai(status = 201)]
    Created(Json<ShareLink>),
}

#[derive(ApiResponse)]
enum Unshared {
    /// The link no longer works.
    #[oai(status = 204)]
    Done,
}

/// A page of tracks.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct TrackPage {
    tracks: Vec<TrackView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
}

/// A metadata edit; absent fields stay as they are.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct TrackEdit {
    /// 1–200 characters, not only spaces; no control characters but tab and newline.
    #[oai(validator(
        max_length = 200,
        pattern = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*[^\s\uFEFF\u0000-\u001F\u007F-\u009F][^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$"
    ))]
    title: Option<String>,
    /// At most 5000 characters; no control characters but tab and newline.
    #[oai(validator(max_length = 5000, pattern = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$"))]
    description: Option<String>,
    /// At most 100 characters; empty clears it.
    #[oai(validator(max_length = 100, pattern = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$"))]
    genre: Option<String>,
    /// At most 20 tags of 1–50 characters, not only spaces.
    #[oai(validator(
        max_items = 20,
        max_length = 50,
        pattern = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*[^\s\uFEFF\u0000-\u001F\u007F-\u009F][^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$"
    ))]
    tags: Option<Vec<String>>,
    visibility: Option<VisibilityChoice>,
    /// Only premium listeners (and the owner, and admins) play it in full.
    premium_only: Option<bool>,
}

/// Who may see a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "lowercase")]
pub enum VisibilityChoice {
    /// Everyone.
    Public,
    /// Its owner (and admins), and holders of its share link.
    Private,
}

impl From<VisibilityChoice> for Visibility {
    fn from(choice: VisibilityChoice) -> Visibility {
        match choice {
            VisibilityChoice::Public => Visibility::Public,
            VisibilityChoice::Private => Visibility::Private,
        }
    }
}

#[derive(ApiResponse)]
enum StatusResponse {
    /// The status, with a strong ETag.
    #[oai(status = 200)]
    Ok(Json<TrackStatus>, #[oai(header = "ETag")] String, #[oai(header = "Cache-Control")] String),
    /// Unchanged since the ETag in `If-None-Match`.
    #[oai(status = 304)]
    NotModified(#[oai(header = "ETag")] String),
}

#[derive(ApiResponse)]
enum Deleted {
    /// The track and all its objects are gone.
    #[oai(status = 204)]
    Done,
}

#[derive(ApiResponse)]
enum Requeued {
    /// Queued for a new revision; the current renditions stay live until it is ready.
    #[oai(status = 202)]
    Accepted(Json<TrackStatus>),
}

/// Checks and normalises the free-text fields shared by uploads and edits.
pub(crate) fn check_text(field: &str, text: &str, min: usize, max: usize) -> Result<String, ApiError> {
    let text = text.trim();
    let count = text.chars().count();
    if count < min || count > max {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("{field}: expected {min} to {max} characters, got {count}"),
        ));
    }
    if text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::bad_request("invalid_field", format!("{field}: control characters are not allowed")));
    }
    Ok(text.to_owned())
}

pub(crate) fn check_tags(tags: &[String]) -> Result<Vec<String>, ApiError> {
    if tags.len() > 20 {
        return Err(ApiError::bad_request("invalid_field", "tags: at most 20"));
    }
    tags.iter().map(|tag| check_text("tags", tag, 1, 50)).collect()
}

pub(crate) fn check_visibility(text: &str) -> Result<Visibility, ApiError> {
    Visibility::parse(text.trim())
        .ok_or_else(|| ApiError::bad_request("invalid_field", "visibility: expected `public` or `private`"))
}

/// A strong ETag: the MD5 of the status's JSON, the same on every replica.
fn etag_of(status: &TrackStatus) -> String {
    let bytes = serde_json::to_vec(status).unwrap_or_default();
    format!("\"{:x}\"", Md5::digest(&bytes))
}

fn encode_cursor((at, id): (DateTime<Utc>, TrackId)) -> String {
    format!("{}.{}", at.timestamp_micros(), id.0.simple())
}

fn decode_cursor(text: &str) -> Result<(DateTime<Utc>, TrackId), ApiError> {
    let bad = || ApiError::bad_request("invalid_field", "cursor: not one this API returned");
    let (micros, id) = text.split_once('.').ok_or_else(bad)?;
    let at = DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

impl Tracks {
    /// The track if `viewer` may see it; 404 otherwise.
    async fn visible(&self, id: &str, viewer: Option<&Session>) -> Result<TrackDetails, ApiError> {
        self.visible_with(id, viewer, None).await
    }

    /// Like [`Tracks::visible`], and a private track is also visible with its secret share
    /// token (unless its owner is suspended).
    async fn visible_with(
        &self,
        id: &str,
        viewer: Option<&Session>,
        secret: Option<&str>,
    ) -> Result<TrackDetails, ApiError> {
        let id = parse_track_id(id)?;
        let track = self.state.tracks.details(id).await?.ok_or_else(|| ApiError::not_found("track"))?;
        if may_see(track.owner_id, track.visibility, viewer) {
            return Ok(track);
        }
        if let Some(secret) = secret.filter(|secret| secret.len() <= 128) {
            let stored = self.state.tracks.share_hash(id).await?;
            let given = Sha256::digest(secret.trim().as_bytes());
            if stored.is_some_and(|stored| bool::from(stored.as_slice().ct_eq(&given[..]))) {
                return Ok(track);
            }
        }
        Err(ApiError::not_found("track"))
    }

    /// The track if `session` owns it: 404 when they cannot see it, 403 when they can but do
    /// not own it. Admins may act on any track only where `admin_too`.
    async fn owned(&self, id: &str, session: &Session, admin_too: bool) -> Result<TrackDetails, ApiError> {
        let track = self.visible(id, Some(session)).await?;
        if track.owner_id != session.user.id && !(admin_too && session.is_admin()) {
            return Err(ApiError::forbidden("only the track's owner may do this"));
        }
        Ok(track)
    }
}

#[OpenApi(tag = "Tag::Tracks")]
impl Tracks {
    /// The catalogue, newest first: public tracks that can be played, or one user's with
    /// `owner`. Logged in, you also see all of your own, private or still processing.
    #[oai(path = "/v1/tracks", method = "get")]
    async fn list(
        &self,
        /// A username.
        #[oai(validator(pattern = r"^[a-z0-9_-]{3,30}$"))]
        owner: Query<Option<String>>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(pattern = r"^[0-9]{1,16}\.[0-9a-f]{32}$"))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: MaybeAuth,
    ) -> Result<Json<TrackPage>, ApiError> {
        let owner = match owner.0 {
            Some(username) => {
                Some(self.state.users.by_username(&username).await?.ok_or_else(|| ApiError::not_found("user"))?.id)
            }
            None => None,
        };
        let after = cursor.0.as_deref().map(decode_cursor).transpose()?;
        let viewer = auth.session().map(|session| session.user.id);
        let page = self.state.tracks.page(owner, viewer, after, limit.0.unwrap_or(20)).await?;
        Ok(Json(TrackPage {
            tracks: crate::social::track_views(&self.state, page.tracks, auth.session()).await?,
            next_cursor: page.next.map(encode_cursor),
        }))
    }

    /// Uploads a track (multipart: `file` plus optional `title`, `description`, `genre`,
    /// `tags`, `visibility`). The body streams into storage; the answer is 202 with the
    /// track `queued`.
    #[oai(path = "/v1/tracks", method = "post", tag = "Tag::Tracks")]
    async fn upload(&self, auth: Auth, req: &Request, form: UploadForm) -> Result<UploadAccepted, ApiError> {
        crate::uploads::upload(&self.state, auth, req, form).await
    }

    /// The whole track: metadata, processing state, loudness, and where to listen. A private
    /// track is visible to others with its share link's `secret`.
    #[oai(path = "/v1/tracks/:id", method = "get")]
    async fn get(
        &self,
        id: Path<String>,
        /// The track's share-link secret.
        #[oai(validator(max_length = 128))]
        secret: Query<Option<String>>,
        auth: MaybeAuth,
    ) -> Result<Json<TrackView>, ApiError> {
        let track = self.visible_with(&id.0, auth.session(), secret.0.as_deref()).await?;
        Ok(Json(crate::social::track_view(&self.state, track, auth.session()).await?))
    }

    /// Signed, expiring URLs for the track's streams, HLS and waveform: they play without a
    /// cookie or token (a CDN, an embedded player), until `expires_at`. For whoever may see
    /// the track, including holders of its share link's `secret`.
    #[oai(path = "/v1/tracks/:id/signed-urls", method = "get")]
    async fn signed_urls(
        &self,
        id: Path<String>,
        /// The track's share-link secret.
        #[oai(validator(max_length = 128))]
        secret: Query<Option<String>>,
        auth: MaybeAuth,
    ) -> Result<Json<SignedUrls>, ApiError> {
        let track = self.visible_with(&id.0, auth.session(), secret.0.as_deref()).await?;
        if track.ready_revision.is_none() {
            return Err(ApiError::conflict(
                "not_ready",
                format!("the track is {}; its streams appear when it is ready", track.state),
            ));
        }
        let ttl = self.state.security.signed_url_ttl;
        let expires_at = Utc::now() + ttl;
        let expires = expires_at.timestamp();
        let tokens = &self.state.tokens;
        // The access the URLs grant is the viewer's now (see `crate::access`).
        let premium = crate::access::premium_access(auth.session(), track.owner_id);
        let streams = track
            .presets
            .iter()
            .filter(|preset| crate::media::PROGRESSIVE.contains(&preset.as_str()))
            .map(|preset| {
                let scope = format!("stream/{preset}");
                (preset.clone(), format!("{}/{scope}", signed_prefix(tokens, track.id, &scope, expires, premium)))
            })
            .collect();
        let hls = track.presets.iter().any(|p| p == "aac_hls");
        Ok(Json(SignedUrls {
            expires_at,
            expires_in: ttl.as_secs(),
            stream_urls: streams,
            hls_master_url: hls
                .then(|| format!("{}/hls/master.m3u8", signed_prefix(tokens, track.id, "hls", expires, premium))),
            waveform_url: format!("{}/waveform", signed_prefix(tokens, track.id, "waveform", expires, premium)),
        }))
    }

    /// Makes (or replaces) the track's secret share link: anyone with it can see and play the
    /// track, even private. The secret is shown only here; replacing it revokes the old link.
    #[oai(path = "/v1/tracks/:id/share", method = "put")]
    async fn share(&self, id: Path<String>, auth: Auth) -> Result<ShareResponse, ApiError> {
        let track = self.owned(&id.0, auth.session(), false).await?;
        let bytes: [u8; 24] = rand::random();
        let secret = URL_SAFE_NO_PAD.encode(bytes);
        self.state.tracks.set_share_hash(track.id, Some(&Sha256::digest(secret.as_bytes())[..])).await?;
        Ok(ShareResponse::Created(Json(ShareLink {
            url: format!("/v1/tracks/{}?secret={secret}", track.id),
            signed_urls: format!("/v1/tracks/{}/signed-urls?secret={secret}", track.id),
            secret,
        })))
    }

    /// Revokes the track's share link.
    #[oai(path = "/v1/tracks/:id/share", method = "delete")]
    async fn unshare(&self, id: Path<String>, auth: Auth) -> Result<Unshared, ApiError> {
        let track = self.owned(&id.0, auth.session(), false).await?;
        self.state.tracks.set_share_hash(track.id, None).await?;
        Ok(Unshared::Done)
    }

    /// Changes a track's metadata (owner only).
    #[oai(path = "/v1/tracks/:id", method = "patch")]
    async fn patch(&self, id: Path<String>, body: Json<TrackEdit>, auth: Auth) -> Result<Json<TrackView>, ApiError> {
        let track = self.owned(&id.0, auth.session(), false).await?;
        let edit = body.0;
        let patch = TrackPatch {
            title: edit.title.as_deref().map(|t| check_text("title", t, 1, 200)).transpose()?,
            description: edit.description.as_deref().map(|d| check_text("description", d, 0, 5000)).transpose()?,
            genre: edit
                .genre
                .as_deref()
                .map(|g| check_text("genre", g, 0, 100).map(|g| (!g.is_empty()).then_some(g)))
                .transpose()?,
            tags: edit.tags.as_deref().map(check_tags).transpose()?,
            visibility: edit.visibility.map(Visibility::from),
            premium_only: edit.premium_only,
        };
        if !self.state.tracks.update_metadata(track.id, &patch).await? {
            return Err(ApiError::not_found("track"));
        }
        self.state.track_changed(track.id);
        if patch.visibility == Some(Visibility::Public)
            && let Err(err) = self.state.social.announce(self.state.documents.as_ref(), Target::Track(track.id)).await
        {
            // The edit stands; the activity is written the next time the track becomes public.
            tracing::warn!(track = %track.id, error = %err, "could not write the track's activity");
        }
        let track = self.state.tracks.details(track.id).await?.ok_or_else(|| ApiError::not_found("track"))?;
        Ok(Json(crate::social::track_view(&self.state, track, Some(auth.session())).await?))
    }

    /// Deletes a track with its original and every rendition (owner only).
    #[oai(path = "/v1/tracks/:id", method = "delete")]
    async fn delete(&self, id: Path<String>, auth: Auth) -> Result<Deleted, ApiError> {
        let track = self.owned(&id.0, auth.session(), false).await?;
        // Its documents first (comments, and activities about it), so a document store that
        // is down leaves the track whole, to delete again. Then the row: from then on nothing
        // serves or processes it (a worker mid-job loses its claim and cleans up after
        // itself); then the objects.
        self.state.documents.delete_track_comments(track.id).await?;
        self.state.documents.delete_object_activities(ActivityObject::Track(track.id), None).await?;
        self.state.tracks.delete(track.id).await?;
        self.state.track_changed(track.id);
        // Its artwork's objects too: they lie under one of the track's prefixes.
        delete_objects(self.state.storage.as_ref(), track.id).await;
        tracing::info!(track = %track.id, "track deleted");
        Ok(Deleted::Done)
    }

    /// Processes a ready or failed track again (owner or admin).
    #[oai(path = "/v1/tracks/:id/reprocess", method = "post")]
    async fn reprocess(&self, id: Path<String>, auth: Auth) -> Result<Requeued, ApiError> {
        let track = self.owned(&id.0, auth.session(), true).await?;
        if !track.state.is_terminal() {
            return Err(ApiError::conflict(
                "not_finished",
                format!("the track is {}; it can be reprocessed once ready or failed", track.state),
            ));
        }
        if !self.state.tracks.enqueue(track.id, track.state).await? {
            return Err(ApiError::conflict("state_changed", "the track changed state meanwhile; try again"));
        }
        self.state.track_changed(track.id);
        self.state.publish_soon();
        let track = self.state.tracks.details(track.id).await?.ok_or_else(|| ApiError::not_found("track"))?;
        Ok(Requeued::Accepted(Json(TrackStatus::from(&track))))
    }

    /// A track's processing status; poll it with `If-None-Match`.
    #[oai(path = "/v1/tracks/:id/status", method = "get")]
    async fn status(
        &self,
        id: Path<String>,
        #[oai(name = "If-None-Match")] if_none_match: Header<Option<String>>,
        auth: MaybeAuth,
    ) -> Result<StatusResponse, ApiError> {
        // From the process's status cache (see `status_feed`): no database round trip while
        // the notifications keep it current.
        let id = parse_track_id(&id.0)?;
        let announced = self
            .state
            .status_feed
            .status(&self.state.tracks, id)
            .await
            .map_err(|err| ApiError::unavailable("database", &err))?
            .ok_or_else(|| ApiError::not_found("track"))?;
        let owner = announced.owner_id.map(UserId);
        let visibility = announced.visibility.as_deref().and_then(Visibility::parse);
        let (Some(owner), Some(visibility)) = (owner, visibility) else {
            return Err(ApiError::internal(&"a cached status without its owner or visibility"));
        };
        if !may_see(owner, visibility, auth.session()) {
            return Err(ApiError::not_found("track"));
        }
        let status = || {
            TrackStatus::announced(&announced).ok_or_else(|| ApiError::internal(&"a cached status without its state"))
        };
        // Computed once per cached status, however often it is polled.
        let etag = match announced.etag.get() {
            Some(etag) => etag.clone(),
            None => {
                let computed = etag_of(&status()?);
                announced.etag.get_or_init(|| computed).clone()
            }
        };
        let matches = if_none_match.0.as_deref().is_some_and(|header| crate::serve::none_match(header, &etag));
        Ok(if matches {
            StatusResponse::NotModified(etag)
        } else {
            StatusResponse::Ok(Json(status()?), etag, "no-cache".to_owned())
        })
    }

    /// Server-Sent Events: a `status` event now and at every change of state, stage or
    /// progress, as it commits; the stream ends after `ready` or `failed`.
    #[oai(path = "/v1/tracks/:id/events", method = "get")]
    async fn events(
        &self,
        id: Path<String>,
        auth: MaybeAuth,
        req: &Request,
    ) -> Result<EventStream<BoxStream<'static, TrackStatus>>, ApiError> {
        // Counted per client as the rate limiter counts them: an IPv6 client by its /64.
        let slot = self.streams.take(req.data::<ClientAddr>().map(|client| crate::throttle::key_of(client.0)))?;
        // Subscribe before reading, so no change falls between the two.
        let changes = self.state.status_feed.subscribe();
        let track = self.visible(&id.0, auth.session()).await?;
        let watch = Watch {
            id: track.id,
            tracks: self.state.tracks.clone(),
            feed: self.state.status_feed.clone(),
            changes,
            last: None,
            pending: Some(TrackStatus::from(&track)),
            finished: false,
            viewer: auth.session().map(|session| (session.user.id, session.is_admin())),
            _slot: slot,
        };
        let stream = futures::stream::unfold(watch, |mut watch| async move {
            let status = watch.next().await?;
            Some((status, watch))
        });
        Ok(EventStream::new(Box::pin(stream) as BoxStream<'static, TrackStatus>)
            .keep_alive(Duration::from_secs(15))
            .to_event(|status| {
                let data = serde_json::to_string(&status).unwrap_or_default();
                Event::message(data).event_type("status")
            }))
    }
}

/// Removes every object of a track (its original, an unfinished direct upload, every
/// revision); failures are logged (the row is already gone, and a leftover object costs only
/// space).
pub(crate) async fn delete_objects(storage: &dyn Storage, id: TrackId) {
    for prefix in waveline_shared::storage::track_prefixes(id) {
        if let Err(err) = storage.delete_prefix(&prefix).await {
            tracing::error!(track = %id, %prefix, error = %err, "could not delete a deleted track's objects");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_forgeries() {
        let at = DateTime::from_timestamp_micros(1_764_151_234_567_890).expect("time");
        let id = TrackId::new();
        assert_eq!(decode_cursor(&encode_cursor((at, id))).expect("decode"), (at, id));
        for bad in ["", "x.y", "123", "123.not-a-uuid", "99999999999999999999.0"] {
            assert_eq!(decode_cursor(bad).expect_err(bad).code, "invalid_field");
        }
    }

    #[test]
    fn text_fields_are_bounded() {
        assert_eq!(check_text("title", "  Night Drive  ", 1, 200).expect("ok"), "Night Drive");
        assert!(check_text("title", "   ", 1, 200).is_err());
        assert!(check_text("title", &"é".repeat(201), 1, 200).is_err());
        assert!(check_text("title", "bell\u{7}", 1, 200).is_err());
        assert!(check_tags(&vec!["x".to_owned(); 21]).is_err());
        assert_eq!(check_visibility("private").expect("ok"), Visibility::Private);
        assert!(check_visibility("secret").is_err());
    }
}
