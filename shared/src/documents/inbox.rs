//! The documents of an account's inbox: one-to-one direct messages and notifications.
//!
//! - **Conversations** are between two accounts, and their id is derived from the pair
//!   ([`conversation_between`]), so both sides (and every replica) name the same conversation
//!   without creating it first. Each member has a summary (the conversation's last message and
//!   how far the member has read), which is what lists an account's conversations.
//! - **Messages** are idempotent by `(sender, client_id)`: a retried send returns the message
//!   the first one stored, never a second copy.
//! - **Notifications** are kept per account, at most [`NOTIFICATIONS_KEPT`] (the oldest go as
//!   new ones come), with a read marker: everything up to it is read.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::DocumentsError;
use crate::domain::{CommentId, ConversationId, MessageId, NotificationId, PlaylistId, TrackId, UserId};

/// The longest message body, in characters.
pub const MESSAGE_BODY_MAX_CHARS: usize = 2000;
/// The longest `client_id`, in characters (ASCII letters, digits, `-` and `_`).
pub const CLIENT_ID_MAX_CHARS: usize = 64;
/// The most notifications kept per account.
pub const NOTIFICATIONS_KEPT: usize = 1000;

/// The conversation of two accounts (the same whichever is first).
pub fn conversation_between(a: UserId, b: UserId) -> ConversationId {
    let (low, high) = if a.0 <= b.0 { (a.0, b.0) } else { (b.0, a.0) };
    let mut hash = Sha256::new();
    hash.update(b"waveline conversation\0");
    hash.update(low.as_bytes());
    hash.update(high.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    ConversationId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// A direct message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub recipient: UserId,
    pub body: String,
    /// The sender's idempotency key.
    pub client_id: String,
    pub created_at: DateTime<Utc>,
}

/// A message to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub sender: UserId,
    pub recipient: UserId,
    /// 1 to [`MESSAGE_BODY_MAX_CHARS`] characters.
    pub body: String,
    /// 1 to [`CLIENT_ID_MAX_CHARS`] of `[A-Za-z0-9_-]`.
    pub client_id: String,
    pub created_at: DateTime<Utc>,
}

/// What [`super::Documents::send_message`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub message: Message,
    /// `false` when this `(sender, client_id)` was sent before: `message` is that one.
    pub new: bool,
}

/// One of an account's conversations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub id: ConversationId,
    /// The other account.
    pub other: UserId,
    pub last_message: Message,
    /// Messages to this account after its read marker; exact.
    pub unread_count: u64,
}

/// A page of conversations, the latest message first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationPage {
    pub conversations: Vec<ConversationSummary>,
    pub next_cursor: Option<String>,
}

/// A page of a conversation's messages, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessagePage {
    pub messages: Vec<Message>,
    pub next_cursor: Option<String>,
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// `actor` follows the account now.
    Follow,
    /// `actor` liked the account's track or playlist.
    Like,
    /// `actor` reposted the account's track or playlist.
    Repost,
    /// `actor` commented on the account's track.
    Comment,
    /// `actor` replied to the account's comment.
    Reply,
    /// The account's track is ready.
    TrackReady,
    /// The account's track failed.
    TrackFailed,
    /// `actor` sent the account a message.
    Message,
}

impl NotificationKind {
    pub const ALL: [NotificationKind; 8] = [
        NotificationKind::Follow,
        NotificationKind::Like,
        NotificationKind::Repost,
        NotificationKind::Comment,
        NotificationKind::Reply,
        NotificationKind::TrackReady,
        NotificationKind::TrackFailed,
        NotificationKind::Message,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Follow => "follow",
            NotificationKind::Like => "like",
            NotificationKind::Repost => "repost",
            NotificationKind::Comment => "comment",
            NotificationKind::Reply => "reply",
            NotificationKind::TrackReady => "track_ready",
            NotificationKind::TrackFailed => "track_failed",
            NotificationKind::Message => "message",
        }
    }

    pub fn parse(text: &str) -> Option<NotificationKind> {
        NotificationKind::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// The object of a notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Subject {
    Nothing,
    Track {
        id: TrackId,
    },
    Playlist {
        id: PlaylistId,
    },
    /// A comment on a track.
    Comment {
        track: TrackId,
        comment: CommentId,
    },
    Conversation {
        id: ConversationId,
        message: MessageId,
    },
}

