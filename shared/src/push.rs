//! Push notifications to offline devices: what a push says, whom it is for, and how it is
//! handed to the workers.
//!
//! A push is a job like any other (DESIGN.md: "push to offline devices — workers, through the
//! job queue"): [`Push::enqueue`] writes a [`Job::Push`](crate::job::Job::Push) to the outbox,
//! in the caller's transaction or on its own, the relay publishes it, and a worker sends it to
//! each of the account's devices through FCM (`workers/src/jobs/push.rs`). So a push survives
//! a crash of the process that asked for it, is retried when FCM is unavailable, and ends as a
//! dead letter an operator can replay when it can never be sent.
//!
//! Everything a push carries is bounded here, once, by [`PushMessage::new`] (and again when
//! a job is read from the queue), so that FCM never refuses a message for its size or keys
//! after it was accepted: FCM takes at most 4096 bytes of title, body and data together, and
//! keeps some data keys for itself.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::db::DbError;
use crate::domain::UserId;

/// The longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// The longest body, in characters.
pub const MAX_BODY_CHARS: usize = 1000;
/// The most data entries.
pub const MAX_DATA_ENTRIES: usize = 20;
/// The largest data entry (key and value), in bytes.
pub const MAX_DATA_ENTRY_BYTES: usize = 1024;
/// The largest push (title, body, data keys and values), in bytes: FCM's own limit.
pub const MAX_PUSH_BYTES: usize = 4096;
/// The longest device token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// The most devices an account keeps; registering another drops the least recently registered.
pub const MAX_DEVICES_PER_ACCOUNT: usize = 20;

/// Why a push or a device token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// A field of the push is out of bounds; the text names it and says what it accepts.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// Not a device token FCM could have issued.
    #[error("token: 1 to {MAX_TOKEN_BYTES} letters, digits, `_`, `:` and `-`")]
    InvalidToken,
    /// Not `android`, `ios` or `web`.
    #[error("platform: `android`, `ios` or `web`")]
    InvalidPlatform,
}

impl PushError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            PushError::Invalid { .. } => "invalid_push",
            PushError::InvalidToken => "invalid_device_token",
            PushError::InvalidPlatform => "invalid_platform",
        }
    }

    /// Always: the same input is refused again.
    pub fn is_permanent(&self) -> bool {
        true
    }

    fn invalid(field: &'static str, reason: impl Into<String>) -> PushError {
        PushError::Invalid { field, reason: reason.into() }
    }
}

/// What a push shows: a notification title and body, and string data for the app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedPush")]
pub struct PushMessage {
    title: String,
    body: String,
    data: BTreeMap<String, String>,
}

/// A push as read from a queue message, before its bounds are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UncheckedPush {
    title: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
}

impl TryFrom<UncheckedPush> for PushMessage {
    type Error = PushError;

    fn try_from(push: UncheckedPush) -> Result<PushMessage, PushError> {
        PushMessage::new(push.title, push.body, push.data)
    }
}

impl PushMessage {
    /// A push, if it is within bounds: a title of 1 to 200 characters and a body of at most
    /// 1000 (no control characters but line breaks and tabs in the body), at most 20 data
    /// entries of at most 1 KiB each, keys that FCM does not keep for itself (`from`,
    /// `notification`, `message_type`, and any starting with `google` or `gcm`), and at most
    /// 4096 bytes in all.
    pub fn new(
        title: impl Into<String>,
        body: impl Into<String>,
        data: BTreeMap<String, String>,
    ) -> Result<PushMessage, PushError> {
        let (title, body) = (title.into(), body.into());
        let chars = title.chars().count();
        if chars == 0 || chars > MAX_TITLE_CHARS {
            return Err(PushError::invalid("title", format!("1 to {MAX_TITLE_CHARS} characters, got {chars}")));
        }
        if title.chars().any(char::is_control) {
            return Err(PushError::invalid("title", "no control characters"));
        }
        let chars = body.chars().count();
        if chars > MAX_BODY_CHARS {
            return Err(PushError::invalid("body", format!("at most {MAX_BODY_CHARS} characters, got {chars}")));
        }
        if body.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\t')) {
            return Err(PushError::invalid("body", "no control characters but line breaks and tabs"));
        }
        if data.len() > MAX_DATA_ENTRIES {
            return Err(PushError::invalid("data", format!("at most {MAX_DATA_ENTRIES} entries, got {}", data.len())));
        }
        for (key, value) in &data {
            if key.is_empty() || key.chars().any(char::is_control) {
                return Err(PushError::invalid("data", "keys are non-empty, without control characters"));
            }
            if key.len() + value.len() > MAX_DATA_ENTRY_BYTES {
                return Err(PushError::invalid(
                    "data",
                    format!("entry {key:?}: at most {MAX_DATA_ENTRY_BYTES} bytes of key and value"),
                ));
            }
            if reserved_key(key) {
                return Err(PushError::invalid("data", format!("key {key:?} is reserved by FCM")));
            }
        }
        let bytes = title.len() + body.len() + data.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        if bytes > MAX_PUSH_BYTES {
            return Err(PushError::invalid(
                "push",
                format!("title, body and data take {bytes} bytes; FCM takes at most {MAX_PUSH_BYTES}"),
            ));
        }
        Ok(PushMessage { title, body, data })
    }

    pub fn title(&self) -> &str {
        &self.title
    }

    pub fn body(&self) -> &str {
        &self.body
    }

    pub fn data(&self) -> &BTreeMap<String, String> {
        &self.data
    }
}

