//! `waveline-api`: the thin HTTP service (poem + poem-openapi).
//!
//! It validates, records, stores, enqueues and streams; it never decodes audio (it does not
//! depend on the pipeline). Every route is an OpenAPI operation, so `/openapi.json` is the
//! contract, with Swagger UI at `/docs`.
//!
//! | module | routes |
//! |---|---|
//! | [`auth`] | `POST /v1/auth/register`, `/login`, `/refresh`, `/logout`, `/email/verify`, `/email/resend`, `/password/forgot`, `/password/reset`, `GET /v1/me` |
//! | `oauth` | `GET /v1/auth/oauth/{provider}/start`, `/callback` |
//! | [`mail`] | no routes: the account mail the auth routes send (SMTP through lettre, or the log) |
//! | `tracks` | `GET /v1/tracks`, `GET|PATCH|DELETE /v1/tracks/{id}`, `/status`, `/events` (SSE), `POST /reprocess` |
//! | `uploads` | `POST /v1/tracks` (multipart, streamed), `POST /v1/uploads`, `PUT /v1/uploads/{id}`, `POST /v1/uploads/{id}/complete` |
//! | `media` | `GET|HEAD /v1/tracks/{id}/stream/{preset}`, `/hls/master.m3u8`, `/hls/{variant}/{file}`, `/waveform` |
//! | [`redirect`] | no routes: where redirect mode sends listeners, and for how long |
//! | [`events`] | how many event streams may be open, and what each sends |
//! | `ops` | `GET /healthz`, `/readyz`, `/metrics` |
//! | `admin` | `GET /v1/admin/dead-letters`, `PUT|DELETE /v1/admin/users/{id}/suspension` |
//! | [`social`] | `GET /v1/users/{username}`, `PATCH|DELETE /v1/me`, `PUT|DELETE /v1/me/followings/{username}`, `/v1/me/blocks/{username}`, `GET /v1/me/blocks`, `PUT|DELETE /v1/me/likes/{tracks,playlists}/{id}`, `/v1/me/reposts/{tracks,playlists}/{id}`, `GET /v1/users/{username}/followers`, `/followings`, `/likes`, `/reposts` |
//! | `playlists` | `POST /v1/playlists`, `GET|PATCH|DELETE /v1/playlists/{id}`, `PUT /v1/playlists/{id}/tracks`, `GET /v1/users/{username}/playlists` |
//! | `comments` | `POST|GET /v1/tracks/{id}/comments`, `DELETE /v1/comments/{id}` |
//! | `feed` | `GET /v1/me/feed`, `GET /v1/users/{username}/activities` |
//! | [`inbox`] | `POST|GET /v1/me/conversations/{conversation}/messages`, `GET /v1/me/conversations`, `PUT /v1/me/conversations/{id}/read`, `GET /v1/me/notifications`, `PUT /v1/me/notifications/read` |
//! | [`realtime`] | `GET /v1/ws` (WebSocket), `POST /v1/ws/tickets` |
//! | `devices` | `PUT|DELETE /v1/me/devices/{token}` (push notification devices) |
//! | [`plays`] | `GET /v1/tracks/{id}/stats`; counts the plays the listening routes start |
//! | `charts` | `GET /v1/charts/trending`, `GET /v1/charts/top` |
//! | [`billing`] | `POST /v1/billing/checkout`, `/portal`, `/webhook` (Stripe subscriptions, the tier) |
//! | [`access`] | no routes: what a listener may play of a premium-only track |
//! | `search` | `GET /v1/search` (tracks, accounts and playlists by their words) |
//! | `artwork` | `PUT /v1/tracks/{id}/artwork`, `PUT /v1/playlists/{id}/artwork`, `PUT /v1/me/avatar`, `GET|HEAD /v1/images/{subjects}/{id}/{version}/{size}.jpg` |
//!
//! Errors everywhere, poem's own included (unknown routes, bad parameters, malformed JSON),
//! are JSON `{"code", "message"}` with the right status; internals are logged, never
//! returned. Every response carries an `X-Request-Id`, also on the request's log lines.

