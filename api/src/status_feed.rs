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
//!
//! Those reads come from the feed's [`StatusCache`], not one query per stream: the cache holds
//! the latest status of each track a stream asked about, replaced by every notification for
//! it. A miss reads the database once, however many streams miss together (they share the
//! read). The cache is emptied whenever notifications may have been lost (the listener
//! reconnects) and is bypassed while the listener is down, so it never serves a status older
//! than the last one committed and heard. It holds at most [`CACHE_CAPACITY`] tracks; past
//! that it starts afresh.
//!
//! The same listener hears the session announcements of [`crate::session_cache`] (on its own
//! channel) and keeps the feed's [`SessionCache`] current: one listening connection per
//! process for both.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::Deserialize;
use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::broadcast;
use waveline_shared::db::{DbError, PgTracks, TrackDetails};
use waveline_shared::domain::TrackId;

use crate::session_cache::{self, SessionCache};

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
    /// Who owns the track and who may see it, for the access check of status polls.
    #[serde(default)]
    pub owner_id: Option<uuid::Uuid>,
    #[serde(default)]
    pub visibility: Option<String>,
    /// The status's ETag, computed on first use (a cached status is polled many times).
    #[serde(skip)]
    pub etag: std::sync::OnceLock<String>,
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
    cache: StatusCache,
    sessions: SessionCache,
    /// The listening routes' lookups, dropped for every track that changes.
    playables: std::sync::OnceLock<Arc<crate::media::PlayableCache>>,
}

impl StatusFeed {
    /// Starts listening (in the background, reconnecting on its own).
    pub fn start(pool: PgPool) -> Arc<StatusFeed> {
        let (sender, _) = broadcast::channel(4096);
        let feed = Arc::new(StatusFeed {
            sender,
            cache: StatusCache::default(),
            sessions: SessionCache::default(),
            playables: std::sync::OnceLock::new(),
        });
        let relay = feed.clone();
        tokio::spawn(async move { listen(pool, relay).await });
        feed
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.sender.subscribe()
    }

    /// A track's latest status (`None` when it does not exist): from the cache while the
    /// notifications keep it current, else from the database (one read for every caller
    /// that asks meanwhile).
    pub async fn status(&self, tracks: &PgTracks, id: TrackId) -> Result<Option<Arc<Announced>>, Arc<DbError>> {
        self.cache.status(tracks, id).await
    }

    /// Drops what the cache holds of `id`: this process just changed the track, and its next
    /// read must see the change even before the notification arrives (read-your-writes).
    pub fn forget(&self, id: TrackId) {
        self.cache.slots().remove(&id);
    }

    /// Keeps the listening routes' lookups current: every change heard drops the track's
    /// entries, before the status cache shows the change (so a client that saw a new revision
    /// go live in its status gets the new revision's bytes next), and a resync drops them all.
    pub fn keep_current(&self, playables: Arc<crate::media::PlayableCache>) {
        let _ = self.playables.set(playables);
    }

    /// The live sessions, kept current by the same listener.
    pub fn sessions(&self) -> &SessionCache {
        &self.sessions
    }

    fn set_live(&self, live: bool) {
        self.cache.set_live(live);
        self.sessions.set_live(live);
    }

    fn relay(&self, change: Change) {
        let playables = self.playables.get();
        match &change {
            Change::Status(announced) => {
                if let Some(playables) = playables {
                    playables.forget(announced.track());
                }
                self.cache.heard(announced);
            }
            Change::Resync => {
                if let Some(playables) = playables {
                    playables.clear();
                }
                self.cache.clear();
                self.sessions.clear();
            }
        }
        let _ = self.sender.send(change);
    }
}

/// How many tracks the [`StatusCache`] holds before it starts afresh.
pub const CACHE_CAPACITY: usize = 65_536;

type Load = Shared<BoxFuture<'static, Result<Option<Arc<Announced>>, Arc<DbError>>>>;

enum Slot {
    /// Read from the database by the load numbered so; callers wait for it.
    Loading(u64, Load),
    Known(Option<Arc<Announced>>),
}

/// The latest status of the tracks asked about, current while the listener is connected.
#[derive(Default)]
pub struct StatusCache {
    slots: Mutex<HashMap<TrackId, Slot>>,
    /// Whether notifications are being heard (else the cache is bypassed).
    live: AtomicBool,
    loads: AtomicU64,
}

impl std::fmt::Debug for StatusCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusCache").field("live", &self.live).finish_non_exhaustive()
    }
}

