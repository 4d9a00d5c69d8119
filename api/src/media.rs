//! The listening routes: progressive streams, HLS, waveforms.
//!
//! They serve the live revision (`ready_revision`): while a track is reprocessed, listeners
//! keep the previous renditions until the new ones are committed. A track with no ready
//! revision yet answers 409 `not_ready` with its state. Private tracks answer 404 to everyone
//! but their owner and admins.
//!
//! HLS URLs carry no revision, so playlists are cached briefly (`max-age=30`) and segments
//! for an hour; every response has a strong ETag to revalidate with.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use poem::Request;
use poem::http::StatusCode;
use poem_openapi::param::{Path, Query};
use poem_openapi::{Enum, OpenApi, Tags};
use waveline_shared::db::{Playable, Visibility};
use waveline_shared::domain::TrackId;
use waveline_shared::storage::ObjectKey;

use crate::auth::MaybeAuth;
use crate::error::ApiError;
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

fn content_type(key: &str) -> &'static str {
    match key.rsplit('.').next() {
        Some("mp3") => "audio/mpeg",
        Some("opus" | "ogg") => "audio/ogg",
        Some("m4a" | "mp4" | "m4s") => "audio/mp4",
        Some("aac") => "audio/aac",
        Some("m3u8") => "application/vnd.apple.mpegurl",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// A short-lived, per-process cache of what the listening routes look up. A player sends a
/// run of range requests (and HLS segment requests) for one track; with the cache they cost
/// one database query per track and preset every [`PLAYABLE_TTL`], not one each.
///
/// Only playable tracks are cached. Staleness is bounded and harmless: an edit or deletion
/// through this process drops the track's entries at once (other replicas within the TTL),
/// and an object that is gone from storage (a revision replaced by reprocessing) drops the
/// entry and is looked up again before anything is answered.
#[derive(Debug, Default)]
pub struct PlayableCache {
    entries: Mutex<Entries>,
}

/// (track, preset) → (when it was looked up, what was found).
type Entries = HashMap<(TrackId, Option<String>), (Instant, Playable)>;

/// How long a cached lookup is used.
pub const PLAYABLE_TTL: Duration = Duration::from_secs(2);
const PLAYABLE_MAX: usize = 10_000;

impl PlayableCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, key: &(TrackId, Option<String>)) -> Option<Playable> {
        self.lock().get(key).filter(|(at, _)| at.elapsed() < PLAYABLE_TTL).map(|(_, playable)| playable.clone())
    }

    fn put(&self, key: (TrackId, Option<String>), playable: Playable) {
        let mut entries = self.lock();
        if entries.len() >= PLAYABLE_MAX {
            entries.retain(|_, (at, _)| at.elapsed() < PLAYABLE_TTL);
            if entries.len() >= PLAYABLE_MAX {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now(), playable));
    }

    /// Drops every entry of a track (after an edit or a deletion).
    pub fn forget(&self, id: TrackId) {
        self.lock().retain(|(track, _), _| *track != id);
    }
}

