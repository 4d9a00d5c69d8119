//! The listening routes: progressive streams, HLS, waveforms.
//!
//! They serve the live revision (`ready_revision`): while a track is reprocessed, listeners
//! keep the previous renditions until the new ones are committed. A track with no ready
//! revision yet answers 409 `not_ready` with its state. Private tracks answer 404 to everyone
//! but their owner and admins.
//!
//! HLS URLs carry no revision, so playlists are cached briefly (`max-age=30`) and segments
//! for an hour; every response has a strong ETag to revalidate with.
//!
//! **Signed URLs.** Every listening route also answers under
//! `/v1/signed/{expires}/{signature}/tracks/{id}/…`, without a cookie or token: the signature
//! is an HMAC (a key derived from the signing key) over the track, the scope (`stream/PRESET`,
//! `hls` or `waveform`) and the expiry, so one signature covers a whole HLS tree and nothing
//! else. The signature lives in the path rather than the query so that the playlists' relative
//! URIs resolve beneath it (a player needs nothing rewritten) and CDNs that drop query strings
//! from their cache keys still tell versions apart. `GET /v1/tracks/{id}/signed-urls` mints
//! them (default lifetime 5 min, `signed_url_ttl_s`). A tampered one answers 403
//! `bad_signature`, an expired one 403 `url_expired`; a private track whose owner is suspended
//! answers 404 to them.
//!
//! **Delivery.** Every request takes one path: look the track up (cached), check access,
//! choose the object, then [`Media::deliver`] it: in proxy mode `serve_object` streams it from
//! storage; in redirect mode (`stream_mode = redirect`) it answers 307 to a presigned storage
//! URL or the CDN, or serves an HLS playlist with rewritten URIs ([`crate::redirect`] has the
//! rules). Access is checked before either, the same way, so both modes refuse the same
//! requests. Plays are counted ([`crate::plays`]: a range from byte 0, or the first HLS
//! segment) in `serve_track` between the choice of object and `deliver`: the one point every
//! listening request passes once, in both modes, before any byte or redirect goes out.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use poem::Request;
use poem::http::{Method, StatusCode};
use poem_openapi::param::{Path, Query};
use poem_openapi::{Enum, OpenApi, Tags};
use waveline_shared::db::{Playable, Visibility};
use waveline_shared::domain::TrackId;
use waveline_shared::storage::{ObjectKey, ReadMethod};

use crate::auth::MaybeAuth;
use crate::error::ApiError;
use crate::plays::Start;
use crate::redirect::{self, Grant};
use crate::serve::{ObjectResponse, ObjectSpec, serve_object};
use crate::{AppState, may_see, parse_track_id};

#[derive(Tags)]
enum Tag {
    /// Listening: progressive streams with byte ranges, HLS, waveforms.
    Streaming,
}

/// The listening routes.
#[derive(Debug)]
pub struct Media {
    pub state: AppState,
}

/// The presets served progressively.
pub const PROGRESSIVE: [&str; 3] = ["mp3_128", "opus_64", "preview"];

/// Which waveform file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum WaveformFormat {
    /// audiowaveform's JSON (the default).
    Json,
    /// audiowaveform's binary `.dat`.
    Dat,
    /// The 1800-point summary for players.
    Summary,
}

/// A short-lived, per-process cache of what the listening routes look up. A player sends a
/// run of range requests (and HLS segment requests) for one track; with the cache they cost
/// one database query per track and preset every [`PLAYABLE_TTL`], not one each.
///
/// Only playable tracks are cached. Every change of a track that the status feed hears (a new
/// revision going live, a visibility change, a deletion, made by any replica or worker) drops
/// the track's entries at once ([`StatusFeed::keep_current`](crate::status_feed::StatusFeed::keep_current)),
/// and the feed empties the cache whenever notifications may have been lost; an edit through
/// this process drops them even before the notification arrives. This matters with the stream
/// cache: a replaced revision's files may outlive their removal from the store there, so the
/// routes must not keep naming them. An object that is gone from storage drops the entry and
/// is looked up again before anything is answered.
#[derive(Debug, Default)]
pub struct PlayableCache {
    entries: Mutex<Entries>,
}

/// track → preset → (when it was looked up, what was found).
type Entries = HashMap<TrackId, HashMap<Option<String>, (Instant, Playable)>>;

/// How long a cached lookup is used.
pub const PLAYABLE_TTL: Duration = Duration::from_secs(2);
/// The most tracks held.
const PLAYABLE_MAX: usize = 10_000;

