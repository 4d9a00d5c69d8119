//! Artwork and avatars: the upload routes (`PUT /v1/tracks/{id}/artwork`,
//! `PUT /v1/playlists/{id}/artwork`, `PUT /v1/me/avatar`), the route that serves the sizes
//! (`GET|HEAD /v1/images/{subjects}/{id}/{version}/{size}.jpg`), and the image fields of the
//! track, playlist and profile views.
//!
//! The API never decodes an image. An upload is a multipart form with one `file` field: its
//! first bytes must be a JPEG, PNG or WebP signature (415 `unsupported_image` otherwise, before
//! a byte is stored), it streams into storage through a counter that stops it past 10 MiB (413
//! `too_large`), under a fresh random version. The row and its job (`process_image`) are then
//! written in one transaction; a worker decodes it within limits, applies its EXIF
//! orientation, crops the centre square and stores the five JPEG sizes, and only then does the
//! version become the one served. Until then (and if it fails) the previous version, if any,
//! is still served.
//!
//! Serving needs no session and no database: a URL names the version, which is random, so it
//! cannot be guessed (a private track's artwork stays as private as its other URLs), and the
//! bytes under it never change (`Cache-Control: public, max-age=31536000, immutable`, strong
//! ETags, 304 on `If-None-Match`). A replaced version's objects are deleted once the new one
//! is served, and its URLs then answer 404.

use poem::Request;
use poem::web::Multipart;
use poem::{FromRequest, RequestBody};
use poem_openapi::param::Path;
use poem_openapi::payload::{Json, ParsePayload, Payload};
use poem_openapi::registry::{MetaSchema, MetaSchemaRef};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags, impl_apirequest_for_payload};
use uuid::Uuid;
use waveline_media::{IMAGE_SNIFF_LEN, sniff_image};
use waveline_shared::db::images::{ImageState, ImageStatus, PgImages};
use waveline_shared::images::{
    IMAGE_MAX_BYTES, ImageSize, ImageSubject, image_path, is_version, new_version, original_image_key, variant_key,
    version_prefix,
};

use crate::AppState;
use crate::auth::{Auth, Session};
use crate::error::{ApiError, ErrorBody};
use crate::serve::{ObjectResponse, ObjectSpec, serve_object};
use crate::uploads::{Admit, check_declared_length, close_after, interrupted, store_admitted};

#[derive(Tags)]
enum Tag {
    /// Track and playlist artwork, account avatars.
    Images,
}

/// The image routes.
#[derive(Debug)]
pub struct Artwork {
    pub state: AppState,
}

/// The cache lifetime of a size: a year, never revalidated (a version's bytes never change).
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// A `multipart/form-data` image upload: one `file` field.
pub struct ImageForm(Multipart);

impl std::fmt::Debug for ImageForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageForm")
    }
}

impl Payload for ImageForm {
    const CONTENT_TYPE: &'static str = "multipart/form-data";

    fn check_content_type(content_type: &str) -> bool {
        content_type.split(';').next().is_some_and(|essence| essence.trim().eq_ignore_ascii_case(Self::CONTENT_TYPE))
    }

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            required: vec!["file"],
            properties: vec![(
                "file",
                MetaSchemaRef::Inline(Box::new(MetaSchema {
                    description: Some(
                        "The image: JPEG, PNG or WebP (by its content), at most 10 MiB, at most 8192 pixels a side \
                         and 40 megapixels.",
                    ),
                    ..MetaSchema::new_with_format("string", "binary")
                })),
            )],
            ..MetaSchema::new("object")
        }))
    }
}

impl ParsePayload for ImageForm {
    const IS_REQUIRED: bool = true;

    async fn from_request(request: &Request, body: &mut RequestBody) -> poem::Result<Self> {
        Ok(ImageForm(Multipart::from_request(request, body).await?))
    }
}

impl_apirequest_for_payload!(ImageForm);

/// An image's state and where it is served.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct ImageView {
    /// The latest upload's: `pending`, `processing`, `ready` or `failed`.
    state: String,
    /// The served version's `large` (100×100) JPEG; put `t500x500`, `t300x300`, `t67x67` or
    /// `small` in place of `large` for the other sizes. Absent until a version is ready.
    url: Option<String>,
    /// Why the latest upload failed (`unsupported_image`, `invalid_image`, `too_large`, …);
    /// the previous version, if any, is still served.
    error: Option<ErrorBody>,
}

#[derive(ApiResponse)]
enum ImageAccepted {
    /// Stored and queued: the sizes appear when `state` is `ready` on the image's owner (the
    /// track's `artwork_state`, the playlist's, or the profile's `avatar_state`).
    #[oai(status = 202)]
    Accepted(Json<ImageView>),
}

