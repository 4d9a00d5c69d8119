//! Serving stored objects over HTTP with RFC 9110 semantics: ranges, validators, HEAD.
//!
//! One function, [`serve_object`], serves every byte route (progressive streams, HLS
//! playlists and segments, waveforms):
//!
//! - `Accept-Ranges: bytes`; one range per request in any of its three forms (`N-M`, `N-`,
//!   `-N`). A `Range` with several ranges, or in another unit, is ignored and the whole body
//!   sent (RFC 9110 allows that), rather than building `multipart/byteranges`.
//! - An unsatisfiable range is 416 with `Content-Range: bytes */LENGTH`.
//! - `If-Range` with an ETag or date that no longer matches sends the whole body with 200.
//! - A strong ETag and `Last-Modified` from the store; `If-None-Match` answers 304.
//! - The body is a ranged read from storage, streamed chunk by chunk: an object is never held
//!   whole in memory. Bytes sent are counted in `waveline_http_stream_bytes_total`.
//!
//! Without `If-Range`, a ranged GET is one storage call: the store resolves the range
//! against the object's size and returns the metadata with the body.
//!
//! In redirect mode ([`crate::redirect`]) the listening routes answer most requests with
//! [`ObjectResponse::redirect`] instead, and storage applies these same rules at the target.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use poem::http::{Method, StatusCode};
use poem::{Body, IntoResponse, Request, Response};
use poem_openapi::ApiResponse;
use poem_openapi::registry::{
    MetaHeader, MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry,
};
use poem_openapi::types::Type;
use waveline_shared::storage::{ByteRange, ObjectKey, ObjectMeta, Storage, StorageError};

use crate::error::ApiError;

/// What to serve and how to label it.
#[derive(Debug, Clone)]
pub struct ObjectSpec {
    pub key: ObjectKey,
    pub content_type: &'static str,
    pub cache_control: String,
    /// The metrics label of the route (`stream`, `hls`, `waveform`).
    pub route: &'static str,
}

/// A byte response: 200, 206 or 304, or a 307 to where the bytes are in redirect mode (errors
/// go through [`ApiError`]).
#[derive(Debug)]
pub struct ObjectResponse(Response);

impl ObjectResponse {
    /// 307 to `location` (redirect mode; see [`crate::redirect`]). `no-store`: the target
    /// expires, so every request asks again.
    pub fn redirect(location: &str) -> ObjectResponse {
        ObjectResponse(
            Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header("location", location)
                .header("cache-control", "no-store")
                .finish(),
        )
    }

    /// A body made here rather than read from storage (a rewritten playlist): 200, the whole
    /// body, and no validators, since the body differs from the stored object's.
    pub fn generated(spec: &ObjectSpec, body: String, head: bool) -> ObjectResponse {
        let builder = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", spec.content_type)
            .header("cache-control", spec.cache_control.as_str())
            .header("content-length", body.len());
        ObjectResponse(if head { builder.finish() } else { builder.body(body) })
    }
}

impl IntoResponse for ObjectResponse {
    fn into_response(self) -> Response {
        self.0
    }
}

fn header(name: &str, description: &str) -> MetaHeader {
    MetaHeader {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        required: name == "Location",
        deprecated: false,
        schema: String::schema_ref(),
    }
}

