//! Direct messages and notifications over REST (documents), for clients without a socket;
//! the socket ([`crate::realtime`]) sends and receives the same things live.
//!
//! - **Who may message whom.** Conversations are one-to-one. An account's `messages_from`
//!   setting (`PATCH /v1/me`) says who may write to it: `everyone`, or only the accounts it
//!   follows (403 `messages_restricted`). A block, either way, answers 403 `blocked`. Sends
//!   count against the account's social write rate.
//! - **Stored, then acknowledged.** A message is in the document store before the answer (or
//!   the socket's `message.new`) goes out, and a retried send with the same `client_id` gets
//!   the first message back (200 rather than 201), never a copy.
//! - **Notifications** are written for a new follower, a like or repost of your track or
//!   playlist, a comment on your track, a reply to your comment, your track ready or failed,
//!   and a new message; each is published live to the account's sockets.

use chrono::{DateTime, Utc};
use poem::http::StatusCode;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi, Tags};
use waveline_shared::bus::Event;
use waveline_shared::db::social::MessagesFrom;
use waveline_shared::documents::{Message, NewMessage, NewNotification, Notification, NotificationKind, Subject};
use waveline_shared::domain::{ConversationId, MessageId, NotificationId, UserId};

use crate::AppState;
use crate::auth::{Auth, Session};
use crate::error::ApiError;
use crate::social::{Done, UserSummaryView, account, page_limit};

#[derive(Tags)]
enum Tag {
    /// Direct messages and notifications.
    Inbox,
}

/// The inbox routes.
#[derive(Debug)]
pub struct Inbox {
    pub state: AppState,
}

/// A direct message.
#[derive(Debug, Clone, Object, serde::Serialize)]
pub struct MessageView {
    pub id: String,
    pub conversation_id: String,
    pub sender_id: String,
    pub recipient_id: String,
    pub body: String,
    /// The sender's idempotency key.
    pub client_id: String,
    pub created_at: DateTime<Utc>,
}

impl From<&Message> for MessageView {
    fn from(message: &Message) -> MessageView {
        MessageView {
            id: message.id.to_string(),
            conversation_id: message.conversation_id.to_string(),
            sender_id: message.sender.to_string(),
            recipient_id: message.recipient.to_string(),
            body: message.body.clone(),
            client_id: message.client_id.clone(),
            created_at: message.created_at,
        }
    }
}

/// A message to send.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct MessageSend {
    /// 1–2000 characters.
    body: String,
    /// Your idempotency key, 1–64 of `[A-Za-z0-9_-]`: sending again with it returns the first
    /// message.
    client_id: String,
}

/// One of your conversations.
#[derive(Debug, Object)]
struct ConversationView {
    id: String,
    /// The other account.
    user: UserSummaryView,
    last_message: MessageView,
    /// Messages to you after what you marked read.
    unread_count: u64,
}

/// A page of conversations, the latest message first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct ConversationPage {
    conversations: Vec<ConversationView>,
    next_cursor: Option<String>,
}

/// A page of messages, newest first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct MessagePage {
    messages: Vec<MessageView>,
    /// Pass as `before` for older messages; absent on the last page.
    next_cursor: Option<String>,
}

/// How far you have read.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct ReadUpTo {
    /// A message id (for a conversation) or notification id: it and everything before it are
    /// read.
    up_to: String,
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, serde::Serialize)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum NotificationType {
    Follow,
    Like,
    Repost,
    Comment,
    Reply,
    TrackReady,
    TrackFailed,
    Message,
}

impl From<NotificationKind> for NotificationType {
    fn from(kind: NotificationKind) -> NotificationType {
        match kind {
            NotificationKind::Follow => NotificationType::Follow,
            NotificationKind::Like => NotificationType::Like,
            NotificationKind::Repost => NotificationType::Repost,
            NotificationKind::Comment => NotificationType::Comment,
            NotificationKind::Reply => NotificationType::Reply,
            NotificationKind::TrackReady => NotificationType::TrackReady,
            NotificationKind::TrackFailed => NotificationType::TrackFailed,
            NotificationKind::Message => NotificationType::Message,
        }
    }
}

/// A notification.
#[derive(Debug, Clone, Object, serde::Serialize)]
#[oai(skip_serializing_if_is_none)]
pub struct NotificationView {
    pub id: String,
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: NotificationType,
    /// Who did it (absent for a track's processing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<UserSummaryView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub playlist_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Your notifications, newest first.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct NotificationPage {
    notifications: Vec<NotificationView>,
    next_cursor: Option<String>,
    /// Notifications after what you marked read.
    unread_count: u64,
}

#[derive(ApiResponse)]
enum SentResponse {
    /// The message, stored.
    #[oai(status = 201)]
    Created(Json<MessageView>),
    /// Sent before with this `client_id`: the first message.
    #[oai(status = 200)]
    Repeated(Json<MessageView>),
}

