//! A running Waveline for end-to-end tests: `waveline serve` (and a worker) against real
//! services, and the account helpers every API test starts with.

use std::io::Write as _;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};
use waveline_shared::storage::{FsStorage, S3Credentials, S3Storage, Storage};

use waveline_shared::documents::MongoDocuments;

use crate::{TestDb, amqp_url, s3_credentials, s3_endpoint, temp_dir, test_documents_url, unique, waveline_bin};

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Embedded,
    Distributed,
}

/// A running Waveline: the API, its workers, and a handle on its storage to compare bytes.
#[allow(missing_debug_implementations)]
pub struct Stack {
    serve: Child,
    /// The stream cache directory of `serve` (its own, unless the test named one).
    pub stream_cache_dir: std::path::PathBuf,
    _stream_cache: tempfile::TempDir,
    worker: Option<Child>,
    pub base: String,
    pub db: TestDb,
    pub storage: Arc<dyn Storage>,
    pub env: Vec<(String, String)>,
    _objects: Option<tempfile::TempDir>,
    /// The distributed stack's own bucket, queue name and MongoDB database, removed when the
    /// stack is dropped.
    distributed: Option<(S3Storage, String, String)>,
    /// The distributed stack's document store (its own MongoDB database), to read directly.
    pub mongodb: Option<MongoDocuments>,
}

impl Stack {
    /// Starts the API (and, when `process` is set, something that processes uploads).
    pub async fn start(mode: Mode, process: bool, extra: &[(&str, &str)]) -> Result<Stack> {
        Stack::start_with_s3(mode, process, extra, &s3_endpoint()).await
    }

    /// A distributed stack on the S3 server at `endpoint` (a test's own
    /// [`crate::S3Server`], to take the storage away from it alone).
    pub async fn start_distributed_on(endpoint: &str, process: bool, extra: &[(&str, &str)]) -> Result<Stack> {
        Stack::start_with_s3(Mode::Distributed, process, extra, endpoint).await
    }

    /// Starts the distributed stack's worker, if it has none yet (the stack stops it).
    pub fn start_worker(&mut self) -> Result<()> {
        ensure!(self.distributed.is_some(), "the embedded stack's workers are in its serve process");
        if self.worker.is_none() {
            self.worker =
                Some(spawn(&["worker", "--concurrency", "1"], &self.env).context("cannot start waveline worker")?);
        }
        Ok(())
    }

