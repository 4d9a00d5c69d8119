//! The MongoDB backend: the collections `comments` and `activities` of the database the
//! `documents` URL names.
//!
//! A comment is `{_id, id, track_id, user_id, body, timestamp_ms, reply_to, created_at}` and an
//! activity `{_id, id, kind, actor, object_id, created_at}`: ids are UUID strings, times BSON
//! dates, `timestamp_ms` a 64-bit integer. Only plain queries are used (equality, ranges,
//! `$in`, `$or`, sort, limit, `countDocuments`, `deleteMany`, `createIndexes`): nothing that
//! needs a replica set, and nothing a real server rejects.
//!
//! Newest-first lists sort and page by `id` alone. That is the `(created_at, id)` order of the
//! PostgreSQL backend, not an approximation of it: `created_at` is the millisecond in the
//! UUIDv7's leading bits, and the hyphenated lowercase text of UUIDs sorts as their bytes do.
//! So the indexes are `(track_id, id)` and `(actor, id)`, smaller than with the date in them,
//! and no query compares dates (which the test stand-in gets wrong).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use uuid::Uuid;

use super::inbox::{
    CONVERSATION_TAG, ConversationPage, ConversationSummary, MESSAGE_TAG, Message, MessagePage, NOTIFICATION_TAG,
    NOTIFICATIONS_KEPT, NewMessage, NewNotification, Notification, NotificationKind, NotificationPage, Sent, Subject,
    check_message, conversation_between, keyset_of, notification_id,
};
use super::{
    ACTIVITY_TAG, AccountRemoval, Activity, ActivityKind, ActivityObject, ActivityPage, Comment, CommentOrder,
    CommentPage, CommentQuery, Documents, DocumentsError, Keyset, NewActivity, NewComment, activity_page,
    check_activity, check_actors, check_comment, check_objects, comment_page, newest_of, page_size, paginate,
};
use crate::domain::{ActivityId, CommentId, ConversationId, MessageId, NotificationId, PlaylistId, TrackId, UserId};

/// How many root comments of an account one round of [`Documents::delete_account`] removes
/// with their replies.
const DELETE_BATCH: i64 = 1000;

/// Documents in MongoDB.
#[derive(Debug, Clone)]
pub struct MongoDocuments {
    database: Database,
}

impl MongoDocuments {
    /// Connects to `url` (a `mongodb://` URL) and uses `database`. The driver connects lazily;
    /// this fails at once only for a URL it cannot read.
    pub async fn connect(url: &str, database: &str) -> Result<MongoDocuments, DocumentsError> {
        let mut options =
            ClientOptions::parse(url).await.map_err(|err| DocumentsError::Config(format!("the MongoDB URL: {err}")))?;
        options.app_name.get_or_insert_with(|| "waveline".to_owned());
        options.server_selection_timeout.get_or_insert(Duration::from_secs(5));
        options.connect_timeout.get_or_insert(Duration::from_secs(5));
        let client = Client::with_options(options).map_err(|err| DocumentsError::Config(err.to_string()))?;
        let database = client.database(database);
        Ok(MongoDocuments { database })
    }

    /// The database in use.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// Drops the whole database (tests clean up with it).
    pub async fn drop_database(&self) -> Result<(), DocumentsError> {
        self.database.drop().await.map_err(error)
    }

    fn comments_collection(&self) -> Collection<Document> {
        self.database.collection("comments")
    }

    fn activities(&self) -> Collection<Document> {
        self.database.collection("activities")
    }

    fn messages_collection(&self) -> Collection<Document> {
        self.database.collection("messages")
    }

    fn conversations_collection(&self) -> Collection<Document> {
        self.database.collection("conversations")
    }

    fn notifications_collection(&self) -> Collection<Document> {
        self.database.collection("notifications")
    }

    fn notification_reads(&self) -> Collection<Document> {
        self.database.collection("notification_reads")
    }
}

/// Sorts a driver error into the seam's kinds.
fn error(err: mongodb::error::Error) -> DocumentsError {
    use mongodb::error::ErrorKind;
    match *err.kind {
        ErrorKind::Io(_) | ErrorKind::ServerSelection { .. } | ErrorKind::ConnectionPoolCleared { .. } => {
            DocumentsError::Unavailable(err.to_string())
        }
        _ => DocumentsError::Query(err.to_string()),
    }
}