impl Media {
    /// The track as the viewer may play it (404 when it is missing or hidden from them, 409
    /// when nothing is ready yet), and whether it came from the cache.
    async fn playable(
        &self,
        id: TrackId,
        preset: Option<&str>,
        auth: &MaybeAuth,
        use_cache: bool,
    ) -> Result<(Playable, bool), ApiError> {
        let key = (id, preset.map(str::to_owned));
        let cached = if use_cache { self.state.playables.get(&key) } else { None };
        let from_cache = cached.is_some();
        let playable = match cached {
            Some(playable) => playable,
            None => {
                let playable =
                    self.state.tracks.playable(id, preset).await?.ok_or_else(|| ApiError::not_found("track"))?;
                if playable.ready_revision.is_some() {
                    self.state.playables.put(key, playable.clone());
                }
                playable
            }
        };
        if !may_see(playable.owner_id, playable.visibility, auth.session()) {
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

    fn cache(playable: &Playable, max_age: u32) -> String {
        match playable.visibility {
            Visibility::Public => format!("public, max-age={max_age}"),
            Visibility::Private => format!("private, max-age={max_age}"),
        }
    }

    /// Serves the object `pick` chooses from the track's live revision. When a cached lookup
    /// names an object that is gone (its revision was just replaced), looks again.
    async fn serve_track<F>(
        &self,
        req: &Request,
        id: &str,
        preset: Option<&str>,
        auth: &MaybeAuth,
        pick: F,
    ) -> Result<ObjectResponse, ApiError>
    where
        F: Fn(&Playable) -> Result<ObjectSpec, ApiError>,
    {
        let id = parse_track_id(id)?;
        let (playable, cached) = self.playable(id, preset, auth, true).await?;
        match serve_object(self.state.storage.as_ref(), &pick(&playable)?, req).await {
            Err(err) if cached && err.status == StatusCode::NOT_FOUND => {
                self.state.playables.forget(id);
                let (playable, _) = self.playable(id, preset, auth, false).await?;
                serve_object(self.state.storage.as_ref(), &pick(&playable)?, req).await
            }
            other => other,
        }
    }

    async fn stream(
        &self,
        req: &Request,
        id: &str,
        preset: &str,
        auth: &MaybeAuth,
    ) -> Result<ObjectResponse, ApiError> {
        if !PROGRESSIVE.contains(&preset) {
            return Err(ApiError::not_found(&format!(
                "stream {preset:?}; progressive streams are {} (HLS is under /hls/master.m3u8)",
                PROGRESSIVE.join(", ")
            )));
        }
        self.serve_track(req, id, Some(preset), auth, |playable| {
            let Some((key, _)) = &playable.rendition else {
                return Err(ApiError::not_found(&format!("stream {preset:?} for this track")));
            };
            Ok(ObjectSpec {
                key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
                content_type: content_type(key),
                cache_control: Self::cache(playable, 3600),
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
        auth: &MaybeAuth,
    ) -> Result<ObjectResponse, ApiError> {
        self.serve_track(req, id, Some("aac_hls"), auth, |playable| {
            let Some((master, keys)) = &playable.rendition else {
                return Err(ApiError::not_found("HLS rendition for this track"));
            };
            let key = match file {
                None => master.clone(),
                Some((variant, file)) => {
                    let base = master.rsplit_once('/').map_or("", |(base, _)| base);
                    let key = format!("{base}/{variant}/{file}");
                    // Only the files the worker recorded: no path can reach anything else.
                    if !keys.contains(&key) {
                        return Err(ApiError::not_found("HLS file"));
                    }
                    key
                }
            };
            let playlist = key.ends_with(".m3u8");
            Ok(ObjectSpec {
                key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
                content_type: content_type(&key),
                cache_control: Self::cache(playable, if playlist { 30 } else { 3600 }),
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
        self.stream(req, &id.0, &preset.0, &auth).await
    }

    /// The HLS master playlist (AAC 96/160/256 kb/s variants).
    #[oai(path = "/v1/tracks/:id/hls/master.m3u8", method = "get", method = "head")]
    async fn hls_master(&self, req: &Request, id: Path<String>, auth: MaybeAuth) -> Result<ObjectResponse, ApiError> {
        self.hls(req, &id.0, None, &auth).await
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
        self.hls(req, &id.0, Some((&variant.0, &file.0)), &auth).await
    }

    /// The waveform: audiowaveform JSON, its binary `.dat`, or the 1800-point summary.
    #[oai(path = "/v1/tracks/:id/waveform", method = "get", method = "head")]
    async fn waveform(
        &self,
        req: &Request,
        id: Path<String>,
        format: Query<Option<WaveformFormat>>,
        auth: MaybeAuth,
    ) -> Result<ObjectResponse, ApiError> {
        let format = format.0.unwrap_or(WaveformFormat::Json);
        self.serve_track(req, &id.0, None, &auth, |playable| {
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
                cache_control: Self::cache(playable, 3600),
                route: "waveform",
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn media_types_follow_the_extension() {
        assert_eq!(super::content_type("r/t/1/mp3_128/audio.mp3"), "audio/mpeg");
        assert_eq!(super::content_type("r/t/1/opus_64/audio.opus"), "audio/ogg");
        assert_eq!(super::content_type("r/t/1/aac_hls/master.m3u8"), "application/vnd.apple.mpegurl");
        assert_eq!(super::content_type("r/t/1/aac_hls/96k/seg_00001.m4s"), "audio/mp4");
        assert_eq!(super::content_type("x"), "application/octet-stream");
    }
}
