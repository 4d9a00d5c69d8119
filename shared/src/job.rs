//! The job message: what travels through the queue, versioned.
//!
//! On the wire a job is one JSON object:
//! `{"v":1,"kind":"process_track","id":"…","track_id":"…","attempt":1,"enqueued_at":"…"}`, or
//! for a push `{"v":1,"kind":"push","id":"…","user_id":"…","push":{"title":"…","body":"…",
//! "data":{…}},"attempt":1,"enqueued_at":"…"}` (with `"remaining":["TOKEN",…]` once an attempt
//! reached some of the account's devices and not others), or for artwork and avatars
//! `{"v":1,"kind":"process_image","id":"…","subject":"track","subject_id":"…","version":"…",
//! "attempt":1,"enqueued_at":"…"}` (see [`crate::images`]).
//! `v` is the schema version and `kind` selects the job; both are read before anything else,
//! so a message from a newer or older producer is recognised as such and dead-lettered with a
//! reason instead of failing the consumer. `attempt` counts deliveries of this job that ended
//! in a retry, plus one: the first try is attempt 1.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{TrackId, UserId};
use crate::images::{ImageSubject, is_version};
use crate::push::{DeviceToken, MAX_DEVICES_PER_ACCOUNT, PushMessage};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// What a job asks a worker to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// Run the pipeline over a track's original and store its renditions.
    ProcessTrack { track_id: TrackId },
    /// Send a push notification to the devices of an account (see [`crate::push`]).
    Push {
        user_id: UserId,
        push: PushMessage,
        /// The devices still to reach, when an earlier attempt reached the others; absent, all
        /// of the account's devices.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remaining: Option<Vec<DeviceToken>>,
    },
    /// Make the served sizes of one version of an image (a track's or playlist's artwork, an
    /// account's avatar) from its original.
    ProcessImage {
        subject: ImageSubject,
        subject_id: Uuid,
        /// The version the job is for; a job for a version since replaced does nothing.
        version: String,
    },
}

impl Job {
    /// The wire name of the job's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Job::ProcessTrack { .. } => "process_track",
            Job::Push { .. } => "push",
            Job::ProcessImage { .. } => "process_image",
        }
    }

    /// The track the job is about, if it is about one (for log fields and dead letters).
    pub fn track_id(&self) -> Option<TrackId> {
        match self {
            Job::ProcessTrack { track_id } => Some(*track_id),
            // An image job never changes its track's processing state.
            Job::Push { .. } | Job::ProcessImage { .. } => None,
        }
    }

    /// The account the job is about, if it is about one (for log fields).
    pub fn user_id(&self) -> Option<UserId> {
        match self {
            Job::ProcessTrack { .. } => None,
            Job::Push { user_id, .. } => Some(*user_id),
            Job::ProcessImage { subject: ImageSubject::User, subject_id, .. } => Some(UserId(*subject_id)),
            Job::ProcessImage { .. } => None,
        }
    }

    /// What the types cannot say: a push names at most as many devices as an account keeps;
    /// an image's version is 32 hex digits (it becomes part of storage keys).
    fn check(&self) -> Result<(), PoisonMessage> {
        match self {
            Job::Push { remaining: Some(tokens), .. } if tokens.len() > MAX_DEVICES_PER_ACCOUNT => {
                Err(PoisonMessage::Malformed(format!("a push names at most {MAX_DEVICES_PER_ACCOUNT} devices")))
            }
            Job::ProcessImage { version, .. } if !is_version(version) => {
                Err(PoisonMessage::Malformed("an image version is 32 lowercase hex digits".into()))
            }
            _ => Ok(()),
        }
    }
}

