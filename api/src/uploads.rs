//! Uploads: through the API (`POST /v1/tracks`, multipart) or straight to storage
//! (`POST /v1/uploads`, then `POST /v1/uploads/{id}/complete`).
//!
//! Either way the original's first bytes decide whether it is audio (magic numbers, never
//! the file name or `Content-Type`): anything else is 415 before a byte is stored. The body
//! streams into storage in 64 KiB reads; the API holds one chunk (and S3 one multipart part)
//! at a time, never the file. The configured maximum is enforced while streaming (413), and
//! up front when `Content-Length` already says too much.
//!
//! Nothing half-done stays behind: the track row is written only after the original is
//! stored, in the same transaction as its job; a body that fails or is cut short aborts the
//! storage write; a form that fails after its file was stored deletes that object.
//!
//! A direct upload is bound to the size declared when it starts: the presigned S3 URL signs
//! `Content-Length`, so S3 refuses any other length, and `PUT /v1/uploads/{id}` refuses more
//! (413). Its bytes land under an upload key ([`upload_key`]); `complete` moves them to the
//! original's key, which no URL names, and checks them there (size, audio). A URL used again
//! after that writes only an orphan under the upload key, which the reconciler deletes: it
//! can no longer change what a worker reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt, TryStreamExt};
use poem::http::StatusCode;
use poem::web::Multipart;
use poem::{Body, FromRequest, Request, RequestBody};
use poem_openapi::param::Path;
use poem_openapi::payload::{Json, ParsePayload, Payload};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags, impl_apirequest_for_payload};
use tokio::io::AsyncReadExt;
use waveline_media::{SNIFF_LEN, sniff};
use waveline_shared::db::{NewTrack, PgTracks, TrackDetails, Visibility};
use waveline_shared::domain::{TrackId, TrackState, UserId};
use waveline_shared::storage::{ByteRange, ObjectKey, Storage, StorageError, byte_stream, original_key, upload_key};

use crate::auth::{Auth, Session};
use crate::error::ApiError;
use crate::tracks::{TrackView, check_tags, check_text, check_visibility};
use crate::{AppState, parse_track_id};

#[derive(Tags)]
enum Tag {
    /// Uploading audio.
    Uploads,
}

/// The upload routes.
#[derive(Debug)]
pub struct Uploads {
    pub state: AppState,
}

/// A `multipart/form-data` upload, read field by field as it arrives.
pub struct UploadForm(Multipart);

impl std::fmt::Debug for UploadForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UploadForm")
    }
}

impl Payload for UploadForm {
    const CONTENT_TYPE: &'static str = "multipart/form-data";

    fn check_content_type(content_type: &str) -> bool {
        content_type.split(';').next().is_some_and(|essence| essence.trim().eq_ignore_ascii_case(Self::CONTENT_TYPE))
    }

    fn schema_ref() -> MetaSchemaRef {
        let text = |description: &'static str| {
            MetaSchemaRef::Inline(Box::new(MetaSchema { description: Some(description), ..MetaSchema::new("string") }))
        };
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            required: vec!["file"],
            properties: vec![
                (
                    "file",
                    MetaSchemaRef::Inline(Box::new(MetaSchema {
                        description: Some("The audio (WAV, AIFF, FLAC, MP3, AAC, MP4/M4A, Ogg, CAF, Matroska)."),
                        ..MetaSchema::new_with_format("string", "binary")
                    })),
                ),
                ("title", text("1–200 characters; default: the file name.")),
                ("description", text("At most 5000 characters.")),
                ("genre", text("At most 100 characters.")),
                ("tags", text("Comma-separated, at most 20 tags of 1–50 characters; the field may repeat.")),
                ("visibility", text("`public` (default) or `private`.")),
                ("premium_only", text("`true` or `false` (default): only premium listeners play it in full.")),
            ],
            ..MetaSchema::new("object")
        }))
    }
}

impl ParsePayload for UploadForm {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        Ok(UploadForm(Multipart::from_request(request, body).await?))
    }
}

