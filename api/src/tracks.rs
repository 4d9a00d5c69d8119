//! Track routes.

use md5::{Digest, Md5};
use poem_openapi::param::{Header, Path};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use waveline_shared::domain::TrackId;

use crate::{AppState, ErrorBody};

#[derive(Tags)]
enum Tag {
    /// Tracks and their processing.
    Tracks,
}

#[derive(Debug)]
pub struct Tracks {
    pub state: AppState,
}

/// Where a track is in processing.
#[derive(Debug, Object, serde::Serialize)]
struct TrackStatus {
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

#[derive(ApiResponse)]
enum StatusResponse {
    /// The status, with a strong ETag.
    #[oai(status = 200)]
    Ok(Json<TrackStatus>, #[oai(header = "ETag")] String, #[oai(header = "Cache-Control")] String),
    /// Unchanged since the ETag in `If-None-Match`.
    #[oai(status = 304)]
    NotModified(#[oai(header = "ETag")] String),
    /// The id is not a track id.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// No such track (private tracks answer the same, so their existence does not leak).
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[OpenApi(tag = "Tag::Tracks")]
impl Tracks {
    /// A track's processing status; poll it with `If-None-Match`.
    #[oai(path = "/v1/tracks/:id/status", method = "get")]
    async fn status(
        &self,
        id: Path<String>,
        #[oai(name = "If-None-Match")] if_none_match: Header<Option<String>>,
    ) -> StatusResponse {
        let Ok(track_id) = id.0.parse::<TrackId>() else {
            return StatusResponse::BadRequest(Json(ErrorBody::new("bad_request", "the track id is not a UUID")));
        };
        let track = match self.state.tracks.get(track_id).await {
            Ok(Some(track)) => track,
            Ok(None) => return StatusResponse::NotFound(Json(ErrorBody::new("not_found", "no such track"))),
            Err(err) => {
                tracing::error!(error = %err, "status lookup failed");
                return StatusResponse::Unavailable(Json(ErrorBody::new("unavailable", "the database is unavailable")));
            }
        };
        // Without accounts yet, only public tracks have a visible status.
        match self.state.tracks.is_public(track_id).await {
            Ok(true) => {}
            Ok(false) => return StatusResponse::NotFound(Json(ErrorBody::new("not_found", "no such track"))),
            Err(err) => {
                tracing::error!(error = %err, "visibility lookup failed");
                return StatusResponse::Unavailable(Json(ErrorBody::new("unavailable", "the database is unavailable")));
            }
        }
        let status = TrackStatus {
            id: track.id.to_string(),
            state: track.state.as_str().to_owned(),
            stage: track.stage.map(|stage| stage.as_str().to_owned()),
            progress: track.progress,
            attempts: track.attempts,
            revision: track.revision,
            error: track.error_code.map(|code| ErrorBody { code, message: track.error_message.unwrap_or_default() }),
        };
        let etag = etag_of(&status);
        let matches = if_none_match
            .0
            .as_deref()
            .is_some_and(|header| header.split(',').any(|tag| tag.trim() == etag || tag.trim() == "*"));
        if matches {
            StatusResponse::NotModified(etag)
        } else {
            StatusResponse::Ok(Json(status), etag, "no-cache".to_owned())
        }
    }
}

/// A strong ETag: the MD5 of the status's JSON, the same on every replica.
fn etag_of(status: &TrackStatus) -> String {
    let bytes = serde_json::to_vec(status).unwrap_or_default();
    let digest = Md5::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("\"{hex}\"")
}
