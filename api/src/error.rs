//! `{"code", "message"}` for every error, the API's own and poem's.
//!
//! Handlers return `Result<_, ApiError>`: an [`ApiError`] carries its status, a stable code,
//! a message for people and, where HTTP asks for one, a header (`Content-Range` on 416,
//! `WWW-Authenticate` on 401). It is a poem `ResponseError`, so it keeps its own shape on the
//! way out; anything else that fails (unknown routes, unparsable parameters or bodies) is
//! turned into the same JSON by [`to_json`].
//!
//! **One validation path.** What a request may contain is declared on its types, so the
//! OpenAPI document says it and poem-openapi enforces it before a handler runs: validators
//! (lengths, patterns, ranges, item counts), enums for choices, and unknown JSON fields refused.
//! A request that fails any of them is 400 `invalid_field`, its message naming the parameter
//! (or, for a body, the field). The few checks only a handler can make (a cursor's content,
//! control characters in text) answer the same way.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::Type;
use poem_openapi::{ApiResponse, Object};
use waveline_shared::db::DbError;
use waveline_shared::documents::DocumentsError;
use waveline_shared::storage::StorageError;

/// The error body of every failed request.
#[derive(Debug, Clone, PartialEq, Eq, Object, serde::Serialize)]
pub struct ErrorBody {
    /// Stable, machine-readable (`not_found`, `not_ready`, …).
    pub code: String,
    /// For people.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: &str, message: impl Into<String>) -> ErrorBody {
        ErrorBody { code: code.to_owned(), message: message.into() }
    }
}

/// A failed request, as the client will see it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub header: Option<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), header: None }
    }

    /// The same error under another code.
    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = code;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> ApiError {
        self.header = Some((name, value));
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            .with_header("www-authenticate", "Bearer realm=\"waveline\"".to_owned())
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no such {what}"))
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    /// A dependency failed; the details go to the log (with the request id), not the client.
    pub fn unavailable(what: &str, err: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "{what} failed");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("the {what} is unavailable; try again"))
    }

    pub fn internal(err: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; the request id is in the logs")
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> ApiError {
        match err {
            DbError::Conflict(message) => ApiError::conflict("conflict", message),
            DbError::Invalid(message) => ApiError::bad_request("invalid_request", message),
            DbError::Unavailable(_) => ApiError::unavailable("database", &err),
            other => ApiError::internal(&other),
        }
    }
}

impl From<DocumentsError> for ApiError {
    fn from(err: DocumentsError) -> ApiError {
        match err {
            DocumentsError::InvalidCursor => {
                ApiError::bad_request("invalid_field", "cursor: not one this API returned for this list")
            }
            DocumentsError::Invalid { .. } | DocumentsError::ReplyTargetNotFound(_) => {
                ApiError::bad_request("invalid_field", err.to_string())
            }
            DocumentsError::Unavailable(_) => ApiError::unavailable("document store", &err),
            other => ApiError::internal(&other),
        }
    }
}

impl From<waveline_shared::db::social::AnnounceError> for ApiError {
    fn from(err: waveline_shared::db::social::AnnounceError) -> ApiError {
        match err {
            waveline_shared::db::social::AnnounceError::Db(err) => err.into(),
            waveline_shared::db::social::AnnounceError::Documents(err) => err.into(),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> ApiError {
        match err {
            StorageError::NotFound { .. } => ApiError::not_found("object"),
            StorageError::Remote(_) | StorageError::Io(_) => ApiError::unavailable("storage", &err),
            other => ApiError::internal(&other),
        }
    }
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn as_response(&self) -> Response {
        let mut response =
            poem::web::Json(ErrorBody::new(self.code, self.message.clone())).with_status(self.status).into_response();
        if let Some((name, value)) = &self.header
            && let Ok(value) = value.parse()
        {
            response.headers_mut().insert(*name, value);
        }
        response
    }
}

/// The statuses every operation may answer with an error body, for the OpenAPI document.
const ERROR_STATUSES: [(u16, &str); 12] = [
    (400, "The request is malformed or a field is invalid (the message names it)."),
    (401, "Authentication is required, or the token is invalid or expired."),
    (403, "Authenticated, but not allowed."),
    (404, "No such resource (private tracks of others answer the same)."),
    (408, "The request body did not arrive in time."),
    (409, "The resource is not in a state that allows this (a track not ready yet, a taken email)."),
    (413, "The body is larger than the configured maximum."),
    (415, "The upload is not audio (an image upload: not a JPEG, PNG or WebP)."),
    (416, "The range cannot be satisfied; `Content-Range: bytes */LENGTH`."),
    (429, "Too many requests (`Retry-After` says when to try again)."),
    (500, "An internal error; the request id is in the logs."),
    (503, "A dependency (database, queue, storage) is unavailable."),
];

impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: ERROR_STATUSES
                .iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(*status),
                    status_range: None,
                    content: vec![MetaMediaType {
                        content_type: "application/json; charset=utf-8",
                        schema: ErrorBody::schema_ref(),
                    }],
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

/// Turns any error that reached the top into the JSON error body; internal details are
/// logged, never returned.
pub async fn to_json(err: poem::Error) -> Response {
    if err.is::<ApiError>() {
        return err.into_response();
    }
    // A parameter or body that fails its declared schema: the one validation path (see the
    // module doc), named after the field.
    if let Some(param) = err.downcast_ref::<poem_openapi::error::ParseParamError>() {
        let err = ApiError::bad_request("invalid_field", format!("{}: {}", param.name, param.reason));
        return poem::error::ResponseError::as_response(&err);
    }
    if let Some(payload) = err.downcast_ref::<poem_openapi::error::ParseRequestPayloadError>() {
        let err = ApiError::bad_request("invalid_field", format!("body: {}", payload.reason));
        return poem::error::ResponseError::as_response(&err);
    }
    let status = err.status();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such resource".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this method is not allowed here".to_owned()),
        StatusCode::UNAUTHORIZED => {
            let err = ApiError::unauthorized("authentication required: send a Bearer token or the session cookie");
            return poem::error::ResponseError::as_response(&err);
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", err.to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", err.to_string()),
        StatusCode::BAD_REQUEST => ("invalid_field", err.to_string()),
        status if status.is_client_error() => ("bad_request", err.to_string()),
        _ => {
            tracing::error!(error = %err, "request failed");
            ("internal", "internal error; the request id is in the logs".to_owned())
        }
    };
    poem::web::Json(ErrorBody::new(code, message)).with_status(status).into_response()
}
