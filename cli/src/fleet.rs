//! The worker and the operator commands: `worker`, `import`, `tracks`, `reprocess`, `jobs`.
//! Every command reads the same configuration; `--json` prints one machine-readable document.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use waveline_pipeline::{PipelineConfig, ThreadBudget};
use waveline_shared::config::{PipelinePriority, Settings};
use waveline_shared::db::{self, PgOutbox, PgTracks, SYSTEM_USER, TrackFilter, TrackRow};
use waveline_shared::domain::{TrackId, TrackState};
use waveline_shared::foreground::Foreground;
use waveline_shared::queue::{self, JobQueue};
use waveline_shared::storage::{self, Storage};
use waveline_workers::fcm::Fcm;
use waveline_workers::{Context, HeldClaims, WorkerOptions};

/// The pieces every fleet command connects to.
pub struct Services {
    pub tracks: PgTracks,
    pub outbox: PgOutbox,
    pub storage: Arc<dyn Storage>,
    pub queue: Arc<dyn JobQueue>,
    /// Comments and activities.
    pub documents: Arc<dyn waveline_shared::documents::Documents>,
    /// Live events to every API process (follows the queue: in-process or RabbitMQ).
    pub bus: Arc<dyn waveline_shared::bus::EventBus>,
}

impl Services {
    pub async fn connect(settings: &Settings) -> anyhow::Result<Services> {
        let pool = db::connect(settings).await.context("cannot connect to PostgreSQL")?;
        let storage = storage::open(&settings.storage).await.context("cannot open the storage")?;
        let queue = queue::open(settings).await.context("cannot connect to the queue")?;
        let documents = waveline_shared::documents::open(settings, &pool)
            .await
            .context("the document store settings are not usable")?;
        let bus = waveline_shared::bus::open(settings).await.context("cannot connect to the event bus")?;
        Ok(Services {
            tracks: PgTracks::new(pool.clone()),
            outbox: PgOutbox::new(pool),
            storage,
            queue,
            documents,
            bus,
        })
    }
}

/// Where a worker's jobs run, which decides the defaults of the pipeline's scheduling.
#[derive(Debug, Clone)]
pub enum WorkerRole {
    /// In `waveline serve`, beside the API, whose requests mark the [`Foreground`]: the
    /// pipeline yields to it.
    Embedded(Arc<Foreground>),
    /// A `waveline worker` process, whose purpose is the pipeline.
    Dedicated,
}

/// The share of the pipeline's time it keeps while the API is busy, unless set.
pub const DEFAULT_SHARE_UNDER_LOAD: f64 = 0.25;

/// The pipeline's priority and thread budget: the settings, else the role's defaults (the
/// embedded mode keeps playback first; see the README's "Playback while transcoding").
pub fn pipeline_scheduling(settings: &Settings, role: &WorkerRole) -> (PipelinePriority, ThreadBudget) {
    let cores = waveline_pipeline::budget::cores();
    let (priority, threads) = match role {
        WorkerRole::Embedded(_) => (PipelinePriority::Low, cores.saturating_sub(1).max(1)),
        WorkerRole::Dedicated => (PipelinePriority::Normal, cores),
    };
    let threads = settings.pipeline_threads.map_or(threads, |threads| threads as usize);
    let budget = match role {
        WorkerRole::Embedded(foreground) => {
            let foreground = foreground.clone();
            let share = settings.pipeline_share_under_load.unwrap_or(DEFAULT_SHARE_UNDER_LOAD);
            ThreadBudget::yielding(threads, share, Arc::new(move || foreground.busy()))
        }
        WorkerRole::Dedicated => ThreadBudget::new(threads),
    };
    (settings.pipeline_priority.unwrap_or(priority), budget)
}

/// The FCM client when pushes are on (`fcm_credentials_file`), its key file read and checked
/// now so that a bad one stops the start; says once in the log whether pushes are on.
pub fn push_client(settings: &Settings) -> anyhow::Result<Option<Arc<Fcm>>> {
    let Some(path) = &settings.fcm_credentials_file else {
        tracing::info!("push notifications are off: no fcm_credentials_file is set");
        return Ok(None);
    };
    let fcm = Fcm::load(path, &settings.fcm_base_url)
        .map_err(|err| anyhow::anyhow!("push notifications cannot be set up ({}): {err}", err.code()))?;
    tracing::info!(project = fcm.project_id(), "push notifications are on (FCM HTTP v1)");
    Ok(Some(Arc::new(fcm)))
}

