//! Support for the contract and end-to-end suites: each test gets its own database, bucket,
//! directory and queue topology, on the real services that `scripts/setup.sh` starts, and
//! removes them afterwards.
//!
//! The services are found through these variables, with the defaults `setup.sh` uses:
//!
//! | variable | default |
//! |---|---|
//! | `WAVELINE_TEST_DATABASE_URL` (an admin connection) | `postgres://postgres@127.0.0.1:5432/postgres` |
//! | `WAVELINE_TEST_AMQP_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `WAVELINE_TEST_S3_ENDPOINT` | `http://127.0.0.1:9900` |
//! | `WAVELINE_TEST_MONGODB_URL` (no database: tests add their own) | `mongodb://127.0.0.1:27017` |
//! | `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` | `waveline-test` / `waveline-test-secret` |
//!
//! A service that is down fails the test with a message saying which one: these suites never
//! skip.

pub mod audio;
pub mod fake_fcm;
pub mod fake_stripe;
pub mod images;
pub mod oauth_provider;
pub mod smtp_sink;
pub mod stack;
pub mod threads;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use waveline_shared::queue::Topology;
use waveline_shared::storage::{S3Credentials, S3Storage};

fn var_or(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|value| !value.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// An admin URL for PostgreSQL.
pub fn postgres_admin_url() -> String {
    var_or("WAVELINE_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
}

/// The RabbitMQ URL.
pub fn amqp_url() -> String {
    var_or("WAVELINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
}

/// The MongoDB server's URL (`nx-27017` in tests), without a database.
pub fn mongodb_url() -> String {
    var_or("WAVELINE_TEST_MONGODB_URL", "mongodb://127.0.0.1:27017")
}

/// A `documents` setting naming a MongoDB database of the test's own, and that database's
/// name (`wltest_<unique>`); drop it with [`remove_mongodb_database`].
pub fn test_documents_url() -> (String, String) {
    let name = format!("wltest_{}", unique());
    let url = match url::Url::parse(&mongodb_url()) {
        Ok(mut url) => {
            url.set_path(&format!("/{name}"));
            url.to_string()
        }
        Err(_) => format!("{}/{name}", mongodb_url().trim_end_matches('/')),
    };
    (url, name)
}

/// Drops a test's MongoDB database. Meant for `Drop` and clean-ups: it runs on a thread and
/// runtime of its own, bounded, and reports a failure on stderr rather than panicking.
pub fn remove_mongodb_database(name: String) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async move {
            let dropped = tokio::time::timeout(Duration::from_secs(20), async {
                let client = mongodb::Client::with_uri_str(mongodb_url()).await?;
                client.database(&name).drop().await
            })
            .await;
            if !matches!(dropped, Ok(Ok(()))) {
                eprintln!("could not drop the test MongoDB database {name}: {dropped:?}");
            }
        });
    });
    let _ = cleanup.join();
}

/// The S3-compatible server's endpoint.
pub fn s3_endpoint() -> String {
    var_or("WAVELINE_TEST_S3_ENDPOINT", "http://127.0.0.1:9900")
}

/// The S3 credentials `(access key, secret key)`.
pub fn s3_credentials() -> (String, String) {
    (var_or("AWS_ACCESS_KEY_ID", "waveline-test"), var_or("AWS_SECRET_ACCESS_KEY", "waveline-test-secret"))
}

/// A short unique suffix for names.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A database of the test's own, migrated, dropped when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// Creates `waveline_test_<unique>` and applies the migrations.
    pub async fn new() -> anyhow::Result<TestDb> {
        let admin_url = postgres_admin_url();
        let name = format!("waveline_test_{}", unique());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&admin_url)
            .await
            .with_context(|| format!("PostgreSQL is not reachable at {admin_url}; run scripts/setup.sh"))?;
        // `name` is ours: a fixed prefix and hex digits.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\""))).execute(&admin).await?;
        admin.close().await;
        let url = database_url(&admin_url, &name);
        let pool = PgPoolOptions::new().max_connections(5).connect(&url).await?;
        waveline_shared::db::migrate(&pool).await?;
        Ok(TestDb { name, url, pool })
    }
}

