//! Configuration: one typed [`Settings`], layered.
//!
//! Layers, later ones winning: built-in defaults, then an optional TOML file (`--config FILE`
//! or `WAVELINE_CONFIG`), then `WAVELINE_*` environment variables. A key of the file and its
//! variable share a name: `storage` in the file is `WAVELINE_STORAGE` in the environment.
//! Every value goes through the same parser whichever layer it came from, so a bad value fails
//! at start-up with one message that names the setting (the variable, or the key and the file)
//! and says what was expected.
//!
//! `waveline.example.toml` at the repository root documents every key; keep it in step with
//! the field docs below (a test checks that it parses and names every key).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use url::Url;

use crate::network::Network;

mod billing;
mod oauth;
pub use billing::BillingSettings;
pub use oauth::{OAuthProvider, ProviderKind};

/// The environment variable prefix of every setting.
pub const ENV_PREFIX: &str = "WAVELINE_";

/// The variable that names the TOML file when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "WAVELINE_CONFIG";

/// Every Waveline setting, after layering and validation.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL connection URL (`postgres://user:pass@host:port/db`). Held as a secret: it
    /// may carry a password. Default `postgres://postgres@127.0.0.1:5432/waveline`.
    pub database_url: SecretString,
    /// Largest number of pooled database connections per process. Default 10.
    pub database_max_connections: u32,
    /// The job queue: `memory` (in-process, the embedded default) or
    /// `amqp://user:pass@host:port/vhost` for RabbitMQ.
    pub queue: QueueBackend,
    /// Object storage: `file:///absolute/dir` (the embedded default, under the user's data
    /// directory) or `s3://BUCKET?endpoint=http://host:port&region=REGION` (path-style
    /// addressing; credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`).
    pub storage: StorageBackend,
    /// The document store (comments, the activity feed): `postgres` (the default: JSONB
    /// tables in the main database) or `mongodb://user:pass@host:port/DB` (the database is
    /// the URL's path; the URL may carry driver options such as `?authSource=admin`).
    pub documents: DocumentsBackend,
    /// The address the HTTP API binds. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// How many times a job is tried before it is dead-lettered. Default 5.
    pub job_max_attempts: u32,
    /// Delay before the first retry of a failed job; each further retry doubles it.
    /// Milliseconds, default 2000.
    pub job_retry_base: Duration,
    /// The longest delay between two retries. Milliseconds, default 300000 (5 min).
    pub job_retry_max: Duration,
    /// Log filter in `tracing` syntax (`info`, `waveline=debug,sqlx=warn`). Default `info`.
    pub log: String,
    /// Log line format: `text` for people, `json` for log shippers. Default `text`.
    pub log_format: LogFormat,
    /// Base name of the RabbitMQ exchange and queues (`N`, `N.dead`, `N.retry.*`). Default
    /// `waveline.jobs`.
    pub queue_name: String,
    /// A processing track whose heartbeat is older than this many seconds has lost its
    /// worker and is re-queued by the reconciler. Default 120.
    pub heartbeat_stale: Duration,
    /// A queued track unclaimed for this many seconds has its job published again (the
    /// message is presumed lost). Default 600.
    pub queued_stale: Duration,
    /// Seconds between reconciler passes. Default 30.
    pub reconcile_interval: Duration,
    /// Seconds a stopping worker lets its jobs run before handing them back. Default 30.
    pub shutdown_grace: Duration,
    /// A presets file for the pipeline (the ladder and limits); default: the built-in one.
    pub presets: Option<PathBuf>,
    /// Where workers make their temporary directories; default: the system temp dir.
    pub work_dir: Option<PathBuf>,
    /// How long the pipeline may work on one job (opening the original, decoding, analysing,
    /// encoding), seconds; past it the track fails with the code `timeout`. Default 3600.
    pub pipeline_timeout: Duration,
    /// The scheduling priority of the pipeline's threads (decoding, analysis, encoding):
    /// `idle` (Linux `SCHED_IDLE`: they get only CPU time no other thread wants, so the API
    /// answers as if no transcode ran, but anything else that keeps the cores busy stops the
    /// pipeline meanwhile), `low` (nice 10: the API still preempts it, and it keeps about a
    /// tenth of a core against any busy thread) or `normal` (the process's own). Unset: `low` under `waveline serve` with
    /// in-process workers, `normal` under `waveline worker`.
    pub pipeline_priority: Option<PipelinePriority>,
    /// How many of the pipeline's threads may compute at once, across every job of the
    /// process (codecs get no threads of their own, so this bounds all of it). Unset: every
    /// core but one (at least 1) under `waveline serve`, every core under `waveline worker`.
    pub pipeline_threads: Option<u32>,
    /// Under `waveline serve` with in-process workers: the most of its threads' time the
    /// pipeline computes while the API is busy (10 requests within a 100 ms window: a rate of
    /// 100 a second), from 0.05 to 1, in bursts of at most 5 ms; 1 turns this off. The rest of the
    /// time the pipeline waits, so a busy API keeps its cores' caches and idle moments. A
    /// `waveline worker` has no API to yield to and ignores it. Unset: 0.25.
    pub pipeline_share_under_load: Option<f64>,
    /// The key that signs session tokens (HS256), at least 32 bytes. Every API replica needs
    /// the same one. Unset, `waveline serve` makes a random key at start-up and warns:
    /// sessions then end when the process does.
    pub jwt_secret: Option<SecretString>,
    /// Lifetime of an access token (and of the session cookie), seconds. Default 900.
    pub access_token_ttl: Duration,
    /// The largest upload the API accepts, bytes. Default 4 GiB.
    pub upload_max_bytes: u64,
    /// How long a direct-upload URL (`POST /v1/uploads`) stays valid, seconds. Default 3600.
    pub upload_url_ttl: Duration,
    /// Earlier signing keys, still accepted on validation (rotation: make the old key a
    /// previous one, deploy, wait out the token lifetimes, drop it). Comma-separated.
    pub jwt_previous_secrets: Vec<SecretString>,
    /// Lifetime of a refresh token (each use replaces it), seconds. Default 30 days.
    pub refresh_token_ttl: Duration,
    /// Requests per minute per client address on every route but `/healthz`, `/readyz` and
    /// `/metrics`; 0 turns the limit off. Default 1200.
    pub rate_limit_per_minute: u32,
    /// Requests per minute per client address on `/v1/auth/*`, on top; 0 turns it off.
    /// Default 30.
    pub auth_rate_limit_per_minute: u32,
    /// Failed logins to one account before each further attempt must wait (1 s, doubling,
    /// at most 60 s). Default 3.
    pub login_delay_after: u32,
    /// Failed logins to one account before it is locked for `login_lockout_s`. Default 10.
    pub login_lockout_after: u32,
    /// How long a lockout lasts, and how long failures are remembered, seconds. Default 900.
    pub login_lockout: Duration,
    /// Proxies whose `X-Forwarded-For` names the client (addresses or networks,
    /// comma-separated). Default: none, the peer is the client.
    pub trusted_proxies: Vec<Network>,
    /// Origins (`https://app.example.com`) whose pages may call the API with credentials.
    /// Comma-separated; default none.
    pub cors_origins: Vec<String>,
    /// `Strict-Transport-Security: max-age=N` on every response; 0 (the default) sends none.
    /// Set it only when clients reach the API over TLS.
    pub hsts_max_age: Option<u64>,
    /// Lifetime of a signed stream or HLS URL, seconds. Default 300.
    pub signed_url_ttl: Duration,
    /// How the listening routes hand out bytes: `proxy` (the API streams them from storage,
    /// the default) or `redirect` (307 to a presigned storage URL or the CDN, HLS playlists
    /// with presigned segment URIs; needs S3 storage). See `api/src/redirect.rs`.
    pub stream_mode: StreamMode,
    /// In redirect mode, how long a presigned URL handed to a viewer of a private track (its
    /// owner or an admin, by session) works, seconds. Default 60.
    pub stream_redirect_ttl: Duration,
    /// In redirect mode, how long a presigned URL for a public track works, seconds; HLS
    /// playlists carry such URLs and players fetch a playlist once per playback, so keep it
    /// above the longest track. Default 3600.
    pub stream_redirect_public_ttl: Duration,
    /// In redirect mode, a CDN whose origin is the bucket (`https://cdn.example.com/` + object
    /// key): public tracks are redirected there instead of to a presigned URL. Unused in proxy
    /// mode. Default none.
    pub stream_cdn_base: Option<Url>,
    /// Total duration of audio a free account may upload, seconds. Default 10800 (3 h).
    pub free_quota: Duration,
    /// The API's address as clients reach it (`https://api.example.com`), for the OAuth
    /// redirect URI. Default `http://` and `listen`.
    pub public_url: Url,
    /// OAuth 2.0 / OpenID Connect login providers (see [`oauth`](self::oauth)).
    pub oauth: Vec<OAuthProvider>,
    /// The largest request body of any route but the two upload routes, bytes (413
    /// `too_large` beyond it, refused while it is read). Default 65536.
    pub json_body_max_bytes: u64,
    /// How long a small request body may take to arrive whole, and the longest pause within
    /// an upload's body, seconds. Default 30.
    pub body_read_timeout: Duration,
    /// Open client connections one API process accepts at once; further ones wait in the
    /// kernel's backlog until one closes. Default 10000.
    pub max_connections: u32,
    /// Client connections one client address (an IPv6 one by its /64) may hold open on one
    /// API process; more are closed at once. Trusted proxies are exempt. Default 256.
    pub max_connections_per_client: u32,
    /// Uploads one account may have in progress at once (429 `too_many_uploads` beyond).
    /// Default 4.
    pub uploads_per_account: u32,
    /// Social writes (comments, likes, reposts, follows, blocks, playlist changes, device
    /// registrations) one account may make per minute on one API process (429
    /// `rate_limited` beyond); 0: no limit. Default 60.
    pub social_writes_per_minute: u32,
    /// Open event streams (`/v1/tracks/{id}/events`) per API process (429 beyond). Default 2000.
    pub event_streams_max: u32,
    /// Open event streams per client address (429 beyond). Default 20.
    pub event_streams_per_client: u32,
    /// The SMTP server for account mail (verification, password reset):
    /// `smtps://user:pass@host:465` (TLS), `smtp://user:pass@host:587?tls=required`
    /// (STARTTLS), or `smtp://host:25` (plain, only without credentials or on loopback). Held
    /// as a secret. Unset (the embedded default), mail is written to the log at `info` instead.
    pub smtp_url: Option<SecretString>,
    /// The sender of account mail: `no-reply@example.com` or `Waveline <no-reply@example.com>`.
    /// Default `Waveline <no-reply@localhost>`.
    pub mail_from: String,
    /// The web client's address; mails link to `{app_url}/verify-email?token=…` and
    /// `{app_url}/reset-password?token=…`, pages that post the token to the API. Default
    /// `public_url`.
    pub app_url: Url,
    /// How long an email-verification link works, seconds. Default 86400 (1 day).
    pub email_verify_ttl: Duration,
    /// How long a password-reset link works, seconds. Default 3600.
    pub password_reset_ttl: Duration,
    /// The absolute lifetime of a session (a refresh-token family), however often it is
    /// refreshed, seconds. Default 7776000 (90 days).
    pub refresh_family_max_age: Duration,
    /// Where `waveline serve` keeps its read-through cache of renditions on local disk (see
    /// [`CachedStorage`](crate::storage::CachedStorage)); processes sharing it take separate
    /// slots inside. Default `$XDG_DATA_HOME/waveline/stream-cache` (else
    /// `~/.local/share/…`) with the S3 store; with the file store, none: its files are local
    /// already (set it for a file store on a network filesystem).
    pub stream_cache_dir: Option<PathBuf>,
    /// The most bytes the stream cache of one API process holds (least recently read objects
    /// go first; a larger object is never cached); 0 turns the cache off. Default 10 GiB.
    pub stream_cache_bytes: u64,
    /// The Firebase service-account key file (JSON with `project_id`, `client_email`,
    /// `private_key` and `token_uri`, as the Firebase console downloads it) that push
    /// notifications are sent with, an absolute path. The path is not secret; the file is
    /// (it holds a private key): readable by Waveline's user alone. Unset (the default), pushes
    /// are off: none is enqueued or sent.
    pub fcm_credentials_file: Option<PathBuf>,
    /// Where the FCM HTTP v1 API answers: `https://…`, or `http://` on a loopback address (a
    /// test double). Default `https://fcm.googleapis.com`.
    pub fcm_base_url: Url,
    /// How often each API process writes the plays it buffered, milliseconds (also at once
    /// when 1000 are waiting). A crash loses at most this much. Default 1000.
    pub plays_flush: Duration,
    /// A listener's plays of one track count once within this many seconds. Default 1800.
    pub play_dedup: Duration,
    /// How often the charts are computed (by one process of all, whichever ticks first),
    /// seconds. Default 600.
    pub charts_interval: Duration,
    /// The charts' weights and trending's half-life (`trending_weight_plays`, `…_likes`,
    /// `…_reposts`, `…_comments`, `…_reposts_all_time`, `trending_half_life_h`).
    pub chart_scores: crate::charts::Scores,
    /// Stripe billing (subscriptions, the premium tier): on when `stripe_secret_key` (a
    /// secret), `stripe_webhook_secret` (the webhook endpoint's signing secret, a secret;
    /// comma-separated during a rotation) and `stripe_price_premium` (the premium price id)
    /// are all set; `stripe_api_base` (default `https://api.stripe.com`; `http://` only on
    /// loopback), `billing_success_url` and `billing_cancel_url` (defaults under `app_url`)
    /// complete it. `None` (the default): the billing routes answer 503 `billing_disabled`.
    pub billing: Option<BillingSettings>,
    /// `WAVELINE_*` variables that matched no setting (likely typos); callers log them.
    pub unknown_env: Vec<String>,
}