/// A notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub id: NotificationId,
    /// Whom it is for.
    pub user_id: UserId,
    pub kind: NotificationKind,
    /// Who did it (none for a track's processing).
    pub actor: Option<UserId>,
    pub subject: Subject,
    pub created_at: DateTime<Utc>,
}

/// A notification to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNotification {
    pub user_id: UserId,
    pub kind: NotificationKind,
    pub actor: Option<UserId>,
    pub subject: Subject,
    pub created_at: DateTime<Utc>,
}

/// A page of notifications, newest first, and how many are unread in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationPage {
    pub notifications: Vec<Notification>,
    pub next_cursor: Option<String>,
    /// Notifications after the account's read marker; exact.
    pub unread_count: u64,
}

/// Checks a message; returns its new id and stored time.
pub(crate) fn check_message(message: &NewMessage) -> Result<(MessageId, DateTime<Utc>), DocumentsError> {
    let chars = message.body.chars().count();
    if chars == 0 || chars > MESSAGE_BODY_MAX_CHARS {
        return Err(DocumentsError::Invalid {
            field: "body",
            reason: format!("1 to {MESSAGE_BODY_MAX_CHARS} characters expected, got {chars}"),
        });
    }
    let id = &message.client_id;
    if id.is_empty()
        || id.len() > CLIENT_ID_MAX_CHARS
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(DocumentsError::Invalid {
            field: "client_id",
            reason: format!("1 to {CLIENT_ID_MAX_CHARS} letters, digits, '-' or '_'"),
        });
    }
    if message.sender == message.recipient {
        return Err(DocumentsError::Invalid { field: "recipient", reason: "not the sender".into() });
    }
    let at = super::millis(message.created_at);
    Ok((MessageId(super::id_at(at)), at))
}

/// A new notification's id and stored time.
pub(crate) fn notification_id(notification: &NewNotification) -> (NotificationId, DateTime<Utc>) {
    let at = super::millis(notification.created_at);
    (NotificationId(super::id_at(at)), at)
}

/// The tags of these lists' cursors (see `Keyset`).
pub(crate) const MESSAGE_TAG: char = 'm';
pub(crate) const CONVERSATION_TAG: char = 'c';
pub(crate) const NOTIFICATION_TAG: char = 'o';

/// The keyset of a time-ordered id.
pub(crate) fn keyset_of(id: Uuid, at: DateTime<Utc>) -> super::Keyset {
    super::Keyset { key: at.timestamp_millis(), id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_is_the_same_from_either_side_and_differs_per_pair() {
        let (a, b, c) = (UserId::new(), UserId::new(), UserId::new());
        assert_eq!(conversation_between(a, b), conversation_between(b, a));
        assert_ne!(conversation_between(a, b), conversation_between(a, c));
        assert_eq!(conversation_between(a, b).0.get_version_num(), 8);
    }

    #[test]
    fn messages_are_checked() {
        let ok = NewMessage {
            sender: UserId::new(),
            recipient: UserId::new(),
            body: "hé".into(),
            client_id: "abc-1_2".into(),
            created_at: Utc::now(),
        };
        assert!(check_message(&ok).is_ok());
        for (body, client_id) in [
            (String::new(), "a".to_owned()),
            ("x".repeat(MESSAGE_BODY_MAX_CHARS + 1), "a".to_owned()),
            ("x".into(), String::new()),
            ("x".into(), "a".repeat(CLIENT_ID_MAX_CHARS + 1)),
            ("x".into(), "a b".to_owned()),
        ] {
            assert!(check_message(&NewMessage { body, client_id, ..ok.clone() }).is_err());
        }
        assert!(check_message(&NewMessage { recipient: ok.sender, ..ok.clone() }).is_err());
        for kind in NotificationKind::ALL {
            assert_eq!(NotificationKind::parse(kind.as_str()), Some(kind));
        }
    }
}
