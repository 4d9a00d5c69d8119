//! `waveline`: the one binary for every role.
//!
//! Each subcommand reads the same layered configuration (`--config FILE`, then `WAVELINE_*`
//! variables; see `waveline.example.toml`) and prints for people by default or one JSON
//! document with `--json`. Roles arrive with their issues; this build has:
//!
//! - `migrate`: create the database if needed, apply the schema, prepare the storage and the
//!   document store (MongoDB's indexes);
//! - `check`: prove that the database, the storage, the queue and the document store answer,
//!   with a round trip, and that push notifications can be sent (the key file is usable and the
//!   token endpoint grants an access token) when they are on;
//! - `config`: print the effective configuration, secrets redacted.

mod fleet;
mod process;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use waveline_shared::config::{LogFormat, Settings, StorageBackend};
use waveline_shared::storage::{ObjectKey, S3Storage};
use waveline_shared::{db, documents, queue, storage};

#[derive(Debug, Parser)]
#[command(name = "waveline", version, about = "Waveline: the backend of a social audio platform")]
struct Cli {
    /// TOML configuration file (default: $WAVELINE_CONFIG, else none). Environment variables
    /// override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if it is missing, apply pending migrations, and prepare the
    /// storage (the directory, or the S3 bucket) and the document store (MongoDB's indexes).
    Migrate {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check that the database, the storage, the queue and the document store answer, and that
    /// FCM grants an access token when pushes are on; exits 1 if any does not.
    Check {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Process one audio file into the rendition ladder, waveform, loudness and manifest
    /// (no database, queue or storage involved). Exit 2 for bad input, 1 for internal errors.
    Process {
        /// The audio file: WAV, AIFF, FLAC, MP3, AAC/ALAC in M4A, Ogg Vorbis or Opus.
        input: PathBuf,
        /// Directory for the outputs and manifest.json (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// TOML presets file: the ladder, limits and waveform settings (default: built in).
        #[arg(long, value_name = "FILE")]
        presets: Option<PathBuf>,
        /// Print the manifest (or {"error":{code,message}}) as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP API on the configured address; with `--workers N`, also run N jobs at
    /// once in this process (the embedded mode: in-process queue, filesystem store).
    Serve {
        /// In-process worker concurrency (0: API only).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=256))]
        workers: u16,
    },
    /// Run a worker: take jobs from the queue, process them, record the results. SIGTERM
    /// stops taking work and finishes (or hands back) the jobs in hand.
    Worker {
        /// Jobs at once (and the queue prefetch).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        concurrency: u16,
        /// Serve Prometheus metrics at http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Upload local files as new tracks and enqueue them for processing.
    Import {
        /// Audio files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The owning account (default: the `system` account).
        #[arg(long, value_name = "USERNAME")]
        owner: Option<String>,
        /// Title for every imported track (default: each file's name).
        #[arg(long, value_name = "T")]
        title: Option<String>,
        /// Print {"tracks":[{id,file,state}]}.
        #[arg(long)]
        json: bool,
    },
    /// Inspect tracks.
    Tracks {
        #[command(subcommand)]
        command: TracksCommand,
    },
    /// Enqueue a backlog of tracks again, by filter (each gets a new revision).
    Reprocess {
        /// Only tracks in this state (repeatable; default ready and failed).
        #[arg(long = "state", value_name = "S")]
        states: Vec<String>,
        /// Only ready tracks without a rendition of this preset.
        #[arg(long, value_name = "P")]
        missing_preset: Option<String>,
        /// Only tracks created at or after this instant (RFC 3339).
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        /// Only these tracks (repeatable).
        #[arg(long = "track", value_name = "ID")]
        tracks: Vec<String>,
        /// At most this many tracks.
        #[arg(long, value_name = "N")]
        limit: Option<i64>,
        /// At most this many tracks enqueued per second.
        #[arg(long, value_name = "PER_SEC")]
        rate: Option<f64>,
        /// Show what would be enqueued without doing it.
        #[arg(long)]
        dry_run: bool,
        /// Print {matched, enqueued, skipped}.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the queue: depth, dead letters, replay.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Account administration: give or take the admin role.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// Trending and the top charts.
    Charts {
        #[command(subcommand)]
        command: ChartsCommand,
    },
    /// Print the effective configuration, with secrets redacted.
    Config {
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TracksCommand {
    /// List tracks, oldest first.
    List {
        /// Only tracks in this state (repeatable).
        #[arg(long = "state", value_name = "S")]
        states: Vec<String>,
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One track with its state, error and renditions.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCommand {
    /// Make an account an admin (reprocess any track).
    Promote {
        username: String,
        #[arg(long)]
        json: bool,
    },
    /// Take the admin role away.
    Demote {
        username: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ChartsCommand {
    /// Compute every chart now (waiting for a computation in progress), whatever the
    /// schedule; the next scheduled tick in this interval then finds its work done.
    Rebuild {
        /// Print {tick, computed_at, duration_ms, entries}.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Queue depth, consumers, dead letters, unsent outbox rows and tracks per state.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The dead letters, with their reasons.
    Dead {
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back in the queue as first attempts.
    Replay {
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Dead-letter ids, from `waveline jobs dead`.
        ids: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

fn parse_states(states: &[String]) -> anyhow::Result<Vec<waveline_shared::domain::TrackState>> {
    states.iter().map(|s| s.parse().map_err(|err| anyhow::anyhow!("--state: {err}"))).collect()
}

fn parse_ids<T: std::str::FromStr>(ids: &[String], what: &str) -> anyhow::Result<Vec<T>> {
    ids.iter().map(|id| id.parse().map_err(|_| anyhow::anyhow!("{what} {id:?} is not an id (a UUID)"))).collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `process` is a file-to-files tool: it needs no database, queue or storage settings.
    if let Command::Process { input, out, presets, json } = &cli.command {
        return process::run(input, out, presets.as_deref(), *json);
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("waveline: configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    init_logging(&settings);
    for name in &settings.unknown_env {
        tracing::warn!(variable = %name, "ignoring an environment variable that names no setting");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("waveline: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("waveline: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_new(&settings.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match settings.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate { json } => migrate(&settings, json).await,
        Command::Check { json } => check(&settings, json).await,
        // Handled in `main` before any settings are read: it needs none.
        Command::Process { .. } => Ok(ExitCode::SUCCESS),
        Command::Serve { workers } => fleet::serve(&settings, workers).await,
        Command::Worker { concurrency, metrics_listen } => fleet::worker(&settings, concurrency, metrics_listen).await,
        Command::Import { files, owner, title, json } => {
            fleet::import(&settings, &files, owner.as_deref(), title.as_deref(), json).await
        }
        Command::Tracks { command: TracksCommand::List { states, limit, json } } => {
            fleet::tracks_list(&settings, &parse_states(&states)?, limit, json).await
        }
        Command::Tracks { command: TracksCommand::Show { id, json } } => {
            let id = parse_ids(std::slice::from_ref(&id), "track")?.remove(0);
            fleet::tracks_show(&settings, id, json).await
        }
        Command::Reprocess { states, missing_preset, since, tracks, limit, rate, dry_run, json } => {
            let since = since
                .map(|text| {
                    chrono::DateTime::parse_from_rfc3339(&text)
                        .map(|t| t.with_timezone(&chrono::Utc))
                        .map_err(|err| anyhow::anyhow!("--since {text:?}: {err}"))
                })
                .transpose()?;
            let filter = waveline_shared::db::TrackFilter {
                states: parse_states(&states)?,
                missing_preset,
                since,
                ids: parse_ids(&tracks, "track")?,
                limit,
            };
            fleet::reprocess(&settings, filter, rate, dry_run, json).await
        }
        Command::Jobs { command: JobsCommand::Stats { json } } => fleet::jobs_stats(&settings, json).await,
        Command::Jobs { command: JobsCommand::Dead { json } } => fleet::jobs_dead(&settings, json).await,
        Command::Jobs { command: JobsCommand::Replay { all, ids, json } } => {
            fleet::jobs_replay(&settings, &parse_ids(&ids, "dead letter")?, all, json).await
        }
        Command::Users { command: UsersCommand::Promote { username, json } } => {
            fleet::set_role(&settings, &username, waveline_shared::db::Role::Admin, json).await
        }
        Command::Users { command: UsersCommand::Demote { username, json } } => {
            fleet::set_role(&settings, &username, waveline_shared::db::Role::User, json).await
        }
        Command::Charts { command: ChartsCommand::Rebuild { json } } => fleet::charts_rebuild(&settings, json).await,
        Command::Config { json } => {
            let shown = settings.redacted();
            if json {
                println!("{shown}");
            } else if let Some(fields) = shown.as_object() {
                for (key, value) in fields {
                    println!("{key} = {value}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn migrate(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    use secrecy::ExposeSecret;
    let created = db::create_database_if_missing(settings.database_url.expose_secret())
        .await
        .context("cannot reach PostgreSQL to create the database")?;
    let pool = db::connect(settings).await.context("cannot connect to PostgreSQL")?;
    let applied = db::migrate(&pool).await.context("cannot apply the migrations")?;
    let storage_note = match &settings.storage {
        StorageBackend::Fs { root } => {
            storage::FsStorage::open(root).await.with_context(|| format!("cannot prepare {}", root.display()))?;
            format!("directory {} ready", root.display())
        }
        StorageBackend::S3 { bucket, endpoint, region } => {
            let s3 = S3Storage::from_env(bucket, endpoint.as_deref(), region)?;
            s3.ensure_bucket().await.with_context(|| format!("cannot create bucket {bucket}"))?;
            format!("bucket {bucket} ready")
        }
    };
    let store = documents::open(settings, &pool).await.context("cannot open the document store")?;
    store.migrate().await.with_context(|| format!("cannot prepare the document store ({})", store.backend()))?;
    let documents_note = match store.backend() {
        "mongodb" => "document store (mongodb) indexes ready".to_owned(),
        backend => format!("document store ({backend}) ready"),
    };
    if json {
        println!(
            "{}",
            json!({"database_created": created, "applied": applied, "storage": storage_note, "documents": documents_note})
        );
    } else {
        if created {
            println!("created the database");
        }
        match applied.len() {
            0 => println!("schema up to date"),
            n => println!("applied {n} migration(s): {applied:?}"),
        }
        println!("{storage_note}");
        println!("{documents_note}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The outcome of one check.
struct Probe {
    name: &'static str,
    backend: String,
    result: Result<String, String>,
    elapsed: Duration,
}

async fn check(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let probes = vec![
        check_database(settings).await,
        check_storage(settings).await,
        check_queue(settings).await,
        check_documents(settings).await,
        check_push(settings).await,
    ];
    let healthy = probes.iter().all(|probe| probe.result.is_ok());
    if json {
        let checks: Vec<_> = probes
            .iter()
            .map(|probe| {
                json!({
                    "name": probe.name,
                    "backend": probe.backend,
                    "ok": probe.result.is_ok(),
                    "detail": match &probe.result { Ok(text) | Err(text) => text },
                    "ms": probe.elapsed.as_millis() as u64,
                })
            })
            .collect();
        println!("{}", json!({"ok": healthy, "checks": checks}));
    } else {
        for probe in &probes {
            let (mark, detail) = match &probe.result {
                Ok(text) => ("ok  ", text),
                Err(text) => ("FAIL", text),
            };
            println!("{mark} {:<9} {:<8} {detail} ({} ms)", probe.name, probe.backend, probe.elapsed.as_millis());
        }
    }
    Ok(if healthy { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn check_database(settings: &Settings) -> Probe {
    let started = Instant::now();
    let result = async {
        let pool = db::connect(settings).await.map_err(|err| err.to_string())?;
        let pending = db::MIGRATOR.iter().filter(|m| !m.migration_type.is_down_migration()).count();
        let applied: i64 =
            sqlx_count(&pool).await.map_err(|err| format!("schema not migrated ({err}); run `waveline migrate`"))?;
        let missing = pending as i64 - applied;
        if missing > 0 {
            return Err(format!("{missing} migration(s) not applied; run `waveline migrate`"));
        }
        Ok(format!("connected, schema at {applied} migration(s)"))
    }
    .await;
    Probe { name: "database", backend: "postgres".into(), result, elapsed: started.elapsed() }
}

async fn sqlx_count(pool: &sqlx::PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success").fetch_one(pool).await
}

async fn check_storage(settings: &Settings) -> Probe {
    let started = Instant::now();
    let mut backend = String::from("?");
    let result = async {
        let store = storage::open(&settings.storage).await.map_err(|err| err.to_string())?;
        backend = store.backend().to_owned();
        let key = ObjectKey::parse(format!("healthcheck/{}", uuid::Uuid::new_v4())).map_err(|err| err.to_string())?;
        let payload = bytes::Bytes::from_static(b"waveline check");
        let body = storage::byte_stream(futures::stream::iter([Ok(payload.clone())]));
        store.put(&key, "text/plain", body).await.map_err(|err| format!("write failed: {err}"))?;
        let read = store.get(&key, None).await.map_err(|err| format!("read failed: {err}"));
        let deleted = store.delete(&key).await.map_err(|err| format!("delete failed: {err}"));
        let mut read = read?;
        deleted?;
        let mut got = Vec::new();
        use futures::StreamExt;
        while let Some(chunk) = read.body.next().await {
            got.extend_from_slice(&chunk.map_err(|err| err.to_string())?);
        }
        if got != payload {
            return Err("read back different bytes than written".to_owned());
        }
        Ok("write, read and delete of a probe object".to_owned())
    }
    .await;
    Probe { name: "storage", backend, result, elapsed: started.elapsed() }
}

async fn check_queue(settings: &Settings) -> Probe {
    let started = Instant::now();
    let mut backend = String::from("?");
    let result = async {
        let jobs = tokio::time::timeout(Duration::from_secs(15), queue::open(settings))
            .await
            .map_err(|_| "no answer within 15 s".to_owned())?
            .map_err(|err| err.to_string())?;
        backend = jobs.backend().to_owned();
        let stats = jobs.stats().await.map_err(|err| err.to_string())?;
        Ok(format!("{} ready, {} dead, {} consumer(s)", stats.ready, stats.dead, stats.consumers))
    }
    .await;
    Probe { name: "queue", backend, result, elapsed: started.elapsed() }
}

async fn check_push(settings: &Settings) -> Probe {
    let started = Instant::now();
    let result = async {
        let Some(path) = &settings.fcm_credentials_file else {
            return Ok("off: no fcm_credentials_file".to_owned());
        };
        let fcm = waveline_workers::fcm::Fcm::load(path, &settings.fcm_base_url).map_err(|err| err.to_string())?;
        tokio::time::timeout(Duration::from_secs(15), fcm.access_token())
            .await
            .map_err(|_| "the token endpoint did not answer within 15 s".to_owned())?
            .map_err(|err| err.to_string())?;
        Ok(format!("an access token for project {}", fcm.project_id()))
    }
    .await;
    Probe { name: "push", backend: "fcm".into(), result, elapsed: started.elapsed() }
}

async fn check_documents(settings: &Settings) -> Probe {
    let started = Instant::now();
    let mut backend = String::from("?");
    let result = async {
        let pool = db::connect(settings).await.map_err(|err| format!("the database it needs: {err}"))?;
        let store = documents::open(settings, &pool).await.map_err(|err| err.to_string())?;
        backend = store.backend().to_owned();
        let probe = async {
            store.ping().await?;
            // A read through the comments' index: proves the tables or collections answer.
            store.count_comments(waveline_shared::domain::TrackId::new()).await
        };
        tokio::time::timeout(Duration::from_secs(15), probe)
            .await
            .map_err(|_| "no answer within 15 s".to_owned())?
            .map_err(|err| err.to_string())?;
        Ok("ping and a comment count".to_owned())
    }
    .await;
    Probe { name: "documents", backend, result, elapsed: started.elapsed() }
}
