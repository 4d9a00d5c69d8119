//! `waveline-api`: the thin HTTP service (poem + poem-openapi).
//!
//! It validates, records, stores, enqueues and streams; it never decodes audio (it does not
//! depend on the pipeline). Every route is an OpenAPI operation, so `/openapi.json` is the
//! contract, with Swagger UI at `/docs`.
//!
//! This build serves the operational surface and track status:
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | the process is alive |
//! | `GET /readyz` | database, queue and storage reachable, or 503 naming which is not |
//! | `GET /metrics` | Prometheus: requests by route and status, latency, plus the workers' series |
//! | `GET /v1/tracks/{id}/status` | the small status object, strong ETag, `If-None-Match` → 304 |
//!
//! Errors everywhere, poem's own included (unknown routes, bad parameters), are JSON
//! `{"code", "message"}` with the right status; internals are logged, never returned. Every
//! response carries an `X-Request-Id`, also on the request's log lines.

mod error;
mod middleware;
mod ops;
mod tracks;

use std::sync::Arc;

use poem::{Endpoint, EndpointExt, Route};
use poem_openapi::OpenApiService;
use waveline_shared::db::PgTracks;
use waveline_shared::queue::JobQueue;
use waveline_shared::storage::Storage;

pub use error::ErrorBody;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub tracks: PgTracks,
    pub storage: Arc<dyn Storage>,
    pub queue: Arc<dyn JobQueue>,
    /// Renders the process's Prometheus metrics.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("storage", &self.storage).field("queue", &self.queue).finish_non_exhaustive()
    }
}

/// The OpenAPI service: every operation of the API.
pub fn openapi(state: AppState) -> OpenApiService<(ops::Ops, tracks::Tracks), ()> {
    OpenApiService::new(
        (ops::Ops { state: state.clone() }, tracks::Tracks { state }),
        "Waveline",
        env!("CARGO_PKG_VERSION"),
    )
    .description("The backend of a social audio platform: uploads, processing status, streaming.")
}

/// The whole HTTP application.
pub fn app(state: AppState) -> impl Endpoint {
    let api = openapi(state);
    let spec = api.spec_endpoint();
    let docs = api.swagger_ui();
    Route::new()
        .nest("/", api)
        .nest("/docs", docs)
        .at("/openapi.json", spec)
        .around(middleware::observe)
        .catch_all_error(error::to_json)
}
