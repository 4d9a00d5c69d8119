//! The `Documents` seam: the high-volume, append-mostly documents of the social layer —
//! timestamped comments and the activity feed (later direct messages and notifications).
//!
//! Relational data (accounts, follows, likes, playlists) stays in PostgreSQL; these documents
//! live behind [`Documents`], selected by the `documents` setting:
//!
//! - [`PgDocuments`] (`postgres`, the default): tables in the main database (migration
//!   `…_documents.sql`), so the embedded mode still needs nothing but PostgreSQL. The fields
//!   queries filter and sort on are typed, indexed columns; the rest of a document (a
//!   comment's body) is a `jsonb` column, so documents can grow fields without a migration.
//! - [`MongoDocuments`] (`mongodb://HOST:PORT/DB`): the collections `comments` and
//!   `activities` of that database, through the official driver. `waveline migrate` creates
//!   their indexes (idempotently: creating an index that exists is a no-op).
//!
//! Both pass one contract suite (`tests/tests/documents_contract.rs`) and behave alike:
//!
//! - **Identifiers** are UUIDv7. A document's `created_at` is the millisecond its id carries,
//!   so the two can never disagree, and both backends keep it at millisecond precision
//!   (BSON dates have no more). Newest first, `(created_at, id)` order, is therefore id order.
//! - **Lists** are pages of at most [`MAX_PAGE`] items with an opaque keyset cursor: the sort
//!   key and the id of the last item. Ties on the sort key (two comments at the same
//!   `timestamp_ms`, two activities in the same millisecond) are broken by the id, so a page
//!   boundary never skips or repeats an item, whatever is inserted meanwhile. A cursor that
//!   this seam did not hand out, or one of another order, is refused with
//!   [`DocumentsError::InvalidCursor`].
//! - **Replies** are one level deep: a reply to a reply is stored against its root, and
//!   deleting a comment deletes its replies.
//! - **No cross-store references are enforced.** The store does not know tracks or accounts:
//!   whoever deletes a track or an account also calls [`Documents::delete_track_comments`],
//!   [`Documents::delete_object_activities`] or [`Documents::delete_account`]. (PostgreSQL
//!   could cascade, MongoDB cannot; neither does, so they behave the same.)
//!
//! ## The feed
//!
//! The activity feed is built on read: [`Documents::feed`] merges the newest activities of a
//! set of actors (the accounts a viewer follows, at most [`MAX_FEED_ACTORS`]). Activities are
//! indexed by actor, then newest first: `(actor, created_at, id)` in PostgreSQL, `(actor, id)`
//! in MongoDB (the same order, see below). PostgreSQL first reads everyone's newest activities
//! below the cursor by id (at most 100 per item of the page), keeping the actors': when the
//! actors wrote enough of them to fill the page, that is the page, at a few index pages
//! whatever the depth. Otherwise it reads the actors' index in two steps: first
//! each actor's newest activity below the cursor (one entry per actor), then, only for the
//! actors whose newest reaches the page-size-th newest of those, their activities down to it (a
//! `LATERAL` walk each). Every item of the page is at or above that bound, since that many
//! distinct activities are, so a page costs about one index entry per actor plus the page,
//! however many activities exist; the index covers the columns a page reads, so the walks
//! never touch the table. (A page from every actor, merged, cost 8 ms of CPU at 1,000 followed
//! accounts: BENCHMARKS.md.) MongoDB answers
//! `actor ∈ {…}` sorted by `id` from its index: a real server merges the per-actor ranges
//! while there are few actors (up to 200), and beyond that keeps the top page while it scans
//! the actors' entries older than the cursor: fine for a first page of recent activity, more
//! work deeper down.
//!
//! ## MongoDB documents
//!
//! Ids are stored as lowercase hyphenated UUID strings (which sort as the UUIDs do), in `_id`
//! and again in `id`: the compound indexes carry `id` as their tie-breaker, because the test
//! stand-in (`nx-27017`) cannot put `_id` in a compound index. Times are BSON dates, stored for
//! readers; no query compares them, since newest first is id order (the stand-in also gets
//! date ranges wrong).