/// Views of notifications, with their actors.
pub(crate) async fn notification_views(
    state: &AppState,
    notifications: &[Notification],
) -> Result<Vec<NotificationView>, ApiError> {
    let mut actors: Vec<UserId> = notifications.iter().filter_map(|n| n.actor).collect();
    actors.sort_unstable();
    actors.dedup();
    let users = state.social.summaries(&actors).await?;
    Ok(notifications
        .iter()
        .map(|n| {
            let mut view = NotificationView {
                id: n.id.to_string(),
                kind: n.kind.into(),
                actor: n.actor.and_then(|a| users.get(&a)).map(UserSummaryView::from),
                track_id: None,
                playlist_id: None,
                comment_id: None,
                conversation_id: None,
                message_id: None,
                created_at: n.created_at,
            };
            match n.subject {
                Subject::Nothing => {}
                Subject::Track { id } => view.track_id = Some(id.to_string()),
                Subject::Playlist { id } => view.playlist_id = Some(id.to_string()),
                Subject::Comment { track, comment } => {
                    view.track_id = Some(track.to_string());
                    view.comment_id = Some(comment.to_string());
                }
                Subject::Conversation { id, message } => {
                    view.conversation_id = Some(id.to_string());
                    view.message_id = Some(message.to_string());
                }
            }
            view
        })
        .collect())
}

/// Stores a notification for `user` and delivers it live (a push when the account has no
/// live socket). Failures are logged: a notification never fails what caused it.
pub(crate) async fn notify(
    state: &AppState,
    user: UserId,
    kind: NotificationKind,
    actor: Option<UserId>,
    subject: Subject,
) {
    notify_with(state, user, kind, actor, subject, None).await;
}

/// [`notify`] with a message's text, for the push.
async fn notify_with(
    state: &AppState,
    user: UserId,
    kind: NotificationKind,
    actor: Option<UserId>,
    subject: Subject,
    preview: Option<&str>,
) {
    let new = NewNotification { user_id: user, kind, actor, subject, created_at: Utc::now() };
    match state.documents.insert_notification(new).await {
        Ok(notification) => crate::realtime::deliver_notification(state, notification, preview).await,
        Err(err) => tracing::warn!(%user, kind = kind.as_str(), error = %err, "could not store a notification"),
    }
}

/// Whom a message is for.
pub(crate) enum To<'a> {
    /// The account with this username.
    Username(&'a str),
    /// This account (known already, as the other member of a conversation).
    Account(UserId),
}

/// Sends a direct message from `sender` to `to`: the checks, the store,
/// the live delivery and the recipient's notification. `(message, new)`.
pub(crate) async fn send_message(
    state: &AppState,
    sender: &Session,
    to: To<'_>,
    body: &str,
    client_id: String,
) -> Result<(Message, bool), ApiError> {
    let me = sender.user.id;
    state.social_writes.check(me)?;
    let recipient = match to {
        To::Username(name) => account(state, name).await?.id,
        To::Account(id) => id,
    };
    if recipient == me {
        return Err(ApiError::bad_request("cannot_message_self", "you cannot message yourself"));
    }
    if state.social.blocked_between(me, recipient).await? {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "blocked", "one of you blocks the other"));
    }
    if state.social.messages_from(recipient).await? == Some(MessagesFrom::Following)
        && !state.social.follows(recipient, me).await?
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "messages_restricted",
            "this account takes messages only from the accounts it follows",
        ));
    }
    let body = crate::tracks::check_text("body", body, 1, waveline_shared::documents::MESSAGE_BODY_MAX_CHARS)?;
    let sent = state
        .documents
        .send_message(NewMessage { sender: me, recipient, body, client_id, created_at: Utc::now() })
        .await?;
    if sent.new {
        let message = sent.message.clone();
        if let Err(err) = state.realtime.bus.publish(&Event::MessageNew { message: message.clone() }).await {
            tracing::warn!(error = %err, "could not publish a new message; clients will fetch it");
        }
        let subject = Subject::Conversation { id: message.conversation_id, message: message.id };
        notify_with(state, recipient, NotificationKind::Message, Some(me), subject, Some(&message.body)).await;
    }
    Ok((sent.message, sent.new))
}

/// Marks `reader`'s conversation read up to `up_to`, and tells both members' sockets.
pub(crate) async fn mark_read(
    state: &AppState,
    reader: UserId,
    conversation: &str,
    up_to: &str,
) -> Result<(), ApiError> {
    let id: ConversationId = conversation.parse().map_err(|_| ApiError::not_found("conversation"))?;
    let up_to: MessageId =
        up_to.parse().map_err(|_| ApiError::bad_request("invalid_field", "up_to: not a message id"))?;
    let (a, b) = member_of(state, id, reader).await?;
    if !state.documents.mark_conversation_read(id, reader, up_to).await? {
        return Err(ApiError::not_found("conversation"));
    }
    let other = if a == reader { b } else { a };
    let event = Event::MessageRead { conversation_id: id, reader, other, up_to };
    if let Err(err) = state.realtime.bus.publish(&event).await {
        tracing::warn!(error = %err, "could not publish a read marker");
    }
    Ok(())
}