impl PlayableCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: TrackId, preset: &Option<String>) -> Option<Playable> {
        self.lock()
            .get(&id)?
            .get(preset)
            .filter(|(at, _)| at.elapsed() < PLAYABLE_TTL)
            .map(|(_, playable)| playable.clone())
    }

    fn put(&self, id: TrackId, preset: Option<String>, playable: Playable) {
        let mut entries = self.lock();
        if entries.len() >= PLAYABLE_MAX && !entries.contains_key(&id) {
            entries.retain(|_, presets| {
                presets.retain(|_, (at, _)| at.elapsed() < PLAYABLE_TTL);
                !presets.is_empty()
            });
            if entries.len() >= PLAYABLE_MAX {
                entries.clear();
            }
        }
        entries.entry(id).or_default().insert(preset, (Instant::now(), playable));
    }

    /// Drops every entry of a track (after a change to it).
    pub fn forget(&self, id: TrackId) {
        self.lock().remove(&id);
    }

    /// Drops everything (changes may have gone unheard).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// Who is asking: a viewer (maybe anonymous), or the holder of a valid signed URL.
#[derive(Debug, Clone, Copy)]
enum Access<'a> {
    Viewer(&'a MaybeAuth),
    /// Until this Unix time.
    Signed(i64),
}

impl Access<'_> {
    fn may_play(&self, playable: &Playable) -> bool {
        match self {
            Access::Viewer(auth) => {
                let session = auth.session();
                let admin = session.is_some_and(|session| session.is_admin());
                may_see(playable.owner_id, playable.visibility, session)
                    && (playable.visibility == Visibility::Public || !playable.owner_suspended || admin)
            }
            Access::Signed(_) => playable.visibility == Visibility::Public || !playable.owner_suspended,
        }
    }

    /// What this caller was granted, for where a redirect may send them.
    fn grant(&self, playable: &Playable) -> Grant {
        Grant {
            public: playable.visibility == Visibility::Public,
            signed_until: match self {
                Access::Signed(until) => Some(*until),
                Access::Viewer(_) => None,
            },
        }
    }

    /// `Cache-Control` for what this caller gets. A signed URL names one version for a bounded
    /// time, and its path is the key: shared caches (a CDN) may keep it until it expires.
    fn cache(&self, playable: &Playable, max_age: i64) -> String {
        match (self, playable.visibility) {
            (Access::Signed(expires), _) => {
                let left = (expires - chrono::Utc::now().timestamp()).clamp(0, max_age);
                format!("public, max-age={left}")
            }
            (Access::Viewer(_), Visibility::Public) => format!("public, max-age={max_age}"),
            (Access::Viewer(_), Visibility::Private) => format!("private, max-age={max_age}"),
        }
    }
}

/// The signed path prefix of a track's listening routes.
pub fn signed_prefix(tokens: &crate::auth::Tokens, id: TrackId, scope: &str, expires: i64) -> String {
    let signature = tokens.sign_url(&format!("{id}/{scope}"), expires);
    format!("/v1/signed/{expires}/{signature}/tracks/{id}")
}

/// Checks a signed URL's signature, then its expiry.
fn check_signature(
    tokens: &crate::auth::Tokens,
    id: &str,
    scope: &str,
    expires: &str,
    signature: &str,
) -> Result<i64, ApiError> {
    let bad = || ApiError::forbidden("the URL's signature does not match").with_code("bad_signature");
    let id = parse_track_id(id)?;
    let expires: i64 = expires.parse().map_err(|_| bad())?;
    if !tokens.url_signature_holds(&format!("{id}/{scope}"), expires, signature) {
        return Err(bad());
    }
    if expires < chrono::Utc::now().timestamp() {
        return Err(ApiError::forbidden("the signed URL has expired; ask for a new one").with_code("url_expired"));
    }
    Ok(expires)
}

impl Media {
    /// The track as the caller may play it (404 when it is missing or hidden from them, 409
    /// when nothing is ready yet), and whether it came from the cache.
    async fn playable(
        &self,
        id: TrackId,
        preset: Option<&str>,
        access: Access<'_>,
        use_cache: bool,
    ) -> Result<(Playable, bool), ApiError> {
        let preset_key = preset.map(str::to_owned);
        let cached = if use_cache { self.state.playables.get(id, &preset_key) } else { None };
        let from_cache = cached.is_some();
        let playable = match cached {
            Some(playable) => playable,
            None => {
                let playable =
                    self.state.tracks.playable(id, preset).await?.ok_or_else(|| ApiError::not_found("track"))?;
                if playable.ready_revision.is_some() {
                    self.state.playables.put(id, preset_key, playable.clone());
                }
                playable
            }
        };
        if !access.may_play(&playable) {
            return Err(ApiError::not_found("track"));
        }
        if playable.ready_revision.is_none() {
            return Err(ApiError::conflict(
                "not_ready",
                format!("the track is {}; its streams appear when it is ready", playable.state),
            ));
        }
        Ok((playable, from_cache))
    }

