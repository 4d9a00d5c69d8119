//! The `waveline` binary as an operator runs it: configuration errors, `migrate` and `check`
//! in the embedded configuration (filesystem + in-process queue) and the distributed one
//! (S3 + RabbitMQ + MongoDB documents), all against real services.

use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use waveline_tests::{
    TestDb, amqp_url, database_url, postgres_admin_url, remove_mongodb_database, s3_credentials, s3_endpoint, temp_dir,
    test_documents_url, unique, waveline_bin,
};

/// Runs `waveline ARGS` with only the given `WAVELINE_*` variables (none inherited).
fn waveline(args: &[&str], env: &[(&str, String)]) -> Result<Output> {
    let mut command = Command::new(waveline_bin());
    command.args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("WAVELINE_")) {
        command.env_remove(name);
    }
    let (access_key, secret_key) = s3_credentials();
    command.env("AWS_ACCESS_KEY_ID", access_key).env("AWS_SECRET_ACCESS_KEY", secret_key);
    for (name, value) in env {
        command.env(name, value);
    }
    command
        .output()
        .with_context(|| format!("cannot run {}; build it with `cargo build -p waveline`", waveline_bin().display()))
}

fn json_of(output: &Output) -> Result<Value> {
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("stdout is not JSON: {}", String::from_utf8_lossy(&output.stdout)))
}