pub mod access;
mod account_deletion;
mod admin;
mod artwork;
pub mod auth;
pub mod billing;
pub mod body;
mod charts;
mod comments;
mod devices;
mod error;
pub mod events;
mod feed;
pub mod inbox;
pub mod listener;
pub mod mail;
pub mod media;
mod middleware;
mod oauth;
mod ops;
mod playlists;
pub mod plays;
pub mod realtime;
pub mod redirect;
mod search;
pub mod security;
mod serve;
pub mod session_cache;
pub mod slots;
pub mod social;
pub mod spec;
pub mod status_feed;
pub mod text;
pub mod throttle;
mod tracks;
mod uploads;

use std::sync::Arc;
use std::time::Duration;

use poem::{Endpoint, EndpointExt, IntoEndpoint, Route};
use poem_openapi::OpenApiService;
use waveline_shared::db::{PgOutbox, PgTracks, PgUsers, Visibility};
use waveline_shared::domain::{TrackId, UserId};
use waveline_shared::queue::JobQueue;
use waveline_shared::storage::Storage;

pub use error::{ApiError, ErrorBody};
pub use tracks::TrackView;
pub use uploads::{LocalUploadLimits, upload_local};

use crate::auth::{Session, Tokens};

/// Upload limits, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub upload_max_bytes: u64,
    pub upload_url_ttl: Duration,
}

/// The security settings (SECURITY.md explains each).
#[derive(Debug, Clone)]
pub struct SecuritySettings {
    pub throttle: throttle::ThrottleConfig,
    pub cors_origins: Vec<String>,
    pub hsts_max_age: Option<u64>,
    pub login: auth::LoginPolicy,
    pub refresh_token_ttl: Duration,
    /// The absolute lifetime of a session (refresh-token family).
    pub refresh_family_max_age: Duration,
    pub signed_url_ttl: Duration,
    pub free_quota: Duration,
    /// The API's address as clients reach it (OAuth redirect URIs).
    pub public_url: url::Url,
    pub oauth: Vec<waveline_shared::config::OAuthProvider>,
    pub body: body::BodyLimits,
    pub event_streams: events::StreamLimits,
}

impl SecuritySettings {
    pub fn from_settings(settings: &waveline_shared::config::Settings) -> SecuritySettings {
        SecuritySettings {
            throttle: throttle::ThrottleConfig {
                per_minute: settings.rate_limit_per_minute,
                auth_per_minute: settings.auth_rate_limit_per_minute,
                trusted_proxies: settings.trusted_proxies.clone(),
            },
            cors_origins: settings.cors_origins.clone(),
            hsts_max_age: settings.hsts_max_age,
            login: auth::LoginPolicy {
                delay_after: settings.login_delay_after,
                lockout_after: settings.login_lockout_after,
                lockout: settings.login_lockout,
            },
            refresh_token_ttl: settings.refresh_token_ttl,
            refresh_family_max_age: settings.refresh_family_max_age,
            signed_url_ttl: settings.signed_url_ttl,
            free_quota: settings.free_quota,
            public_url: settings.public_url.clone(),
            oauth: settings.oauth.clone(),
            body: body::BodyLimits {
                json_max_bytes: settings.json_body_max_bytes,
                read_timeout: settings.body_read_timeout,
            },
            event_streams: events::StreamLimits {
                per_process: settings.event_streams_max,
                per_client: settings.event_streams_per_client,
            },
        }
    }
}