/// Data keys FCM uses itself and refuses in a message.
fn reserved_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    matches!(lower.as_str(), "from" | "notification" | "message_type")
        || lower.starts_with("google")
        || lower.starts_with("gcm")
}

/// An FCM registration token: what an app install hands the API to be reached at.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type)]
#[serde(try_from = "String", into = "String")]
#[sqlx(transparent)]
pub struct DeviceToken(String);

impl DeviceToken {
    /// A token: 1 to 4096 bytes of the alphabet FCM issues tokens in (letters, digits, `_`,
    /// `:` and `-`).
    pub fn parse(text: &str) -> Result<DeviceToken, PushError> {
        let valid = !text.is_empty()
            && text.len() <= MAX_TOKEN_BYTES
            && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'-'));
        if valid { Ok(DeviceToken(text.to_owned())) } else { Err(PushError::InvalidToken) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceToken {
    type Error = PushError;

    fn try_from(text: String) -> Result<DeviceToken, PushError> {
        DeviceToken::parse(&text)
    }
}

impl From<DeviceToken> for String {
    fn from(token: DeviceToken) -> String {
        token.0
    }
}

impl fmt::Display for DeviceToken {
    /// Only the start of the token: enough to tell devices apart in logs, not to reach one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: String = self.0.chars().take(8).collect();
        write!(f, "{shown}…")
    }
}

/// What kind of app a device token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Android,
    Ios,
    Web,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Android => "android",
            Platform::Ios => "ios",
            Platform::Web => "web",
        }
    }
}

impl FromStr for Platform {
    type Err = PushError;

    fn from_str(text: &str) -> Result<Platform, PushError> {
        match text {
            "android" => Ok(Platform::Android),
            "ios" => Ok(Platform::Ios),
            "web" => Ok(Platform::Web),
            _ => Err(PushError::InvalidPlatform),
        }
    }
}

/// Whether this deployment sends pushes, and the way to ask for one.
///
/// Pushes are on when `fcm_credentials_file` is set. Off, [`Push::enqueue`] returns at once
/// without a query: callers need not check first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Push {
    on: bool,
}

impl Push {
    /// Pushes are never sent.
    pub const OFF: Push = Push { on: false };

    /// On or off as given (a worker knows from its FCM client).
    pub fn new(on: bool) -> Push {
        Push { on }
    }

