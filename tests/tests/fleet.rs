//! The worker fleet end to end: jobs through the real queue backends into real storage and
//! PostgreSQL, with the faults the design must survive: duplicates, poison, lost messages,
//! dead workers, bad media, and the worker binary killed mid-job.
//!
//! In-process cases run the worker loop itself (the embedded mode: `MemoryQueue` and
//! `FsStorage`); distributed cases run the real `waveline worker` and `waveline import`
//! binaries against RabbitMQ and the S3 server. The pipeline's scheduling priority is read
//! from `/proc` while a pass runs, in `waveline serve` and in `waveline worker`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use waveline_pipeline::PipelineConfig;
use waveline_shared::db::{NewTrack, PgOutbox, PgTracks, SYSTEM_USER, TrackRow, Visibility};
use waveline_shared::domain::{TrackId, TrackState, UserId};
use waveline_shared::job::{Job, JobMessage};
use waveline_shared::queue::{JobQueue, MemoryQueue, RetryPolicy};
use waveline_shared::storage::{
    FsStorage, ORIGINALS_PREFIX, ObjectKey, Storage, byte_stream, original_key, renditions_prefix, revision_prefix,
};
use waveline_tests::stack::{Mode, Stack, register_and_login, upload, wait_ready};
use waveline_tests::threads::{self, SCHED_OTHER, ThreadInfo};
use waveline_tests::{S3Server, TestDb, amqp_url, audio, s3_credentials, s3_endpoint, temp_dir, unique, waveline_bin};
use waveline_workers::{Context, HeldClaims, WorkerOptions};

/// An embedded fleet: one worker loop in this process.
struct Embedded {
    db: TestDb,
    tracks: PgTracks,
    storage: Arc<dyn Storage>,
    queue: Arc<MemoryQueue>,
    work: tempfile::TempDir,
    _objects: tempfile::TempDir,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

fn fast_options() -> WorkerOptions {
    WorkerOptions {
        concurrency: 2,
        grace: Duration::from_secs(5),
        reconcile_every: Duration::from_millis(300),
        queued_stale: Duration::from_secs(2),
        heartbeat_stale: Duration::from_secs(2),
        max_attempts: 3,
        relay_every: Duration::from_millis(100),
    }
}

impl Embedded {
    async fn start(options: WorkerOptions) -> Result<Embedded> {
        Embedded::start_with(options, |_| {}).await
    }

    /// Starts with the test context changed by `tweak` (limits, quota, timeouts).
    async fn start_with(options: WorkerOptions, tweak: impl FnOnce(&mut Context)) -> Result<Embedded> {
        let db = TestDb::new().await?;
        let objects = temp_dir()?;
        let work = temp_dir()?;
        let storage: Arc<dyn Storage> = Arc::new(FsStorage::open(objects.path()).await?);
        let policy = RetryPolicy {
            max_attempts: options.max_attempts,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let queue = Arc::new(MemoryQueue::new(policy));
        let tracks = PgTracks::new(db.pool.clone());
        let mut context = Context {
            tracks: tracks.clone(),
            outbox: PgOutbox::new(db.pool.clone()),
            storage: storage.clone(),
            documents: Arc::new(waveline_shared::documents::PgDocuments::new(db.pool.clone())),
            bus: Arc::new(waveline_shared::bus::MemoryBus::new()),
            pipeline: Arc::new(PipelineConfig::default()),
            temp_root: work.path().to_path_buf(),
            heartbeat_every: Duration::from_millis(300),
            claims: HeldClaims::default(),
            upload_quota: Duration::from_secs(3 * 3600),
            original_max_bytes: 4 << 30,
            pipeline_timeout: Duration::from_secs(600),
            pipeline_priority: waveline_shared::config::PipelinePriority::Normal,
            pipeline_budget: waveline_pipeline::ThreadBudget::all_cores(),
            devices: waveline_shared::db::PgDevices::new(db.pool.clone()),
            push: None,
        };
        tweak(&mut context);
        let context = Arc::new(context);
        let stop = CancellationToken::new();
        let worker = {
            let (queue, stop) = (queue.clone() as Arc<dyn JobQueue>, stop.clone());
            tokio::spawn(async move {
                if let Err(err) = waveline_workers::run(context, queue, options, stop).await {
                    eprintln!("worker ended: {err}");
                }
            })
        };
        Ok(Embedded { db, tracks, storage, queue, work, _objects: objects, stop, worker })
    }

    /// Stores `file` as a new track's original and leaves it `uploaded`.
    async fn upload(&self, file: &Path) -> Result<TrackId> {
        self.upload_as(SYSTEM_USER, file).await
    }

    /// [`Embedded::upload`] for a track of `owner`.
    async fn upload_as(&self, owner: UserId, file: &Path) -> Result<TrackId> {
        let track = self.tracks.create(owner, "test track", TrackState::AwaitingUpload, None).await?;
        let key = original_key(track.id);
        let bytes = std::fs::read(file)?;
        let size = bytes.len() as i64;
        self.storage
            .put(&key, "application/octet-stream", byte_stream(futures::stream::iter([Ok(bytes.into())])))
            .await?;
        ensure!(self.tracks.mark_uploaded(track.id, key.as_str(), size).await?);
        Ok(track.id)
    }

    async fn stop(self) -> Result<()> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.worker).await??;
        let left: Vec<_> = std::fs::read_dir(self.work.path())?.collect();
        ensure!(left.is_empty(), "temp files left behind: {left:?}");
        drop(self.db);
        Ok(())
    }
}

