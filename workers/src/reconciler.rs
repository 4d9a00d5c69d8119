//! The reconciler: PostgreSQL is the record of truth, so whatever the queue lost is found
//! from the tracks' states. It runs in every worker, but one at a time across the fleet
//! (a PostgreSQL advisory lock), and:
//!
//! - publishes again tracks `queued` for longer than `queued_stale` (a lost message);
//! - releases tracks `processing` whose heartbeat is older than `heartbeat_stale` (a dead
//!   worker) and publishes them again, or fails them `retries_exhausted` when their attempts
//!   are spent.
//!
//! Both go through the outbox, so the relay publishes them with confirms. It also forgets
//! direct uploads abandoned for an hour past their URL's expiry: their rows, and whatever
//! bytes reached storage.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{Context, WorkerOptions};

/// Reconciles every `options.reconcile_every` until `stop` is cancelled.
pub async fn run(context: Arc<Context>, options: WorkerOptions, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(options.reconcile_every) => {}
        }
        match waveline_shared::db::reconcile(
            context.tracks.pool(),
            options.queued_stale,
            options.heartbeat_stale,
            options.max_attempts as i32,
        )
        .await
        {
            Ok(Some(done)) if done != Default::default() => {
                tracing::warn!(?done, "reconciled tracks the queue had lost")
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "reconciler pass failed"),
        }
        sweep_abandoned_uploads(&context).await;
    }
}

/// How long past its URL's expiry a direct upload is kept (clocks differ; a client may be
/// slow to say it is done).
pub const ABANDONED_GRACE: Duration = Duration::from_secs(3600);

/// Deletes abandoned direct uploads and their objects; returns how many went.
pub async fn sweep_abandoned_uploads(context: &Context) -> usize {
    let ids = match context.tracks.sweep_abandoned_uploads(ABANDONED_GRACE).await {
        Ok(ids) => ids,
        Err(err) => {
            tracing::warn!(error = %err, "cannot sweep abandoned uploads");
            return 0;
        }
    };
    for id in &ids {
        let prefix = format!("originals/{id}/");
        match context.storage.delete_prefix(&prefix).await {
            Ok(removed) => tracing::info!(track = %id, removed, "forgot an abandoned upload"),
            // The row is gone; a leftover object costs only space.
            Err(err) => tracing::warn!(track = %id, error = %err, "cannot delete an abandoned upload's objects"),
        }
    }
    ids.len()
}
