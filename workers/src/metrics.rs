//! Worker metrics, recorded with the `metrics` facade; `waveline worker --metrics-listen`
//! installs the Prometheus exporter that serves them:
//!
//! - `waveline_jobs_total{result}`: jobs by result (`done`, `failed`, `retried`,
//!   `dead_lettered`, `requeued`, `redelivered`);
//! - `waveline_job_duration_seconds`: job duration histogram;
//! - `waveline_jobs_in_flight`: jobs running now;
//! - `waveline_push_sent_total{result}`: pushes by device and result (`sent`,
//!   `token_removed`, `rejected`, `retried`);
//! - `waveline_queue_ready`, `waveline_queue_dead`: queue depth and dead letters (polled).
//! - `waveline_pipeline_yielded_milliseconds_total`: how long the pipeline's threads have
//!   waited for a busy API (`pipeline_share_under_load`, embedded mode only).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use waveline_shared::queue::JobQueue;

/// Polls the queue's depth every 10 s into gauges until `stop` is cancelled.
pub async fn watch_queue_depth(queue: Arc<dyn JobQueue>, stop: CancellationToken) {
    loop {
        if let Ok(stats) = queue.stats().await {
            ::metrics::gauge!("waveline_queue_ready").set(stats.ready as f64);
            ::metrics::gauge!("waveline_queue_dead").set(stats.dead as f64);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}