impl_apirequest_for_payload!(UploadForm);

/// A raw request body, streamed.
#[derive(Debug)]
pub struct RawBody(Body);

impl Payload for RawBody {
    const CONTENT_TYPE: &'static str = "application/octet-stream";

    fn check_content_type(_content_type: &str) -> bool {
        true
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema::new_with_format("string", "binary")))
    }
}

impl ParsePayload for RawBody {
    const IS_REQUIRED: bool = true;

    async fn from_request(_request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        Ok(RawBody(body.take()?))
    }
}

impl_apirequest_for_payload!(RawBody);

#[derive(ApiResponse)]
pub(crate) enum UploadAccepted {
    /// Stored and queued for processing; follow `/v1/tracks/{id}/events` or poll `/status`.
    #[oai(status = 202)]
    Accepted(Json<TrackView>, #[oai(header = "Location")] String),
}

/// A direct upload to prepare.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct UploadRequest {
    /// 1–200 characters; default: `filename`, or "Untitled".
    title: Option<String>,
    description: Option<String>,
    genre: Option<String>,
    tags: Option<Vec<String>>,
    /// `public` (default) or `private`.
    visibility: Option<String>,
    /// Only premium listeners (and the owner, and admins) play it in full; default `false`.
    premium_only: Option<bool>,
    /// The file's name, for the default title.
    filename: Option<String>,
    /// The file's size in bytes: the upload must be exactly this long. Required with S3
    /// storage, whose presigned URL is signed for this length; on the filesystem store a
    /// `PUT` longer than it is refused (413). Too large is refused now rather than after the
    /// upload.
    size: Option<u64>,
}

/// Where and how to send the bytes.
#[derive(Debug, Object)]
struct UploadTicket {
    /// The upload's id (also the track's).
    upload_id: String,
    track_id: String,
    /// Always `PUT`.
    method: String,
    /// A presigned storage URL (S3), or this API's `PUT /v1/uploads/{id}` (filesystem
    /// storage), which needs the same authentication as any other call.
    url: String,
    /// Headers to send with the PUT, exactly.
    headers: std::collections::BTreeMap<String, String>,
    expires_at: DateTime<Utc>,
    /// Call it (POST) once the bytes are uploaded.
    complete_url: String,
}

#[derive(ApiResponse)]
enum TicketResponse {
    #[oai(status = 201)]
    Created(Json<UploadTicket>),
}

/// What a direct upload stored.
#[derive(Debug, Object)]
struct StoredUpload {
    bytes: u64,
}

/// The text fields of an upload, before validation.
#[derive(Debug, Default)]
struct Fields {
    title: Option<String>,
    description: Option<String>,
    genre: Option<String>,
    tags: Vec<String>,
    visibility: Option<String>,
    premium_only: Option<bool>,
}

impl Fields {
    fn into_new_track(
        self,
        id: TrackId,
        owner: UserId,
        filename: Option<&str>,
        original_key: &ObjectKey,
    ) -> Result<NewTrack, ApiError> {
        let title = match self.title {
            Some(title) => check_text("title", &title, 1, 200)?,
            None => default_title(filename),
        };
        Ok(NewTrack {
            id,
            owner,
            title,
            description: self
                .description
                .as_deref()
                .map(|d| check_text("description", d, 0, 5000))
                .transpose()?
                .unwrap_or_default(),
            genre: self.genre.as_deref().map(|g| check_text("genre", g, 0, 100)).transpose()?.filter(|g| !g.is_empty()),
            tags: check_tags(&self.tags)?,
            visibility: self.visibility.as_deref().map(check_visibility).transpose()?.unwrap_or(Visibility::Public),
            original_key: original_key.as_str().to_owned(),
            premium_only: self.premium_only.unwrap_or(false),
        })
    }
}