    async fn start_with_s3(mode: Mode, process: bool, extra: &[(&str, &str)], s3_endpoint: &str) -> Result<Stack> {
        let db = TestDb::new().await?;
        let mut env: Vec<(String, String)> = vec![
            ("WAVELINE_DATABASE_URL".into(), db.url.clone()),
            ("WAVELINE_JWT_SECRET".into(), JWT_SECRET.into()),
            ("WAVELINE_RECONCILE_INTERVAL_S".into(), "1".into()),
        ];
        let mut distributed = None;
        let mut mongodb = None;
        let (storage, objects): (Arc<dyn Storage>, _) = match mode {
            Mode::Embedded => {
                let objects = temp_dir()?;
                env.push(("WAVELINE_STORAGE".into(), format!("file://{}", objects.path().display())));
                env.push(("WAVELINE_QUEUE".into(), "memory".into()));
                (Arc::new(FsStorage::open(objects.path()).await?), Some(objects))
            }
            Mode::Distributed => {
                let (access, secret) = s3_credentials();
                let bucket = S3Storage::new(
                    &format!("wl-api-{}", unique()),
                    Some(s3_endpoint),
                    "us-east-1",
                    S3Credentials::new(access.clone(), secret.clone(), None, None, "test"),
                );
                bucket.ensure_bucket().await.context("the S3 server is not answering; run scripts/setup.sh")?;
                env.push((
                    "WAVELINE_STORAGE".into(),
                    format!("s3://{}?endpoint={}&region=us-east-1", bucket.bucket(), s3_endpoint),
                ));
                let queue_name = format!("wltest.{}", unique());
                env.push(("WAVELINE_QUEUE".into(), amqp_url()));
                env.push(("WAVELINE_QUEUE_NAME".into(), queue_name.clone()));
                env.push(("AWS_ACCESS_KEY_ID".into(), access));
                env.push(("AWS_SECRET_ACCESS_KEY".into(), secret));
                // Documents in a MongoDB database of the stack's own; embedded keeps PostgreSQL.
                let (documents_url, documents_db) = test_documents_url();
                let documents = MongoDocuments::connect(&documents_url, &documents_db).await?;
                waveline_shared::documents::Documents::migrate(&documents)
                    .await
                    .context("MongoDB (nx-27017) is not answering; run scripts/setup.sh")?;
                env.push(("WAVELINE_DOCUMENTS".into(), documents_url));
                mongodb = Some(documents);
                distributed = Some((bucket.clone(), queue_name, documents_db));
                (Arc::new(bucket), None)
            }
        };
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let in_process = if mode == Mode::Embedded && process { "1" } else { "0" };
        let (serve, port, stream_cache) = start_serve(&env, in_process).await?;
        env.push(("WAVELINE_LISTEN".into(), format!("127.0.0.1:{port}")));
        let worker = if mode == Mode::Distributed && process {
            Some(spawn(&["worker", "--concurrency", "1"], &env).context("cannot start waveline worker")?)
        } else {
            None
        };
        let base = format!("http://127.0.0.1:{port}");
        let stream_cache_dir = stream_cache_dir(&env, &stream_cache);
        Ok(Stack {
            serve,
            stream_cache_dir,
            _stream_cache: stream_cache,
            worker,
            base,
            db,
            storage,
            env,
            _objects: objects,
            distributed,
            mongodb,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The process id of `waveline serve`.
    pub fn serve_pid(&self) -> u32 {
        self.serve.id()
    }

    /// Runs the CLI against this stack; returns its `--json` output.
    pub fn cli(&self, args: &[&str]) -> Result<Value> {
        let mut command = Command::new(waveline_bin());
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
            command.env_remove(name);
        }
        let output = command.args(args).envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).output()?;
        ensure!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(serde_json::from_slice(&output.stdout)?)
    }
}

impl Stack {
    /// Makes `user` an admin with `waveline users promote`, and waits until the API sees it:
    /// the API learns of role changes by notification, within a second (5 s allowed here).
    pub async fn promote(&self, user: &User) -> Result<()> {
        let promoted = self.cli(&["users", "promote", &user.username, "--json"])?;
        ensure!(promoted["role"] == "admin", "{promoted}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, me) =
                json(reqwest::Client::new().get(self.url("/v1/me")).bearer_auth(&user.token).send().await?).await?;
            if status == 200 && me["role"] == "admin" {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the promotion of {} never reached the API: {status} {me}",
                user.username
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        stop(std::iter::once(&mut self.serve).chain(self.worker.as_mut()).collect());
        // Once the processes are gone: nothing recreates the queues after this.
        if let Some((bucket, queue_name, documents_db)) = self.distributed.take() {
            crate::remove_distributed(Some(bucket), Some(queue_name));
            crate::remove_mongodb_database(documents_db);
        }
    }
}

/// Another `waveline serve` of a stack: a second replica on the same database, storage and
/// queue, with its own caches and listener.
#[allow(missing_debug_implementations)]
pub struct Replica {
    serve: Child,
    pub base: String,
    _stream_cache: tempfile::TempDir,
}

impl Stack {
    /// Starts a second replica of this stack's API (it processes nothing itself).
    pub async fn replica(&self) -> Result<Replica> {
        self.replica_with(&[]).await
    }

    /// Starts a second replica with some settings of its own (`extra` replaces the stack's
    /// value of each variable it names).
    pub async fn replica_with(&self, extra: &[(&str, &str)]) -> Result<Replica> {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter(|(name, _)| name != "WAVELINE_LISTEN" && !extra.iter().any(|(replaced, _)| replaced == name))
            .cloned()
            .collect();
        env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let (serve, port, stream_cache) = start_serve(&env, "0").await?;
        Ok(Replica { serve, base: format!("http://127.0.0.1:{port}"), _stream_cache: stream_cache })
    }
}

impl Replica {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The replica's process id (to kill it).
    pub fn pid(&self) -> u32 {
        self.serve.id()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        stop(vec![&mut self.serve]);
    }
}

/// Asks the children to stop, then waits for them (at most 15 s each) or kills them.
fn stop(children: Vec<&mut Child>) {
    for child in &children {
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    }
    for child in children {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Runs `waveline <args>` with `env` (and no other `WAVELINE_*` variable), logging to a file.
fn spawn(args: &[&str], env: &[(String, String)]) -> Result<Child> {
    let mut command = Command::new(waveline_bin());
    command.args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
        command.env_remove(name);
    }
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let log = child_log(args[0])?;
    Ok(command.stdout(log.try_clone()?).stderr(log).spawn()?)
}

/// The stream cache directory `serve` was given: the test's own, or the one made for it.
fn stream_cache_dir(env: &[(String, String)], made: &tempfile::TempDir) -> std::path::PathBuf {
    env.iter()
        .rev()
        .find(|(name, _)| name == "WAVELINE_STREAM_CACHE_DIR")
        .map_or_else(|| made.path().to_path_buf(), |(_, dir)| dir.into())
}

/// Starts `waveline serve --workers <workers>` with `env` on a free port, once it answers.
/// With the S3 store, unless `env` names one, the process gets a stream cache directory of its
/// own (a test's processes then never share a cache, and nothing is left in the home directory).
///
/// The port is picked by binding port 0 and letting it go, so another process may take it
/// before `serve` binds it: a `serve` that exits at once is started again on another.
async fn start_serve(env: &[(String, String)], workers: &str) -> Result<(Child, u16, tempfile::TempDir)> {
    let stream_cache = temp_dir()?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut env = env.to_vec();
        let s3 =
            env.iter().rev().find(|(name, _)| name == "WAVELINE_STORAGE").is_some_and(|(_, v)| v.starts_with("s3:"));
        if s3 && !env.iter().any(|(name, _)| name == "WAVELINE_STREAM_CACHE_DIR") {
            env.insert(0, ("WAVELINE_STREAM_CACHE_DIR".into(), stream_cache.path().display().to_string()));
        }
        env.push(("WAVELINE_LISTEN".into(), format!("127.0.0.1:{port}")));
        let mut serve = spawn(&["serve", "--workers", workers], &env).context("cannot start waveline serve")?;
        match wait_healthy(&mut serve, port).await {
            Ok(()) => return Ok((serve, port, stream_cache)),
            Err(err) if attempt < 3 && matches!(serve.try_wait(), Ok(Some(_))) => {
                eprintln!("waveline serve on port {port} exited ({err:#}); starting it on another port");
            }
            Err(err) => {
                let _ = serve.kill();
                let _ = serve.wait();
                return Err(err);
            }
        }
    }
}

/// A log file for a child process, kept after the test (nextest shows its path with the
/// output of a failing test). `scripts/test.sh` empties the folder before each run.
fn child_log(role: &str) -> Result<std::fs::File> {
    let dir = std::env::temp_dir().join("waveline-test-logs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}-{role}.log", unique()));
    eprintln!("waveline {role} logs: {}", path.display());
    Ok(std::fs::File::create(path)?)
}

/// Waits until `serve` answers `/healthz` on `port` (at most 20 s), or has exited.
async fn wait_healthy(serve: &mut Child, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await
            && response.status() == 200
        {
            return Ok(());
        }
        if let Some(status) = serve.try_wait()? {
            anyhow::bail!("waveline serve exited with {status}");
        }
        ensure!(Instant::now() < deadline, "waveline serve did not answer /healthz within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn json(response: reqwest::Response) -> Result<(u16, Value)> {
    let status = response.status().as_u16();
    let text = response.text().await?;
    let value = serde_json::from_str(&text).with_context(|| format!("not JSON ({status}): {text}"))?;
    Ok((status, value))
}

pub fn header(response: &reqwest::Response, name: &str) -> String {
    response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// A logged-in user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub email: String,
    pub password: String,
    pub token: String,
    /// `waveline_session=…`, for the `Cookie` header.
    pub cookie: String,
    /// The session's CSRF token, for `X-CSRF-Token` with the cookie.
    pub csrf: String,
    pub refresh: String,
}

/// Every `Set-Cookie` of a response.
pub fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response.headers().get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).map(str::to_owned).collect()
}

/// The `Set-Cookie` for `name`, with its attributes.
pub fn set_cookie(cookies: &[String], name: &str) -> Result<String> {
    cookies
        .iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .cloned()
        .with_context(|| format!("no {name} in {cookies:?}"))
}

/// `POST /v1/auth/register`: the status and body.
pub async fn register(stack: &Stack, email: &str, username: &str, password: &str) -> Result<(u16, Value)> {
    json(
        reqwest::Client::new()
            .post(stack.url("/v1/auth/register"))
            .json(&json!({"email": email, "username": username, "password": password}))
            .send()
            .await?,
    )
    .await
}

/// Registers `username` (email `username@example.com`, a long password) and logs in.
pub async fn register_and_login(stack: &Stack, username: &str) -> Result<User> {
    let email = format!("{username}@example.com");
    let password = format!("{username}-long-password");
    let (status, body) = register(stack, &email, username, &password).await?;
    ensure!(status == 202 && body["message"].is_string(), "{status} {body}");
    let mut logged_in = login(stack, &email, &password, &[]).await?;
    let (status, user) =
        json(reqwest::Client::new().get(stack.url("/v1/me")).bearer_auth(&logged_in.token).send().await?).await?;
    ensure!(status == 200 && user["username"] == username && user["role"] == "user", "{status} {user}");
    ensure!(user.get("password_hash").is_none() && !user.to_string().contains("argon2"), "{user}");
    logged_in.id = user["id"].as_str().context("id")?.to_owned();
    logged_in.username = username.to_owned();
    Ok(logged_in)
}

/// Logs in (with extra request headers, such as `X-Forwarded-For`) and checks the tokens and
/// the three cookies with their flags.
pub async fn login(stack: &Stack, email: &str, password: &str, headers: &[(&str, &str)]) -> Result<User> {
    let mut request =
        reqwest::Client::new().post(stack.url("/v1/auth/login")).json(&json!({"email": email, "password": password}));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await?;
    let cookies = set_cookies(&response);
    let (status, login) = json(response).await?;
    ensure!(
        status == 200 && login["token_type"] == "Bearer" && login["expires_in"].as_u64() > Some(0),
        "{status} {login}"
    );
    let field = |name: &str| login[name].as_str().map(str::to_owned).with_context(|| format!("{name} in {login}"));
    let (token, refresh, csrf) = (field("access_token")?, field("refresh_token")?, field("csrf_token")?);
    let session = set_cookie(&cookies, "waveline_session")?;
    ensure!(session.starts_with(&format!("waveline_session={token};")), "{session}");
    for flag in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        ensure!(session.contains(flag), "the session cookie lacks {flag}: {session}");
    }
    let refresh_cookie = set_cookie(&cookies, "waveline_refresh")?;
    ensure!(refresh_cookie.starts_with(&format!("waveline_refresh={refresh};")), "{refresh_cookie}");
    for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/v1/auth"] {
        ensure!(refresh_cookie.contains(flag), "the refresh cookie lacks {flag}: {refresh_cookie}");
    }
    let csrf_cookie = set_cookie(&cookies, "waveline_csrf")?;
    ensure!(csrf_cookie.starts_with(&format!("waveline_csrf={csrf};")), "{csrf_cookie}");
    ensure!(
        csrf_cookie.contains("Secure") && csrf_cookie.contains("SameSite=Strict") && !csrf_cookie.contains("HttpOnly")
    );
    Ok(User {
        id: String::new(),
        username: String::new(),
        email: email.to_owned(),
        password: password.to_owned(),
        cookie: format!("waveline_session={token}"),
        token,
        csrf,
        refresh,
    })
}