/// The places for uploads in progress: `uploads_per_account` per account (429
/// `too_many_uploads` beyond), so one account cannot hold open uploads, each with its buffers,
/// without bound.
pub fn upload_slots(per_account: u32) -> Arc<slots::Slots<UserId>> {
    slots::Slots::new(
        slots::Limits { total: u32::MAX, per_key: per_account },
        slots::Refusal {
            code: "too_many_uploads",
            all_taken: "this server has as many uploads in progress as it allows",
            key_full: "this account has as many uploads in progress as it may",
            gauge: "waveline_uploads_in_progress",
            refused: "waveline_uploads_refused_total",
        },
    )
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub tracks: PgTracks,
    pub users: PgUsers,
    pub outbox: PgOutbox,
    pub storage: Arc<dyn Storage>,
    pub queue: Arc<dyn JobQueue>,
    /// Comments and the activity feed (see [`waveline_shared::documents`]).
    pub documents: Arc<dyn waveline_shared::documents::Documents>,
    /// Profiles, follows, blocks, likes, reposts and playlists.
    pub social: waveline_shared::db::social::PgSocial,
    /// Social writes per account (see [`social::WriteLimit`]).
    pub social_writes: Arc<social::WriteLimit>,
    /// The sockets of this process, the event bus and presence (see [`realtime`]).
    pub realtime: Arc<realtime::Realtime>,
    pub tokens: Arc<Tokens>,
    pub limits: Limits,
    pub security: Arc<SecuritySettings>,
    /// Track status changes as they commit, for the event streams.
    pub status_feed: Arc<status_feed::StatusFeed>,
    /// Recent lookups of the listening routes (see [`media::PlayableCache`]).
    pub playables: Arc<media::PlayableCache>,
    /// How the listening routes deliver bytes: proxied or redirected (see [`redirect`]).
    pub delivery: Arc<redirect::StreamDelivery>,
    /// The uploads in progress, per account (see [`upload_slots`]).
    pub uploads_in_flight: Arc<slots::Slots<UserId>>,
    /// Renders the process's Prometheus metrics.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Account mail (verification, password reset), sent in the background.
    pub mailer: mail::Mailer,
    /// The accounts' push devices.
    pub devices: waveline_shared::db::PgDevices,
    /// Whether pushes are on, and how to enqueue one ([`waveline_shared::push::Push::enqueue`],
    /// then `publish_soon` after the commit).
    pub push: waveline_shared::push::Push,
    /// The plays this process buffered (see [`plays`]).
    pub plays: Arc<plays::PlayCounter>,
    /// The charts the schedule computes.
    pub charts: Arc<waveline_shared::charts::Charts>,
    /// Subscriptions and tiers (Stripe), and whether billing is on.
    pub billing: Arc<billing::Billing>,
    /// Marked by every request, for the in-process pipeline to yield to (see
    /// [`waveline_shared::foreground`]).
    pub foreground: Arc<waveline_shared::foreground::Foreground>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("storage", &self.storage)
            .field("queue", &self.queue)
            .field("documents", &self.documents)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// This process changed track `id`: its caches let go of it, so the next request here
    /// sees the change at once (other replicas hear of it through the notification).
    pub(crate) fn track_changed(&self, id: TrackId) {
        self.playables.forget(id);
        self.status_feed.forget(id);
    }

    /// Publishes queued jobs now, in the background, rather than waiting for a worker's
    /// relay pass (which remains the backstop if this fails).
    pub(crate) fn publish_soon(&self) {
        let (outbox, queue) = (self.outbox.clone(), self.queue.clone());
        tokio::spawn(async move {
            if let Err(err) = outbox.publish_to(queue.as_ref(), 100).await {
                tracing::warn!(error = %err, "could not publish the job now; a worker's relay will");
            }
        });
    }
}

type Apis = (
    ops::Ops,
    auth::Accounts,
    oauth::OAuth,
    uploads::Uploads,
    tracks::Tracks,
    media::Media,
    admin::Admin,
    social::Social,
    playlists::Playlists,
    comments::Comments,
    feed::Feed,
    inbox::Inbox,
    realtime::RealtimeApi,
    devices::Devices,
    // poem-openapi implements its trait for tuples of at most 16; the newest nest.
    (plays::Stats, charts::ChartsApi, search::Search, billing::BillingApi, artwork::Artwork),
);