/// The file name without directories or extension, cleaned up; "Untitled" when nothing is
/// left.
fn default_title(filename: Option<&str>) -> String {
    let name = filename.unwrap_or_default();
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let stem = base.rsplit_once('.').map_or(base, |(stem, _)| stem);
    let title: String = stem.chars().filter(|c| !c.is_control()).take(200).collect();
    let title = title.trim();
    if title.is_empty() { "Untitled".to_owned() } else { title.to_owned() }
}

pub(crate) fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the upload is larger than the {limit}-byte limit"),
    )
}

fn larger_than_declared(size: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the upload is larger than the {size} bytes declared when it started"),
    )
}

fn not_audio() -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "not_audio",
        "the file does not start like any audio format Waveline reads \
         (WAV, AIFF, FLAC, MP3, AAC, MP4/M4A, Ogg, CAF, Matroska)",
    )
}

pub(crate) fn interrupted(detail: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("upload_interrupted", format!("the upload did not arrive whole: {detail}"))
}

/// A refused upload may leave the rest of its body unread on the connection: say that it
/// closes, so the client opens a new one for its next request instead of reusing a
/// connection the server is about to drop.
pub(crate) fn close_after(err: ApiError) -> ApiError {
    if err.header.is_some() { err } else { err.with_header("connection", "close".to_owned()) }
}

/// Refuses up front a body whose `Content-Length` already passes the limit (with room for
/// a multipart envelope).
pub(crate) fn check_declared_length(req: &Request, limit: u64, envelope: u64) -> Result<(), ApiError> {
    match req.header("content-length").and_then(|value| value.trim().parse::<u64>().ok()) {
        Some(length) if length > limit.saturating_add(envelope) => Err(too_large(limit)),
        _ => Ok(()),
    }
}

/// What an upload's first bytes must be, read before anything is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Admit {
    /// How many leading bytes `check` looks at.
    pub sniff_len: usize,
    /// The refusal, if the leading bytes are not what the route takes.
    pub check: fn(&[u8]) -> Option<ApiError>,
}

/// Audio, by [`sniff`]; 415 `not_audio` otherwise.
const AUDIO: Admit = Admit { sniff_len: SNIFF_LEN, check: |head| sniff(head).is_none().then(not_audio) };

/// Streams `body` into `key`: checks that its first bytes are what `admit` takes, counts it
/// against `limit` (refusing more with `over(limit)`), and stores it; returns its size. On
/// any failure nothing is stored.
async fn store_original<S>(
    storage: &dyn Storage,
    key: &ObjectKey,
    body: S,
    limit: u64,
    over: fn(u64) -> ApiError,
) -> Result<u64, ApiError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    store_admitted(storage, key, body, limit, over, AUDIO).await
}

/// [`store_original`] for what `admit` takes.
pub(crate) async fn store_admitted<S>(
    storage: &dyn Storage,
    key: &ObjectKey,
    body: S,
    limit: u64,
    over: fn(u64) -> ApiError,
    admit: Admit,
) -> Result<u64, ApiError>
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    let mut body = Box::pin(body);
    let mut head = Vec::with_capacity(admit.sniff_len);
    let mut prefix = Vec::new();
    while head.len() < admit.sniff_len {
        match body.next().await {
            Some(Ok(chunk)) => {
                let wanted = (admit.sniff_len - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..wanted]);
                prefix.push(chunk);
            }
            Some(Err(err)) => return Err(interrupted(err)),
            None => break,
        }
    }
    if head.is_empty() {
        return Err(ApiError::bad_request("empty_upload", "the file is empty"));
    }
    if let Some(refusal) = (admit.check)(&head) {
        return Err(refusal);
    }
    let received = Arc::new(AtomicU64::new(0));
    let over_limit = Arc::new(AtomicBool::new(false));
    let (count, flag) = (received.clone(), over_limit.clone());
    let whole = futures::stream::iter(prefix.into_iter().map(Ok)).chain(body).map(move |chunk| {
        let chunk = chunk?;
        let total = count.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
        if total > limit {
            flag.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other("the upload passed the size limit"));
        }
        Ok(chunk)
    });
    match storage.put(key, "application/octet-stream", byte_stream(whole)).await {
        Ok(meta) => {
            metrics::counter!("waveline_upload_bytes_total").increment(meta.size);
            Ok(meta.size)
        }
        Err(_) if over_limit.load(Ordering::Relaxed) => Err(over(limit)),
        Err(StorageError::Body(detail)) => Err(interrupted(detail)),
        Err(err) => Err(err.into()),
    }
}

