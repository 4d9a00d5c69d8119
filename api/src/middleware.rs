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
pub struct Template {
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
    /// Swagger UI's pages, all under one label.
    docs: Template,
    /// The series' handles, registered once per label set rather than looked up by label
    /// strings on every request (the label sets are bounded, see the module doc).
    handles: Mutex<HashMap<SeriesKey, (Counter, Histogram)>>,
}

/// A request series' labels: route template (by its label's address, which is unique and
/// stable for the process's life), method, status.
type SeriesKey = (usize, &'static str, u16);

impl RouteTemplates {
    /// The templates of `routes` (OpenAPI style: `/v1/tracks/{id}`, with their methods), plus
    /// `/openapi.json`.
    pub fn new(routes: impl IntoIterator<Item = (String, Vec<String>)>) -> RouteTemplates {
        // Paths of the same shape (`/v1/me/conversations/{username}/messages` for POST and
        // `/v1/me/conversations/{id}/messages` for GET) are one resource to a client: one
        // template, its methods together, named after the first of them.
        let mut shapes: Vec<(Vec<Option<String>>, String, Vec<String>)> = Vec::new();
        for (path, methods) in routes.into_iter().chain([("/openapi.json".to_owned(), vec!["GET".to_owned()])]) {
            let segments: Vec<Option<String>> = path
                .split('/')
                .map(|segment| (!(segment.starts_with('{') && segment.ends_with('}'))).then(|| segment.to_owned()))
                .collect();
            match shapes.iter_mut().find(|(shape, _, _)| *shape == segments) {
                Some((_, _, known)) => {
                    known.extend(methods);
                    known.sort_unstable();
                    known.dedup();
                }
                None => shapes.push((segments, path, methods)),
            }
        }
        let mut templates: Vec<Template> = shapes
            .into_iter()
            .map(|(segments, path, methods)| Template {
                segments,
                allow: HeaderValue::from_str(&methods.join(", ")).ok(),
                label: Arc::from(path),
            })
            .collect();
        // More literal segments first: `/v1/tracks/{id}/hls/master.m3u8` before a template
        // with a parameter in that place.
        templates.sort_by_key(|template| std::cmp::Reverse(template.segments.iter().filter(|s| s.is_some()).count()));
        let docs = Template { segments: Vec::new(), label: Arc::from("/docs"), allow: None };
        RouteTemplates { templates, docs, handles: Mutex::default() }
    }

    /// The template `path` matches, if any.
    pub fn classify(&self, path: &str) -> Option<&Template> {
        if path == "/docs" || path.starts_with("/docs/") {
            return Some(&self.docs);
        }
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
    #[cfg(test)]
    fn label(&self, path: &str) -> &str {
        self.classify(path).map_or(UNMATCHED, |template| &template.label)
    }

    /// The request counter and duration histogram of one label set.
    fn handles(&self, template: Option<&Template>, method: &'static str, status: u16) -> (Counter, Histogram) {
        let route = template.map_or(UNMATCHED, |template| &*template.label);
        let mut handles = self.handles.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        handles
            .entry((route.as_ptr() as usize, method, status))
            .or_insert_with(|| {
                (
                    metrics::counter!("waveline_http_requests_total", "method" => method, "route" => route.to_owned(), "status" => status.to_string()),
                    metrics::histogram!("waveline_http_request_duration_seconds", "method" => method, "route" => route.to_owned()),
                )
            })
            .clone()
    }

    /// The methods `path` answers, as an `Allow` header.
    #[cfg(test)]
    fn allow(&self, path: &str) -> Option<HeaderValue> {
        self.classify(path).and_then(|template| template.allow.clone())
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

/// Everything every request passes through before its route, in one place so that the order
/// is plain to read (and a request pays for one layer, not one per concern).
#[derive(Debug)]
pub struct Front {
    pub routes: RouteTemplates,
    pub policy: crate::security::Policy,
    pub throttle: crate::throttle::Throttle,
    pub body: crate::body::BodyLimits,
    /// Marked as each request arrives (the in-process pipeline yields while it is busy).
    pub foreground: Arc<waveline_shared::foreground::Foreground>,
}

/// The middleware (`EndpointExt::around`), in order:
///
/// 0. the request marks the API busy (see [`waveline_shared::foreground`]);
/// 1. the security policy reads the request; a CORS preflight it allows is answered at once;
/// 2. a request id and a log span, and the clock starts;
/// 3. the throttle (429), then the body limits (413, 408);
/// 4. the route; any error becomes JSON `{code, message}`;
/// 5. `Allow` on a 405, the metrics, `X-Request-Id`, and the security headers.
pub async fn front<E: Endpoint>(front: Arc<Front>, next: E, mut request: Request) -> Result<Response> {
    front.foreground.mark();
    let seen = front.policy.see(&request);
    if let Some(mut answer) = front.policy.preflight(&seen) {
        front.policy.dress(&seen, &mut answer);
        return Ok(answer);
    }
    let request_id = request
        .header("x-request-id")
        .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let method = method_label(request.method());
    let template = front.routes.classify(request.uri().path());
    let route = template.map_or(UNMATCHED, |template| &*template.label);
    // Paths that carry a secret (a device token, a signed URL's signature) are logged by their
    // template: logs are read by more people than hold the secrets.
    let path = match route {
        secret if secret.contains("{token}") || secret.contains("{signature}") => secret,
        _ => request.uri().path(),
    };
    let span = tracing::info_span!("request", %request_id, %method, route, path = %path);
    let started = Instant::now();
    let result = async {
        front.throttle.admit(&mut request)?;
        crate::body::bound(&front.body, &mut request).await?;
        next.call(request).await.map(IntoResponse::into_response)
    }
    .instrument(span.clone())
    .await;
    let mut response = match result {
        Ok(response) => response,
        Err(err) => crate::error::to_json(err).await,
    };
    // RFC 9110: a 405 says which methods the resource has.
    if response.status() == StatusCode::METHOD_NOT_ALLOWED
        && let Some(allow) = template.and_then(|template| template.allow.clone())
    {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    let status = response.status().as_u16();
    span.in_scope(|| tracing::debug!(%status, elapsed_ms = started.elapsed().as_millis() as u64, "served"));
    let (requests, duration) = front.routes.handles(template, method, status);
    requests.increment(1);
    duration.record(started.elapsed().as_secs_f64());
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    front.policy.dress(&seen, &mut response);
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
        let label = |path: &str| routes.label(path).to_owned();
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