/// Builds a worker's context from the settings; `push` from [`push_client`].
pub fn worker_context(
    settings: &Settings,
    services: &Services,
    role: WorkerRole,
    push: Option<Arc<Fcm>>,
) -> anyhow::Result<Arc<Context>> {
    let (pipeline_priority, pipeline_budget) = pipeline_scheduling(settings, &role);
    waveline_workers::pipeline_thread::check(pipeline_priority)?;
    tracing::info!(
        priority = ?pipeline_priority,
        threads = pipeline_budget.limit(),
        share_under_load = pipeline_budget.share(),
        "pipeline scheduling"
    );
    let pipeline = match &settings.presets {
        Some(path) => PipelineConfig::load(path).with_context(|| format!("presets file {}", path.display()))?,
        None => PipelineConfig::default(),
    };
    let temp_root = settings.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&temp_root).with_context(|| format!("cannot create {}", temp_root.display()))?;
    Ok(Arc::new(Context {
        tracks: services.tracks.clone(),
        outbox: services.outbox.clone(),
        storage: services.storage.clone(),
        documents: services.documents.clone(),
        bus: services.bus.clone(),
        pipeline: Arc::new(pipeline),
        temp_root,
        heartbeat_every: Duration::from_secs(1),
        claims: HeldClaims::default(),
        upload_quota: settings.free_quota,
        original_max_bytes: settings.upload_max_bytes,
        pipeline_timeout: settings.pipeline_timeout,
        pipeline_priority,
        pipeline_budget,
        devices: db::PgDevices::new(services.tracks.pool().clone()),
        push,
    }))
}

pub fn worker_options(settings: &Settings, concurrency: u16) -> WorkerOptions {
    WorkerOptions {
        concurrency,
        grace: settings.shutdown_grace,
        reconcile_every: settings.reconcile_interval,
        queued_stale: settings.queued_stale,
        heartbeat_stale: settings.heartbeat_stale,
        max_attempts: settings.job_max_attempts,
        relay_every: Duration::from_millis(500),
    }
}

/// The charts of this process; `role` names it in `chart_runs`.
pub fn charts(settings: &Settings, pool: &sqlx::PgPool, role: &str) -> Arc<waveline_shared::charts::Charts> {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    Arc::new(waveline_shared::charts::Charts::new(
        pool.clone(),
        settings.chart_scores,
        settings.charts_interval,
        format!("{role} {host} pid {}", std::process::id()),
    ))
}

/// `waveline charts rebuild`.
pub async fn charts_rebuild(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let pool = db::connect(settings).await.context("cannot connect to PostgreSQL")?;
    let charts = charts(settings, &pool, "cli");
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(waveline_shared::charts::Chart::ALL.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:40}] {pos}/{len} charts")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let progress = |done: usize, _total: usize| {
        if let Some(bar) = &bar {
            bar.set_position(done as u64);
        }
    };
    let run = charts.rebuild(&progress).await?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let duration_ms = run.duration.as_millis() as u64;
    if json {
        println!(
            "{}",
            json!({"tick": run.tick, "computed_at": run.computed_at, "duration_ms": duration_ms, "entries": run.entries})
        );
    } else {
        println!("charts computed in {duration_ms} ms: {} entries", run.entries);
    }
    Ok(ExitCode::SUCCESS)
}