/// The most text fields (every part but the file) one upload form may hold.
const MAX_TEXT_FIELDS: usize = 32;
/// The most bytes all text fields of one upload form may hold together.
const MAX_TEXT_BYTES: u64 = 64 * 1024;

/// What the text fields of a form have used of their allowance so far.
#[derive(Debug)]
struct TextBudget {
    fields: usize,
    bytes_left: u64,
}

impl TextBudget {
    fn new() -> TextBudget {
        TextBudget { fields: 0, bytes_left: MAX_TEXT_BYTES }
    }

    /// Reads one text field of at most 16 KiB, counting it against the form's allowance:
    /// more than [`MAX_TEXT_FIELDS`] fields, or more than [`MAX_TEXT_BYTES`] of them, is 413.
    async fn read(&mut self, field: poem::web::Field) -> Result<String, ApiError> {
        const MAX: u64 = 16 * 1024;
        let name = field.name().unwrap_or_default().to_owned();
        self.fields += 1;
        if self.fields > MAX_TEXT_FIELDS {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{name}: the form has more than {MAX_TEXT_FIELDS} text fields"),
            ));
        }
        let mut bytes = Vec::new();
        let allowed = MAX.min(self.bytes_left);
        field.into_async_read().take(allowed + 1).read_to_end(&mut bytes).await.map_err(interrupted)?;
        let length = bytes.len() as u64;
        if length > MAX {
            return Err(ApiError::bad_request("invalid_field", format!("{name}: longer than {MAX} bytes")));
        }
        if length > self.bytes_left {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{name}: the form's text fields hold more than {MAX_TEXT_BYTES} bytes together"),
            ));
        }
        self.bytes_left -= length;
        String::from_utf8(bytes).map_err(|_| ApiError::bad_request("invalid_field", format!("{name}: not UTF-8 text")))
    }
}

/// The size a direct upload declared when it started (kept as the track's original size
/// until it completes).
fn declared_size(track: &TrackDetails) -> Option<u64> {
    track.original_size.and_then(|size| u64::try_from(size).ok())
}

impl Uploads {
    /// The track of a direct upload, if `session` started it and it still awaits its bytes.
    async fn pending_upload(&self, id: &str, session: &Session) -> Result<TrackDetails, ApiError> {
        let id = parse_track_id(id).map_err(|_| ApiError::not_found("upload"))?;
        let track = self.state.tracks.details(id).await?.ok_or_else(|| ApiError::not_found("upload"))?;
        if track.owner_id != session.user.id {
            return Err(ApiError::not_found("upload"));
        }
        if track.state != TrackState::AwaitingUpload {
            return Err(ApiError::conflict(
                "upload_completed",
                format!("this upload is done; the track is {}", track.state),
            ));
        }
        match self.state.tracks.upload_expiry(id).await? {
            Some(expiry) if expiry < Utc::now() => {
                Err(ApiError::conflict("upload_expired", "this upload's URL has expired; start a new upload"))
            }
            _ => Ok(track),
        }
    }
}

/// Refuses an upload up front (403 `quota_exceeded`) when the account has already used its
/// quota. The new file's duration is not known until a worker reads it; the worker checks
/// again then, and fails the track `quota_exceeded` (deleting its original) if it does not fit.
async fn check_quota(state: &AppState, session: &Session) -> Result<(), ApiError> {
    quota_left(&state.tracks, state.security.free_quota, session.user.id).await
}

