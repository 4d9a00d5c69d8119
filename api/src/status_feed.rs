//! Track status changes as they commit, for Server-Sent Events.
//!
//! A trigger announces every change of a track's state, stage, progress, attempts or
//! revision (and its deletion) on the PostgreSQL channel `waveline_track_status`, with the new
//! status as JSON. One listener per API process relays them to the open event streams through
//! a broadcast channel; each stream keeps the changes of its own track. So every worker's
//! update reaches the watchers in commit order, however brief the stage, and whichever replica
//! or worker made it.
//!
//! Notifications are not durable: while the listener reconnects, some may be lost. The feed
//! then sends [`Change::Resync`], and streams read their track again; a stream that has heard
//! nothing for a while reads it too, as a backstop.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::broadcast;
use waveline_shared::domain::TrackId;

/// The channel the trigger notifies.
pub const CHANNEL: &str = "waveline_track_status";

/// A track's status as the trigger announces it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Announced {
    pub id: uuid::Uuid,
    #[serde(default)]
    pub deleted: bool,
    #[serde(default)]
    pub state: Option<String>,
    pub stage: Option<String>,
    #[serde(default)]
    pub progress: i16,
    #[serde(default)]
    pub attempts: i32,
    #[serde(default)]
    pub revision: i32,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

/// What the feed relays.
#[derive(Debug, Clone)]
pub enum Change {
    /// A track's new status.
    Status(Arc<Announced>),
    /// Changes may have been missed: read the track again.
    Resync,
}

/// The process's relay of status changes.
#[derive(Debug)]
pub struct StatusFeed {
    sender: broadcast::Sender<Change>,
}

impl StatusFeed {
    /// Starts listening (in the background, reconnecting on its own).
    pub fn start(pool: PgPool) -> Arc<StatusFeed> {
        let (sender, _) = broadcast::channel(4096);
        let feed = Arc::new(StatusFeed { sender });
        let relay = feed.sender.clone();
        tokio::spawn(async move { listen(pool, relay).await });
        feed
    }

    /// A feed that never announces anything (streams fall back to reading the track).
    pub fn silent() -> Arc<StatusFeed> {
        Arc::new(StatusFeed { sender: broadcast::channel(1).0 })
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }
}

async fn listen(pool: PgPool, relay: broadcast::Sender<Change>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for track status changes; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(err) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %err, "cannot listen for track status changes; retrying in 1 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything may have happened before (or between) listens.
        let _ = relay.send(Change::Resync);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => match serde_json::from_str::<Announced>(notification.payload()) {
                    Ok(announced) => {
                        let _ = relay.send(Change::Status(Arc::new(announced)));
                    }
                    Err(err) => tracing::warn!(error = %err, "an unreadable track status notification"),
                },
                // The connection dropped and is back: notifications may be lost.
                Ok(None) => {
                    let _ = relay.send(Change::Resync);
                }
                Err(err) => {
                    tracing::warn!(error = %err, "the track status listener failed; reconnecting");
                    let _ = relay.send(Change::Resync);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

impl Announced {
    pub fn track(&self) -> TrackId {
        TrackId(self.id)
    }
}
