//! The outbox relay: publishes the messages that state changes wrote to the outbox, with
//! confirms, and stamps them sent. A crash between commit and publish leaves the row unsent,
//! and the next pass (in any worker) publishes it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use waveline_shared::queue::JobQueue;

use crate::Context;

/// Relays until `stop` is cancelled.
pub async fn run(context: Arc<Context>, queue: Arc<dyn JobQueue>, every: Duration, stop: CancellationToken) {
    loop {
        match relay_once(&context, queue.as_ref()).await {
            Ok(sent) if sent > 0 => {
                tracing::debug!(sent, "relayed outbox messages");
                continue;
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "outbox relay failed; trying again"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One pass: up to 100 messages.
pub async fn relay_once(context: &Context, queue: &dyn JobQueue) -> Result<u64, waveline_shared::db::DbError> {
    publish(&context.outbox, queue, 100).await
}

/// Publishes up to `limit` unsent outbox rows to `queue`; returns how many went. The CLI
/// calls it after `import` and `reprocess` so their jobs need not wait for a worker's relay.
pub async fn publish(
    outbox: &waveline_shared::db::PgOutbox,
    queue: &dyn JobQueue,
    limit: i64,
) -> Result<u64, waveline_shared::db::DbError> {
    outbox.publish_to(queue, limit).await
}