    /// On when `fcm_credentials_file` is set.
    pub fn from_settings(settings: &Settings) -> Push {
        Push { on: settings.fcm_credentials_file.is_some() }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Asks for `message` to be pushed to every device of `user`: writes the job to the
    /// outbox through `db` (the pool, or `&mut *tx` to make it part of a transaction: the push
    /// then exists if and only if the transaction commits). The outbox relay of any worker
    /// publishes it within its next pass; an API handler calls `publish_soon` after its commit
    /// to publish at once.
    ///
    /// Returns whether a job was written: not when pushes are off (no query at all), nor when
    /// the account has no device (one query, no job).
    pub async fn enqueue<'c, E>(&self, db: E, user: UserId, message: &PushMessage) -> Result<bool, DbError>
    where
        E: sqlx::PgExecutor<'c>,
    {
        if !self.on {
            return Ok(false);
        }
        let job = crate::job::Job::Push { user_id: user, push: message.clone(), remaining: None };
        let payload =
            serde_json::to_value(crate::job::JobMessage::new(job)).map_err(|err| DbError::Invalid(err.to_string()))?;
        let written = sqlx::query(
            "INSERT INTO outbox (payload) SELECT $1 WHERE EXISTS (SELECT 1 FROM devices WHERE user_id = $2)",
        )
        .bind(payload)
        .bind(user)
        .execute(db)
        .await?;
        Ok(written.rows_affected() == 1)
    }
}

/// The push that tells of a notification, for an account with no live socket: a title and a
/// body by kind (`actor` is who did it; `preview`, a message's text, cut to fit), and in
/// `data` the notification's type and ids, for the app to open the right screen.
pub fn for_notification(
    notification: &crate::documents::Notification,
    actor: Option<&str>,
    preview: Option<&str>,
) -> Result<PushMessage, PushError> {
    use crate::documents::{NotificationKind, Subject};
    let who = actor.unwrap_or("Someone");
    let (title, body) = match notification.kind {
        NotificationKind::Follow => ("New follower".to_owned(), format!("{who} followed you")),
        NotificationKind::Like => ("New like".to_owned(), format!("{who} liked your work")),
        NotificationKind::Repost => ("New repost".to_owned(), format!("{who} reposted your work")),
        NotificationKind::Comment => ("New comment".to_owned(), format!("{who} commented on your track")),
        NotificationKind::Reply => ("New reply".to_owned(), format!("{who} replied to your comment")),
        NotificationKind::TrackReady => ("Track ready".to_owned(), "Your track is ready to play".to_owned()),
        NotificationKind::TrackFailed => ("Track failed".to_owned(), "Your track could not be processed".to_owned()),
        NotificationKind::Message => {
            let text: String = preview.unwrap_or_default().chars().filter(|c| !c.is_control()).take(200).collect();
            (who.chars().take(MAX_TITLE_CHARS).collect(), if text.is_empty() { "New message".to_owned() } else { text })
        }
    };
    let mut data = BTreeMap::new();
    data.insert("type".to_owned(), notification.kind.as_str().to_owned());
    data.insert("notification_id".to_owned(), notification.id.to_string());
    match notification.subject {
        Subject::Nothing => {}
        Subject::Track { id } => {
            data.insert("track_id".to_owned(), id.to_string());
        }
        Subject::Playlist { id } => {
            data.insert("playlist_id".to_owned(), id.to_string());
        }
        Subject::Comment { track, comment } => {
            data.insert("track_id".to_owned(), track.to_string());
            data.insert("comment_id".to_owned(), comment.to_string());
        }
        Subject::Conversation { id, message } => {
            data.insert("conversation_id".to_owned(), id.to_string());
            data.insert("message_id".to_owned(), message.to_string());
        }
    }
    PushMessage::new(title, body, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn refused(title: &str, body: &str, entries: BTreeMap<String, String>) -> String {
        match PushMessage::new(title, body, entries) {
            Ok(push) => panic!("accepted {push:?}"),
            Err(err) => {
                assert_eq!(err.code(), "invalid_push");
                err.to_string()
            }
        }
    }

    #[test]
    fn a_push_is_bounded_field_by_field() {
        let push = PushMessage::new("New message", "hi\nthere", data(&[("kind", "message"), ("id", "42")]))
            .expect("within bounds");
        assert_eq!((push.title(), push.body(), push.data().len()), ("New message", "hi\nthere", 2));
        PushMessage::new("é".repeat(MAX_TITLE_CHARS), "", BTreeMap::new()).expect("200 characters, 400 bytes");
        PushMessage::new("t", "b".repeat(MAX_BODY_CHARS), BTreeMap::new()).expect("1000 characters");

        assert!(refused("", "b", BTreeMap::new()).starts_with("title: 1 to 200"));
        assert!(refused(&"t".repeat(201), "", BTreeMap::new()).starts_with("title: 1 to 200 characters, got 201"));
        assert!(refused("a\u{0}b", "", BTreeMap::new()).starts_with("title: no control"));
        assert!(refused("t", &"b".repeat(1001), BTreeMap::new()).starts_with("body: at most 1000"));
        assert!(refused("t", "a\u{7}", BTreeMap::new()).starts_with("body: no control"));
        let many: BTreeMap<String, String> = (0..21).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(refused("t", "", many).starts_with("data: at most 20 entries, got 21"));
        assert!(refused("t", "", data(&[("k", &"v".repeat(1024))])).contains("at most 1024 bytes"));
        for key in ["from", "notification", "message_type", "google.sent_time", "GCM.x", ""] {
            assert!(refused("t", "", data(&[(key, "v")])).starts_with("data: "), "{key:?}");
        }
        // Each part within its bound, but more than FCM takes in all.
        let big: BTreeMap<String, String> = (0..5).map(|i| (format!("k{i}"), "v".repeat(1000))).collect();
        assert!(refused("t", "", big).starts_with("push: title, body and data take"));
    }

    #[test]
    fn a_push_read_from_a_queue_message_is_bounded_too() {
        let push: PushMessage =
            serde_json::from_value(serde_json::json!({"title": "t", "body": "b", "data": {"k": "v"}})).expect("valid");
        assert_eq!(push.data()["k"], "v");
        for bad in [
            serde_json::json!({"title": "t".repeat(201)}),
            serde_json::json!({"title": "t", "data": {"from": "x"}}),
            serde_json::json!({"title": "t", "sound": "x"}),
            serde_json::json!({"body": "no title"}),
        ] {
            assert!(serde_json::from_value::<PushMessage>(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_tokens_are_fcm_shaped() {
        let token = "fMEP0vJqS0:APA91bH-x_y";
        assert_eq!(DeviceToken::parse(token).expect("an FCM token").as_str(), token);
        DeviceToken::parse(&"a".repeat(MAX_TOKEN_BYTES)).expect("4096 bytes");
        for bad in ["", "has space", "slash/y", "dot.y", "é", "new\nline", &"a".repeat(MAX_TOKEN_BYTES + 1)] {
            assert_eq!(DeviceToken::parse(bad), Err(PushError::InvalidToken), "{bad:?}");
        }
        assert_eq!(DeviceToken::parse("abcdefghijkl").expect("token").to_string(), "abcdefgh…");
        assert_eq!("ios".parse::<Platform>(), Ok(Platform::Ios));
        assert_eq!("iOS".parse::<Platform>(), Err(PushError::InvalidPlatform));
    }
}