mod inbox;
mod mongo;
mod postgres;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use uuid::Uuid;

pub use inbox::{
    CLIENT_ID_MAX_CHARS, ConversationPage, ConversationSummary, MESSAGE_BODY_MAX_CHARS, Message, MessagePage,
    NOTIFICATIONS_KEPT, NewMessage, NewNotification, Notification, NotificationKind, NotificationPage, Sent, Subject,
    conversation_between,
};
pub use mongo::MongoDocuments;
pub use postgres::PgDocuments;

use crate::config::{DocumentsBackend, Settings};
use crate::domain::{ActivityId, CommentId, ConversationId, MessageId, NotificationId, PlaylistId, TrackId, UserId};

/// The most items one page holds; a larger `limit` is clamped to it.
pub const MAX_PAGE: usize = 100;

/// The most actors one [`Documents::feed`] call merges.
pub const MAX_FEED_ACTORS: usize = 10_000;

/// The longest comment body, in characters.
pub const COMMENT_BODY_MAX_CHARS: usize = 1000;

/// The most tracks one [`Documents::count_comments_of`] call counts (a playlist's worth).
pub const MAX_COUNTED_TRACKS: usize = 500;

/// A timestamped comment on a track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comment {
    pub id: CommentId,
    pub track_id: TrackId,
    /// The author.
    pub user_id: UserId,
    pub body: String,
    /// Where in the track the comment sits, in milliseconds from the start.
    pub timestamp_ms: i64,
    /// The root comment this one replies to; `None` for a root.
    pub reply_to: Option<CommentId>,
    pub created_at: DateTime<Utc>,
}

/// A comment to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewComment {
    pub track_id: TrackId,
    pub user_id: UserId,
    /// 1 to [`COMMENT_BODY_MAX_CHARS`] characters.
    pub body: String,
    /// Not negative. That it lies within the track is for the caller to check.
    pub timestamp_ms: i64,
    /// A comment of the same track; a reply to a reply is stored against its root.
    pub reply_to: Option<CommentId>,
    /// When it was written (normally now), kept to the millisecond.
    pub created_at: DateTime<Utc>,
}

impl NewComment {
    /// The comment as stored under `id` at `created_at`, replying to the root `reply_to`.
    pub(crate) fn stored(self, id: CommentId, reply_to: Option<CommentId>, created_at: DateTime<Utc>) -> Comment {
        Comment {
            id,
            track_id: self.track_id,
            user_id: self.user_id,
            body: self.body,
            timestamp_ms: self.timestamp_ms,
            reply_to,
            created_at,
        }
    }
}

/// The order of a track's comments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommentOrder {
    /// Along the track: `timestamp_ms` ascending (as a player draws them on the waveform).
    Timestamp,
    /// Newest first: `created_at` descending.
    Newest,
}

/// Which of a track's comments to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentQuery {
    pub track_id: TrackId,
    pub order: CommentOrder,
    /// Only comments at or after this `timestamp_ms`.
    pub from_ms: Option<i64>,
    /// Only comments at or before this `timestamp_ms`.
    pub to_ms: Option<i64>,
    /// The `next_cursor` of the previous page of the same query.
    pub cursor: Option<String>,
    /// Clamped to 1..=[`MAX_PAGE`].
    pub limit: usize,
}

/// A page of comments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommentPage {
    pub comments: Vec<Comment>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// What an activity is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivityKind {
    /// A public track became ready.
    Track,
    /// A track was reposted.
    TrackRepost,
    /// A public playlist was created.
    Playlist,
    /// A playlist was reposted.
    PlaylistRepost,
}