/// Which [`JobQueue`](crate::queue::JobQueue) backend to run.
#[derive(Clone)]
pub enum QueueBackend {
    /// The in-process queue: same semantics, no durability.
    Memory,
    /// RabbitMQ at this AMQP URL (which may hold a password).
    Amqp { url: SecretString },
}

impl fmt::Debug for QueueBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl QueueBackend {
    /// The value as it can be shown: any password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            QueueBackend::Memory => "memory".to_owned(),
            QueueBackend::Amqp { url } => redact_url(url.expose_secret()),
        }
    }
}

/// Which [`Documents`](crate::documents::Documents) backend to run.
#[derive(Clone)]
pub enum DocumentsBackend {
    /// JSONB tables in the main PostgreSQL database.
    Postgres,
    /// A MongoDB database: the URL (which may hold a password) and the database it names.
    Mongo { url: SecretString, database: String },
}

impl fmt::Debug for DocumentsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl DocumentsBackend {
    /// The value as it can be shown: any password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            DocumentsBackend::Postgres => "postgres".to_owned(),
            DocumentsBackend::Mongo { url, .. } => redact_url(url.expose_secret()),
        }
    }
}

/// Which [`Storage`](crate::storage::Storage) backend to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StorageBackend {
    /// Files under an absolute directory.
    Fs { root: PathBuf },
    /// An S3-compatible bucket, path-style.
    S3 {
        bucket: String,
        /// Custom endpoint (MinIO, a local server); `None` means AWS itself.
        endpoint: Option<String>,
        region: String,
    },
}

/// How the listening routes deliver bytes (`stream_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamMode {
    /// The API reads from storage and streams the bytes itself.
    Proxy,
    /// The API checks access and answers 307 to where the bytes are.
    Redirect,
}

/// The scheduling priority of the pipeline's threads (see
/// [`Settings::pipeline_priority`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelinePriority {
    /// Linux `SCHED_IDLE`.
    Idle,
    /// The ordinary policy at nice 10.
    Low,
    /// As the rest of the process.
    Normal,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that cannot be used; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: expected {expected}, got {got}")]
    Invalid {
        /// `WAVELINE_STORAGE`, or `storage (in /etc/waveline.toml)`.
        setting: String,
        expected: String,
        /// The offending value, quoted, or `(hidden)` for secrets.
        got: String,
    },
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl ConfigError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ConfigError::Invalid { .. } => "config_invalid",
            ConfigError::Read { .. } => "config_unreadable",
            ConfigError::Parse { .. } => "config_malformed",
        }
    }
}

/// One setting's name, its parser and whether its value is secret.
struct Key {
    name: &'static str,
    secret: bool,
}

/// The keys in documentation order; `waveline.example.toml` lists the same.
const KEYS: [Key; 76] = [
    Key { name: "database_url", secret: true },
    Key { name: "database_max_connections", secret: false },
    Key { name: "queue", secret: true },
    Key { name: "storage", secret: false },
    Key { name: "documents", secret: true },
    Key { name: "listen", secret: false },
    Key { name: "job_max_attempts", secret: false },
    Key { name: "job_retry_base_ms", secret: false },
    Key { name: "job_retry_max_ms", secret: false },
    Key { name: "log", secret: false },
    Key { name: "log_format", secret: false },
    Key { name: "queue_name", secret: false },
    Key { name: "heartbeat_stale_s", secret: false },
    Key { name: "queued_stale_s", secret: false },
    Key { name: "reconcile_interval_s", secret: false },
    Key { name: "shutdown_grace_s", secret: false },
    Key { name: "presets", secret: false },
    Key { name: "work_dir", secret: false },
    Key { name: "pipeline_timeout_s", secret: false },
    Key { name: "pipeline_priority", secret: false },
    Key { name: "pipeline_threads", secret: false },
    Key { name: "pipeline_share_under_load", secret: false },
    Key { name: "jwt_secret", secret: true },
    Key { name: "access_token_ttl_s", secret: false },
    Key { name: "upload_max_bytes", secret: false },
    Key { name: "upload_url_ttl_s", secret: false },
    Key { name: "jwt_previous_secrets", secret: true },
    Key { name: "refresh_token_ttl_s", secret: false },
    Key { name: "rate_limit_per_minute", secret: false },
    Key { name: "auth_rate_limit_per_minute", secret: false },
    Key { name: "login_delay_after", secret: false },
    Key { name: "login_lockout_after", secret: false },
    Key { name: "login_lockout_s", secret: false },
    Key { name: "trusted_proxies", secret: false },
    Key { name: "cors_origins", secret: false },
    Key { name: "hsts_max_age_s", secret: false },
    Key { name: "signed_url_ttl_s", secret: false },
    Key { name: "stream_mode", secret: false },
    Key { name: "stream_redirect_ttl_s", secret: false },
    Key { name: "stream_redirect_public_ttl_s", secret: false },
    Key { name: "stream_cdn_base", secret: false },
    Key { name: "free_quota_s", secret: false },
    Key { name: "public_url", secret: false },
    Key { name: "json_body_max_bytes", secret: false },
    Key { name: "body_read_timeout_s", secret: false },
    Key { name: "max_connections", secret: false },
    Key { name: "max_connections_per_client", secret: false },
    Key { name: "uploads_per_account", secret: false },
    Key { name: "social_writes_per_minute", secret: false },
    Key { name: "event_streams_max", secret: false },
    Key { name: "event_streams_per_client", secret: false },
    Key { name: "smtp_url", secret: true },
    Key { name: "mail_from", secret: false },
    Key { name: "app_url", secret: false },
    Key { name: "email_verify_ttl_s", secret: false },
    Key { name: "password_reset_ttl_s", secret: false },
    Key { name: "refresh_family_max_age_s", secret: false },
    Key { name: "stream_cache_dir", secret: false },
    Key { name: "stream_cache_bytes", secret: false },
    Key { name: "fcm_credentials_file", secret: false },
    Key { name: "fcm_base_url", secret: false },
    Key { name: "plays_flush_ms", secret: false },
    Key { name: "play_dedup_s", secret: false },
    Key { name: "charts_interval_s", secret: false },
    Key { name: "trending_weight_plays", secret: false },
    Key { name: "trending_weight_likes", secret: false },
    Key { name: "trending_weight_reposts", secret: false },
    Key { name: "trending_weight_comments", secret: false },
    Key { name: "trending_weight_reposts_all_time", secret: false },
    Key { name: "trending_half_life_h", secret: false },
    Key { name: "stripe_secret_key", secret: true },
    Key { name: "stripe_webhook_secret", secret: true },
    Key { name: "stripe_price_premium", secret: false },
    Key { name: "stripe_api_base", secret: false },
    Key { name: "billing_success_url", secret: false },
    Key { name: "billing_cancel_url", secret: false },
];