/// `waveline worker`.
pub async fn worker(
    settings: &Settings,
    concurrency: u16,
    metrics_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    if let Some(addr) = metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let push = push_client(settings)?;
    let services = Services::connect(settings).await?;
    let context = worker_context(settings, &services, WorkerRole::Dedicated, push)?;
    let shutdown = cancel_on_stop_signal("finishing the jobs in hand");
    let pool = services.tracks.pool().clone();
    let schedule = waveline_shared::charts::spawn_schedule(
        charts(settings, &pool, "worker"),
        db::plays::PgPlays::new(pool),
        settings.play_dedup,
        shutdown.clone(),
    );
    waveline_workers::run(context, services.queue, worker_options(settings, concurrency), shutdown.clone()).await?;
    shutdown.cancel();
    let _ = schedule.await;
    tracing::info!("worker stopped");
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled by the first SIGTERM or SIGINT, logging what stopping means here.
fn cancel_on_stop_signal(what_now: &'static str) -> CancellationToken {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        tracing::info!("stop signal received: {what_now}");
        signals.cancel();
    });
    shutdown
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// `waveline serve [--workers N]`.
pub async fn serve(settings: &Settings, workers: u16) -> anyhow::Result<ExitCode> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot set up the metrics registry")?;
    let push = push_client(settings)?;
    let services = Services::connect(settings).await?;
    let shutdown = cancel_on_stop_signal("draining requests and jobs");
    let foreground = Arc::new(Foreground::default());
    let worker = if workers > 0 {
        let context = worker_context(settings, &services, WorkerRole::Embedded(foreground.clone()), push)?;
        let (queue, options, stop) = (services.queue.clone(), worker_options(settings, workers), shutdown.clone());
        Some(tokio::spawn(async move { waveline_workers::run(context, queue, options, stop).await }))
    } else {
        if services.queue.backend() == "memory" {
            tracing::warn!(
                "the in-process queue with no in-process workers: nothing will process uploads (use --workers N)"
            );
        }
        None
    };
    let secret = match &settings.jwt_secret {
        Some(secret) => secret.clone(),
        None => {
            tracing::warn!(
                "no jwt_secret configured (WAVELINE_JWT_SECRET): using a random key, so sessions end when this \
                 process does and other replicas will not accept its tokens"
            );
            waveline_api::auth::Tokens::random_secret()
        }
    };
    let pool = services.tracks.pool().clone();
    // Listeners read through the stream cache; the in-process workers write to the store itself.
    let served = match settings.stream_cache() {
        Some((dir, max_bytes)) => {
            let cache = storage::CacheSettings {
                dir: dir.to_path_buf(),
                max_bytes,
                cacheable: storage::renditions_only,
                origin: serde_json::to_string(&settings.storage)?,
            };
            let cached = storage::CachedStorage::open(services.storage.clone(), cache)
                .await
                .with_context(|| format!("cannot open the stream cache in {}", dir.display()))?;
            tracing::info!(slot = %cached.slot().display(), max_bytes, "renditions are cached on local disk");
            Arc::new(cached) as Arc<dyn Storage>
        }
        None => services.storage.clone(),
    };
    let status_feed = waveline_api::status_feed::StatusFeed::start(pool.clone());
    let playables = Arc::new(waveline_api::media::PlayableCache::default());
    status_feed.keep_current(playables.clone());
    let state = waveline_api::AppState {
        tracks: services.tracks.clone(),
        users: db::PgUsers::new(pool.clone()),
        outbox: services.outbox.clone(),
        storage: served,
        queue: services.queue.clone(),
        documents: services.documents.clone(),
        social: db::social::PgSocial::new(pool.clone()),
        social_writes: Arc::new(waveline_api::social::WriteLimit::new(settings.social_writes_per_minute)),
        realtime: waveline_api::realtime::Realtime::new(
            services.bus.clone(),
            db::realtime::PgRealtime::new(pool.clone()),
        ),
        tokens: Arc::new(waveline_api::auth::Tokens::new(
            &secret,
            &settings.jwt_previous_secrets,
            settings.access_token_ttl,
        )),
        limits: waveline_api::Limits {
            upload_max_bytes: settings.upload_max_bytes,
            upload_url_ttl: settings.upload_url_ttl,
        },
        security: Arc::new(waveline_api::SecuritySettings::from_settings(settings)),
        status_feed,
        playables,
        delivery: Arc::new(waveline_api::redirect::StreamDelivery::from_settings(settings)),
        uploads_in_flight: waveline_api::upload_slots(settings.uploads_per_account),
        metrics: Arc::new(move || metrics.render()),
        mailer: waveline_api::mail::Mailer::from_settings(settings, db::PgUsers::new(pool.clone()))
            .context("the mail settings are not usable")?,
        devices: db::PgDevices::new(pool.clone()),
        push: waveline_shared::push::Push::from_settings(settings),
        plays: Arc::new(waveline_api::plays::PlayCounter::new(
            db::plays::PgPlays::new(pool.clone()),
            settings.play_dedup,
            settings.plays_flush,
        )),
        charts: charts(settings, &pool, "serve"),
        billing: Arc::new(
            waveline_api::billing::Billing::from_settings(settings, pool.clone())
                .context("the billing settings are not usable")?,
        ),
        foreground,
    };
    let listener = waveline_api::listener::Listener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?
        .with_limits(waveline_api::listener::ConnectionLimits {
            max_connections: settings.max_connections,
            max_connections_per_client: settings.max_connections_per_client,
            trusted_proxies: settings.trusted_proxies.clone(),
            ..Default::default()
        });
    waveline_api::realtime::Realtime::start(&state, shutdown.clone());
    // Plays are written until the listener has drained, then once more.
    let plays_stop = tokio_util::sync::CancellationToken::new();
    let plays = waveline_api::plays::PlayCounter::start(&state, plays_stop.clone());
    let schedule = waveline_shared::charts::spawn_schedule(
        state.charts.clone(),
        db::plays::PgPlays::new(pool.clone()),
        settings.play_dedup,
        shutdown.clone(),
    );
    tracing::info!(listen = %settings.listen, workers, stream_mode = ?settings.stream_mode, "serving the API");
    let served = listener
        .serve(waveline_api::app(state), shutdown.clone(), Duration::from_secs(10))
        .await
        .with_context(|| format!("cannot serve on {}", settings.listen));
    shutdown.cancel();
    plays_stop.cancel();
    if plays.await.is_err() {
        tracing::warn!("the play writer stopped abnormally");
    }
    let _ = schedule.await;
    if let Some(worker) = worker {
        worker.await.context("the in-process worker panicked")??;
    }
    served?;
    Ok(ExitCode::SUCCESS)
}