/// The members of a conversation `user` is in; 404 otherwise.
async fn member_of(state: &AppState, id: ConversationId, user: UserId) -> Result<(UserId, UserId), ApiError> {
    let members = state.documents.conversation_members(id).await?.ok_or_else(|| ApiError::not_found("conversation"))?;
    if members.0 != user && members.1 != user {
        return Err(ApiError::not_found("conversation"));
    }
    Ok(members)
}

#[OpenApi(tag = "Tag::Inbox")]
impl Inbox {
    /// Sends a direct message (stored before the answer) in a conversation named by the other
    /// account's username or by its id. 201 with the message; 200 with the first one when this
    /// `client_id` was sent before.
    #[oai(path = "/v1/me/conversations/:conversation/messages", method = "post")]
    async fn send(
        &self,
        /// The other account's username, or the conversation's id.
        conversation: Path<String>,
        body: Json<MessageSend>,
        auth: Auth,
    ) -> Result<SentResponse, ApiError> {
        let body = body.0;
        let session = auth.session();
        let to = match conversation.0.parse::<ConversationId>() {
            Ok(id) => {
                let (a, b) = member_of(&self.state, id, session.user.id).await?;
                To::Account(if a == session.user.id { b } else { a })
            }
            Err(_) => To::Username(&conversation.0),
        };
        let (message, new) = send_message(&self.state, session, to, &body.body, body.client_id).await?;
        let view = MessageView::from(&message);
        Ok(if new { SentResponse::Created(Json(view)) } else { SentResponse::Repeated(Json(view)) })
    }

    /// Your conversations, the latest message first, each with its unread count.
    #[oai(path = "/v1/me/conversations", method = "get")]
    async fn conversations(
        &self,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 80))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: Auth,
    ) -> Result<Json<ConversationPage>, ApiError> {
        let me = auth.session().user.id;
        let page = self.state.documents.conversations(me, cursor.0.as_deref(), page_limit(limit.0)? as usize).await?;
        let others: Vec<UserId> = page.conversations.iter().map(|c| c.other).collect();
        let users = self.state.social.summaries(&others).await?;
        let conversations = page
            .conversations
            .iter()
            .filter_map(|c| {
                Some(ConversationView {
                    id: c.id.to_string(),
                    user: UserSummaryView::from(users.get(&c.other)?),
                    last_message: MessageView::from(&c.last_message),
                    unread_count: c.unread_count,
                })
            })
            .collect();
        Ok(Json(ConversationPage { conversations, next_cursor: page.next_cursor }))
    }

    /// A conversation's messages, newest first; `before` pages back.
    #[oai(path = "/v1/me/conversations/:conversation/messages", method = "get")]
    async fn messages(
        &self,
        /// The conversation's id, or the other account's username.
        conversation: Path<String>,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 80))]
        before: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: Auth,
    ) -> Result<Json<MessagePage>, ApiError> {
        let conversation = match conversation.0.parse::<ConversationId>() {
            Ok(id) => id,
            Err(_) => {
                let other = account(&self.state, &conversation.0).await?;
                waveline_shared::documents::conversation_between(auth.session().user.id, other.id)
            }
        };
        member_of(&self.state, conversation, auth.session().user.id).await?;
        let page =
            self.state.documents.messages(conversation, before.0.as_deref(), page_limit(limit.0)? as usize).await?;
        Ok(Json(MessagePage {
            messages: page.messages.iter().map(MessageView::from).collect(),
            next_cursor: page.next_cursor,
        }))
    }

    /// Marks a conversation read up to a message (never backwards); the other member's
    /// sockets hear of it.
    #[oai(path = "/v1/me/conversations/:id/read", method = "put")]
    async fn read(&self, id: Path<String>, body: Json<ReadUpTo>, auth: Auth) -> Result<Done, ApiError> {
        mark_read(&self.state, auth.session().user.id, &id.0, &body.0.up_to).await?;
        Ok(Done::Done)
    }

    /// Your notifications, newest first, with the unread count.
    #[oai(path = "/v1/me/notifications", method = "get")]
    async fn notifications(
        &self,
        /// From `next_cursor` of the previous page.
        #[oai(validator(max_length = 80))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: Auth,
    ) -> Result<Json<NotificationPage>, ApiError> {
        let me = auth.session().user.id;
        let page = self.state.documents.notifications(me, cursor.0.as_deref(), page_limit(limit.0)? as usize).await?;
        Ok(Json(NotificationPage {
            notifications: notification_views(&self.state, &page.notifications).await?,
            next_cursor: page.next_cursor,
            unread_count: page.unread_count,
        }))
    }

    /// Marks your notifications read up to one (never backwards).
    #[oai(path = "/v1/me/notifications/read", method = "put")]
    async fn notifications_read(&self, body: Json<ReadUpTo>, auth: Auth) -> Result<Done, ApiError> {
        let up_to: NotificationId =
            body.0.up_to.parse().map_err(|_| ApiError::bad_request("invalid_field", "up_to: not a notification id"))?;
        self.state.documents.mark_notifications_read(auth.session().user.id, up_to).await?;
        Ok(Done::Done)
    }
}