/// The names of every setting key, as used in the TOML file.
pub fn keys() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|key| key.name)
}

/// The environment variable of a key: `storage` → `WAVELINE_STORAGE`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// A raw value and the words that name where it came from.
struct Raw {
    value: String,
    setting: String,
    secret: bool,
}

impl Raw {
    fn invalid(&self, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            setting: self.setting.clone(),
            expected: expected.into(),
            got: if self.secret { "(hidden)".to_owned() } else { format!("{:?}", self.value) },
        }
    }
}

impl Settings {
    /// Loads the settings from the process: defaults, then `config_file` (or the file named
    /// by `WAVELINE_CONFIG`), then the `WAVELINE_*` environment.
    pub fn load(config_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
        let file = config_file.map(Path::to_path_buf).or_else(|| env.get(CONFIG_FILE_ENV).map(PathBuf::from));
        Settings::from_sources(file.as_deref(), &env)
    }

    /// Builds the settings from an optional TOML file and a set of environment variables;
    /// [`Settings::load`] passes the process's own. Variables without the `WAVELINE_` prefix
    /// are ignored.
    pub fn from_sources(config_file: Option<&Path>, env: &BTreeMap<String, String>) -> Result<Settings, ConfigError> {
        let mut raw: BTreeMap<&'static str, Raw> = BTreeMap::new();
        let mut providers = oauth::RawProviders::new();
        if let Some(path) = config_file {
            read_file_layer(path, &mut raw, &mut providers)?;
        }
        let mut unknown_env = Vec::new();
        for (name, value) in env {
            let Some(suffix) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if oauth::from_env(suffix, name, value, &mut providers) {
                continue;
            }
            match KEYS.iter().find(|key| key.name.eq_ignore_ascii_case(suffix)) {
                Some(key) if suffix == key.name.to_ascii_uppercase() => {
                    raw.insert(key.name, Raw { value: value.clone(), setting: name.clone(), secret: key.secret });
                }
                _ if name == CONFIG_FILE_ENV || suffix.starts_with("TEST_") => {}
                _ => unknown_env.push(name.clone()),
            }
        }
        let oauth = oauth::resolve(providers)?;
        Settings::resolve(raw, unknown_env, oauth)
    }

