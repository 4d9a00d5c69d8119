//! The job message: what travels through the queue, versioned.
//!
//! On the wire a job is one JSON object:
//! `{"v":1,"kind":"process_track","id":"…","track_id":"…","attempt":1,"enqueued_at":"…"}`.
//! `v` is the schema version and `kind` selects the job; both are read before anything else,
//! so a message from a newer or older producer is recognised as such and dead-lettered with a
//! reason instead of failing the consumer. `attempt` counts deliveries of this job that ended
//! in a retry, plus one: the first try is attempt 1.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::TrackId;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// What a job asks a worker to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// Run the pipeline over a track's original and store its renditions.
    ProcessTrack { track_id: TrackId },
}

impl Job {
    /// The wire name of the job's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Job::ProcessTrack { .. } => "process_track",
        }
    }

    /// The track the job is about, for log fields.
    pub fn track_id(&self) -> TrackId {
        match self {
            Job::ProcessTrack { track_id } => *track_id,
        }
    }
}

/// The kinds this build knows, for error messages.
const KNOWN_KINDS: &[&str] = &["process_track"];

/// A job with its envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    /// Schema version, always [`SCHEMA_VERSION`] when written by this build.
    pub v: u32,
    /// Identifies this job across retries and dead-lettering.
    pub id: Uuid,
    #[serde(flatten)]
    pub job: Job,
    /// 1 for the first try, incremented by each retry.
    pub attempt: u32,
    /// When the job was first enqueued (kept across retries), to measure queueing delay.
    pub enqueued_at: DateTime<Utc>,
}

impl JobMessage {
    /// A first attempt at `job`.
    pub fn new(job: Job) -> JobMessage {
        JobMessage { v: SCHEMA_VERSION, id: Uuid::now_v7(), job, attempt: 1, enqueued_at: Utc::now() }
    }

    /// The JSON payload.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a payload, telling apart what cannot be read at all from a version or kind
    /// this build does not know.
    pub fn decode(payload: &[u8]) -> Result<JobMessage, PoisonMessage> {
        let value: serde_json::Value =
            serde_json::from_slice(payload).map_err(|err| PoisonMessage::NotJson(err.to_string()))?;
        let Some(object) = value.as_object() else {
            return Err(PoisonMessage::Malformed("the payload is not a JSON object".into()));
        };
        match object.get("v").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(SCHEMA_VERSION) => {}
            Some(v) => return Err(PoisonMessage::UnsupportedVersion(v)),
            None => {
                return Err(PoisonMessage::Malformed("missing or non-integer `v`".into()));
            }
        }
        match object.get("kind").and_then(serde_json::Value::as_str) {
            Some(kind) if KNOWN_KINDS.contains(&kind) => {}
            Some(kind) => return Err(PoisonMessage::UnknownKind(kind.to_owned())),
            None => {
                return Err(PoisonMessage::Malformed("missing or non-string `kind`".into()));
            }
        }
        let message: JobMessage =
            serde_json::from_value(value).map_err(|err| PoisonMessage::Malformed(err.to_string()))?;
        if message.attempt == 0 {
            return Err(PoisonMessage::Malformed("`attempt` starts at 1".into()));
        }
        Ok(message)
    }
}

/// Why a payload cannot be handled by this build; such messages are dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoisonMessage {
    #[error("the payload is not JSON: {0}")]
    NotJson(String),
    #[error("schema version {0} is not supported (this build reads version {SCHEMA_VERSION})")]
    UnsupportedVersion(u64),
    #[error("unknown job kind {0:?} (known: process_track)")]
    UnknownKind(String),
    #[error("malformed job message: {0}")]
    Malformed(String),
}

impl PoisonMessage {
    /// Stable code, recorded with the dead letter.
    pub fn code(&self) -> &'static str {
        match self {
            PoisonMessage::NotJson(_) => "not_json",
            PoisonMessage::UnsupportedVersion(_) => "unsupported_version",
            PoisonMessage::UnknownKind(_) => "unknown_kind",
            PoisonMessage::Malformed(_) => "malformed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_is_flat_and_versioned() {
        let track_id = TrackId::new();
        let message = JobMessage::new(Job::ProcessTrack { track_id });
        let value: serde_json::Value = serde_json::from_slice(&message.encode()).expect("json");
        assert_eq!(value["v"], 1);
        assert_eq!(value["kind"], "process_track");
        assert_eq!(value["track_id"], track_id.to_string());
        assert_eq!(value["attempt"], 1);
        assert_eq!(JobMessage::decode(&message.encode()), Ok(message));
    }

    #[test]
    fn foreign_payloads_are_told_apart() {
        let id = Uuid::nil();
        let track = TrackId::new();
        let cases: [(&[u8], &str); 6] = [
            (b"\xff\x00garbage", "not_json"),
            (b"[1,2]", "malformed"),
            (br#"{"kind":"process_track"}"#, "malformed"),
            (format!(r#"{{"v":2,"kind":"process_track","id":"{id}","track_id":"{track}","attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#).leak().as_bytes(), "unsupported_version"),
            (format!(r#"{{"v":1,"kind":"transcode_video","id":"{id}","track_id":"{track}","attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#).leak().as_bytes(), "unknown_kind"),
            (format!(r#"{{"v":1,"kind":"process_track","id":"{id}","track_id":"not-a-uuid","attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#).leak().as_bytes(), "malformed"),
        ];
        for (payload, code) in cases {
            let err = JobMessage::decode(payload).expect_err("poison");
            assert_eq!(err.code(), code, "{}", String::from_utf8_lossy(payload));
        }
    }
}