/// [`check_quota`] for `owner`, with the quota given.
async fn quota_left(tracks: &PgTracks, quota: Duration, owner: UserId) -> Result<(), ApiError> {
    let (exempt, used_ms) = tracks.quota_usage(owner, None).await?;
    if !exempt && used_ms >= quota.as_millis() as i64 {
        return Err(ApiError::forbidden(format!(
            "this account has used its upload quota of {} min of audio; delete tracks to make room",
            quota.as_secs() / 60
        ))
        .with_code("quota_exceeded"));
    }
    Ok(())
}

/// `POST /v1/tracks` (routed by [`crate::tracks::Tracks`], which owns the path): a track
/// uploaded as multipart (`file` plus optional `title`, `description`, `genre`,
/// `tags`, `visibility`). The body streams into storage; the answer is 202 with the
/// track `queued`.
pub(crate) async fn upload(
    state: &AppState,
    auth: Auth,
    req: &Request,
    form: UploadForm,
) -> Result<UploadAccepted, ApiError> {
    let session = auth.session();
    let _place = state.uploads_in_flight.take(session.user.id).map_err(close_after)?;
    check_declared_length(req, state.limits.upload_max_bytes, 1 << 20).map_err(close_after)?;
    check_quota(state, session).await.map_err(close_after)?;
    let mut multipart = form.0;
    let id = TrackId::new();
    let key = original_key(id);
    let mut stored: Option<(u64, Option<String>)> = None;
    let result = async {
        let mut fields = Fields::default();
        let mut budget = TextBudget::new();
        while let Some(field) = multipart.next_field().await.map_err(interrupted)? {
            let name = field.name().unwrap_or_default().to_owned();
            match name.as_str() {
                "file" => {
                    if stored.is_some() {
                        return Err(ApiError::bad_request("invalid_field", "file: one file per upload"));
                    }
                    let filename = field.file_name().map(str::to_owned);
                    let body = tokio_util::io::ReaderStream::with_capacity(field.into_async_read(), 64 * 1024);
                    let size =
                        store_original(state.storage.as_ref(), &key, body, state.limits.upload_max_bytes, too_large)
                            .await?;
                    stored = Some((size, filename));
                }
                "title" => fields.title = Some(budget.read(field).await?),
                "description" => fields.description = Some(budget.read(field).await?),
                "genre" => fields.genre = Some(budget.read(field).await?),
                "visibility" => fields.visibility = Some(budget.read(field).await?),
                "premium_only" => fields.premium_only = Some(crate::access::parse_flag(&budget.read(field).await?)?),
                "tags" => fields.tags.extend(
                    budget.read(field).await?.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned),
                ),
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_field",
                        format!(
                            "unknown form field {other:?}; expected file, title, description, genre, tags, visibility, premium_only"
                        ),
                    ));
                }
            }
        }
        let Some((size, filename)) = &stored else {
            return Err(ApiError::bad_request("missing_file", "the form has no `file` field"));
        };
        let new = fields.into_new_track(id, session.user.id, filename.as_deref(), &key)?;
        Ok(state.tracks.create_queued(&new, *size as i64).await?)
    }
    .await;
    match result {
        Ok(track) => {
            state.publish_soon();
            tracing::info!(track = %track.id, owner = %session.user.id, bytes = track.original_size, "upload stored and queued");
            let location = format!("/v1/tracks/{}", track.id);
            Ok(UploadAccepted::Accepted(Json(TrackView::from(track)), location))
        }
        Err(err) => {
            if stored.is_some()
                && let Err(cleanup) = state.storage.delete(&key).await
            {
                tracing::error!(%key, error = %cleanup, "could not remove the original of a failed upload");
            }
            Err(close_after(err))
        }
    }
}

