//! Around every request: a request id (`X-Request-Id`, on the log span too), and the
//! Prometheus series `waveline_http_requests_total{method,route,status}` and
//! `waveline_http_request_duration_seconds{method,route}`.
//!
//! Every label comes from a closed set, so no client can grow the number of series: `route`
//! is the OpenAPI path template the request matched (`/v1/tracks/{id}/status`; never the raw
//! path, which holds ids and the signatures of signed URLs), `/docs` for Swagger UI, or
//! `unmatched`; `method` is one of HTTP's standard methods or `other`; `status` is the status
//! code.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metrics::{Counter, Histogram};
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::{Endpoint, IntoResponse, Request, Response, Result};
use tracing::Instrument;

/// The label of a request that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// One path template of the API.
#[derive(Debug, Clone)]
struct Template {
    /// Its segments (`None` for a parameter).
    segments: Vec<Option<String>>,
    label: Arc<str>,
    /// The `Allow` header of a 405 on it.
    allow: Option<HeaderValue>,
}

/// The API's path templates, to label requests with.
#[derive(Debug)]
pub struct RouteTemplates {
    templates: Vec<Template>,
    /// The series' handles, registered once per label set rather than looked up by label
    /// strings on every request (the label sets are bounded, see the module doc).
    handles: Mutex<HashMap<SeriesKey, (Counter, Histogram)>>,
}

/// A request series' labels: route template, method, status.
type SeriesKey = (Arc<str>, &'static str, u16);

impl RouteTemplates {
    /// The templates of `routes` (OpenAPI style: `/v1/tracks/{id}`, with their methods), plus
    /// `/openapi.json`.
    pub fn new(routes: impl IntoIterator<Item = (String, Vec<String>)>) -> RouteTemplates {
        let mut templates: Vec<Template> = routes
            .into_iter()
            .chain([("/openapi.json".to_owned(), vec!["GET".to_owned()])])
            .map(|(path, methods)| Template {
                segments: path
                    .split('/')
                    .map(|segment| (!(segment.starts_with('{') && segment.ends_with('}'))).then(|| segment.to_owned()))
                    .collect(),
                allow: HeaderValue::from_str(&methods.join(", ")).ok(),
                label: Arc::from(path),
            })
            .collect();
        // More literal segments first: `/v1/tracks/{id}/hls/master.m3u8` before a template
        // with a parameter in that place.
        templates.sort_by_key(|template| std::cmp::Reverse(template.segments.iter().filter(|s| s.is_some()).count()));
        RouteTemplates { templates, handles: Mutex::default() }
    }

    fn matching(&self, path: &str) -> Option<&Template> {
        let count = path.split('/').count();
        self.templates.iter().find(|template| {
            template.segments.len() == count
                && template.segments.iter().zip(path.split('/')).all(|(want, got)| match want {
                    Some(literal) => literal == got,
                    None => !got.is_empty(),
                })
        })
    }

    /// The label of `path`.
    pub fn label(&self, path: &str) -> Arc<str> {
        if path == "/docs" || path.starts_with("/docs/") {
            return Arc::from("/docs");
        }
        self.matching(path).map(|template| template.label.clone()).unwrap_or_else(|| Arc::from(UNMATCHED))
    }

    /// The request counter and duration histogram of one label set.
    fn handles(&self, route: &Arc<str>, method: &'static str, status: u16) -> (Counter, Histogram) {
        let mut handles = self.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        handles
            .entry((route.clone(), method, status))
            .or_insert_with(|| {
                let route = route.to_string();
                (
                    metrics::counter!("waveline_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string()),
                    metrics::histogram!("waveline_http_request_duration_seconds", "method" => method, "route" => route),
                )
            })
            .clone()
    }

    /// The methods `path` answers, as an `Allow` header.
    pub fn allow(&self, path: &str) -> Option<HeaderValue> {
        self.matching(path).and_then(|template| template.allow.clone())
    }
}

/// The method's label: a standard method, or `other`.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// A request id unique to this process's lifetime and, by its random start, across processes:
/// 32 hex digits without a system call per request (a random UUID reads the OS's RNG each
/// time).
fn new_request_id() -> String {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    format!("{start:016x}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The middleware (`EndpointExt::around`).
pub async fn observe<E: Endpoint>(routes: Arc<RouteTemplates>, next: E, request: Request) -> Result<Response> {
    let request_id = request
        .header("x-request-id")
        .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let method = method_label(request.method());
    let path = request.uri().path().to_owned();
    let route = routes.label(&path);
    let span = tracing::info_span!("request", %request_id, %method, route = %route, %path);
    let started = Instant::now();
    let result = next.call(request).instrument(span.clone()).await;
    let mut response = match result {
        Ok(response) => response.into_response(),
        Err(err) => crate::error::to_json(err).await,
    };
    // RFC 9110: a 405 says which methods the resource has.
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = routes.allow(&path)
    {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    let status = response.status().as_u16();
    span.in_scope(|| tracing::debug!(%status, elapsed_ms = started.elapsed().as_millis() as u64, "served"));
    let (requests, duration) = routes.handles(&route, method, status);
    requests.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    if let Ok(value) = request_id.parse() {
        response.headers_mut().insert("x-request-id", value);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_labelled_by_their_template() {
        let routes = RouteTemplates::new(
            [
                "/v1/tracks",
                "/v1/tracks/{id}",
                "/v1/tracks/{id}/status",
                "/v1/tracks/{id}/hls/master.m3u8",
                "/v1/tracks/{id}/hls/{variant}/{file}",
                "/v1/signed/{expires}/{signature}/tracks/{id}/waveform",
                "/healthz",
            ]
            .map(|path| (path.to_owned(), vec!["GET".to_owned(), "HEAD".to_owned()])),
        );
        assert_eq!(routes.allow("/v1/tracks/x/status").expect("allow"), "GET, HEAD");
        assert!(routes.allow("/v1/nothing").is_none());
        let label = |path: &str| routes.label(path).to_string();
        assert_eq!(label("/v1/tracks/01a216e7-6dd6-7549-81aa-f16443f12081/status"), "/v1/tracks/{id}/status");
        assert_eq!(label("/v1/tracks/x/hls/master.m3u8"), "/v1/tracks/{id}/hls/master.m3u8");
        assert_eq!(label("/v1/tracks/x/hls/160k/seg_00001.m4s"), "/v1/tracks/{id}/hls/{variant}/{file}");
        assert_eq!(
            label("/v1/signed/1700000000/c2lnbmF0dXJl/tracks/x/waveform"),
            "/v1/signed/{expires}/{signature}/tracks/{id}/waveform"
        );
        assert_eq!(label("/healthz"), "/healthz");
        assert_eq!(label("/openapi.json"), "/openapi.json");
        assert_eq!(label("/docs/index.css"), "/docs");
        for stranger in ["/", "/v1/nothing", "/v1/tracks//status", "/healthz/x", "/wp-login.php"] {
            assert_eq!(label(stranger), UNMATCHED, "{stranger}");
        }
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").expect("method")), "other");
    }
}