/// The URL of the served `large` size, the state and the failure of one subject's image.
#[derive(Debug, Default)]
pub(crate) struct ImageFields {
    pub url: Option<String>,
    pub state: Option<String>,
    pub error: Option<ErrorBody>,
}

impl ImageFields {
    pub(crate) fn of(subject: ImageSubject, id: Uuid, status: Option<&ImageStatus>) -> ImageFields {
        let Some(status) = status else { return ImageFields::default() };
        ImageFields {
            url: status.ready_version.as_deref().map(|version| image_path(subject, id, version, ImageSize::Large)),
            state: Some(status.state.as_str().to_owned()),
            error: (status.state == ImageState::Failed).then(|| ErrorBody {
                code: status.error_code.clone().unwrap_or_else(|| "internal".to_owned()),
                message: status.error_message.clone().unwrap_or_default(),
            }),
        }
    }
}

/// The image repository, on the API's pool.
pub(crate) fn images(state: &AppState) -> PgImages {
    PgImages::new(state.tracks.pool().clone())
}

/// The images of `ids`, as view fields by id.
pub(crate) async fn fields_of(
    state: &AppState,
    subject: ImageSubject,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, ImageFields>, ApiError> {
    fields_from(&images(state), subject, ids).await
}

/// [`fields_of`] from the image repository itself.
pub(crate) async fn fields_from(
    images: &PgImages,
    subject: ImageSubject,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, ImageFields>, ApiError> {
    let statuses = images.statuses(subject, ids).await?;
    Ok(statuses.iter().map(|(id, status)| (*id, ImageFields::of(subject, *id, Some(status)))).collect())
}

/// The one field an image form has.
const IMAGE: Admit = Admit {
    sniff_len: IMAGE_SNIFF_LEN,
    check: |head| {
        sniff_image(head).is_none().then(|| {
            ApiError::new(
                poem::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_image",
                "the file is not a JPEG, PNG or WebP image (by its content)",
            )
        })
    },
};

fn image_too_large(limit: u64) -> ApiError {
    ApiError::new(
        poem::http::StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the image is larger than the {limit}-byte limit"),
    )
}

/// Stores the image in `form` as a new version of `subject` `id`'s image and queues its job.
async fn accept(
    state: &AppState,
    session: &Session,
    req: &Request,
    form: ImageForm,
    subject: ImageSubject,
    id: Uuid,
) -> Result<ImageAccepted, ApiError> {
    let _place = state.uploads_in_flight.take(session.user.id).map_err(close_after)?;
    check_declared_length(req, IMAGE_MAX_BYTES, 64 * 1024)
        .map_err(|_| close_after(image_too_large(IMAGE_MAX_BYTES)))?;
    let version = new_version();
    let key = original_image_key(subject, id, &version).map_err(|err| ApiError::internal(&err))?;
    let mut multipart = form.0;
    let mut stored = false;
    let result = async {
        while let Some(field) = multipart.next_field().await.map_err(interrupted)? {
            match field.name().unwrap_or_default() {
                "file" if !stored => {
                    let body = tokio_util::io::ReaderStream::with_capacity(field.into_async_read(), 64 * 1024);
                    store_admitted(state.storage.as_ref(), &key, body, IMAGE_MAX_BYTES, image_too_large, IMAGE).await?;
                    stored = true;
                }
                "file" => return Err(ApiError::bad_request("invalid_field", "file: one image per upload")),
                other => {
                    return Err(ApiError::bad_request(
                        "invalid_field",
                        format!("unknown form field {other:?}; the form has one field, `file`"),
                    ));
                }
            }
        }
        if !stored {
            return Err(ApiError::bad_request("missing_file", "the form has no `file` field"));
        }
        images(state).accept_upload(subject, id, &version, key.as_str()).await?.ok_or_else(|| {
            ApiError::not_found(match subject {
                ImageSubject::Track => "track",
                ImageSubject::Playlist => "playlist",
                ImageSubject::User => "user",
            })
        })
    }
    .await;
    let replaced = match result {
        Ok(replaced) => replaced,
        Err(err) => {
            if stored && let Err(cleanup) = state.storage.delete(&key).await {
                tracing::error!(%key, error = %cleanup, "could not remove the original of a refused image");
            }
            return Err(close_after(err));
        }
    };
    // A previous upload that was never served (still pending, or failed) is of no more use; a
    // served one stays until the new version is ready.
    if let Some(unserved) = replaced.unserved() {
        let prefix = version_prefix(subject, id, unserved);
        if let Err(err) = state.storage.delete_prefix(&prefix).await {
            tracing::warn!(%prefix, error = %err, "could not remove a replaced image version");
        }
    }
    state.publish_soon();
    tracing::info!(%subject, %id, %version, "image stored and queued");
    Ok(ImageAccepted::Accepted(Json(ImageView {
        state: ImageState::Pending.as_str().to_owned(),
        url: replaced.ready_version.as_deref().map(|ready| image_path(subject, id, ready, ImageSize::Large)),
        error: None,
    })))
}

/// Removes every version of a subject's image (the subject is being deleted).
pub(crate) async fn delete_objects(state: &AppState, subject: ImageSubject, id: Uuid) {
    let prefix = waveline_shared::images::image_prefix(subject, id);
    if let Err(err) = state.storage.delete_prefix(&prefix).await {
        tracing::error!(%prefix, error = %err, "could not delete a deleted subject's images");
    }
}

#[OpenApi(tag = "Tag::Images")]
impl Artwork {
    /// Uploads a track's artwork (owner only): multipart, one `file` field, a JPEG, PNG or
    /// WebP of at most 10 MiB. 202: stored and queued; the track's `artwork_state` follows it,
    /// and its `artwork_url` changes once the sizes are ready.
    #[oai(path = "/v1/tracks/:id/artwork", method = "put")]
    async fn track_artwork(
        &self,
        id: Path<String>,
        auth: Auth,
        req: &Request,
        form: ImageForm,
    ) -> Result<ImageAccepted, ApiError> {
        let session = auth.session();
        let id = crate::parse_track_id(&id.0).map_err(close_after)?;
        let track = self.state.tracks.details(id).await?.ok_or_else(|| close_after(ApiError::not_found("track")))?;
        if !crate::may_see(track.owner_id, track.visibility, Some(session)) {
            return Err(close_after(ApiError::not_found("track")));
        }
        if track.owner_id != session.user.id {
            return Err(close_after(ApiError::forbidden("only the track's owner may do this")));
        }
        accept(&self.state, session, req, form, ImageSubject::Track, id.0).await
    }

    /// Uploads a playlist's artwork (owner only), as for a track.
    #[oai(path = "/v1/playlists/:id/artwork", method = "put")]
    async fn playlist_artwork(
        &self,
        id: Path<String>,
        auth: Auth,
        req: &Request,
        form: ImageForm,
    ) -> Result<ImageAccepted, ApiError> {
        let session = auth.session();
        let row = crate::playlists::visible(&self.state, &id.0, Some(session)).await.map_err(close_after)?;
        if row.owner_id != session.user.id {
            return Err(close_after(ApiError::forbidden("only the playlist's owner may do this")));
        }
        accept(&self.state, session, req, form, ImageSubject::Playlist, row.id.0).await
    }

    /// Uploads the signed-in account's avatar, as for artwork; the profile's `avatar_state`
    /// and `avatar_url` follow it.
    #[oai(path = "/v1/me/avatar", method = "put")]
    async fn avatar(&self, auth: Auth, req: &Request, form: ImageForm) -> Result<ImageAccepted, ApiError> {
        let session = auth.session();
        accept(&self.state, session, req, form, ImageSubject::User, session.user.id.0).await
    }

    /// One size of an image, as `artwork_url` and `avatar_url` name it (`large.jpg`;
    /// `t500x500.jpg`, `t300x300.jpg`, `t67x67.jpg` and `small.jpg` beside it). Public and
    /// immutable: the version in the path is random and its bytes never change.
    #[oai(path = "/v1/images/:subjects/:id/:version/:file", method = "get", method = "head")]
    async fn serve(
        &self,
        req: &Request,
        /// `tracks`, `playlists` or `users`.
        subjects: Path<String>,
        id: Path<String>,
        /// The image's version (32 hex digits).
        version: Path<String>,
        /// `t500x500.jpg`, `t300x300.jpg`, `large.jpg`, `t67x67.jpg` or `small.jpg`.
        file: Path<String>,
    ) -> Result<ObjectResponse, ApiError> {
        let not_found = || ApiError::not_found("image");
        let subject = ImageSubject::from_plural(&subjects.0).ok_or_else(not_found)?;
        let id: Uuid = id.0.parse().map_err(|_| not_found())?;
        if !is_version(&version.0) {
            return Err(not_found());
        }
        let size = file.0.strip_suffix(".jpg").and_then(ImageSize::parse).ok_or_else(not_found)?;
        let key = variant_key(subject, id, &version.0, size).map_err(|_| not_found())?;
        let spec = ObjectSpec { key, content_type: "image/jpeg", cache_control: IMMUTABLE.to_owned(), route: "image" };
        serve_object(self.state.storage.as_ref(), &spec, req).await.map_err(|err| {
            // A replaced version's objects are gone: that is a plain 404, not a lost object.
            if err.code == "not_found" { not_found() } else { err }
        })
    }
}