/// `admin_url` with its database replaced by `name`.
pub fn database_url(admin_url: &str, name: &str) -> String {
    match url::Url::parse(admin_url) {
        Ok(mut url) => {
            url.set_path(name);
            url.to_string()
        }
        Err(_) => admin_url.to_owned(),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // The test's runtime may be the one blocked in this drop, so the clean-up runs on a
        // thread and runtime of its own, and leaves the pool alone: `WITH (FORCE)` ends its
        // connections from the server side.
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async move {
                if let Ok(admin) = PgPoolOptions::new().max_connections(1).connect(&postgres_admin_url()).await {
                    let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")))
                        .execute(&admin)
                        .await;
                    admin.close().await;
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// Removes what a distributed stack made for itself on the shared services: its bucket (every
/// object, then the bucket) and its queues (the job queue with its retry and dead-letter
/// queues). Meant for `Drop`: it runs on a thread and runtime of its own, each step bounded,
/// and it reports failures on stderr rather than panicking.
pub fn remove_distributed(bucket: Option<S3Storage>, queue_name: Option<String>) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async move {
            let bound = Duration::from_secs(20);
            if let Some(name) = queue_name {
                let topology = Topology { name: name.clone(), expires: None };
                let removed = tokio::time::timeout(bound, async {
                    let queue = waveline_shared::queue::AmqpQueue::connect(
                        secrecy::SecretString::from(amqp_url()),
                        topology,
                        waveline_shared::queue::RetryPolicy::default(),
                    )
                    .await?;
                    queue.delete_topology().await
                })
                .await;
                if !matches!(removed, Ok(Ok(()))) {
                    eprintln!("could not delete the test queues {name}: {removed:?}");
                }
            }
            if let Some(bucket) = bucket {
                let removed = tokio::time::timeout(bound, bucket.destroy_bucket()).await;
                if !matches!(removed, Ok(Ok(()))) {
                    eprintln!("could not delete the test bucket {}: {removed:?}", bucket.bucket());
                }
            }
        });
    });
    let _ = cleanup.join();
}

/// A bucket of the test's own on the S3-compatible server.
pub async fn test_bucket() -> anyhow::Result<S3Storage> {
    let (access_key, secret_key) = s3_credentials();
    let credentials = S3Credentials::new(access_key, secret_key, None, None, "test");
    let storage = S3Storage::new(&format!("wl-test-{}", unique()), Some(&s3_endpoint()), "us-east-1", credentials);
    storage
        .ensure_bucket()
        .await
        .with_context(|| format!("the S3 server at {} is not answering; run scripts/setup.sh", s3_endpoint()))?;
    Ok(storage)
}

/// A queue topology of the test's own, removed by the broker ten minutes after last use
/// even if the test dies before its clean-up.
pub fn test_topology() -> Topology {
    Topology { name: format!("wltest.{}", unique()), expires: Some(Duration::from_secs(600)) }
}

/// A temporary directory that is removed when dropped.
pub fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("waveline-test-").tempdir()?)
}

/// The path of the `waveline` binary built for these tests.
pub fn waveline_bin() -> PathBuf {
    let mut path = std::env::current_exe().unwrap_or_default();
    path.pop();
    if path.ends_with("deps") {
        path.pop();
    }
    path.join("waveline")
}

/// A TCP relay between a client and a real server that a test can cut, to play a network
/// failure or a broker restart for this client alone (other tests share the broker).
#[derive(Debug, Clone)]
pub struct TcpProxy {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    refusing: Arc<Mutex<bool>>,
}

impl TcpProxy {
    /// Listens on a free loopback port and relays every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy = TcpProxy { addr: listener.local_addr()?, links: Arc::default(), refusing: Arc::default() };
        let links = proxy.links.clone();
        let refusing = proxy.refusing.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *refusing.lock().unwrap_or_else(|p| p.into_inner()) {
                    drop(client);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                links.lock().unwrap_or_else(|p| p.into_inner()).push(relay.abort_handle());
            }
        });
        Ok(proxy)
    }

    /// Cuts every open connection and refuses new ones for `outage`, in the background.
    pub fn outage(&self, outage: Duration) {
        *self.refusing.lock().unwrap_or_else(|p| p.into_inner()) = true;
        for link in self.links.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            link.abort();
        }
        let refusing = self.refusing.clone();
        tokio::spawn(async move {
            tokio::time::sleep(outage).await;
            *refusing.lock().unwrap_or_else(|p| p.into_inner()) = false;
        });
    }
}

/// A private S3-compatible server (s3s-fs) on a free loopback port, for tests that take the
/// storage away: stopping it fails only this test's requests.
#[derive(Debug)]
pub struct S3Server {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl S3Server {
    /// Starts the server and waits until it answers.
    pub fn start() -> anyhow::Result<S3Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut server = S3Server { port, dir: temp_dir()?, child: None };
        server.resume()?;
        Ok(server)
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port and data.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let bin = std::env::var("CARGO_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"))
            .join("bin/s3s-fs");
        let (access, secret) = s3_credentials();
        let child = std::process::Command::new(&bin)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--access-key",
                &access,
                "--secret-key",
                &secret,
            ])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}; run scripts/setup.sh", bin.display()))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "s3s-fs did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops it (SIGKILL): every request fails until [`S3Server::resume`].
    pub fn pause(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.pause();
    }
}