    /// Delivers the object `pick` chooses from the track's live revision. When a cached lookup
    /// names an object that is gone (its revision was just replaced), looks again.
    async fn serve_track<F>(
        &self,
        req: &Request,
        id: &str,
        preset: Option<&str>,
        access: Access<'_>,
        start: Option<(Start, Option<&str>)>,
        pick: F,
    ) -> Result<ObjectResponse, ApiError>
    where
        F: Fn(&Playable) -> Result<ObjectSpec, ApiError>,
    {
        let id = parse_track_id(id)?;
        let (playable, cached) = self.playable(id, preset, access, true).await?;
        let spec = pick(&playable)?;
        // Access is checked and the object chosen; nothing has been sent: the one point each
        // listening request passes once, in both delivery modes.
        if let Some((start, file)) = start {
            let viewer = match access {
                Access::Viewer(auth) => auth.session().map(|session| session.user.id),
                Access::Signed(_) => None,
            };
            // In redirect mode a rewritten variant playlist sends the player's segment
            // requests to storage: the playlist is the last this API sees of the play.
            let rewritten = self.state.delivery.redirects() && access.grant(&playable).rewrites_playlists();
            let start = match start {
                Start::HlsSegment if rewritten => Start::HlsRewrittenPlaylist,
                other => other,
            };
            self.state.count_play(req, id, playable.owner_id, viewer, start, file);
        }
        match self.deliver(req, &playable, access, &spec).await {
            Err(err) if cached && err.status == StatusCode::NOT_FOUND => {
                self.state.playables.forget(id);
                let (playable, _) = self.playable(id, preset, access, false).await?;
                self.deliver(req, &playable, access, &pick(&playable)?).await
            }
            other => other,
        }
    }

    /// Sends `spec`'s object the configured way: proxied, or (redirect mode) a 307 to where
    /// its bytes are, or for an HLS variant playlist its text with storage URLs in it. The
    /// master playlist is always proxied: it names only the API's own variant playlists.
    async fn deliver(
        &self,
        req: &Request,
        playable: &Playable,
        access: Access<'_>,
        spec: &ObjectSpec,
    ) -> Result<ObjectResponse, ApiError> {
        let storage = self.state.storage.as_ref();
        let delivery = &self.state.delivery;
        let key = spec.key.as_str();
        let playlist = key.ends_with(".m3u8");
        let master = playlist && playable.rendition.as_ref().is_some_and(|(master, _)| master == key);
        let grant = access.grant(playable);
        if !delivery.redirects() || master || (playlist && !grant.rewrites_playlists()) {
            return serve_object(storage, spec, req).await;
        }
        let until = delivery.until(grant, chrono::Utc::now())?;
        if playlist {
            return self.rewritten_playlist(req, playable, spec, grant, until).await;
        }
        let method = if req.method() == Method::HEAD { ReadMethod::Head } else { ReadMethod::Get };
        match delivery.target(storage, &spec.key, method, grant, until).await? {
            Some(target) => {
                metrics::counter!("waveline_http_stream_redirects_total", "route" => spec.route, "target" => target.kind)
                    .increment(1);
                Ok(ObjectResponse::redirect(&target.location))
            }
            None => serve_object(storage, spec, req).await,
        }
    }