fn text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn date(at: DateTime<Utc>) -> bson::DateTime {
    bson::DateTime::from_millis(at.timestamp_millis())
}

fn corrupt(what: &str, doc: &Document) -> DocumentsError {
    DocumentsError::Corrupt(format!("{what} in {}", doc.get("_id").map(ToString::to_string).unwrap_or_default()))
}

fn uuid_field(doc: &Document, field: &str) -> Result<Uuid, DocumentsError> {
    doc.get_str(field).ok().and_then(|s| Uuid::try_parse(s).ok()).ok_or_else(|| corrupt(field, doc))
}

fn time_field(doc: &Document, field: &str) -> Result<DateTime<Utc>, DocumentsError> {
    let at = doc.get_datetime(field).map_err(|_| corrupt(field, doc))?;
    DateTime::from_timestamp_millis(at.timestamp_millis()).ok_or_else(|| corrupt(field, doc))
}

/// An integer however the server stored it (a small one may come back as a 32-bit integer).
fn int_field(doc: &Document, field: &str) -> Result<i64, DocumentsError> {
    match doc.get(field) {
        Some(Bson::Int64(n)) => Ok(*n),
        Some(Bson::Int32(n)) => Ok(i64::from(*n)),
        Some(Bson::Double(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => Ok(*n as i64),
        _ => Err(corrupt(field, doc)),
    }
}

fn comment_from(doc: &Document) -> Result<Comment, DocumentsError> {
    let reply_to = match doc.get("reply_to") {
        None | Some(Bson::Null) => None,
        Some(_) => Some(CommentId(uuid_field(doc, "reply_to")?)),
    };
    Ok(Comment {
        id: CommentId(uuid_field(doc, "_id")?),
        track_id: TrackId(uuid_field(doc, "track_id")?),
        user_id: UserId(uuid_field(doc, "user_id")?),
        body: doc.get_str("body").map_err(|_| corrupt("body", doc))?.to_owned(),
        timestamp_ms: int_field(doc, "timestamp_ms")?,
        reply_to,
        created_at: time_field(doc, "created_at")?,
    })
}

fn activity_from(doc: &Document) -> Result<Activity, DocumentsError> {
    let kind = doc.get_str("kind").ok().and_then(ActivityKind::parse).ok_or_else(|| corrupt("kind", doc))?;
    let object_id = uuid_field(doc, "object_id")?;
    let object = if kind.is_about_a_track() {
        ActivityObject::Track(TrackId(object_id))
    } else {
        ActivityObject::Playlist(PlaylistId(object_id))
    };
    Ok(Activity {
        id: ActivityId(uuid_field(doc, "_id")?),
        kind,
        actor: UserId(uuid_field(doc, "actor")?),
        object,
        created_at: time_field(doc, "created_at")?,
    })
}

async fn collect(cursor: mongodb::Cursor<Document>) -> Result<Vec<Document>, DocumentsError> {
    cursor.try_collect().await.map_err(error)
}

fn index(keys: Document, name: &str) -> IndexModel {
    IndexModel::builder().keys(keys).options(IndexOptions::builder().name(name.to_owned()).build()).build()
}

#[async_trait]
impl Documents for MongoDocuments {
    fn backend(&self) -> &'static str {
        "mongodb"
    }

    async fn migrate(&self) -> Result<(), DocumentsError> {
        // The PostgreSQL tables' indexes, with `id` standing in for `_id` (see the module doc),
        // and for `(created_at, id)` in the newest-first ones.
        self.comments_collection()
            .create_indexes([
                index(doc! {"track_id": 1, "timestamp_ms": 1, "id": 1}, "track_timestamp"),
                index(doc! {"track_id": 1, "id": -1}, "track_newest"),
                index(doc! {"reply_to": 1}, "reply_to"),
                index(doc! {"user_id": 1}, "user"),
            ])
            .await
            .map_err(error)?;
        self.activities()
            .create_indexes([
                index(doc! {"actor": 1, "id": -1}, "actor_newest"),
                index(doc! {"object_id": 1}, "object"),
            ])
            .await
            .map_err(error)?;
        self.messages_collection()
            .create_indexes([
                index(doc! {"conversation_id": 1, "id": -1}, "conversation_newest"),
                index(doc! {"conversation_id": 1, "recipient": 1, "id": 1}, "unread"),
                index(doc! {"id": 1}, "id"),
                index(doc! {"sender": 1}, "sender"),
                index(doc! {"recipient": 1}, "recipient"),
            ])
            .await
            .map_err(error)?;
        self.conversations_collection()
            .create_indexes([
                index(doc! {"user_id": 1, "last_message_id": -1}, "member_latest"),
                index(doc! {"conversation_id": 1}, "conversation"),
                index(doc! {"other_id": 1}, "other"),
            ])
            .await
            .map_err(error)?;
        self.notifications_collection()
            .create_indexes([index(doc! {"user_id": 1, "id": -1}, "user_newest"), index(doc! {"actor": 1}, "actor")])
            .await
            .map_err(error)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), DocumentsError> {
        self.database.run_command(doc! {"ping": 1}).await.map_err(error)?;
        Ok(())
    }

    async fn insert_comment(&self, comment: NewComment) -> Result<Comment, DocumentsError> {
        let (id, created_at) = check_comment(&comment)?;
        let reply_to = match comment.reply_to {
            None => None,
            Some(target) => {
                let found = self
                    .comments_collection()
                    .find_one(doc! {"_id": text(target.0), "track_id": text(comment.track_id.0)})
                    .await
                    .map_err(error)?
                    .ok_or(DocumentsError::ReplyTargetNotFound(target))?;
                Some(comment_from(&found)?.reply_to.unwrap_or(target))
            }
        };
        let stored = doc! {
            "_id": text(id.0),
            "id": text(id.0),
            "track_id": text(comment.track_id.0),
            "user_id": text(comment.user_id.0),
            "body": &comment.body,
            "timestamp_ms": Bson::Int64(comment.timestamp_ms),
            "reply_to": reply_to.map_or(Bson::Null, |r| Bson::String(text(r.0))),
            "created_at": date(created_at),
        };
        self.comments_collection().insert_one(stored).await.map_err(error)?;
        Ok(comment.stored(id, reply_to, created_at))
    }

    async fn comment(&self, id: CommentId) -> Result<Option<Comment>, DocumentsError> {
        let found = self.comments_collection().find_one(doc! {"_id": text(id.0)}).await.map_err(error)?;
        found.as_ref().map(comment_from).transpose()
    }

    async fn comments(&self, query: &CommentQuery) -> Result<CommentPage, DocumentsError> {
        let limit = page_size(query.limit);
        let after = Keyset::decode(query.cursor.as_deref(), query.order.cursor_tag())?;
        let mut filter = doc! {"track_id": text(query.track_id.0)};
        let mut window = Document::new();
        if let Some(from) = query.from_ms {
            window.insert("$gte", Bson::Int64(from));
        }
        if let Some(to) = query.to_ms {
            window.insert("$lte", Bson::Int64(to));
        }
        if !window.is_empty() {
            filter.insert("timestamp_ms", window);
        }
        let sort = match query.order {
            CommentOrder::Timestamp => doc! {"timestamp_ms": 1, "id": 1},
            CommentOrder::Newest => doc! {"id": -1},
        };
        if let Some(after) = after {
            let id = text(after.id);
            match query.order {
                CommentOrder::Timestamp => {
                    let position = vec![
                        doc! {"timestamp_ms": {"$gt": Bson::Int64(after.key)}},
                        doc! {"timestamp_ms": Bson::Int64(after.key), "id": {"$gt": id}},
                    ];
                    filter.insert("$or", position);
                }
                // The cursor's time is its id's (`Keyset::decode` checks it).
                CommentOrder::Newest => {
                    filter.insert("id", doc! {"$lt": id});
                }
            }
        }
        let cursor =
            self.comments_collection().find(filter).sort(sort).limit((limit + 1) as i64).await.map_err(error)?;
        let comments = collect(cursor).await?.iter().map(comment_from).collect::<Result<Vec<_>, _>>()?;
        Ok(comment_page(comments, query.order, limit))
    }

    async fn count_comments(&self, track: TrackId) -> Result<u64, DocumentsError> {
        self.comments_collection().count_documents(doc! {"track_id": text(track.0)}).await.map_err(error)
    }

    async fn delete_comment(&self, id: CommentId) -> Result<u64, DocumentsError> {
        // Replies first: were this interrupted, no reply would be left without its root.
        let id = text(id.0);
        let replies =
            self.comments_collection().delete_many(doc! {"reply_to": &id}).await.map_err(error)?.deleted_count;
        let root = self.comments_collection().delete_many(doc! {"_id": &id}).await.map_err(error)?.deleted_count;
        Ok(replies + root)
    }

    async fn delete_track_comments(&self, track: TrackId) -> Result<u64, DocumentsError> {
        let done = self.comments_collection().delete_many(doc! {"track_id": text(track.0)}).await.map_err(error)?;
        Ok(done.deleted_count)
    }

    async fn insert_activity(&self, activity: NewActivity) -> Result<Activity, DocumentsError> {
        let (id, created_at) = check_activity(&activity)?;
        let stored = doc! {
            "_id": text(id.0),
            "id": text(id.0),
            "kind": activity.kind.as_str(),
            "actor": text(activity.actor.0),
            "object_id": text(activity.object.id()),
            "created_at": date(created_at),
        };
        self.activities().insert_one(stored).await.map_err(error)?;
        Ok(Activity { id, kind: activity.kind, actor: activity.actor, object: activity.object, created_at })
    }

    async fn newest_about(
        &self,
        objects: &[ActivityObject],
        actors: &[UserId],
    ) -> Result<HashMap<ActivityObject, ActivityId>, DocumentsError> {
        check_objects(objects)?;
        check_actors(actors)?;
        if objects.is_empty() || actors.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<String> = objects.iter().map(|o| text(o.id())).collect();
        let actors: Vec<String> = actors.iter().map(|a| text(a.0)).collect();
        // Through the `object` index; each object's activities by the actors are few next to
        // the actors' own (an object is posted once and reposted by some of them).
        let cursor = self
            .activities()
            .find(doc! {"object_id": {"$in": ids}, "actor": {"$in": actors}})
            .projection(doc! {"id": 1, "object_id": 1, "kind": 1})
            .await
            .map_err(error)?;
        let found = collect(cursor).await?;
        let mut rows = Vec::with_capacity(found.len());
        for doc in &found {
            let kind = doc.get_str("kind").map_err(|_| corrupt("activity", doc))?.to_owned();
            rows.push((uuid_field(doc, "object_id")?, ActivityId(uuid_field(doc, "id")?), kind));
        }
        newest_of(objects, rows)
    }

    async fn feed(
        &self,
        actors: &[UserId],
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ActivityPage, DocumentsError> {
        check_actors(actors)?;
        let limit = page_size(limit);
        let after = Keyset::decode(cursor, ACTIVITY_TAG)?;
        let mut actors: Vec<String> = actors.iter().map(|a| text(a.0)).collect();
        actors.sort_unstable();
        actors.dedup();
        if actors.is_empty() {
            return Ok(activity_page(Vec::new(), limit));
        }
        let mut filter = if actors.len() == 1 {
            doc! {"actor": actors.swap_remove(0)}
        } else {
            doc! {"actor": {"$in": actors}}
        };
        if let Some(after) = after {
            // The cursor's time is its id's (`Keyset::decode` checks it).
            filter.insert("id", doc! {"$lt": text(after.id)});
        }
        let cursor =
            self.activities().find(filter).sort(doc! {"id": -1}).limit((limit + 1) as i64).await.map_err(error)?;
        let activities = collect(cursor).await?.iter().map(activity_from).collect::<Result<Vec<_>, _>>()?;
        Ok(activity_page(activities, limit))
    }

    async fn delete_object_activities(
        &self,
        object: ActivityObject,
        actor: Option<UserId>,
    ) -> Result<u64, DocumentsError> {
        let kinds: Vec<&str> = object.kinds().iter().map(|k| k.as_str()).collect();
        let mut filter = doc! {"object_id": text(object.id()), "kind": {"$in": kinds}};
        if let Some(actor) = actor {
            filter.insert("actor", text(actor.0));
        }
        Ok(self.activities().delete_many(filter).await.map_err(error)?.deleted_count)
    }

    async fn delete_account(&self, user: UserId) -> Result<AccountRemoval, DocumentsError> {
        let user = text(user.0);
        let comments = self.comments_collection();
        let mut removed = AccountRemoval::default();
        // The account's root comments go in rounds, each with its replies (replies first).
        loop {
            let roots = comments
                .find(doc! {"user_id": &user, "reply_to": Bson::Null})
                .projection(doc! {"_id": 1})
                .limit(DELETE_BATCH)
                .await
                .map_err(error)?;
            let ids: Vec<Bson> = collect(roots).await?.into_iter().filter_map(|d| d.get("_id").cloned()).collect();
            if ids.is_empty() {
                break;
            }
            removed.comments +=
                comments.delete_many(doc! {"reply_to": {"$in": ids.clone()}}).await.map_err(error)?.deleted_count;
            removed.comments += comments.delete_many(doc! {"_id": {"$in": ids}}).await.map_err(error)?.deleted_count;
        }
        // Then its replies to others.
        removed.comments += comments.delete_many(doc! {"user_id": &user}).await.map_err(error)?.deleted_count;
        removed.activities = self.activities().delete_many(doc! {"actor": &user}).await.map_err(error)?.deleted_count;
        removed.messages = self
            .messages_collection()
            .delete_many(doc! {"$or": [{"sender": &user}, {"recipient": &user}]})
            .await
            .map_err(error)?
            .deleted_count;
        self.conversations_collection()
            .delete_many(doc! {"$or": [{"user_id": &user}, {"other_id": &user}]})
            .await
            .map_err(error)?;
        removed.notifications = self
            .notifications_collection()
            .delete_many(doc! {"$or": [{"user_id": &user}, {"actor": &user}]})
            .await
            .map_err(error)?
            .deleted_count;
        self.notification_reads().delete_many(doc! {"_id": &user}).await.map_err(error)?;
        Ok(removed)
    }

    async fn send_message(&self, message: NewMessage) -> Result<Sent, DocumentsError> {
        let (id, created_at) = check_message(&message)?;
        let conversation = conversation_between(message.sender, message.recipient);
        // The key is the idempotency key, so the server itself refuses a second copy.
        let key = format!("{}:{}", text(message.sender.0), message.client_id);
        let messages = self.messages_collection();
        if let Some(found) = messages.find_one(doc! {"_id": &key}).await.map_err(error)? {
            return Ok(Sent { message: message_from(&found)?, new: false });
        }
        let stored = doc! {
            "_id": &key,
            "id": text(id.0),
            "conversation_id": text(conversation.0),
            "sender": text(message.sender.0),
            "recipient": text(message.recipient.0),
            "client_id": &message.client_id,
            "body": &message.body,
            "created_at": date(created_at),
        };
        if let Err(err) = messages.insert_one(stored).await {
            // Sent twice at once: the other one won; answer with it.
            if let Some(found) = messages.find_one(doc! {"_id": &key}).await.map_err(error)? {
                return Ok(Sent { message: message_from(&found)?, new: false });
            }
            return Err(error(err));
        }
        for (member, other) in [(message.sender, message.recipient), (message.recipient, message.sender)] {
            self.conversations_collection()
                .update_one(
                    doc! {"_id": format!("{}:{}", text(conversation.0), text(member.0))},
                    doc! {
                        "$set": {"conversation_id": text(conversation.0), "user_id": text(member.0), "other_id": text(other.0)},
                        "$max": {"last_message_id": text(id.0)},
                    },
                )
                .upsert(true)
                .await
                .map_err(error)?;
        }
        let stored = Message {
            id,
            conversation_id: conversation,
            sender: message.sender,
            recipient: message.recipient,
            body: message.body,
            client_id: message.client_id,
            created_at,
        };
        Ok(Sent { message: stored, new: true })
    }

    async fn conversation_members(&self, id: ConversationId) -> Result<Option<(UserId, UserId)>, DocumentsError> {
        let found =
            self.conversations_collection().find_one(doc! {"conversation_id": text(id.0)}).await.map_err(error)?;
        found.map(|doc| Ok((UserId(uuid_field(&doc, "user_id")?), UserId(uuid_field(&doc, "other_id")?)))).transpose()
    }

    async fn messages(
        &self,
        id: ConversationId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MessagePage, DocumentsError> {
        let limit = page_size(limit);
        let after = Keyset::decode(cursor, MESSAGE_TAG)?;
        let mut filter = doc! {"conversation_id": text(id.0)};
        if let Some(after) = after {
            filter.insert("id", doc! {"$lt": text(after.id)});
        }
        let found = self
            .messages_collection()
            .find(filter)
            .sort(doc! {"id": -1})
            .limit((limit + 1) as i64)
            .await
            .map_err(error)?;
        let messages = collect(found).await?.iter().map(message_from).collect::<Result<Vec<_>, _>>()?;
        let (messages, next_cursor) =
            paginate(messages, limit, |m| keyset_of(m.id.0, m.created_at).encode(MESSAGE_TAG));
        Ok(MessagePage { messages, next_cursor })
    }

    async fn conversations(
        &self,
        user: UserId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<ConversationPage, DocumentsError> {
        let limit = page_size(limit);
        let after = Keyset::decode(cursor, CONVERSATION_TAG)?;
        let mut filter = doc! {"user_id": text(user.0)};
        if let Some(after) = after {
            filter.insert("last_message_id", doc! {"$lt": text(after.id)});
        }
        let found = self
            .conversations_collection()
            .find(filter)
            .sort(doc! {"last_message_id": -1})
            .limit((limit + 1) as i64)
            .await
            .map_err(error)?;
        let mut summaries = Vec::new();
        for member in collect(found).await? {
            let conversation = uuid_field(&member, "conversation_id")?;
            let last = uuid_field(&member, "last_message_id")?;
            let Some(message) = self.messages_collection().find_one(doc! {"id": text(last)}).await.map_err(error)?
            else {
                return Err(corrupt("last_message_id", &member));
            };
            let mut unread = doc! {"conversation_id": text(conversation), "recipient": text(user.0)};
            if let Ok(read) = member.get_str("read_up_to") {
                unread.insert("id", doc! {"$gt": read});
            }
            let unread_count = self.messages_collection().count_documents(unread).await.map_err(error)?;
            summaries.push(ConversationSummary {
                id: ConversationId(conversation),
                other: UserId(uuid_field(&member, "other_id")?),
                last_message: message_from(&message)?,
                unread_count,
            });
        }
        let (conversations, next_cursor) = paginate(summaries, limit, |c| {
            keyset_of(c.last_message.id.0, c.last_message.created_at).encode(CONVERSATION_TAG)
        });
        Ok(ConversationPage { conversations, next_cursor })
    }

    async fn mark_conversation_read(
        &self,
        id: ConversationId,
        user: UserId,
        up_to: MessageId,
    ) -> Result<bool, DocumentsError> {
        let done = self
            .conversations_collection()
            .update_one(
                doc! {"_id": format!("{}:{}", text(id.0), text(user.0))},
                doc! {"$max": {"read_up_to": text(up_to.0)}},
            )
            .await
            .map_err(error)?;
        Ok(done.matched_count == 1)
    }

    async fn insert_notification(&self, notification: NewNotification) -> Result<Notification, DocumentsError> {
        let (id, created_at) = notification_id(&notification);
        let subject = subject_doc(notification.subject);
        let user = text(notification.user_id.0);
        let stored = doc! {
            "_id": text(id.0),
            "id": text(id.0),
            "user_id": &user,
            "kind": notification.kind.as_str(),
            "actor": notification.actor.map(|a| Bson::String(text(a.0))).unwrap_or(Bson::Null),
            "subject": subject,
            "created_at": date(created_at),
        };
        let collection = self.notifications_collection();
        collection.insert_one(stored).await.map_err(error)?;
        // Keep the newest NOTIFICATIONS_KEPT.
        let oldest_kept = collection
            .find(doc! {"user_id": &user})
            .sort(doc! {"id": -1})
            .skip((NOTIFICATIONS_KEPT - 1) as u64)
            .limit(1)
            .projection(doc! {"id": 1})
            .await
            .map_err(error)?;
        if let Some(oldest) = collect(oldest_kept).await?.first() {
            let oldest = uuid_field(oldest, "id")?;
            collection.delete_many(doc! {"user_id": &user, "id": {"$lt": text(oldest)}}).await.map_err(error)?;
        }
        Ok(Notification {
            id,
            user_id: notification.user_id,
            kind: notification.kind,
            actor: notification.actor,
            subject: notification.subject,
            created_at,
        })
    }

    async fn notifications(
        &self,
        user: UserId,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<NotificationPage, DocumentsError> {
        let limit = page_size(limit);
        let after = Keyset::decode(cursor, NOTIFICATION_TAG)?;
        let user = text(user.0);
        let mut filter = doc! {"user_id": &user};
        if let Some(after) = after {
            filter.insert("id", doc! {"$lt": text(after.id)});
        }
        let collection = self.notifications_collection();
        let found = collection.find(filter).sort(doc! {"id": -1}).limit((limit + 1) as i64).await.map_err(error)?;
        let notifications = collect(found).await?.iter().map(notification_from).collect::<Result<Vec<_>, _>>()?;
        let (notifications, next_cursor) =
            paginate(notifications, limit, |n| keyset_of(n.id.0, n.created_at).encode(NOTIFICATION_TAG));
        let mut unread = doc! {"user_id": &user};
        if let Some(read) = self.notification_reads().find_one(doc! {"_id": &user}).await.map_err(error)?
            && let Ok(up_to) = read.get_str("up_to")
        {
            unread.insert("id", doc! {"$gt": up_to});
        }
        let unread_count = collection.count_documents(unread).await.map_err(error)?;
        Ok(NotificationPage { notifications, next_cursor, unread_count })
    }

    async fn mark_notifications_read(&self, user: UserId, up_to: NotificationId) -> Result<(), DocumentsError> {
        self.notification_reads()
            .update_one(doc! {"_id": text(user.0)}, doc! {"$max": {"up_to": text(up_to.0)}})
            .upsert(true)
            .await
            .map_err(error)?;
        Ok(())
    }
}

fn message_from(doc: &Document) -> Result<Message, DocumentsError> {
    Ok(Message {
        id: MessageId(uuid_field(doc, "id")?),
        conversation_id: ConversationId(uuid_field(doc, "conversation_id")?),
        sender: UserId(uuid_field(doc, "sender")?),
        recipient: UserId(uuid_field(doc, "recipient")?),
        body: doc.get_str("body").map_err(|_| corrupt("body", doc))?.to_owned(),
        client_id: doc.get_str("client_id").map_err(|_| corrupt("client_id", doc))?.to_owned(),
        created_at: time_field(doc, "created_at")?,
    })
}

/// A notification's subject as a document: `{kind, …ids as strings}`.
fn subject_doc(subject: Subject) -> Document {
    match subject {
        Subject::Nothing => doc! {"kind": "nothing"},
        Subject::Track { id } => doc! {"kind": "track", "id": text(id.0)},
        Subject::Playlist { id } => doc! {"kind": "playlist", "id": text(id.0)},
        Subject::Comment { track, comment } => {
            doc! {"kind": "comment", "track": text(track.0), "comment": text(comment.0)}
        }
        Subject::Conversation { id, message } => {
            doc! {"kind": "conversation", "id": text(id.0), "message": text(message.0)}
        }
    }
}

fn subject_of(doc: &Document) -> Option<Subject> {
    let id = |field: &str| doc.get_str(field).ok().and_then(|s| Uuid::try_parse(s).ok());
    Some(match doc.get_str("kind").ok()? {
        "nothing" => Subject::Nothing,
        "track" => Subject::Track { id: TrackId(id("id")?) },
        "playlist" => Subject::Playlist { id: PlaylistId(id("id")?) },
        "comment" => Subject::Comment { track: TrackId(id("track")?), comment: CommentId(id("comment")?) },
        "conversation" => Subject::Conversation { id: ConversationId(id("id")?), message: MessageId(id("message")?) },
        _ => return None,
    })
}

fn notification_from(doc: &Document) -> Result<Notification, DocumentsError> {
    let kind = doc.get_str("kind").ok().and_then(NotificationKind::parse).ok_or_else(|| corrupt("kind", doc))?;
    let actor = match doc.get("actor") {
        None | Some(Bson::Null) => None,
        Some(_) => Some(UserId(uuid_field(doc, "actor")?)),
    };
    let subject = doc.get_document("subject").ok().and_then(subject_of).ok_or_else(|| corrupt("subject", doc))?;
    Ok(Notification {
        id: NotificationId(uuid_field(doc, "id")?),
        user_id: UserId(uuid_field(doc, "user_id")?),
        kind,
        actor,
        subject,
        created_at: time_field(doc, "created_at")?,
    })
}
