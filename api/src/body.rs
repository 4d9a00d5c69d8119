//! Request bodies: bounded in size and in time, before any handler parses them.
//!
//! - **JSON and every other small body** (every route but the upload routes) is read here,
//!   up to `json_body_max_bytes` (64 KiB by default), within `body_read_timeout_s`. A
//!   `Content-Length` over the limit is refused before a byte is read; a chunked body is
//!   refused the moment it passes the limit, so a client can never make the process hold more
//!   than the limit per request. Either way the answer is 413 `too_large` and the connection
//!   closes (the rest of the body is never read). The handler then parses the bytes read here.
//! - **The upload routes** (`POST /v1/tracks`, `PUT /v1/uploads/{id}`, and the images:
//!   `PUT /v1/tracks/{id}/artwork`, `PUT /v1/playlists/{id}/artwork`, `PUT /v1/me/avatar`)
//!   stream into storage, and their size limits (`upload_max_bytes`, 10 MiB for images) are
//!   enforced as they stream (see `uploads` and `artwork`).
//!   Here they get an idle timeout: each chunk must arrive within `body_read_timeout_s`, or
//!   the upload fails as interrupted (400 `upload_interrupted`, saying why) and nothing is kept.
//!
//! - **Stripe's webhook** (`POST /v1/billing/webhook`) is read the same way, up to
//!   [`WEBHOOK_MAX_BYTES`] (Stripe's events can outgrow the JSON limit), so its signature is
//!   checked over the raw bytes.
//!
//! A body that stops arriving on a small route is 408 `body_timeout` as well.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use poem::http::{Method, StatusCode};
use poem::{Body, Request};

use crate::error::ApiError;

/// The body limits, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// The largest body of a route that is not an upload.
    pub json_max_bytes: u64,
    /// How long a small body may take to arrive whole, and the longest pause within an upload.
    pub read_timeout: Duration,
}

impl Default for BodyLimits {
    fn default() -> BodyLimits {
        BodyLimits { json_max_bytes: 64 * 1024, read_timeout: Duration::from_secs(30) }
    }
}

/// The largest Stripe webhook delivery read.
pub const WEBHOOK_MAX_BYTES: u64 = 1 << 20;

/// The routes whose bodies stream into storage.
fn is_upload(method: &Method, path: &str) -> bool {
    let one_segment = |id: &str| !id.is_empty() && !id.contains('/');
    match *method {
        Method::POST => path == "/v1/tracks",
        Method::PUT => {
            path.strip_prefix("/v1/uploads/").is_some_and(one_segment)
                || path == "/v1/me/avatar"
                || ["/v1/tracks/", "/v1/playlists/"].iter().any(|collection| {
                    path.strip_prefix(collection)
                        .and_then(|rest| rest.strip_suffix("/artwork"))
                        .is_some_and(one_segment)
                })
        }
        _ => false,
    }
}

pub(crate) fn too_large(limit: u64) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("the request body is larger than {limit} bytes"))
        .with_header("connection", "close".to_owned())
}

fn timed_out(timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!("the request body did not arrive within {} s", timeout.as_secs()),
    )
    .with_header("connection", "close".to_owned())
}

/// Reads `body` whole, refusing it once it passes `limit` bytes.
async fn read_bounded(body: Body, limit: u64) -> Result<Bytes, ApiError> {
    let mut stream = std::pin::pin!(body.into_bytes_stream());
    let mut data = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| {
            tracing::debug!(error = %err, "the request body broke off");
            ApiError::bad_request("body_interrupted", "the request body broke off before its end")
        })?;
        if data.len() as u64 + chunk.len() as u64 > limit {
            return Err(too_large(limit));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

/// `stream`, failing with `TimedOut` when a chunk takes longer than `idle` to arrive.
fn with_idle_timeout(
    stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    idle: Duration,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures::stream::unfold(Some(Box::pin(stream)), move |stream| async move {
        let mut stream = stream?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no part of the body arrived for {} s", idle.as_secs()),
                )),
                None,
            )),
        }
    })
}

/// Bounds `req`'s body: a small body is read here within the limits (and handed on as
/// bytes), an upload's stream gets its idle timeout.
pub async fn bound(limits: &BodyLimits, req: &mut Request) -> Result<(), ApiError> {
    let body = req.take_body();
    if body.is_empty() {
        req.set_body(body);
    } else if is_upload(req.method(), req.uri().path()) {
        req.set_body(Body::from_bytes_stream(with_idle_timeout(body.into_bytes_stream(), limits.read_timeout)));
    } else {
        let webhook = req.method() == Method::POST && req.uri().path() == "/v1/billing/webhook";
        let limit = if webhook { WEBHOOK_MAX_BYTES } else { limits.json_max_bytes };
        let declared = req.header("content-length").and_then(|value| value.trim().parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit) {
            return Err(too_large(limit));
        }
        let bytes = tokio::time::timeout(limits.read_timeout, read_bounded(body, limit))
            .await
            .map_err(|_| timed_out(limits.read_timeout))??;
        req.set_body(Body::from_bytes(bytes));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_upload_routes_stream() {
        assert!(is_upload(&Method::POST, "/v1/tracks"));
        assert!(is_upload(&Method::PUT, "/v1/uploads/01a216e7-6dd6-7549-81aa-f16443f12081"));
        assert!(!is_upload(&Method::PUT, "/v1/uploads/x/complete"));
        assert!(!is_upload(&Method::PUT, "/v1/uploads/"));
        assert!(!is_upload(&Method::POST, "/v1/auth/login"));
        assert!(!is_upload(&Method::PATCH, "/v1/tracks"));
        assert!(is_upload(&Method::PUT, "/v1/tracks/01a216e7-6dd6-7549-81aa-f16443f12081/artwork"));
        assert!(is_upload(&Method::PUT, "/v1/playlists/01a216e7-6dd6-7549-81aa-f16443f12081/artwork"));
        assert!(is_upload(&Method::PUT, "/v1/me/avatar"));
        assert!(!is_upload(&Method::PUT, "/v1/tracks//artwork"));
        assert!(!is_upload(&Method::PUT, "/v1/tracks/a/b/artwork"));
        assert!(!is_upload(&Method::PUT, "/v1/users/x/artwork"));
    }

    #[tokio::test]
    async fn a_chunked_body_is_refused_as_soon_as_it_passes_the_limit() {
        // An endless body: reading it whole would never end (nor fit in memory).
        let endless = futures::stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from_static(&[b'x'; 1024])));
        let err = read_bounded(Body::from_bytes_stream(endless), 64 * 1024).await.expect_err("over the limit");
        assert_eq!((err.status, err.code), (StatusCode::PAYLOAD_TOO_LARGE, "too_large"));
        let fits = read_bounded(Body::from_bytes(Bytes::from_static(b"{\"a\":1}")), 7).await.expect("fits");
        assert_eq!(&fits[..], b"{\"a\":1}");
    }

    #[tokio::test]
    async fn an_upload_that_stalls_times_out() {
        let stalled = futures::stream::iter([Ok(Bytes::from_static(b"abc"))]).chain(futures::stream::pending());
        let mut stream = std::pin::pin!(with_idle_timeout(stalled, Duration::from_millis(50)));
        assert_eq!(&stream.next().await.expect("first").expect("data")[..], b"abc");
        let err = stream.next().await.expect("an error").expect_err("timed out");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(stream.next().await.is_none());
    }
}