    /// An HLS variant playlist whose init and segment URIs name storage (or the CDN) directly,
    /// each valid until `until`. Only URIs that resolve to files the worker recorded beside
    /// the playlist are rewritten. A playlist too large to hold is proxied unchanged.
    async fn rewritten_playlist(
        &self,
        req: &Request,
        playable: &Playable,
        spec: &ObjectSpec,
        grant: Grant,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<ObjectResponse, ApiError> {
        let storage = self.state.storage.as_ref();
        let read = storage.get(&spec.key, None).await?;
        if read.meta.size > redirect::MAX_PLAYLIST_BYTES {
            tracing::warn!(key = %spec.key, size = read.meta.size, "a playlist too large to rewrite is proxied");
            return serve_object(storage, spec, req).await;
        }
        let mut bytes = Vec::with_capacity(usize::try_from(read.meta.size).unwrap_or_default());
        let mut body = read.body;
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk?);
            if bytes.len() as u64 > redirect::MAX_PLAYLIST_BYTES {
                return Err(ApiError::internal(&format!("{} grew past its size while read", spec.key)));
            }
        }
        let text = String::from_utf8(bytes).map_err(|err| ApiError::internal(&err))?;
        let recorded: HashSet<&str> =
            playable.rendition.as_ref().map(|(_, keys)| keys.iter().map(String::as_str).collect()).unwrap_or_default();
        let dir = spec.key.as_str().rsplit_once('/').map_or("", |(dir, _)| dir);
        let mut replace = HashMap::new();
        for uri in redirect::playlist_uris(&text) {
            let candidate = format!("{dir}/{uri}");
            if !recorded.contains(candidate.as_str()) {
                continue;
            }
            let key = ObjectKey::parse(candidate).map_err(|err| ApiError::internal(&err))?;
            let target = self.state.delivery.target(storage, &key, ReadMethod::Get, grant, until).await?;
            let Some(target) = target else {
                // A store that cannot presign: the player comes to the API for each file.
                return serve_object(storage, spec, req).await;
            };
            replace.insert(uri, target.location);
        }
        let body = redirect::rewrite_playlist(&text, &replace);
        Ok(ObjectResponse::generated(spec, body, req.method() == Method::HEAD))
    }

    async fn stream(
        &self,
        req: &Request,
        id: &str,
        preset: &str,
        access: Access<'_>,
    ) -> Result<ObjectResponse, ApiError> {
        if !PROGRESSIVE.contains(&preset) {
            return Err(ApiError::not_found(&format!(
                "stream {preset:?}; progressive streams are {} (HLS is under /hls/master.m3u8)",
                PROGRESSIVE.join(", ")
            )));
        }
        let start = Start::Progressive { preview: preset == "preview" };
        self.serve_track(req, id, Some(preset), access, Some((start, None)), |playable| {
            let Some((key, _)) = &playable.rendition else {
                return Err(ApiError::not_found(&format!("stream {preset:?} for this track")));
            };
            Ok(ObjectSpec {
                key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
                content_type: waveline_media::content_type(key),
                cache_control: access.cache(playable, 3600),
                route: "stream",
            })
        })
        .await
    }

    async fn hls(
        &self,
        req: &Request,
        id: &str,
        file: Option<(&str, &str)>,
        access: Access<'_>,
    ) -> Result<ObjectResponse, ApiError> {
        let start = file.map(|(_, file)| (Start::HlsSegment, Some(file)));
        self.serve_track(req, id, Some("aac_hls"), access, start, |playable| {
            let Some((master, keys)) = &playable.rendition else {
                return Err(ApiError::not_found("HLS rendition for this track"));
            };
            let key = match file {
                None => master.clone(),
                Some((variant, file)) => {
                    // Only the files the worker recorded beside the master: no path can reach
                    // anything else, and no key is built here.
                    let dir = master.rsplit_once('/').map_or("", |(dir, _)| dir);
                    let beside = |key: &&String| {
                        key.strip_prefix(dir)
                            .and_then(|rest| rest.strip_prefix('/'))
                            .and_then(|rest| rest.split_once('/'))
                            .is_some_and(|found| found == (variant, file))
                    };
                    keys.iter().find(beside).cloned().ok_or_else(|| ApiError::not_found("HLS file"))?
                }
            };
            let playlist = key.ends_with(".m3u8");
            Ok(ObjectSpec {
                key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
                content_type: waveline_media::content_type(&key),
                cache_control: access.cache(playable, if playlist { 30 } else { 3600 }),
                route: "hls",
            })
        })
        .await
    }
}

#[OpenApi(tag = "Tag::Streaming")]
impl Media {
    /// A progressive rendition (`mp3_128`, `opus_64`, `preview`), with byte ranges.
    #[oai(path = "/v1/tracks/:id/stream/:preset", method = "get", method = "head")]
    async fn stream_route(
        &self,
        req: &Request,
        id: Path<String>,
        preset: Path<String>,
        auth: MaybeAuth,
    ) -> Result<ObjectResponse, ApiError> {
        self.stream(req, &id.0, &preset.0, Access::Viewer(&auth)).await
    }

    /// The HLS master playlist (AAC 96/160/256 kb/s variants).
    #[oai(path = "/v1/tracks/:id/hls/master.m3u8", method = "get", method = "head")]
    async fn hls_master(&self, req: &Request, id: Path<String>, auth: MaybeAuth) -> Result<ObjectResponse, ApiError> {
        self.hls(req, &id.0, None, Access::Viewer(&auth)).await
    }