impl ActivityKind {
    /// The stored name: `track`, `track_repost`, `playlist`, `playlist_repost`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActivityKind::Track => "track",
            ActivityKind::TrackRepost => "track_repost",
            ActivityKind::Playlist => "playlist",
            ActivityKind::PlaylistRepost => "playlist_repost",
        }
    }

    /// The kind of a stored name.
    pub fn parse(text: &str) -> Option<ActivityKind> {
        [ActivityKind::Track, ActivityKind::TrackRepost, ActivityKind::Playlist, ActivityKind::PlaylistRepost]
            .into_iter()
            .find(|kind| kind.as_str() == text)
    }

    /// The kinds whose object is a track (`false`: a playlist).
    fn is_about_a_track(self) -> bool {
        matches!(self, ActivityKind::Track | ActivityKind::TrackRepost)
    }
}

/// The object of an activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum ActivityObject {
    Track(TrackId),
    Playlist(PlaylistId),
}

impl ActivityObject {
    fn id(self) -> Uuid {
        match self {
            ActivityObject::Track(id) => id.0,
            ActivityObject::Playlist(id) => id.0,
        }
    }

    /// The activity kinds whose object is of this object's kind.
    fn kinds(self) -> [ActivityKind; 2] {
        match self {
            ActivityObject::Track(_) => [ActivityKind::Track, ActivityKind::TrackRepost],
            ActivityObject::Playlist(_) => [ActivityKind::Playlist, ActivityKind::PlaylistRepost],
        }
    }
}

/// One event of the feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub id: ActivityId,
    pub kind: ActivityKind,
    /// Who did it: the uploader, the reposter, the playlist's creator.
    pub actor: UserId,
    pub object: ActivityObject,
    pub created_at: DateTime<Utc>,
}

/// An activity to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewActivity {
    pub kind: ActivityKind,
    pub actor: UserId,
    /// A track for `track` and `track_repost`, a playlist for the others.
    pub object: ActivityObject,
    /// When it happened (normally now), kept to the millisecond.
    pub created_at: DateTime<Utc>,
}

/// A page of activities, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActivityPage {
    pub activities: Vec<Activity>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// What [`Documents::delete_account`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AccountRemoval {
    /// The account's comments, and the replies of others to them.
    pub comments: u64,
    /// The activities the account is the actor of.
    pub activities: u64,
    /// The messages it sent or received.
    pub messages: u64,
    /// The notifications for it or by it.
    pub notifications: u64,
}

/// The document store seam. Every method is safe to call concurrently.
#[async_trait]
pub trait Documents: Send + Sync + fmt::Debug {
    /// Which backend this is (`postgres`, `mongodb`), for logs and health checks.
    fn backend(&self) -> &'static str;

    /// Creates what the backend needs (MongoDB's indexes); idempotent. PostgreSQL's tables
    /// come with the database migrations, so it has nothing to do.
    async fn migrate(&self) -> Result<(), DocumentsError>;

    /// Checks that the backend answers, for readiness probes.
    async fn ping(&self) -> Result<(), DocumentsError>;

    /// Stores a comment. A reply to a reply is stored against its root;
    /// [`DocumentsError::ReplyTargetNotFound`] when `reply_to` is no comment of that track.
    async fn insert_comment(&self, comment: NewComment) -> Result<Comment, DocumentsError>;

    /// One comment.
    async fn comment(&self, id: CommentId) -> Result<Option<Comment>, DocumentsError>;

    /// A page of a track's comments, roots and replies alike.
    async fn comments(&self, query: &CommentQuery) -> Result<CommentPage, DocumentsError>;

    /// How many comments a track has, replies included; exact.
    async fn count_comments(&self, track: TrackId) -> Result<u64, DocumentsError>;

