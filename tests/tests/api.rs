//! The HTTP API over real HTTP, against the real `waveline serve` binary: the operational
//! routes, JSON errors, the OpenAPI document, and the embedded mode (`serve --workers N` with
//! the in-process queue and the filesystem store) taking a track to `ready` while its status
//! is polled with ETags.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use waveline_shared::db::{PgTracks, SYSTEM_USER};
use waveline_shared::domain::TrackState;
use waveline_shared::storage::{FsStorage, ObjectKey, Storage, byte_stream};
use waveline_tests::{S3Server, TestDb, audio, s3_credentials, temp_dir, waveline_bin};

struct Server {
    child: Child,
    base: String,
    db: TestDb,
    objects: tempfile::TempDir,
}

impl Server {
    async fn start(workers: u16, env: &[(&str, String)]) -> Result<Server> {
        let db = TestDb::new().await?;
        let objects = temp_dir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = Command::new(waveline_bin());
        command.args(["serve", "--workers", &workers.to_string()]);
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
            command.env_remove(name);
        }
        command
            .env("WAVELINE_DATABASE_URL", &db.url)
            .env("WAVELINE_STORAGE", format!("file://{}", objects.path().display()))
            .env("WAVELINE_QUEUE", "memory")
            .env("WAVELINE_LISTEN", format!("127.0.0.1:{port}"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().context("cannot start waveline serve")?;
        let server = Server { child, base: format!("http://127.0.0.1:{port}"), db, objects };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = reqwest::get(format!("{}/healthz", server.base)).await
                && response.status() == 200
            {
                return Ok(server);
            }
            ensure!(Instant::now() < deadline, "waveline serve did not answer /healthz within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

async fn json(response: reqwest::Response) -> Result<(u16, Value)> {
    let status = response.status().as_u16();
    let text = response.text().await?;
    let value = serde_json::from_str(&text).with_context(|| format!("not JSON ({status}): {text}"))?;
    Ok((status, value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_routes_answer_and_the_openapi_document_lists_them() -> Result<()> {
    let server = Server::start(0, &[]).await?;
    let health = reqwest::get(server.url("/healthz")).await?;
    ensure!(health.status() == 200 && health.headers().contains_key("x-request-id"));
    ensure!(health.text().await? == "ok");
    let (status, ready) = json(reqwest::get(server.url("/readyz")).await?).await?;
    ensure!(status == 200 && ready == serde_json::json!({"database": "ok", "queue": "ok", "storage": "ok"}), "{ready}");
    let (status, spec) = json(reqwest::get(server.url("/openapi.json")).await?).await?;
    ensure!(status == 200 && spec["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{spec}");
    let paths = spec["paths"].as_object().context("paths")?;
    for route in ["/healthz", "/readyz", "/metrics", "/v1/tracks/{id}/status"] {
        ensure!(paths.contains_key(route), "{route} is not in the OpenAPI document: {:?}", paths.keys());
    }
    let docs = reqwest::get(server.url("/docs")).await?;
    ensure!(docs.status() == 200 && docs.text().await?.to_lowercase().contains("swagger"));
    let metrics = reqwest::get(server.url("/metrics")).await?.text().await?;
    ensure!(
        metrics.contains("waveline_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"}"),
        "{metrics}"
    );
    ensure!(metrics.contains("waveline_http_request_duration_seconds"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_a_code() -> Result<()> {
    let server = Server::start(0, &[]).await?;
    let client = reqwest::Client::new();
    let cases = [
        (client.get(server.url("/no/such/route")), 404, "not_found"),
        (client.get(server.url("/v1/tracks/not-a-uuid/status")), 400, "bad_request"),
        (client.get(server.url(&format!("/v1/tracks/{}/status", uuid::Uuid::now_v7()))), 404, "not_found"),
        (client.post(server.url("/healthz")), 405, "method_not_allowed"),
    ];
    for (request, want_status, want_code) in cases {
        let response = request.send().await?;
        let url = response.url().to_string();
        let (status, body) = json(response).await?;
        ensure!(status == want_status && body["code"] == want_code, "{url}: {status} {body}");
        ensure!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{url}: {body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_serve_takes_a_track_to_ready_and_status_polls_with_etags() -> Result<()> {
    let server = Server::start(1, &[]).await?;
    let tracks = PgTracks::new(server.db.pool.clone());
    let storage = FsStorage::open(server.objects.path()).await?;
    let dir = temp_dir()?;
    let song = dir.path().join("song.flac");
    audio::tone(&song, 4.0, 44100, 2, &[])?;
    let track = tracks.create(SYSTEM_USER, "song", TrackState::AwaitingUpload, None).await?;
    let key = format!("originals/{}/source", track.id);
    let bytes = std::fs::read(&song)?;
    let size = bytes.len() as i64;
    storage
        .put(&ObjectKey::parse(key.clone())?, "audio/flac", byte_stream(futures::stream::iter([Ok(bytes.into())])))
        .await?;
    ensure!(tracks.mark_uploaded(track.id, &key, size).await?);
    ensure!(tracks.enqueue(track.id, TrackState::Uploaded).await?);

    let client = reqwest::Client::new();
    let url = server.url(&format!("/v1/tracks/{}/status", track.id));
    let mut seen_states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let etag = loop {
        let response = client.get(&url).send().await?;
        ensure!(response.status() == 200, "{}", response.status());
        let etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).context("no ETag")?.to_owned();
        let (_, body) = json(response).await?;
        let state = body["state"].as_str().unwrap_or_default().to_owned();
        if seen_states.last() != Some(&state) {
            seen_states.push(state.clone());
        }
        if state == "ready" {
            ensure!(body["progress"] == 100 && body["attempts"] == 1 && body["error"].is_null(), "{body}");
            break etag;
        }
        if Instant::now() > deadline {
            bail!("still {state} after 60 s (seen {seen_states:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let unchanged = client.get(&url).header("If-None-Match", &etag).send().await?;
    ensure!(unchanged.status() == 304, "{}", unchanged.status());
    ensure!(unchanged.headers().get("etag").and_then(|v| v.to_str().ok()) == Some(etag.as_str()));
    let stale = client.get(&url).header("If-None-Match", "\"something-else\"").send().await?;
    ensure!(stale.status() == 200);
    // A private track's status answers 404, like a missing one.
    sqlx::query("UPDATE tracks SET visibility = 'private' WHERE id = $1")
        .bind(track.id)
        .execute(&server.db.pool)
        .await?;
    let (status, body) = json(client.get(&url).send().await?).await?;
    ensure!(status == 404 && body["code"] == "not_found", "{status} {body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_dependency_that_is_down() -> Result<()> {
    let mut s3 = S3Server::start()?;
    let (access, secret) = s3_credentials();
    let server = Server::start(
        0,
        &[
            ("WAVELINE_STORAGE", format!("s3://wl-ready?endpoint={}&region=us-east-1", s3.endpoint())),
            ("AWS_ACCESS_KEY_ID", access),
            ("AWS_SECRET_ACCESS_KEY", secret),
        ],
    )
    .await?;
    s3.pause()?;
    let (status, body) = json(reqwest::get(server.url("/readyz")).await?).await?;
    ensure!(status == 503 && body["code"] == "not_ready", "{status} {body}");
    let message = body["message"].as_str().unwrap_or_default();
    ensure!(message.contains("storage") && !message.contains("database") && !message.contains("queue:"), "{message}");
    Ok(())
}
