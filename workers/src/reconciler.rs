//! The reconciler: PostgreSQL is the record of truth, so whatever the queue lost is found
//! from the tracks' states. It runs in every worker, but one at a time across the fleet
//! (a PostgreSQL advisory lock), and:
//!
//! - publishes again tracks `queued` for longer than `queued_stale` (a lost message);
//! - releases tracks `processing` whose heartbeat is older than `heartbeat_stale` (a dead
//!   worker) and publishes them again, or fails them `retries_exhausted` when their attempts
//!   are spent.
//!
//! Images (artwork, avatars) pending or processing for longer than `queued_stale` are queued
//! again the same way. All go through the outbox, so the relay publishes them with confirms. It also forgets
//! direct uploads abandoned for an hour past their URL's expiry: their rows, and whatever
//! bytes reached storage; and it deletes bytes left under an upload key whose track no
//! longer awaits them (a URL used again after `complete`, or after the track went).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use waveline_shared::domain::TrackId;
use waveline_shared::storage::{UPLOADS_PREFIX, original_key, upload_key, upload_track};

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
        let images = waveline_shared::db::images::PgImages::new(context.tracks.pool().clone());
        match images.requeue_stale(options.queued_stale).await {
            Ok(0) => {}
            Ok(requeued) => tracing::warn!(requeued, "queued again image jobs the queue had lost"),
            Err(err) => tracing::warn!(error = %err, "cannot look for lost image jobs"),
        }
        sweep_abandoned_uploads(&context).await;
        sweep_stray_upload_objects(&context).await;
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
        for key in [upload_key(*id), original_key(*id)] {
            match context.storage.delete(&key).await {
                Ok(()) => tracing::info!(track = %id, %key, "forgot an abandoned upload"),
                // The row is gone; a leftover object costs only space.
                Err(err) => tracing::warn!(track = %id, error = %err, "cannot delete an abandoned upload's objects"),
            }
        }
    }
    ids.len()
}

/// Deletes objects under an upload key whose track is not awaiting its upload any more;
/// returns how many went.
pub async fn sweep_stray_upload_objects(context: &Context) -> usize {
    let objects = match context.storage.list_prefix(UPLOADS_PREFIX).await {
        Ok(objects) => objects,
        Err(err) => {
            tracing::warn!(error = %err, "cannot list direct-upload objects");
            return 0;
        }
    };
    if objects.is_empty() {
        return 0;
    }
    let ids: Vec<TrackId> = objects.iter().filter_map(|object| upload_track(&object.key)).collect();
    let awaiting = match context.tracks.awaiting_upload_among(&ids).await {
        Ok(awaiting) => awaiting,
        Err(err) => {
            tracing::warn!(error = %err, "cannot look up direct uploads");
            return 0;
        }
    };
    let mut removed = 0;
    for object in objects {
        if upload_track(&object.key).is_some_and(|id| awaiting.contains(&id)) {
            continue;
        }
        match context.storage.delete(&object.key).await {
            Ok(()) => {
                tracing::info!(key = %object.key, "deleted bytes sent to an upload URL after its upload ended");
                removed += 1;
            }
            Err(err) => tracing::warn!(key = %object.key, error = %err, "cannot delete a stray upload object"),
        }
    }
    removed
}