    /// How many comments each of some tracks has (at most [`MAX_COUNTED_TRACKS`] tracks);
    /// exact. A track without comments may be absent from the answer.
    async fn count_comments_of(&self, tracks: &[TrackId]) -> Result<HashMap<TrackId, u64>, DocumentsError> {
        use futures::{StreamExt as _, TryStreamExt as _};
        check_counted(tracks)?;
        // A few at a time: one count each, without flooding the store.
        futures::stream::iter(tracks.iter().copied())
            .map(|track| async move { self.count_comments(track).await.map(|count| (track, count)) })
            .buffered(8)
            .try_collect()
            .await
    }

    /// Deletes a comment and its replies; returns how many went (0 when it did not exist).
    async fn delete_comment(&self, id: CommentId) -> Result<u64, DocumentsError>;

    /// Deletes every comment of a track; returns how many went.
    async fn delete_track_comments(&self, track: TrackId) -> Result<u64, DocumentsError>;

    /// Stores an activity. [`DocumentsError::Invalid`] when the kind and the object's kind
    /// disagree (a `track` activity about a playlist).
    async fn insert_activity(&self, activity: NewActivity) -> Result<Activity, DocumentsError>;

    /// A page of the activities of any of `actors`, newest first (at most
    /// [`MAX_FEED_ACTORS`] actors; none gives an empty page).
    async fn feed(&self, actors: &[UserId], cursor: Option<&str>, limit: usize)
    -> Result<ActivityPage, DocumentsError>;

    /// For each of `objects`, the newest activity about it by any of `actors` (at most
    /// [`MAX_FEED_ACTORS`] actors, [`MAX_PAGE`] objects): the feed shows an object once, at
    /// its newest activity. Objects without one are absent from the answer.
    async fn newest_about(
        &self,
        objects: &[ActivityObject],
        actors: &[UserId],
    ) -> Result<HashMap<ActivityObject, ActivityId>, DocumentsError>;

    /// A page of one actor's activities, newest first.
    async fn actor_activities(
        &self,
        actor: UserId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ActivityPage, DocumentsError> {
        self.feed(&[actor], cursor, limit).await
    }

    /// Deletes the activities about an object (a deleted track, a playlist made private);
    /// with `actor`, only that actor's (a repost taken back). Returns how many went.
    async fn delete_object_activities(
        &self,
        object: ActivityObject,
        actor: Option<UserId>,
    ) -> Result<u64, DocumentsError>;

    /// Deletes an account's comments (with the replies of others to them), the activities
    /// it is the actor of, its conversations and messages (sent or received), and the
    /// notifications for it or by it.
    async fn delete_account(&self, user: UserId) -> Result<AccountRemoval, DocumentsError>;

    /// Stores a direct message, and moves the conversation to the top of both members' lists.
    /// Idempotent by `(sender, client_id)`: a second send returns the first message, unchanged.
    async fn send_message(&self, message: NewMessage) -> Result<Sent, DocumentsError>;

    /// The two accounts of a conversation, if it has any message.
    async fn conversation_members(&self, id: ConversationId) -> Result<Option<(UserId, UserId)>, DocumentsError>;

    /// A page of a conversation's messages, newest first.
    async fn messages(
        &self,
        id: ConversationId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MessagePage, DocumentsError>;

    /// A page of `user`'s conversations, the latest message first, with unread counts.
    async fn conversations(
        &self,
        user: UserId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ConversationPage, DocumentsError>;

    /// Marks `user`'s messages of a conversation read up to `up_to` (never backwards);
    /// `false` when `user` is not a member.
    async fn mark_conversation_read(
        &self,
        id: ConversationId,
        user: UserId,
        up_to: MessageId,
    ) -> Result<bool, DocumentsError>;

    /// Stores a notification (and lets go of the account's oldest beyond
    /// [`NOTIFICATIONS_KEPT`]).
    async fn insert_notification(&self, notification: NewNotification) -> Result<Notification, DocumentsError>;

    /// A page of `user`'s notifications, newest first, with the unread count.
    async fn notifications(
        &self,
        user: UserId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<NotificationPage, DocumentsError>;

    /// Marks `user`'s notifications read up to `up_to` (never backwards).
    async fn mark_notifications_read(&self, user: UserId, up_to: NotificationId) -> Result<(), DocumentsError>;
}

/// Why a document operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DocumentsError {
    #[error("cursor: not one this API returned for this list")]
    InvalidCursor,
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("reply_to: no comment {0} on this track")]
    ReplyTargetNotFound(CommentId),
    #[error("the document store is unreachable: {0}")]
    Unavailable(String),
    #[error("document store query failed: {0}")]
    Query(String),
    #[error("a stored document cannot be read: {0}")]
    Corrupt(String),
    #[error("document store configuration: {0}")]
    Config(String),
}

impl DocumentsError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            DocumentsError::InvalidCursor => "invalid_cursor",
            DocumentsError::Invalid { .. } => "invalid_field",
            DocumentsError::ReplyTargetNotFound(_) => "reply_target_not_found",
            DocumentsError::Unavailable(_) => "documents_unavailable",
            DocumentsError::Query(_) => "documents_error",
            DocumentsError::Corrupt(_) => "documents_corrupt",
            DocumentsError::Config(_) => "documents_config",
        }
    }

    /// Whether retrying the same call cannot help: only losing the server is transient.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, DocumentsError::Unavailable(_))
    }
}