    /// A variant playlist, init segment or media segment, as the master playlist names them.
    #[oai(path = "/v1/tracks/:id/hls/:variant/:file", method = "get", method = "head")]
    async fn hls_file(
        &self,
        req: &Request,
        id: Path<String>,
        variant: Path<String>,
        file: Path<String>,
        auth: MaybeAuth,
    ) -> Result<ObjectResponse, ApiError> {
        self.hls(req, &id.0, Some((&variant.0, &file.0)), Access::Viewer(&auth)).await
    }

    /// The waveform: audiowaveform JSON, its binary `.dat`, or the 1800-point summary.
    #[oai(path = "/v1/tracks/:id/waveform", method = "get", method = "head")]
    async fn waveform_route(
        &self,
        req: &Request,
        id: Path<String>,
        format: Query<Option<WaveformFormat>>,
        auth: MaybeAuth,
    ) -> Result<ObjectResponse, ApiError> {
        self.waveform(req, &id.0, format.0, Access::Viewer(&auth)).await
    }

    /// A progressive rendition by signed URL (see `GET /v1/tracks/{id}/signed-urls`).
    #[oai(path = "/v1/signed/:expires/:signature/tracks/:id/stream/:preset", method = "get", method = "head")]
    async fn signed_stream(
        &self,
        req: &Request,
        expires: Path<String>,
        signature: Path<String>,
        id: Path<String>,
        preset: Path<String>,
    ) -> Result<ObjectResponse, ApiError> {
        let until =
            check_signature(&self.state.tokens, &id.0, &format!("stream/{}", preset.0), &expires.0, &signature.0)?;
        self.stream(req, &id.0, &preset.0, Access::Signed(until)).await
    }

    /// The HLS master playlist by signed URL; its relative URIs stay under the signature.
    #[oai(path = "/v1/signed/:expires/:signature/tracks/:id/hls/master.m3u8", method = "get", method = "head")]
    async fn signed_hls_master(
        &self,
        req: &Request,
        expires: Path<String>,
        signature: Path<String>,
        id: Path<String>,
    ) -> Result<ObjectResponse, ApiError> {
        let until = check_signature(&self.state.tokens, &id.0, "hls", &expires.0, &signature.0)?;
        self.hls(req, &id.0, None, Access::Signed(until)).await
    }

    /// An HLS variant playlist or segment by signed URL.
    #[oai(path = "/v1/signed/:expires/:signature/tracks/:id/hls/:variant/:file", method = "get", method = "head")]
    async fn signed_hls_file(
        &self,
        req: &Request,
        expires: Path<String>,
        signature: Path<String>,
        id: Path<String>,
        variant: Path<String>,
        file: Path<String>,
    ) -> Result<ObjectResponse, ApiError> {
        let until = check_signature(&self.state.tokens, &id.0, "hls", &expires.0, &signature.0)?;
        self.hls(req, &id.0, Some((&variant.0, &file.0)), Access::Signed(until)).await
    }

    /// The waveform by signed URL.
    #[oai(path = "/v1/signed/:expires/:signature/tracks/:id/waveform", method = "get", method = "head")]
    async fn signed_waveform(
        &self,
        req: &Request,
        expires: Path<String>,
        signature: Path<String>,
        id: Path<String>,
        format: Query<Option<WaveformFormat>>,
    ) -> Result<ObjectResponse, ApiError> {
        let until = check_signature(&self.state.tokens, &id.0, "waveform", &expires.0, &signature.0)?;
        self.waveform(req, &id.0, format.0, Access::Signed(until)).await
    }
}

impl Media {
    async fn waveform(
        &self,
        req: &Request,
        id: &str,
        format: Option<WaveformFormat>,
        access: Access<'_>,
    ) -> Result<ObjectResponse, ApiError> {
        let format = format.unwrap_or(WaveformFormat::Json);
        self.serve_track(req, id, None, access, None, |playable| {
            let key = match format {
                WaveformFormat::Json => &playable.waveform_key,
                WaveformFormat::Dat => &playable.waveform_dat_key,
                WaveformFormat::Summary => &playable.waveform_summary_key,
            };
            let Some(key) = key else {
                return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "this track has no waveform"));
            };
            Ok(ObjectSpec {
                key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
                content_type: if format == WaveformFormat::Dat {
                    "application/octet-stream"
                } else {
                    "application/json"
                },
                cache_control: access.cache(playable, 3600),
                route: "waveform",
            })
        })
        .await
    }
}