/// The kinds this build knows; every [`Job`] variant's wire name.
pub const KNOWN_KINDS: &[&str] = &["process_track", "push", "process_image"];

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
        message.job.check()?;
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
    #[error("unknown job kind {0:?} (known: process_track, push, process_image)")]
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
    fn a_push_travels_flat_and_versioned_too() {
        use std::collections::BTreeMap;

        let user_id = UserId::new();
        let data = BTreeMap::from([("kind".to_owned(), "message".to_owned())]);
        let push = PushMessage::new("Ada", "hello", data).expect("push");
        let message = JobMessage::new(Job::Push { user_id, push: push.clone(), remaining: None });
        let value: serde_json::Value = serde_json::from_slice(&message.encode()).expect("json");
        assert_eq!(value["v"], 1);
        assert_eq!(value["kind"], "push");
        assert_eq!(value["user_id"], user_id.to_string());
        assert_eq!(value["push"], serde_json::json!({"title": "Ada", "body": "hello", "data": {"kind": "message"}}));
        assert!(value.get("remaining").is_none(), "{value}");
        assert_eq!(JobMessage::decode(&message.encode()), Ok(message.clone()));
        assert_eq!((message.job.kind(), message.job.track_id(), message.job.user_id()), ("push", None, Some(user_id)));

        let token = DeviceToken::parse("tok-1:x").expect("token");
        let narrowed = JobMessage::new(Job::Push { user_id, push, remaining: Some(vec![token]) });
        let value: serde_json::Value = serde_json::from_slice(&narrowed.encode()).expect("json");
        assert_eq!(value["remaining"], serde_json::json!(["tok-1:x"]));
        assert_eq!(JobMessage::decode(&narrowed.encode()), Ok(narrowed));
        for kind in KNOWN_KINDS {
            assert!(PoisonMessage::UnknownKind("x".into()).to_string().contains(kind), "{kind}");
        }
    }

    #[test]
    fn a_push_out_of_bounds_is_poison() {
        let id = Uuid::nil();
        let user = UserId::new();
        let envelope = |rest: &str| {
            format!(
                r#"{{"v":1,"kind":"push","id":"{id}","user_id":"{user}",{rest},"attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#
            )
        };
        let tokens: Vec<String> = (0..21).map(|i| format!("\"t{i}\"")).collect();
        let cases = [
            envelope(&format!(r#""push":{{"title":"{}"}}"#, "t".repeat(201))),
            envelope(r#""push":{"title":"t","data":{"google.x":"1"}}"#),
            envelope(r#""push":{"title":"t"},"remaining":["bad token"]"#),
            envelope(&format!(r#""push":{{"title":"t"}},"remaining":[{}]"#, tokens.join(","))),
            envelope(r#""track_id":"00000000-0000-0000-0000-000000000000""#),
        ];
        for payload in cases {
            let err = JobMessage::decode(payload.as_bytes()).expect_err("poison");
            assert_eq!(err.code(), "malformed", "{payload}");
        }
        JobMessage::decode(envelope(r#""push":{"title":"t"},"remaining":["a","b"]"#).as_bytes()).expect("valid");
    }

    #[test]
    fn an_image_job_travels_flat_and_versioned_and_checks_its_version() {
        let subject_id = Uuid::now_v7();
        let version = crate::images::new_version();
        let job = Job::ProcessImage { subject: ImageSubject::Playlist, subject_id, version: version.clone() };
        let message = JobMessage::new(job);
        let value: serde_json::Value = serde_json::from_slice(&message.encode()).expect("json");
        assert_eq!(value["v"], 1);
        assert_eq!(value["kind"], "process_image");
        assert_eq!(value["subject"], "playlist");
        assert_eq!(value["subject_id"], subject_id.to_string());
        assert_eq!(value["version"], version);
        assert_eq!(JobMessage::decode(&message.encode()), Ok(message.clone()));
        assert_eq!((message.job.kind(), message.job.track_id(), message.job.user_id()), ("process_image", None, None));
        let avatar = Job::ProcessImage { subject: ImageSubject::User, subject_id, version };
        assert_eq!(avatar.user_id(), Some(UserId(subject_id)));

        let id = Uuid::nil();
        let envelope = |rest: &str| {
            format!(
                r#"{{"v":1,"kind":"process_image","id":"{id}",{rest},"attempt":1,"enqueued_at":"2026-01-01T00:00:00Z"}}"#
            )
        };
        let good = r#""subject":"user","subject_id":"00000000-0000-0000-0000-000000000001","version":"0123456789abcdef0123456789abcdef""#;
        JobMessage::decode(envelope(good).as_bytes()).expect("valid");
        for bad in [
            r#""subject":"user","subject_id":"00000000-0000-0000-0000-000000000001","version":"../../originals""#,
            r#""subject":"user","subject_id":"00000000-0000-0000-0000-000000000001","version":"0123456789ABCDEF0123456789abcdef""#,
            r#""subject":"album","subject_id":"00000000-0000-0000-0000-000000000001","version":"0123456789abcdef0123456789abcdef""#,
            r#""subject":"user","version":"0123456789abcdef0123456789abcdef""#,
        ] {
            let err = JobMessage::decode(envelope(bad).as_bytes()).expect_err("poison");
            assert_eq!(err.code(), "malformed", "{bad}");
        }
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