    fn resolve(
        mut raw: BTreeMap<&'static str, Raw>,
        unknown_env: Vec<String>,
        oauth: Vec<OAuthProvider>,
    ) -> Result<Settings, ConfigError> {
        let mut take = |key: &str| raw.remove(key);
        let database_url = match take("database_url") {
            Some(raw) => parse_database_url(&raw)?,
            None => SecretString::from("postgres://postgres@127.0.0.1:5432/waveline"),
        };
        let database_max_connections = match take("database_max_connections") {
            Some(raw) => parse_int(&raw, 1, 10_000)?,
            None => 10,
        };
        let queue = match take("queue") {
            Some(raw) => parse_queue(&raw)?,
            None => QueueBackend::Memory,
        };
        let storage = match take("storage") {
            Some(raw) => parse_storage(&raw)?,
            None => StorageBackend::Fs { root: default_data_dir().join("objects") },
        };
        let documents = match take("documents") {
            Some(raw) => parse_documents(&raw)?,
            None => DocumentsBackend::Postgres,
        };
        let listen = match take("listen") {
            Some(raw) => raw
                .value
                .trim()
                .parse::<SocketAddr>()
                .map_err(|_| raw.invalid("a socket address such as 127.0.0.1:8080 or [::]:8080"))?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let job_max_attempts = match take("job_max_attempts") {
            Some(raw) => parse_int(&raw, 1, 100)?,
            None => 5,
        };
        let job_retry_base = match take("job_retry_base_ms") {
            Some(raw) => Duration::from_millis(parse_int(&raw, 1, 86_400_000)?.into()),
            None => Duration::from_secs(2),
        };
        let job_retry_max = match take("job_retry_max_ms") {
            Some(raw) => Duration::from_millis(parse_int(&raw, 1, 86_400_000)?.into()),
            None => Duration::from_secs(300),
        };
        let log = take("log").map_or_else(|| "info".to_owned(), |raw| raw.value);
        let log_format = match take("log_format") {
            Some(raw) => match raw.value.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(raw.invalid("`text` or `json`")),
            },
            None => LogFormat::Text,
        };
        let seconds = |raw: Option<Raw>, default: u64| -> Result<Duration, ConfigError> {
            Ok(match raw {
                Some(raw) => Duration::from_secs(parse_int(&raw, 1, 86_400)?.into()),
                None => Duration::from_secs(default),
            })
        };
        let queue_name = match take("queue_name") {
            Some(raw) => {
                let name = raw.value.trim().to_owned();
                let valid = !name.is_empty()
                    && name.len() <= 200
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                if !valid {
                    return Err(raw.invalid("1 to 200 letters, digits, dots, underscores and hyphens"));
                }
                name
            }
            None => "waveline.jobs".to_owned(),
        };
        let heartbeat_stale = seconds(take("heartbeat_stale_s"), 120)?;
        let queued_stale = seconds(take("queued_stale_s"), 600)?;
        let reconcile_interval = seconds(take("reconcile_interval_s"), 30)?;
        let shutdown_grace = seconds(take("shutdown_grace_s"), 30)?;
        let absolute_path = |raw: Option<Raw>| -> Result<Option<PathBuf>, ConfigError> {
            match raw {
                Some(raw) if Path::new(raw.value.trim()).is_absolute() => Ok(Some(PathBuf::from(raw.value.trim()))),
                Some(raw) => Err(raw.invalid("an absolute path")),
                None => Ok(None),
            }
        };
        let presets = absolute_path(take("presets"))?;
        let work_dir = absolute_path(take("work_dir"))?;
        let pipeline_timeout = seconds(take("pipeline_timeout_s"), 3600)?;
        let pipeline_priority = match take("pipeline_priority") {
            Some(raw) => Some(match raw.value.trim() {
                "idle" => PipelinePriority::Idle,
                "low" => PipelinePriority::Low,
                "normal" => PipelinePriority::Normal,
                _ => return Err(raw.invalid("`idle`, `low` or `normal`")),
            }),
            None => None,
        };
        let pipeline_threads = take("pipeline_threads").map(|raw| parse_int(&raw, 1, 1024)).transpose()?;
        let pipeline_share_under_load =
            take("pipeline_share_under_load").map(|raw| parse_float(&raw, 0.05, 1.0)).transpose()?;
        let jwt_secret = match take("jwt_secret") {
            Some(raw) if raw.value.len() >= 32 => Some(SecretString::from(raw.value)),
            Some(raw) => return Err(raw.invalid("a random secret of at least 32 bytes")),
            None => None,
        };
        let access_token_ttl = seconds(take("access_token_ttl_s"), 900)?;
        let upload_max_bytes = match take("upload_max_bytes") {
            Some(raw) => raw
                .value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|bytes| *bytes >= 1024)
                .ok_or_else(|| raw.invalid("a number of bytes, at least 1024"))?,
            None => 4 << 30,
        };
        let upload_url_ttl = seconds(take("upload_url_ttl_s"), 3600)?;
        let list = |raw: &Raw| -> Vec<String> {
            raw.value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect()
        };
        let jwt_previous_secrets = match take("jwt_previous_secrets") {
            Some(raw) => {
                let secrets = list(&raw);
                if secrets.iter().any(|secret| secret.len() < 32) {
                    return Err(raw.invalid("comma-separated secrets of at least 32 bytes each"));
                }
                secrets.into_iter().map(SecretString::from).collect()
            }
            None => Vec::new(),
        };
        let refresh_token_ttl = match take("refresh_token_ttl_s") {
            Some(raw) => Duration::from_secs(parse_int(&raw, 60, 31_536_000)?.into()),
            None => Duration::from_secs(30 * 86_400),
        };
        let count = |raw: Option<Raw>, min: u32, default: u32| -> Result<u32, ConfigError> {
            raw.map_or(Ok(default), |raw| parse_int(&raw, min, 1_000_000_000))
        };
        let rate_limit_per_minute = count(take("rate_limit_per_minute"), 0, 1200)?;
        let auth_rate_limit_per_minute = count(take("auth_rate_limit_per_minute"), 0, 30)?;
        let login_delay_after = count(take("login_delay_after"), 1, 3)?;
        let login_lockout_after = count(take("login_lockout_after"), 1, 10)?;
        let login_lockout = seconds(take("login_lockout_s"), 900)?;
        let trusted_proxies = match take("trusted_proxies") {
            Some(raw) => list(&raw)
                .iter()
                .map(|item| item.parse::<Network>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| raw.invalid("comma-separated addresses or networks, such as 10.0.0.0/8, ::1"))?,
            None => Vec::new(),
        };
        let cors_origins = match take("cors_origins") {
            Some(raw) => {
                let origins = list(&raw);
                if !origins.iter().all(|origin| valid_origin(origin)) {
                    return Err(raw.invalid("comma-separated origins such as https://app.example.com (no path, no *)"));
                }
                origins
            }
            None => Vec::new(),
        };
        let hsts_max_age = match take("hsts_max_age_s") {
            Some(raw) => Some(u64::from(parse_int(&raw, 0, 63_072_000)?)).filter(|age| *age > 0),
            None => None,
        };
        let signed_url_ttl = seconds(take("signed_url_ttl_s"), 300)?;
        let stream_mode = match take("stream_mode") {
            Some(raw) => match raw.value.trim() {
                "proxy" => StreamMode::Proxy,
                "redirect" if matches!(storage, StorageBackend::Fs { .. }) => {
                    return Err(raw.invalid(
                        "`proxy` with file storage: the filesystem store cannot presign URLs, so `redirect` needs \
                         S3 storage",
                    ));
                }
                "redirect" => StreamMode::Redirect,
                _ => return Err(raw.invalid("`proxy` or `redirect`")),
            },
            None => StreamMode::Proxy,
        };
        let stream_redirect_ttl = match take("stream_redirect_ttl_s") {
            Some(raw) => Duration::from_secs(parse_int(&raw, 5, 3600)?.into()),
            None => Duration::from_secs(60),
        };
        let stream_redirect_public_ttl = match take("stream_redirect_public_ttl_s") {
            // S3 signs for a week at most.
            Some(raw) => Duration::from_secs(parse_int(&raw, 60, 604_800)?.into()),
            None => Duration::from_secs(3600),
        };
        // Checked in either mode, so that switching to `redirect` cannot reveal a bad value.
        let stream_cdn_base = take("stream_cdn_base").map(|raw| parse_cdn_base(&raw)).transpose()?;
        let free_quota = match take("free_quota_s") {
            Some(raw) => Duration::from_secs(parse_int(&raw, 1, 100_000_000)?.into()),
            None => Duration::from_secs(3 * 3600),
        };
        let public_url = match take("public_url") {
            Some(raw) => Url::parse(raw.value.trim())
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
                .ok_or_else(|| raw.invalid("the API's base URL, such as https://api.example.com"))?,
            None => Url::parse(&format!("http://{listen}")).map_err(|err| ConfigError::Invalid {
                setting: "listen".into(),
                expected: "an address that makes a URL".into(),
                got: err.to_string(),
            })?,
        };
        let json_body_max_bytes = match take("json_body_max_bytes") {
            Some(raw) => u64::from(parse_int(&raw, 1024, 64 << 20)?),
            None => 64 * 1024,
        };
        let body_read_timeout = seconds(take("body_read_timeout_s"), 30)?;
        let max_connections = match take("max_connections") {
            Some(raw) => parse_int(&raw, 1, 1_000_000)?,
            None => 10_000,
        };
        let max_connections_per_client = match take("max_connections_per_client") {
            Some(raw) => parse_int(&raw, 1, 1_000_000)?,
            None => 256,
        };
        let uploads_per_account = match take("uploads_per_account") {
            Some(raw) => parse_int(&raw, 1, 10_000)?,
            None => 4,
        };
        let social_writes_per_minute = match take("social_writes_per_minute") {
            Some(raw) => parse_int(&raw, 0, 1_000_000)?,
            None => 60,
        };
        let plays_flush = match take("plays_flush_ms") {
            Some(raw) => Duration::from_millis(parse_int(&raw, 50, 60_000)?.into()),
            None => Duration::from_millis(1000),
        };
        let play_dedup = match take("play_dedup_s") {
            Some(raw) => Duration::from_secs(parse_int(&raw, 1, 86_400)?.into()),
            None => Duration::from_secs(1800),
        };
        let charts_interval = match take("charts_interval_s") {
            Some(raw) => Duration::from_secs(parse_int(&raw, 1, 86_400)?.into()),
            None => Duration::from_secs(600),
        };
        let mut chart_scores = crate::charts::Scores::default();
        for (key, slot) in [
            ("trending_weight_plays", &mut chart_scores.plays),
            ("trending_weight_likes", &mut chart_scores.likes),
            ("trending_weight_reposts", &mut chart_scores.reposts),
            ("trending_weight_comments", &mut chart_scores.comments),
            ("trending_weight_reposts_all_time", &mut chart_scores.reposts_all_time),
        ] {
            if let Some(raw) = take(key) {
                *slot = parse_float(&raw, 0.0, 1_000_000.0)?;
            }
        }
        if let Some(raw) = take("trending_half_life_h") {
            chart_scores.half_life_hours = parse_float(&raw, 0.01, 8760.0)?;
        }
        let event_streams_max = match take("event_streams_max") {
            Some(raw) => parse_int(&raw, 1, 1_000_000)?,
            None => 2000,
        };
        let event_streams_per_client = match take("event_streams_per_client") {
            Some(raw) => parse_int(&raw, 1, 1_000_000)?,
            None => 20,
        };
        let smtp_url = take("smtp_url").map(|raw| parse_smtp_url(&raw)).transpose()?;
        let mail_from = match take("mail_from") {
            Some(raw) if valid_mailbox(raw.value.trim()) => raw.value.trim().to_owned(),
            Some(raw) => {
                return Err(raw.invalid("an address such as no-reply@example.com or Name <no-reply@example.com>"));
            }
            None => "Waveline <no-reply@localhost>".to_owned(),
        };
        let app_url = match take("app_url") {
            Some(raw) => Url::parse(raw.value.trim())
                .ok()
                .filter(|url| matches!(url.scheme(), "http" | "https") && url.host_str().is_some())
                .ok_or_else(|| raw.invalid("the web client's base URL, such as https://app.example.com"))?,
            None => public_url.clone(),
        };
        let email_verify_ttl = seconds(take("email_verify_ttl_s"), 86_400)?;
        let password_reset_ttl = seconds(take("password_reset_ttl_s"), 3600)?;
        let refresh_family_max_age = match take("refresh_family_max_age_s") {
            Some(raw) => Duration::from_secs(parse_int(&raw, 60, 315_360_000)?.into()),
            None => Duration::from_secs(90 * 86_400),
        };
        let stream_cache_dir = match absolute_path(take("stream_cache_dir"))? {
            Some(dir) => Some(dir),
            None if matches!(storage, StorageBackend::S3 { .. }) => Some(default_data_dir().join("stream-cache")),
            None => None,
        };
        let stream_cache_bytes = match take("stream_cache_bytes") {
            Some(raw) => {
                raw.value.trim().parse::<u64>().map_err(|_| raw.invalid("a number of bytes (0 turns the cache off)"))?
            }
            None => 10 << 30,
        };
        let fcm_credentials_file = absolute_path(take("fcm_credentials_file"))?;
        let fcm_base_url = match take("fcm_base_url") {
            Some(raw) => parse_service_base(&raw)?,
            None => Url::parse("https://fcm.googleapis.com").map_err(|err| ConfigError::Invalid {
                setting: "fcm_base_url".into(),
                expected: "a URL".into(),
                got: err.to_string(),
            })?,
        };
        let billing = billing::parse(
            billing::RawBilling {
                secret_key: take("stripe_secret_key"),
                webhook_secret: take("stripe_webhook_secret"),
                price_premium: take("stripe_price_premium"),
                api_base: take("stripe_api_base"),
                success_url: take("billing_success_url"),
                cancel_url: take("billing_cancel_url"),
            },
            &app_url,
        )?;
        Ok(Settings {
            billing,
            fcm_credentials_file,
            fcm_base_url,
            stream_cache_dir,
            stream_cache_bytes,
            json_body_max_bytes,
            body_read_timeout,
            max_connections,
            max_connections_per_client,
            uploads_per_account,
            social_writes_per_minute,
            plays_flush,
            play_dedup,
            charts_interval,
            chart_scores,
            event_streams_max,
            event_streams_per_client,
            smtp_url,
            mail_from,
            app_url,
            email_verify_ttl,
            password_reset_ttl,
            refresh_family_max_age,
            public_url,
            oauth,
            jwt_previous_secrets,
            refresh_token_ttl,
            rate_limit_per_minute,
            auth_rate_limit_per_minute,
            login_delay_after,
            login_lockout_after,
            login_lockout,
            trusted_proxies,
            cors_origins,
            hsts_max_age,
            signed_url_ttl,
            stream_mode,
            stream_redirect_ttl,
            stream_redirect_public_ttl,
            stream_cdn_base,
            free_quota,
            jwt_secret,
            access_token_ttl,
            upload_max_bytes,
            upload_url_ttl,
            queue_name,
            heartbeat_stale,
            queued_stale,
            reconcile_interval,
            shutdown_grace,
            presets,
            work_dir,
            pipeline_timeout,
            pipeline_priority,
            pipeline_threads,
            pipeline_share_under_load,
            database_url,
            database_max_connections,
            queue,
            storage,
            documents,
            listen,
            job_max_attempts,
            job_retry_base,
            job_retry_max: job_retry_max.max(job_retry_base),
            log,
            log_format,
            unknown_env,
        })
    }

    /// The settings as they can be shown to an operator: secrets redacted.
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::json!({
            "database_url": redact_url(self.database_url.expose_secret()),
            "database_max_connections": self.database_max_connections,
            "queue": self.queue.redacted(),
            "storage": self.storage,
            "documents": self.documents.redacted(),
            "listen": self.listen.to_string(),
            "job_max_attempts": self.job_max_attempts,
            "job_retry_base_ms": self.job_retry_base.as_millis() as u64,
            "job_retry_max_ms": self.job_retry_max.as_millis() as u64,
            "log": self.log,
            "log_format": self.log_format,
            "queue_name": self.queue_name,
            "heartbeat_stale_s": self.heartbeat_stale.as_secs(),
            "queued_stale_s": self.queued_stale.as_secs(),
            "reconcile_interval_s": self.reconcile_interval.as_secs(),
            "shutdown_grace_s": self.shutdown_grace.as_secs(),
            "presets": self.presets,
            "work_dir": self.work_dir,
            "pipeline_timeout_s": self.pipeline_timeout.as_secs(),
            "pipeline_priority": self.pipeline_priority,
            "pipeline_threads": self.pipeline_threads,
            "pipeline_share_under_load": self.pipeline_share_under_load,
            "jwt_secret": self.jwt_secret.as_ref().map(|_| "***"),
            "access_token_ttl_s": self.access_token_ttl.as_secs(),
            "upload_max_bytes": self.upload_max_bytes,
            "upload_url_ttl_s": self.upload_url_ttl.as_secs(),
            "jwt_previous_secrets": self.jwt_previous_secrets.iter().map(|_| "***").collect::<Vec<_>>(),
            "refresh_token_ttl_s": self.refresh_token_ttl.as_secs(),
            "rate_limit_per_minute": self.rate_limit_per_minute,
            "auth_rate_limit_per_minute": self.auth_rate_limit_per_minute,
            "login_delay_after": self.login_delay_after,
            "login_lockout_after": self.login_lockout_after,
            "login_lockout_s": self.login_lockout.as_secs(),
            "trusted_proxies": self.trusted_proxies.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "cors_origins": self.cors_origins,
            "hsts_max_age_s": self.hsts_max_age.unwrap_or(0),
            "signed_url_ttl_s": self.signed_url_ttl.as_secs(),
            "stream_mode": self.stream_mode,
            "stream_redirect_ttl_s": self.stream_redirect_ttl.as_secs(),
            "stream_redirect_public_ttl_s": self.stream_redirect_public_ttl.as_secs(),
            "stream_cdn_base": self.stream_cdn_base.as_ref().map(Url::as_str),
            "free_quota_s": self.free_quota.as_secs(),
            "public_url": self.public_url.as_str(),
            "oauth": self.oauth.iter().map(oauth_redacted).collect::<Vec<_>>(),
            "json_body_max_bytes": self.json_body_max_bytes,
            "body_read_timeout_s": self.body_read_timeout.as_secs(),
            "max_connections": self.max_connections,
            "max_connections_per_client": self.max_connections_per_client,
            "uploads_per_account": self.uploads_per_account,
            "social_writes_per_minute": self.social_writes_per_minute,
            "event_streams_max": self.event_streams_max,
            "event_streams_per_client": self.event_streams_per_client,
            "smtp_url": self.smtp_url.as_ref().map(|url| redact_url(url.expose_secret())),
            "mail_from": self.mail_from,
            "app_url": self.app_url.as_str(),
            "email_verify_ttl_s": self.email_verify_ttl.as_secs(),
            "password_reset_ttl_s": self.password_reset_ttl.as_secs(),
            "refresh_family_max_age_s": self.refresh_family_max_age.as_secs(),
            "stream_cache_dir": self.stream_cache_dir,
            "stream_cache_bytes": self.stream_cache_bytes,
            "fcm_credentials_file": self.fcm_credentials_file,
            "fcm_base_url": self.fcm_base_url.as_str(),
            "plays_flush_ms": self.plays_flush.as_millis() as u64,
            "play_dedup_s": self.play_dedup.as_secs(),
            "charts_interval_s": self.charts_interval.as_secs(),
            "trending_weight_plays": self.chart_scores.plays,
            "trending_weight_likes": self.chart_scores.likes,
            "trending_weight_reposts": self.chart_scores.reposts,
            "trending_weight_comments": self.chart_scores.comments,
            "trending_weight_reposts_all_time": self.chart_scores.reposts_all_time,
            "trending_half_life_h": self.chart_scores.half_life_hours,
            "stripe_secret_key": self.billing.as_ref().map(|_| "(set)"),
            "stripe_webhook_secret": self.billing.as_ref().map(|billing| format!("({} set)", billing.webhook_secrets.len())),
            "stripe_price_premium": self.billing.as_ref().map(|billing| billing.price_premium.as_str()),
            "stripe_api_base": self.billing.as_ref().map(|billing| billing.api_base.as_str()),
            "billing_success_url": self.billing.as_ref().map(|billing| billing.success_url.as_str()),
            "billing_cancel_url": self.billing.as_ref().map(|billing| billing.cancel_url.as_str()),
        })
    }

    /// Where the stream cache lives and how large it may grow, or `None` when it is off.
    pub fn stream_cache(&self) -> Option<(&Path, u64)> {
        self.stream_cache_dir
            .as_deref()
            .filter(|_| self.stream_cache_bytes > 0)
            .map(|dir| (dir, self.stream_cache_bytes))
    }
}

