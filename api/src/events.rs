//! Server-Sent Events of a track's status: how many may be open, and what each one sends.
//!
//! Each stream holds a slot for as long as it is open: at most `event_streams_max` in the
//! process and `event_streams_per_client` per client address (the address the rate limiter
//! uses, so a trusted proxy's `X-Forwarded-For` counts). Past either, the request answers 429
//! `too_many_streams` with `Retry-After`. Counts go down the moment a stream ends or its client
//! goes away.
//!
//! A stream sends its track's changes as the [`StatusFeed`] relays them, and reads its track
//! through the feed's cache after a resync or 5 s of silence, so quiet streams cost the
//! database nothing while the notifications flow.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use waveline_shared::db::{PgTracks, Visibility};
use waveline_shared::domain::{TrackId, UserId};

use crate::slots::{self, Refusal, Slot, Slots};
use crate::status_feed::{Announced, Change, StatusFeed};
use crate::tracks::TrackStatus;

/// How many event streams may be open.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub per_process: u32,
    pub per_client: u32,
}

/// The open streams of the process, by client (an IPv6 one by its /64).
pub type StreamSlots = Slots<Option<IpAddr>>;

/// An open stream's place.
pub type StreamSlot = Slot<Option<IpAddr>>;

/// The process's stream places.
pub fn stream_slots(limits: StreamLimits) -> Arc<StreamSlots> {
    Slots::new(
        slots::Limits { total: limits.per_process, per_key: limits.per_client },
        Refusal {
            code: "too_many_streams",
            all_taken: "this server has as many event streams open as it allows",
            key_full: "this address has as many event streams open as it may",
            gauge: "waveline_event_streams_open",
            refused: "waveline_event_streams_refused_total",
        },
    )
}

/// How long an event stream waits without news before reading its track anyway.
const BACKSTOP: Duration = Duration::from_secs(5);

/// One event stream's view of its track.
pub(crate) struct Watch {
    pub(crate) id: TrackId,
    pub(crate) tracks: PgTracks,
    pub(crate) feed: Arc<StatusFeed>,
    pub(crate) changes: broadcast::Receiver<Change>,
    pub(crate) last: Option<TrackStatus>,
    pub(crate) pending: Option<TrackStatus>,
    pub(crate) finished: bool,
    /// Who watches: their account and whether they are an admin (`None`: anonymous).
    pub(crate) viewer: Option<(UserId, bool)>,
    /// Held while the stream is open.
    pub(crate) _slot: StreamSlot,
}

impl Watch {
    /// Whether the viewer may still see the track as `announced` (a status without its owner
    /// and visibility, from before they were announced, changes nothing).
    fn may_see(&self, announced: &Announced) -> bool {
        let visibility = announced.visibility.as_deref().and_then(Visibility::parse);
        match (announced.owner_id, visibility) {
            (Some(owner), Some(Visibility::Private)) => {
                self.viewer.is_some_and(|(viewer, admin)| admin || viewer.0 == owner)
            }
            _ => true,
        }
    }

    /// The next status to send: a change of this track, or nothing once it is finished or gone.
    pub(crate) async fn next(&mut self) -> Option<TrackStatus> {
        use tokio::sync::broadcast::error::RecvError;
        if self.finished {
            return None;
        }
        loop {
            if let Some(status) = self.pending.take()
                && self.last.as_ref() != Some(&status)
            {
                self.finished = status.is_final();
                self.last = Some(status.clone());
                return Some(status);
            }
            let read_again = match tokio::time::timeout(BACKSTOP, self.changes.recv()).await {
                Ok(Ok(Change::Status(announced))) if announced.track() == self.id => {
                    // Gone, or no longer the viewer's to see (made private): the stream ends.
                    if announced.deleted || !self.may_see(&announced) {
                        return None;
                    }
                    match TrackStatus::announced(&announced) {
                        Some(status) => {
                            self.pending = Some(status);
                            false
                        }
                        None => true,
                    }
                }
                Ok(Ok(Change::Status(_))) => false,
                // Changes may have been missed, or nothing was heard for a while.
                Ok(Ok(Change::Resync) | Err(RecvError::Lagged(_))) | Err(_) => true,
                Ok(Err(RecvError::Closed)) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    true
                }
            };
            if read_again {
                match self.feed.status(&self.tracks, self.id).await {
                    Ok(Some(announced)) if !self.may_see(&announced) => return None,
                    Ok(Some(announced)) => self.pending = TrackStatus::announced(&announced),
                    // Deleted meanwhile: the stream ends.
                    Ok(None) => return None,
                    Err(err) => tracing::warn!(error = %err, "cannot read the track's status; retrying"),
                }
            }
        }
    }
}