impl ApiResponse for ObjectResponse {
    fn meta() -> MetaResponses {
        let binary = || {
            vec![MetaMediaType {
                content_type: "application/octet-stream",
                schema: MetaSchemaRef::Inline(Box::new(MetaSchema::new_with_format("string", "binary"))),
            }]
        };
        let validators = || {
            vec![
                header(
                    "Content-Type",
                    "the object's media type (audio/mpeg, audio/ogg, application/vnd.apple.mpegurl, …)",
                ),
                header("ETag", "a strong entity tag"),
                header("Last-Modified", "when this version was stored"),
                header("Accept-Ranges", "`bytes`"),
                header("Cache-Control", "how long caches may keep it"),
            ]
        };
        let mut partial = validators();
        partial.push(header("Content-Range", "`bytes FIRST-LAST/LENGTH`"));
        MetaResponses {
            responses: vec![
                MetaResponse {
                    description: "The whole object (no `Range`, or a stale `If-Range`).",
                    status: Some(200),
                    status_range: None,
                    content: binary(),
                    headers: validators(),
                },
                MetaResponse {
                    description: "The requested range.",
                    status: Some(206),
                    status_range: None,
                    content: binary(),
                    headers: partial,
                },
                MetaResponse {
                    description: "Unchanged since the ETag in `If-None-Match`.",
                    status: Some(304),
                    status_range: None,
                    content: vec![],
                    headers: vec![header("ETag", "a strong entity tag")],
                },
                MetaResponse {
                    description: "Only when the server runs with `stream_mode = redirect`: access was checked and the \
                                  bytes are at `Location` (a presigned storage URL, or the CDN for public tracks). \
                                  Repeat the request there with the same method and headers (`Range`, `If-Range`, \
                                  `If-None-Match`); the URL expires, so come back here for a new one. HLS playlists \
                                  are never redirected.",
                    status: Some(307),
                    status_range: None,
                    content: vec![],
                    headers: vec![
                        header("Location", "where the bytes are, for a limited time"),
                        header("Cache-Control", "`no-store`"),
                    ],
                },
            ],
        }
    }

    fn register(_registry: &mut Registry) {}
}

/// An HTTP date (RFC 9110 IMF-fixdate).
pub fn http_date(at: DateTime<Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn parse_http_date(text: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(text.trim(), "%a, %d %b %Y %H:%M:%S GMT").ok().map(|at| at.and_utc())
}

/// The single byte range of a `Range` header, or `None` when the header should be ignored
/// (another unit, several ranges, or not the RFC's syntax).
pub fn parse_range(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let number = |text: &str| -> Option<u64> {
        let text = text.trim();
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => Some(ByteRange::Suffix { len: number(last)? }),
        (false, true) => Some(ByteRange::From { first: number(first)? }),
        (false, false) => {
            let (first, last) = (number(first)?, number(last)?);
            (first <= last).then_some(ByteRange::Inclusive { first, last })
        }
        (true, true) => None,
    }
}

/// Whether an `If-None-Match` list holds `etag` (weak comparison, as RFC 9110 says for it).
pub(crate) fn none_match(header: &str, etag: &str) -> bool {
    fn bare(tag: &str) -> &str {
        tag.trim().trim_start_matches("W/")
    }
    header.split(',').any(|tag| tag.trim() == "*" || bare(tag) == bare(etag))
}

/// Whether `If-Range` still names the stored version (strong comparison; a date must equal
/// `Last-Modified`).
fn if_range_holds(value: &str, meta: &ObjectMeta) -> bool {
    let value = value.trim();
    if value.starts_with('"') {
        value == meta.etag
    } else {
        parse_http_date(value).is_some_and(|at| at.timestamp() == meta.last_modified.timestamp())
    }
}

fn base_response(status: StatusCode, spec: &ObjectSpec, meta: &ObjectMeta) -> poem::ResponseBuilder {
    Response::builder()
        .status(status)
        .header("content-type", spec.content_type)
        .header("etag", meta.etag.as_str())
        .header("last-modified", http_date(meta.last_modified))
        .header("accept-ranges", "bytes")
        .header("cache-control", spec.cache_control.as_str())
}

fn not_modified(spec: &ObjectSpec, meta: &ObjectMeta) -> ObjectResponse {
    ObjectResponse(
        Response::builder()
            .status(StatusCode::NOT_MODIFIED)
            .header("etag", meta.etag.as_str())
            .header("cache-control", spec.cache_control.as_str())
            .finish(),
    )
}

fn unsatisfiable(size: u64) -> ApiError {
    ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
        format!("the range is outside the object's {size} bytes"),
    )
    .with_header("content-range", format!("bytes */{size}"))
}

