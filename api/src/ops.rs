//! Operations: liveness, readiness and metrics.

use std::time::Duration;

use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use crate::{AppState, ErrorBody};

#[derive(Tags)]
enum Tag {
    /// Health and metrics, for orchestrators and monitoring.
    Operations,
}

#[derive(Debug)]
pub struct Ops {
    pub state: AppState,
}

/// Each dependency's state.
#[derive(Debug, Object)]
struct Readiness {
    database: String,
    queue: String,
    storage: String,
    documents: String,
}

#[derive(ApiResponse)]
enum ReadyResponse {
    /// Every dependency answers.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// At least one does not; the message names which (the reason is in the server's log).
    #[oai(status = 503)]
    NotReady(Json<ErrorBody>),
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

async fn check<F, E>(probe: F) -> Result<(), String>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    }
}

#[OpenApi(tag = "Tag::Operations")]
impl Ops {
    /// The process is alive.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> PlainText<&'static str> {
        PlainText("ok")
    }

    /// The database, the queue, the storage and the document store answer.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self) -> ReadyResponse {
        let pool = self.state.tracks.pool().clone();
        let (database, queue, storage, documents) = tokio::join!(
            check(async move { sqlx::query("SELECT 1").execute(&pool).await.map(drop) }),
            check(async { self.state.queue.stats().await.map(drop) }),
            check(self.state.storage.ping()),
            check(self.state.documents.ping()),
        );
        // The answer names what is down; why (hosts, addresses, OS errors) goes to the log only.
        let failing: Vec<&str> =
            [("database", &database), ("queue", &queue), ("storage", &storage), ("documents", &documents)]
                .into_iter()
                .filter_map(|(name, result)| {
                    let err = result.as_ref().err()?;
                    tracing::warn!(dependency = name, error = %err, "readiness check failed");
                    Some(name)
                })
                .collect();
        if failing.is_empty() {
            ReadyResponse::Ready(Json(Readiness {
                database: "ok".into(),
                queue: "ok".into(),
                storage: "ok".into(),
                documents: "ok".into(),
            }))
        } else {
            ReadyResponse::NotReady(Json(ErrorBody::new("not_ready", format!("not reachable: {}", failing.join(", ")))))
        }
    }

    /// Prometheus metrics, text exposition format.
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self) -> PlainText<String> {
        PlainText((self.state.metrics)())
    }
}