/// A track uploaded from a local file, without HTTP (`waveline import`): the same rules and
/// the same path as `POST /v1/tracks`. The quota is checked up front, the bytes are sniffed
/// and bounded by `limit` while they stream into storage, the title is validated (or made
/// from the file name), and the track row and its job are written in one transaction only
/// once the original is stored; a failure after that deletes the object.
pub async fn upload_local(
    tracks: &PgTracks,
    storage: &dyn Storage,
    limits: LocalUploadLimits,
    owner: UserId,
    title: Option<&str>,
    file: &std::path::Path,
) -> Result<TrackDetails, ApiError> {
    quota_left(tracks, limits.quota, owner).await?;
    let opened = tokio::fs::File::open(file)
        .await
        .map_err(|err| ApiError::bad_request("unreadable_file", format!("cannot read the file: {err}")))?;
    let id = TrackId::new();
    let key = original_key(id);
    let body = tokio_util::io::ReaderStream::with_capacity(opened, 256 * 1024);
    let size = store_original(storage, &key, body, limits.max_bytes, too_large).await?;
    let fields = Fields { title: title.map(str::to_owned), ..Fields::default() };
    let filename = file.file_name().map(|name| name.to_string_lossy().into_owned());
    let created = match fields.into_new_track(id, owner, filename.as_deref(), &key) {
        Ok(new) => tracks.create_queued(&new, size as i64).await.map_err(ApiError::from),
        Err(err) => Err(err),
    };
    if created.is_err()
        && let Err(cleanup) = storage.delete(&key).await
    {
        tracing::error!(%key, error = %cleanup, "could not remove the original of a failed import");
    }
    created
}

/// The limits [`upload_local`] applies.
#[derive(Debug, Clone, Copy)]
pub struct LocalUploadLimits {
    /// The largest file, bytes (`upload_max_bytes`).
    pub max_bytes: u64,
    /// The owner's quota of audio (`free_quota_s`).
    pub quota: Duration,
}