/// Serves `spec.key` for a GET or HEAD `req`.
pub async fn serve_object(storage: &dyn Storage, spec: &ObjectSpec, req: &Request) -> Result<ObjectResponse, ApiError> {
    let range = req.header("range").and_then(parse_range);
    let if_range = req.header("if-range").map(str::to_owned);
    let if_none_match = req.header("if-none-match").map(str::to_owned);
    let storage_error = |err: StorageError| match err {
        StorageError::RangeNotSatisfiable { size } => unsatisfiable(size),
        StorageError::NotFound { .. } => {
            tracing::warn!(key = %spec.key, "an object named by the live revision is not in storage");
            ApiError::not_found("object")
        }
        other => other.into(),
    };

    // HEAD, conditional requests and `If-Range` look at the metadata first.
    let meta = if req.method() == Method::HEAD || if_range.is_some() || if_none_match.is_some() {
        Some(storage.head(&spec.key).await.map_err(storage_error)?)
    } else {
        None
    };
    if let (Some(meta), Some(header)) = (&meta, &if_none_match)
        && none_match(header, &meta.etag)
    {
        return Ok(not_modified(spec, meta));
    }
    let range = match (&meta, &if_range) {
        (Some(meta), Some(value)) if !if_range_holds(value, meta) => None,
        _ => range,
    };

    if req.method() == Method::HEAD {
        let Some(meta) = meta else { return Err(ApiError::internal(&"HEAD without metadata")) };
        return Ok(ObjectResponse(match range {
            None => base_response(StatusCode::OK, spec, &meta).header("content-length", meta.size).finish(),
            Some(range) => {
                let resolved = range.resolve(meta.size).ok_or_else(|| unsatisfiable(meta.size))?;
                base_response(StatusCode::PARTIAL_CONTENT, spec, &meta)
                    .header("content-range", format!("bytes {}-{}/{}", resolved.first, resolved.last, meta.size))
                    .header("content-length", resolved.len())
                    .finish()
            }
        }));
    }

    let read = storage.get(&spec.key, range).await.map_err(storage_error)?;
    // The object may have been replaced between `head` and `get`; the read's own metadata is
    // what the body is.
    let meta = read.meta;
    let route = spec.route;
    let body = Body::from_bytes_stream(read.body.map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        metrics::counter!("waveline_http_stream_bytes_total", "route" => route).increment(chunk.len() as u64);
        Ok::<_, std::io::Error>(chunk)
    }));
    let response = match (range, read.range) {
        (Some(_), Some(resolved)) => base_response(StatusCode::PARTIAL_CONTENT, spec, &meta)
            .header("content-range", format!("bytes {}-{}/{}", resolved.first, resolved.last, meta.size))
            .header("content-length", resolved.len())
            .body(body),
        _ => base_response(StatusCode::OK, spec, &meta).header("content-length", meta.size).body(body),
    };
    Ok(ObjectResponse(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_headers_parse_as_rfc_9110_says() {
        assert_eq!(parse_range("bytes=0-99"), Some(ByteRange::Inclusive { first: 0, last: 99 }));
        assert_eq!(parse_range("bytes=100-"), Some(ByteRange::From { first: 100 }));
        assert_eq!(parse_range("bytes=-500"), Some(ByteRange::Suffix { len: 500 }));
        assert_eq!(parse_range(" bytes= 5 - 9 "), Some(ByteRange::Inclusive { first: 5, last: 9 }));
        // Ignored: several ranges, other units, nonsense, reversed.
        for ignored in ["bytes=0-1,5-6", "items=0-5", "bytes=a-b", "bytes=-", "bytes=9-5", "bytes=+1-2", "0-5"] {
            assert_eq!(parse_range(ignored), None, "{ignored}");
        }
        // Numbers too large for u64 are ignored rather than wrapped.
        assert_eq!(parse_range("bytes=0-99999999999999999999999"), None);
    }

    #[test]
    fn validators_compare_as_specified() {
        let meta = ObjectMeta {
            size: 10,
            etag: "\"abc\"".into(),
            content_type: "audio/mpeg".into(),
            last_modified: DateTime::from_timestamp(1_700_000_000, 0).expect("time"),
        };
        assert!(none_match("\"abc\"", &meta.etag));
        assert!(none_match("\"x\", W/\"abc\"", &meta.etag));
        assert!(none_match("*", &meta.etag));
        assert!(!none_match("\"abd\"", &meta.etag));
        assert!(if_range_holds("\"abc\"", &meta));
        assert!(!if_range_holds("W/\"abc\"", &meta));
        assert!(if_range_holds(&http_date(meta.last_modified), &meta));
        assert!(!if_range_holds("Tue, 14 Nov 2023 22:13:21 GMT", &meta));
        assert_eq!(http_date(meta.last_modified), "Tue, 14 Nov 2023 22:13:20 GMT");
    }
}