impl From<sqlx::Error> for DocumentsError {
    fn from(err: sqlx::Error) -> DocumentsError {
        match err {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                DocumentsError::Unavailable(err.to_string())
            }
            other => DocumentsError::Query(other.to_string()),
        }
    }
}

/// Builds the configured backend; `pool` is the main database (used by `postgres`).
pub async fn open(settings: &Settings, pool: &PgPool) -> Result<Arc<dyn Documents>, DocumentsError> {
    Ok(match &settings.documents {
        DocumentsBackend::Postgres => Arc::new(PgDocuments::new(pool.clone())),
        DocumentsBackend::Mongo { url, database } => {
            use secrecy::ExposeSecret;
            Arc::new(MongoDocuments::connect(url.expose_secret(), database).await?)
        }
    })
}

/// `limit` within 1..=[`MAX_PAGE`].
fn page_size(limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE)
}

/// A time kept to the millisecond, as both backends store it.
fn millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at)
}

/// A UUIDv7 that carries `at` (to the millisecond), random in the rest: ids of one
/// millisecond are ordered arbitrarily, but totally.
fn id_at(at: DateTime<Utc>) -> Uuid {
    let ms = at.timestamp_millis().max(0) as u64;
    let timestamp = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
    Uuid::new_v7(timestamp)
}

/// The millisecond a UUIDv7 carries.
fn id_millis(id: Uuid) -> Option<i64> {
    if id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    i64::try_from(secs).ok()?.checked_mul(1000)?.checked_add(i64::from(nanos / 1_000_000))
}

/// Checks a comment's fields; returns the time it is stored with and its new id.
fn check_comment(comment: &NewComment) -> Result<(CommentId, DateTime<Utc>), DocumentsError> {
    let chars = comment.body.chars().count();
    if chars == 0 || chars > COMMENT_BODY_MAX_CHARS {
        return Err(DocumentsError::Invalid {
            field: "body",
            reason: format!("1 to {COMMENT_BODY_MAX_CHARS} characters expected, got {chars}"),
        });
    }
    if comment.timestamp_ms < 0 {
        return Err(DocumentsError::Invalid { field: "timestamp_ms", reason: "must not be negative".into() });
    }
    let at = millis(comment.created_at);
    Ok((CommentId(id_at(at)), at))
}