/// A provider as it can be shown: its secret hidden.
fn oauth_redacted(provider: &OAuthProvider) -> serde_json::Value {
    let mut shown = serde_json::Map::new();
    shown.insert("name".into(), provider.name.clone().into());
    shown.insert("kind".into(), serde_json::to_value(provider.kind).unwrap_or_default());
    shown.insert("client_id".into(), provider.client_id.clone().into());
    shown.insert("client_secret".into(), "***".into());
    for (key, url) in [
        ("authorize_url", &provider.authorize_url),
        ("token_url", &provider.token_url),
        ("userinfo_url", &provider.userinfo_url),
    ] {
        shown.insert(key.into(), url.as_str().into());
    }
    shown.insert("scopes".into(), provider.scopes.clone().into());
    serde_json::Value::Object(shown)
}

fn read_file_layer(
    path: &Path,
    raw: &mut BTreeMap<&'static str, Raw>,
    providers: &mut oauth::RawProviders,
) -> Result<(), ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let table: toml::Table = text
        .parse()
        .map_err(|err: toml::de::Error| ConfigError::Parse { path: path.to_path_buf(), message: err.to_string() })?;
    for (name, value) in table {
        if name == "oauth" {
            oauth::from_table(path, value, providers)?;
            continue;
        }
        let Some(key) = KEYS.iter().find(|key| key.name == name) else {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("unknown key `{name}`; the keys are: {}", keys().collect::<Vec<_>>().join(", ")),
            });
        };
        let setting = format!("{name} (in {})", path.display());
        let value = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            other => {
                return Err(ConfigError::Invalid {
                    setting,
                    expected: "a string or a number".to_owned(),
                    got: format!("a TOML {}", other.type_str()),
                });
            }
        };
        raw.insert(key.name, Raw { value, setting, secret: key.secret });
    }
    Ok(())
}

/// `scheme://host[:port]`, as a browser sends it in `Origin`.
fn valid_origin(origin: &str) -> bool {
    let Ok(url) = Url::parse(origin) else {
        return false;
    };
    matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|host| !host.is_empty())
        && url.origin().ascii_serialization() == origin
}

fn parse_int(raw: &Raw, min: u32, max: u32) -> Result<u32, ConfigError> {
    raw.value
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|value| (min..=max).contains(value))
        .ok_or_else(|| raw.invalid(format!("a whole number from {min} to {max}")))
}

fn parse_float(raw: &Raw, min: f64, max: f64) -> Result<f64, ConfigError> {
    raw.value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|value| (min..=max).contains(value))
        .ok_or_else(|| raw.invalid(format!("a number from {min} to {max}")))
}