#[test]
fn bad_configuration_names_the_setting_and_exits_2() -> Result<()> {
    let cases = [
        (
            "WAVELINE_STORAGE",
            "file://relative/objects",
            "WAVELINE_STORAGE: expected file:/// followed by an absolute directory",
        ),
        ("WAVELINE_QUEUE", "kafka://broker:9092", "WAVELINE_QUEUE: expected `memory` or an AMQP URL"),
        ("WAVELINE_LISTEN", "everywhere", "WAVELINE_LISTEN: expected a socket address"),
        ("WAVELINE_DATABASE_URL", "mysql://root:hunter2@db/wl", "WAVELINE_DATABASE_URL: expected a PostgreSQL URL"),
    ];
    for (name, value, message) in cases {
        let output = waveline(&["config"], &[(name, value.to_owned())])?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(output.status.code() == Some(2), "{name}={value}: exit {:?}", output.status.code());
        ensure!(stderr.contains(message), "{name}={value}: {stderr}");
        ensure!(!stderr.contains("hunter2"), "a password was echoed: {stderr}");
    }
    let dir = temp_dir()?;
    let file = dir.path().join("waveline.toml");
    std::fs::write(&file, "queue = \"memory\"\nstorage = \"s3://UPPER\"\n")?;
    let output = waveline(&["--config", file.to_str().unwrap_or_default(), "config"], &[])?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.code() == Some(2) && stderr.contains(&format!("storage (in {})", file.display())),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn config_shows_the_layers_with_secrets_redacted() -> Result<()> {
    let dir = temp_dir()?;
    let file = dir.path().join("waveline.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:7000\"\njob_max_attempts = 7\n")?;
    let output = waveline(
        &["--config", file.to_str().unwrap_or_default(), "config", "--json"],
        &[
            ("WAVELINE_LISTEN", "0.0.0.0:9000".to_owned()),
            ("WAVELINE_QUEUE", "amqp://guest:sekrit@mq.internal:5672/%2f".to_owned()),
            ("WAVELINE_STORAGE", "s3://media?endpoint=http://127.0.0.1:9000&region=eu-west-1".to_owned()),
        ],
    )?;
    ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let shown = json_of(&output)?;
    ensure!(shown["listen"] == "0.0.0.0:9000", "{shown}");
    ensure!(shown["job_max_attempts"] == 7, "{shown}");
    ensure!(shown["queue"] == "amqp://guest:***@mq.internal:5672/%2f", "{shown}");
    ensure!(shown["storage"]["kind"] == "s3" && shown["storage"]["bucket"] == "media", "{shown}");
    ensure!(!output.stdout.windows(6).any(|w| w == b"sekrit"));
    Ok(())
}

async fn migrate_then_check(
    env: &[(&str, String)],
    storage_backend: &str,
    queue_backend: &str,
    documents_backend: &str,
) -> Result<()> {
    let migrated = waveline(&["migrate", "--json"], env)?;
    ensure!(migrated.status.success(), "migrate: {}", String::from_utf8_lossy(&migrated.stderr));
    let report = json_of(&migrated)?;
    ensure!(report["database_created"] == true, "{report}");
    ensure!(report["applied"].as_array().is_some_and(|a| !a.is_empty()), "{report}");
    let again = json_of(&waveline(&["migrate", "--json"], env)?)?;
    ensure!(again["database_created"] == false && again["applied"] == serde_json::json!([]), "{again}");

    let checked = waveline(&["check", "--json"], env)?;
    let report = json_of(&checked)?;
    ensure!(checked.status.success() && report["ok"] == true, "{report}");
    let backends: Vec<(String, String)> = report["checks"]
        .as_array()
        .context("checks")?
        .iter()
        .map(|c| {
            (c["name"].as_str().unwrap_or_default().to_owned(), c["backend"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    ensure!(
        backends
            == [
                ("database".to_owned(), "postgres".to_owned()),
                ("storage".to_owned(), storage_backend.to_owned()),
                ("queue".to_owned(), queue_backend.to_owned()),
                ("documents".to_owned(), documents_backend.to_owned()),
                ("push".to_owned(), "fcm".to_owned()),
            ],
        "{backends:?}"
    );
    Ok(())
}

/// Drops a database the binary created.
async fn drop_database(name: &str) -> Result<()> {
    let admin = sqlx::PgPool::connect(&postgres_admin_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")))
        .execute(&admin)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_configuration_migrates_and_checks() -> Result<()> {
    let dir = temp_dir()?;
    let name = format!("waveline_test_{}", unique());
    let env = [
        ("WAVELINE_DATABASE_URL", database_url(&postgres_admin_url(), &name)),
        ("WAVELINE_STORAGE", format!("file://{}/objects", dir.path().display())),
        ("WAVELINE_QUEUE", "memory".to_owned()),
    ];
    let result = migrate_then_check(&env, "fs", "memory", "postgres").await;
    drop_database(&name).await?;
    result?;
    ensure!(dir.path().join("objects").is_dir(), "migrate did not prepare the storage directory");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_configuration_migrates_and_checks() -> Result<()> {
    let name = format!("waveline_test_{}", unique());
    let bucket = format!("wl-test-{}", unique());
    let (documents, mongo_name) = test_documents_url();
    let env = [
        ("WAVELINE_DATABASE_URL", database_url(&postgres_admin_url(), &name)),
        ("WAVELINE_STORAGE", format!("s3://{bucket}?endpoint={}&region=us-east-1", s3_endpoint())),
        ("WAVELINE_QUEUE", amqp_url()),
        ("WAVELINE_DOCUMENTS", documents.clone()),
    ];
    let result = migrate_then_check(&env, "s3", "amqp", "mongodb").await;
    let indexes = mongodb_indexes(&documents, &mongo_name).await;
    remove_mongodb_database(mongo_name);
    drop_database(&name).await?;
    // migrate created the bucket; remove it through the same API the tests use.
    let (access_key, secret_key) = s3_credentials();
    let storage = waveline_shared::storage::S3Storage::new(
        &bucket,
        Some(&s3_endpoint()),
        "us-east-1",
        waveline_shared::storage::S3Credentials::new(access_key, secret_key, None, None, "test"),
    );
    storage.destroy_bucket().await?;
    result?;
    // `migrate` (run twice above) created the indexes the queries need, once.
    let (comments, activities) = indexes?;
    ensure!(comments.len() == 5 && activities.len() == 3, "{comments:?} {activities:?}");
    Ok(())
}

/// The index keys of the `comments` and `activities` collections, read with the driver.
async fn mongodb_indexes(url: &str, database: &str) -> Result<(Vec<String>, Vec<String>)> {
    use futures::TryStreamExt;
    let db = mongodb::Client::with_uri_str(url).await?.database(database);
    let mut found = Vec::new();
    for collection in ["comments", "activities"] {
        let indexes: Vec<mongodb::IndexModel> =
            db.collection::<mongodb::bson::Document>(collection).list_indexes().await?.try_collect().await?;
        found.push(indexes.iter().map(|index| index.keys.to_string()).collect());
    }
    let activities = found.pop().unwrap_or_default();
    Ok((found.pop().unwrap_or_default(), activities))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_and_says_which_service_is_down() -> Result<()> {
    let test = TestDb::new().await?;
    let dir = temp_dir()?;
    let env = [
        ("WAVELINE_DATABASE_URL", test.url.clone()),
        ("WAVELINE_STORAGE", format!("file://{}/objects", dir.path().display())),
        // Nothing listens on port 1.
        ("WAVELINE_QUEUE", "amqp://guest:guest@127.0.0.1:1/%2f".to_owned()),
        ("WAVELINE_DOCUMENTS", "mongodb://127.0.0.1:1/waveline".to_owned()),
    ];
    let output = waveline(&["check", "--json"], &env)?;
    let report = json_of(&output)?;
    ensure!(output.status.code() == Some(1) && report["ok"] == false, "{report}");
    let checks = report["checks"].as_array().context("checks")?;
    let failing: Vec<&str> = checks.iter().filter(|c| c["ok"] == false).filter_map(|c| c["name"].as_str()).collect();
    ensure!(failing == ["queue", "documents"], "{report}");
    ensure!(checks[3]["backend"] == "mongodb", "{report}");
    ensure!(checks[2]["detail"].as_str().is_some_and(|d| d.contains("unreachable")), "{report}");
    Ok(())
}
