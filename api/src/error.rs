//! `{"code", "message"}` for every error, the API's own and poem's.

use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::Object;

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

/// Turns any error that reached the top (unknown route, bad parameter, a handler's failure)
/// into the JSON error body, hiding internal details behind a generic message.
pub async fn to_json(err: poem::Error) -> Response {
    let status = err.status();
    let (code, message) = match status {
        StatusCode::NOT_FOUND => ("not_found", "no such resource".to_owned()),
        StatusCode::METHOD_NOT_ALLOWED => ("method_not_allowed", "this method is not allowed here".to_owned()),
        StatusCode::BAD_REQUEST => ("bad_request", err.to_string()),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", err.to_string()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported_media_type", err.to_string()),
        status if status.is_client_error() => ("bad_request", err.to_string()),
        _ => {
            tracing::error!(error = %err, "request failed");
            ("internal", "internal error; the request id is in the logs".to_owned())
        }
    };
    poem::web::Json(ErrorBody::new(code, message)).with_status(status).into_response()
}
