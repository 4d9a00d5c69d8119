//! Around every request: a request id (`X-Request-Id`, on the log span too), and the
//! Prometheus series `waveline_http_requests_total{method,route,status}` and
//! `waveline_http_request_duration_seconds{method,route}`.

use std::time::Instant;

use poem::{Endpoint, IntoResponse, Request, Response, Result};
use tracing::Instrument;

/// The middleware function (`EndpointExt::around`).
pub async fn observe<E: Endpoint>(next: E, request: Request) -> Result<Response> {
    let request_id = request
        .header("x-request-id")
        .filter(|id| id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let method = request.method().to_string();
    let route = route_label(request.uri().path());
    let span = tracing::info_span!("request", %request_id, %method, path = %request.uri().path());
    let started = Instant::now();
    let result = next.call(request).instrument(span.clone()).await;
    let mut response = match result {
        Ok(response) => response.into_response(),
        Err(err) => crate::error::to_json(err).await,
    };
    let status = response.status().as_u16().to_string();
    span.in_scope(|| tracing::debug!(%status, elapsed_ms = started.elapsed().as_millis() as u64, "served"));
    metrics::counter!("waveline_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("waveline_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    if let Ok(value) = request_id.parse() {
        response.headers_mut().insert("x-request-id", value);
    }
    Ok(response)
}

/// The path with ids replaced, so the series' label set stays small.
fn route_label(path: &str) -> String {
    path.split('/')
        .map(|segment| if uuid::Uuid::parse_str(segment).is_ok() { "{id}" } else { segment })
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_folded_out_of_route_labels() {
        assert_eq!(
            super::route_label("/v1/tracks/01a216e7-6dd6-7549-81aa-f16443f12081/status"),
            "/v1/tracks/{id}/status"
        );
        assert_eq!(super::route_label("/healthz"), "/healthz");
    }
}