fn parse_database_url(raw: &Raw) -> Result<SecretString, ConfigError> {
    const EXPECTED: &str = "a PostgreSQL URL such as postgres://user:password@host:5432/database";
    let url = Url::parse(raw.value.trim()).map_err(|_| raw.invalid(EXPECTED))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(raw.invalid(EXPECTED));
    }
    Ok(SecretString::from(raw.value.trim().to_owned()))
}

fn parse_queue(raw: &Raw) -> Result<QueueBackend, ConfigError> {
    const EXPECTED: &str = "`memory` or an AMQP URL such as amqp://user:password@host:5672/vhost";
    let value = raw.value.trim();
    if value == "memory" {
        return Ok(QueueBackend::Memory);
    }
    let url = Url::parse(value).map_err(|_| raw.invalid(EXPECTED))?;
    if !matches!(url.scheme(), "amqp" | "amqps") || url.host_str().is_none_or(str::is_empty) {
        return Err(raw.invalid(EXPECTED));
    }
    Ok(QueueBackend::Amqp { url: SecretString::from(value.to_owned()) })
}

fn parse_documents(raw: &Raw) -> Result<DocumentsBackend, ConfigError> {
    const EXPECTED: &str = "`postgres` or a MongoDB URL naming its database, such as mongodb://host:27017/waveline";
    let value = raw.value.trim();
    if value == "postgres" {
        return Ok(DocumentsBackend::Postgres);
    }
    let url = Url::parse(value).map_err(|_| raw.invalid(EXPECTED))?;
    if url.scheme() != "mongodb" || url.host_str().is_none_or(str::is_empty) {
        return Err(raw.invalid(EXPECTED));
    }
    // MongoDB refuses slashes, backslashes, dots, spaces, quotes and dollar signs in database
    // names; a safe subset is accepted.
    let database = url.path().trim_start_matches('/');
    let valid = !database.is_empty()
        && database.len() <= 63
        && database.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if !valid {
        return Err(raw.invalid(format!(
            "{EXPECTED} (the database, 1 to 63 letters, digits, underscores and hyphens, is the path)"
        )));
    }
    Ok(DocumentsBackend::Mongo { url: SecretString::from(value.to_owned()), database: database.to_owned() })
}