/// A `multipart/form-data` body: text fields, then the file.
pub fn multipart(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = format!("wl-{}", unique());
    let mut body = Vec::new();
    for (name, value) in fields {
        let _ = write!(body, "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n");
    }
    if let Some((filename, bytes)) = file {
        let _ = write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\
             Content-Type: audio/mpeg\r\n\r\n"
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    let _ = write!(body, "--{boundary}--\r\n");
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub async fn upload(stack: &Stack, user: &User, fields: &[(&str, &str)], file: (&str, &[u8])) -> Result<(u16, Value)> {
    post_form(stack, user, fields, Some(file)).await
}

/// `POST /v1/tracks` with a form that may lack its file.
pub async fn post_form(
    stack: &Stack,
    user: &User,
    fields: &[(&str, &str)],
    file: Option<(&str, &[u8])>,
) -> Result<(u16, Value)> {
    let (content_type, body) = multipart(fields, file);
    json(
        reqwest::Client::new()
            .post(stack.url("/v1/tracks"))
            .bearer_auth(&user.token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?,
    )
    .await
}

/// Polls the status until `revision` is ready (at most 120 s); fails on `failed`.
pub async fn wait_ready(stack: &Stack, user: &User, id: &str, revision: i64) -> Result<Value> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) =
            json(client.get(stack.url(&format!("/v1/tracks/{id}/status"))).bearer_auth(&user.token).send().await?)
                .await?;
        ensure!(status == 200, "{status} {body}");
        if body["state"] == "ready" && body["revision"].as_i64() == Some(revision) {
            return Ok(body);
        }
        ensure!(body["state"] != "failed", "the track failed: {body}");
        ensure!(Instant::now() < deadline, "not ready after 120 s: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