#[OpenApi(tag = "Tag::Uploads")]
impl Uploads {
    /// Starts a direct upload: a URL to PUT the file to (presigned, for S3 storage), then
    /// `POST /v1/uploads/{id}/complete`.
    #[oai(path = "/v1/uploads", method = "post")]
    async fn start(&self, auth: Auth, body: Json<UploadRequest>) -> Result<TicketResponse, ApiError> {
        let session = auth.session();
        check_quota(&self.state, session).await?;
        let request = body.0;
        let limit = self.state.limits.upload_max_bytes;
        if request.size.is_some_and(|size| size > limit) {
            return Err(too_large(limit));
        }
        if request.size == Some(0) {
            return Err(ApiError::bad_request("empty_upload", "the file is empty"));
        }
        let storage = &self.state.storage;
        let size = match request.size {
            Some(size) => Some(size),
            None if storage.presigns() => {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "size: required; the upload URL is signed for exactly that many bytes",
                ));
            }
            None => None,
        };
        let id = TrackId::new();
        let key = original_key(id);
        let fields = Fields {
            title: request.title,
            description: request.description,
            genre: request.genre,
            tags: request.tags.unwrap_or_default(),
            visibility: request.visibility,
            premium_only: request.premium_only,
        };
        let new = fields.into_new_track(id, session.user.id, request.filename.as_deref(), &key)?;
        let ttl = self.state.limits.upload_url_ttl;
        let presigned = match size {
            Some(size) => storage.presign_put(&upload_key(id), "application/octet-stream", size, ttl).await?,
            None => None,
        };
        let expires_at = Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
        let (url, headers, expires_at) = match presigned {
            Some(presigned) => (presigned.url, presigned.headers.into_iter().collect(), presigned.expires_at),
            None => (
                format!("/v1/uploads/{id}"),
                [("Content-Type".to_owned(), "application/octet-stream".to_owned())].into_iter().collect(),
                expires_at,
            ),
        };
        self.state.tracks.create_awaiting(&new, expires_at, size.map(|size| size as i64)).await?;
        Ok(TicketResponse::Created(Json(UploadTicket {
            upload_id: id.to_string(),
            track_id: id.to_string(),
            method: "PUT".into(),
            url,
            headers,
            expires_at,
            complete_url: format!("/v1/uploads/{id}/complete"),
        })))
    }

    /// The direct-upload target when storage has no presigned URLs (the filesystem): the
    /// raw body is the file.
    #[oai(path = "/v1/uploads/:id", method = "put")]
    async fn put(
        &self,
        auth: Auth,
        req: &Request,
        id: Path<String>,
        body: RawBody,
    ) -> Result<Json<StoredUpload>, ApiError> {
        let track = self.pending_upload(&id.0, auth.session()).await?;
        let _place = self.state.uploads_in_flight.take(auth.session().user.id).map_err(close_after)?;
        let max = self.state.limits.upload_max_bytes;
        let (limit, over): (u64, fn(u64) -> ApiError) = match declared_size(&track) {
            Some(declared) if declared <= max => (declared, larger_than_declared),
            _ => (max, too_large),
        };
        if let Some(length) = req.header("content-length").and_then(|value| value.trim().parse::<u64>().ok())
            && length > limit
        {
            return Err(close_after(over(limit)));
        }
        let stream = body.0.into_bytes_stream().map_err(std::io::Error::other);
        let bytes = store_original(self.state.storage.as_ref(), &upload_key(track.id), stream, limit, over)
            .await
            .map_err(close_after)?;
        Ok(Json(StoredUpload { bytes }))
    }

    /// Ends a direct upload: moves the bytes to the original's key (which no URL names),
    /// checks them there (the declared size, within the limit, audio) and queues the track.
    #[oai(path = "/v1/uploads/:id/complete", method = "post")]
    async fn complete(&self, auth: Auth, id: Path<String>) -> Result<UploadAccepted, ApiError> {
        let track = self.pending_upload(&id.0, auth.session()).await?;
        let key = original_key(track.id);
        let storage = &self.state.storage;
        let meta = match storage.rename(&upload_key(track.id), &key).await {
            Ok(meta) => meta,
            // Nothing at the upload key: an earlier call may have moved it and stopped short.
            Err(StorageError::NotFound { .. }) => match storage.head(&key).await {
                Ok(meta) => meta,
                Err(StorageError::NotFound { .. }) => {
                    return Err(ApiError::conflict("upload_missing", "nothing has been uploaded to the URL yet"));
                }
                Err(err) => return Err(err.into()),
            },
            Err(err) => return Err(err.into()),
        };
        let limit = self.state.limits.upload_max_bytes;
        let refusal = if meta.size == 0 {
            Some(ApiError::bad_request("empty_upload", "the file is empty"))
        } else if meta.size > limit {
            Some(too_large(limit))
        } else if let Some(declared) = declared_size(&track).filter(|declared| *declared != meta.size) {
            Some(ApiError::bad_request(
                "size_mismatch",
                format!("{} bytes arrived, but the upload declared {declared}", meta.size),
            ))
        } else {
            let read = self
                .state
                .storage
                .get(&key, Some(ByteRange::Inclusive { first: 0, last: SNIFF_LEN as u64 - 1 }))
                .await?;
            let head: Vec<Bytes> = read.body.try_collect().await?;
            sniff(&head.concat()).is_none().then(not_audio)
        };
        if let Some(refusal) = refusal {
            // The object goes; the upload stays open for another try until it expires.
            storage.delete(&key).await?;
            return Err(refusal);
        }
        if !self.state.tracks.complete_upload(track.id, meta.size as i64).await? {
            return Err(ApiError::conflict("upload_completed", "this upload was completed meanwhile"));
        }
        self.state.track_changed(track.id);
        self.state.publish_soon();
        let track = self.state.tracks.details(track.id).await?.ok_or_else(|| ApiError::not_found("track"))?;
        let location = format!("/v1/tracks/{}", track.id);
        Ok(UploadAccepted::Accepted(Json(TrackView::from(track)), location))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_titles_come_from_the_file_name() {
        assert_eq!(super::default_title(Some("Night Drive.wav")), "Night Drive");
        assert_eq!(super::default_title(Some("C:\\music\\demo.v2.flac")), "demo.v2");
        assert_eq!(super::default_title(Some("../../etc/passwd")), "passwd");
        assert_eq!(super::default_title(Some(".wav")), "Untitled");
        assert_eq!(super::default_title(None), "Untitled");
    }
}