/// Checks an activity's fields; returns the time it is stored with and its new id.
fn check_activity(activity: &NewActivity) -> Result<(ActivityId, DateTime<Utc>), DocumentsError> {
    if activity.kind.is_about_a_track() != matches!(activity.object, ActivityObject::Track(_)) {
        return Err(DocumentsError::Invalid {
            field: "object",
            reason: format!(
                "a {} activity is about a {}",
                activity.kind.as_str(),
                match activity.kind.is_about_a_track() {
                    true => "track",
                    false => "playlist",
                }
            ),
        });
    }
    let at = millis(activity.created_at);
    Ok((ActivityId(id_at(at)), at))
}

/// Checks the tracks of a comment count.
fn check_counted(tracks: &[TrackId]) -> Result<(), DocumentsError> {
    if tracks.len() > MAX_COUNTED_TRACKS {
        return Err(DocumentsError::Invalid {
            field: "tracks",
            reason: format!("at most {MAX_COUNTED_TRACKS} tracks, got {}", tracks.len()),
        });
    }
    Ok(())
}

/// Checks the objects of [`Documents::newest_about`].
fn check_objects(objects: &[ActivityObject]) -> Result<(), DocumentsError> {
    if objects.len() > MAX_PAGE {
        return Err(DocumentsError::Invalid {
            field: "objects",
            reason: format!("at most {MAX_PAGE} objects, got {}", objects.len()),
        });
    }
    Ok(())
}

/// The newest activity about each of `objects`, from `(object id, activity id, kind)` rows in
/// any order (the kind tells a track from a playlist that somehow shared an id).
fn newest_of(
    objects: &[ActivityObject],
    rows: impl IntoIterator<Item = (Uuid, ActivityId, String)>,
) -> Result<HashMap<ActivityObject, ActivityId>, DocumentsError> {
    let mut newest: HashMap<ActivityObject, ActivityId> = HashMap::new();
    for (object_id, id, kind) in rows {
        let kind =
            ActivityKind::parse(&kind).ok_or_else(|| DocumentsError::Corrupt(format!("activity kind {kind:?}")))?;
        let object = match kind.is_about_a_track() {
            true => ActivityObject::Track(TrackId(object_id)),
            false => ActivityObject::Playlist(PlaylistId(object_id)),
        };
        if !objects.contains(&object) {
            continue;
        }
        let entry = newest.entry(object).or_insert(id);
        // UUIDv7 ids order as their times, then arbitrarily but totally within a millisecond,
        // as every list here does.
        if id.0 > entry.0 {
            *entry = id;
        }
    }
    Ok(newest)
}

/// Checks the actors of a feed.
fn check_actors(actors: &[UserId]) -> Result<(), DocumentsError> {
    if actors.len() > MAX_FEED_ACTORS {
        return Err(DocumentsError::Invalid {
            field: "actors",
            reason: format!("at most {MAX_FEED_ACTORS} actors, got {}", actors.len()),
        });
    }
    Ok(())
}

/// A position in a list: the last item's sort key and id. Encoded as `{tag}{key}.{id}`, where
/// the tag names the order (`t` timestamp, `n` newest comments, `a` activities), so a cursor
/// of one list is refused by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Keyset {
    key: i64,
    id: Uuid,
}

impl Keyset {
    fn encode(self, tag: char) -> String {
        format!("{tag}{}.{}", self.key, self.id.simple())
    }

    fn decode(text: Option<&str>, tag: char) -> Result<Option<Keyset>, DocumentsError> {
        let Some(text) = text else {
            return Ok(None);
        };
        let rest = text.strip_prefix(tag).ok_or(DocumentsError::InvalidCursor)?;
        let (key, id) = rest.split_once('.').ok_or(DocumentsError::InvalidCursor)?;
        // Digits (and a sign) only: `i64::from_str` alone would take a leading `+`.
        if key.is_empty() || !key.trim_start_matches('-').bytes().all(|b| b.is_ascii_digit()) || id.len() != 32 {
            return Err(DocumentsError::InvalidCursor);
        }
        let key: i64 = key.parse().map_err(|_| DocumentsError::InvalidCursor)?;
        let id = Uuid::try_parse(id).map_err(|_| DocumentsError::InvalidCursor)?;
        // A time key is the millisecond its id carries, as for every stored document: so a
        // position is the id alone, and the MongoDB backend pages by it.
        if tag != 't' && id_millis(id) != Some(key) {
            return Err(DocumentsError::InvalidCursor);
        }
        Ok(Some(Keyset { key, id }))
    }
}

