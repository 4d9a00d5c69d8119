//! Domain identifiers and the track's processing states.
//!
//! The state machine is the one of DESIGN.md:
//! `awaiting_upload → uploaded → queued → processing → ready`, and `failed` from `queued` or
//! `processing`. Reprocessing moves a `ready` or `failed` track back to `queued` (a new
//! revision). A `processing` track goes back to `queued` only when its claim is released: a
//! transient failure waiting for its retry, or a worker whose heartbeat went stale. The
//! database enforces the same rules with a compare-and-set on every transition, fenced by the
//! claim's attempt number, so a late worker can never overwrite a newer claim.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered (UUIDv7) identifier.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

id_type!(
    /// Identifies a track.
    TrackId
);
id_type!(
    /// Identifies a user account.
    UserId
);
id_type!(
    /// Identifies a playlist.
    PlaylistId
);
id_type!(
    /// Identifies a timestamped comment (a document).
    CommentId
);
id_type!(
    /// Identifies an activity of the feed (a document).
    ActivityId
);
id_type!(
    /// Identifies a one-to-one conversation: derived from its two accounts, so both sides name
    /// the same one without coordinating.
    ConversationId
);
id_type!(
    /// Identifies a direct message (a document).
    MessageId
);
id_type!(
    /// Identifies a notification (a document).
    NotificationId
);

/// Where a track is in its life, as stored in `tracks.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackState {
    /// A row exists (e.g. a presigned upload was handed out) but no bytes yet.
    AwaitingUpload,
    /// The original is stored; the job is not yet enqueued.
    Uploaded,
    /// A processing job is (or should be) in the queue.
    Queued,
    /// A worker holds the job; see [`ProcessingStage`] and the progress percentage.
    Processing,
    /// Every rendition of the current revision is stored and recorded.
    Ready,
    /// Processing stopped for good; the row carries a code and a message.
    Failed,
}

impl TrackState {
    /// Every state, in life-cycle order.
    pub const ALL: [TrackState; 6] = [
        TrackState::AwaitingUpload,
        TrackState::Uploaded,
        TrackState::Queued,
        TrackState::Processing,
        TrackState::Ready,
        TrackState::Failed,
    ];

    /// The stored name (`awaiting_upload`, `queued`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TrackState::AwaitingUpload => "awaiting_upload",
            TrackState::Uploaded => "uploaded",
            TrackState::Queued => "queued",
            TrackState::Processing => "processing",
            TrackState::Ready => "ready",
            TrackState::Failed => "failed",
        }
    }

    /// Whether `self → next` is an allowed transition.
    ///
    /// `processing → queued` releases a claim (retry, or a dead worker's job reclaimed); it
    /// keeps the attempt count, which fences the released claim out.
    pub fn can_become(self, next: TrackState) -> bool {
        use TrackState::*;
        matches!(
            (self, next),
            (AwaitingUpload, Uploaded)
                | (Uploaded, Queued)
                | (Queued, Processing)
                | (Processing, Ready)
                | (Processing, Queued)
                | (Queued, Failed)
                | (Processing, Failed)
                // reprocessing: a new revision of a finished track
                | (Ready, Queued)
                | (Failed, Queued)
        )
    }

    /// Whether no worker will touch the track again unless someone reprocesses it.
    pub fn is_terminal(self) -> bool {
        matches!(self, TrackState::Ready | TrackState::Failed)
    }
}

impl fmt::Display for TrackState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored state name that is not one of [`TrackState`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown track state {0:?}; expected one of awaiting_upload, uploaded, queued, processing, ready, failed")]
pub struct UnknownState(pub String);

impl FromStr for TrackState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrackState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// What a `processing` track is doing right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingStage {
    Probing,
    Decoding,
    Analyzing,
    Encoding,
    Storing,
}

impl ProcessingStage {
    /// Every stage, in the order a job goes through them.
    pub const ALL: [ProcessingStage; 5] = [
        ProcessingStage::Probing,
        ProcessingStage::Decoding,
        ProcessingStage::Analyzing,
        ProcessingStage::Encoding,
        ProcessingStage::Storing,
    ];

    /// The stored name (`probing`, `decoding`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessingStage::Probing => "probing",
            ProcessingStage::Decoding => "decoding",
            ProcessingStage::Analyzing => "analyzing",
            ProcessingStage::Encoding => "encoding",
            ProcessingStage::Storing => "storing",
        }
    }
}

impl fmt::Display for ProcessingStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProcessingStage {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProcessingStage::ALL.into_iter().find(|stage| stage.as_str() == s).ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_happy_path_is_allowed_and_nothing_goes_backwards() {
        use TrackState::*;
        let path = [AwaitingUpload, Uploaded, Queued, Processing, Ready];
        for pair in path.windows(2) {
            assert!(pair[0].can_become(pair[1]), "{} → {}", pair[0], pair[1]);
        }
        for (from, to) in [(Uploaded, AwaitingUpload), (Queued, Uploaded), (Ready, Processing), (Ready, Uploaded)] {
            assert!(!from.can_become(to), "{from} → {to}");
        }
        assert!(Queued.can_become(Failed));
        assert!(Processing.can_become(Failed));
        assert!(!Uploaded.can_become(Failed));
        assert!(!Ready.can_become(Processing));
        assert!(Processing.can_become(Queued), "a released claim is queued again");
        for state in TrackState::ALL {
            assert!(!state.can_become(state), "{state} → itself");
        }
    }

    #[test]
    fn names_round_trip() {
        for state in TrackState::ALL {
            assert_eq!(state.as_str().parse::<TrackState>().ok(), Some(state));
            assert_eq!(serde_json::to_value(state).ok(), Some(serde_json::json!(state.as_str())));
        }
        for stage in ProcessingStage::ALL {
            assert_eq!(stage.as_str().parse::<ProcessingStage>().ok(), Some(stage));
        }
        assert!("done".parse::<TrackState>().is_err());
    }
}