/// The OpenAPI service: every operation of the API.
pub fn openapi(state: AppState) -> OpenApiService<Apis, ()> {
    OpenApiService::new(
        (
            ops::Ops { state: state.clone() },
            auth::Accounts { state: state.clone() },
            oauth::OAuth { state: state.clone(), http: oauth::provider_client() },
            uploads::Uploads { state: state.clone() },
            tracks::Tracks { state: state.clone(), streams: events::stream_slots(state.security.event_streams) },
            media::Media { state: state.clone() },
            admin::Admin { state: state.clone() },
            social::Social { state: state.clone() },
            playlists::Playlists { state: state.clone() },
            comments::Comments { state: state.clone() },
            feed::Feed { state: state.clone() },
            inbox::Inbox { state: state.clone() },
            realtime::RealtimeApi { state: state.clone() },
            devices::Devices { state: state.clone() },
            (
                plays::Stats { state: state.clone() },
                charts::ChartsApi { state: state.clone() },
                search::Search {
                    search: waveline_shared::db::search::PgSearch::new(state.tracks.pool().clone()),
                    state: state.clone(),
                },
                billing::BillingApi { state: state.clone() },
                artwork::Artwork { state },
            ),
        ),
        "Waveline",
        env!("CARGO_PKG_VERSION"),
    )
    .description(
        "The backend of a social audio platform: accounts, uploads, processing status, range streaming, \
         HLS and waveforms; profiles, follows, blocks, likes, reposts, playlists, timestamped comments, \
         the activity feed and push notification devices; play counts, charts and search; Stripe subscriptions \
         and premium-only tracks. Errors are JSON `{code, message}`.",
    )
}

/// The whole HTTP application.
pub fn app(state: AppState) -> impl Endpoint {
    let api = openapi(state.clone());
    let document = spec::complete(&api.spec());
    let routes = middleware::RouteTemplates::new(spec::routes(&document));
    let document = document.to_string();
    let spec = poem::endpoint::make_sync(move |_| {
        poem::Response::builder().content_type("application/json; charset=utf-8").body(document.clone())
    });
    let docs = api.swagger_ui();
    let front = Arc::new(middleware::Front {
        routes,
        policy: security::Policy::new(
            state.security.cors_origins.clone(),
            state.security.hsts_max_age,
            &api.swagger_ui_html(),
        ),
        throttle: throttle::Throttle::new(&state.security.throttle),
        body: state.security.body,
        foreground: state.foreground.clone(),
    });
    let pages = Route::new().nest("/docs", docs).at("/openapi.json", poem::get(spec));
    Dispatch { api: api.into_endpoint(), pages }
        .data(state)
        .with(poem::middleware::CookieJarManager::new())
        .around(move |next, req| middleware::front(front.clone(), next, req))
}

/// The API's operations, and beside them the pages about the API (`/docs`, `/openapi.json`):
/// the operations get each request without another routing layer in front of theirs.
struct Dispatch<A, P> {
    api: A,
    pages: P,
}

impl<A: Endpoint, P: Endpoint> Endpoint for Dispatch<A, P> {
    type Output = poem::Response;

    async fn call(&self, req: poem::Request) -> poem::Result<poem::Response> {
        let path = req.uri().path();
        if path == "/openapi.json" || path == "/docs" || path.starts_with("/docs/") {
            self.pages.call(req).await.map(poem::IntoResponse::into_response)
        } else {
            self.api.call(req).await.map(poem::IntoResponse::into_response)
        }
    }
}

/// Whether `viewer` may see a track of `owner` with `visibility`.
pub(crate) fn may_see(owner: UserId, visibility: Visibility, viewer: Option<&Session>) -> bool {
    visibility == Visibility::Public || viewer.is_some_and(|session| session.user.id == owner || session.is_admin())
}

/// A track id from the path, or 404 (an id that cannot exist names no track).
pub(crate) fn parse_track_id(text: &str) -> Result<TrackId, ApiError> {
    text.parse().map_err(|_| ApiError::not_found("track"))
}