fn parse_storage(raw: &Raw) -> Result<StorageBackend, ConfigError> {
    const EXPECTED: &str = "file:///absolute/dir or s3://BUCKET?endpoint=http://host:port&region=REGION";
    let value = raw.value.trim();
    let url = Url::parse(value).map_err(|_| raw.invalid(EXPECTED))?;
    match url.scheme() {
        "file" => {
            if url.host_str().is_some_and(|host| !host.is_empty()) || url.query().is_some() {
                return Err(raw.invalid("file:/// followed by an absolute directory, e.g. file:///var/lib/waveline"));
            }
            let root = url.to_file_path().map_err(|()| raw.invalid("file:/// followed by an absolute directory"))?;
            if !root.is_absolute() || root == Path::new("/") {
                return Err(raw.invalid("file:/// followed by an absolute directory other than /"));
            }
            Ok(StorageBackend::Fs { root })
        }
        "s3" => {
            let bucket = url.host_str().unwrap_or_default().to_owned();
            if !valid_bucket_name(&bucket) {
                return Err(raw
                    .invalid("s3://BUCKET with a bucket name of 3 to 63 lowercase letters, digits, dots and hyphens"));
            }
            if !matches!(url.path(), "" | "/") || url.port().is_some() || !url.username().is_empty() {
                return Err(raw.invalid(format!(
                    "{EXPECTED} (no port, path or credentials after the bucket; credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                )));
            }
            let mut endpoint = None;
            let mut region = None;
            for (name, value) in url.query_pairs() {
                match &*name {
                    "endpoint" => {
                        let parsed = Url::parse(&value)
                            .ok()
                            .filter(|url| matches!(url.scheme(), "http" | "https") && url.host().is_some());
                        if parsed.is_none() {
                            return Err(raw.invalid("endpoint=http://host:port or endpoint=https://host"));
                        }
                        endpoint = Some(value.trim_end_matches('/').to_owned());
                    }
                    "region" if !value.is_empty() => region = Some(value.into_owned()),
                    _ => {
                        return Err(raw.invalid(format!(
                            "{EXPECTED} (unknown or empty parameter `{name}`; the parameters are endpoint and region)"
                        )));
                    }
                }
            }
            Ok(StorageBackend::S3 { bucket, endpoint, region: region.unwrap_or_else(|| "us-east-1".to_owned()) })
        }
        _ => Err(raw.invalid(EXPECTED)),
    }
}

/// An `http(s)://host[/path]/` base that object keys are appended to: no query, fragment or
/// credentials, and a trailing slash added when missing.
fn parse_cdn_base(raw: &Raw) -> Result<Url, ConfigError> {
    const EXPECTED: &str = "an http(s) base URL such as https://cdn.example.com/ or https://example.com/media/ \
                            (no query, fragment or credentials)";
    let mut url = Url::parse(raw.value.trim()).map_err(|_| raw.invalid(EXPECTED))?;
    let plain = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|host| !host.is_empty())
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    if !plain {
        return Err(raw.invalid(EXPECTED));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Whether `url` may be spoken to: `https`, or `http` to a loopback address (a test double or
/// a local relay), with a host and no credentials, query or fragment.
pub fn is_secure_or_loopback(url: &Url) -> bool {
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    let plain = url.host_str().is_some_and(|host| !host.is_empty())
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    plain && (url.scheme() == "https" || (url.scheme() == "http" && loopback))
}

/// The base URL of an outside HTTP service (`fcm_base_url`): see [`is_secure_or_loopback`];
/// the path is kept without its trailing slash, so the service's paths are appended to it.
fn parse_service_base(raw: &Raw) -> Result<Url, ConfigError> {
    const EXPECTED: &str = "an https:// base URL such as https://fcm.googleapis.com (http:// only to a loopback \
                            address; no credentials, query or fragment)";
    let url = Url::parse(raw.value.trim()).map_err(|_| raw.invalid(EXPECTED))?;
    if !is_secure_or_loopback(&url) {
        return Err(raw.invalid(EXPECTED));
    }
    Ok(url)
}

/// `smtp://` or `smtps://` with a host; `tls` only `required` or `opportunistic`; credentials
/// never over a connection that may stay in clear, except to a loopback relay.
fn parse_smtp_url(raw: &Raw) -> Result<SecretString, ConfigError> {
    const EXPECTED: &str =
        "smtps://user:password@host:465, smtp://user:password@host:587?tls=required or smtp://host:25";
    let value = raw.value.trim();
    let url = Url::parse(value).map_err(|_| raw.invalid(EXPECTED))?;
    if !matches!(url.scheme(), "smtp" | "smtps") || url.host_str().is_none_or(str::is_empty) {
        return Err(raw.invalid(EXPECTED));
    }
    let mut tls = None;
    for (name, value) in url.query_pairs() {
        match (&*name, &*value) {
            ("tls", "required" | "opportunistic") => tls = Some(value.into_owned()),
            _ => {
                return Err(
                    raw.invalid(format!("{EXPECTED} (the only parameter is tls=required or tls=opportunistic)"))
                );
            }
        }
    }
    let loopback = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    let credentials = !url.username().is_empty() || url.password().is_some();
    let encrypted = url.scheme() == "smtps" || tls.as_deref() == Some("required");
    if credentials && !encrypted && !loopback {
        return Err(raw.invalid(format!("{EXPECTED} (credentials need smtps:// or tls=required)")));
    }
    Ok(SecretString::from(value.to_owned()))
}

/// `local@domain` or `Name <local@domain>`, printable, at most 320 characters.
fn valid_mailbox(text: &str) -> bool {
    let address = match text.strip_suffix('>').and_then(|rest| rest.rsplit_once('<')) {
        Some((_, address)) => address,
        None => text,
    };
    text.len() <= 320
        && !text.chars().any(char::is_control)
        && address.split('@').count() == 2
        && address.split('@').all(|part| !part.is_empty())
        && !address.chars().any(|c| c.is_whitespace() || matches!(c, '<' | '>' | ','))
}

fn valid_bucket_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// `amqp://user:secret@host/` → `amqp://user:***@host/`; unparsable text is hidden whole.
fn redact_url(text: &str) -> String {
    match Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Only fails for URLs that cannot have a password, which this one has.
                let _ = url.set_password(Some("***"));
            }
            url.to_string()
        }
        Err(_) => "(hidden)".to_owned(),
    }
}

/// Where the embedded mode keeps its files when no storage is configured:
/// `$XDG_DATA_HOME/waveline`, else `$HOME/.local/share/waveline`, else `/var/lib/waveline`.
pub fn default_data_dir() -> PathBuf {
    let absolute = |var: &str| std::env::var_os(var).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(dir) = absolute("XDG_DATA_HOME") {
        return dir.join("waveline");
    }
    if let Some(home) = absolute("HOME") {
        return home.join(".local/share/waveline");
    }
    PathBuf::from("/var/lib/waveline")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_sources(None, &env(pairs))
    }

    fn error_text(pairs: &[(&str, &str)]) -> String {
        match load(pairs) {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn defaults_are_the_embedded_mode() {
        let settings = load(&[]).expect("defaults are valid");
        assert!(matches!(settings.queue, QueueBackend::Memory));
        assert!(matches!(settings.storage, StorageBackend::Fs { ref root } if root.is_absolute()));
        assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.database_url.expose_secret(), "postgres://postgres@127.0.0.1:5432/waveline");
    }

    #[test]
    fn the_four_contract_variables_are_read() {
        let settings = load(&[
            ("WAVELINE_DATABASE_URL", "postgres://app:pw@db.internal:6432/wl"),
            ("WAVELINE_QUEUE", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            ("WAVELINE_STORAGE", "s3://media-bucket?endpoint=http://127.0.0.1:9000&region=eu-west-1"),
            ("WAVELINE_LISTEN", "0.0.0.0:9090"),
        ])
        .expect("valid");
        assert_eq!(settings.database_url.expose_secret(), "postgres://app:pw@db.internal:6432/wl");
        match &settings.queue {
            QueueBackend::Amqp { url } => {
                assert_eq!(url.expose_secret(), "amqp://guest:guest@127.0.0.1:5672/%2f")
            }
            other => panic!("expected amqp, got {other:?}"),
        }
        assert_eq!(
            settings.storage,
            StorageBackend::S3 {
                bucket: "media-bucket".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: "eu-west-1".into(),
            }
        );
        assert_eq!(settings.listen.to_string(), "0.0.0.0:9090");
        assert_eq!(settings.queue.redacted(), "amqp://guest:***@127.0.0.1:5672/%2f");
        let shown = settings.redacted().to_string();
        assert!(!shown.contains(":pw@"), "{shown}");
    }

    #[test]
    fn documents_are_postgres_or_a_mongodb_url_naming_its_database() {
        assert!(matches!(load(&[]).expect("defaults").documents, DocumentsBackend::Postgres));
        let settings =
            load(&[("WAVELINE_DOCUMENTS", "mongodb://app:pw@mongo.internal:27017/wl_docs?authSource=admin")])
                .expect("valid");
        match &settings.documents {
            DocumentsBackend::Mongo { url, database } => {
                assert_eq!(database, "wl_docs");
                assert!(url.expose_secret().ends_with("?authSource=admin"));
            }
            other => panic!("expected mongodb, got {other:?}"),
        }
        assert_eq!(settings.documents.redacted(), "mongodb://app:***@mongo.internal:27017/wl_docs?authSource=admin");
        assert!(!settings.redacted().to_string().contains(":pw@"));
        for bad in [
            "mongo",
            "mongodb://host:27017",
            "mongodb://host:27017/",
            "mongodb://h/a.b",
            "mongodb+srv://h/db",
            "http://h/db",
        ] {
            let text = error_text(&[("WAVELINE_DOCUMENTS", bad)]);
            assert!(text.starts_with("WAVELINE_DOCUMENTS: expected `postgres` or a MongoDB URL"), "{bad}: {text}");
            assert!(text.ends_with("got (hidden)"), "{bad}: {text}");
        }
    }

    #[test]
    fn file_storage_must_be_an_absolute_directory() {
        let settings = load(&[("WAVELINE_STORAGE", "file:///srv/waveline/objects")]).expect("valid");
        assert_eq!(settings.storage, StorageBackend::Fs { root: "/srv/waveline/objects".into() });
        for bad in ["file://relative/dir", "file:///", "/srv/waveline", "file:///srv?x=1"] {
            let text = error_text(&[("WAVELINE_STORAGE", bad)]);
            assert!(text.starts_with("WAVELINE_STORAGE: expected"), "{bad}: {text}");
        }
    }

    #[test]
    fn bad_values_name_the_setting_and_what_was_expected() {
        let cases = [
            ("WAVELINE_QUEUE", "redis://localhost", "`memory` or an AMQP URL"),
            ("WAVELINE_QUEUE", "amqp://", "`memory` or an AMQP URL"),
            ("WAVELINE_STORAGE", "s3://Bad_Bucket", "bucket name"),
            ("WAVELINE_STORAGE", "s3://bucket?endpoint=ftp://x", "endpoint=http://host:port"),
            ("WAVELINE_STORAGE", "s3://bucket?bogus=1", "unknown or empty parameter `bogus`"),
            ("WAVELINE_STORAGE", "gs://bucket", "file:///absolute/dir or s3://"),
            ("WAVELINE_LISTEN", "localhost", "a socket address"),
            ("WAVELINE_DATABASE_URL", "mysql://x", "a PostgreSQL URL"),
            ("WAVELINE_JOB_MAX_ATTEMPTS", "0", "a whole number from 1 to 100"),
            ("WAVELINE_LOG_FORMAT", "xml", "`text` or `json`"),
        ];
        for (var, value, expected) in cases {
            let text = error_text(&[(var, value)]);
            assert!(text.starts_with(&format!("{var}: expected")), "{var}={value}: {text}");
            assert!(text.contains(expected), "{var}={value}: {text}");
        }
    }

    #[test]
    fn secrets_are_not_echoed_in_errors() {
        let text = error_text(&[("WAVELINE_DATABASE_URL", "mysql://root:hunter2@db")]);
        assert!(!text.contains("hunter2"), "{text}");
        let text = error_text(&[("WAVELINE_QUEUE", "amqq://root:hunter2@mq")]);
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn the_environment_overrides_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("waveline.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:7000\"\nqueue = \"amqp://mq:5672/%2f\"\njob_max_attempts = 3\n")
            .expect("write");
        let settings =
            Settings::from_sources(Some(&path), &env(&[("WAVELINE_LISTEN", "127.0.0.1:7001")])).expect("valid");
        assert_eq!(settings.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(settings.queue.redacted(), "amqp://mq:5672/%2f");
        assert_eq!(settings.job_max_attempts, 3);
    }

    #[test]
    fn file_errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("waveline.toml");
        std::fs::write(&path, "storage = \"file://relative\"\n").expect("write");
        let text = Settings::from_sources(Some(&path), &env(&[])).expect_err("invalid").to_string();
        assert!(text.starts_with(&format!("storage (in {}): expected", path.display())), "{text}");

        std::fs::write(&path, "stroage = \"file:///srv\"\n").expect("write");
        let text = Settings::from_sources(Some(&path), &env(&[])).expect_err("invalid").to_string();
        assert!(text.contains("unknown key `stroage`"), "{text}");

        std::fs::write(&path, "listen = [1]\n").expect("write");
        let text = Settings::from_sources(Some(&path), &env(&[])).expect_err("invalid").to_string();
        assert!(text.contains("listen (in"), "{text}");

        let missing = dir.path().join("missing.toml");
        let err = Settings::from_sources(Some(&missing), &env(&[])).expect_err("missing");
        assert_eq!(err.code(), "config_unreadable");
    }

    #[test]
    fn the_session_lifetime_is_a_setting() {
        assert_eq!(load(&[]).expect("defaults").refresh_family_max_age, Duration::from_secs(90 * 86_400));
        let settings = load(&[("WAVELINE_REFRESH_FAMILY_MAX_AGE_S", "3600")]).expect("valid");
        assert_eq!(settings.refresh_family_max_age, Duration::from_secs(3600));
        assert!(load(&[("WAVELINE_REFRESH_FAMILY_MAX_AGE_S", "10")]).is_err(), "below a minute");
    }

    #[test]
    fn mail_settings_are_checked() {
        let settings = load(&[]).expect("defaults");
        assert!(settings.smtp_url.is_none(), "the embedded default logs mail");
        assert_eq!(settings.app_url, settings.public_url);
        let settings = load(&[
            ("WAVELINE_SMTP_URL", "smtps://mailer:s3cret@smtp.example.com:465"),
            ("WAVELINE_MAIL_FROM", "Waveline <no-reply@example.com>"),
        ])
        .expect("valid");
        assert_eq!(settings.mail_from, "Waveline <no-reply@example.com>");
        assert!(!settings.redacted().to_string().contains("s3cret"));
        load(&[("WAVELINE_SMTP_URL", "smtp://127.0.0.1:2525")]).expect("a plain loopback relay");
        load(&[("WAVELINE_SMTP_URL", "smtp://u:p@smtp.example.com:587?tls=required")]).expect("STARTTLS");
        for bad in ["smtp://u:p@smtp.example.com:25", "http://smtp.example.com", "smtp://h?tls=never", "smtp://"] {
            let text = error_text(&[("WAVELINE_SMTP_URL", bad)]);
            assert!(text.starts_with("WAVELINE_SMTP_URL: expected") && !text.contains(":p@"), "{bad}: {text}");
        }
        for bad in ["nobody", "a b@example.com", "Name <x@y> trailing", "@example.com"] {
            assert!(load(&[("WAVELINE_MAIL_FROM", bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_mode_is_checked_against_the_store() {
        let s3 = ("WAVELINE_STORAGE", "s3://media?endpoint=http://127.0.0.1:9000");
        let settings = load(&[]).expect("defaults");
        assert_eq!(settings.stream_mode, StreamMode::Proxy);
        assert_eq!(settings.stream_redirect_ttl, Duration::from_secs(60));
        assert_eq!(settings.stream_redirect_public_ttl, Duration::from_secs(3600));
        assert!(settings.stream_cdn_base.is_none());
        let settings = load(&[
            s3,
            ("WAVELINE_STREAM_MODE", "redirect"),
            ("WAVELINE_STREAM_REDIRECT_TTL_S", "30"),
            ("WAVELINE_STREAM_CDN_BASE", "https://cdn.example.com/media"),
        ])
        .expect("valid");
        assert_eq!(settings.stream_mode, StreamMode::Redirect);
        assert_eq!(settings.stream_redirect_ttl, Duration::from_secs(30));
        assert_eq!(settings.stream_cdn_base.as_ref().map(Url::as_str), Some("https://cdn.example.com/media/"));
        assert_eq!(settings.redacted()["stream_mode"], "redirect");

        // The filesystem store cannot presign: redirect mode is refused at start-up.
        let text = error_text(&[("WAVELINE_STREAM_MODE", "redirect")]);
        assert!(text.starts_with("WAVELINE_STREAM_MODE: expected `proxy` with file storage"), "{text}");
        assert!(text.contains("needs S3 storage") && text.ends_with("got \"redirect\""), "{text}");
        for (var, value, expected) in [
            ("WAVELINE_STREAM_MODE", "Redirect", "`proxy` or `redirect`"),
            ("WAVELINE_STREAM_MODE", "cdn", "`proxy` or `redirect`"),
            ("WAVELINE_STREAM_REDIRECT_TTL_S", "0", "a whole number from 5 to 3600"),
            ("WAVELINE_STREAM_REDIRECT_PUBLIC_TTL_S", "604801", "a whole number from 60 to 604800"),
            ("WAVELINE_STREAM_CDN_BASE", "cdn.example.com", "an http(s) base URL"),
            ("WAVELINE_STREAM_CDN_BASE", "https://cdn.example.com/?sig=1", "no query"),
            ("WAVELINE_STREAM_CDN_BASE", "https://user:pw@cdn.example.com/", "credentials"),
            ("WAVELINE_STREAM_CDN_BASE", "ftp://cdn.example.com/", "an http(s) base URL"),
        ] {
            let text = error_text(&[s3, (var, value)]);
            assert!(text.starts_with(&format!("{var}: expected")) && text.contains(expected), "{var}={value}: {text}");
        }
    }

    #[test]
    fn pipeline_scheduling_is_unset_by_default_and_checked() {
        let settings = load(&[]).expect("defaults");
        assert_eq!((settings.pipeline_priority, settings.pipeline_threads), (None, None), "the mode decides");
        let settings =
            load(&[("WAVELINE_PIPELINE_PRIORITY", "low"), ("WAVELINE_PIPELINE_THREADS", "3")]).expect("valid");
        assert_eq!((settings.pipeline_priority, settings.pipeline_threads), (Some(PipelinePriority::Low), Some(3)));
        let text = error_text(&[("WAVELINE_PIPELINE_PRIORITY", "realtime")]);
        assert!(text.starts_with("WAVELINE_PIPELINE_PRIORITY: expected `idle`, `low` or `normal`"), "{text}");
        let text = error_text(&[("WAVELINE_PIPELINE_THREADS", "0")]);
        assert!(text.starts_with("WAVELINE_PIPELINE_THREADS: expected a whole number from 1"), "{text}");
        assert_eq!(settings.pipeline_share_under_load, None, "the mode decides");
        let settings = load(&[("WAVELINE_PIPELINE_SHARE_UNDER_LOAD", "0.5")]).expect("valid");
        assert_eq!(settings.pipeline_share_under_load, Some(0.5));
        for bad in ["0", "0.01", "1.5", "half", "NaN"] {
            let text = error_text(&[("WAVELINE_PIPELINE_SHARE_UNDER_LOAD", bad)]);
            assert!(
                text.starts_with("WAVELINE_PIPELINE_SHARE_UNDER_LOAD: expected a number from 0.05 to 1"),
                "{bad}: {text}"
            );
        }
    }

    #[test]
    fn the_stream_cache_is_on_for_s3_and_off_for_the_file_store() {
        let s3 = [("WAVELINE_STORAGE", "s3://media?endpoint=http://127.0.0.1:9000")];
        let settings = load(&s3).expect("valid");
        let (dir, bytes) = settings.stream_cache().expect("on with S3");
        assert!(dir.is_absolute() && dir.ends_with("stream-cache"), "{}", dir.display());
        assert_eq!(bytes, 10 << 30);
        assert!(load(&[]).expect("defaults").stream_cache().is_none(), "off with the file store");
        let settings = load(&[("WAVELINE_STREAM_CACHE_DIR", "/srv/cache"), ("WAVELINE_STREAM_CACHE_BYTES", "1048576")])
            .expect("valid");
        assert_eq!(settings.stream_cache(), Some((Path::new("/srv/cache"), 1 << 20)), "on when asked for");
        let off = load(&[s3[0], ("WAVELINE_STREAM_CACHE_BYTES", "0")]).expect("valid");
        assert!(off.stream_cache().is_none(), "0 bytes turns it off");
        for (var, bad) in [("WAVELINE_STREAM_CACHE_DIR", "relative/dir"), ("WAVELINE_STREAM_CACHE_BYTES", "10GB")] {
            let text = error_text(&[(var, bad)]);
            assert!(text.starts_with(&format!("{var}: expected")), "{text}");
        }
    }

    #[test]
    fn push_is_off_unless_a_key_file_is_named() {
        let settings = load(&[]).expect("defaults");
        assert!(settings.fcm_credentials_file.is_none());
        assert_eq!(settings.fcm_base_url.as_str(), "https://fcm.googleapis.com/");
        let settings = load(&[
            ("WAVELINE_FCM_CREDENTIALS_FILE", "/etc/waveline/firebase.json"),
            ("WAVELINE_FCM_BASE_URL", "http://127.0.0.1:9099"),
        ])
        .expect("valid");
        assert_eq!(settings.fcm_credentials_file.as_deref(), Some(Path::new("/etc/waveline/firebase.json")));
        assert_eq!(settings.redacted()["fcm_credentials_file"], "/etc/waveline/firebase.json");
        assert_eq!(settings.redacted()["fcm_base_url"], "http://127.0.0.1:9099/");
        let text = error_text(&[("WAVELINE_FCM_CREDENTIALS_FILE", "firebase.json")]);
        assert!(text.starts_with("WAVELINE_FCM_CREDENTIALS_FILE: expected an absolute path"), "{text}");
        for bad in [
            "http://fcm.example.com",
            "ftp://127.0.0.1",
            "https://user:pw@fcm.example.com",
            "https://fcm.example.com/?key=1",
            "fcm.googleapis.com",
        ] {
            let text = error_text(&[("WAVELINE_FCM_BASE_URL", bad)]);
            assert!(text.starts_with("WAVELINE_FCM_BASE_URL: expected an https:// base URL"), "{bad}: {text}");
        }
    }

    #[test]
    fn billing_is_off_unless_all_three_stripe_settings_are_set() {
        let settings = load(&[]).expect("defaults");
        assert!(settings.billing.is_none());
        let full = [
            ("WAVELINE_STRIPE_SECRET_KEY", "sk_test_abc123"),
            ("WAVELINE_STRIPE_WEBHOOK_SECRET", "whsec_new_0123456789, whsec_old_0123456789"),
            ("WAVELINE_STRIPE_PRICE_PREMIUM", "price_premium1"),
            ("WAVELINE_STRIPE_API_BASE", "http://127.0.0.1:12111"),
            ("WAVELINE_APP_URL", "https://app.example.com"),
        ];
        let billing = load(&full).expect("valid").billing.expect("on");
        assert_eq!(billing.webhook_secrets.len(), 2, "a rotation keeps both");
        assert_eq!(billing.price_premium, "price_premium1");
        assert_eq!(billing.api_base.as_str(), "http://127.0.0.1:12111/");
        assert_eq!(billing.success_url, "https://app.example.com/billing/success?session_id={CHECKOUT_SESSION_ID}");
        assert_eq!(billing.cancel_url, "https://app.example.com/billing/cancel");
        let redacted = load(&full).expect("valid").redacted().to_string();
        assert!(!redacted.contains("sk_test_abc123") && !redacted.contains("whsec_new"), "{redacted}");
        let text = error_text(&full[..1]);
        assert!(text.starts_with("WAVELINE_STRIPE_WEBHOOK_SECRET: expected a value"), "{text}");
        for (var, bad) in [
            ("WAVELINE_STRIPE_SECRET_KEY", "pk_test_public"),
            ("WAVELINE_STRIPE_WEBHOOK_SECRET", "short"),
            ("WAVELINE_STRIPE_API_BASE", "http://stripe.example.com"),
        ] {
            let mut env = full.to_vec();
            env.retain(|(name, _)| *name != var);
            env.push((var, bad));
            let text = error_text(&env);
            assert!(text.starts_with(&format!("{var}: expected")), "{text}");
        }
    }

    #[test]
    fn unknown_variables_are_reported_not_fatal() {
        let settings =
            load(&[("WAVELINE_QEUE", "memory"), ("WAVELINE_TEST_S3", "x"), ("PATH", "/bin")]).expect("valid");
        assert_eq!(settings.unknown_env, vec!["WAVELINE_QEUE".to_owned()]);
    }

    #[test]
    fn the_example_file_documents_every_key_and_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../waveline.example.toml");
        let text = std::fs::read_to_string(&path).expect("waveline.example.toml exists");
        for key in keys() {
            assert!(
                text.contains(&format!("# {key} =")) || text.contains(&format!("\n{key} =")),
                "{key} is not documented"
            );
        }
        Settings::from_sources(Some(&path), &env(&[])).expect("the example parses");
    }
}