impl CommentOrder {
    fn cursor_tag(self) -> char {
        match self {
            CommentOrder::Timestamp => 't',
            CommentOrder::Newest => 'n',
        }
    }

    /// The keyset position of a comment in this order.
    fn keyset(self, comment: &Comment) -> Keyset {
        let key = match self {
            CommentOrder::Timestamp => comment.timestamp_ms,
            CommentOrder::Newest => comment.created_at.timestamp_millis(),
        };
        Keyset { key, id: comment.id.0 }
    }
}

const ACTIVITY_TAG: char = 'a';

/// The page of `rows` fetched with `limit + 1`: the first `limit`, and the cursor after them
/// when there were more.
fn paginate<T>(mut rows: Vec<T>, limit: usize, cursor: impl Fn(&T) -> String) -> (Vec<T>, Option<String>) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more { rows.last().map(cursor) } else { None };
    (rows, next)
}

fn comment_page(rows: Vec<Comment>, order: CommentOrder, limit: usize) -> CommentPage {
    let (comments, next_cursor) = paginate(rows, limit, |c| order.keyset(c).encode(order.cursor_tag()));
    CommentPage { comments, next_cursor }
}

fn activity_page(rows: Vec<Activity>, limit: usize) -> ActivityPage {
    let (activities, next_cursor) =
        paginate(rows, limit, |a| Keyset { key: a.created_at.timestamp_millis(), id: a.id.0 }.encode(ACTIVITY_TAG));
    ActivityPage { activities, next_cursor }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let keyset = Keyset { key: -5, id: Uuid::now_v7() };
        let text = keyset.encode('t');
        assert_eq!(Keyset::decode(Some(&text), 't').expect("valid"), Some(keyset));
        // A time cursor names the millisecond of its id, and no other.
        let at = DateTime::from_timestamp_millis(1_790_000_123_456).expect("a time");
        let timed = Keyset { key: at.timestamp_millis(), id: id_at(at) };
        assert_eq!(Keyset::decode(Some(&timed.encode('n')), 'n').expect("valid"), Some(timed));
        for (key, id) in [(timed.key + 1, timed.id), (timed.key, Uuid::new_v4()), (i64::MAX, timed.id)] {
            let text = Keyset { key, id }.encode('a');
            assert!(matches!(Keyset::decode(Some(&text), 'a'), Err(DocumentsError::InvalidCursor)), "{text}");
        }
        assert_eq!(Keyset::decode(None, 't').expect("none"), None);
        let id = keyset.id.simple().to_string();
        for bad in [
            text.replacen('t', "n", 1),
            String::new(),
            "t".into(),
            "t5".into(),
            format!("t+5.{id}"),
            format!("t.{id}"),
            format!("t5.{}", &id[..31]),
            format!("t5.{}", keyset.id.hyphenated()),
            format!("t99999999999999999999.{id}"),
            format!("t5.{id}x"),
        ] {
            assert!(matches!(Keyset::decode(Some(&bad), 't'), Err(DocumentsError::InvalidCursor)), "{bad}");
        }
    }

    #[test]
    fn ids_carry_their_millisecond() {
        let at = DateTime::from_timestamp_millis(1_790_000_123_456).expect("a time");
        let id = id_at(at);
        assert_eq!(id.get_version_num(), 7);
        let (secs, nanos) = id.get_timestamp().expect("a v7 timestamp").to_unix();
        assert_eq!(secs as i64 * 1000 + i64::from(nanos / 1_000_000), at.timestamp_millis());
        assert_ne!(id, id_at(at));
    }
}