/// A new ordinary account (one the upload quota applies to).
async fn create_user(tracks: &PgTracks, name: &str) -> Result<UserId> {
    let id = UserId::new();
    sqlx::query("INSERT INTO users (id, email, username) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(format!("{name}@example.com"))
        .bind(name)
        .execute(tracks.pool())
        .await?;
    Ok(id)
}

async fn wait_for(tracks: &PgTracks, id: TrackId, want: TrackState, within: Duration) -> Result<TrackRow> {
    let deadline = Instant::now() + within;
    loop {
        let track = tracks.get(id).await?.context("the track vanished")?;
        if track.state == want {
            return Ok(track);
        }
        if Instant::now() > deadline {
            bail!("track stayed {} (wanted {want}): {track:?}", track.state);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fixture(dir: &Path, name: &str, secs: f64) -> Result<PathBuf> {
    let path = dir.join(name);
    audio::tone(&path, secs, 44100, 2, &[])?;
    Ok(path)
}

/// How many of `ids` are not ready yet.
async fn not_ready(tracks: &PgTracks, ids: &[TrackId]) -> Result<usize> {
    let mut left = 0;
    for id in ids {
        if tracks.get(*id).await?.context("the track vanished")?.state != TrackState::Ready {
            left += 1;
        }
    }
    Ok(left)
}

/// Every object key under `prefix`.
async fn keys(storage: &dyn Storage, prefix: &str) -> Result<Vec<String>> {
    Ok(storage.list_prefix(prefix).await?.into_iter().map(|o| o.key.to_string()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploaded_track_becomes_ready_with_every_rendition_stored() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.flac", 6.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Ready, Duration::from_secs(60)).await?;
    ensure!(track.attempts == 1 && track.revision == 1 && track.progress == 100, "{track:?}");
    let renditions = fleet.tracks.renditions(id).await?;
    let presets: Vec<&str> = renditions.iter().map(|r| r.preset.as_str()).collect();
    ensure!(presets == ["aac_hls", "mp3_128", "opus_64", "preview"], "{presets:?}");
    for rendition in &renditions {
        ensure!(
            rendition.storage_key.starts_with(&format!("{}{}/", revision_prefix(id, 1), rendition.preset)),
            "{rendition:?}"
        );
        for key in &rendition.storage_keys {
            let head = fleet.storage.head(&ObjectKey::parse(key.clone())?).await?;
            ensure!(head.size > 0, "{key} is empty");
        }
        ensure!((5900..=6100).contains(&rendition.duration_ms), "{rendition:?}");
    }
    let hls = renditions.iter().find(|r| r.kind == "hls").context("hls")?;
    ensure!(hls.storage_keys.iter().filter(|k| k.ends_with(".m4s")).count() >= 3, "{hls:?}");
    let stored = keys(fleet.storage.as_ref(), &format!("{}waveform/", revision_prefix(id, 1))).await?;
    ensure!(stored.iter().any(|k| k.ends_with("waveform.json")) && stored.len() == 3, "{stored:?}");
    // The original stays.
    ensure!(fleet.storage.head(&original_key(id)).await.is_ok());
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_message_is_processed_once() -> Result<()> {
    let fleet = Embedded::start(WorkerOptions { concurrency: 1, ..fast_options() }).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 4.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    // The same job, published twice more behind the outbox's own message.
    let duplicate = JobMessage::new(Job::ProcessTrack { track_id: id });
    fleet.queue.publish(&duplicate).await?;
    fleet.queue.publish(&duplicate).await?;
    let track = wait_for(&fleet.tracks, id, TrackState::Ready, Duration::from_secs(60)).await?;
    // A marker track queued behind the duplicates: one job at a time, first in first out, so
    // once it is ready both duplicates were delivered and settled.
    let marker = fleet.upload(&fixture(dir.path(), "marker.wav", 1.0)?).await?;
    ensure!(fleet.tracks.enqueue(marker, TrackState::Uploaded).await?);
    wait_for(&fleet.tracks, marker, TrackState::Ready, Duration::from_secs(60)).await?;
    ensure!(fleet.queue.stats().await?.ready == 0, "jobs still waiting after the marker");
    let after = fleet.tracks.get(id).await?.context("track")?;
    ensure!(after.state == TrackState::Ready && after.attempts == 1 && after.revision == 1, "{track:?} → {after:?}");
    let revisions = keys(fleet.storage.as_ref(), &renditions_prefix(id)).await?;
    ensure!(revisions.iter().all(|k| k.starts_with(&revision_prefix(id, 1))), "{revisions:?}");
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_media_fails_at_once_and_keeps_the_original() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let dir = temp_dir()?;
    let text = dir.path().join("notes.mp3");
    std::fs::write(&text, "this is not audio\n".repeat(100))?;
    let id = fleet.upload(&text).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(30)).await?;
    ensure!(track.error_code.as_deref() == Some("unsupported_format") && track.attempts == 1, "{track:?}");
    ensure!(track.error_message.as_deref().is_some_and(|m| !m.is_empty()));
    ensure!(fleet.storage.head(&original_key(id)).await.is_ok());
    ensure!(keys(fleet.storage.as_ref(), &renditions_prefix(id)).await?.is_empty());
    ensure!(fleet.queue.stats().await?.dead == 0, "a permanent failure is not a dead letter");
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_over_the_upload_limit_fails_the_track_unread() -> Result<()> {
    let fleet = Embedded::start_with(fast_options(), |context| context.original_max_bytes = 64 * 1024).await?;
    let dir = temp_dir()?;
    // Three seconds of 44.1 kHz stereo: about 530 KB, far over the 64 KiB limit.
    let id = fleet.upload(&fixture(dir.path(), "long.wav", 3.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(30)).await?;
    ensure!(track.error_code.as_deref() == Some("too_large") && track.attempts == 1, "{track:?}");
    ensure!(keys(fleet.storage.as_ref(), &renditions_prefix(id)).await?.is_empty());
    ensure!(fleet.queue.stats().await?.dead == 0, "a permanent failure is not a dead letter");
    // `stop` checks that no temp file is left behind.
    fleet.stop().await
}

/// Six tracks of `song` (3 s) against a 5 s quota, all processed at once: one fits, however
/// the jobs interleave.
async fn concurrent_jobs_never_admit_more_than_the_quota(song: &Path) -> Result<()> {
    let options = WorkerOptions { concurrency: 6, ..fast_options() };
    let fleet = Embedded::start_with(options, |context| context.upload_quota = Duration::from_secs(5)).await?;
    let owner = create_user(&fleet.tracks, "quota_racer").await?;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(fleet.upload_as(owner, song).await?);
    }
    for id in &ids {
        ensure!(fleet.tracks.enqueue(*id, TrackState::Uploaded).await?);
    }
    let mut admitted_ms = 0;
    let mut ready = 0;
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(120);
        let track = loop {
            let track = fleet.tracks.get(*id).await?.context("track")?;
            if matches!(track.state, TrackState::Ready | TrackState::Failed) {
                break track;
            }
            ensure!(Instant::now() < deadline, "track stayed {}: {track:?}", track.state);
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if track.state == TrackState::Ready {
            ready += 1;
            let details = fleet.tracks.details(*id).await?.context("details")?;
            admitted_ms += details.duration_ms.context("a ready track has a duration")?;
        } else {
            ensure!(track.error_code.as_deref() == Some("quota_exceeded"), "{track:?}");
        }
    }
    ensure!(admitted_ms <= 5000 && ready == 1, "{ready} tracks ready, {admitted_ms} ms admitted past a 5 s quota");
    let (_, used_ms) = fleet.tracks.quota_usage(owner, None).await?;
    ensure!(used_ms == admitted_ms, "the quota counts {used_ms} ms, the ready tracks hold {admitted_ms} ms");
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_never_admit_more_than_the_quota_by_declared_duration() -> Result<()> {
    let dir = temp_dir()?;
    concurrent_jobs_never_admit_more_than_the_quota(&fixture(dir.path(), "song.wav", 3.0)?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_jobs_never_admit_more_than_the_quota_without_a_declared_duration() -> Result<()> {
    // A streamed WAV: its data chunk's size is 0xFFFFFFFF ("until the end"), so the file
    // declares no duration and only the decoded one can be admitted.
    let dir = temp_dir()?;
    let path = dir.path().join("streamed.wav");
    audio::write_wav(&path, 1, 2, 44100, 16, &audio::sine_s16(3 * 44100, 2, 44100, 0.5, 0))?;
    let mut bytes = std::fs::read(&path)?;
    bytes[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&path, bytes)?;
    concurrent_jobs_never_admit_more_than_the_quota(&path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_header_is_refused_by_the_guard_before_anything_else() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let owner = create_user(&fleet.tracks, "hostile").await?;
    let dir = temp_dir()?;
    // Mono 8-bit at 8 kHz declaring 4 GiB of samples: 149 hours, in a 1 KiB file (one byte
    // short of 0xFFFFFFFF, which means "size elsewhere"). The guard refuses it as too long
    // before any decoder opens it, and before the quota (3 h) is consulted on the duration
    // it claims.
    let mut bytes = audio::wav_header(1, 1, 8000, 8, u32::MAX - 1);
    bytes.resize(1024, 0x80);
    let path = dir.path().join("hostile.wav");
    std::fs::write(&path, bytes)?;
    let id = fleet.upload_as(owner, &path).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(30)).await?;
    ensure!(track.error_code.as_deref() == Some("too_long") && track.attempts == 1, "{track:?}");
    // A guard refusal is bad media: the original is kept.
    ensure!(fleet.storage.head(&original_key(id)).await.is_ok());
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_the_pipeline_timeout_fails_with_timeout() -> Result<()> {
    let fleet =
        Embedded::start_with(fast_options(), |context| context.pipeline_timeout = Duration::from_millis(1)).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 3.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(30)).await?;
    ensure!(track.error_code.as_deref() == Some("timeout") && track.attempts == 1, "{track:?}");
    ensure!(keys(fleet.storage.as_ref(), &renditions_prefix(id)).await?.is_empty());
    // `stop` checks that the cancelled run left no temp file.
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_past_the_pipeline_timeout_is_cancelled_and_fails_with_timeout() -> Result<()> {
    // Long enough to open the file, far too short to encode a minute of audio: the pass is
    // cancelled between two blocks.
    let fleet =
        Embedded::start_with(fast_options(), |context| context.pipeline_timeout = Duration::from_millis(700)).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "long.wav", 60.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let started = Instant::now();
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(60)).await?;
    ensure!(track.error_code.as_deref() == Some("timeout") && track.attempts == 1, "{track:?}");
    ensure!(started.elapsed() < Duration::from_secs(30), "the cancelled pass ran on for {:?}", started.elapsed());
    ensure!(keys(fleet.storage.as_ref(), &renditions_prefix(id)).await?.is_empty());
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_original_fails_the_track_at_once() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 1.0)?).await?;
    fleet.storage.delete(&original_key(id)).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(30)).await?;
    ensure!(track.error_code.as_deref() == Some("original_missing") && track.attempts == 1, "{track:?}");
    ensure!(fleet.queue.stats().await?.dead == 0, "a permanent failure is not a dead letter");
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_database_error_fails_the_track_at_once_with_a_safe_message() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    // The commit's rendition rows are refused: a database error no retry can help.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_renditions() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN RAISE EXCEPTION 'renditions refused by the test'; END $$;
         CREATE TRIGGER refuse_renditions BEFORE INSERT ON renditions
             FOR EACH ROW EXECUTE FUNCTION refuse_renditions();",
    )
    .execute(fleet.tracks.pool())
    .await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 1.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(60)).await?;
    ensure!(track.error_code.as_deref() == Some("internal") && track.attempts == 1, "{track:?}");
    let message = track.error_message.clone().unwrap_or_default();
    ensure!(!message.is_empty() && !message.contains("refused by the test"), "database text stored: {message}");
    ensure!(!message.contains("renditions") && !message.contains("SQL"), "database text stored: {message}");
    // The renditions the failed run had stored go with it (the worker removes them right after
    // it records the failure).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = keys(fleet.storage.as_ref(), &renditions_prefix(id)).await?;
        if left.is_empty() {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "renditions of the failed run left: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_failure_stores_no_temp_path() -> Result<()> {
    // The worker's temp root does not exist: every attempt fails before the pipeline.
    let missing = std::env::temp_dir().join(format!("waveline-missing-{}", unique())).join("deeper");
    let fleet = Embedded::start_with(fast_options(), move |context| context.temp_root = missing).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 1.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Failed, Duration::from_secs(60)).await?;
    ensure!(track.error_code.as_deref() == Some("retries_exhausted"), "{track:?}");
    let message = track.error_message.clone().unwrap_or_default();
    let temp = std::env::temp_dir();
    ensure!(!message.contains(&*temp.to_string_lossy()) && !message.contains("waveline-missing"), "{message}");
    ensure!(!message.contains("os error"), "an OS error was stored: {message}");
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_dead_lettered_and_the_worker_goes_on() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let dir = temp_dir()?;
    fleet.queue.publish_payload(b"{\"v\":7,\"kind\":\"process_track\"}".to_vec()).await?;
    fleet.queue.publish_payload(b"\x00garbage".to_vec()).await?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 3.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    wait_for(&fleet.tracks, id, TrackState::Ready, Duration::from_secs(60)).await?;
    let dead = fleet.queue.dead_letters(10).await?;
    let codes: Vec<&str> = dead.iter().map(|d| d.code.as_str()).collect();
    ensure!(codes.contains(&"unsupported_version") && codes.contains(&"not_json"), "{codes:?}");
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_message_is_found_by_the_reconciler() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 3.0)?).await?;
    // Queued with no message at all: the state change without its outbox row.
    ensure!(fleet.tracks.transition(id, TrackState::Uploaded, TrackState::Queued, None).await?);
    let track = wait_for(&fleet.tracks, id, TrackState::Ready, Duration::from_secs(60)).await?;
    ensure!(track.attempts == 1, "{track:?}");
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_direct_uploads_are_forgotten_with_their_bytes() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let direct = |expires_at| {
        let id = TrackId::new();
        let new = NewTrack {
            id,
            owner: SYSTEM_USER,
            title: "direct".into(),
            description: String::new(),
            genre: None,
            tags: Vec::new(),
            visibility: Visibility::Public,
            original_key: original_key(id).to_string(),
            premium_only: false,
        };
        let tracks = fleet.tracks.clone();
        async move { tracks.create_awaiting(&new, expires_at, None).await.map(|()| id) }
    };
    // Its URL expired two hours ago, and some bytes arrived: both go.
    let abandoned = direct(chrono::Utc::now() - chrono::Duration::hours(2)).await?;
    let key = waveline_shared::storage::upload_key(abandoned);
    fleet
        .storage
        .put(&key, "audio/wav", byte_stream(futures::stream::iter([Ok(bytes::Bytes::from_static(b"RIFF"))])))
        .await?;
    // Still within its URL's life (or the hour of grace after it): kept.
    let pending = direct(chrono::Utc::now() + chrono::Duration::minutes(30)).await?;
    let recent = direct(chrono::Utc::now() - chrono::Duration::minutes(10)).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.tracks.get(abandoned).await?.is_some() {
        ensure!(Instant::now() < deadline, "the abandoned upload is still there after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.storage.head(&key).await.is_ok() {
        ensure!(Instant::now() < deadline, "the abandoned upload's bytes are still stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for kept in [pending, recent] {
        ensure!(fleet.tracks.get(kept).await?.is_some(), "a live direct upload was swept");
    }
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_claim_is_taken_over_after_its_heartbeat_goes_stale() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.wav", 3.0)?).await?;
    ensure!(fleet.tracks.transition(id, TrackState::Uploaded, TrackState::Queued, None).await?);
    // A worker claims it and dies: no heartbeat follows.
    let ghost = fleet.tracks.claim(id).await?.context("claim")?;
    let track = wait_for(&fleet.tracks, id, TrackState::Ready, Duration::from_secs(60)).await?;
    ensure!(track.attempts == 2, "{track:?}");
    // The dead worker's late commit cannot land: its claim is fenced out.
    ensure!(!fleet.tracks.heartbeat(&ghost, waveline_shared::domain::ProcessingStage::Encoding, 50).await?);
    fleet.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprocessing_serves_the_old_revision_until_the_new_one_commits() -> Result<()> {
    let fleet = Embedded::start(fast_options()).await?;
    let dir = temp_dir()?;
    let id = fleet.upload(&fixture(dir.path(), "song.flac", 4.0)?).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Uploaded).await?);
    wait_for(&fleet.tracks, id, TrackState::Ready, Duration::from_secs(60)).await?;
    ensure!(fleet.tracks.enqueue(id, TrackState::Ready).await?);
    // Until revision 2 commits, revision 1's rows and objects are what is served.
    let during = fleet.tracks.renditions(id).await?;
    ensure!(during.iter().all(|r| r.storage_key.contains(&format!("/{id}/1/"))), "{during:?}");
    let track = wait_for(&fleet.tracks, id, TrackState::Ready, Duration::from_secs(60)).await?;
    ensure!(track.revision == 2, "{track:?}");
    let after = fleet.tracks.renditions(id).await?;
    ensure!(after.len() == 4 && after.iter().all(|r| r.storage_key.contains(&format!("/{id}/2/"))), "{after:?}");
    // The old revision's objects go right after the commit, so give the deletion a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored = keys(fleet.storage.as_ref(), &renditions_prefix(id)).await?;
        let clean = !stored.is_empty() && stored.iter().all(|k| k.starts_with(&revision_prefix(id, 2)));
        if clean {
            break;
        }
        ensure!(Instant::now() < deadline, "orphans: {stored:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.stop().await
}

// ---- distributed: the real binaries, RabbitMQ and S3 ----

struct Distributed {
    db: TestDb,
    env: Vec<(&'static str, String)>,
    bucket: waveline_shared::storage::S3Storage,
    queue_name: String,
}

impl Distributed {
    async fn new(extra: &[(&'static str, &str)]) -> Result<Distributed> {
        Distributed::with_s3(extra, &s3_endpoint()).await
    }

    async fn with_s3(extra: &[(&'static str, &str)], endpoint: &str) -> Result<Distributed> {
        let db = TestDb::new().await?;
        let (access, secret) = s3_credentials();
        let bucket = waveline_shared::storage::S3Storage::new(
            &format!("wl-test-{}", unique()),
            Some(endpoint),
            "us-east-1",
            waveline_shared::storage::S3Credentials::new(access.clone(), secret.clone(), None, None, "test"),
        );
        bucket.ensure_bucket().await?;
        let queue_name = format!("wltest.{}", unique());
        let mut env = vec![
            ("WAVELINE_DATABASE_URL", db.url.clone()),
            ("WAVELINE_QUEUE", amqp_url()),
            ("WAVELINE_QUEUE_NAME", queue_name.clone()),
            ("WAVELINE_STORAGE", format!("s3://{}?endpoint={endpoint}&region=us-east-1", bucket.bucket())),
            ("WAVELINE_RECONCILE_INTERVAL_S", "1".to_owned()),
            ("WAVELINE_HEARTBEAT_STALE_S", "3".to_owned()),
            ("WAVELINE_JOB_RETRY_BASE_MS", "200".to_owned()),
            ("AWS_ACCESS_KEY_ID", access),
            ("AWS_SECRET_ACCESS_KEY", secret),
        ];
        for (name, value) in extra {
            env.push((name, (*value).to_owned()));
        }
        Ok(Distributed { db, env, bucket, queue_name })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(waveline_bin());
        command.args(args);
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
            command.env_remove(name);
        }
        command.envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        command
    }

    fn worker(&self) -> Result<Child> {
        self.worker_with(&[])
    }

    fn worker_with(&self, args: &[&str]) -> Result<Child> {
        let mut all = vec!["worker", "--concurrency", "1"];
        all.extend_from_slice(args);
        Ok(self.command(&all).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let output = self.command(args).output()?;
        ensure!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(serde_json::from_slice(&output.stdout)?)
    }
}

impl Drop for Distributed {
    fn drop(&mut self) {
        waveline_tests::remove_distributed(Some(self.bucket.clone()), Some(self.queue_name.clone()));
    }
}

fn stop(mut child: Child) -> Result<std::process::ExitStatus> {
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            bail!("the worker did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_binary_drains_imports_through_rabbitmq_and_s3() -> Result<()> {
    let fleet = Distributed::new(&[]).await?;
    migrate(&fleet)?;
    let dir = temp_dir()?;
    let song = fixture(dir.path(), "song.flac", 5.0)?;
    // Audio by its first bytes (import sniffs as the API does), but its header declares a
    // sample rate of 0 Hz: the worker's guard fails it.
    let broken = dir.path().join("broken.wav");
    let mut bytes = audio::wav_header(1, 2, 0, 16, 4000);
    bytes.resize(44 + 4000, 0);
    std::fs::write(&broken, bytes)?;
    let imported =
        fleet.json(&["import", song.to_str().unwrap_or_default(), broken.to_str().unwrap_or_default(), "--json"])?;
    let ids: Vec<String> = imported["tracks"]
        .as_array()
        .context("tracks")?
        .iter()
        .filter_map(|t| t["id"].as_str().map(str::to_owned))
        .collect();
    ensure!(ids.len() == 2 && imported["tracks"][0]["state"] == "queued", "{imported}");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let worker = fleet.worker_with(&["--metrics-listen", &metrics_addr])?;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    let ready = wait_for(&tracks, ids[0].parse()?, TrackState::Ready, Duration::from_secs(90)).await;
    let failed = wait_for(&tracks, ids[1].parse()?, TrackState::Failed, Duration::from_secs(30)).await;
    let metrics = reqwest::get(format!("http://{metrics_addr}/metrics")).await?.text().await;
    let status = stop(worker)?;
    let metrics = metrics?;
    for series in [
        "waveline_jobs_total{result=\"done\"} 1",
        "waveline_jobs_total{result=\"failed\"} 1",
        "waveline_job_duration_seconds",
        "waveline_jobs_in_flight 0",
    ] {
        ensure!(metrics.contains(series), "/metrics lacks {series}:\n{metrics}");
    }
    ready?;
    let failed = failed?;
    ensure!(status.success(), "the worker exited with {status} after SIGTERM");
    ensure!(failed.error_code.as_deref() == Some("corrupt_audio"), "{failed:?}");
    // The API's view of the track: no processing attempts, a stream per progressive preset.
    let shown = fleet.json(&["tracks", "show", &ids[0], "--json"])?;
    ensure!(shown["state"] == "ready" && shown["revision"] == 1 && shown["error"].is_null(), "{shown}");
    ensure!(shown["owner"]["username"] == "system" && shown.get("attempts").is_none(), "{shown}");
    ensure!(shown["stream_urls"].as_object().is_some_and(|s| s.len() == 3), "{shown}");
    ensure!(shown["hls_master_url"] == format!("/v1/tracks/{}/hls/master.m3u8", ids[0]), "{shown}");
    let stats = fleet.json(&["jobs", "stats", "--json"])?;
    ensure!(stats["tracks"]["ready"] == 1 && stats["tracks"]["failed"] == 1 && stats["outbox_pending"] == 0, "{stats}");
    let listed = fleet.json(&["tracks", "list", "--state", "failed", "--json"])?;
    ensure!(
        listed["tracks"].as_array().is_some_and(|t| t.len() == 1 && t[0]["error"]["code"] == "corrupt_audio"),
        "{listed}"
    );
    // A backlog by filter: the dry run only counts; the real one makes new revisions.
    let dry = fleet.json(&["reprocess", "--state", "ready", "--dry-run", "--json"])?;
    ensure!(dry["matched"] == 1 && dry["enqueued"] == 1 && dry["dry_run"] == true, "{dry}");
    ensure!(tracks.get(ids[0].parse()?).await?.context("track")?.state == TrackState::Ready);
    let missing = fleet.json(&["reprocess", "--missing-preset", "flac_lossless", "--state", "ready", "--json"])?;
    ensure!(missing["matched"] == 1 && missing["enqueued"] == 1, "{missing}");
    let worker = fleet.worker()?;
    let again = wait_for(&tracks, ids[0].parse()?, TrackState::Ready, Duration::from_secs(90)).await;
    stop(worker)?;
    let again = again?;
    ensure!(again.revision == 2, "{again:?}");
    let first: TrackId = ids[0].parse()?;
    let stored = keys(&fleet.bucket, &renditions_prefix(first)).await?;
    ensure!(stored.iter().all(|k| k.starts_with(&revision_prefix(first, 2))), "{stored:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_follows_the_rules_of_an_api_upload() -> Result<()> {
    let fleet = Distributed::new(&[("WAVELINE_FREE_QUOTA_S", "1")]).await?;
    migrate(&fleet)?;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    let dir = temp_dir()?;
    let song = fixture(dir.path(), "First Song.wav", 1.0)?;
    let song = song.to_str().unwrap_or_default();
    let notes = dir.path().join("notes.wav");
    std::fs::write(&notes, "not audio at all, whatever the extension says")?;
    // Each refusal names the API's code and leaves neither a row nor an object behind.
    let refused = |args: &[&str], code: &str| -> Result<()> {
        let output = fleet.command(args).output()?;
        ensure!(!output.status.success(), "{args:?} was accepted");
        let stdout: Value = serde_json::from_slice(&output.stdout)?;
        let error = stdout["tracks"][0]["error"].as_str().unwrap_or_default().to_owned();
        ensure!(error.starts_with(code), "{args:?}: expected {code}, got {stdout}");
        Ok(())
    };
    refused(&["import", notes.to_str().unwrap_or_default(), "--json"], "not_audio")?;
    refused(&["import", song, "--title", "   ", "--json"], "invalid_field")?;
    refused(&["import", song, "--title", "bell\u{7}", "--json"], "invalid_field")?;
    let owner = create_user(&tracks, "importer").await?;
    sqlx::query(
        "INSERT INTO tracks (id, owner_id, title, state, duration_ms) VALUES ($1, $2, 'old', 'uploaded', 2000)",
    )
    .bind(TrackId::new())
    .bind(owner)
    .execute(&fleet.db.pool)
    .await?;
    refused(&["import", song, "--owner", "importer", "--json"], "quota_exceeded")?;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tracks").fetch_one(&fleet.db.pool).await?;
    ensure!(rows == 1, "{rows} track rows after refused imports");
    ensure!(keys(&fleet.bucket, ORIGINALS_PREFIX).await?.is_empty(), "objects left by refused imports");
    // A good import: the title comes from the file name, the row and its job in one go.
    let imported = fleet.json(&["import", song, "--json"])?;
    let id: TrackId = imported["tracks"][0]["id"].as_str().context("id")?.parse()?;
    let track = tracks.get(id).await?.context("track")?;
    ensure!(track.state == TrackState::Queued && track.title == "First Song", "{track:?}");
    ensure!(keys(&fleet.bucket, ORIGINALS_PREFIX).await? == vec![original_key(id).to_string()]);
    let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM tracks WHERE state = 'awaiting_upload'")
        .fetch_one(&fleet.db.pool)
        .await?;
    ensure!(waiting == 0, "an import left an awaiting_upload row");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_loses_nothing() -> Result<()> {
    let fleet = Distributed::new(&[]).await?;
    migrate(&fleet)?;
    let dir = temp_dir()?;
    let song = fixture(dir.path(), "long.flac", 90.0)?;
    let imported = fleet.json(&["import", song.to_str().unwrap_or_default(), "--json"])?;
    let id: TrackId = imported["tracks"][0]["id"].as_str().context("id")?.parse()?;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    let mut first = fleet.worker()?;
    wait_for(&tracks, id, TrackState::Processing, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    first.kill()?; // SIGKILL: no clean-up of any kind
    first.wait()?;
    let second = fleet.worker()?;
    let ready = wait_for(&tracks, id, TrackState::Ready, Duration::from_secs(120)).await;
    stop(second)?;
    let track = ready?;
    ensure!(track.attempts == 2 && track.revision == 1, "{track:?}");
    let stored = keys(&fleet.bucket, &renditions_prefix(id)).await?;
    ensure!(stored.iter().all(|k| k.starts_with(&revision_prefix(id, 1))), "{stored:?}");
    let rows = tracks.renditions(id).await?;
    let listed: std::collections::BTreeSet<&String> = rows.iter().flat_map(|r| r.storage_keys.iter()).collect();
    let media: Vec<&String> = stored
        .iter()
        .filter(|k| !k.contains("/waveform/") && !k.ends_with("manifest.json") && !k.contains("/artwork/"))
        .collect();
    ensure!(media.iter().all(|k| listed.contains(k)), "objects no rendition row lists: {media:?}");
    Ok(())
}

/// Imports a generated tone of `secs` seconds with the CLI; returns the new track's id.
fn import_tone(fleet: &Distributed, secs: f64) -> Result<TrackId> {
    let dir = temp_dir()?;
    let song = fixture(dir.path(), "song.wav", secs)?;
    let imported = fleet.json(&["import", song.to_str().unwrap_or_default(), "--json"])?;
    Ok(imported["tracks"][0]["id"].as_str().context("id")?.parse()?)
}

fn migrate(fleet: &Distributed) -> Result<()> {
    let output = fleet.command(&["migrate"]).output()?;
    ensure!(output.status.success(), "migrate: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_outages_are_retried_until_storage_returns() -> Result<()> {
    let mut s3 = S3Server::start()?;
    // Backoff 1, 2, 4, 8 s: the outage below ends well inside it.
    let fleet = Distributed::with_s3(
        &[("WAVELINE_JOB_MAX_ATTEMPTS", "5"), ("WAVELINE_JOB_RETRY_BASE_MS", "1000")],
        &s3.endpoint(),
    )
    .await?;
    migrate(&fleet)?;
    let id = import_tone(&fleet, 3.0)?;
    s3.pause()?;
    let worker = fleet.worker()?;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while tracks.get(id).await?.context("track")?.attempts < 2 {
        ensure!(Instant::now() < deadline, "no retry while the storage was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s3.resume()?;
    let ready = wait_for(&tracks, id, TrackState::Ready, Duration::from_secs(60)).await;
    stop(worker)?;
    let track = ready?;
    ensure!(track.attempts >= 2, "{track:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lasting_storage_outage_ends_in_retries_exhausted_and_a_dead_letter() -> Result<()> {
    let mut s3 = S3Server::start()?;
    let fleet = Distributed::with_s3(
        &[("WAVELINE_JOB_MAX_ATTEMPTS", "3"), ("WAVELINE_JOB_RETRY_BASE_MS", "200")],
        &s3.endpoint(),
    )
    .await?;
    migrate(&fleet)?;
    let id = import_tone(&fleet, 3.0)?;
    s3.pause()?;
    let worker = fleet.worker()?;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    let failed = wait_for(&tracks, id, TrackState::Failed, Duration::from_secs(60)).await;
    stop(worker)?;
    let track = failed?;
    ensure!(track.error_code.as_deref() == Some("retries_exhausted") && track.attempts == 3, "{track:?}");
    // What the owner sees says what went wrong, not where: no host, port or client text.
    let message = track.error_message.clone().unwrap_or_default();
    let port = s3.endpoint().rsplit(':').next().unwrap_or_default().to_owned();
    ensure!(message.contains("storage"), "{message}");
    for internal in ["127.0.0.1", "localhost", port.as_str(), "dispatch", "error sending request"] {
        ensure!(!message.contains(internal), "the stored error names {internal:?}: {message}");
    }
    let dead = fleet.json(&["jobs", "dead", "--json"])?;
    let letters = dead["dead"].as_array().context("dead")?;
    ensure!(letters.len() == 1 && letters[0]["code"] == "retries_exhausted", "{dead}");
    // Admins read dead letters over HTTP: they carry the same safe text.
    let reason = letters[0]["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("storage") && !reason.contains("127.0.0.1") && !reason.contains(&port), "{dead}");
    ensure!(letters[0]["job"]["track_id"] == id.to_string(), "{dead}");
    // With the storage back, the operator replays it and the track is processed.
    s3.resume()?;
    let replayed = fleet.json(&["jobs", "replay", "--all", "--json"])?;
    ensure!(replayed["replayed"] == 1, "{replayed}");
    let worker = fleet.worker()?;
    let ready = wait_for(&tracks, id, TrackState::Ready, Duration::from_secs(60)).await;
    stop(worker)?;
    ready?;
    Ok(())
}

/// Restarts the shared RabbitMQ, so it runs in the exclusive pass of `scripts/test.sh`
/// (`--run-ignored only`, one test at a time), never beside tests that use the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared broker: run alone, as scripts/test.sh does"]
async fn exclusive_a_broker_restart_while_a_backlog_drains_loses_nothing() -> Result<()> {
    let fleet = Distributed::new(&[]).await?;
    migrate(&fleet)?;
    let dir = temp_dir()?;
    let mut files = Vec::new();
    for n in 0..6 {
        files.push(fixture(dir.path(), &format!("song{n}.wav"), 4.0)?);
    }
    let mut args = vec!["import".to_owned()];
    args.extend(files.iter().map(|f| f.to_string_lossy().into_owned()));
    args.push("--json".into());
    let imported = fleet.json(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let ids: Vec<TrackId> = imported["tracks"]
        .as_array()
        .context("tracks")?
        .iter()
        .filter_map(|t| t["id"].as_str()?.parse().ok())
        .collect();
    ensure!(ids.len() == 6);
    let worker = fleet.worker()?;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    wait_for(&tracks, ids[0], TrackState::Ready, Duration::from_secs(60)).await?;
    let stopped = Command::new("rabbitmqctl").args(["stop_app"]).status()?.success();
    // With the broker down: the backlog must still be draining, or the restart tested nothing.
    let left = not_ready(&tracks, &ids).await;
    let started = Command::new("rabbitmqctl").args(["start_app"]).status()?.success();
    ensure!(stopped && started, "could not restart RabbitMQ with rabbitmqctl");
    let left = left?;
    ensure!(left > 0, "every track was ready before the broker went down: the restart met no backlog");
    let mut outcome = Ok(());
    for id in &ids {
        if let Err(err) = wait_for(&tracks, *id, TrackState::Ready, Duration::from_secs(120)).await {
            outcome = Err(err);
            break;
        }
    }
    stop(worker)?;
    outcome?;
    Ok(())
}

/// Restarts the shared PostgreSQL while a worker drains a backlog: the worker's pool
/// reconnects and every track still reaches `ready`. Exclusive, like the broker restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "restarts the shared PostgreSQL: run alone, as scripts/test.sh does"]
async fn exclusive_a_database_restart_while_a_backlog_drains_loses_nothing() -> Result<()> {
    let fleet = Distributed::new(&[]).await?;
    migrate(&fleet)?;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(import_tone(&fleet, 4.0)?);
    }
    let worker = fleet.worker()?;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    wait_for(&tracks, ids[0], TrackState::Ready, Duration::from_secs(60)).await?;
    let version = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .max()
        .context("no PostgreSQL cluster under /etc/postgresql")?;
    // Read just before the restart: the backlog must still be draining, or it tested nothing.
    let left = not_ready(&tracks, &ids).await?;
    let restarted = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()?
        .success();
    ensure!(restarted, "could not restart PostgreSQL");
    ensure!(left > 0, "every track was ready before the database restarted: the restart met no backlog");
    let mut outcome = Ok(());
    for id in &ids {
        // The test's own pool reconnects too; a query may fail once right after the restart.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match tracks.get(*id).await {
                Ok(Some(track)) if track.state == TrackState::Ready => break,
                Ok(Some(track)) if track.state == TrackState::Failed => {
                    outcome = Err(anyhow::anyhow!("{track:?}"));
                    break;
                }
                _ if Instant::now() > deadline => {
                    outcome = Err(anyhow::anyhow!("track {id} never became ready after the restart"));
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        if outcome.is_err() {
            break;
        }
    }
    stop(worker)?;
    outcome?;
    Ok(())
}

// ---- the pipeline's scheduling priority, read from /proc while a pass runs ----

/// The threads of one pass over the default ladder: the pass itself, loudness, one feeder per
/// encoder rate (44.1 and 48 kHz) and six encoders (MP3, three AAC variants, Opus, preview).
/// FFmpeg gets no codec threads; one it made would carry its creator's name and count here.
const PASS_THREADS: usize = 10;

/// Waits until process `pid` runs a whole pass (its pass thread and all six encoders are
/// up) and returns every thread of the process at that moment.
async fn threads_during_a_pass(pid: u32) -> Result<Vec<ThreadInfo>> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = threads::of(pid)?;
        let named = |prefix: &str| now.iter().filter(|t| t.name.starts_with(prefix)).count();
        if named("pipe-pass") == 1 && named("pipe-enc-") == 6 {
            return Ok(now);
        }
        ensure!(Instant::now() < deadline, "no pass was seen running in 90 s: {now:#?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every `pipe-` thread has `policy` and `nice`; every other thread is as the process's main
/// thread is (the API's and the runtime's threads are untouched).
fn check_priorities(pid: u32, threads: &[ThreadInfo], policy: u32, nice: i32) -> Result<()> {
    let main = threads.iter().find(|t| t.tid == pid).context("the main thread")?;
    ensure!((main.policy, main.nice) == (SCHED_OTHER, 0), "the process itself was changed: {main:?}");
    let (pass, rest): (Vec<&ThreadInfo>, Vec<&ThreadInfo>) = threads.iter().partition(|t| t.name.starts_with("pipe-"));
    ensure!(pass.len() == PASS_THREADS, "expected the pass's {PASS_THREADS} threads: {pass:#?}");
    for thread in &pass {
        ensure!((thread.policy, thread.nice) == (policy, nice), "a pipeline thread: {thread:?}");
    }
    ensure!(rest.iter().any(|t| t.name.starts_with("tokio-")), "no runtime threads among {rest:#?}");
    for thread in &rest {
        ensure!((thread.policy, thread.nice) == (SCHED_OTHER, 0), "a thread outside the pipeline: {thread:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_waveline_serve_the_pipeline_runs_lowered_and_the_api_does_not() -> Result<()> {
    // The embedded defaults: nice 10, and a thread budget.
    let stack = Stack::start(Mode::Embedded, true, &[]).await?;
    let pid = stack.serve_pid();
    let user = register_and_login(&stack, "listener").await?;
    let dir = temp_dir()?;
    let song = fixture(dir.path(), "long.flac", 40.0)?;
    let (status, track) = upload(&stack, &user, &[("title", "Long")], ("long.flac", &std::fs::read(&song)?)).await?;
    ensure!(status == 202, "{status} {track}");
    let id = track["id"].as_str().context("id")?.to_owned();

    let during = threads_during_a_pass(pid).await?;
    check_priorities(pid, &during, SCHED_OTHER, 10)?;

    // Lowered and within its budget, the pass still finishes; afterwards no
    // thread of the process is left lowered (the pipeline's threads were its own).
    wait_ready(&stack, &user, &id, 1).await?;
    let after = threads::of(pid)?;
    ensure!(after.iter().all(|t| (t.policy, t.nice) == (SCHED_OTHER, 0)), "{after:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedicated_worker_runs_its_pipeline_at_the_configured_priority() -> Result<()> {
    // A worker's default is `normal`; an operator who shares the host asks for `low`.
    let fleet = Distributed::new(&[("WAVELINE_PIPELINE_PRIORITY", "low"), ("WAVELINE_PIPELINE_THREADS", "1")]).await?;
    migrate(&fleet)?;
    let dir = temp_dir()?;
    let song = fixture(dir.path(), "long.flac", 40.0)?;
    let imported = fleet.json(&["import", song.to_str().unwrap_or_default(), "--json"])?;
    let id: TrackId = imported["tracks"][0]["id"].as_str().context("id")?.parse()?;
    let worker = fleet.worker()?;
    let pid = worker.id();
    let during = threads_during_a_pass(pid).await;
    let tracks = PgTracks::new(fleet.db.pool.clone());
    let ready = wait_for(&tracks, id, TrackState::Ready, Duration::from_secs(120)).await;
    let status = stop(worker)?;
    check_priorities(pid, &during?, SCHED_OTHER, 10)?;
    ready?;
    ensure!(status.success(), "the worker exited with {status}");
    Ok(())
}
