//! The reconciler: PostgreSQL is the record of truth, so whatever the queue lost is found
//! from the tracks' states. It runs in every worker, but one at a time across the fleet
//! (a PostgreSQL advisory lock), and:
//!
//! - publishes again tracks `queued` for longer than `queued_stale` (a lost message);
//! - releases tracks `processing` whose heartbeat is older than `heartbeat_stale` (a dead
//!   worker) and publishes them again, or fails them `retries_exhausted` when their attempts
//!   are spent.
//!
//! Both go through the outbox, so the relay publishes them with confirms.

use std::sync::Arc;

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
    }
}
