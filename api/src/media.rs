//! The listening routes: progressive streams, HLS, waveforms.
//!
//! They serve the live revision (`ready_revision`): while a track is reprocessed, listeners
//! keep the previous renditions until the new ones are committed. A track with no ready
//! revision yet answers 409 `not_ready` with its state. Private tracks answer 404 to everyone
//! but their owner and admins.
//!
//! HLS URLs carry no revision, so playlists are cached briefly (`max-age=30`) and segments
//! for an hour; every response has a strong ETag to revalidate with.

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

impl Media {
    /// The track as the viewer may play it: 404 when it is missing or hidden from them, 409
    /// when nothing is ready yet.
    async fn playable(&self, id: &str, preset: Option<&str>, auth: &MaybeAuth) -> Result<Playable, ApiError> {
        let id: TrackId = parse_track_id(id)?;
        let playable = self.state.tracks.playable(id, preset).await?.ok_or_else(|| ApiError::not_found("track"))?;
        if !may_see(playable.owner_id, playable.visibility, auth.session()) {
            return Err(ApiError::not_found("track"));
        }
        if playable.ready_revision.is_none() {
            return Err(ApiError::conflict(
                "not_ready",
                format!("the track is {}; its streams appear when it is ready", playable.state),
            ));
        }
        Ok(playable)
    }

    fn cache(playable: &Playable, max_age: u32) -> String {
        match playable.visibility {
            Visibility::Public => format!("public, max-age={max_age}"),
            Visibility::Private => format!("private, max-age={max_age}"),
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
        let playable = self.playable(id, Some(preset), auth).await?;
        let Some((_, key, _)) = &playable.rendition else {
            return Err(ApiError::not_found(&format!("stream {preset:?} for this track")));
        };
        let spec = ObjectSpec {
            key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
            content_type: content_type(key),
            cache_control: Self::cache(&playable, 3600),
            route: "stream",
        };
        serve_object(self.state.storage.as_ref(), &spec, req).await
    }

    async fn hls(
        &self,
        req: &Request,
        id: &str,
        file: Option<(&str, &str)>,
        auth: &MaybeAuth,
    ) -> Result<ObjectResponse, ApiError> {
        let playable = self.playable(id, Some("aac_hls"), auth).await?;
        let Some((_, master, keys)) = &playable.rendition else {
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
        let spec = ObjectSpec {
            key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
            content_type: content_type(&key),
            cache_control: Self::cache(&playable, if playlist { 30 } else { 3600 }),
            route: "hls",
        };
        serve_object(self.state.storage.as_ref(), &spec, req).await
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
        let playable = self.playable(&id.0, None, &auth).await?;
        let format = format.0.unwrap_or(WaveformFormat::Json);
        let key = match format {
            WaveformFormat::Json => &playable.waveform_key,
            WaveformFormat::Dat => &playable.waveform_dat_key,
            WaveformFormat::Summary => &playable.waveform_summary_key,
        };
        let Some(key) = key else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "this track has no waveform"));
        };
        let spec = ObjectSpec {
            key: ObjectKey::parse(key.clone()).map_err(|err| ApiError::internal(&err))?,
            content_type: if format == WaveformFormat::Dat { "application/octet-stream" } else { "application/json" },
            cache_control: Self::cache(&playable, 3600),
            route: "waveform",
        };
        serve_object(self.state.storage.as_ref(), &spec, req).await
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