/// `waveline users promote|demote`.
pub async fn set_role(settings: &Settings, username: &str, role: db::Role, json: bool) -> anyhow::Result<ExitCode> {
    let pool = db::connect(settings).await.context("cannot connect to PostgreSQL")?;
    let users = db::PgUsers::new(pool);
    let user = users.by_username(username).await?.with_context(|| format!("no user named {username}"))?;
    if !users.set_role(user.id, role).await? {
        bail!("{username} is a system account; its role cannot change");
    }
    if json {
        println!("{}", json!({"id": user.id, "username": username, "role": role}));
    } else {
        println!("{username} is now {}", role.as_str());
    }
    Ok(ExitCode::SUCCESS)
}

/// `waveline import`.
pub async fn import(
    settings: &Settings,
    files: &[PathBuf],
    owner: Option<&str>,
    title: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let services = Services::connect(settings).await?;
    let owner_id = match owner {
        Some(username) => {
            let users = db::PgUsers::new(services.tracks.pool().clone());
            users.by_username(username).await?.with_context(|| format!("no user named {username}"))?.id
        }
        None => SYSTEM_USER,
    };
    let mut imported = Vec::new();
    let mut failed = false;
    for file in files {
        match import_one(&services, settings, file, owner_id, title).await {
            Ok(track) => {
                if !json {
                    println!("{}  {}  {}", track.id, track.state, file.display());
                }
                imported.push(json!({"id": track.id, "file": file, "state": track.state}));
            }
            Err(err) => {
                failed = true;
                eprintln!("waveline import: {}: {err:#}", file.display());
                imported.push(json!({"id": null, "file": file, "state": null, "error": format!("{err:#}")}));
            }
        }
    }
    // The in-process queue belongs to the serving process; its relay publishes these rows.
    if services.queue.backend() != "memory" {
        let relayed = waveline_workers::relay::publish(&services.outbox, services.queue.as_ref(), 1000).await?;
        tracing::debug!(relayed, "published the import jobs");
    }
    if json {
        println!("{}", json!({"tracks": imported}));
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// One file through the API's upload path ([`waveline_api::upload_local`]): sniffed, bounded,
/// counted against the owner's quota, its title validated, and its row and job written in
/// one transaction once the original is stored.
async fn import_one(
    services: &Services,
    settings: &Settings,
    file: &Path,
    owner: waveline_shared::domain::UserId,
    title: Option<&str>,
) -> anyhow::Result<TrackRow> {
    let limits = waveline_api::LocalUploadLimits { max_bytes: settings.upload_max_bytes, quota: settings.free_quota };
    let track = waveline_api::upload_local(&services.tracks, services.storage.as_ref(), limits, owner, title, file)
        .await
        .map_err(|err| anyhow::anyhow!("{}: {}", err.code, err.message))?;
    services.tracks.get(track.id).await?.context("the track vanished")
}

/// The API's view of a track (`GET /v1/tracks/{id}` as an anonymous listener gets it: its
/// counts, its artwork, its access), as JSON.
async fn track_view(
    tracks: &PgTracks,
    documents: &dyn waveline_shared::documents::Documents,
    id: TrackId,
) -> anyhow::Result<Option<Value>> {
    let Some(details) = tracks.details(id).await? else {
        return Ok(None);
    };
    let social = db::social::PgSocial::new(tracks.pool().clone());
    let images = db::images::PgImages::new(tracks.pool().clone());
    let views = waveline_api::social::track_views_from(&social, documents, &images, vec![details], None)
        .await
        .map_err(|err| anyhow::anyhow!("{}: {}", err.code, err.message))?;
    Ok(views.first().map(waveline_api::TrackView::to_json))
}

/// `waveline tracks list`.
pub async fn tracks_list(
    settings: &Settings,
    states: &[TrackState],
    limit: i64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let pool = db::connect(settings).await?;
    let documents = waveline_shared::documents::open(settings, &pool).await?;
    let tracks = PgTracks::new(pool);
    let rows =
        tracks.list(&TrackFilter { states: states.to_vec(), limit: Some(limit), ..TrackFilter::default() }).await?;
    if json {
        let mut list = Vec::with_capacity(rows.len());
        for track in &rows {
            // A track deleted since the listing is left out.
            list.extend(track_view(&tracks, documents.as_ref(), track.id).await?);
        }
        println!("{}", json!({"tracks": list}));
    } else {
        for track in &rows {
            let error = track.error_code.as_deref().map(|code| format!("  [{code}]")).unwrap_or_default();
            println!(
                "{}  {:<10} r{} a{}  {}{error}",
                track.id, track.state, track.revision, track.attempts, track.title
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `waveline tracks show`.
pub async fn tracks_show(settings: &Settings, id: TrackId, json: bool) -> anyhow::Result<ExitCode> {
    let pool = db::connect(settings).await?;
    let documents = waveline_shared::documents::open(settings, &pool).await?;
    let tracks = PgTracks::new(pool);
    let Some(shown) = track_view(&tracks, documents.as_ref(), id).await? else {
        if json {
            println!("{}", json!({"error": {"code": "not_found", "message": format!("no track {id}")}}));
        }
        eprintln!("waveline tracks show: no track {id}");
        return Ok(ExitCode::from(2));
    };
    if json {
        println!("{shown}");
    } else {
        println!("{}", serde_json::to_string_pretty(&shown)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `waveline reprocess`.
pub async fn reprocess(
    settings: &Settings,
    filter: TrackFilter,
    rate: Option<f64>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if filter.states.iter().any(|s| !matches!(s, TrackState::Ready | TrackState::Failed | TrackState::Uploaded)) {
        bail!("only ready, failed and uploaded tracks can be reprocessed");
    }
    let services = Services::connect(settings).await?;
    let mut filter = filter;
    if filter.states.is_empty() {
        filter.states = vec![TrackState::Ready, TrackState::Failed];
    }
    let matched = services.tracks.list(&filter).await?;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(matched.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:40}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    });
    let pause = rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r));
    let (mut enqueued, mut skipped) = (0u64, 0u64);
    for track in &matched {
        let done = if dry_run {
            matches!(track.state, TrackState::Ready | TrackState::Failed | TrackState::Uploaded)
        } else {
            services.tracks.enqueue(track.id, track.state).await?
        };
        if done {
            enqueued += 1
        } else {
            skipped += 1
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if !dry_run && services.queue.backend() != "memory" {
        waveline_workers::relay::publish(&services.outbox, services.queue.as_ref(), 10_000).await?;
    }
    let summary = json!({"matched": matched.len(), "enqueued": enqueued, "skipped": skipped, "dry_run": dry_run});
    if json {
        println!("{summary}");
    } else {
        println!(
            "matched {}, {} {enqueued}, skipped {skipped}",
            matched.len(),
            if dry_run { "would enqueue" } else { "enqueued" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `waveline jobs stats`.
pub async fn jobs_stats(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let services = Services::connect(settings).await?;
    let stats = services.queue.stats().await?;
    let states = services.tracks.count_by_state().await?;
    let pending = services.outbox.pending().await?;
    let by_state: serde_json::Map<String, Value> =
        states.iter().map(|(s, n)| (s.as_str().to_owned(), json!(n))).collect();
    if json {
        println!(
            "{}",
            json!({"queue": {"backend": services.queue.backend(), "ready": stats.ready, "consumers": stats.consumers, "dead": stats.dead},
                   "outbox_pending": pending, "tracks": by_state})
        );
    } else {
        println!(
            "queue ({}): {} ready, {} consumer(s), {} dead",
            services.queue.backend(),
            stats.ready,
            stats.consumers,
            stats.dead
        );
        println!("outbox: {pending} unsent");
        for (state, count) in states {
            println!("  {:<16} {count}", state.as_str());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `waveline jobs dead`.
pub async fn jobs_dead(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let services = Services::connect(settings).await?;
    let dead = services.queue.dead_letters(10_000).await?;
    if json {
        println!("{}", json!({"dead": dead}));
    } else {
        for letter in &dead {
            let job = letter.job.as_ref().map(|message| &message.job);
            let about = match (job.and_then(|j| j.track_id()), job.and_then(|j| j.user_id())) {
                (Some(track), _) => format!("track {track}"),
                (None, Some(user)) => format!("user {user}"),
                (None, None) => "-".to_owned(),
            };
            let kind = job.map_or("?", |j| j.kind());
            println!("{}  {}  {kind}  {about}  {}", letter.id, letter.code, letter.reason);
        }
        println!("{} dead letter(s)", dead.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// `waveline jobs replay`.
pub async fn jobs_replay(settings: &Settings, ids: &[uuid::Uuid], all: bool, json: bool) -> anyhow::Result<ExitCode> {
    if all != ids.is_empty() {
        bail!("give either --all or one or more dead-letter ids");
    }
    let services = Services::connect(settings).await?;
    // A dead-lettered track is `failed`, and so is a dead-lettered image version; replaying
    // the job must find it queued (pending) again.
    let dead = services.queue.dead_letters(10_000).await?;
    let images = db::images::PgImages::new(services.tracks.pool().clone());
    for letter in dead.iter().filter(|l| all || ids.contains(&l.id)) {
        let Some(job) = letter.job.as_ref().map(|message| &message.job) else { continue };
        if let Some(id) = job.track_id()
            && let Some(track) = services.tracks.get(id).await?
            && track.state == TrackState::Failed
        {
            services.tracks.transition(id, TrackState::Failed, TrackState::Queued, None).await?;
        }
        if let waveline_shared::job::Job::ProcessImage { subject, subject_id, version } = job {
            images.retry_exhausted(*subject, *subject_id, version).await?;
        }
    }
    let report = services.queue.replay_dead(if all { None } else { Some(ids) }).await?;
    if json {
        println!("{}", json!(report));
    } else {
        println!("replayed {}, left {} unreadable", report.replayed, report.unreadable);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Settings {
        let env: BTreeMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Settings::from_sources(None, &env).expect("valid settings")
    }

    #[test]
    fn the_embedded_pipeline_yields_and_a_dedicated_worker_does_not_unless_told() {
        let cores = waveline_pipeline::budget::cores();
        let embedded = WorkerRole::Embedded(Arc::default());
        let (priority, budget) = pipeline_scheduling(&settings(&[]), &embedded);
        assert_eq!((priority, budget.limit()), (PipelinePriority::Low, cores.saturating_sub(1).max(1)));
        assert_eq!(budget.share(), DEFAULT_SHARE_UNDER_LOAD);
        let (priority, budget) = pipeline_scheduling(&settings(&[]), &WorkerRole::Dedicated);
        assert_eq!((priority, budget.limit(), budget.share()), (PipelinePriority::Normal, cores, 1.0));
        let told = settings(&[
            ("WAVELINE_PIPELINE_PRIORITY", "low"),
            ("WAVELINE_PIPELINE_THREADS", "3"),
            ("WAVELINE_PIPELINE_SHARE_UNDER_LOAD", "0.5"),
        ]);
        let (priority, budget) = pipeline_scheduling(&told, &embedded);
        assert_eq!((priority, budget.limit(), budget.share()), (PipelinePriority::Low, 3, 0.5));
        // A dedicated worker has no API in its process to yield to.
        let (priority, budget) = pipeline_scheduling(&told, &WorkerRole::Dedicated);
        assert_eq!((priority, budget.limit(), budget.share()), (PipelinePriority::Low, 3, 1.0));
    }

    #[test]
    fn the_embedded_pipeline_yields_only_while_the_api_is_busy() {
        let foreground = Arc::new(Foreground::default());
        let (_, budget) = pipeline_scheduling(&settings(&[]), &WorkerRole::Embedded(foreground.clone()));
        let spend = |budget: &ThreadBudget, wall: Duration| {
            let started = std::time::Instant::now();
            while started.elapsed() < wall {
                let _permit = budget.permit();
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        spend(&budget, Duration::from_millis(50));
        assert_eq!(budget.yielded(), Duration::ZERO, "yielded to an API that had no requests");
        while !foreground.busy() {
            foreground.mark();
        }
        spend(&budget, Duration::from_millis(50));
        assert!(budget.yielded() > Duration::ZERO, "never yielded to a busy API");
    }
}