impl StatusCache {
    fn slots(&self) -> MutexGuard<'_, HashMap<TrackId, Slot>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A notification: the new status of a track (only tracks someone asked about are kept).
    fn heard(&self, announced: &Arc<Announced>) {
        if let Some(slot) = self.slots().get_mut(&announced.track()) {
            *slot = Slot::Known(Some(announced.clone()).filter(|announced| !announced.deleted));
        }
    }

    fn clear(&self) {
        self.slots().clear();
    }

    fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
        self.clear();
    }

    async fn status(&self, tracks: &PgTracks, id: TrackId) -> Result<Option<Arc<Announced>>, Arc<DbError>> {
        let read = |tracks: PgTracks| async move {
            match tracks.details(id).await {
                Ok(track) => Ok(track.map(|track| Arc::new(Announced::from(&track)))),
                Err(err) => Err(Arc::new(err)),
            }
        };
        if !self.live.load(Ordering::SeqCst) {
            metrics::counter!("waveline_status_cache_total", "result" => "bypass").increment(1);
            return read(tracks.clone()).await;
        }
        let (number, load) = {
            let mut slots = self.slots();
            match slots.get(&id) {
                Some(Slot::Known(status)) => {
                    metrics::counter!("waveline_status_cache_total", "result" => "hit").increment(1);
                    return Ok(status.clone());
                }
                Some(Slot::Loading(number, load)) => (*number, load.clone()),
                None => {
                    metrics::counter!("waveline_status_cache_total", "result" => "miss").increment(1);
                    if slots.len() >= CACHE_CAPACITY {
                        slots.clear();
                    }
                    let number = self.loads.fetch_add(1, Ordering::Relaxed);
                    let load = read(tracks.clone()).boxed().shared();
                    slots.insert(id, Slot::Loading(number, load.clone()));
                    (number, load)
                }
            }
        };
        let result = load.await;
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(&id)
            && matches!(slot, Slot::Loading(loading, _) if *loading == number)
        {
            // A notification heard meanwhile would have replaced the slot: what is read here
            // is the latest.
            match &result {
                Ok(status) => *slot = Slot::Known(status.clone()),
                Err(_) => {
                    slots.remove(&id);
                }
            }
        }
        result
    }
}

impl From<&TrackDetails> for Announced {
    fn from(track: &TrackDetails) -> Announced {
        Announced {
            id: track.id.0,
            deleted: false,
            state: Some(track.state.as_str().to_owned()),
            stage: track.stage.map(|stage| stage.as_str().to_owned()),
            progress: track.progress,
            attempts: track.attempts,
            revision: track.revision,
            error_code: track.error_code.clone(),
            // As the trigger announces it, so a status reads the same from either source.
            error_message: track.error_message.as_ref().map(|message| message.chars().take(2000).collect()),
            owner_id: Some(track.owner_id.0),
            visibility: Some(track.visibility.as_str().to_owned()),
            etag: std::sync::OnceLock::new(),
        }
    }
}

async fn listen(pool: PgPool, relay: Arc<StatusFeed>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for track status and session changes; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(err) = listener.listen_all([CHANNEL, session_cache::CHANNEL]).await {
            tracing::warn!(error = %err, "cannot listen for track status and session changes; retrying in 1 s");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything may have happened before (or between) listens.
        relay.set_live(true);
        relay.relay(Change::Resync);
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) if notification.channel() == session_cache::CHANNEL => {
                    match serde_json::from_str::<session_cache::Announced>(notification.payload()) {
                        Ok(announced) => relay.sessions.heard(&announced),
                        // Which session it meant is unknown: forget them all.
                        Err(err) => {
                            tracing::warn!(error = %err, "an unreadable session notification");
                            relay.sessions.clear();
                        }
                    }
                }
                Ok(Some(notification)) => match serde_json::from_str::<Announced>(notification.payload()) {
                    Ok(announced) => relay.relay(Change::Status(Arc::new(announced))),
                    Err(err) => tracing::warn!(error = %err, "an unreadable track status notification"),
                },
                // The connection dropped: notifications may be lost. Bypass the caches until a
                // new connection listens again (at once, by the outer loop).
                Ok(None) => {
                    tracing::warn!("the track status and session listener lost its connection; reconnecting");
                    relay.set_live(false);
                    relay.relay(Change::Resync);
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "the track status and session listener failed; reconnecting");
                    relay.set_live(false);
                    relay.relay(Change::Resync);
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
